"""The control socket over a real Forwarder: status with live counters, rules added and removed
at run time (proven with traffic), error replies, and the status tables."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfwd.cli import format_status
from fastfwd.control import ControlServer
from fastfwd.leases import Lease, LeaseTable
from fastfwd.rules import Rule
from fastfwd.unixclient import call

from helpers_control import short_dir

pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
from fastfwd.forwarder import ActiveRule, Counters, Forwarder  # noqa: E402

A = "52:54:00:00:00:0a"


class Target:
    """The daemon's side of the control socket, reduced to a real Forwarder and lease table."""

    def __init__(self, fw: Forwarder, table: LeaseTable) -> None:
        self.fw, self.table = fw, table
        self.added: set[tuple[str, str, int, int]] = set()

    @property
    def rules(self) -> list[ActiveRule]:
        return self.fw.rules

    def counters(self, rule: ActiveRule) -> Counters:
        return self.fw.counters(rule)

    def sessions(self, rule: ActiveRule) -> list[tuple[str, int]]:
        return self.fw.sessions(rule)

    @property
    def leases(self) -> LeaseTable:
        return self.table

    @property
    def engine(self) -> dict[str, int]:
        return self.fw.settings

    @property
    def reload_status(self) -> None:
        return None

    async def add_rule(self, rule: Rule) -> ActiveRule:
        active = await self.fw.add(rule)
        self.added.add(active.rule.key)
        return active

    async def remove_rule(self, rule: Rule) -> None:
        """Like the daemon: only rules added at run time may be removed at run time."""
        active = self.fw.find(rule)
        if active is not None and active.rule.key not in self.added:
            raise ValueError(f"{rule} comes from the config file")
        await self.fw.remove(rule)

    async def metrics(self) -> str:
        return f"fastfwd_rules {len(self.fw.rules)}\n"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def run(coro: Awaitable[Any]) -> Any:
    """On uvloop, as the daemon runs, when it is installed."""
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 120))


async def ask(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    """Through the blocking client ``fastfwd status`` uses, off the loop."""
    return await asyncio.to_thread(call, path, message, 30.0)


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def roundtrip(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    got = await reader.read()
    writer.close()
    return got


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


def test_status_shows_rules_with_live_counters_pending_rules_and_leases(sockdir: Path) -> None:
    table = LeaseTable([Lease(mac=A, ip="10.0.0.1", hostname="vm1", seen=1000.0)])

    async def main() -> tuple[dict[str, Any], dict[str, Any], int]:
        echo = await echo_server()
        echo_port = echo.sockets[0].getsockname()[1]
        async with Forwarder(workers=1) as fw, echo:
            web = await fw.add(Rule.parse(f"0:127.0.0.1:{echo_port}", name="web"))
            await fw.add(Rule.parse("0:vm9:53", "udp"))
            async with ControlServer(sockdir / "c.sock", Target(fw, table)):
                assert await roundtrip(web.port, b"x" * 1000) == b"x" * 1000
                for _ in range(200):  # the counters follow the connection's close shortly after
                    status = await ask(sockdir / "c.sock", {"cmd": "status"})
                    if status["rules"][0]["counters"]["active"] == 0:
                        break
                    await asyncio.sleep(0.05)
                metrics = await ask(sockdir / "c.sock", {"cmd": "metrics"})
                return status, metrics, echo_port
    status, metrics, echo_port = run(main())
    assert status["ok"] is True
    web, dns = status["rules"]
    assert web["name"] == "web" and web["proto"] == "tcp" and web["state"] == "active"
    assert web["listen"] == f"127.0.0.1:{web['port']}" and web["target"] == f"127.0.0.1:{echo_port}"
    assert web["target_ip"] == "127.0.0.1"
    assert (web["counters"]["accepted"], web["counters"]["bytes_up"], web["counters"]["bytes_down"]) == (1, 1000, 1000)
    assert dns["state"] == "pending" and dns["target"] == "vm9:53" and dns["target_ip"] is None
    assert "sessions" not in dns
    assert status["leases"] == [{"mac": A, "ip": "10.0.0.1", "hostname": "vm1", "seen": 1000.0}]
    assert metrics == {"ok": True, "text": "fastfwd_rules 2\n"}

    text = format_status(status, now=1000.0 + 7200)
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "PROTO", "LISTEN", "TARGET", "ADDRESS", "STATE", "CONNS", "ACCEPTED",
                                "UP", "DOWN", "DGRAMS-UP", "DGRAMS-DOWN", "SESSIONS"]
    assert lines[1].split() == ["web", "tcp", web["listen"], web["target"], "127.0.0.1", "active", "0", "1",
                                "1000", "B", "1000", "B", "-", "-", "-"]
    assert lines[2].split() == ["-", "udp", dns["listen"], "vm9:53", "-", "pending", "-", "-", "0", "B", "0", "B",
                                "0", "0", "0"]
    assert lines[4].split() == ["MAC", "IP", "HOSTNAME", "SINCE"]
    assert lines[5].split() == [A, "10.0.0.1", "vm1", "2h", "ago"]
    assert status["engine"] == {"workers": 1, "pipe_size": 1 << 20, "busy_poll_us": 0}
    assert lines[7] == "engine: 1 worker, pipes of 1.0 MiB, no busy polling"


def test_udp_sessions_are_listed_on_request(sockdir: Path) -> None:
    async def main() -> tuple[dict[str, Any], tuple[str, int]]:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        echo_port = echo.get_extra_info("sockname")[1]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(30)
        client.bind(("127.0.0.1", 0))
        try:
            async with Forwarder(workers=1) as fw:
                dns = await fw.add(Rule.parse(f"0:127.0.0.1:{echo_port}", "udp"))
                async with ControlServer(sockdir / "c.sock", Target(fw, LeaseTable())):
                    client.sendto(b"ping", ("127.0.0.1", dns.port))
                    assert await asyncio.to_thread(client.recv, 100) == b"ping"
                    return await ask(sockdir / "c.sock", {"cmd": "status", "sessions": True}), client.getsockname()
        finally:
            client.close()
            echo.close()
    status, (host, port) = run(main())
    (dns,) = status["rules"]
    assert dns["sessions"] == [f"{host}:{port}"]
    assert dns["counters"]["sessions_active"] == 1 and dns["counters"]["datagrams_up"] == 1


def test_rules_added_and_removed_at_run_time_forward_and_stop(sockdir: Path) -> None:
    async def main() -> None:
        echo = await echo_server()
        echo_port = echo.sockets[0].getsockname()[1]
        async with Forwarder(workers=1) as fw, echo:
            async with ControlServer(sockdir / "c.sock", Target(fw, LeaseTable())):
                spec = f"127.0.0.1:0:127.0.0.1:{echo_port}"
                added = await ask(sockdir / "c.sock", {"cmd": "add", "spec": spec, "proto": "tcp", "name": "api",
                                                       "options": {"connect_timeout": 3, "allow": ["127.0.0.0/8"]}})
                assert added["ok"] is True, added
                rule = added["rule"]
                assert (rule["name"], rule["state"], rule["counters"]["accepted"]) == ("api", "active", 0)
                assert fw.rules[0].rule.options.allow == ("127.0.0.0/8",)
                assert await roundtrip(rule["port"], b"hello") == b"hello"
                spec = f"127.0.0.1:{rule['port']}:127.0.0.1:{echo_port}"
                assert await ask(sockdir / "c.sock", {"cmd": "remove", "spec": spec, "proto": "tcp"}) == {"ok": True}
                assert fw.rules == []
                with pytest.raises(ConnectionRefusedError):
                    await roundtrip(rule["port"], b"hello")
    run(main())


def test_bad_requests_get_errors_and_change_nothing(sockdir: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    requests: list[tuple[Any, str]] = [
        (["status"], 'expected an object with a "cmd" string'),
        ({"command": "status"}, 'expected an object with a "cmd" string'),
        ({"cmd": "reboot"}, "unknown cmd 'reboot'"),
        ({"cmd": "add"}, '"spec" must be a port spec string'),
        ({"cmd": "add", "spec": 2222}, '"spec" must be a port spec string'),
        ({"cmd": "add", "spec": "2222:vm1:22", "proto": "sctp"}, '"proto" must be "tcp" or "udp"'),
        ({"cmd": "add", "spec": "2222:vm1:22", "name": 5}, '"name" must be a string'),
        ({"cmd": "add", "spec": "2222:vm1"}, "expected [ADDR:]PORT[-END]:HOST:PORT[-END]"),
        ({"cmd": "add", "spec": "8000-7999:vm1:22"}, "range 8000-7999 is reversed"),
        ({"cmd": "add", "spec": "2222:vm1:22", "options": {"conect_timeout": 3}},
         "options.conect_timeout: unknown key (did you mean 'connect_timeout'?)"),
        ({"cmd": "add", "spec": "2222:vm1:22", "options": {"splice": "sometimes"}},
         "options.splice: expected 'auto', 'always' or 'never', got 'sometimes'"),
        ({"cmd": "add", "spec": "2222:vm1:22", "options": {"allow": "10.0.0.0/8", "idle_timeout": -1}},
         "options.idle_timeout: expected a number of seconds from 0 to 1000000000, got -1; "
         "options.allow: expected an array of strings, got '10.0.0.0/8'"),
        ({"cmd": "add", "spec": "2222:vm1:22", "options": [1]}, '"options" must be an object'),
        ({"cmd": "add", "spec": "2222:vm1:22", "options": {"udp_max_sessions": 5}},
         "options.udp_max_sessions: a UDP option, and this rule is TCP only"),
        ({"cmd": "add", "spec": "2222:vm1:22", "proto": "udp", "options": {"max_connections": 5, "splice": "never"}},
         "options.max_connections: a TCP option, and this rule is UDP only; "
         "options.splice: a TCP option, and this rule is UDP only"),
        ({"cmd": "add", "spec": "2222:vm1:22", "force": True}, "unknown key 'force' for add"),
        ({"cmd": "add", "spec": f"127.0.0.1:{busy_port}:127.0.0.1:22"}, "cannot add:"),
        ({"cmd": "remove", "spec": "127.0.0.1:2222:vm1:22"}, "no rule listens on 127.0.0.1:2222:vm1:22"),
        ({"cmd": "remove", "spec": "2222:vm1:22", "options": {}}, "unknown key 'options' for remove"),
    ]

    async def main() -> list[dict[str, Any]]:
        async with Forwarder(workers=1) as fw:
            kept = await fw.add(Rule.parse("0:127.0.0.1:9"))
            async with ControlServer(sockdir / "c.sock", Target(fw, LeaseTable())):
                replies = [await ask(sockdir / "c.sock", request) for request, _ in requests]
                spec = f"127.0.0.1:{kept.port}:127.0.0.1:9"
                replies.append(await ask(sockdir / "c.sock", {"cmd": "remove", "spec": spec}))
                requests.append(({"cmd": "remove", "spec": spec}, "cannot remove: tcp 127.0.0.1"))
                assert fw.rules == [kept]
                return replies
    try:
        replies = run(main())
    finally:
        busy.close()
    for (request, expected), reply in zip(requests, replies, strict=True):
        assert reply["ok"] is False and expected in reply["error"], (request, reply)


def test_format_status_of_an_empty_daemon() -> None:
    assert format_status({"ok": True, "rules": [], "leases": []}) == "no rules\n\nno leases"
