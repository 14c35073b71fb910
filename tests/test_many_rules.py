"""A daemon holding thousands of separate single-port rules (a host publishing one port per
service), as its operator meets it: READY=1 once every port forwards, ``fastfwd status``
summed up and filtered, the metrics of every rule while the event loop serves other clients,
a reload that changes one rule of 8,000 and touches no other, and a stop that leaves nothing."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import fastfwd.daemon as daemon_module
from fastfwd import metrics
from fastfwd.cli import select_rules
from fastfwd.config import Config, load_config
from fastfwd.control import ControlServer
from fastfwd.daemon import Daemon, Overrides
from fastfwd.forwarder import Forwarder
from fastfwd.leases import LeaseTable
from fastfwd.rules import Rule
from fastfwd.unixclient import DaemonError, call

from helpers_control import (DaemonProcess, EchoServer, UdpEcho, echo_roundtrip, fastfwd, free_port, needs_engine,
                             short_dir)
from netutil import free_port_range, recv_exact, run_async
from test_control import Target, ask
from test_reload import write_atomic
from test_scale import LeaseClient

pytestmark = [needs_engine, pytest.mark.timeout(120)]

PAIRS = 4000    # a TCP and a UDP rule on each of these ports: 8,000 rules, 8,000 listening fds
PENDING = 5     # TCP rules more, onto VMs no lease names yet
SAMPLE = 40     # every this many rules is asked at READY (each UDP answer holds a session's fd)


def config_text(base: int, tcp: int, udp: int, metrics: int, retarget: dict[int, int] | None = None) -> str:
    """``t{i}`` (TCP) and ``u{i}`` (UDP) on port ``base + i`` onto the echo servers, TCP rule
    ``i`` onto ``retarget[i]`` instead, and ``vm-ssh{j}`` onto ``vm{j}:22`` past them."""
    retarget = retarget or {}
    parts = [f'[control]\nmetrics_listen = "127.0.0.1:{metrics}"\n']
    for i in range(PAIRS):
        parts.append(f'[[forward]]\nname = "t{i}"\nlisten = {base + i}\nto = "127.0.0.1:{retarget.get(i, tcp)}"\n'
                     f'[[forward]]\nname = "u{i}"\nproto = "udp"\nlisten = {base + i}\nto = "127.0.0.1:{udp}"\n')
    for j in range(PENDING):
        parts.append(f'[[forward]]\nname = "vm-ssh{j}"\nlisten = {base + PAIRS + j}\nto = "vm{j}:22"\n')
    return "".join(parts)


@dataclass
class Host:
    proc: DaemonProcess
    config: Path
    base: int
    echo: EchoServer
    udp: UdpEcho
    metrics: int
    ready: str
    #: What was found the moment READY=1 came: rules not listening, sampled rules that did
    #: not answer.
    dead_at_ready: list[str]

    def status(self, *args: str) -> tuple[int, str, str]:
        result = fastfwd("status", "--socket", str(self.proc.control_socket), *args)
        return result.returncode, result.stdout, result.stderr


def bound_ports(pid: int) -> set[tuple[str, int]]:
    """The TCP ports process ``pid`` listens on and the UDP ports it has bound."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (link := os.readlink(fd)).startswith("socket:["):
                inodes.add(link[8:-1])
    held = set()
    for proto in ("tcp", "udp"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and (proto == "udp" or fields[3] == "0A"):  # 0A: LISTEN
                held.add((proto, int(fields[1].split(":")[1], 16)))
    return held


def unbound(pid: int, wanted: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Those of ``wanted`` that process ``pid`` has not bound. /proc/net lists the sockets of
    the whole host and can skip some while others come and go, so what one reading misses is
    looked for again (a socket bound stays bound)."""
    for _ in range(5):
        wanted = wanted - bound_ports(pid)
        if not wanted:
            break
    return wanted


def dead_ports(pid: int, base: int) -> list[str]:
    """The rules of process ``pid`` with a target not listening (a pending one does not), and of a sample (every ``SAMPLE``th port)
    those whose TCP echo or UDP answer did not come back whole."""
    wanted = {(proto, port) for port in range(base, base + PAIRS) for proto in ("tcp", "udp")}
    dead = [f"{proto} {port} not bound" for proto, port in sorted(unbound(pid, wanted))]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for port in range(base, base + PAIRS, SAMPLE):
            if not echo_roundtrip(port, 1000):
                dead.append(f"tcp {port}")
            client.sendto(b"q%d" % port, ("127.0.0.1", port))
            try:
                if client.recv(100) != b"u:q%d" % port:
                    dead.append(f"udp {port}: a wrong answer")
            except TimeoutError:
                dead.append(f"udp {port}")
    return dead


def started(tmp: Path, manager: socket.socket, echo: EchoServer, udp: UdpEcho) -> Host:
    """The daemon, once READY=1 came. Tried again on other ports (three times at most) if a
    port was taken between choosing it and binding it: 8,005 ports are many to find free
    while other processes take some."""
    config = tmp / "many.toml"
    for _ in range(3):
        base = free_port_range(PAIRS + PENDING, kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM))
        metrics = free_port()
        config.write_text(config_text(base, echo.port, udp.port, metrics))
        proc = DaemonProcess(tmp, "-c", str(config), "--log-level", "info")  # the default level
        for _ in range(240):
            with contextlib.suppress(TimeoutError):
                ready = manager.recv(4096).decode()
                return Host(proc, config, base, echo, udp, metrics, ready, dead_ports(proc.proc.pid, base))
            if proc.proc.poll() is not None:
                break
        proc.stop()
        if "Address already in use" not in proc.log():
            break
    pytest.fail(f"the daemon did not start:\n{proc.log()[-3000:]}")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with contextlib.closing(EchoServer()) as echo, contextlib.closing(UdpEcho(b"u:")) as udp, \
            short_dir() as sockets, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager, \
            pytest.MonkeyPatch.context() as env:
        manager.bind(str(sockets / "notify"))
        manager.settimeout(0.25)
        env.setenv("NOTIFY_SOCKET", str(sockets / "notify"))
        host = started(tmp_path_factory.mktemp("many"), manager, echo, udp)
        try:
            yield host
        finally:
            host.proc.stop()


def test_ready_comes_once_every_rule_forwards(host: Host) -> None:
    assert host.ready == f"READY=1\nSTATUS=forwarding {2 * PAIRS + PENDING} rule(s)"
    assert host.dead_at_ready == []
    assert echo_roundtrip(host.base + PAIRS - 1, 100_000)


def test_status_ends_with_a_summary_of_every_rule(host: Host) -> None:
    code, out, err = host.status()
    assert code == 0, err
    lines = out.splitlines()
    assert len([line for line in lines if line.startswith(("t", "u", "vm-ssh"))]) == 2 * PAIRS + PENDING
    assert lines[-1] == (f"rules: {2 * PAIRS + PENDING} ({PAIRS + PENDING} tcp, {PAIRS} udp), "
                         f"{2 * PAIRS} active, {PENDING} pending")


def rows(out: str) -> list[list[str]]:
    """The rule rows of ``fastfwd status``'s table, split into cells."""
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["NAME", "PROTO"], out
    return [row.split() for row in table[1:]]


def test_status_shows_the_rules_asked_for(host: Host) -> None:
    total = 2 * PAIRS + PENDING
    # By name, by listening port (both protocols), by target name.
    code, out, err = host.status("t17", str(host.base + 42), "vm3")
    assert code == 0, err
    assert sorted((r[0], r[2]) for r in rows(out)) == [
        ("t17", f"127.0.0.1:{host.base + 17}"), ("t42", f"127.0.0.1:{host.base + 42}"),
        ("u42", f"127.0.0.1:{host.base + 42}"), ("vm-ssh3", f"127.0.0.1:{host.base + PAIRS + 3}")]
    assert out.splitlines()[-1].endswith(f"{PENDING} pending, 4 shown")
    assert f"rules: {total} " in out.splitlines()[-1]

    code, out, err = host.status("--pending")
    assert code == 0, err
    assert sorted(r[0] for r in rows(out)) == [f"vm-ssh{j}" for j in range(PENDING)]
    assert {r[5] for r in rows(out)} == {"pending"}

    code, out, err = host.status("--json", "u99")
    assert code == 0, err
    rules = json.loads(out)["rules"]
    assert [(r["name"], r["proto"], r["port"]) for r in rules] == [("u99", "udp", host.base + 99)]

    # A filter that matches nothing is said, as a name that is not there: exit status 1.
    code, out, err = host.status("t17", "no-such-rule")
    assert code == 1
    assert err == "fastfwd: no rule matches 'no-such-rule'\n"
    assert [r[0] for r in rows(out)] == ["t17"]


def test_a_selection_matches_ranges_and_addresses_and_keeps_its_targets_leases() -> None:
    def rule(name: str, listen: str, target: str, ip: str | None) -> dict:
        return {"name": name, "listen": listen, "target": target, "target_ip": ip,
                "state": "active" if ip else "pending"}
    reply = {"rules": [rule("ssh", "0.0.0.0:2222", "vm1:22", "10.0.0.5"), rule("web", "0.0.0.0:8000-8099",
                       "10.0.0.6:9000-9099", "10.0.0.6"), rule("dns", "[::1]:5353", "[::1]:53", "::1"),
                       rule("db", "127.0.0.1:5432", "vm9:5432", None)],
             "leases": [{"mac": "52:54:00:00:00:01", "ip": "10.0.0.5"}, {"mac": "52:54:00:00:00:02", "ip": "10.0.0.7"}],
             "engine": {"workers": 1}}
    selected, unmatched = select_rules(reply, ["VM1", "8099", "::1", "9000", "vm9"], pending=False)
    assert [r["name"] for r in selected["rules"]] == ["ssh", "web", "dns", "db"]
    assert selected["leases"] == [reply["leases"][0]] and selected["engine"] == reply["engine"]
    assert unmatched == ["9000"]  # a target's port is not where a rule listens
    # isdigit() is true of '²' too, which int() refuses: a word, matching nothing.
    assert select_rules(reply, ["²"], pending=False)[1] == ["²"]
    selected, unmatched = select_rules(reply, [], pending=True)
    assert ([r["name"] for r in selected["rules"]], selected["leases"], unmatched) == (["db"], [], [])


def test_a_scrape_of_every_rule_leaves_the_loop_serving(host: Host) -> None:
    """The scrape of 8,000 rules is formatted off the event loop: lease events sent while it
    runs are answered before it ends."""
    answered_during: list[dict] = []
    scraping = threading.Event()
    done = threading.Event()

    def lease_events() -> None:
        client = LeaseClient(host.proc.lease_socket)
        try:
            scraping.wait(10)
            while not done.is_set():
                reply = client.send({"event": "add", "mac": "52:54:00:00:99:01", "ip": "10.9.9.1", "hostname": "x"})
                if not done.is_set():
                    answered_during.append(reply)
        finally:
            client.close()
    sender = threading.Thread(target=lease_events)
    sender.start()
    try:
        scraping.set()
        with urllib.request.urlopen(f"http://127.0.0.1:{host.metrics}/metrics", timeout=60) as response:
            body = response.read().decode()
    finally:
        done.set()
        sender.join(30)
    assert body.count("\nfastfwd_rule_pending{") == 2 * PAIRS + PENDING
    # A family of one protocol's counters has no series for the other's rules: they could only
    # ever be 0, and were 38% of the 23 MB.
    for family, rules in (("accepted_total", PAIRS + PENDING), ("bytes_discarded_total", PAIRS + PENDING),
                          ("sessions_active", PAIRS), ("drops_total", PAIRS), ("bytes_up_total", 2 * PAIRS + PENDING)):
        assert body.count(f"\nfastfwd_{family}{{") == rules, family
    assert f'fastfwd_rule_pending{{listen="127.0.0.1:{host.base + PAIRS}",proto="tcp",rule="vm-ssh0"' in body
    assert answered_during and all(r["ok"] for r in answered_during)
    over_control = call(host.proc.control_socket, {"cmd": "metrics"}, timeout=60)["text"]
    assert over_control.count("\nfastfwd_rule_pending{") == 2 * PAIRS + PENDING


def reads_in_order(fw: Forwarder, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on each read of ``fw``'s counters appends "read" to the list returned; the
    first also schedules a callback that appends "other", as a lease event arriving once the
    reading has begun would be."""
    loop = asyncio.get_running_loop()
    order: list[str] = []
    read = fw.counters

    def counting(rule: object) -> object:
        if not order:
            loop.call_soon(order.append, "other")
        order.append("read")
        return read(rule)
    monkeypatch.setattr(fw, "counters", counting)
    return order


def test_status_and_a_scrape_let_other_work_in_while_they_read_thousands_of_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading 8,000 rules' counters takes the event loop about 100 ms: status and scrapes read
    them a slice at a time, so other work runs before the last is read."""
    rules = 1200

    async def main() -> dict[str, list[str]]:
        async with Forwarder(workers=1) as fw:
            base = free_port_range(rules)
            await fw.apply([Rule.parse(f"{base + i}:127.0.0.1:9") for i in range(rules)])
            order = reads_in_order(fw, monkeypatch)
            seen = {}
            assert (await metrics.scrape(fw)).count(b"\nfastfwd_rule_pending{") == rules
            seen["scrape"], order[:] = order[:], []
            with short_dir() as sockets:
                async with ControlServer(sockets / "c.sock", Target(fw, LeaseTable())):
                    assert len((await ask(sockets / "c.sock", {"cmd": "status"}))["rules"]) == rules
            seen["status"] = order
            return seen
    for what, order in run_async(main()).items():
        assert order.count("read") == rules, what
        assert order.index("other") < rules, f"{what}: nothing else ran until every rule was read"


def test_the_failure_summary_lets_other_work_in_while_it_reads_thousands_of_rules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log's failure summary reads every rule's counters each minute (here every 0.1 s):
    a slice at a time too."""
    rules = 1200
    monkeypatch.setattr(daemon_module, "FAILURE_LOG_INTERVAL", 0.1)

    async def main() -> list[str]:
        base = free_port_range(rules)
        with short_dir() as sockets:
            d = Daemon(Config(source="command line"), None, [Rule.parse(f"{base + i}:127.0.0.1:9") for i in range(rules)],
                       Overrides(workers=1, state_dir=str(tmp_path), control_socket=str(sockets / "c.sock"),
                                 lease_socket=str(sockets / "l.sock")))
            running = asyncio.create_task(d.run())
            try:
                while d.fw is None:
                    await asyncio.sleep(0.01)
                order = reads_in_order(d.fw, monkeypatch)
                while order.count("read") < rules:
                    await asyncio.sleep(0.01)
                return order[:rules + 1]
            finally:
                d.stop()
                await running
    order = run_async(main())
    assert order.index("other") < rules, "nothing else ran until every rule was read"


@contextlib.contextmanager
def held_connection(port: int) -> Iterator[socket.socket]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    with conn:
        conn.sendall(b"before")
        assert recv_exact(conn, 6) == b"before"
        yield conn


def sessions_created(host: Host, name: str) -> int:
    code, out, err = host.status("--json", name)
    assert code == 0, err
    rule, = json.loads(out)["rules"]
    return rule["counters"]["sessions_created"]


def test_a_reload_changing_one_rule_of_8000_touches_no_other(host: Host) -> None:
    """The file watcher applies a file with one TCP rule re-pointed: that rule goes to the new
    target, while a connection and a UDP session on other rules carry on (the same session: no
    new one is created). A SIGHUP then, the file unchanged, changes nothing at all."""
    total = 2 * PAIRS + PENDING
    with contextlib.closing(EchoServer(greeting=b"two:")) as other, held_connection(host.base + 100) as held, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"a", ("127.0.0.1", host.base + 200))
        assert client.recv(100) == b"u:a"
        before = sessions_created(host, "u200")
        lines = len(host.proc.log().splitlines())
        write_atomic(host.config, config_text(host.base, host.echo.port, host.udp.port, host.metrics, {5: other.port}))
        host.proc.wait_log("config changed: ", timeout=60)
        host.proc.signal(signal.SIGHUP)
        host.proc.wait_log("SIGHUP: ", timeout=60)
        applied = [line.split(" applied: ", 1)[1] for line in host.proc.log().splitlines()[lines:]
                   if " applied: " in line]
        assert applied == [f"0 added, 0 removed, 1 re-pointed, 0 reconfigured, {total - 1} unchanged",
                           f"0 added, 0 removed, 0 re-pointed, 0 reconfigured, {total} unchanged"]
        with socket.create_connection(("127.0.0.1", host.base + 5), timeout=10) as conn:
            assert recv_exact(conn, 4) == b"two:"
        assert echo_roundtrip(host.base + 6, 10_000)
        held.sendall(b"after")
        assert recv_exact(held, 5) == b"after"
        client.sendto(b"b", ("127.0.0.1", host.base + 200))
        assert client.recv(100) == b"u:b"
        assert sessions_created(host, "u200") == before


def test_a_reload_parses_its_file_while_the_sockets_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing a file of 8,000 rules takes most of a second. Meanwhile the control socket
    answers, and a lease event's rules follow it before its reply. Here the parse is held
    until both have been answered (or have timed out, when the parse holds up the event loop):
    a smaller file does, what counts is that nothing waits for the parse."""
    echo = EchoServer()
    port = free_port()
    path = tmp_path / "f.toml"
    path.write_text(f'[[forward]]\nname = "ssh"\nlisten = {port}\nto = "vm1:{echo.port}"\n')
    parsing, parsed = threading.Event(), threading.Event()
    answers: list[object] = []

    def held(source: Path) -> object:
        parsing.set()
        parsed.wait(20)
        return load_config(source)
    monkeypatch.setattr(daemon_module, "load_config", held)

    def ask(control: Path, leases: Path) -> None:
        try:
            assert parsing.wait(20)
            for where, message in ((control, {"cmd": "status"}),
                                   (leases, {"event": "add", "mac": "52:54:00:00:00:01", "ip": "127.0.0.1",
                                             "hostname": "vm1"})):
                try:
                    answers.append(call(where, message, timeout=3)["ok"])
                except DaemonError as exc:
                    answers.append(str(exc))
        finally:
            parsed.set()

    async def main() -> object:
        with short_dir() as sockets:
            control, leases = sockets / "c.sock", sockets / "l.sock"
            d = Daemon(load_config(path), path, overrides=Overrides(
                workers=1, state_dir=str(tmp_path / "state"), control_socket=str(control), lease_socket=str(leases)))
            running = asyncio.create_task(d.run())
            try:
                while not control.exists():
                    await asyncio.sleep(0.01)
                asker = threading.Thread(target=ask, args=(control, leases))
                asker.start()
                diff = await d.reload("SIGHUP")
                await asyncio.to_thread(asker.join, 30)
                return diff
            finally:
                d.stop()
                await running
    try:
        diff = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        echo.close()
    assert answers == [True, True]
    assert diff is not None


def test_the_stop_of_8000_rules_leaves_nothing_behind(host: Host) -> None:
    """Last in this file. SIGTERM closes all 8,005 listeners and both sockets before it says
    "draining" (a new daemon may take them from then on, while this one drains), then, once
    the last connection is done, it exits 0."""
    ours = {(proto, port) for port in range(host.base, host.base + PAIRS) for proto in ("tcp", "udp")}
    assert unbound(host.proc.proc.pid, ours) == set()
    with held_connection(host.base + 9) as held:
        host.proc.signal(signal.SIGTERM)
        host.proc.wait_log("draining", timeout=60)
        assert not host.proc.control_socket.exists() and not host.proc.lease_socket.exists()
        assert host.proc.proc.poll() is None
        assert bound_ports(host.proc.proc.pid) & ours == set()
        held.sendall(b"still")
        assert recv_exact(held, 5) == b"still"
    assert host.proc.wait(60) == 0
    assert host.proc.log().rstrip().endswith("fastfwd stopped")
