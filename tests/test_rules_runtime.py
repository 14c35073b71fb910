"""Changing rules while traffic flows: removing one closes its listener and leaves every other
connection alone; adding one loses nothing; re-pointing a rule moves new connections and
UDP sessions but keeps live TCP connections where they are."""
from __future__ import annotations

import dataclasses
import os
import socket
import threading

import pytest
from pyroute2 import IPRoute

import fastfwd
from fastfwd.host.lab import Lab
from netutil import (LOOP4, TIMEOUT, Progress, Received, SyncForwarder, TcpServer, UdpEcho, closed_how,
                     connect, echo_handler, echo_once, exchange, exchange_handler, free_port_range,
                     is_refused, make_rule, payload, spawn, turned_away, udp_roundtrip, udp_socket, wait_for)

MB = 1 << 20


def test_remove_closes_the_listener_and_keeps_live_connections_by_default(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port)
        with connect(rule.port) as sock:
            assert echo_once(sock, b"before") == b"before"
            fwd.remove(rule)
            assert is_refused(rule.port)
            assert echo_once(sock, b"after removal") == b"after removal"


def test_remove_with_close_policy_ends_live_connections(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, on_remove="close")
        with connect(rule.port) as sock:
            assert echo_once(sock, b"before") == b"before"
            fwd.remove(rule)
            assert closed_how(sock) in ("eof", "reset")


def run_gated_transfers(fwd: SyncForwarder, n: int, size: int, change) -> None:
    """Start ``n`` two-way transfers of ``size`` bytes each way through one rule; once every
    one of them is halfway in both directions, call ``change()``; then let them finish and
    check every byte at both ends."""
    gate = threading.Event()
    down = payload(size, seed=20)
    ups = [payload(size, seed=30 + i) for i in range(n)]
    with TcpServer(exchange_handler(down, gate)) as server:
        rule = fwd.forward(server.port)
        progress = [Progress() for _ in range(n)]
        clients = [spawn(exchange, rule.port, up, LOOP4, gate, p) for up, p in zip(ups, progress)]
        try:
            wait_for(lambda: all(p.nbytes >= size // 2 for p in progress)
                     and fwd.counters(rule).bytes_up >= n * (size // 2),
                     what="every transfer to be halfway")
            change()
            assert all(c.is_alive() for c in clients), "a transfer ended before the gate opened"
        finally:
            gate.set()
        for client in clients:
            assert client.result(60) == Received.of(down)
        assert sorted(server.result() for _ in range(n)) == sorted(Received.of(up) for up in ups)
    counters = fwd.wait_counter(rule, "bytes_down", n * size)
    assert counters.bytes_up == n * size


def test_removing_a_rule_leaves_other_rules_transfers_intact(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as other_server:
        other = fwd.forward(other_server.port)
        bystander = connect(other.port)
        try:
            assert echo_once(bystander, b"b") == b"b"

            def remove_other() -> None:
                fwd.remove(other)
                assert is_refused(other.port)

            run_gated_transfers(fwd, 1, 32 * MB, remove_other)
        finally:
            bystander.close()


def test_adding_a_rule_while_eight_transfers_run_loses_nothing(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as other_server:
        added: list[fastfwd.ActiveRule] = []

        def add_one() -> None:
            added.append(fwd.forward(other_server.port))
            with connect(added[0].port) as sock:
                assert echo_once(sock, b"new rule") == b"new rule"

        run_gated_transfers(fwd, 8, 8 * MB, add_one)
        assert fwd.counters(added[0]).accepted == 1


def test_rule_churn_does_not_disturb_other_rules_new_connections(fwd: SyncForwarder) -> None:
    """While rules come and go next to it, a rule keeps accepting: none of a stream of new
    connections (some waiting in its accept queue during the changes) is refused or dropped."""
    with TcpServer(echo_handler) as server:
        steady = fwd.forward(server.port)
        stop = threading.Event()

        def churn() -> int:
            rounds = 0
            while not stop.is_set() and rounds < 500:
                fwd.remove(fwd.forward(server.port))
                rounds += 1
            return rounds

        churner = spawn(churn)
        try:
            for i in range(200):
                with connect(steady.port) as sock:
                    assert echo_once(sock, b"conn %d" % i) == b"conn %d" % i
        finally:
            stop.set()
        assert churner.result() > 0
    assert fwd.counters(steady).accepted == 200


def test_apply_touches_only_what_changed(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        base = free_port_range(2)
        a, b = (make_rule(server.port, listen_port=base + i) for i in range(2))
        assert [x.rule for x in fwd.apply([a]).added] == [a]
        with connect(base) as on_a:
            assert echo_once(on_a, b"one") == b"one"
            diff = fwd.apply([a, b])
            assert ([x.rule for x in diff.added], [x.rule for x in diff.unchanged]) == ([b], [a])
            assert not diff.removed
            assert echo_once(on_a, b"untouched") == b"untouched"
            with connect(base + 1) as on_b:
                assert echo_once(on_b, b"two") == b"two"
            diff = fwd.apply([b])
            assert [x.rule for x in diff.removed] == [a]
            assert is_refused(base)
            assert echo_once(on_a, b"still alive") == b"still alive"


def tell_address(conn: socket.socket) -> None:
    """Handler: say which address the server listens on, then echo until EOF."""
    conn.sendall(conn.getsockname()[0].encode().ljust(16))
    echo_handler(conn)


def test_retarget_moves_new_connections_and_keeps_live_ones(fwd: SyncForwarder) -> None:
    with TcpServer(tell_address, "127.0.0.1") as one, TcpServer(tell_address, "127.0.0.2", one.port):
        rule = fwd.add(make_rule(one.port).with_target("vm1"))
        assert rule.pending
        assert turned_away(rule.port)  # pending
        fwd.resolve("vm1", "127.0.0.1")
        with connect(rule.port) as old:
            assert old.recv(16).strip() == b"127.0.0.1"
            fwd.resolve("vm1", "127.0.0.2")
            with connect(rule.port) as new:
                assert new.recv(16).strip() == b"127.0.0.2"
            assert echo_once(old, b"kept") == b"kept"


def test_retarget_with_close_policy_resets_live_connections(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler, "127.0.0.1") as one, TcpServer(echo_handler, "127.0.0.2", one.port):
        rule = fwd.add(make_rule(one.port, on_retarget="close").with_target("vm1"))
        fwd.resolve("vm1", "127.0.0.1")
        with connect(rule.port) as old:
            assert echo_once(old, b"old") == b"old"
            fwd.resolve("vm1", "127.0.0.2")
            assert closed_how(old) in ("eof", "reset")
        with connect(rule.port) as new:
            assert echo_once(new, b"new") == b"new"


def test_retarget_moves_udp_sessions_at_once(fwd: SyncForwarder) -> None:
    with UdpEcho("127.0.0.1") as one, UdpEcho("127.0.0.2", one.port) as two:
        rule = fwd.add(make_rule(one.port, "udp").with_target("vm1"))
        fwd.resolve("vm1", "127.0.0.1")
        with udp_socket(timeout=TIMEOUT) as sock:
            assert udp_roundtrip(sock, (LOOP4, rule.port), b"first") == b"first"
            fwd.resolve("vm1", "127.0.0.2")
            assert udp_roundtrip(sock, (LOOP4, rule.port), b"second") == b"second"
        assert (one.total, two.total) == (1, 1), "the session kept sending to the old target"


def test_an_option_change_leaves_udp_sessions_on_their_socket(fwd: SyncForwarder) -> None:
    with UdpEcho() as echo:
        rule = fwd.add(make_rule(echo.port, "udp"))
        with udp_socket(timeout=TIMEOUT) as sock:
            assert udp_roundtrip(sock, (LOOP4, rule.port), b"first") == b"first"
            fwd.apply([dataclasses.replace(rule.bound, options=fastfwd.RuleOptions(udp_idle_timeout=30.0))])
            assert udp_roundtrip(sock, (LOOP4, rule.port), b"second") == b"second"
        assert [len(v) for v in echo.received.values()] == [2], "the target saw the session change source"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_a_retargeted_udp_session_sends_from_the_address_that_reaches_its_new_target() -> None:
    # In a namespace of our own, 10.77.0.1 sits on a veth: a socket that reaches it leaves
    # from 10.77.0.1, one that reaches 127.0.0.1 from 127.0.0.1.
    with Lab() as lab:
        ns = lab.netns("udpsrc")
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname="v0", kind="veth", peer="v1")
            index = ipr.link_lookup(ifname="v0")[0]
            ipr.addr("add", index=index, address="10.77.0.1", prefixlen=24)
            ipr.link("set", index=index, state="up")
        one = lab.call(ns, UdpEcho, "127.0.0.1")
        two = lab.call(ns, UdpEcho, "10.77.0.1", one.port)
        fwd = lab.call(ns, SyncForwarder, 1)
        try:
            rule = fwd.add(make_rule(one.port, "udp").with_target("vm1"))
            fwd.resolve("vm1", "127.0.0.1")
            with lab.socket(ns, kind=socket.SOCK_DGRAM) as sock:
                sock.settimeout(TIMEOUT)
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"first") == b"first"
                fwd.resolve("vm1", "10.77.0.1")
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"second") == b"second"
            assert [source[0] for source in two.received] == ["10.77.0.1"]
        finally:
            fwd.close()
            one.close()
            two.close()


def test_new_options_mid_transfer_lose_no_byte_and_apply_to_new_connections(fwd: SyncForwarder) -> None:
    """Reconfiguring a rule while it moves data (spliced, then copied from here on; a cap on
    connections below the number live) cuts no live connection and loses no byte, and the
    cap holds for the next connection."""
    def reconfigure() -> None:
        (active,) = fwd.fw.rules
        options = fastfwd.RuleOptions(splice="never", max_connections=1, idle_timeout=600.0)
        diff = fwd.apply([dataclasses.replace(active.bound, options=options)])
        assert diff.reconfigured == [active] and not diff.added and not diff.removed
        assert turned_away(active.port)
        assert fwd.counters(active).refused == 1

    run_gated_transfers(fwd, 2, 16 * MB, reconfigure)
