"""A blocking client for the daemon's JSON-lines sockets: one request, one reply.

Kept free of asyncio and the engine, so the DHCP hook and ``fastfwd status`` start fast.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import stat
import struct
import time
from typing import Any, NoReturn

#: Replies larger than this are not from fastfwd (a status of thousands of rules fits easily).
MAX_REPLY = 64 << 20
#: The longest ``--timeout``: some 31 years, within what a socket's timeout can hold (Python's
#: is nanoseconds in 64 bits, about 292 years).
MAX_TIMEOUT = 1e9


class DaemonError(Exception):
    """The daemon could not be reached in time, or its reply was unusable. One line."""


class DaemonUnreachable(DaemonError):
    """Nothing listens on the socket (it is missing, or refuses): nothing was sent."""


class Parser(argparse.ArgumentParser):
    """The commands' argument parser: a usage error is one line naming the problem and where
    help is (not the usage text followed by the error), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def timeout_arg(text: str) -> float:
    """An argparse type for ``--timeout``: seconds, above zero (a socket given 0 would not
    wait at all, and a negative or NaN one would not even be accepted) and at most
    ``MAX_TIMEOUT``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TIMEOUT:g} seconds, got {text!r}")
    return value


def call(path: str | os.PathLike[str], message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``message`` to the socket at ``path`` and return the daemon's reply object.

    ``timeout`` bounds the whole exchange. A reply with ``"ok": false`` is returned, not
    raised: the caller decides how to report it.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Blocking, with a send timeout: a Unix socket whose listen backlog is full (a busy
        # daemon lets connections wait there) fails a non-blocking connect at once, while a
        # blocking one waits for room, up to SO_SNDTIMEO.
        seconds = int(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
        try:
            sock.connect(os.fspath(path))
        except BlockingIOError:
            raise DaemonError(f"fastfwd at {path} did not accept the connection within {timeout:g}s") from None
        except OSError as exc:
            kind = DaemonUnreachable if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) else DaemonError
            raise kind(f"cannot reach fastfwd at {path}: {_why_unreachable(path, exc)}") from None
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        try:
            try:
                sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before it read anything: its one reply line may be waiting
            reply = _read_line(sock, deadline, path)
        except TimeoutError:
            raise DaemonError(f"no reply from fastfwd at {path} within {timeout:g}s") from None
        except OSError as exc:
            raise DaemonError(f"lost the connection to fastfwd at {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(reply)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise DaemonError(f"unusable reply from {path}: {reply[:100]!r}")
    return doc


def _why_unreachable(path: str | os.PathLike[str], exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket (is the daemon running?)"
    if isinstance(exc, ConnectionRefusedError) and not _is_socket(path):
        return "not a socket (a wrong path?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the daemon running?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def _is_socket(path: str | os.PathLike[str]) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # gone meanwhile: as a stale socket, "refused" says it best


def _read_line(sock: socket.socket, deadline: float, path: str | os.PathLike[str]) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise DaemonError(f"fastfwd at {path} closed the connection without a reply")
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise DaemonError(f"reply from {path} larger than {MAX_REPLY} bytes: not fastfwd")
    return bytes(buf[: buf.index(b"\n")])
