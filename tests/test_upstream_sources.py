"""Upstream connections spread over a pool of local source addresses (``source`` option)."""
from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter

import pytest

import fastfwd
from netutil import LOOP4, SyncForwarder, TcpServer, UdpEcho, connect, udp_roundtrip, udp_socket

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
