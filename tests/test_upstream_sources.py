"""Upstream connections spread over a pool of local source addresses (``source`` option)."""
from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter

import pytest

import fastfwd
from netutil import LOOP4, SyncForwarder, TcpServer, UdpEcho, connect, free_port_range, udp_roundtrip, udp_socket

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def peer_address(conn: socket.socket) -> str:
    conn.sendall(b"ok")
    return conn.getpeername()[0]


def test_upstream_connections_rotate_over_the_source_pool(fwd: SyncForwarder) -> None:
    with TcpServer(peer_address) as server:
        rule = fwd.forward(server.port, source=SOURCES)
        for _ in range(9):
            with connect(rule.port) as client:
                assert client.recv(2) == b"ok"
        seen = Counter(server.result() for _ in range(9))
    # Each of the two workers rotates on its own from the first address; whichever took at
    # least three of the nine connections went through the whole pool.
    assert set(seen) == set(SOURCES), seen


def test_udp_sessions_rotate_over_the_source_pool(fwd: SyncForwarder) -> None:
    with UdpEcho() as server:
        rule = fwd.forward(server.port, "udp", source=SOURCES)
        # Six sessions: the sockets stay open, so no client port comes round again and finds
        # the session of an earlier one.
        with contextlib.ExitStack() as stack:
            for i in range(6):
                sock = stack.enter_context(udp_socket())
                assert udp_roundtrip(sock, (LOOP4, rule.port), b"%d" % i) == b"%d" % i
        seen = Counter(address for address, _ in list(server.received))
    assert seen == Counter({source: 2 for source in SOURCES})  # a UDP rule has one worker


def test_without_a_pool_the_kernel_picks_the_source(fwd: SyncForwarder) -> None:
    with TcpServer(peer_address) as server:
        rule = fwd.forward(server.port)
        with connect(rule.port) as client:
            assert client.recv(2) == b"ok"
        assert server.result() == "127.0.0.1"


def test_a_name_whose_family_the_pool_lacks_still_connects_and_warns(
        fwd: SyncForwarder, caplog: pytest.LogCaptureFixture) -> None:
    # A pool of the other family than an address target is refused when the rule is made;
    # a name learns its family later, and then its connections leave from the kernel's choice.
    with TcpServer(peer_address, "::1") as server, caplog.at_level(logging.WARNING, "fastfwd"):
        rule = fwd.add(fastfwd.Rule.parse(f"0:vm1:{server.port}", options=fastfwd.RuleOptions(source=("127.0.0.2",))))
        fwd.resolve("vm1", "::1")
        with connect(rule.port) as client:
            assert client.recv(2) == b"ok"
        assert server.result() == "::1"
    assert "no IPv6 address in its source pool" in caplog.text


def test_a_loopback_source_toward_a_target_off_this_host_warns_once(
        fwd: SyncForwarder, caplog: pytest.LogCaptureFixture) -> None:
    """The kernel does not route from 127.x off the host, so each connection would fail: the
    rule still starts (a target that is this host's own address works), with one warning."""
    loopback = fastfwd.RuleOptions(source=("127.0.0.2", "127.0.0.3"))
    with caplog.at_level(logging.WARNING, "fastfwd"):
        fwd.add(fastfwd.Rule.parse("0:127.0.0.1:9", options=loopback))
        fwd.add(fastfwd.Rule.parse("0:vm1:9", options=loopback))
        fwd.resolve("vm1", "127.0.0.5")
        assert not caplog.records
        fwd.add(fastfwd.Rule.parse("0:192.0.2.1:9", name="far", options=loopback))
        fwd.add(fastfwd.Rule.parse("0:vm2:9", name="far-name", options=loopback))
        fwd.resolve("vm2", "192.0.2.2")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    for rule, target in (("'far'", "192.0.2.1"), ("'far-name'", "192.0.2.2")):
        assert [m for m in warned if m.startswith(rule + ":") and target in m and "127.0.0.2, 127.0.0.3" in m
                and "cannot leave this host from a loopback address" in m], (rule, warned)


def test_a_reload_giving_a_rule_a_loopback_source_toward_a_target_off_this_host_warns(
        fwd: SyncForwarder, caplog: pytest.LogCaptureFixture) -> None:
    spec = f"{free_port_range(1)}:192.0.2.1:9"
    fwd.apply([fastfwd.Rule.parse(spec)])
    with caplog.at_level(logging.WARNING, "fastfwd"):
        diff = fwd.apply([fastfwd.Rule.parse(spec, options=fastfwd.RuleOptions(source=("127.0.0.2",)))])
    assert len(diff.reconfigured) == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "source 127.0.0.2 is loopback but the target 192.0.2.1 is not" in warned[0], warned
