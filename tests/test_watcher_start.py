"""The config file watcher starts from the file the daemon loaded, not from whatever the file
holds once the watch begins: an edit saved while the daemon was starting is applied. And the
daemon applies only the content the watcher saw finished."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from fastfwd.config import load_config
from fastfwd.daemon import Daemon, Overrides
from fastfwd.watcher import fingerprint

from helpers_control import EchoServer, echo_roundtrip, free_port, needs_engine, short_dir

pytestmark = [needs_engine, pytest.mark.timeout(60)]


def _forward(port: int, echo: EchoServer) -> str:
    return f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'


def test_an_edit_made_after_loading_and_before_the_watch_is_applied(tmp_path: Path, echo: EchoServer) -> None:
    old_port, new_port, path = free_port(), free_port(), tmp_path / "f.toml"
    path.write_text(_forward(old_port, echo))

    async def main() -> None:
        with short_dir() as sockets:
            d = Daemon(load_config(path), path, overrides=Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            # Saved after the daemon read the file, before its watch is up.
            path.write_text(_forward(new_port, echo))
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
    asyncio.run(asyncio.wait_for(main(), 40))


def test_a_file_that_changed_since_the_watcher_saw_it_finished_is_not_applied(
        tmp_path: Path, echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon reads the file again after the watcher saw it finished: reading otherwise, it
    may be reading the start of a new write."""
    caplog.set_level(logging.INFO, logger="fastfwd")
    port, path = free_port(), tmp_path / "f.toml"
    path.write_text(_forward(port, echo))

    async def main() -> None:
        d = Daemon(load_config(path), path, overrides=Overrides(workers=1, state_dir=str(tmp_path / "state")))
        fw = await d.start()
        try:
            finished = fingerprint(path)
            path.write_text("")  # a writer has begun again: truncated, the rest to come
            assert await d.reload("config changed", expect=finished) is None
            assert f"config changed: {path} changed again while being read" in caplog.text
            assert [a.port for a in d.rules] == [port]
            assert await asyncio.to_thread(echo_roundtrip, port)
        finally:
            await fw.close()
    asyncio.run(asyncio.wait_for(main(), 30))
