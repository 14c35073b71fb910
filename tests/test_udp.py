"""UDP forwarding: whole datagrams in order per session, one session per client address with
its own replies, idle expiry, the session cap evicting the oldest, replies from the address
the client used, IPv6 and port ranges."""
from __future__ import annotations

import hashlib
import socket
import time

import pytest

from netutil import (LOOP4, LOOP6, MAX_DATAGRAM, SyncForwarder, UdpEcho, datagram, free_port_range,
                     make_rule, udp_roundtrip, udp_socket)

BURST = (1, 1400, MAX_DATAGRAM, 1400, 1)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("host", [LOOP4, LOOP6], ids=["ipv4", "ipv6"])
def test_datagrams_whole_and_in_order_per_session(fwd: SyncForwarder, host: str) -> None:
    rounds, clients = 8, 3
    with UdpEcho(host) as server:
        rule = fwd.forward(server.port, "udp", host)
        socks = [udp_socket(host, timeout=5) for _ in range(clients)]
        sent: dict[int, list[str]] = {i: [] for i in range(clients)}
        try:
            for r in range(rounds):
                for i, sock in enumerate(socks):
                    burst = [datagram(r * 100 + n, size) for n, size in enumerate(BURST)]
                    for d in burst:
                        sock.sendto(d, (host, rule.port))
                    replies = [sock.recv(65536) for _ in burst]
                    assert [len(x) for x in replies] == list(BURST), f"client {i} round {r}"
                    assert replies == burst, f"client {i} round {r}: replies out of order or altered"
                    sent[i] += [digest(d) for d in burst]
        finally:
            for sock in socks:
                sock.close()
        # at the far end: one upstream address per client, each seeing exactly its stream
        assert sorted(server.received.values()) == sorted(sent.values())
    total = rounds * clients * len(BURST)
    counters = fwd.wait_counter(rule, "datagrams_down", total)
    assert (counters.datagrams_up, counters.datagrams_down) == (total, total)
    assert counters.sessions_created == clients
    assert counters.truncated == counters.drops == 0
    assert counters.bytes_up == counters.bytes_down == rounds * clients * sum(BURST)


def test_oversized_datagram_is_whole_or_counted_never_cut(fwd: SyncForwarder) -> None:
    """IPv6 carries up to 65,527 bytes, more than IPv4's 65,507: such a datagram must arrive
    whole, or be counted as truncated and not forwarded cut."""
    big = datagram(1, 65527)
    with UdpEcho(LOOP6) as server:
        rule = fwd.forward(server.port, "udp", LOOP6)
        with udp_socket(LOOP6, timeout=5) as sock:
            sock.sendto(big, (LOOP6, rule.port))
            sock.sendto(b"after", (LOOP6, rule.port))
            replies = [sock.recv(65536 + 100)]
            if replies[0] != b"after":
                replies.append(sock.recv(65536 + 100))
        seen = [d for stream in server.received.values() for d in stream]
        counters = fwd.counters(rule)
    if counters.truncated:
        assert counters.truncated == 1
        assert seen == [digest(b"after")], "a truncated datagram was forwarded"
        assert replies == [b"after"]
    else:
        assert seen == [digest(big), digest(b"after")]
        assert replies == [big, b"after"]
        assert counters.bytes_up == len(big) + len(b"after")


def test_thousand_client_addresses_get_their_own_sessions(fwd: SyncForwarder) -> None:
    n, wave = 1000, 100
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp")
        target = (LOOP4, rule.port)
        socks = [udp_socket(bufsize=1 << 16) for _ in range(n)]
        try:
            for lo in range(0, n, wave):
                pending = {i: b"client %d" % i for i in range(lo, lo + wave)}
                for attempt in range(3):  # UDP may drop under a burst: resend what got no reply
                    for i, message in pending.items():
                        socks[i].sendto(message, target)
                    for i in list(pending):
                        socks[i].settimeout(2.0 if attempt < 2 else 5.0)
                        try:
                            reply = socks[i].recv(64)
                        except TimeoutError:
                            continue
                        assert reply == pending.pop(i), f"client {i} got someone else's reply: {reply!r}"
                    if not pending:
                        break
                assert not pending, f"{len(pending)} clients never got a reply"
            counters = fwd.wait_counter(rule, "sessions_created", n)
            assert counters.sessions_created == n
            assert counters.sessions_active == n
            assert counters.sessions_evicted == 0
            assert len(server.received) == n, "the server saw fewer upstream addresses than clients"
            assert {addr for addr in map(tuple, fwd.sessions(rule))} == {s.getsockname()[:2] for s in socks}
        finally:
            for sock in socks:
                sock.close()


def test_bursts_of_replies_reach_their_own_clients_in_order(fwd: SyncForwarder) -> None:
    """100 clients ask at once and each gets 20 replies back: batched replies go to the right
    session, in order."""
    clients, replies = 100, 20
    with UdpEcho(replies=replies) as server:
        rule = fwd.forward(server.port, "udp")
        socks = [udp_socket(timeout=5) for _ in range(clients)]
        try:
            for i, sock in enumerate(socks):
                sock.sendto(b"c%03d" % i, (LOOP4, rule.port))
            for i, sock in enumerate(socks):
                got = [sock.recv(64) for _ in range(replies)]
                assert got == [b"c%03d:%02d" % (i, k) for k in range(replies)], f"client {i}"
        finally:
            for sock in socks:
                sock.close()
    # A worker counts a batch once its send returned, which may be after the client read it.
    counters = fwd.wait_counter(rule, "datagrams_down", clients * replies)
    assert (counters.datagrams_up, counters.datagrams_down) == (clients, clients * replies)
    assert counters.drops == 0


def test_idle_sessions_expire(fwd: SyncForwarder) -> None:
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", udp_idle_timeout=0.5)
        target = (LOOP4, rule.port)
        socks = [udp_socket() for _ in range(3)]
        try:
            for i, sock in enumerate(socks):
                assert udp_roundtrip(sock, target, b"hello %d" % i) == b"hello %d" % i
            assert fwd.counters(rule).sessions_created == 3
            counters = fwd.wait_counter(rule, "sessions_expired", 3)
            assert counters.sessions_active == 0
            assert fwd.sessions(rule) == []
            # the client comes back: a new session, and its replies still arrive
            assert udp_roundtrip(socks[0], target, b"again") == b"again"
            assert fwd.counters(rule).sessions_created == 4
        finally:
            for sock in socks:
                sock.close()


def test_traffic_keeps_a_session_alive(fwd: SyncForwarder) -> None:
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", udp_idle_timeout=1.0)
        with udp_socket() as sock:
            deadline = time.monotonic() + 2.5  # 2.5 idle timeouts, with a datagram every 0.1 s
            i = 0
            while time.monotonic() < deadline:
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"tick %d" % i) == b"tick %d" % i
                i += 1
                time.sleep(0.1)
        counters = fwd.counters(rule)
        assert counters.sessions_created == 1
        assert counters.sessions_expired == 0


def test_session_cap_evicts_the_oldest(fwd: SyncForwarder) -> None:
    cap = 4
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", udp_max_sessions=cap)
        target = (LOOP4, rule.port)
        socks = [udp_socket() for _ in range(cap + 1)]
        addrs = [s.getsockname()[:2] for s in socks]
        try:
            for i, sock in enumerate(socks):
                assert udp_roundtrip(sock, target, b"c%d" % i) == b"c%d" % i
            counters = fwd.counters(rule)
            assert counters.sessions_evicted == 1
            assert counters.sessions_active == cap
            assert set(map(tuple, fwd.sessions(rule))) == set(addrs[1:]), "not the oldest was evicted"
            # the evicted client still gets served (a new session), evicting the next oldest
            assert udp_roundtrip(socks[0], target, b"back") == b"back"
            counters = fwd.counters(rule)
            assert (counters.sessions_evicted, counters.sessions_created) == (2, cap + 2)
            assert set(map(tuple, fwd.sessions(rule))) == set(addrs[2:] + addrs[:1])
        finally:
            for sock in socks:
                sock.close()


def test_reply_leaves_from_the_address_the_client_used(fwd: SyncForwarder) -> None:
    with UdpEcho() as server:
        rule = fwd.add(make_rule(server.port, "udp", listen_host="0.0.0.0"))
        with udp_socket(timeout=5) as sock:
            for local in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                sock.sendto(b"via " + local.encode(), (local, rule.port))
                data, source = sock.recvfrom(64)
                assert data == b"via " + local.encode()
                assert source == (local, rule.port), f"sent to {local}, reply came from {source}"


def test_port_range_maps_one_to_one(fwd: SyncForwarder) -> None:
    count = 5
    target = free_port_range(count, kinds=(socket.SOCK_DGRAM,))
    servers = [UdpEcho(port=target + i) for i in range(count)]
    try:
        listen = free_port_range(count, kinds=(socket.SOCK_DGRAM,), start=target + count + 100)
        rule = fwd.add(make_rule(target, "udp", listen_port=listen, count=count))
        with udp_socket() as sock:
            for i in range(count):
                message = b"to port %d" % (listen + i)
                assert udp_roundtrip(sock, (LOOP4, listen + i), message) == message
        for i, server in enumerate(servers):
            assert [digest(b"to port %d" % (listen + i))] in server.received.values(), f"target {target + i}"
        assert fwd.counters(rule).sessions_created == count
    finally:
        for server in servers:
            server.close()
