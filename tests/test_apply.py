"""Applying a rule set is all or nothing: a step that fails undoes the steps before it."""
from __future__ import annotations

import socket

import pytest

import fastfwd
from netutil import (LOOP4, LOOP6, SyncForwarder, TcpServer, closed_how, connect, echo_handler, echo_once,
                     free_port_range, turned_away)


def greeting(word: bytes):
    def handler(conn: socket.socket) -> None:
        conn.sendall(word)
    return handler


def greeting_at(port: int) -> bytes:
    with connect(port) as sock:
        return sock.recv(16)


def rule(listen: str, target_port: int, **options: object) -> fastfwd.Rule:
    return fastfwd.Rule.parse(f"{listen}:{LOOP4}:{target_port}", options=fastfwd.RuleOptions(**options))


def test_failed_apply_leaves_every_rule_as_it_was(fwd: SyncForwarder) -> None:
    with TcpServer(greeting(b"a")) as a, TcpServer(greeting(b"b")) as b:
        base = free_port_range(3)
        moved, kept = f"{base}", f"{base + 2}"
        fwd.apply([rule(moved, a.port), rule(kept, a.port)])
        # The new rule takes over `moved` and the port after it, which someone else holds:
        # it can only be bound after the old rule is gone, and then it fails.
        with socket.create_server((LOOP4, base + 1)):
            grown = fastfwd.Rule.parse(f"{base}-{base + 1}:{LOOP4}:{a.port}-{a.port + 1}")
            with pytest.raises(OSError, match=f"port {base + 1} on 127.0.0.1 is already in use"):
                fwd.apply([grown, rule(kept, b.port)])
        # The removed rule is back, the re-pointed one points where it did.
        assert greeting_at(base) == b"a"
        assert greeting_at(base + 2) == b"a"
        assert sorted(str(r.rule) for r in fwd.fw.rules) == sorted(
            [str(rule(moved, a.port)), str(rule(kept, a.port))])


def test_port_zero_rules_continue_across_apply(fwd: SyncForwarder) -> None:
    with TcpServer(greeting(b"a")) as a:
        anywhere = rule("0", a.port)
        first = fwd.apply([anywhere, anywhere])      # the same rule twice: two ports
        assert len(first.added) == 2 and first.added[0].port != first.added[1].port
        again = fwd.apply([anywhere, anywhere])
        assert not again.changed and len(again.unchanged) == 2
        assert {r.port for r in again.unchanged} == {r.port for r in first.added}
        assert all(greeting_at(r.port) == b"a" for r in again.unchanged)


def test_a_retarget_that_fails_to_listen_is_undone_too(fwd: SyncForwarder) -> None:
    # A pending TCP rule keeps its port bound but not listening. Linux lets another socket
    # with SO_REUSEADDR bind and listen there meanwhile; the rule then cannot listen again.
    with TcpServer(greeting(b"a")) as a, TcpServer(greeting(b"b")) as b:
        port = free_port_range(1)
        pending = fastfwd.Rule.parse(f"{port}:vm1:{a.port}")
        other = rule(f"{port + 1}", a.port)
        fwd.apply([pending, other])
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind((LOOP4, port))
            squatter.listen()
            live = fastfwd.Rule.parse(f"{port}:{LOOP4}:{b.port}", options=fastfwd.RuleOptions(idle_timeout=5.0))
            with pytest.raises(OSError):
                fwd.apply([live, rule(f"{port + 1}", b.port)])
            assert sorted(str(r.rule) for r in fwd.fw.rules) == sorted([str(pending), str(other)])
            assert fwd.fw.find(pending).rule.options == pending.options
        assert greeting_at(port + 1) == b"a"
        fwd.resolve("vm1", LOOP4)       # the squatter is gone: the rule can listen again
        assert greeting_at(port) == b"a"


def test_a_narrower_allow_or_cap_turns_away_new_connections_and_keeps_live_ones(fwd: SyncForwarder) -> None:
    # Both are checked as a client connects (docs/config.md, Reloading): a live connection
    # admitted before runs on, a new one is turned away and counted.
    with TcpServer(echo_handler) as server:
        port = free_port_range(1)
        active = fwd.apply([rule(f"{port}", server.port)]).added[0]
        with connect(port) as live:
            assert echo_once(live, b"before") == b"before"
            for narrower in ({"allow": ["10.0.0.0/8"]}, {"max_connections": 1}):
                fwd.apply([rule(f"{port}", server.port, **narrower)])
                assert turned_away(port)
                assert echo_once(live, b"still") == b"still"
        assert fwd.counters(active).refused == 2


def test_a_target_address_written_another_way_is_the_same_target(fwd: SyncForwarder) -> None:
    # A config tool may render [::1] as [0:0::1]: the same address, so live connections stay
    # even with on_retarget = "close", and nothing counts as re-pointed.
    with TcpServer(echo_handler, host=LOOP6) as server:
        port = free_port_range(1)
        fwd.apply([fastfwd.Rule.parse(f"{port}:[::1]:{server.port}",
                                      options=fastfwd.RuleOptions(on_retarget="close"))])
        with connect(port) as live:
            assert echo_once(live, b"before") == b"before"
            diff = fwd.apply([fastfwd.Rule.parse(f"{port}:[0:0::1]:{server.port}",
                                                 options=fastfwd.RuleOptions(on_retarget="close"))])
            assert not diff.retargeted and len(diff.unchanged) == 1
            assert echo_once(live, b"still") == b"still"


def test_a_lowered_idle_timeout_reaches_live_connections(fwd: SyncForwarder) -> None:
    # docs/config.md, Reloading: live connections take the new timeouts, not only new ones.
    with TcpServer(echo_handler) as server:
        port = free_port_range(1)
        fwd.apply([rule(f"{port}", server.port)])
        with connect(port) as live:
            assert echo_once(live, b"before") == b"before"
            fwd.apply([rule(f"{port}", server.port, idle_timeout=0.5)])
            assert closed_how(live, timeout=10) == "reset"
