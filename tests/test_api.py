"""The Python API as a program uses it (asyncio, and uvloop when installed), and the CLI's
``run -t/-u`` forwarding end to end in a child process."""
from __future__ import annotations

import asyncio
import signal
import threading
import socket
from pathlib import Path

import pytest

import fastfwd
from netutil import (LOOP4, TIMEOUT, Progress, SyncForwarder, TcpServer, UdpEcho, cli_sandbox, connect,
                     connect_retry, echo_handler, echo_once, exchange, exchange_handler, free_port_range,
                     is_refused, make_rule, payload, run_async, spawn, start_cli, stop_process, turned_away,
                     udp_roundtrip, udp_socket, wait_for)


def echo_through(port: int, message: bytes) -> bytes:
    with connect(port) as sock:
        return echo_once(sock, message)


async def exercise(server_port: int) -> None:
    """What a load-testing script does: start, add, use, read counters, remove, stop."""
    async with fastfwd.Forwarder(workers=2) as fw:
        rule = await fw.add(fastfwd.Rule.parse(f"0:127.0.0.1:{server_port}", "tcp",
                                               options=fastfwd.RuleOptions(splice="always")))
        assert isinstance(rule, fastfwd.ActiveRule)
        assert rule.port > 0 and rule.state == "active"
        assert fw.rules == [rule]
        assert await asyncio.to_thread(echo_through, rule.port, b"api") == b"api"
        counters = fw.counters(rule)
        assert isinstance(counters, fastfwd.Counters)
        assert counters.accepted == 1 and counters.bytes_up == 3
        await fw.remove(rule)
        assert fw.rules == []
        with pytest.raises(KeyError):
            fw.counters(rule)
        with pytest.raises(KeyError):
            await fw.remove(rule)
        assert await asyncio.to_thread(is_refused, rule.port)


def test_asyncio_api() -> None:
    with TcpServer(echo_handler) as server:
        run_async(exercise(server.port))


def test_uvloop_api() -> None:
    uvloop = pytest.importorskip("uvloop")
    with TcpServer(echo_handler) as server:
        uvloop.run(asyncio.wait_for(exercise(server.port), 60))


def test_listen_port_zero_reports_the_real_port_for_udp() -> None:
    async def main(server_port: int) -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            rule = await fw.add(make_rule(server_port, "udp"))
            assert rule.port > 0

            def roundtrip() -> bytes:
                with udp_socket() as sock:
                    return udp_roundtrip(sock, (LOOP4, rule.port), b"udp api")
            assert await asyncio.to_thread(roundtrip) == b"udp api"
            assert fw.counters(rule).sessions_created == 1
            assert fw.sessions(rule) != []

    with UdpEcho() as server:
        run_async(main(server.port))


def test_rules_given_up_front_and_closing_stops_everything() -> None:
    async def main(server_port: int) -> tuple[int, socket.socket]:
        base = free_port_range(1)
        async with fastfwd.Forwarder([make_rule(server_port, listen_port=base)], workers=2) as fw:
            (rule,) = fw.rules
            assert rule.port == base
            sock = await asyncio.to_thread(connect, base)
            assert await asyncio.to_thread(echo_once, sock, b"up front") == b"up front"
        return base, sock

    with TcpServer(echo_handler) as server:
        port, live = run_async(main(server.port))
        with live:
            assert is_refused(port)
            live.settimeout(5)
            with pytest.raises((ConnectionResetError, EOFError, BrokenPipeError)):
                echo_once(live, b"after close")


def test_restart_on_the_same_port_right_after_close() -> None:
    """Connections the forwarder closed leave TIME_WAIT behind; a new forwarder still binds."""
    async def once(server_port: int, port: int) -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            await fw.add(make_rule(server_port, listen_port=port))
            sock = await asyncio.to_thread(connect, port)
            assert await asyncio.to_thread(echo_once, sock, b"x") == b"x"
        sock.close()

    with TcpServer(echo_handler) as server:
        port = free_port_range(1)
        for _ in range(3):
            run_async(once(server.port, port))


def test_close_in_the_middle_of_transfers_ends_them() -> None:
    """Closing without drain while data flows (through pipes too): every client learns that
    its connection is gone, and close() returns."""
    size = 16 << 20
    gate = threading.Event()
    progress = [Progress() for _ in range(4)]

    def cut_short(p: Progress) -> str:
        try:
            got = exchange(rule.port, payload(size, seed=41), LOOP4, gate, p)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        return "complete" if got.nbytes == size else "eof"

    with TcpServer(exchange_handler(payload(size, seed=40), gate)) as server:
        fw = SyncForwarder()
        try:
            rule = fw.forward(server.port, splice="always")
            clients = [spawn(cut_short, p) for p in progress]
            wait_for(lambda: all(p.nbytes >= size // 2 for p in progress), what="transfers halfway")
        finally:
            fw.close()
            gate.set()
        assert {c.result() for c in clients} == {"reset"}


def test_close_resets_a_connection_with_nothing_in_flight() -> None:
    """A connection between two exchanges, every byte read on both sides: closing the
    forwarder must not end it with a FIN, which would look like an orderly end to both peers."""
    with socket.create_server((LOOP4, 0)) as lsock:
        fw = SyncForwarder()
        try:
            rule = fw.forward(lsock.getsockname()[1])
            client = connect(rule.port)
            server, _ = lsock.accept()
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"
            server.sendall(b"pong")
            assert client.recv(4) == b"pong"
        finally:
            fw.close()
        with client, server:
            for peer in (client, server):
                peer.settimeout(TIMEOUT)
                with pytest.raises(ConnectionResetError):
                    peer.recv(1)


def test_drain_lets_live_connections_finish() -> None:
    async def main(server_port: int) -> None:
        fw = fastfwd.Forwarder(workers=2)
        await fw.start()
        rule = await fw.add(make_rule(server_port))
        sock = await asyncio.to_thread(connect, rule.port)
        closing = asyncio.ensure_future(fw.close(drain=TIMEOUT))
        for _ in range(200):  # the listener goes first
            if await asyncio.to_thread(is_refused, rule.port):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("still accepting while draining")
        assert not closing.done()
        assert await asyncio.to_thread(echo_once, sock, b"draining") == b"draining"
        sock.close()
        await asyncio.wait_for(closing, TIMEOUT)  # returns once the last connection ended

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))


def test_misuse_is_reported() -> None:
    async def main() -> None:
        fw = fastfwd.Forwarder(workers=1)
        with pytest.raises(RuntimeError, match="not running"):
            await fw.add(make_rule(9))
        async with fw:
            rule = make_rule(9, listen_port=free_port_range(1))
            await fw.add(rule)
            with pytest.raises(ValueError, match="already listens"):
                await fw.add(rule)
            with pytest.raises(ValueError, match="listed twice"):
                await fw.apply([rule, rule])
            with pytest.raises(ValueError, match="not an IP address"):
                await fw.resolve("vm1", "not-an-ip")
    run_async(main())


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("first, second", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                           ("127.0.0.1", "0.0.0.0"), ("::", "::1")])
def test_a_rule_whose_ports_overlap_one_of_ours_names_it(proto: str, first: str, second: str) -> None:
    """A port taken by one of the forwarder's own rules is not blamed on another program."""
    async def main() -> None:
        base = free_port_range(5)
        async with fastfwd.Forwarder(workers=1) as fw:
            held = await fw.add(make_rule(9000, proto, listen_host=first, listen_port=base, count=4))
            with pytest.raises(ValueError) as info:
                await fw.add(make_rule(80, proto, listen_host=second, listen_port=base + 2))
            assert str(info.value).endswith(f": overlaps {held.bound}")
            # Ports next to the range, and the other family's wildcard, are free to take.
            await fw.add(make_rule(80, proto, listen_host=second, listen_port=base + 4))
    run_async(main())


def test_pending_rule_refuses_until_its_name_resolves() -> None:
    async def main(server_port: int) -> None:
        async with fastfwd.Forwarder(workers=2) as fw:
            rule = await fw.add(make_rule(server_port).with_target("web"))
            assert rule.pending and rule.state == "pending"
            assert await asyncio.to_thread(turned_away, rule.port)
            assert [r.id for r in await fw.resolve("web", "127.0.0.1")] == [rule.id]
            assert not rule.pending
            assert await asyncio.to_thread(echo_through, rule.port, b"resolved") == b"resolved"
            await fw.resolve("web", None)
            assert rule.pending
            assert await asyncio.to_thread(turned_away, rule.port)

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))


# -- the CLI ---------------------------------------------------------------------------------

def test_cli_run_forwards_tcp_and_udp(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as tcp_server, UdpEcho() as udp_server:
        base = free_port_range(2, kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM))
        proc = start_cli("run", "-t", f"{base}:127.0.0.1:{tcp_server.port}",
                         "-u", f"127.0.0.1:{base + 1}:127.0.0.1:{udp_server.port}", "--workers", "2",
                         *cli_sandbox(tmp_path))
        try:
            with connect_retry(base) as sock:
                assert echo_once(sock, b"cli tcp") == b"cli tcp"
            with udp_socket() as sock:
                assert udp_roundtrip(sock, (LOOP4, base + 1), b"cli udp") == b"cli udp"
        finally:
            status = stop_process(proc, signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT)
        assert status == 0, err
        assert is_refused(base)
