"""``python -m fastfwd``: the same as the ``fastfwd`` command."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python still loads the command: as quiet as one later
    sys.exit(130)

sys.exit(main())
