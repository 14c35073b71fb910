"""The servers behind every subject: a bulk TCP source, a TCP+UDP echo server and, for the
iperf3 figure, an iperf3 server.

The UDP sink is part of the flood tool (it counts what arrives), bound on ``SINK``.
"""
from __future__ import annotations

from pathlib import Path

from .build import tool
from .procs import Proc, bound, wait_bound

BULK, ECHO, SINK, IPERF3 = 601, 602, 603, 604  # below the ephemeral range, even the widened one


def start(scratch: Path, iperf3: bool) -> list[Proc]:
    endpoints = [("tcp", BULK), ("tcp", ECHO), ("udp", ECHO)] + [("tcp", IPERF3)] * iperf3
    taken = [e for e in endpoints + [("udp", SINK)] if bound(*e)]
    if taken:
        raise RuntimeError(f"ports already in use on this host: {taken}")
    procs = [Proc([tool("bulk"), "serve", str(BULK)], log=scratch / "bulk.log"),
             Proc([tool("echo"), str(ECHO)], log=scratch / "echo.log")]
    if iperf3:
        # -J: each test's exact counts go back to the client (--get-server-output), see bench/iperf_window.py.
        procs.append(Proc(["iperf3", "-s", "-J", "-B", "127.0.0.1", "-p", str(IPERF3)], log=scratch / "iperf3.log"))
    try:
        wait_bound(endpoints, procs)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs
