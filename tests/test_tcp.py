"""TCP forwarding integrity: bytes hashed at the far end, both directions at once, every
splice mode; the counters that prove zero copy; many connections at once; IPv6; port ranges."""
from __future__ import annotations

import os
import random
import socket

import pytest

from fastfwd import Counters

from netutil import (LOOP4, LOOP6, SPLICE_MODES, SPLICE_THRESHOLD, AsyncEchoServer, Received,
                     SyncForwarder, TcpServer, connect, echo_handler, echo_once, exchange,
                     exchange_handler, forwarder, free_port_range, make_rule, many_echo, open_fds, payload,
                     turned_away_how, wait_for)

MB = 1 << 20


def two_way(fwd: SyncForwarder, size: int, splice: str, host: str = LOOP4) -> tuple[int, Counters]:
    """Move ``size`` bytes each way at once through a fresh rule; check both digests at the far
    ends. Returns the total bytes moved and the rule's counters once they account for all."""
    up, down = payload(size, seed=1), payload(size, seed=2)
    with TcpServer(exchange_handler(down), host) as server:
        rule = fwd.forward(server.port, host=host, splice=splice)
        got_down = exchange(rule.port, up, host)
        got_up = server.result()
    assert got_up == Received.of(up), "client-to-server stream corrupted"
    assert got_down == Received.of(down), "server-to-client stream corrupted"
    total = 2 * size
    counters = fwd.wait_counter(rule, "bytes_down", size)
    assert (counters.bytes_up, counters.bytes_down) == (size, size)
    assert counters.accepted == 1
    return total, counters


@pytest.mark.parametrize("size", [1 * MB, 200 * MB], ids=["1MB", "200MB"])
@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_two_way_transfer_is_intact(fwd: SyncForwarder, splice: str, size: int) -> None:
    total, counters = two_way(fwd, size, splice)
    assert counters.bytes_spliced + counters.bytes_copied == total
    assert counters.splice_fallbacks == 0
    if splice == "always":
        assert counters.bytes_copied == 0
        assert counters.bytes_spliced == total
    elif splice == "never":
        assert counters.bytes_spliced == 0
        assert counters.bytes_copied == total
    else:  # auto: each direction copies at most the promotion threshold, then splices
        assert counters.bytes_copied <= 2 * SPLICE_THRESHOLD
        assert counters.bytes_spliced >= total - 2 * SPLICE_THRESHOLD


@pytest.mark.parametrize("threshold", [SPLICE_THRESHOLD, 1 * MB])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_auto_promotes_each_direction_after_its_threshold(fwd: SyncForwarder, direction: str,
                                                          threshold: int) -> None:
    """One direction only: at most ``threshold`` bytes copied, everything after spliced."""
    size = 8 * MB
    up, down = (payload(size, seed=3), b"") if direction == "up" else (b"", payload(size, seed=4))
    with TcpServer(exchange_handler(down)) as server:
        rule = fwd.forward(server.port, splice="auto", splice_threshold=threshold)
        assert exchange(rule.port, up) == Received.of(down)
        assert server.result() == Received.of(up)
    counters = fwd.wait_counter(rule, f"bytes_{direction}", size)
    assert counters.bytes_up + counters.bytes_down == size
    assert 0 < counters.bytes_copied <= threshold
    assert counters.bytes_spliced == size - counters.bytes_copied


@pytest.mark.parametrize("before, after", [("always", "never"), ("never", "always"), ("always", "auto")])
def test_a_live_connection_follows_a_change_of_splice_mode(fwd: SyncForwarder, before: str, after: str) -> None:
    """A rule's splice mode changed in place (a reload) applies to its live connections too:
    "never" must stop splicing (it is the way out when splice misbehaves on a kernel)."""
    chunk, rounds = payload(256 << 10, seed=5), 8

    def echo_rounds(sock: socket.socket) -> None:
        for _ in range(rounds):
            sock.sendall(chunk)
            got = bytearray()
            while len(got) < len(chunk):
                data = sock.recv(len(chunk) - len(got))
                assert data, "the forward closed mid-exchange"
                got += data
            assert got == chunk

    moved = 2 * rounds * len(chunk)
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, splice=before)
        with connect(rule.port) as sock:
            echo_rounds(sock)
            first = fwd.wait_counter(rule, "bytes_down", moved // 2)
            fwd.apply([make_rule(server.port, listen_port=rule.port, splice=after)])
            echo_rounds(sock)
            second = fwd.wait_counter(rule, "bytes_down", moved)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
    assert second.accepted == 1
    spliced, copied = second.bytes_spliced - first.bytes_spliced, second.bytes_copied - first.bytes_copied
    assert spliced + copied == moved
    if after == "never":
        assert (spliced, copied) == (0, moved)
    else:  # the switch waits for nothing: "always" and "auto" (past its threshold) splice at once
        assert (spliced, copied) == (moved, 0)


@pytest.mark.parametrize("pipe_size", [4096, 65536])
def test_small_pipes_still_splice_everything(pipe_size: int) -> None:
    with forwarder(workers=2, pipe_size=pipe_size) as small:
        total, counters = two_way(small, 16 * MB, "always")
    assert counters.bytes_spliced == total
    assert counters.bytes_copied == counters.splice_fallbacks == 0


def test_auto_splice_keeps_short_exchanges_on_copy(fwd: SyncForwarder) -> None:
    """Below the promotion threshold, auto never splices."""
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, splice="auto")
        with connect(rule.port) as sock:
            for i in range(20):
                message = payload(1000, seed=i + 3)
                assert echo_once(sock, message) == message
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        server.result()
    counters = fwd.wait_counter(rule, "bytes_down", 20_000)
    assert counters.bytes_spliced == 0
    assert counters.bytes_copied == 40_000


def test_active_counts_live_connections(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port)
        socks = [connect(rule.port) for _ in range(3)]
        try:
            for s in socks:
                assert echo_once(s, b"hi") == b"hi"
            assert fwd.wait_counter(rule, "active", 3).accepted == 3
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: fwd.counters(rule).active == 0, what="active back to 0")


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_thousand_concurrent_connections(fwd: SyncForwarder, splice: str) -> None:
    rng = random.Random(1000)
    payloads = [payload(rng.randrange(0, 96 * 1024), seed=i + 10) for i in range(1000)]
    payloads[0] = b""  # connect, send nothing, half-close
    with AsyncEchoServer() as server:
        rule = fwd.forward(server.port, splice=splice)
        # all 1,000 connections are up at once (both legs) before any byte moves
        results = many_echo(rule.port, payloads, timeout=90,
                            all_open=lambda: fwd.wait_counter(rule, "active", len(payloads)))
        expected = [Received.of(p) for p in payloads]
        assert results == expected, f"{sum(a != b for a, b in zip(results, expected))} echoes corrupted"
        assert sorted(server.received) == sorted(expected), "the server read something else"
    counters = fwd.wait_counter(rule, "accepted", 1000)
    assert counters.accepted == 1000
    assert counters.connect_failed == 0
    total = sum(len(p) for p in payloads)
    assert fwd.wait_counter(rule, "bytes_down", total).bytes_up == total


@pytest.mark.parametrize("splice", ["always", "never"])
def test_ipv6(fwd: SyncForwarder, splice: str) -> None:
    two_way(fwd, 4 * MB, splice, host=LOOP6)


@pytest.mark.parametrize("listen, target", [(LOOP4, LOOP6), (LOOP6, LOOP4)], ids=["4to6", "6to4"])
def test_across_address_families(fwd: SyncForwarder, listen: str, target: str) -> None:
    with TcpServer(echo_handler, target) as server:
        rule = fwd.add(make_rule(server.port, host=target, listen_host=listen))
        with connect(rule.port, listen) as sock:
            assert echo_once(sock, b"across") == b"across"


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_finished_connections_give_their_fds_back(fwd: SyncForwarder, splice: str) -> None:
    """Hundreds of connections one after another: once they are over, the forwarder holds
    about as many descriptors as before them (a pipe pool may keep a few)."""
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:  # warm up: the first connection may allocate for good
            assert echo_once(sock, payload(256 * 1024, seed=8)) == payload(256 * 1024, seed=8)
        wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")
        baseline = open_fds(os.getpid())
        n = 300
        message = payload(200 * 1024, seed=9)  # past the promotion threshold: auto splices too
        for _ in range(n):
            with connect(rule.port) as sock:
                assert echo_once(sock, message) == message
        wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")
        wait_for(lambda: open_fds(os.getpid()) <= baseline + 32, timeout=5,
                 what=f"fds back near {baseline} after {n} connections (now {open_fds(os.getpid())})")
    assert fwd.counters(rule).accepted == n + 1


def test_port_range_maps_one_to_one(fwd: SyncForwarder) -> None:
    """Ten listen ports onto ten target ports: listen port i reaches target port i."""
    count = 10
    servers: list[TcpServer] = []
    target = free_port_range(count)
    try:
        servers = [TcpServer(tag_handler, port=target + i) for i in range(count)]
        listen = free_port_range(count, start=target + count + 100)
        rule = fwd.add(make_rule(target, listen_port=listen, count=count))
        assert rule.port == listen
        for i in range(count):
            with connect(listen + i) as sock:
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(64) == str(target + i).encode(), f"listen port {listen + i}"
    finally:
        for s in servers:
            s.close()


def test_thousand_port_range_is_one_rule(fwd: SyncForwarder) -> None:
    count, sample = 1000, (0, 1, 500, 998, 999)
    target = free_port_range(count)
    listen = free_port_range(count, start=target + count + 100)
    servers = [TcpServer(tag_handler, port=target + i) for i in sample]
    try:
        rule = fwd.add(make_rule(target, listen_port=listen, count=count))
        assert len(fwd.fw.rules) == 1 and rule.port == listen
        for i in sample:
            with connect(listen + i) as sock:
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(64) == str(target + i).encode(), f"listen port {listen + i}"
        assert turned_away_how(listen + 2) in ("eof", "reset")  # no server behind that one
    finally:
        for s in servers:
            s.close()


def tag_handler(conn: socket.socket) -> None:
    """Reply with the port the server listens on."""
    conn.sendall(str(conn.getsockname()[1]).encode())
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
