"""Reloads and target names: re-pointing a rule to a name that the same file
introduces must not close the rule's listener (and reset the connections in its accept
queue) while the name waits to be resolved."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from fastfwd.config import load_config
from fastfwd.daemon import Daemon, Overrides
from fastfwd.leases import Lease
from fastfwd.rules import Rule

from helpers_control import EchoServer, echo_roundtrip, free_port, needs_engine

pytestmark = [needs_engine, pytest.mark.timeout(60)]


def _run_then_close(main: Coroutine[Any, Any, None], echo: EchoServer) -> None:
    try:
        asyncio.run(asyncio.wait_for(main, 30))
    finally:
        echo.close()


def _listener_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:port, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.parametrize("entry", ['ip = "127.0.0.1"', 'mac = "52:54:00:00:00:01"'])
def test_retarget_to_a_name_the_reload_introduces_keeps_the_listener(tmp_path: Path, entry: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    echo = EchoServer()
    port, path = free_port(), tmp_path / "f.toml"
    path.write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')

    async def main() -> None:
        d = Daemon(load_config(path), path, overrides=Overrides(workers=1, state_dir=str(tmp_path / "state")))
        fw = await d.start()
        try:
            if "mac" in entry:
                d.leases.apply_event("add", Lease("52:54:00:00:00:01", "127.0.0.1"))
            before = _listener_inode(port)
            path.write_text(f'[[forward]]\nlisten = {port}\nto = "vm2:{echo.port}"\n[hosts.vm2]\n{entry}\n')
            diff = await d.reload("test")
            assert diff is not None and len(diff.retargeted) == 1
            assert _listener_inode(port) == before
            assert "is pending" not in caplog.text
            assert await asyncio.to_thread(echo_roundtrip, port)
        finally:
            await fw.close()
    _run_then_close(main(), echo)


def test_a_rejected_reload_leaves_the_names_it_introduced_unknown(tmp_path: Path) -> None:
    echo = EchoServer()
    port, busy, path = free_port(), free_port(), tmp_path / "f.toml"
    path.write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')

    async def main() -> None:
        d = Daemon(load_config(path), path, overrides=Overrides(workers=1, state_dir=str(tmp_path / "state")))
        fw = await d.start()
        blocker = socket.create_server(("127.0.0.1", busy))  # another program holds this port
        try:
            path.write_text(f'[[forward]]\nlisten = {port}\nto = "vm2:{echo.port}"\n'
                            f'[[forward]]\nlisten = {busy}\nto = "127.0.0.1:{echo.port}"\n'
                            '[hosts.vm2]\nip = "127.0.0.1"\n')
            assert await d.reload("test") is None
            assert fw.names == {} and [a.rule.target_host for a in fw.rules] == ["127.0.0.1"]
            assert await asyncio.to_thread(echo_roundtrip, port)
        finally:
            blocker.close()
            await fw.close()
    _run_then_close(main(), echo)


def test_run_time_rules_are_checked_against_the_sources_in_effect(tmp_path: Path) -> None:
    """[sources] is read at start only: after a reload that turns DHCP off (in the file, for
    the next start), the lease socket still serves, so a rule may still target a DHCP name."""
    path = tmp_path / "f.toml"
    path.write_text("")

    async def main() -> None:
        d = Daemon(load_config(path), path, overrides=Overrides(workers=1, state_dir=str(tmp_path / "state")))
        fw = await d.start()
        try:
            path.write_text("[sources]\ndhcp = false\n")
            assert await d.reload("test") is not None
            active = await d.add_rule(Rule.parse(f"{free_port()}:vm9:22"))
            assert active.pending
        finally:
            await fw.close()
    asyncio.run(asyncio.wait_for(main(), 30))
