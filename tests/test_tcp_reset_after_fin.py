"""A reset on a TCP leg already read to its FIN: no read will report it, so it must reach
the other peer at once, even when that peer is idle."""
from __future__ import annotations

import select
import socket
import threading

import pytest

from netutil import (SPLICE_MODES, TIMEOUT, Received, SyncForwarder, TcpServer, connect, drain, payload,
                     reset, send_stream)

REQUEST = b"GET / HTTP/1.0\r\n\r\n"


def ended_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Wait (bounded) for the peer to tear the connection down: POLLHUP or POLLERR. A socket
    that only got a FIN stays readable (EOF) and writable, which polling for 0 ignores."""
    poller = select.poll()
    poller.register(sock, 0)  # report only hang-ups and errors
    return bool(poller.poll(timeout * 1000))


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_client_reset_after_its_fin_reaches_the_idle_server(fwd: SyncForwarder, splice: str) -> None:
    """The client sends a request and its FIN, then resets while the server is still
    thinking (sending nothing). The relay has finished reading the client, but the reset
    must still reach the server, not wait for the server to write or for a timeout."""
    got_request = threading.Event()

    def think(conn: socket.socket) -> tuple[Received, bool]:
        request = drain(conn)
        got_request.set()
        return request, ended_by_peer(conn)

    with TcpServer(think) as server:
        rule = fwd.forward(server.port, splice=splice)
        sock = connect(rule.port)
        sock.sendall(REQUEST)
        sock.shutdown(socket.SHUT_WR)
        assert got_request.wait(TIMEOUT)
        reset(sock)
        request, torn_down = server.result()
    assert request == Received.of(REQUEST)
    assert torn_down, "the server's leg stayed open after the client's reset"


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_server_reset_after_its_fin_reaches_the_idle_client(fwd: SyncForwarder, splice: str) -> None:
    """Mirror image: the server sends a greeting and its FIN, then resets while the client is
    quiet. The reset must reach the client."""
    greeting = payload(200_000, seed=3)
    read_all = threading.Event()

    def greet_then_reset(conn: socket.socket) -> None:
        send_stream(conn, greeting)
        if read_all.wait(TIMEOUT):
            reset(conn)

    with TcpServer(greet_then_reset) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            assert drain(sock) == Received.of(greeting)
            read_all.set()
            server.result()
            assert ended_by_peer(sock), "the client's leg stayed open after the server's reset"
