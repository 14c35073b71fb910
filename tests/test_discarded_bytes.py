"""Bytes a reset throws away are counted: ``bytes_discarded`` is exactly what one peer's kernel
acknowledged that the other peer never got."""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Callable

import pytest

from netutil import SyncForwarder, payload, refusing_port, turned_away, wait_for
from test_wire_edges import drain_until_reset, listening, slow_client_legs


def unacked(sock: socket.socket) -> int:
    """Bytes in the socket's send queue its peer has not acknowledged (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def fill(sock: socket.socket, data: bytes) -> tuple[int, bool]:
    """Send without blocking until the socket takes no more, or is reset: how many bytes it
    took, and whether it was reset (the kernel keeps a reset socket's count of unacknowledged
    bytes, so the first is exact either way)."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + (1 << 20)])
        except BlockingIOError:
            break
        except ConnectionResetError:
            return sent, True
    return sent, False


def flood_until_stalled(sock: socket.socket, data: bytes, passed_on: Callable[[], int]) -> int:
    """Send ``data`` on the non-blocking ``sock`` until the path stalls: still for a moment,
    nothing more taken, acknowledged or passed on (``passed_on``: a forwarder's byte count).
    Returns how many bytes the socket took."""
    sent, last = [0], [(-1, -1, -1)]

    def stalled() -> bool:
        took, was_reset = fill(sock, data[sent[0]:])
        assert not was_reset, "reset before the path filled up"
        sent[0] += took
        now = (sent[0], unacked(sock), passed_on())
        still, last[0] = now == last[0], now
        return still
    wait_for(stalled, interval=0.2, what="the path to fill up")
    assert sent[0] < len(data), "the flood was taken whole: nothing would stall"
    return sent[0]


@pytest.mark.parametrize("splice", ["never", "always"])
def test_what_an_idle_timeout_throws_away_is_counted_exactly(fwd: SyncForwarder, splice: str) -> None:
    """The target sends until everything between it and a client that reads nothing is full;
    the idle timeout then resets both legs. What the target's kernel saw acknowledged, less
    what the client can still read, is what the forwarder lost: its own queues, pipe or
    buffer, and the client leg's unacknowledged bytes."""
    data = payload(96 << 20, seed=5)
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice, idle_timeout=2.0)
        client, server = slow_client_legs(lsock, rule.port)
        with client, server:
            server.setblocking(False)
            sent = flood_until_stalled(server, data, lambda: fwd.counters(rule).bytes_down)
            wait_for(lambda: fwd.counters(rule).active == 0, what="the idle timeout to end the connection")
            # Read after the reset (the kernel keeps the count of a reset socket), so whatever
            # moved after the stall was seen is in it.
            acknowledged = sent - unacked(server)
            got = drain_until_reset(client)
            assert got.nbytes > 0
            discarded = fwd.counters(rule).bytes_discarded
            assert discarded > 0
            assert got.nbytes + discarded == acknowledged


def test_nothing_is_counted_where_nothing_was_lost(fwd: SyncForwarder) -> None:
    """A target that refuses (its leg held only a SYN), and a half-closed connection whose FIN
    was acknowledged before the half-closed timeout reset it: no byte lost, none counted."""
    with refusing_port() as dead:
        refused = fwd.forward(dead.getsockname()[1])
        assert all(turned_away(refused.port) for _ in range(10))
        wait_for(lambda: fwd.counters(refused).connect_failed == 10, what="ten failed connects")
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], half_closed_timeout=1.0)
        client, server = slow_client_legs(lsock, rule.port)
        with client, server:
            client.sendall(b"last words")
            client.shutdown(socket.SHUT_WR)
            assert server.recv(64) == b"last words" and server.recv(64) == b""
            wait_for(lambda: fwd.counters(rule).active == 0, what="the half-closed timeout")
            drain_until_reset(client)
    assert fwd.counters(refused).bytes_discarded == fwd.counters(rule).bytes_discarded == 0
