"""Reloads as an operator's tools make them: a file emptied by one command and filled by the
next, a file deleted and put back, a symlinked directory swapped, SIGHUP at any moment. The
rules keep forwarding through all of it, the log says why nothing changed, the final content is
applied, and status tells how the last reload went."""
from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from pathlib import Path

import pytest

from fastfwd import daemon as daemon_module, watcher
from fastfwd.unixclient import call

from helpers_control import (DaemonProcess, EchoServer, connects, daemon, echo_roundtrip, fastfwd, free_port,
                             needs_engine, wait_until)
from test_reload import (forward, hold_forwarding, one_rule, one_rule_added_by_one_reload, rule_ports, swap_symlink,
                         write_atomic)

pytestmark = pytest.mark.timeout(60)


@needs_engine
def test_a_file_emptied_by_one_command_and_filled_by_the_next_never_drops_the_rules(
        tmp_path: Path, echo: EchoServer) -> None:
    """`: > f.toml; ...; cat new > f.toml`: between the two the file is empty and closed, and
    stays so for longer than the settle time. Applied, it would close every listener."""
    keep, path = one_rule(tmp_path, echo.port)
    added = free_port()
    with daemon(tmp_path, "-c", "f.toml") as proc:
        path.write_bytes(b"")
        # Waited for, not assumed after a while: the watcher may see the change only at its
        # next recheck, and a loaded machine delays that further.
        proc.wait_log("f.toml is empty: the running rules stay")
        hold_forwarding(proc, keep)  # for over a second: many times the settle time
        proc.signal(signal.SIGHUP)  # asked to reload meanwhile: the same answer
        proc.wait_log("f.toml is empty", count=2)
        hold_forwarding(proc, keep, rounds=3)
        path.write_text(forward(keep, f"127.0.0.1:{echo.port}") + forward(added, f"127.0.0.1:{echo.port}"))
        one_rule_added_by_one_reload(proc, added, keep)


@needs_engine
def test_a_file_that_says_nothing_but_a_comment_removes_every_rule(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        write_atomic(path, "# nothing forwarded for now\n")
        proc.wait_log(" applied: ")
        assert "config changed: f.toml applied: 0 added, 1 removed" in proc.log()
        wait_until(lambda: not connects(port), what="the removed rule's listener to close")
        assert rule_ports(proc) == []


@needs_engine
def test_a_deleted_file_keeps_the_rules_says_so_and_its_return_is_applied(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    added = free_port()
    with daemon(tmp_path, "-c", "f.toml") as proc:
        path.unlink()
        proc.wait_log("f.toml is gone: the running rules stay until it is back")
        assert echo_roundtrip(port)
        proc.signal(signal.SIGHUP)
        proc.wait_log("rejected, rules unchanged")
        assert "SIGHUP: f.toml: cannot read: No such file or directory" in proc.log()
        assert rule_ports(proc) == [port] and echo_roundtrip(port)
        path.write_text(forward(added, f"127.0.0.1:{echo.port}"))
        proc.wait_log(" applied: ")
        assert "config changed: f.toml applied: 1 added, 1 removed" in proc.log()
        assert rule_ports(proc) == [added] and echo_roundtrip(added)


def _status(proc: DaemonProcess) -> dict:
    reply = call(proc.control_socket, {"cmd": "status"})
    assert reply["ok"], reply
    return reply


def _config_line(proc: DaemonProcess) -> str:
    """The line of `fastfwd status` about the config file."""
    result = fastfwd("status", "--socket", str(proc.control_socket))
    assert result.returncode == 0, result.stderr
    line, = (line for line in result.stdout.splitlines() if line.startswith("config: "))
    return line


@needs_engine
def test_status_tells_whether_the_last_reload_was_applied_and_why_not(tmp_path: Path, echo: EchoServer) -> None:
    """After `systemctl reload` the operator asks `fastfwd status` whether the file now runs."""
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc, socket.create_server(("127.0.0.1", 0)) as taken:
        assert _status(proc)["config"] == {"file": "f.toml", "last_reload": None}
        write_atomic(path, forward(port, f"127.0.0.1:{echo.port}", idle_timeout=-1))
        proc.wait_log("rejected, rules unchanged")
        # The log, the status reply and `fastfwd status` all name the key's line in the file.
        problem = "forward[0].idle_timeout: expected a number of seconds from 0 to 1000000000, got -1 (at line 4)"
        assert f": f.toml: {problem}\n" in proc.log()
        last = _status(proc)["config"]["last_reload"]
        assert (last["applied"], last["error"]) == (False, problem)
        line = _config_line(proc)
        assert line.startswith("config: f.toml, last reload ") and line.endswith(
            f" ago rejected (the rules from before run): {problem}"), line

        busy = taken.getsockname()[1]
        write_atomic(path, forward(port, f"127.0.0.1:{echo.port}") + forward(busy, f"127.0.0.1:{echo.port}"))
        proc.wait_log("rejected, rules unchanged", count=2)
        last = _status(proc)["config"]["last_reload"]
        assert (last["applied"], last["error"]) == (
            False, (f"tcp port {busy} on 127.0.0.1 is already in use "
                    f"(new: tcp 127.0.0.1:{busy} -> 127.0.0.1:{echo.port})"))

        write_atomic(path, forward(port, f"127.0.0.1:{echo.port}"))
        proc.wait_log(" applied: ")
        last = _status(proc)["config"]["last_reload"]
        assert (last["applied"], last["error"]) == (True, None)
        line = _config_line(proc)
        assert line.startswith("config: f.toml, last reload ") and line.endswith(" ago applied"), line
        assert echo_roundtrip(port)


@needs_engine
def test_status_without_a_config_file_has_no_config_part(tmp_path: Path, echo: EchoServer) -> None:
    with daemon(tmp_path, "-t", f"{free_port()}:127.0.0.1:{echo.port}") as proc:
        assert "config" not in _status(proc)
        result = fastfwd("status", "--socket", str(proc.control_socket))
        assert result.returncode == 0 and "config:" not in result.stdout


def test_a_directory_that_vanishes_as_the_watch_is_set_up_does_not_end_the_watching(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy tool swapping a symlinked directory (f.toml -> data/f.toml, data -> v1, v1
    deleted once data -> v2) can delete the directory the watch is being set up on: the watch
    must go on and see what comes next."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "f.toml").write_text("a = 1\n")
    (tmp_path / "data").symlink_to("v1")
    path = tmp_path / "f.toml"
    path.symlink_to(Path("data") / "f.toml")
    real_awatch, calls = watcher.awatch, []

    def awatch(*dirs: str, **kwargs: object):  # the swap lands between choosing the dirs and watching them
        if not calls:
            (tmp_path / "v2").mkdir()
            (tmp_path / "v2" / "f.toml").write_text("a = 2\n")
            swap_symlink(tmp_path / "data", Path("v2"))
            shutil.rmtree(tmp_path / "v1")
        calls.append(dirs)
        return real_awatch(*dirs, **kwargs)
    monkeypatch.setattr(watcher, "awatch", awatch)

    async def first_change() -> str:
        changes = watcher.watch_config(path, since="the content already in use", recheck_ms=200)
        try:
            return await anext(changes)
        finally:
            await changes.aclose()
    assert asyncio.run(asyncio.wait_for(first_change(), 20)) == watcher.fingerprint(path)
    assert path.read_text() == "a = 2\n"


@needs_engine
def test_a_reload_breaking_many_entries_logs_the_first_problems_and_counts_the_rest(
        tmp_path: Path, echo: EchoServer) -> None:
    """A [hosts] name renamed breaks every entry using it; a watched file is reloaded at each
    save, and its log must not grow by thousands of lines each time. `fastfwd check` lists all."""
    port, path = one_rule(tmp_path, echo.port)
    broken = 300
    with daemon(tmp_path, "-c", "f.toml") as proc:
        write_atomic(path, forward(port, f"127.0.0.1:{echo.port}")
                     + "".join(forward(10_000 + i, f"127.0.0.1:{echo.port}", idle_timeout=-1) for i in range(broken)))
        proc.wait_log("rejected, rules unchanged")
        log = proc.log()
        problems = [line for line in log.splitlines() if ".idle_timeout: expected a number of seconds" in line]
        assert len(problems) == daemon_module.LOGGED_CONFIG_ERRORS
        assert f"f.toml: {broken - daemon_module.LOGGED_CONFIG_ERRORS} more problems ('fastfwd check " in log
        assert rule_ports(proc) == [port] and echo_roundtrip(port)
        assert _status(proc)["config"]["last_reload"]["error"].endswith(
            f" (and {broken - 1} more, 'fastfwd check' lists them all)")
    result = fastfwd("check", str(path))
    assert result.returncode == 2
    assert len([line for line in result.stderr.splitlines() if ".idle_timeout: " in line]) == broken


@needs_engine
def test_sighup_with_a_directory_in_the_files_place_says_so_and_changes_nothing(
        tmp_path: Path, echo: EchoServer) -> None:
    # A directory is no pipe: the log must say what is wrong with the path, not that a pipe
    # is read only once.
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        path.unlink()
        path.mkdir()
        proc.signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: f.toml rejected, rules unchanged")
        assert "SIGHUP: f.toml: cannot read: Is a directory\n" in proc.log()
        assert "pipe" not in proc.log()
        assert rule_ports(proc) == [port] and echo_roundtrip(port)
