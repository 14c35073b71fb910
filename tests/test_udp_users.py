"""UDP forwarding as the services behind it meet it: a broadcast discovery query on a wildcard
listener, a datagram too big for the target's family among good ones, a target behind a
firewall that rejects some datagrams, more clients than the forwarder has fds for, a target
answering from another port, a client whose NAT mapping changes, bursts of replies, a retarget
with replies under way, segmented sends, a lowered session cap, and a LAN client asking each
of the host's addresses (link-local and broadcast too) on wildcard listeners."""
from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import pytest

from fastfwd.host.lab import Lab
from fastfwd.rules import Rule, SpecError
from netutil import (LOOP4, LOOP6, ChildForwarder, Received, SyncForwarder, UdpEcho, datagram, make_rule, open_fds,
                     run_cli, spec, udp_roundtrip, udp_socket, wait_for)
from test_wire_edges import frozen


def digests(datagrams: list[bytes]) -> list[str]:
    return [Received.of(d).digest for d in datagrams]


def test_a_broadcast_query_on_a_wildcard_listener_is_answered(fwd: SyncForwarder) -> None:
    """LAN discovery (game servers, service browsers) asks the broadcast address; the reply
    must leave from this host's own address on that network. It was sent from the broadcast
    address the query went to, which the kernel refuses: every reply was dropped."""
    with UdpEcho() as server:
        rule = fwd.add(make_rule(server.port, "udp", listen_host="0.0.0.0"))
        with udp_socket(timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.sendto(b"who is there", ("127.255.255.255", rule.port))
            data, source = sock.recvfrom(64)
            assert data == b"who is there"
            assert source == (LOOP4, rule.port)
            # the same client asking the host directly is the same session
            assert udp_roundtrip(sock, (LOOP4, rule.port), b"and you") == b"and you"
    counters = fwd.wait_counter(rule, "datagrams_down", 2)
    assert (counters.datagrams_up, counters.datagrams_down, counters.drops) == (2, 2, 0)
    assert counters.sessions_created == 1


def test_a_datagram_too_big_for_the_target_costs_only_itself() -> None:
    """IPv6 carries 65,527 bytes, IPv4 65,507: such a datagram forwarded from an IPv6 client to
    an IPv4 target cannot be sent. It is dropped and counted; the datagrams after it in the
    same batch used to be dropped with it."""
    small = [datagram(seq, 100 + seq) for seq in range(6)]
    burst = small[:2] + [datagram(99, 65527)] + small[2:4] + [datagram(98, 65527)] + small[4:]
    with UdpEcho() as server, ChildForwarder.start([(f"[::1]:0:127.0.0.1:{server.port}", "udp", {})],
                                                   workers=1) as child:
        (port,) = child.ports
        with udp_socket(LOOP6, timeout=5) as sock:
            with frozen(child.pid):     # one batch, one run of datagrams from one client
                for d in burst:
                    sock.sendto(d, (LOOP6, port))
            assert [sock.recv(1000) for _ in small] == small
        (stream,) = server.received.values()
        assert stream == digests(small)
        counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] >= len(small) and c,
                            what="the replies to be counted")
    assert (counters["datagrams_up"], counters["drops"]) == (len(small), 2), counters
    assert counters["bytes_up"] == counters["bytes_down"] == sum(map(len, small))
    assert counters["connect_failed"] == 0, "an oversized datagram is no refusal by the target"


@contextlib.contextmanager
def lab_namespace(role: str) -> Iterator[tuple[Lab, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    with Lab() as lab:
        yield lab, lab.netns(role)


@pytest.mark.root
def test_a_firewall_rejecting_one_datagram_does_not_cost_the_next() -> None:
    """A firewall in front of the target rejects some datagrams with ICMP 'administratively
    prohibited' (firewalld's default), which the kernel hands to the next send on the
    session's connected socket as EHOSTUNREACH. Only port unreachable was recognised: the
    next run of datagrams, which the target would have taken, was dropped."""
    rounds, rejected_size = 10, 77
    with lab_namespace("udpfw") as (lab, ns):
        server = lab.call(ns, UdpEcho, LOOP4)
        clients = [lab.call(ns, udp_socket, LOOP4) for _ in range(2)]
        try:
            lab.run(ns, ["nft", (f"add table ip fw; add chain ip fw in {{ type filter hook input priority 0; }}; "
                                 f"add rule ip fw in udp dport {server.port} udp length {8 + rejected_size} "
                                 f"reject with icmp type admin-prohibited")])
            with ChildForwarder.start([(spec(server.port), "udp", {})], workers=1,
                                      wrapper=tuple(Lab.argv(ns, []))) as child:
                (port,) = child.ports
                a, b = clients
                wanted = {0: [datagram(seq, 20 + seq) for seq in range(rounds)],
                          1: [datagram(100 + seq, 40 + seq) for seq in range(rounds)]}
                with frozen(child.pid):
                    # A's rejected datagram, B's, then A's next, which meets the pending error
                    for seq in range(rounds):
                        a.sendto(datagram(200 + seq, rejected_size), (LOOP4, port))
                        b.sendto(wanted[1][seq], (LOOP4, port))
                        a.sendto(wanted[0][seq], (LOOP4, port))
                for i, sock in enumerate(clients):
                    assert [sock.recv(1000) for _ in range(rounds)] == wanted[i], f"client {i}"
                assert sorted(server.received.values()) == sorted(map(digests, wanted.values()))
                counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] >= 2 * rounds and c,
                                    what="the replies to be counted")
        finally:
            for sock in clients:
                sock.close()
            server.close()
    assert (counters["datagrams_up"], counters["drops"]) == (3 * rounds, 0), counters
    assert 1 <= counters["connect_failed"] <= rounds, counters


NOFILE = 64


def test_clients_beyond_the_fd_limit_are_counted_drops_and_served_once_fds_free_up() -> None:
    """Each session holds a socket. Past the fd limit a new client's datagram cannot be sent
    on: it is counted in drops (never lost uncounted), the sessions already open go on, and
    once idle sessions end their fds serve the clients that were turned away."""
    with UdpEcho() as server, ChildForwarder.start([(spec(server.port), "udp", {"udp_idle_timeout": 2})],
                                                   nofile=NOFILE, workers=1) as child:
        (port,) = child.ports
        child.counters()    # the child's control side has all it needs before fds run out
        room = NOFILE - open_fds(child.pid)
        clients = [udp_socket() for _ in range(room + 5)]
        try:
            for i, sock in enumerate(clients):
                sock.sendto(b"client %d" % i, (LOOP4, port))
            counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] + c["drops"] >= len(clients)
                                and c, what="every datagram to be answered or dropped")
            assert (counters["datagrams_up"], counters["datagrams_down"], counters["drops"]) == (room, room, 5)
            served = [i for i, sock in enumerate(clients) if answered(sock, b"client %d" % i)]
            assert len(served) == room and len(server.received) == room
            turned_away = sorted(set(range(len(clients))) - set(served))
            # the open sessions still work; the others get in once those have ended
            assert udp_roundtrip(clients[served[0]], (LOOP4, port), b"still here") == b"still here"
            assert child.counters()[0]["sessions_created"] == room
            wait_for(lambda: child.counters()[0]["sessions_expired"] == room, what="the sessions to expire")
            for i in turned_away:
                assert udp_roundtrip(clients[i], (LOOP4, port), b"late %d" % i) == b"late %d" % i
            counters = child.counters()[0]
        finally:
            for sock in clients:
                sock.close()
    assert counters["sessions_created"] == room + len(turned_away)
    assert counters["drops"] == 5


def answered(sock: socket.socket, expected: bytes) -> bool:
    """Whether the reply ``expected`` is waiting on ``sock`` (nothing else may be)."""
    sock.setblocking(False)
    try:
        data = sock.recv(64)
    except BlockingIOError:
        return False
    finally:
        sock.settimeout(5)
    assert data == expected
    return True


def test_replies_come_only_from_the_target_address_and_port(fwd: SyncForwarder) -> None:
    """A session's socket is connected to the target: what another port or address sends to
    it (a service answering from a new port, as TFTP does; anyone guessing the session's port)
    never reaches the client, and the session goes on."""
    with udp_socket() as target, udp_socket() as other, udp_socket("127.0.0.2") as elsewhere:
        rule = fwd.forward(target.getsockname()[1], "udp")
        with udp_socket(timeout=0.5) as client:
            client.sendto(b"hello", (LOOP4, rule.port))
            _, session = target.recvfrom(64)
            other.sendto(b"from another port", session)
            elsewhere.sendto(b"from another address", session)
            target.sendto(b"from the target", session)
            assert client.recv(64) == b"from the target"
            with pytest.raises(TimeoutError):
                client.recv(64)
        counters = fwd.counters(rule)
    assert (counters.datagrams_up, counters.datagrams_down, counters.drops) == (1, 1, 0)


def test_a_client_whose_nat_mapping_changes_gets_a_new_session(fwd: SyncForwarder) -> None:
    """A client behind NAT whose mapping changes (a new source port) is a new client: its
    datagrams go on through a session of their own, and the old session, which the target may
    still answer through, ends at its idle timeout."""
    with udp_socket() as target:
        rule = fwd.forward(target.getsockname()[1], "udp", udp_idle_timeout=1)
        with udp_socket(timeout=5) as before, udp_socket(timeout=5) as after:
            before.sendto(b"first", (LOOP4, rule.port))
            data, old = target.recvfrom(64)
            after.sendto(b"rebound", (LOOP4, rule.port))
            data2, new = target.recvfrom(64)
            assert (data, data2) == (b"first", b"rebound") and old != new
            target.sendto(b"to the new mapping", new)
            target.sendto(b"to the old mapping", old)
            assert after.recv(64) == b"to the new mapping"
            assert before.recv(64) == b"to the old mapping"
            counters = fwd.wait_counter(rule, "sessions_expired", 2)
    assert (counters.sessions_created, counters.datagrams_up, counters.datagrams_down) == (2, 2, 2)


def test_a_burst_of_replies_many_batches_long_reaches_the_client_whole_and_in_order() -> None:
    """A target answering with far more datagrams than one batch (a DNS zone transfer over UDP,
    a game server's state burst) while the forwarder is busy: all are queued at the session's
    socket, and leave in batches, in order, each whole."""
    replies = [datagram(seq, 200 + seq % 800) for seq in range(600)]
    with udp_socket() as target, ChildForwarder.start([(spec(target.getsockname()[1]), "udp", {})],
                                                       workers=1) as child:
        (port,) = child.ports
        with udp_socket(timeout=5) as client:
            client.sendto(b"send me everything", (LOOP4, port))
            _, session = target.recvfrom(64)
            with frozen(child.pid):
                for d in replies:
                    target.sendto(d, session)
            assert [client.recv(2000) for _ in replies] == replies
        counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] >= len(replies) and c,
                            what="the replies to be counted")
    assert (counters["datagrams_down"], counters["bytes_down"], counters["drops"]) == \
        (len(replies), sum(map(len, replies)), 0)


def test_replies_already_on_their_way_survive_a_retarget(fwd: SyncForwarder) -> None:
    """The target moves while its answers are still queued at the session: they reach the
    client, and what the client sends next goes to the new target only."""
    replies = [datagram(seq, 100 + seq) for seq in range(50)]
    with udp_socket("127.0.0.2") as old, udp_socket("127.0.0.3", port=old.getsockname()[1]) as new:
        fwd.resolve("svc", "127.0.0.2")
        rule = fwd.add(make_rule(old.getsockname()[1], "udp", "svc", listen_host=LOOP4))
        with udp_socket(timeout=5) as client:
            client.sendto(b"question", (LOOP4, rule.port))
            _, session = old.recvfrom(64)
            for d in replies:
                old.sendto(d, session)
            fwd.resolve("svc", "127.0.0.3")
            assert [client.recv(1000) for _ in replies] == replies
            client.sendto(b"next question", (LOOP4, rule.port))
            assert new.recvfrom(64)[0] == b"next question"
            old.settimeout(0.2)
            with pytest.raises(TimeoutError):
                old.recvfrom(64)
        counters = fwd.counters(rule)
    assert (counters.sessions_created, counters.datagrams_up, counters.drops) == (1, 2, 0)


def test_a_client_sending_segmented_bursts_has_each_datagram_forwarded_whole(fwd: SyncForwarder) -> None:
    """A client sending with UDP_SEGMENT (QUIC stacks, bulk senders) hands the kernel one
    buffer that leaves as many datagrams: the target sees each, whole and in order."""
    segment, count = 1200, 40
    burst = [datagram(seq, segment) for seq in range(count - 1)] + [datagram(99, 500)]
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp")
        with udp_socket(timeout=5) as client:
            client.setsockopt(socket.IPPROTO_UDP, 103, segment)     # UDP_SEGMENT
            client.sendto(b"".join(burst), (LOOP4, rule.port))
            assert [client.recv(2000) for _ in burst] == burst
        (stream,) = server.received.values()
        assert stream == digests(burst)
    counters = fwd.wait_counter(rule, "datagrams_down", count)
    assert (counters.datagrams_up, counters.bytes_up, counters.drops) == (count, sum(map(len, burst)), 0)


def test_a_lowered_session_cap_applies_to_the_sessions_already_open(fwd: SyncForwarder) -> None:
    """A reload that lowers udp_max_sessions (to bound fds or memory) must bring the sessions
    down to the new cap, least recently active first. Only a new client's arrival evicted,
    one for one, so the count never came down."""
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", udp_max_sessions=16)
        clients = [udp_socket() for _ in range(10)]
        try:
            for i, sock in enumerate(clients):
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"c%d" % i) == b"c%d" % i
            fwd.apply([make_rule(server.port, "udp", listen_port=rule.port, udp_max_sessions=4)])
            counters = fwd.wait_counter(rule, "sessions_evicted", 6)
            assert counters.sessions_active == 4
            assert list(map(tuple, fwd.sessions(rule))) == [s.getsockname() for s in clients[6:]]
            # the newest still forward through the sessions they had
            assert udp_roundtrip(clients[9], (LOOP4, rule.port), b"still") == b"still"
            # 0 is no cap: the evicted come back and nothing more is evicted
            fwd.apply([make_rule(server.port, "udp", listen_port=rule.port, udp_max_sessions=0)])
            for i, sock in enumerate(clients[:6]):
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"back %d" % i) == b"back %d" % i
            counters = fwd.counters(rule)
        finally:
            for sock in clients:
                sock.close()
    assert (counters.sessions_created, counters.sessions_evicted, counters.sessions_active) == (16, 6, 10)


def test_replies_waiting_on_an_evicted_session_count_as_drops() -> None:
    """At the session cap a new client evicts the least recently active session. Replies
    already waiting on its socket go with it: they were lost uncounted."""
    with udp_socket(LOOP4) as target, ChildForwarder.start(
            [(spec(target.getsockname()[1]), "udp", {"udp_max_sessions": 1})], workers=1) as child:
        (port,) = child.ports
        with udp_socket(LOOP4) as first, udp_socket(LOOP4) as second:
            first.sendto(b"first", (LOOP4, port))
            _, first_session = target.recvfrom(64)
            with frozen(child.pid):     # one batch: the new client is read before the replies
                second.sendto(b"second", (LOOP4, port))
                for seq in range(3):
                    target.sendto(datagram(seq, 100), first_session)
            data, second_session = target.recvfrom(64)
            assert data == b"second"
            target.sendto(b"after", second_session)
            assert second.recv(64) == b"after"
            first.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                raise AssertionError(f"the evicted client got {first.recv(200)!r}")
            counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] and c,
                                what="the reply to be counted")
    assert (counters["sessions_evicted"], counters["datagrams_down"], counters["drops"]) == (1, 1, 3), counters


def test_idle_sessions_among_thousands_expire_and_busy_ones_stay(fwd: SyncForwarder) -> None:
    """2,000 sessions, half of them kept busy by their clients: exactly the quiet half expires,
    and the busy half keeps the sessions (and upstream ports) it had."""
    n = 2000
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", udp_idle_timeout=1.5)
        clients = [udp_socket(bufsize=1 << 16) for _ in range(n)]
        busy = clients[::2]
        try:
            for i, sock in enumerate(clients):
                sock.sendto(b"c%d" % i, (LOOP4, rule.port))
            fwd.wait_counter(rule, "datagrams_down", n)
            for _ in range(16):    # 3.2 s: each busy client sends every 0.2 s
                for sock in busy:
                    sock.sendto(b"tick", (LOOP4, rule.port))
                time.sleep(0.2)
            counters = fwd.wait_counter(rule, "sessions_expired", n // 2)
            assert {tuple(a) for a in fwd.sessions(rule)} == {s.getsockname() for s in busy}
            assert (counters.sessions_created, counters.sessions_active) == (n, n // 2)
        finally:
            for sock in clients:
                sock.close()
    assert len(server.received) == n, "a busy client moved to another session"


def link_local(lab: Lab, ns: str, dev: str) -> str:
    """The link-local address of ``dev`` in ``ns``, once duplicate address detection is done."""
    shown = ["ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link", "-tentative"]
    listed = wait_for(lambda: lab.run(ns, shown).stdout.split("inet6 ")[1:], what=f"{dev}'s link-local address")
    return listed[0].split("/")[0]


@pytest.mark.root
def test_wildcard_listeners_answer_a_lan_client_from_the_address_it_used() -> None:
    """A forwarder's host with two addresses of each family on its LAN link (a namespace of
    our own, the client in another, joined by a veth): whichever address the client asks,
    the subnet's broadcast or the link-local one included, the answer comes from the address
    the client expects, over the link. A link-local address asked from a global one (a
    client whose own link-local address is not ready yet) was answered from the link-local
    address with no interface named, which the kernel cannot route: the reply was dropped."""
    with lab_namespace("udplan") as (lab, host):
        client_ns = lab.netns("udpcli")
        lab.veth(host, "lan0", client_ns, "eth0")
        for ns, dev, addrs in ((host, "lan0", ("10.9.0.1/24", "10.9.0.2/24", "fd00:9::1/64", "fd00:9::2/64")),
                               (client_ns, "eth0", ("10.9.0.9/24", "fd00:9::9/64"))):
            for addr in addrs:
                lab.run(ns, ["ip", "addr", "add", addr, "dev", dev, *(("nodad",) if ":" in addr else ())])
        host_ll, client_ll = link_local(lab, host, "lan0"), link_local(lab, client_ns, "eth0")
        eth0 = lab.call(client_ns, socket.if_nametoindex, "eth0")
        server4, server6 = lab.call(host, UdpEcho, LOOP4), lab.call(host, UdpEcho, LOOP6)
        fwd = lab.call(host, SyncForwarder, 1)
        clients = [lab.call(client_ns, udp_socket, *where) for where in (("0.0.0.0",), ("fd00:9::9",))]
        clients.append(lab.call(client_ns, socket.socket, socket.AF_INET6, socket.SOCK_DGRAM))
        try:
            c4, c6, c6_link = clients
            c4.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            c6_link.bind((client_ll, 0, 0, eth0))
            c6_link.settimeout(5)
            v4 = fwd.add(make_rule(server4.port, "udp", listen_host="0.0.0.0"))
            v6 = fwd.add(make_rule(server6.port, "udp", LOOP6, listen_host="::", listen_port=v4.port))
            port = v4.port
            asks = [(c4, ("10.9.0.2", port), "10.9.0.2"), (c4, ("10.9.0.1", port), "10.9.0.1"),
                    (c4, ("10.9.0.255", port), "10.9.0.1"), (c6, ("fd00:9::2", port), "fd00:9::2"),
                    (c6, ("fd00:9::1", port), "fd00:9::1"), (c6_link, (host_ll, port, 0, eth0), host_ll),
                    (c6, (host_ll, port, 0, eth0), host_ll)]
            for n, (sock, to, expected) in enumerate(asks):
                message = b"ask %d" % n
                sock.sendto(message, to)
                data, source = sock.recvfrom(64)
                assert (data, source[:2]) == (message, (expected, port)), f"asked {to[0]}"
            c4_counters = fwd.wait_counter(v4, "datagrams_down", 3)
            c6_counters = fwd.wait_counter(v6, "datagrams_down", 4)
        finally:
            for sock in clients:
                sock.close()
            fwd.close()
            server4.close()
            server6.close()
    # one session per local address asked; the broadcast is answered as the primary address
    assert (c4_counters.datagrams_down, c4_counters.sessions_created, c4_counters.drops) == (3, 2, 0)
    assert (c6_counters.datagrams_down, c6_counters.sessions_created, c6_counters.drops) == (4, 4, 0)


@pytest.mark.root
def test_datagrams_bigger_than_a_narrower_link_on_the_way_go_on_once_the_path_is_known() -> None:
    """Between the forwarder and the target a router's next link carries 1280 bytes. The first
    1400-byte datagram goes out whole (don't fragment) and is lost there; the router's ICMP
    'fragmentation needed' tells the session's socket the path's size and leaves EMSGSIZE on
    it for the next send (another client's datagram in between, all read in one batch). That
    send failed and the whole run of datagrams it led was dropped, uncounted; now it is tried
    again and leaves in fragments, as every one after it, and the error is counted."""
    big = [datagram(seq, 1400 + seq) for seq in range(5)]
    with lab_namespace("udpfwd") as (lab, fwd_ns):
        router, far = lab.netns("udprtr"), lab.netns("udptgt")
        lab.veth(fwd_ns, "a0", router, "r0")
        lab.veth(router, "r1", far, "t0")
        for ns, commands in ((fwd_ns, ["addr add 10.7.1.1/24 dev a0", "route add 10.7.2.0/24 via 10.7.1.2"]),
                             (router, ["addr add 10.7.1.2/24 dev r0", "addr add 10.7.2.1/24 dev r1",
                                       "link set r1 mtu 1280"]),
                             (far, ["addr add 10.7.2.2/24 dev t0", "link set t0 mtu 1280",
                                    "route add default via 10.7.2.1"])):
            for command in commands:
                lab.run(ns, ["ip", *command.split()])
        lab.run(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        server = lab.call(far, UdpEcho, "10.7.2.2")
        clients = [lab.call(fwd_ns, udp_socket, LOOP4) for _ in range(2)]
        try:
            with ChildForwarder.start([(spec(server.port, "10.7.2.2", listen_host=LOOP4), "udp", {})], workers=1,
                                      wrapper=tuple(Lab.argv(fwd_ns, []))) as child:
                (port,) = child.ports
                a, b = clients
                with frozen(child.pid):
                    a.sendto(big[0], (LOOP4, port))
                    b.sendto(b"small", (LOOP4, port))
                    for d in big[1:]:
                        a.sendto(d, (LOOP4, port))
                assert b.recv(100) == b"small"
                assert [a.recv(2000) for _ in big[1:]] == big[1:]
                assert sorted(server.received.values()) == sorted([digests(big[1:]), digests([b"small"])])
                counters = wait_for(lambda: (c := child.counters()[0])["datagrams_down"] >= len(big) and c,
                                    what="the replies to be counted")
        finally:
            for sock in clients:
                sock.close()
            server.close()
    assert (counters["datagrams_up"], counters["drops"], counters["connect_failed"]) == (len(big) + 1, 0, 1), counters


def test_a_rule_to_a_broadcast_address_delivers(fwd: SyncForwarder) -> None:
    """Wake-on-LAN relayed onto a LAN: the target is the network's broadcast address. The
    session's socket could not connect to it (broadcast needs SO_BROADCAST), so every datagram
    was dropped. The loopback network's broadcast stands in for a LAN's."""
    with udp_socket("127.255.255.255") as receiver:
        rule = fwd.forward(receiver.getsockname()[1], "udp", "127.255.255.255", listen_host=LOOP4)
        magic = b"\xff" * 6 + bytes.fromhex("525400123456") * 16
        with udp_socket() as client:
            client.sendto(magic, (LOOP4, rule.port))
            assert receiver.recv(200) == magic
        counters = fwd.wait_counter(rule, "datagrams_up", 1)
    assert (counters.datagrams_up, counters.bytes_up, counters.drops) == (1, len(magic), 0)


@pytest.mark.parametrize("spec_text", [
    "127.0.0.1:5353:127.0.0.1:5353", "5353:127.0.0.1:5353", "0.0.0.0:5353:127.0.0.1:5353",
    "[::]:5353:[::1]:5353", "[::1]:5353:[::1]:5353", "127.0.0.1:5000-5009:127.0.0.1:5009-5018",
    "127.0.0.1:5353:0.0.0.0:5353"])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_a_rule_onto_its_own_listener_is_refused(spec_text: str, proto: str) -> None:
    """``-u 5353:127.0.0.1:5353`` forwards to itself: one datagram went round and round
    (about 230,000 times a second, a worker busy for good, a session per lap until the
    cap); a TCP connection would connect to itself until the fds ran out. Refused where the
    rule comes in, with one line."""
    with pytest.raises(SpecError, match="rule.s own listener"):
        Rule.parse(spec_text, proto)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec_text", ["127.0.0.1:5353:127.0.0.2:5353", "5353:127.0.0.1:53",
                                       "0.0.0.0:5353:10.0.0.1:5353", "127.0.0.1:5000-5009:127.0.0.1:5010-5019",
                                       "[::]:5353:127.0.0.1:5353"])
def test_rules_near_their_own_listener_are_taken(spec_text: str) -> None:
    assert Rule.parse(spec_text, "udp").target_port in (53, 5010, 5353)


def test_the_command_line_refuses_a_forward_onto_itself_with_one_line() -> None:
    result = run_cli("run", "-u", "5353:127.0.0.1:5353")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "rule's own listener" in result.stderr, result.stderr
