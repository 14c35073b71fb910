"""TCP failure paths: resets cross the forwarder, a refusing or silent target closes the
client and is counted, caps and allow-lists refuse, and running out of file descriptors
neither stops the forwarder nor makes it spin."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from netutil import (LOOP4, SPLICE_MODES, TIMEOUT, ChildForwarder, Handler, Received, SyncForwarder, TcpServer,
                     blackhole, closed_how, connect, cpu_seconds, echo_handler, echo_once, end_of_stream,
                     make_rule, payload, recv_exact, refusing_port, reset, send_stream, spawn, spec, sysctl_max,
                     turned_away_how, wait_for)
from test_discarded_bytes import flood_until_stalled, unacked
from test_wire_edges import drain_until_reset, legs, listening


MB = 1 << 20


def echo_once_then(after: Handler) -> Handler:
    """Handler: echo the first message (proving both legs are up), then hand over to ``after``."""
    def handle(conn: socket.socket) -> object:
        conn.sendall(conn.recv(65536))
        return after(conn)
    return handle


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_client_reset_reaches_server(fwd: SyncForwarder, splice: str) -> None:
    with TcpServer(echo_once_then(end_of_stream)) as server:
        rule = fwd.forward(server.port, splice=splice)
        sock = connect(rule.port)
        assert echo_once(sock, b"ping") == b"ping"
        reset(sock)
        assert server.result() == "reset"
    wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_server_reset_reaches_client(fwd: SyncForwarder, splice: str) -> None:
    with TcpServer(echo_once_then(reset)) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            assert echo_once(sock, b"ping") == b"ping"
            assert closed_how(sock) == "reset"
        server.result()
    wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")


def stream_until_reset(sock: socket.socket) -> str:
    """Send an endless-looking stream; return how the peer's reset showed."""
    try:
        send_stream(sock, payload(64 * MB, seed=11))
    except ConnectionResetError:
        return "reset"
    except BrokenPipeError:
        return "broken pipe"
    return "not reset: all 64 MB went through"


def read_then_reset(conn: socket.socket) -> None:
    recv_exact(conn, 1 * MB)
    reset(conn)


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_server_reset_mid_transfer_stops_the_sending_client(fwd: SyncForwarder, splice: str) -> None:
    with TcpServer(read_then_reset) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            assert stream_until_reset(sock) in ("reset", "broken pipe")
        server.result()


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_client_reset_mid_transfer_stops_the_sending_server(fwd: SyncForwarder, splice: str) -> None:
    with TcpServer(stream_until_reset) as server:
        rule = fwd.forward(server.port, splice=splice)
        with connect(rule.port) as sock:
            read_then_reset(sock)
        assert server.result() in ("reset", "broken pipe")


def test_refused_target_closes_client_and_is_counted(fwd: SyncForwarder) -> None:
    with refusing_port() as dead:
        rule = fwd.forward(dead.getsockname()[1])
        assert turned_away_how(rule.port, timeout=5) in ("eof", "reset")
    counters = fwd.wait_counter(rule, "connect_failed", 1)
    assert counters.connect_failed == 1
    assert counters.bytes_up == counters.bytes_down == 0


@pytest.mark.root
def test_connect_timeout_to_blackholed_target(fwd: SyncForwarder) -> None:
    with blackhole() as dead:
        with pytest.raises(TimeoutError):  # the namespace really swallows the SYN
            socket.create_connection((dead, 9), timeout=0.3)
        rule = fwd.add(make_rule(9, host=dead, listen_host=LOOP4, connect_timeout=0.5))
        # the kernel would retry the SYN for about two minutes: only the 0.5 s timer ends it this soon
        assert turned_away_how(rule.port, timeout=10) in ("eof", "reset")
        assert fwd.wait_counter(rule, "connect_failed", 1).connect_failed == 1


def test_max_connections_refuses_beyond_cap(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        rule = fwd.forward(server.port, max_connections=2)
        first, second = connect(rule.port), connect(rule.port)
        try:
            for sock in (first, second):
                assert echo_once(sock, b"in") == b"in"
            assert turned_away_how(rule.port) in ("eof", "reset")
            assert fwd.wait_counter(rule, "refused", 1).refused == 1
            assert echo_once(first, b"still") == b"still"
        finally:
            first.close()
            second.close()
        wait_for(lambda: fwd.counters(rule).active == 0, what="no active connection")
        with connect(rule.port) as again:
            assert echo_once(again, b"room again") == b"room again"


def test_allow_list_refuses_other_sources(fwd: SyncForwarder) -> None:
    with TcpServer(echo_handler) as server:
        closed = fwd.forward(server.port, allow=("192.0.2.0/24",))
        assert turned_away_how(closed.port) in ("eof", "reset")
        assert fwd.wait_counter(closed, "refused", 1).refused == 1
        opened = fwd.forward(server.port, allow=("127.0.0.0/8",))
        with connect(opened.port) as sock:
            assert echo_once(sock, b"welcome") == b"welcome"


# -- fd exhaustion ---------------------------------------------------------------------------

NOFILE = 64
#: A forwarder spinning on a listener it cannot accept from burns about a full CPU-second per
#: second; an idle one next to nothing.
SPIN_LIMIT = 0.3


def try_echo(port: int, message: bytes) -> tuple[socket.socket | None, str]:
    """Connect and echo once: (the open socket, "ok"), or (None, how it was turned away)."""
    try:
        sock = connect(port, timeout=5)
    except ConnectionResetError:
        return None, "reset"
    try:
        if echo_once(sock, message) == message:
            return sock, "ok"
        how = "garbled"
    except ConnectionResetError:
        how = "reset"
    except EOFError:
        how = "eof"
    except TimeoutError:
        how = "hung"
    sock.close()
    return None, how


def test_fd_exhaustion_refuses_extra_keeps_existing_and_recovers() -> None:
    with TcpServer(echo_handler) as server, \
            ChildForwarder.start([(spec(server.port), "tcp", {"splice": "never"})], nofile=NOFILE) as child:
        port = child.ports[0]
        live: list[socket.socket] = []
        outcome = "ok"
        try:
            for i in range(NOFILE):  # each forwarded connection needs two fds: this must run out
                sock, outcome = try_echo(port, b"conn %d" % i)
                if sock is None:
                    break
                live.append(sock)
            assert outcome in ("eof", "reset"), f"connection {len(live)} beyond the limit was {outcome}"
            assert len(live) >= 5, "the forwarder ran out of fds almost at once"

            # while exhausted: newcomers are turned away, without spinning
            before = cpu_seconds(child.pid)
            started = time.monotonic()
            newcomers = spawn(lambda: [turned_away_how(port, timeout=10) for _ in range(3)])
            time.sleep(1.0)
            burn = (cpu_seconds(child.pid) - before) / (time.monotonic() - started)
            assert set(newcomers.result(30)) <= {"eof", "reset"}
            assert burn < SPIN_LIMIT, f"the exhausted forwarder burned {burn:.2f} CPU-s per second"

            for i, sock in enumerate(live):  # the existing connections keep flowing
                assert echo_once(sock, b"still here %d" % i) == b"still here %d" % i
            assert child.counters()[0]["refused"] >= 1
        finally:
            for sock in live:
                sock.close()

        # fds come back: service resumes by itself
        def served() -> bool:
            sock, how = try_echo(port, b"back")
            if sock is not None:
                sock.close()
            return how == "ok"
        wait_for(served, timeout=TIMEOUT, interval=0.2, what="service to resume")
        assert child.proc.poll() is None, "the forwarder exited"
    assert child.proc.returncode == 0


def echo_all(socks: list[socket.socket], size: int, seed: int) -> None:
    """Send ``size`` bytes on every socket at once, each reading its echo back in full."""
    def one(i: int, sock: socket.socket) -> bool:
        data = payload(size, seed=seed + i)
        sender = spawn(sock.sendall, data)
        got = recv_exact(sock, size)
        sender.result()
        return got == data
    tasks = [spawn(one, i, sock) for i, sock in enumerate(socks)]
    assert all(task.result(60) for task in tasks), "an echo came back different"


def echoes_counted(child: ChildForwarder) -> dict[str, int]:
    """The counters once every byte echoed is counted on its way back too: a worker counts a
    write once it returned, which may be after the client read what it wrote."""
    return wait_for(lambda: (c := child.counters()[0])["bytes_down"] == c["bytes_up"] and c,
                    what="the echoes to be counted")


def test_pipe_shortage_copies_for_a_while_then_splices_again() -> None:
    # Out of fds, a direction that needs a pipe copies instead and loses nothing; once fds
    # are back it splices again, rather than copying for the rest of the connection.
    let_read = threading.Event()

    def held_echo(conn: socket.socket) -> Received:
        if not let_read.wait(TIMEOUT):
            raise AssertionError("the server was never let read")
        return echo_handler(conn)

    with TcpServer(echo_once_then(held_echo)) as server, \
            ChildForwarder.start([(spec(server.port), "tcp", {"splice": "always"})], nofile=NOFILE,
                                 workers=1) as child:
        # A small fixed receive queue (the accepted sockets inherit it), so that what a held
        # server leaves unread is bounded by this and the forwarder's send queue.
        server.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        port = child.ports[0]
        busy = [connect(port) for _ in range(4)]
        fillers: list[socket.socket] = []
        try:
            for i, sock in enumerate(busy):
                assert echo_once(sock, b"busy %d" % i) == b"busy %d" % i
            for i in range(NOFILE):  # take every fd the forwarder has left
                sock, outcome = try_echo(port, b"filler %d" % i)
                if sock is None:
                    break
                fillers.append(sock)
            assert outcome in ("eof", "reset"), f"filler {len(fillers)} beyond the limit was {outcome}"

            # While the server reads nothing, each upward direction fills a pipe and keeps it:
            # four want one at once, more than the few pipes made so far, one connection at a
            # time. (A server that keeps up hands each pipe back at once, and one pipe may serve
            # all four in turn.) Each sends more than the queues past its pipe can hold.
            echoing = spawn(echo_all, busy, sysctl_max("tcp_wmem") + 2 * MB, 10)
            wait_for(lambda: child.counters()[0]["pipe_shortages"] >= 1, what="a direction to find no pipe")
            let_read.set()
            echoing.result(60)
            exhausted = echoes_counted(child)
            assert exhausted["splice_fallbacks"] == 0, exhausted

            for sock in fillers:
                sock.close()
            fillers.clear()
            wait_for(lambda: child.counters()[0]["active"] == len(busy), what="the fillers to close")
            echo_all(busy, 32 * MB, seed=20)
            after = echoes_counted(child)
            copied = after["bytes_copied"] - exhausted["bytes_copied"]
            # each direction copies at most its retry allowance (1 MiB) before splicing again
            assert copied <= 2 * len(busy) * MB, after
            assert after["bytes_spliced"] - exhausted["bytes_spliced"] >= 2 * len(busy) * 31 * MB, after
        finally:
            let_read.set()
            for sock in busy + fillers:
                sock.close()


# -- a reset behind bytes the other peer does not take -------------------------------------------

@pytest.mark.parametrize("splice", ["never", "always"])
def test_a_reset_behind_bytes_the_target_does_not_take_waits_only_the_half_closed_timeout(
        fwd: SyncForwarder, splice: str) -> None:
    """The client sends more than a target that reads nothing can take, then resets. Its last
    bytes still sit in the forwarder's buffer or pipe, ahead of the reset. Passing the reset on
    waits for the target to take them, as long as the half-closed timeout allows (as it does for
    bytes already in the target leg's send queue), not the idle timeout (an hour here): then the
    target is reset, every byte it got is in order, and what it never got is counted."""
    data = payload(64 * MB, seed=12)
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice, half_closed_timeout=1.0,
                           idle_timeout=3600.0)
        client, server = legs(lsock, rule.port)
        with client, server:
            client.setblocking(False)
            sent = flood_until_stalled(client, data, lambda: fwd.counters(rule).bytes_up)
            acknowledged = sent - unacked(client)
            reset(client)
            wait_for(lambda: fwd.counters(rule).active == 0, what="the reset to reach the target")
            got = drain_until_reset(server)
            assert got == Received.of(data[:got.nbytes])
            assert got.nbytes + fwd.counters(rule).bytes_discarded == acknowledged
