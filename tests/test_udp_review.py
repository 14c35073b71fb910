"""UDP forwarding reviewed as its users meet it: a batch of mixed sizes (empty, one byte, a full
Ethernet payload, jumbo, the largest IPv4 datagram) in segmentable runs and not, clients sharing
a source port on different addresses, one client asking two of the host's addresses, one-way
traffic (syslog up, a stream down) keeping its session, a lowered idle timeout reaching open
sessions, a target that moves to the other address family, replies to a client gone away, a
pending rule, and the session cap of a port range."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import time

import pytest

import fastfwd
from netutil import (LOOP4, LOOP6, MAX_DATAGRAM, ChildForwarder, Received, SyncForwarder, UdpEcho, datagram,
                     free_port_range, make_rule, spec, udp_roundtrip, udp_socket, wait_for)
from test_wire_edges import frozen

# Runs a segmented write may take (equal sizes, the last shorter; 7 x 8,000 fits one, 8 do not)
# and ones it may not (empty datagrams, a size growing within the run), 39 datagrams: two batches.
RUNS = [[0, 0, 0], [1] * 4, [1472] * 6 + [1], [8000] * 7, [8000] * 8, [MAX_DATAGRAM], [1472] * 3 + [0],
        [1, 0, 1], [100, 1472], [MAX_DATAGRAM] * 2]


def test_a_batch_of_mixed_sizes_arrives_whole_and_in_order_both_ways() -> None:
    burst = [datagram(seq, size) for seq, size in enumerate(size for run in RUNS for size in run)]
    with UdpEcho() as server, ChildForwarder.start([(spec(server.port), "udp", {})], workers=1) as child:
        (port,) = child.ports
        with udp_socket(timeout=5) as client:
            with frozen(child.pid):     # read back to back, in batches, as under load
                for d in burst:
                    client.sendto(d, (LOOP4, port))
            replies = [client.recv(MAX_DATAGRAM + 1) for _ in burst]
        assert [len(r) for r in replies] == [len(d) for d in burst]
        assert replies == burst
        (stream,) = server.received.values()
        assert stream == [Received.of(d).digest for d in burst]
        counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] >= len(burst) and c,
                            what="the replies to be counted")
    total = sum(map(len, burst))
    assert (counters["datagrams_up"], counters["datagrams_down"]) == (len(burst), len(burst))
    assert (counters["bytes_up"], counters["bytes_down"]) == (total, total)
    assert counters["drops"] == counters["truncated"] == counters["connect_failed"] == 0


def test_clients_sharing_a_source_port_on_different_addresses_get_their_own_replies(fwd: SyncForwarder) -> None:
    """Two hosts behind one forward may well pick the same source port (a game client's fixed
    port, two NATs): they are two sessions, each answered alone."""
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp")
        with udp_socket("127.0.0.2", timeout=5) as one:
            port = one.getsockname()[1]
            with udp_socket("127.0.0.3", timeout=5, port=port) as two:
                sent: dict[socket.socket, list[bytes]] = {one: [], two: []}
                for seq in range(20):
                    for n, client in enumerate((one, two)):
                        message = datagram(seq * 2 + n, 50 + n)
                        client.sendto(message, (LOOP4, rule.port))
                        sent[client].append(message)
                for client, messages in sent.items():
                    assert [client.recv(100) for _ in messages] == messages
                assert sorted(map(tuple, fwd.sessions(rule))) == [("127.0.0.2", port), ("127.0.0.3", port)]
        assert sorted(server.received.values()) == sorted([Received.of(m).digest for m in messages]
                                                          for messages in sent.values())
    counters = fwd.wait_counter(rule, "datagrams_down", 40)
    assert (counters.sessions_created, counters.datagrams_up, counters.drops) == (2, 40, 0)


def test_one_client_asking_two_local_addresses_of_a_wildcard_listener_is_two_sessions(fwd: SyncForwarder) -> None:
    """Replies leave from the address asked, so the local address is part of the session:
    answers to one never leave from the other."""
    with UdpEcho() as server:
        rule = fwd.add(make_rule(server.port, "udp", listen_host="0.0.0.0"))
        with udp_socket(timeout=5) as client:
            for round_ in range(3):
                for local in ("127.0.0.1", "127.0.0.2"):
                    message = b"%s %d" % (local.encode(), round_)
                    client.sendto(message, (local, rule.port))
                    assert client.recvfrom(64) == (message, (local, rule.port))
        assert sorted(map(len, server.received.values())) == [3, 3]
    counters = fwd.counters(rule)
    assert (counters.sessions_created, counters.sessions_active, counters.datagrams_down) == (2, 2, 6)


@pytest.mark.parametrize("direction", ["requests", "replies"])
def test_traffic_one_way_keeps_a_session(fwd: SyncForwarder, direction: str) -> None:
    """Syslog and NetFlow only send; a stream or a game server's updates only come back. A
    datagram either way is activity: the session (and the source port the target knows it
    by) stays, for 2.5 idle timeouts of one-way traffic, and ends once it stops."""
    count = 80     # 4 s: a stall of the test itself (a loaded CI box) must pass 1.5 s to expire it
    with udp_socket(timeout=5) as target:
        rule = fwd.forward(target.getsockname()[1], "udp", udp_idle_timeout=1.5)
        with udp_socket(timeout=5) as client:
            client.sendto(b"hello", (LOOP4, rule.port))
            _, session = target.recvfrom(64)
            for seq in range(count):        # one every 0.05 s
                message = datagram(seq, 40)
                if direction == "requests":
                    client.sendto(message, (LOOP4, rule.port))
                    assert target.recvfrom(64) == (message, session), f"datagram {seq}"
                else:
                    target.sendto(message, session)
                    assert client.recv(64) == message, f"datagram {seq}"
                time.sleep(0.05)
            counters = fwd.counters(rule)
            assert (counters.sessions_created, counters.sessions_expired) == (1, 0)
            assert fwd.wait_counter(rule, "sessions_expired", 1).sessions_active == 0


def test_a_lowered_idle_timeout_reaches_the_sessions_already_open(fwd: SyncForwarder) -> None:
    """A reload shortening udp_idle_timeout (a table of DNS sessions grown too big) must
    expire the sessions already open by it, not only new ones."""
    with UdpEcho() as server, contextlib.ExitStack() as stack:
        rule = fwd.forward(server.port, "udp", udp_idle_timeout=3600)
        clients = [stack.enter_context(udp_socket()) for _ in range(3)]
        messages = [b"c%d" % i for i in range(len(clients))]
        assert [udp_roundtrip(c, (LOOP4, rule.port), m) for c, m in zip(clients, messages)] == messages
        fwd.apply([dataclasses.replace(rule.bound, options=fastfwd.RuleOptions(udp_idle_timeout=0.3))])
        counters = fwd.wait_counter(rule, "sessions_expired", 3)
    assert (counters.sessions_created, counters.sessions_active) == (3, 0)
    assert fwd.sessions(rule) == []


def test_a_target_moving_to_the_other_family_takes_the_clients_along(fwd: SyncForwarder) -> None:
    """A name's lease moving from IPv4 to IPv6: a session's socket cannot reach the other
    family, so it ends (neither evicted nor expired), and the client's next datagram opens one
    that reaches the new target."""
    with UdpEcho(LOOP4) as four, UdpEcho(LOOP6, port=four.port) as six:
        fwd.resolve("svc", LOOP4)
        rule = fwd.add(make_rule(four.port, "udp").with_target("svc"))
        with udp_socket(timeout=5) as client:
            assert udp_roundtrip(client, (LOOP4, rule.port), b"over ipv4") == b"over ipv4"
            fwd.resolve("svc", LOOP6)
            assert fwd.counters(rule).sessions_active == 0
            assert udp_roundtrip(client, (LOOP4, rule.port), b"over ipv6") == b"over ipv6"
        assert (four.total, six.total) == (1, 1)
    counters = fwd.counters(rule)
    assert (counters.sessions_created, counters.sessions_active) == (2, 1)
    assert counters.sessions_evicted == counters.sessions_expired == counters.drops == 0


@pytest.mark.parametrize("host", [LOOP4, LOOP6], ids=["ipv4", "ipv6"])
def test_replies_to_a_client_gone_away_cost_no_other_client_a_reply(fwd: SyncForwarder, host: str) -> None:
    """A client that closed its socket while its target still streams to it: each reply earns
    an ICMP port unreachable at the listening socket all clients' replies leave through. The
    next client's replies must still go, whole and in order."""
    with udp_socket(host) as target:
        rule = fwd.forward(target.getsockname()[1], "udp", host)
        with udp_socket(host, timeout=5) as gone, udp_socket(host, timeout=5) as staying:
            gone.sendto(b"gone", (host, rule.port))
            _, gone_session = target.recvfrom(64)
            staying.sendto(b"staying", (host, rule.port))
            _, staying_session = target.recvfrom(64)
            gone.close()
            for seq in range(30):
                target.sendto(datagram(seq, 60), gone_session)
                target.sendto(datagram(seq, 70), staying_session)
            assert [staying.recv(100) for _ in range(30)] == [datagram(seq, 70) for seq in range(30)]
        counters = fwd.wait_counter(rule, "datagrams_down", 60)
    assert (counters.datagrams_down, counters.drops, counters.sessions_active) == (60, 0, 2)


def test_a_pending_rule_holds_its_port_and_counts_each_datagram_as_a_drop(fwd: SyncForwarder) -> None:
    """A VM's rule before its lease and after the lease is gone: the port stays this rule's,
    what clients send is counted lost, one by one, and forwarding starts with the lease."""
    with UdpEcho() as server:
        rule = fwd.add(make_rule(server.port, "udp").with_target("vm1"))
        with udp_socket(timeout=5) as client:
            with pytest.raises(OSError, match="in use"):     # nobody else takes the port meanwhile
                udp_socket(port=rule.port).close()
            for seq in range(5):
                client.sendto(datagram(seq, 30), (LOOP4, rule.port))
            assert fwd.wait_counter(rule, "drops", 5).drops == 5
            fwd.resolve("vm1", LOOP4)
            assert udp_roundtrip(client, (LOOP4, rule.port), b"up") == b"up"
            fwd.resolve("vm1", None)
            assert fwd.counters(rule).sessions_active == 0
            client.sendto(b"down again", (LOOP4, rule.port))
            counters = fwd.wait_counter(rule, "drops", 6)
        assert server.total == 1
    assert (counters.drops, counters.datagrams_up, counters.sessions_created) == (6, 1, 1)


def test_the_session_cap_counts_the_sessions_of_every_port_of_a_range(fwd: SyncForwarder) -> None:
    """udp_max_sessions is per rule: a range's ports share it, a client on each port being a
    session of its own."""
    count = 3
    target = free_port_range(count, kinds=(socket.SOCK_DGRAM,))
    servers = [UdpEcho(port=target + i) for i in range(count)]
    try:
        listen = free_port_range(count, kinds=(socket.SOCK_DGRAM,), start=target + count + 100)
        rule = fwd.add(make_rule(target, "udp", listen_port=listen, count=count, udp_max_sessions=2))
        with udp_socket() as client:
            for i in range(count):
                assert udp_roundtrip(client, (LOOP4, listen + i), b"port %d" % i) == b"port %d" % i
        counters = fwd.counters(rule)
    finally:
        for server in servers:
            server.close()
    assert (counters.sessions_created, counters.sessions_evicted, counters.sessions_active) == (3, 1, 2)
