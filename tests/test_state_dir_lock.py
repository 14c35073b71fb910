"""One daemon per state directory: a second one would overwrite the first's leases.json and
restore the first's leases at its next start. The second is refused, the first untouched; the
directory is free again once the first stops serving (a crash, a stop, or a drain under way)."""
from __future__ import annotations

import signal
import socket
from pathlib import Path

from fastfwd.leases import STATE_FILE
from fastfwd.unixclient import call

from helpers_control import (DaemonProcess, EchoServer, connects, daemon, echo_roundtrip, free_port, needs_engine,
                             wait_until)
from netutil import run_cli

pytestmark = needs_engine

LEASE = {"event": "add", "mac": "52:54:00:00:00:01", "ip": "127.0.0.1", "hostname": "vm1"}


def _leased(proc: DaemonProcess) -> None:
    """Give ``proc`` the lease that resolves ``vm1`` to 127.0.0.1."""
    assert call(proc.lease_socket, LEASE) == {"ok": True, "changed": 1}


def _saved(state: Path) -> bool:
    """Whether the lease is in ``state``'s leases.json (read only: a restore would remove the
    temporary file of a save under way)."""
    try:
        return LEASE["mac"] in (state / STATE_FILE).read_text()
    except FileNotFoundError:
        return False


def test_a_second_daemon_on_the_same_state_dir_is_refused_and_the_first_serves_on(
        tmp_path: Path, echo: EchoServer) -> None:
    state, port, other_port = tmp_path / "state", free_port(), free_port()
    (tmp_path / "a").mkdir()
    with daemon(tmp_path / "a", "-t", f"{port}:vm1:{echo.port}", "--state-dir", str(state)) as first:
        _leased(first)
        refusal = f"fastfwd: state directory {state}: in use by another fastfwd daemon (pid {first.proc.pid})\n"
        # Its own sockets and ports: only the state directory is shared.
        second = run_cli("run", "--control-socket", str(tmp_path / "c.sock"), "--lease-socket",
                         str(tmp_path / "l.sock"), "--state-dir", str(state), "-t", f"{other_port}:vm1:{echo.port}")
        assert (second.returncode, second.stderr) == (1, refusal)
        # The same rules too (the same config started twice): told of the directory, not a port.
        second = run_cli("run", "--control-socket", str(tmp_path / "c.sock"), "--lease-socket",
                         str(tmp_path / "l.sock"), "--state-dir", str(state), "-t", f"{port}:vm1:{echo.port}")
        assert (second.returncode, second.stderr) == (1, refusal)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "state"]  # its sockets closed again
        assert [r["port"] for r in call(first.control_socket, {"cmd": "status"})["rules"]] == [port]
        assert echo_roundtrip(port) and not connects(other_port)
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
    # Free once the first stopped: the next one starts there, and has the first's lease.
    (tmp_path / "b").mkdir()
    with daemon(tmp_path / "b", "-t", f"{port}:vm1:{echo.port}", "--state-dir", str(state)):
        assert echo_roundtrip(port)


def test_a_crashed_daemons_state_dir_is_free_at_once(tmp_path: Path, echo: EchoServer) -> None:
    state, port = tmp_path / "state", free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with daemon(tmp_path / "a", "-t", f"{free_port()}:127.0.0.1:{echo.port}", "--state-dir", str(state)) as crashed:
        _leased(crashed)
        wait_until(lambda: _saved(state), 10, "the lease saved")
        crashed.proc.kill()  # the kernel drops its lock: nothing stale to clear
        crashed.wait()
    with daemon(tmp_path / "b", "-t", f"{port}:vm1:{echo.port}", "--state-dir", str(state)):
        assert echo_roundtrip(port)


def test_a_new_daemon_on_the_same_state_dir_takes_over_while_the_old_one_drains(
        tmp_path: Path, echo: EchoServer) -> None:
    """README's upgrade with the default state directory: the old daemon lets go of it when
    it stops serving, its leases saved, so the new one starts with them."""
    state, port = tmp_path / "state", free_port()
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    spec = ("-t", f"{port}:vm1:{echo.port}", "--state-dir", str(state))
    with daemon(tmp_path / "old", *spec) as old:
        _leased(old)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as live:
            live.sendall(b"before")
            assert live.recv(64) == b"before"
            old.signal(signal.SIGTERM)
            old.wait_log("draining")
            with daemon(tmp_path / "new", *spec):
                assert echo_roundtrip(port)  # vm1 resolves: the new daemon restored the old one's lease
                live.sendall(b"after")  # the old daemon still relays its connection
                assert live.recv(64) == b"after"
        assert old.wait() == 0
