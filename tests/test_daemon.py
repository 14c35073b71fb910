"""The daemon as a process: forwarding from flags and files, status, leases re-pointing names,
restart with restored leases, metrics, run-time rules, and the SIGTERM drain / SIGINT stop."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fastfwd.config import Config, load_config
from fastfwd.daemon import Daemon, Overrides, _background
from fastfwd.leases import STATE_FILE, LeaseTable
from fastfwd.rules import Rule
from fastfwd.unixclient import call

from helpers_control import (DaemonProcess, EchoServer, UdpEcho, connects, daemon, echo_roundtrip, fastfwd, free_port,
                             needs_engine, short_dir, wait_until)

pytestmark = [needs_engine, pytest.mark.timeout(60)]

MAC = "52:54:00:00:00:01"


def status(proc: DaemonProcess) -> dict:
    result = fastfwd("status", "--json", "--socket", str(proc.control_socket))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_flags_alone_forward(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:127.0.0.1:{echo.port}", "--workers", "3") as proc:
        assert echo_roundtrip(port, 1 << 20)
        assert "fastfwd started: 1 rule(s), 3 worker(s)" in proc.log()
        # The socket option has the name `run` gave it too.
        result = fastfwd("status", "--control-socket", str(proc.control_socket))
        assert result.returncode == 0 and f"127.0.0.1:{port}" in result.stdout, result.stderr


@pytest.mark.parametrize("mode", ["never", "always"])
def test_splice_and_busy_poll_flags_take_effect(tmp_path: Path, echo: EchoServer, mode: str) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:127.0.0.1:{echo.port}", "--splice", mode, "--busy-poll-us", "50") as proc:
        assert echo_roundtrip(port, 1 << 20)
        assert "fastfwd started: 1 rule(s)" in proc.log() and ", busy polling 50 us" in proc.log()
        reply = status(proc)
        counters = reply["rules"][0]["counters"]
    assert reply["engine"]["busy_poll_us"] == 50
    moved = counters["bytes_up"] + counters["bytes_down"]
    assert moved == 2 << 20  # 1 MiB each way
    if mode == "never":
        assert (counters["bytes_copied"], counters["bytes_spliced"]) == (moved, 0), counters
    else:
        assert (counters["bytes_copied"], counters["bytes_spliced"]) == (0, moved), counters


def test_busy_poll_flag_wins_over_the_config_file(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    (tmp_path / "f.toml").write_text(f'[engine]\nbusy_poll_us = 20\n[[forward]]\nlisten = {port}\n'
                                     f'to = "127.0.0.1:{echo.port}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert ", busy polling 20 us" in proc.log()
    with daemon(tmp_path, "-c", "f.toml", "--busy-poll-us", "0") as proc:
        assert echo_roundtrip(port)
        assert "busy polling" not in proc.log()


def test_file_and_flags_together_and_status(tmp_path: Path, echo: EchoServer) -> None:
    a, b = free_port(), free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nname = "a"\nlisten = {a}\nto = "127.0.0.1:{echo.port}"\n')
    with daemon(tmp_path, "-c", "f.toml", "-t", f"127.0.0.1:{b}:127.0.0.1:{echo.port}") as proc:
        assert echo_roundtrip(a) and echo_roundtrip(b)
        rules = {r["port"]: r for r in status(proc)["rules"]}
        assert set(rules) == {a, b}
        assert rules[a]["name"] == "a" and rules[a]["state"] == "active"
        assert rules[a]["counters"]["accepted"] >= 1
        table = fastfwd("status", "--socket", str(proc.control_socket)).stdout
        assert f"127.0.0.1:{a}" in table and "active" in table


def test_udp_flags_forward_and_status_lists_sessions(tmp_path: Path) -> None:
    server = UdpEcho(b"R")
    port = free_port(socket.SOCK_DGRAM)
    try:
        with daemon(tmp_path, "-u", f"{port}:127.0.0.1:{server.port}") as proc:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"x", ("127.0.0.1", port))
                assert client.recv(10) == b"Rx"
                result = fastfwd("status", "--json", "--sessions", "--socket", str(proc.control_socket))
                rule, = json.loads(result.stdout)["rules"]
                assert rule["sessions"] == [f"127.0.0.1:{client.getsockname()[1]}"]
                assert rule["counters"]["datagrams_up"] == 1
    finally:
        server.close()


def test_lease_makes_a_host_entry_active_then_pending_again(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {port}\nto = "vm1:{echo.port}"\n'
                                     f'[hosts.vm1]\nmac = "{MAC}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert status(proc)["rules"][0]["state"] == "pending"
        with pytest.raises(ConnectionRefusedError):  # refused at once, not left to time out
            socket.create_connection(("127.0.0.1", port), timeout=5)
        lease = ("lease", "--lease-socket", str(proc.lease_socket))
        assert fastfwd(*lease[:1], "add", MAC, "127.0.0.1", *lease[1:]).returncode == 0
        assert echo_roundtrip(port)  # right after the reply: already forwarding
        assert status(proc)["rules"][0]["target_ip"] == "127.0.0.1"
        assert fastfwd(*lease[:1], "del", MAC, "127.0.0.1", *lease[1:]).returncode == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert status(proc)["rules"][0]["state"] == "pending"
        assert "name vm1 is now 127.0.0.1" in proc.log()


def test_dhcp_hostname_and_snapshot_reconcile(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:guest7:{echo.port}") as proc:
        snapshot = ("lease", "snapshot", "--socket", str(proc.lease_socket))
        assert fastfwd(*snapshot, f"{MAC}=127.0.0.1=GUEST7").returncode == 0
        assert echo_roundtrip(port)
        assert fastfwd(*snapshot, "--family", "6").returncode == 0  # no IPv6 leases: nothing changes
        assert echo_roundtrip(port)
        assert fastfwd(*snapshot).returncode == 0  # empty snapshot: every lease is gone
        assert not echo_roundtrip(port)


def test_dhcp_off_opens_no_lease_socket_and_ignores_saved_leases(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:guest7:{echo.port}") as proc:
        assert call(proc.lease_socket, {"event": "add", "mac": MAC, "ip": "127.0.0.1", "hostname": "guest7"})["ok"]
        assert echo_roundtrip(port)
    # The saved lease of MAC would resolve guest7 at once, were it restored.
    (tmp_path / "f.toml").write_text(f'[sources]\ndhcp = false\n[hosts.guest7]\nmac = "{MAC}"\n')
    (tmp_path / "lease.sock").unlink(missing_ok=True)
    with daemon(tmp_path, "-c", "f.toml", "-t", f"{port}:guest7:{echo.port}") as proc:
        assert not proc.lease_socket.exists()
        assert status(proc)["rules"][0]["state"] == "pending"
        refused = call(proc.control_socket, {"cmd": "add", "spec": f"{free_port()}:vm9:22"})
        assert refused == {"ok": False, "error": "cannot add: 'vm9' is not in [hosts] and DHCP names are off "
                                                 "([sources] dhcp = false)"}


def test_restart_after_kill_restores_leases_before_any_event(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {port}\nto = "vm1:{echo.port}"\n'
                                     f'[hosts.vm1]\nmac = "{MAC}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        reply = call(proc.lease_socket, {"event": "add", "mac": MAC, "ip": "127.0.0.1"})
        assert reply == {"ok": True, "changed": 1}
        # Saved within LEASE_SAVE_DELAY of the change; a kill before would lose it.
        wait_until(lambda: len(_saved_leases(tmp_path)) == 1, what="the lease saved")
        proc.proc.kill()
        proc.wait()
    with daemon(tmp_path, "-c", "f.toml"):
        assert echo_roundtrip(port)


def test_a_burst_of_lease_events_is_all_saved_by_a_clean_stop(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    macs = [f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(1000)]
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {port}\nto = "vm1:{echo.port}"\n'
                                     f'[hosts.vm1]\nmac = "{macs[-1]}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        with socket.socket(socket.AF_UNIX) as s:  # one connection, replies read as they come
            s.settimeout(30)
            s.connect(str(proc.lease_socket))
            replies = s.makefile("rb")
            for i, mac in enumerate(macs):
                ip = "127.0.0.1" if mac == macs[-1] else f"10.9.{i >> 8}.{i & 255}"
                s.sendall(json.dumps({"event": "add", "mac": mac, "ip": ip}).encode() + b"\n")
                assert json.loads(replies.readline()) == {"ok": True, "changed": 1}
        assert echo_roundtrip(port)
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    assert sorted(lease.mac for lease in LeaseTable.restore(tmp_path / "state" / STATE_FILE)) == macs


def _saved_leases(tmp_path: Path) -> list[dict]:
    """The leases in a running daemon's state file (read only: restoring would remove the
    temporary file of a save under way)."""
    state = tmp_path / "state" / STATE_FILE
    return json.loads(state.read_text())["leases"] if state.exists() else []


def test_metrics_over_http_and_control_socket(tmp_path: Path, echo: EchoServer) -> None:
    port, mport = free_port(), free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nname = "web"\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
                                     f'[control]\nmetrics_listen = "127.0.0.1:{mport}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(port, 100_000)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as response:
            text = response.read().decode()
        labels = f'listen="127.0.0.1:{port}",proto="tcp",rule="web",target="127.0.0.1:{echo.port}"'
        assert f"fastfwd_accepted_total{{{labels}}} 1.0" in text
        assert f"fastfwd_bytes_up_total{{{labels}}} 100000.0" in text
        assert f"fastfwd_rule_pending{{{labels}}} 0.0" in text
        reply = call(proc.control_socket, {"cmd": "metrics"})
        assert f"fastfwd_bytes_down_total{{{labels}}} 100000.0" in reply["text"]


def test_rules_added_at_run_time_survive_reload_and_can_be_removed(tmp_path: Path, echo: EchoServer) -> None:
    fixed, extra = free_port(), free_port()
    config = tmp_path / "f.toml"
    config.write_text(f'[[forward]]\nlisten = {fixed}\nto = "127.0.0.1:{echo.port}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        spec = f"127.0.0.1:{extra}:127.0.0.1:{echo.port}"
        assert call(proc.control_socket, {"cmd": "add", "spec": spec})["ok"]
        assert echo_roundtrip(extra)
        proc.signal(signal.SIGHUP)
        proc.wait_log("applied: 0 added, 0 removed")
        assert echo_roundtrip(extra)
        refused = call(proc.control_socket, {"cmd": "remove", "spec": f"{fixed}:127.0.0.1:{echo.port}"})
        assert not refused["ok"] and "comes from the config file" in refused["error"]
        assert call(proc.control_socket, {"cmd": "remove", "spec": spec})["ok"]
        assert not echo_roundtrip(extra) and echo_roundtrip(fixed)


def test_rules_added_at_run_time_are_not_kept_across_a_restart(tmp_path: Path, echo: EchoServer) -> None:
    """docs/leases.md: a rule added on the control socket lives until removed there or the
    daemon stops; nothing saves it, so the next start has the config file's rules alone."""
    fixed, extra = free_port(), free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {fixed}\nto = "127.0.0.1:{echo.port}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert call(proc.control_socket, {"cmd": "add", "spec": f"127.0.0.1:{extra}:127.0.0.1:{echo.port}"})["ok"]
        assert echo_roundtrip(extra)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert [r["port"] for r in status(proc)["rules"]] == [fixed]
        assert echo_roundtrip(fixed) and not connects(extra)


def test_port_0_rules_keep_their_port_across_reloads(tmp_path: Path, echo: EchoServer) -> None:
    (tmp_path / "f.toml").write_text("# rules from the command line and the control socket only\n")
    with daemon(tmp_path, "-c", "f.toml", "-t", f"0:127.0.0.1:{echo.port}") as proc:
        added = call(proc.control_socket, {"cmd": "add", "spec": f"0:127.0.0.1:{echo.port}"})["rule"]["port"]
        ports = sorted(r["port"] for r in status(proc)["rules"])
        proc.signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: ")
        assert "applied: 0 added, 0 removed, 0 re-pointed, 0 reconfigured, 2 unchanged" in proc.log()
        assert sorted(r["port"] for r in status(proc)["rules"]) == ports
        assert all(echo_roundtrip(port) for port in ports)
        assert call(proc.control_socket, {"cmd": "remove", "spec": f"{added}:127.0.0.1:{echo.port}"})["ok"]


def test_sigterm_drains_a_transfer_in_flight_refuses_new_and_exits_0(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:127.0.0.1:{echo.port}") as proc:
        first, second = os.urandom(300_000), os.urandom(300_000)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        received = bytearray()
        reader = threading.Thread(target=_read_all, args=(client, received))
        reader.start()
        client.sendall(first)
        wait_until(lambda: len(received) >= len(first), what="the first half echoed")
        proc.signal(signal.SIGTERM)
        proc.wait_log("draining")
        wait_until(lambda: not connects(port), what="new connections refused")
        client.sendall(second)
        client.shutdown(socket.SHUT_WR)
        reader.join(20)
        client.close()
        assert bytes(received) == first + second
        assert proc.wait() == 0
        assert "fastfwd stopped" in proc.log()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_during_drain_stops_at_once(tmp_path: Path, echo: EchoServer, second: int) -> None:
    port = free_port()
    (tmp_path / "f.toml").write_text("[control]\ndrain_deadline = 3600\n")
    with daemon(tmp_path, "-c", "f.toml", "-t", f"{port}:127.0.0.1:{echo.port}") as proc:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        proc.signal(signal.SIGTERM)
        proc.wait_log("draining")
        proc.signal(second)
        assert proc.wait() == 0  # long before the hour-long deadline
        assert "stopping now" in proc.log()
        client.settimeout(10)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass
        client.close()


def test_sigint_stops_at_once(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    with daemon(tmp_path, "-t", f"{port}:127.0.0.1:{echo.port}") as proc:
        proc.signal(signal.SIGINT)
        assert proc.wait() == 0
        assert "draining" not in proc.log()
        assert not connects(port)


def _daemon_reading_its_config(tmp_path: Path) -> tuple[DaemonProcess, int]:
    """``fastfwd run -c f.toml`` caught inside its start: f.toml is a FIFO, so the daemon's read
    of its config waits for the test to write it; returned with the FIFO's writing end."""
    path = tmp_path / "f.toml"
    os.mkfifo(path)
    proc = DaemonProcess(tmp_path, "-c", "f.toml")
    fifo: list[int] = []

    def reader_came() -> bool:  # a FIFO opens for writing without waiting only once it has a reader
        try:
            fifo.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            assert proc.proc.poll() is None, proc.log()
        return bool(fifo)
    try:
        wait_until(reader_came, what="the daemon to open its config")
    except BaseException:
        proc.stop()
        raise
    return proc, fifo[0]


def test_a_sighup_while_the_daemon_starts_does_not_kill_it_and_reloads_once_up(
        tmp_path: Path, echo: EchoServer) -> None:
    """A service manager may send SIGHUP as soon as it started the daemon, before the daemon
    handles it: the process must not die (the default action), and the reload it asked for
    happens once the daemon is up."""
    first, added = free_port(), free_port()
    one = f'[[forward]]\nlisten = {first}\nto = "127.0.0.1:{echo.port}"\n'
    two = f'[[forward]]\nlisten = {added}\nto = "127.0.0.1:{echo.port}"\n'
    proc, fifo = _daemon_reading_its_config(tmp_path)
    try:
        # While the daemon reads one rule, the file is replaced by one with two, and SIGHUP asks
        # for that to be loaded.
        (tmp_path / "next.toml").write_text(one + two)
        os.replace(tmp_path / "next.toml", tmp_path / "f.toml")
        for _ in range(3):
            proc.signal(signal.SIGHUP)
        os.write(fifo, one.encode())
        os.close(fifo)
        proc.wait_log("SIGHUP: ")
        assert "fastfwd started: 1 rule(s)" in proc.log()
        assert "SIGHUP: f.toml applied: 1 added, 0 removed, 0 re-pointed, 0 reconfigured, 1 unchanged" in proc.log()
        assert echo_roundtrip(first) and echo_roundtrip(added)
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.stop()


@contextlib.contextmanager
def _daemon_fed_its_config(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Callable[[str], None]]]:
    """``_daemon_reading_its_config`` with a function that writes the config to the FIFO and
    closes it; the daemon is stopped on the way out."""
    proc, fifo = _daemon_reading_its_config(tmp_path)
    fed: list[bool] = []

    def feed(text: str) -> None:
        fed.append(True)
        try:
            os.write(fifo, text.encode())
        finally:
            os.close(fifo)
    try:
        yield proc, feed
    finally:
        if not fed:
            os.close(fifo)
        proc.stop()


def _forwards_and_stops_cleanly(proc: DaemonProcess, port: int) -> None:
    assert echo_roundtrip(port)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0


def test_a_flood_of_sighups_while_the_daemon_starts_does_not_hang_it(tmp_path: Path, echo: EchoServer) -> None:
    """The handler that records an early SIGHUP can be entered again by the next SIGHUP while
    it runs: it must take no lock (a threading.Event's would deadlock the process)."""
    port = free_port()
    rule = f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
    with _daemon_fed_its_config(tmp_path) as (proc, feed):
        flood = subprocess.run([sys.executable, "-c", "import os, signal, sys\n"
                                "for _ in range(20000): os.kill(int(sys.argv[1]), signal.SIGHUP)",
                                str(proc.proc.pid)], timeout=60)
        assert flood.returncode == 0
        (tmp_path / "next.toml").write_text(rule)  # what the reload reads: a file, not the FIFO
        os.replace(tmp_path / "next.toml", tmp_path / "f.toml")
        feed(rule)
        proc.wait_log("SIGHUP: ")
        assert proc.log().count("SIGHUP: ") == 1, proc.log()  # all of them asked for one reload
        _forwards_and_stops_cleanly(proc, port)


@pytest.mark.parametrize("sighup", [False, True], ids=["watched", "sighup"])
def test_a_config_that_is_a_fifo_is_read_at_start_and_never_blocks_the_daemon(
        tmp_path: Path, echo: EchoServer, sighup: bool) -> None:
    """``fastfwd run -c <(...)`` gives a pipe: read once, at start. Neither the watcher nor a
    SIGHUP may open it again, which waits (with the whole event loop) for a writer never coming."""
    port = free_port()
    with _daemon_fed_its_config(tmp_path) as (proc, feed):
        feed(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')
        proc.wait_log("fastfwd started")
        if sighup:
            proc.signal(signal.SIGHUP)
            proc.wait_log("SIGHUP: ")
            assert "SIGHUP: f.toml is not a regular file, rules unchanged (a pipe is read once, at start)" in proc.log()
        for _ in range(4):  # across the watcher's re-checks (one a second)
            assert call(proc.control_socket, {"cmd": "status"})["ok"]
            time.sleep(0.5)
        _forwards_and_stops_cleanly(proc, port)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stop_signal_while_the_daemon_starts_ends_it_leaving_nothing_behind(
        tmp_path: Path, sig: int, status: int) -> None:
    proc, fifo = _daemon_reading_its_config(tmp_path)
    try:
        proc.signal(sig)
    finally:
        # The end of the file: Python acts on a handled signal (SIGINT) only between two steps,
        # and one that came just before the daemon's read() began would wait for that read.
        os.close(fifo)
    try:
        assert proc.wait() == status
    finally:
        proc.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.log", "f.toml"]

def test_run_puts_back_the_signal_handlers_it_found(tmp_path: Path, echo: EchoServer) -> None:
    """Once ``run`` is done, a SIGHUP finds the handler from before (the command's, which
    records it), not the default action, which would kill the process on its way out."""
    def found(*_: object) -> None:
        pass

    async def main() -> None:
        with short_dir() as sockets:
            d = Daemon(Config(), None, [Rule.parse(f"{free_port()}:127.0.0.1:{echo.port}", "tcp")], Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            run = asyncio.create_task(d.run())
            for _ in range(200):
                if d.rules or run.done():
                    break
                await asyncio.sleep(0.05)
            d.stop()
            assert await run == 0
    before = signal.signal(signal.SIGHUP, found)
    try:
        asyncio.run(asyncio.wait_for(main(), 30))
        assert signal.getsignal(signal.SIGHUP) is found
    finally:
        signal.signal(signal.SIGHUP, before)

def test_socket_of_a_running_daemon_is_not_taken_over(tmp_path: Path, echo: EchoServer) -> None:
    with daemon(tmp_path, "-t", f"{free_port()}:127.0.0.1:{echo.port}"):
        result = fastfwd("run", "--control-socket", str(tmp_path / "control.sock"), "--lease-socket",
                         str(tmp_path / "other.sock"), "--state-dir", str(tmp_path), "-t", f"{free_port()}:127.0.0.1:9")
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].startswith(f"fastfwd: {tmp_path / 'control.sock'}: ")


def test_a_reload_asked_for_during_start_waits_for_it(tmp_path: Path, echo: EchoServer) -> None:
    """A SIGHUP while the rules are still being added must not apply a second copy of them
    (nor find the forwarder missing): it runs once the start is done."""
    port, path = free_port(), tmp_path / "f.toml"
    path.write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')

    async def main() -> None:
        d = Daemon(load_config(path), path, overrides=Overrides(workers=1, state_dir=str(tmp_path / "state")))
        fw, diff = await asyncio.gather(d.start(), d.reload("SIGHUP"))
        try:
            assert diff is not None and (len(diff.unchanged), diff.added) == (1, [])
            assert await asyncio.to_thread(echo_roundtrip, port)
        finally:
            await fw.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_background_source_that_fails_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def broken() -> None:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        await asyncio.gather(_background(broken(), "the neighbour-table source"), return_exceptions=True)
        await asyncio.sleep(0)  # the done callback
        assert "the neighbour-table source stopped: No buffer space available" in caplog.text
    asyncio.run(main())


def _read_all(sock: socket.socket, into: bytearray) -> None:
    try:
        while data := sock.recv(1 << 16):
            into += data
    except OSError:
        pass
