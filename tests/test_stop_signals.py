"""Stopping: SIGINT, or a second SIGTERM, stops at once however early in the shutdown it
comes, even before the drain has begun (say, while a reload or a lease change finishes)."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from fastfwd.config import Config, ControlSettings
from fastfwd.daemon import Daemon, Overrides
from fastfwd.rules import Rule

from helpers_control import EchoServer, free_port, needs_engine, short_dir

pytestmark = [needs_engine, pytest.mark.timeout(90)]


def _open_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"  # through the forwarder: a live connection the drain waits for
    return sock


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_stop_now_before_the_drain_began_is_not_ignored(tmp_path: Path, second: str) -> None:
    echo = EchoServer()
    port = free_port()

    async def main() -> None:
        with short_dir() as sockets:
            config = Config(control=ControlSettings(drain_deadline=600.0))
            d = Daemon(config, None, [Rule.parse(f"{port}:127.0.0.1:{echo.port}")], Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            run = asyncio.create_task(d.run())
            for _ in range(200):
                if d.fw is not None and (sockets / "l.sock").exists():
                    break
                await asyncio.sleep(0.05)
            conn = await asyncio.to_thread(_open_connection, port)
            try:
                async with d._lock:  # a reload or a lease change under way: the drain waits for it
                    d._on_term()  # SIGTERM: drain
                    await asyncio.sleep(0.1)
                    d._on_int() if second == "SIGINT" else d._on_term()  # then: stop at once
                # Without the second signal the drain would wait 600 s for the open connection.
                assert await asyncio.wait_for(run, 30) == 0
            finally:
                conn.close()
    try:
        asyncio.run(main())
    finally:
        echo.close()
