"""UDP forwarding as the services behind it meet it: a broadcast discovery query on a wildcard
listener, a datagram too big for the target's family among good ones, a target behind a
firewall that rejects some datagrams, a target answering from another port, a client whose
NAT mapping changes, and more clients than the forwarder has fds for."""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from fastfwd.host.lab import Lab
from netutil import (LOOP4, LOOP6, ChildForwarder, Received, SyncForwarder, UdpEcho, datagram, make_rule, open_fds,
                     spec, udp_roundtrip, udp_socket, wait_for)
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
            lab.run(ns, ["nft", f"add table ip fw; add chain ip fw in {{ type filter hook input priority 0; }}; "
                         f"add rule ip fw in udp dport {server.port} udp length {8 + rejected_size} "
                         f"reject with icmp type admin-prohibited"])
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
