"""Readiness for a service manager: the ``sd_notify`` datagram protocol.

When systemd starts the daemon as ``Type=notify`` it passes ``NOTIFY_SOCKET``; the daemon
says ``READY=1`` once its rules forward, ``RELOADING=1`` and ``READY=1`` around a reload and
``STOPPING=1`` when it begins to stop, so units ordered after it start only once its ports
work. With ``WatchdogSec=`` in the unit (``WATCHDOG_USEC``), it sends ``WATCHDOG=1`` at half
that interval while it runs. Without ``NOTIFY_SOCKET`` every call does nothing.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("fastfwd")

#: The last message failed: the next failures are logged at DEBUG only, as the watchdog would
#: otherwise add a warning every few seconds for as long as the manager is out of reach.
_failing = False


def notify(*fields: str) -> bool:
    """Send ``fields`` (``KEY=value``) as one message. False when there is no service
    manager to tell, or it could not be told (logged: a missing readiness message makes the
    manager time the start out, so the reason must be findable; once until it can be told
    again)."""
    global _failing
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading "@" names a socket in the abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        # Non-blocking: this runs on the event loop, and a manager whose queue is full must
        # not stop the daemon (the message fails, logged).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.log(logging.DEBUG if _failing else logging.WARNING, "cannot notify the service manager at %s: %s",
                path, exc)
        _failing = True
        return False
    if _failing:
        log.info("the service manager at %s is reachable again", path)
        _failing = False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1``: half the ``WATCHDOG_USEC`` the manager passed, so
    one late ping is not yet a missed one. None when no watchdog is asked of this process
    (``WATCHDOG_PID``, when set, names the process that must feed it)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID")
    if not (usec.isascii() and usec.isdigit()) or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def reloading() -> bool:
    """``RELOADING=1``, stamped with the monotonic clock as the protocol asks."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
