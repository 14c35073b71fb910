"""The config file watcher starts from the file the daemon loaded, not from whatever the file
holds once the watch begins: an edit saved while the daemon was starting is applied."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastfwd.config import load_config
from fastfwd.daemon import Daemon, Overrides

from helpers_control import EchoServer, echo_roundtrip, free_port, needs_engine, short_dir

pytestmark = [needs_engine, pytest.mark.timeout(60)]


def test_an_edit_made_after_loading_and_before_the_watch_is_applied(tmp_path: Path) -> None:
    echo = EchoServer()
    old_port, new_port, path = free_port(), free_port(), tmp_path / "f.toml"
    path.write_text(f'[[forward]]\nlisten = {old_port}\nto = "127.0.0.1:{echo.port}"\n')

    async def main() -> None:
        with short_dir() as sockets:
            d = Daemon(load_config(path), path, overrides=Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            # Saved after the daemon read the file, before its watch is up.
            path.write_text(f'[[forward]]\nlisten = {new_port}\nto = "127.0.0.1:{echo.port}"\n')
            run = asyncio.create_task(d.run())
            try:
                for _ in range(200):  # the watcher re-checks every second
                    if [a.port for a in d.rules] == [new_port]:
                        break
                    await asyncio.sleep(0.05)
                assert [a.port for a in d.rules] == [new_port]
                assert await asyncio.to_thread(echo_roundtrip, new_port)
            finally:
                d.stop()
                assert await run == 0
    try:
        asyncio.run(asyncio.wait_for(main(), 40))
    finally:
        echo.close()
