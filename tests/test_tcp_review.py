"""TCP forwarding as its users meet it: pipelined keep-alive requests whose answers cross the
splice threshold mid-connection and interactive keystrokes on one connection, a server that
speaks first to a client that sends nothing, and max_connections slots given back by every
way a connection can fail, each counted exactly."""
from __future__ import annotations

import socket

import pytest

from netutil import (SPLICE_THRESHOLD, SyncForwarder, TcpServer, blackhole, closed_how, connect, echo_once,
                     forwarder, make_rule, payload, recv_exact, refusing_port, reset, turned_away_how, wait_for)

#: Answer sizes around the splice threshold, so "auto" switches the down direction to splice
#: between two answers of one keep-alive connection.
SIZES = [0, 1, 517, SPLICE_THRESHOLD - 1, 2, SPLICE_THRESHOLD + 3, 9000, 1 << 20, 7]
KEYS = 64


def request(i: int) -> bytes:
    return b"GET /%d HTTP/1.1\r\n\r\n" % i


def http_answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


# Made once: payload() keeps only a few random blocks, so asked again it may give new bytes.
ANSWERS = [http_answer(payload(size, seed=i + 1)) for i, size in enumerate(SIZES)]


def http_then_keys(conn: socket.socket) -> None:
    """Handler: answer each request in order as its last byte arrives (a pipelined batch comes
    in one read, or in pieces), then echo keystrokes one byte at a time until EOF."""
    pending = b""
    for i in range(len(SIZES)):
        while b"\r\n\r\n" not in pending:
            pending += conn.recv(4096)
        head, pending = pending.split(b"\r\n\r\n", 1)
        assert head + b"\r\n\r\n" == request(i), head
        conn.sendall(ANSWERS[i])
    assert pending == b"", pending
    while key := conn.recv(1):
        conn.sendall(key)
    conn.shutdown(socket.SHUT_WR)


def test_pipelined_requests_then_keystrokes_on_one_connection(fwd: SyncForwarder) -> None:
    """HTTP/1.1 pipelining (every request in one write) and an SSH-like session of one-byte
    round trips after it: each answer arrives whole and in order, and the counters equal the
    bytes each end saw."""
    with TcpServer(http_then_keys) as server:
        rule = fwd.forward(server.port)
        sent = b"".join(request(i) for i in range(len(SIZES)))
        with connect(rule.port) as sock:
            sock.sendall(sent)
            for i, want in enumerate(ANSWERS):
                assert recv_exact(sock, len(want)) == want, f"answer {i}"
            for k in range(KEYS):
                key = bytes([97 + k % 26])
                assert echo_once(sock, key) == key
            sock.shutdown(socket.SHUT_WR)
            assert closed_how(sock) == "eof"
        server.result()
    counters = fwd.counters(rule)
    assert counters.bytes_up == len(sent) + KEYS
    assert counters.bytes_down == sum(map(len, ANSWERS)) + KEYS
    assert counters.bytes_spliced > 0, "the 1 MiB answer should have been spliced"
    assert counters.bytes_spliced + counters.bytes_copied == counters.bytes_up + counters.bytes_down
    assert (counters.accepted, counters.refused, counters.connect_failed) == (1, 0, 0)


BANNER = b"SSH-2.0-review\r\n"


def banner_then_close(conn: socket.socket) -> None:
    conn.sendall(BANNER)


def test_a_server_that_speaks_first_reaches_a_client_that_sends_nothing(fwd: SyncForwarder) -> None:
    """SSH and SMTP servers greet first: the forwarder connects at accept, not on the client's
    first byte, and the greeting and the server's FIN both reach a silent client."""
    with TcpServer(banner_then_close) as server:
        rule = fwd.forward(server.port)
        with connect(rule.port) as sock:
            assert recv_exact(sock, len(BANNER)) == BANNER
            assert closed_how(sock) == "eof"
        server.result()
    wait_for(lambda: fwd.counters(rule).active == 0, what="the connection to end")
    counters = fwd.counters(rule)
    assert (counters.bytes_up, counters.bytes_down) == (0, len(BANNER))


def test_refused_connects_give_their_max_connections_slot_back(fwd: SyncForwarder) -> None:
    """With a cap of one and a target that refuses, each client is turned away as a failed
    connect, never as a refusal at the cap: a failed connect frees its slot."""
    with refusing_port() as dead:
        rule = fwd.forward(dead.getsockname()[1], max_connections=1)
        for n in range(1, 4):
            assert turned_away_how(rule.port) in ("eof", "reset")
            fwd.wait_counter(rule, "connect_failed", n)
    counters = fwd.counters(rule)
    assert (counters.accepted, counters.connect_failed, counters.refused, counters.active) == (3, 3, 0, 0)


@pytest.mark.root
def test_a_connect_the_target_never_answers_holds_its_slot_until_the_connect_timeout() -> None:
    """A target that drops SYNs: the waiting client counts against max_connections (a second
    one is refused and counted), is turned away at the connect timeout, and its slot then
    takes a new client."""
    with blackhole() as dead, forwarder() as fw:
        # Long enough that the second client surely comes while the first still waits.
        rule = fw.add(make_rule(9, host=dead, listen_host="127.0.0.1", max_connections=1,
                                connect_timeout=4))
        with connect(rule.port) as waiting:
            fw.wait_counter(rule, "accepted", 1)
            assert turned_away_how(rule.port) in ("eof", "reset")
            assert fw.wait_counter(rule, "refused", 1).connect_failed == 0
            assert closed_how(waiting) in ("eof", "reset")
        counters = fw.wait_counter(rule, "connect_failed", 1)
        assert (counters.accepted, counters.refused, counters.active) == (1, 1, 0)
        with connect(rule.port):
            counters = fw.wait_counter(rule, "accepted", 2)
            assert (counters.refused, counters.active) == (1, 1)


@pytest.mark.root
def test_a_client_that_resets_while_the_target_is_still_connecting_frees_its_slot_at_once() -> None:
    """Clients of a black-holed target give up and retry: one that resets before the target
    answered, having sent nothing, frees its max_connections place (and its two fds) at once,
    not at the connect timeout. (One that sent bytes keeps it: they and then the reset are
    owed to the target once it connects, test_wire_edges.)"""
    with blackhole() as dead, forwarder() as fw:
        rule = fw.add(make_rule(9, host=dead, listen_host="127.0.0.1", max_connections=1, connect_timeout=60))
        for n in (1, 2):
            client = connect(rule.port)
            fw.wait_counter(rule, "accepted", n)
            reset(client)
            wait_for(lambda: fw.counters(rule).active == 0, 20, what="the reset client's place freed")
        counters = fw.counters(rule)
        assert (counters.refused, counters.connect_failed, counters.bytes_discarded) == (0, 0, 0)


def test_max_connections_holds_when_workers_accept_at_the_same_instant(fwd: SyncForwarder) -> None:
    """Bursts of clients reach both workers at once: however their accepts interleave, no more
    than max_connections of each burst are taken (the rest are refused and counted)."""
    cap, clients, bursts = 8, 64, 100
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as target:
        target.setblocking(False)
        rule = fwd.forward(target.getsockname()[1], max_connections=cap)
        for burst in range(1, bursts + 1):
            before = fwd.counters(rule)
            held = [socket.socket() for _ in range(clients)]
            try:
                for sock in held:
                    sock.setblocking(False)
                    sock.connect_ex(("127.0.0.1", rule.port))
                wait_for(lambda: (lambda c: c.accepted + c.refused)(fwd.counters(rule))
                         == before.accepted + before.refused + clients, what=f"burst {burst} taken")
                taken = fwd.counters(rule).accepted - before.accepted
                assert taken <= cap, f"burst {burst}: {taken} connections taken past a cap of {cap}"
            finally:
                for sock in held:
                    sock.close()
            wait_for(lambda: drained(target) and fwd.counters(rule).active == 0, what=f"burst {burst} closed")


def drained(listener: socket.socket) -> bool:
    """Accept and close what waits on a non-blocking listener; True (for wait_for)."""
    while True:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            return True
