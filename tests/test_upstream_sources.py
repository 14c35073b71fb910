"""Upstream connections spread over a pool of local source addresses (``source`` option)."""
from __future__ import annotations

import socket
from collections import Counter

from netutil import SyncForwarder, TcpServer, connect

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


def test_without_a_pool_the_kernel_picks_the_source(fwd: SyncForwarder) -> None:
    with TcpServer(peer_address) as server:
        rule = fwd.forward(server.port)
        with connect(rule.port) as client:
            assert client.recv(2) == b"ok"
        assert server.result() == "127.0.0.1"


def test_a_pool_of_the_other_family_is_not_used(fwd: SyncForwarder) -> None:
    # An IPv6 source cannot bind an IPv4 upstream: the connection still goes out, from the
    # kernel's choice, instead of failing.
    with TcpServer(peer_address) as server:
        rule = fwd.forward(server.port, source=("::1",))
        with connect(rule.port) as client:
            assert client.recv(2) == b"ok"
        assert server.result() == "127.0.0.1"
