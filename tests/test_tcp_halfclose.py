"""Half-close: a FIN one way becomes a shutdown(SHUT_WR) the other way once everything before
it is delivered, while the other direction keeps flowing. And the timeouts that end
connections left half-closed or idle."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from netutil import (SPLICE_MODES, TIMEOUT, Handler, Received, SyncForwarder, TcpServer, closed_how, connect,
                     drain, echo_handler, echo_once, end_of_stream, payload, send_stream, wait_for)

MB = 1 << 20
REQUEST = b"GET /big HTTP/1.0\r\n\r\n"


def reply_after_delay(response: bytes, delay: float = 0.5) -> Handler:
    """Handler: read the request to EOF, wait, then send ``response`` and close."""
    def handle(conn: socket.socket) -> Received:
        request = drain(conn)
        time.sleep(delay)  # the client's side stays half-closed meanwhile
        send_stream(conn, response)
        return request
    return handle


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_client_half_close_then_delayed_10mb_reply(fwd: SyncForwarder, splice: str) -> None:
    response = payload(10 * MB, seed=5)
    with TcpServer(reply_after_delay(response)) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            got = drain(sock)
        assert server.result() == Received.of(REQUEST), "the server did not get the request and its EOF"
    assert got == Received.of(response)
    counters = fwd.wait_counter(rule, "bytes_down", len(response))
    assert (counters.bytes_up, counters.bytes_down) == (len(REQUEST), len(response))


def greet_then_listen(greeting: bytes) -> Handler:
    """Handler: send ``greeting`` and shut down the write side first, then read the client's
    stream to EOF."""
    def handle(conn: socket.socket) -> Received:
        send_stream(conn, greeting)
        return drain(conn)
    return handle


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_server_half_close_client_keeps_sending(fwd: SyncForwarder, splice: str) -> None:
    greeting, upload = payload(1 * MB, seed=6), payload(10 * MB, seed=7)
    with TcpServer(greet_then_listen(greeting)) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            assert drain(sock) == Received.of(greeting)  # EOF from the server arrived...
            send_stream(sock, upload)                    # ...and the other direction still flows
            assert sock.recv(1) == b""
        assert server.result() == Received.of(upload)


def test_half_closed_timeout_ends_connection(fwd: SyncForwarder) -> None:
    """The client finished, the server read it all but never answers nor closes: the
    half-closed timeout ends the connection."""
    done = threading.Event()

    def silent(conn: socket.socket) -> Received:
        request = drain(conn)
        done.wait(TIMEOUT)  # hold the connection open, saying nothing
        return request

    with TcpServer(silent) as server:
        rule = fwd.forward(server.port, half_closed_timeout=0.5)
        with connect(rule.port) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            try:
                assert closed_how(sock) in ("eof", "reset")
            finally:
                done.set()
        assert server.result() == Received.of(REQUEST)
    wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")


def trickle(conn: socket.socket, chunks: int = 25, every: float = 0.1) -> bytes:
    """Send ``chunks`` small chunks ``every`` seconds apart, then half-close; returns what was sent."""
    sent = b""
    for i in range(chunks):
        chunk = b"chunk %03d;" % i
        conn.sendall(chunk)
        sent += chunk
        time.sleep(every)
    conn.shutdown(socket.SHUT_WR)
    return sent


def test_half_closed_timeout_spares_a_direction_still_moving(fwd: SyncForwarder) -> None:
    """The client is done, but the server keeps sending (2.5 s, every 0.1 s): a half-closed
    timeout of 1 s counts quiet time, so it must not cut the download."""
    def request_then_trickle(conn: socket.socket) -> tuple[Received, bytes]:
        return drain(conn), trickle(conn)

    with TcpServer(request_then_trickle) as server:
        rule = fwd.forward(server.port, half_closed_timeout=1.0)
        with connect(rule.port) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            got = drain(sock)
        request, sent = server.result()
    assert request == Received.of(REQUEST)
    assert got == Received.of(sent)


def test_idle_timeout_counts_quiet_time_only(fwd: SyncForwarder) -> None:
    """Traffic every 0.1 s for 2.5 s keeps a connection with a 1 s idle timeout alive."""
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, idle_timeout=1.0)
        with connect(rule.port) as sock:
            for i in range(25):
                assert echo_once(sock, b"tick %d" % i) == b"tick %d" % i
                time.sleep(0.1)
        server.result()


def test_idle_timeout_ends_connection(fwd: SyncForwarder) -> None:
    with TcpServer(end_of_stream) as server:
        rule = fwd.forward(server.port, idle_timeout=0.5)
        with connect(rule.port) as sock:
            sock.sendall(b"hello")
            assert closed_how(sock) in ("eof", "reset")
        assert server.result() in ("eof", "reset")
