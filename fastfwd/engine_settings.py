"""The data plane's settings (worker threads, pipe size, busy polling) and their checks, one
set for every way they come in: ``Forwarder(...)``, the config file's ``[engine]`` and the
command line's overrides of it. Each check returns the value or raises SpecError naming
what was wrong, without the setting's name: the caller knows how to name it (``workers``,
``engine.workers``)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .rules import SpecError

#: Worker threads at most: more than any machine has CPUs, yet few enough that their epoll
#: sets and eventfds fit the daemon's fd limit (far more failed at start with EMFILE).
MAX_WORKERS = 1024


def check_workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise SpecError(f"expected an integer from 1 to {MAX_WORKERS}, got {value!r}")
    return value


def check_pipe_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 4096 <= value <= 1 << 30:
        raise SpecError(f"expected a byte count from 4096 to {1 << 30}, got {value!r}")
    return value


def check_microseconds(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise SpecError(f"expected microseconds from 0 to 1000000, got {value!r}")
    return value


#: Each engine setting's check, by the setting's name.
CHECKS: dict[str, Callable[[Any], int]] = {
    "workers": check_workers, "pipe_size": check_pipe_size, "busy_poll_us": check_microseconds,
}
