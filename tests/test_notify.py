"""The daemon tells a service manager (``NOTIFY_SOCKET``, systemd's ``Type=notify``) when it
forwards, reloads and stops; and the unit file shipped in scripts/ matches how it behaves."""
from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd.config import ControlSettings, load_config
from fastfwd.daemon import Daemon, Overrides
from fastfwd.notify import notify, watchdog_interval

from helpers_control import EchoServer, daemon, echo_roundtrip, free_port, needs_engine, short_dir

UNIT = Path(__file__).resolve().parent.parent / "scripts" / "fastfwd.service"


class Manager:
    """The service manager's end: a datagram socket collecting what the daemon says."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(20)

    def next(self) -> dict[str, str]:
        message = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in message.split("\n"))


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    with short_dir() as d:
        path = str(d / "notify")
        m = Manager(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield m
        finally:
            m.sock.close()


def test_without_a_manager_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_an_abstract_socket_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fastfwd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1", "STATUS=up") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=up"


def test_a_manager_that_is_gone_is_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert notify("READY=1") is False


def test_a_manager_that_does_not_read_never_blocks_the_sender(manager: Manager) -> None:
    """notify() runs on the daemon's event loop: a full queue at the manager's end must fail
    the message (logged), not wait for room."""
    results: list[bool] = []

    def send() -> None:
        for _ in range(10000):  # a datagram queue holds far fewer
            results.append(notify("STATUS=x"))
            if not results[-1]:
                return
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        sender.join(20)
        assert not sender.is_alive(), "notify() blocked on a manager that does not read"
        assert results[-1] is False
    finally:
        manager.sock.close()  # unblocks a sender stuck in sendto
        sender.join(5)


@needs_engine
@pytest.mark.timeout(60)
@pytest.mark.parametrize("from_file", [True, False], ids=["config-file", "no-config-file"])
def test_ready_once_forwarding_then_reloading_and_stopping(manager: Manager, tmp_path: Path, from_file: bool) -> None:
    """Without a config file a SIGHUP re-reads nothing, but is answered the same: under
    Type=notify-reload systemd sends it and waits for RELOADING=1 and READY=1."""
    echo = EchoServer()
    port = free_port()
    rule = f"{port}:127.0.0.1:{echo.port}"
    config = tmp_path / "fastfwd.toml"
    config.write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')
    try:
        with daemon(tmp_path, *(["-c", str(config)] if from_file else ["-t", rule])) as d:
            ready = manager.next()
            assert ready["READY"] == "1"
            assert echo_roundtrip(port), "READY=1 came before the forward worked"

            d.signal(signal.SIGHUP)
            reloading = manager.next()
            assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
            assert manager.next()["READY"] == "1"

            d.signal(signal.SIGTERM)
            assert manager.next()["STOPPING"] == "1"
            assert d.wait() == 0
    finally:
        echo.close()


@needs_engine
@pytest.mark.timeout(60)
def test_a_reload_before_the_daemon_is_up_says_nothing(manager: Manager, tmp_path: Path) -> None:
    """A SIGHUP during the start reloads once the rules are in, before the servers are: a
    READY=1 after that reload would tell the manager the daemon is up too early."""
    config = tmp_path / "fastfwd.toml"
    config.write_text(f'[[forward]]\nlisten = {free_port()}\nto = "127.0.0.1:9"\n')

    async def main() -> None:
        with short_dir() as sockets:
            d = Daemon(load_config(config), config, overrides=Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            fw = await d.start()
            try:
                assert await d.reload("SIGHUP") is not None
            finally:
                await fw.close()
    asyncio.run(asyncio.wait_for(main(), 30))
    manager.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.sock.recv(4096)


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read(UNIT)
    return unit


def test_the_unit_waits_for_readiness_and_outlasts_the_drain() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"].endswith("-HUP $MAINPID")
    # SIGTERM drains for up to drain_deadline; systemd must not kill the drain half way.
    assert float(service["TimeoutStopSec"]) > ControlSettings().drain_deadline
    assert service["ExecStart"].split()[1] == "run"


@pytest.mark.parametrize("usec,interval", [("400000", 0.2), ("0", None), ("", None), ("-5", None), ("²", None)])
def test_the_watchdog_interval_is_read_from_plain_digits_only(monkeypatch: pytest.MonkeyPatch, usec: str,
                                                              interval: float | None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == interval


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_file_is_valid(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at one that does.
    text = UNIT.read_text().replace(_unit()["Service"]["ExecStart"].split()[0], shutil.which("true") or "/bin/true")
    (tmp_path / "fastfwd.service").write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "fastfwd.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@needs_engine
@pytest.mark.timeout(60)
def test_a_watchdog_the_manager_asks_for_is_fed_once_ready(manager: Manager, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """WatchdogSec= in the unit passes WATCHDOG_USEC: without a WATCHDOG=1 within it, systemd
    kills the daemon as hung. It is fed at half the interval, from READY=1 on."""
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    with daemon(tmp_path, "-t", f"{free_port()}:127.0.0.1:9") as d:
        assert manager.next()["READY"] == "1"
        assert [manager.next() for _ in range(3)] == [{"WATCHDOG": "1"}] * 3
        d.signal(signal.SIGTERM)
        messages = [manager.next()]
        while "STOPPING" not in messages[-1]:
            messages.append(manager.next())
        assert d.wait() == 0


def test_a_manager_that_cannot_be_told_is_logged_once_until_it_can_again(
        manager: Manager, caplog: pytest.LogCaptureFixture) -> None:
    """The watchdog pings every few seconds: a manager out of reach must not fill the log."""
    path = os.environ["NOTIFY_SOCKET"]
    assert notify("WATCHDOG=1") is True
    manager.sock.close()
    os.unlink(path)
    with caplog.at_level("DEBUG", logger="fastfwd"):
        assert [notify("WATCHDOG=1") for _ in range(5)] == [False] * 5
        assert [r.levelname for r in caplog.records] == ["WARNING"] + ["DEBUG"] * 4
        manager.sock = Manager(path).sock  # closed by the fixture
        caplog.clear()
        assert notify("WATCHDOG=1") is True
        assert manager.next() == {"WATCHDOG": "1"}
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("INFO", f"the service manager at {path} is reachable again")]
        manager.sock.close()
        os.unlink(path)
        caplog.clear()
        assert notify("WATCHDOG=1") is False
        assert [r.levelname for r in caplog.records] == ["WARNING"]
