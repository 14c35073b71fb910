"""The servers behind every subject: a bulk TCP source and a TCP+UDP echo server.

The UDP sink is part of the flood tool (it counts what arrives), bound on ``SINK``.
"""
from __future__ import annotations

from pathlib import Path

from .build import tool
from .procs import Proc, bound, wait_bound

BULK, ECHO, SINK = 601, 602, 603  # below the ephemeral range, even the widened one


def start(scratch: Path) -> list[Proc]:
    endpoints = [("tcp", BULK), ("tcp", ECHO), ("udp", ECHO)]
    taken = [e for e in endpoints + [("udp", SINK)] if bound(*e)]
    if taken:
        raise RuntimeError(f"ports already in use on this host: {taken}")
    procs = [Proc([tool("bulk"), "serve", str(BULK)], log=scratch / "bulk.log"),
             Proc([tool("echo"), str(ECHO)], log=scratch / "echo.log")]
    wait_bound(endpoints, procs)
    return procs
