"""Forwarders the bench runs as subjects from Python: a plain uvloop one, and fastfwd through its API.

Both take the same arguments: ``--forward PROTO:LISTEN_PORT:TARGET_PORT`` (repeatable), on
127.0.0.1 at both ends.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

LOOPBACK = "127.0.0.1"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--forward", action="append", default=[], type=_forward,
                   metavar="PROTO:LISTEN:TARGET", help="forward 127.0.0.1:LISTEN to 127.0.0.1:TARGET")
    return p


def _forward(text: str) -> tuple[str, int, int]:
    proto, listen, target = text.split(":")
    if proto not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(f"{proto!r}: expected tcp or udp")
    return proto, int(listen), int(target)


async def until_terminated() -> None:
    """Return on SIGTERM or SIGINT: the bench stops subjects with SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


Forwards = Sequence[tuple[str, int, int]]
