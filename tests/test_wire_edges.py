"""Edge cases of the data plane seen from the wire: a client done before the target connects,
TCP urgent data, the last bytes of a peer that resets (while the other side still sends, or
before a slow reader took them), a slow reader against a flood, a UDP target that answers with
ICMP port unreachable, and UDP clients interleaved in one batch. Each compares the bytes at the
far end."""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator

import pytest

import fastfwd
from netutil import (LOOP4, SPLICE_MODES, ChildForwarder, Received, SyncForwarder, UdpEcho, connect,
                     cpu_seconds, datagram, payload, recv_exact, reset, spawn, spec, sysctl_max, udp_roundtrip,
                     udp_socket, wait_for)
from test_churn import held
from test_udp_edge_paths import stopped

MB = 1 << 20
#: A worker spinning on a socket burns about a CPU-second per second; an idle one next to nothing.
SPIN_LIMIT = 0.3


def all_stopped(pid: int) -> bool:
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state == "T" for state in states)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """The process held stopped, once each of its threads is (a SIGSTOP only asks): whatever
    is sent meanwhile waits in its sockets, to be found all at once."""
    with stopped(pid):
        wait_for(lambda: all_stopped(pid), timeout=5, what=f"pid {pid} to stop")
        yield


@contextlib.contextmanager
def listening(oobinline: bool = False) -> Iterator[socket.socket]:
    """A bare listener, accepted from by the test itself, so one thread drives both ends.
    ``oobinline``: urgent bytes stay in the stream of the accepted sockets."""
    sock = socket.socket()
    if oobinline:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    sock.bind((LOOP4, 0))
    sock.listen(8)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def legs(lsock: socket.socket, port: int, oobinline: bool = False) -> tuple[socket.socket, socket.socket]:
    """A client connected through the forwarder on ``port``, and the target's end of it."""
    client = connect(port, timeout=5)
    if oobinline:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    server, _ = lsock.accept()
    server.settimeout(5)
    return client, server


# -- a client that is done before the target answers -----------------------------------------

@contextlib.contextmanager
def slow_to_accept() -> Iterator[socket.socket]:
    """A listener whose backlog is full, so a SYN to it is dropped and retried after about a
    second; accepting the connection that fills it lets the retried one in."""
    with listening() as lsock:
        lsock.listen(0)
        with socket.create_connection(lsock.getsockname(), timeout=5):
            yield lsock


@pytest.mark.parametrize("ending", ["eof", "reset"])
def test_a_client_done_before_the_target_connects_is_passed_on_in_order(fwd: SyncForwarder,
                                                                         ending: str) -> None:
    """The client sends its request and a FIN (or a reset) while the target's handshake is
    still pending: once connected, the target must get the request, then the same ending."""
    with contextlib.ExitStack() as stack:
        targets = [stack.enter_context(slow_to_accept()) for _ in SPLICE_MODES]
        clients = []
        for mode, lsock in zip(SPLICE_MODES, targets):
            rule = fwd.forward(lsock.getsockname()[1], splice=mode)
            client = stack.enter_context(connect(rule.port, timeout=5))
            client.sendall(b"request from %s" % mode.encode())
            clients.append(client)
        for client in clients:
            if ending == "eof":
                client.shutdown(socket.SHUT_WR)
            else:
                reset(client)
        for lsock in targets:
            lsock.accept()[0].close()       # the filler: room for the retried SYN
        for mode, lsock, client in zip(SPLICE_MODES, targets, clients):
            server = stack.enter_context(lsock.accept()[0])
            server.settimeout(5)
            assert read_to_end(server) == (b"request from %s" % mode.encode(), ending), f"splice {mode}"
            if ending == "eof":     # the other direction still works
                server.sendall(b"reply")
                server.shutdown(socket.SHUT_WR)
                client.settimeout(5)
                assert read_to_end(client) == (b"reply", "eof"), f"splice {mode}"


def tcp_states_to(port: int) -> list[str]:
    """The states (hex, as /proc/net/tcp gives them: 01 established, 02 SYN sent) of this
    host's IPv4 TCP sockets connected or connecting to ``port``."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return [row[3] for row in rows if row[2].endswith(f":{port:04X}")]


def test_a_target_that_resets_before_its_handshake_was_seen_still_has_its_bytes_passed_on() -> None:
    """The target accepts, sends a greeting and resets before the worker saw the handshake
    complete (a worker off the CPU for a moment; here, the forwarder stopped). Its connect did
    not fail: the client must get the greeting, then the reset, and no failed connect counted."""
    greeting = b"421 too busy, closing\r\n"
    with slow_to_accept() as lsock, \
            ChildForwarder.start([(spec(lsock.getsockname()[1]), "tcp", {})], workers=1) as child:
        port = lsock.getsockname()[1]
        with connect(child.ports[0], timeout=5) as client:
            client.sendall(b"hello")
            wait_for(lambda: "02" in tcp_states_to(port), what="the forwarder's SYN (dropped: the backlog is full)")
            with frozen(child.pid):
                lsock.accept()[0].close()       # the filler: room for the retried SYN
                server = lsock.accept()[0]      # the kernel completes the handshake meanwhile
                server.sendall(greeting)
                reset(server)
                wait_for(lambda: "01" not in tcp_states_to(port), what="the reset to reach the forwarder")
            assert recv_exact(client, len(greeting)) == greeting
            with pytest.raises(ConnectionResetError):
                client.recv(64)
        counters = child.counters()[0]
        # the client's hello, taken and never delivered, is counted as lost
        assert (counters["connect_failed"], counters["bytes_down"]) == (0, len(greeting))
        assert counters["bytes_discarded"] == len(b"hello")


# -- TCP urgent data -------------------------------------------------------------------------

def send_with_urgent_byte(sock: socket.socket) -> bytes:
    sock.sendall(b"abc")
    sock.send(b"!", socket.MSG_OOB)
    sock.sendall(b"def")
    return b"abc!def"


def test_urgent_data_is_forwarded_in_line_and_nothing_stalls_behind_it() -> None:
    """A byte sent with MSG_OOB (telnet's and FTP's "synch") marks the stream. Reading stops
    short at that mark: splice returned nothing more at all (the stream hung), and a copy that
    took the short read for an empty socket waited for data that was already there. Without
    SO_OOBINLINE the byte itself was taken out of the stream, so a telnet IAC DM arrived as a
    lone IAC. Every byte must arrive, in order, in both directions, in every splice mode."""
    with listening(oobinline=True) as lsock, ChildForwarder.start(
            [(spec(lsock.getsockname()[1]), "tcp", {"splice": mode}) for mode in SPLICE_MODES],
            workers=1) as child:
        for mode, port in zip(SPLICE_MODES, child.ports):
            client, server = legs(lsock, port, oobinline=True)
            with client, server:
                client.sendall(b"hello")
                assert recv_exact(server, 5) == b"hello"
                for src, dst, way in ((client, server, "up"), (server, client, "down")):
                    # Held stopped, the forwarder finds the mark and the bytes after it all
                    # queued at once: no later arrival wakes it to read on.
                    with frozen(child.pid):
                        sent = send_with_urgent_byte(src)
                    try:
                        got = recv_exact(dst, len(sent))
                    except TimeoutError:
                        pytest.fail(f"splice {mode}, {way}: the stream stalled at the urgent mark")
                    assert got == sent, f"splice {mode}, {way}"
                for src, dst in ((client, server), (server, client)):
                    src.sendall(b"after")
                    assert recv_exact(dst, 5) == b"after", f"splice {mode}: the stream did not go on"
        counters = child.counters()
    for mode, c in zip(SPLICE_MODES, counters):
        assert (c["bytes_up"], c["bytes_down"]) == (5 + 7 + 5, 7 + 5), f"splice {mode}: {c}"


@pytest.mark.parametrize("splice", ["auto", "always"])
def test_urgent_data_and_a_fin_arriving_mid_splice_are_not_taken_for_the_end(fwd: SyncForwarder,
                                                                             splice: str) -> None:
    """A stream ending in an urgent byte, more data and a FIN, sent while the forwarder is busy
    splicing it: splice stops at the mark and, with the FIN queued behind it, returns 0. That
    was taken for the end, so the urgent byte and the rest were lost and a FIN passed on, in
    about one transfer in four. It can only be caught in the act, so several transfers run;
    every one must arrive whole."""
    bulk = 8 * MB
    with listening(oobinline=True) as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice)
        for attempt in range(12):
            client, server = legs(lsock, rule.port, oobinline=True)
            with client, server:
                received = spawn(read_to_end, server)
                client.sendall(bytes(bulk))
                tail = send_with_urgent_byte(client)
                client.shutdown(socket.SHUT_WR)
                got, how = received.result()
            assert (len(got), how) == (bulk + len(tail), "eof"), f"transfer {attempt}: {len(got)} bytes, then {how}"
            assert got[bulk:] == tail


# -- a peer that resets while the other side still sends -------------------------------------

def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sent, and how it ended: "eof", "reset" or "timeout"."""
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        return bytes(got), "reset"
    except TimeoutError:
        return bytes(got), "timeout"
    return bytes(got), "eof"


RESPONSE = b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n\r\n"


def test_last_reply_of_a_target_that_resets_reaches_the_client_still_sending() -> None:
    """A server that refuses an upload answers and closes without reading the rest: its kernel
    sends the answer, then a RST. Directly, the client reads the answer, then the reset. The
    forwarder wrote the client's next bytes towards the dead target first, failed, and reset
    both legs with the answer still unread in its socket: the client saw only the reset. The
    same with the client's upload ending in a FIN."""
    with listening() as lsock, ChildForwarder.start(
            [(spec(lsock.getsockname()[1]), "tcp", {"splice": mode}) for mode in SPLICE_MODES],
            workers=1) as child:
        for mode, port in zip(SPLICE_MODES, child.ports):
            for fin in (False, True):
                client, server = legs(lsock, port)
                with client, server:
                    client.sendall(b"x" * 1000)
                    recv_exact(server, 10)          # the server reads the head, not the body
                    with frozen(child.pid):
                        client.sendall(b"y" * 1000)     # more upload, queued first
                        if fin:
                            client.shutdown(socket.SHUT_WR)
                        server.sendall(RESPONSE)
                        server.close()              # unread bytes: the kernel sends a RST
                    got, how = read_to_end(client)
                    assert got == RESPONSE, f"splice {mode}, fin {fin}: the client got {got!r}, then {how}"
                    # a reset stays a reset: a FIN would tell the client its upload was taken
                    assert how == "reset", f"splice {mode}, fin {fin}"
        # A worker counts its last write and the close after the client may have read them
        counters = wait_for(lambda: (cs := child.counters()) and not any(c["active"] for c in cs) and cs,
                            what="every connection's end to be counted")
    for mode, c in zip(SPLICE_MODES, counters):
        # what was written counts; the upload the dead target never took does not
        assert (c["bytes_up"], c["bytes_down"], c["active"]) == (2000, 2 * len(RESPONSE), 0), f"splice {mode}: {c}"


def sending_stopped(fwd: SyncForwarder, rule: fastfwd.ActiveRule, way: str = "down") -> fastfwd.Counters:
    """Wait until the forwarder has sent the client (``way`` "up": the target) all it can
    (its byte count stays put); its counters then."""
    samples = [-1]

    def settled() -> bool:
        samples.append(getattr(fwd.counters(rule), f"bytes_{way}"))
        return samples[-1] == samples[-2] > 0
    wait_for(settled, interval=0.1, what=f"the forwarder to stop sending {way}")
    return fwd.counters(rule)


def slow_client_legs(lsock: socket.socket, port: int) -> tuple[socket.socket, socket.socket]:
    """Like legs(), with a client that takes little before it reads (its window is set at
    connect time)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.settimeout(5)
    client.connect((LOOP4, port))
    server, _ = lsock.accept()
    server.settimeout(5)
    return client, server


def reset_once_acknowledged(server: socket.socket, data: bytes) -> None:
    """Send ``data``, wait until the forwarder has acknowledged every byte, then reset."""
    server.sendall(data)
    # TIOCOUTQ on a TCP socket: bytes sent and not yet acknowledged, or not sent at all
    wait_for(lambda: struct.unpack("i", fcntl.ioctl(server, termios.TIOCOUTQ, b"\0" * 4))[0] == 0,
             what="the forwarder to acknowledge everything")
    reset(server)


@pytest.mark.parametrize("splice", SPLICE_MODES)
def test_a_reset_reaches_a_slow_client_after_every_byte_acknowledged_before_it(
        fwd: SyncForwarder, splice: str) -> None:
    """The target sends 2 MiB, sees every byte acknowledged (by the forwarder), then resets.
    The client had not read yet. Passing the reset on at once discarded what the forwarder's
    socket towards the client still held: the client got ~110 KiB of the 2 MiB and a reset,
    with all 2 MiB counted as sent. The reset must follow the last byte."""
    sent = payload(2 * MB, seed=7)
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice)
        client, server = slow_client_legs(lsock, rule.port)
        with client, server:
            reset_once_acknowledged(server, sent)
            sending_stopped(fwd, rule)      # as far as it goes before the client reads
            got, how = read_to_end(client)
            assert (len(got), how) == (len(sent), "reset"), f"the client got {len(got)} bytes, then {how}"
            assert got == sent
    wait_for(lambda: fwd.counters(rule).active == 0, what="the connection to end")
    assert fwd.counters(rule).bytes_down == len(sent)


@pytest.mark.parametrize("half_closed, idle", [(0.5, 3600.0), (0, 0.5)])
def test_a_held_back_reset_gives_up_on_a_client_that_never_reads(fwd: SyncForwarder, half_closed: float,
                                                                  idle: float) -> None:
    """The reset waits for the client to take the bytes before it, but not for ever: the
    half-closed timeout bounds the wait, or the idle timeout when half-closed connections are
    kept for ever (0), and the client still learns of the reset."""
    sent = payload(2 * MB, seed=8)
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], half_closed_timeout=half_closed, idle_timeout=idle)
        client, server = slow_client_legs(lsock, rule.port)
        with client, server:
            reset_once_acknowledged(server, sent)
            wait_for(lambda: fwd.counters(rule).active == 0, what="the timeout to end the wait")
            got, how = read_to_end(client)
            assert how == "reset" and got == sent[:len(got)], f"{len(got)} bytes, then {how}"
    wait_for(lambda: held(fwd)["connections"] == 0, what=f"the connection freed: {held(fwd)}")


@pytest.mark.root
@pytest.mark.parametrize("splice", ["never", "always"])
def test_a_target_leg_that_fails_mid_write_ends_the_connection_at_once(fwd: SyncForwarder, splice: str) -> None:
    """The forwarder's socket towards a target that stopped reading fails (killed here with
    ss -K, as a retransmission timeout would) while the forwarder holds client bytes for it:
    the write fails with neither EPIPE nor ECONNRESET. The failure was blamed on the client
    leg, and the dead target leg, whose send queue no ACK will ever empty, was left to flush
    for the whole half-closed timeout. The client must get the reset, and the connection end."""
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice)
        client = connect(rule.port, timeout=5)
        server, _ = lsock.accept()
        with client, server:
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):     # until the forwarder holds some too
                while True:
                    client.send(bytes(65536))
            sending_stopped(fwd, rule, "up")
            host, port = server.getpeername()
            subprocess.run(["ss", "-K", "src", f"{host}:{port}", "dst", f"{host}:{lsock.getsockname()[1]}"],
                           check=True, capture_output=True)
            wait_for(lambda: fwd.counters(rule).active == 0, timeout=5, what="the connection to end")
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while client.recv(65536):
                    pass
    wait_for(lambda: held(fwd)["connections"] == 0, what=f"the connection freed: {held(fwd)}")


# -- a slow reader against a flood -----------------------------------------------------------

@pytest.mark.parametrize("splice", ["never", "always"])
def test_a_reader_that_stops_stops_the_forwarder_reading(fwd: SyncForwarder, splice: str) -> None:
    """The target floods, the client reads nothing: the forwarder must stop reading the target
    once its own pipe or buffer is full, not buffer without limit. What it counts as sent can
    only be what the client's socket and the forwarder's send queue hold. The idle timeout
    then ends it, giving back the pipe or buffer still holding bytes."""
    # More than the target's send queue and the forwarder's receive queue can ever hold (the
    # latter autotunes up to tcp_rmem's maximum, 32 MiB on some hosts), so the sender blocks
    # until the reset.
    flood = payload(sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem") + 8 * MB, seed=3)
    with listening() as lsock:
        rule = fwd.forward(lsock.getsockname()[1], splice=splice, idle_timeout=1.0)
        client, server = slow_client_legs(lsock, rule.port)
        with client, server:
            server.settimeout(None)             # blocks until the reset ends it
            sender = spawn(server.sendall, flood)
            stalled = sending_stopped(fwd, rule)
            lent = held(fwd)
            bound = sysctl_max("tcp_wmem") + client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert stalled.bytes_down <= bound, f"{stalled.bytes_down} bytes sent to a client holding {bound}"
            assert lent["pipes_lent"] + lent["buffers_lent"] <= 1, lent
            assert lent["buffers_lent" if splice == "never" else "pipes_lent"] == 1, lent
            # the idle timeout resets both legs; the client reads what reached it, then the reset
            wait_for(lambda: fwd.counters(rule).active == 0, what="the idle timeout to end the connection")
            with pytest.raises(ConnectionError):
                sender.result()
            got = drain_until_reset(client)
            assert 0 < got.nbytes <= stalled.bytes_down
            assert got == Received.of(flood[:got.nbytes]), "the client got other bytes than sent"
    wait_for(lambda: held(fwd)["pipes_lent"] + held(fwd)["buffers_lent"] == 0,
             what=f"the pipe and buffer back: {held(fwd)}")


def drain_until_reset(sock: socket.socket) -> Received:
    """Read what arrives until the peer's reset (which must come)."""
    progress = bytearray()
    with pytest.raises(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            progress += chunk
        pytest.fail(f"the connection ended with a FIN after {len(progress)} bytes, not a reset")
    return Received.of(progress)


# -- a UDP target that refuses -----------------------------------------------------------------

def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOP4, 0))
        return sock.getsockname()[1]


def test_a_refusing_udp_target_is_counted_and_every_datagram_still_tried() -> None:
    """Nothing listens on the target port: each datagram earns an ICMP port unreachable, which
    the kernel hands to the session socket as ECONNREFUSED on its next read or send. A send
    that met it sent nothing, and the whole run of datagrams it led was dropped; the refusals
    were not counted anywhere. Every datagram must be tried, the refusals counted
    (connect_failed), the worker must not spin on the error, and once the target is back the
    same session reaches it."""
    port, burst = unused_udp_port(), 256
    with ChildForwarder.start([(spec(port), "udp", {})], workers=1) as child, udp_socket() as client:
        (listen,) = child.ports
        with frozen(child.pid):    # one batch after another, with refusals arriving between
            for seq in range(burst):
                client.sendto(datagram(seq, 100), (LOOP4, listen))
        wait_for(lambda: sum(child.counters()[0][k] for k in ("datagrams_up", "drops")) >= burst,
                 what="the burst to be handled")
        counters = child.counters()[0]
        assert (counters["datagrams_up"], counters["drops"]) == (burst, 0), counters
        assert counters["connect_failed"] >= 1, counters

        # refused all along: the worker sleeps between datagrams, it does not spin
        before, started = cpu_seconds(child.pid), time.monotonic()
        for seq in range(50):
            client.sendto(datagram(seq, 100), (LOOP4, listen))
            time.sleep(0.02)
        burn = (cpu_seconds(child.pid) - before) / (time.monotonic() - started)
        assert burn < SPIN_LIMIT, f"the forwarder burned {burn:.2f} CPU-s per second on refusals"

        with UdpEcho(port=port) as server:
            assert udp_roundtrip(client, (LOOP4, listen), b"back") == b"back"
            assert server.total >= 1
        counters = child.counters()[0]
    assert counters["sessions_created"] == 1, counters
    assert counters["datagrams_up"] - counters["drops"] >= burst + 50 + 1, counters


def test_clients_interleaved_in_one_batch_keep_their_order() -> None:
    """A B C D A B C D ... read in one recvmmsg batch (the forwarder held stopped meanwhile),
    empty datagrams among them: each client's datagrams reach the target in its order, through
    its own session, and its replies come back in order."""
    rounds = 12
    with UdpEcho() as server, ChildForwarder.start([(spec(server.port), "udp", {})], workers=1) as child:
        (listen,) = child.ports
        clients = [udp_socket(timeout=5) for _ in range(4)]
        sent = {i: [b"" if r % 5 == 2 else datagram(i * 100 + r, 20 + i) for r in range(rounds)]
                for i in range(len(clients))}
        try:
            with frozen(child.pid):
                for r in range(rounds):
                    for i, client in enumerate(clients):
                        client.sendto(sent[i][r], (LOOP4, listen))
            for i, client in enumerate(clients):
                assert [client.recv(100) for _ in range(rounds)] == sent[i], f"client {i}"
        finally:
            for client in clients:
                client.close()
        assert sorted(server.received.values()) == sorted(
            [Received.of(d).digest for d in stream] for stream in sent.values())
        counters = child.counters()[0]
    assert counters["sessions_created"] == len(clients)
    assert counters["datagrams_up"] == counters["datagrams_down"] == rounds * len(clients)
