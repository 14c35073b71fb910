"""``python -m fastfwd``: the same as the ``fastfwd`` command."""
import sys

from .cli import main

sys.exit(main())
