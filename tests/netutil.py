"""Shared helpers for the data-plane tests: payloads, TCP and UDP servers and clients, a
synchronous handle on a Forwarder, a network namespace that drops everything, and helpers
for running a forwarder or the CLI in a child process.

Every blocking call here is bounded: sockets carry timeouts, loops carry deadlines, threads
are joined with timeouts. A broken engine makes a test fail, never hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import queue
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import fastfwd
from fastfwd.rules import Proto

T = TypeVar("T")

#: The bound on any single blocking socket operation (seconds).
TIMEOUT = 15.0
#: Chunk size for sends, so that a socket timeout bounds each chunk, not the whole payload.
CHUNK = 4 << 20
#: The promotion threshold of splice="auto" (RuleOptions' default).
SPLICE_THRESHOLD = 65536
SPLICE_MODES = ("auto", "always", "never")
MAX_DATAGRAM = 65507

LOOP4 = "127.0.0.1"
LOOP6 = "::1"


# ------------------------------------------------------------------------------------------
# Payloads and digests
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _random_block(size: int) -> bytes:
    return os.urandom(size)


@functools.lru_cache(maxsize=8)
def payload(size: int, seed: int = 0) -> bytes:
    """``size`` random bytes; different seeds give different (rotated) streams, so a relay that
    crosses the two directions (or loops one back) is caught by the digest."""
    if size == 0:
        return b""
    block = _random_block(size)
    shift = (seed * 7919) % size
    if not shift:
        return block
    view = memoryview(block)
    return b"".join((view[shift:], view[:shift]))


class Received(NamedTuple):
    """What one side of a connection read: byte count and SHA-256."""

    nbytes: int
    digest: str

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> "Received":
        return cls(len(data), hashlib.sha256(data).hexdigest())


def wait_for(predicate: Callable[[], T], timeout: float = TIMEOUT, interval: float = 0.02,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# Threads that report their outcome
# ------------------------------------------------------------------------------------------

class Task(threading.Thread):
    """A daemon thread whose return value or exception is handed to ``result()``."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True, name=getattr(fn, "__name__", "task"))
        self._fn, self._args = fn, args
        self._value: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float = TIMEOUT) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not finish within {timeout}s")
        if self._error is not None:
            raise self._error
        return self._value


def spawn(fn: Callable[..., Any], *args: Any) -> Task:
    task = Task(fn, *args)
    task.start()
    return task


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` submits a coroutine to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


def run_async(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run ``coro`` in a fresh event loop, bounded by ``timeout``."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ------------------------------------------------------------------------------------------
# The forwarder, driven from synchronous test code
# ------------------------------------------------------------------------------------------

def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def spec(target_port: int, host: str = LOOP4, listen_port: int = 0, count: int = 1,
         listen_host: str | None = None) -> str:
    """A port spec forwarding ``listen_host:listen_port`` (default: any free port on the
    target's loopback) to ``host:target_port``, ``count`` ports wide."""
    def ports(first: int) -> str:
        return f"{first}-{first + count - 1}" if count > 1 else str(first)
    lhost = bracket(listen_host or host)
    return f"{lhost}:{ports(listen_port)}:{bracket(host)}:{ports(target_port)}"


def make_rule(target_port: int, proto: Proto = "tcp", host: str = LOOP4, *, listen_port: int = 0,
              count: int = 1, listen_host: str | None = None, **options: Any) -> fastfwd.Rule:
    return fastfwd.Rule.parse(spec(target_port, host, listen_port, count, listen_host), proto,
                              options=fastfwd.RuleOptions(**options))


class SyncForwarder:
    """A started :class:`fastfwd.Forwarder` whose coroutines run on a private event loop, so
    thread-based tests can call it directly."""

    def __init__(self, workers: int = 2, **kwargs: Any) -> None:
        self._loop = LoopThread()
        self.fw = fastfwd.Forwarder(workers=workers, **kwargs)
        try:
            self._loop.run(self.fw.start())
        except BaseException:
            self._loop.close()
            raise

    def add(self, rule: fastfwd.Rule) -> "fastfwd.ActiveRule":
        return self._loop.run(self.fw.add(rule))

    def forward(self, target_port: int, proto: Proto = "tcp", host: str = LOOP4,
                **options: Any) -> "fastfwd.ActiveRule":
        """Add a rule from a free port on ``host`` to ``host:target_port``."""
        return self.add(make_rule(target_port, proto, host, **options))

    def remove(self, rule: "fastfwd.ActiveRule | fastfwd.Rule") -> None:
        self._loop.run(self.fw.remove(rule))

    def apply(self, rules: Iterable[fastfwd.Rule]) -> "fastfwd.Diff":
        return self._loop.run(self.fw.apply(list(rules)))

    def resolve(self, name: str, ip: str | None) -> list["fastfwd.ActiveRule"]:
        return self._loop.run(self.fw.resolve(name, ip))

    def settle(self) -> None:
        self._loop.run(self.fw.settle())

    def counters(self, rule: "fastfwd.ActiveRule") -> "fastfwd.Counters":
        """Settled first: a worker counts a send once it returned, so a client may already
        hold a reply the counters read at once would leave out."""
        self.settle()
        return self.fw.counters(rule)

    def sessions(self, rule: "fastfwd.ActiveRule") -> list[tuple[str, int]]:
        return self.fw.sessions(rule)

    def wait_counter(self, rule: "fastfwd.ActiveRule", name: str, at_least: int,
                     timeout: float = TIMEOUT) -> "fastfwd.Counters":
        """Wait until counter ``name`` of ``rule`` reaches ``at_least``; return all counters."""
        deadline = time.monotonic() + timeout
        while True:
            counters = self.counters(rule)
            if getattr(counters, name) >= at_least:
                return counters
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed below {at_least} for {timeout}s: {counters}")
            time.sleep(0.02)

    def close(self) -> None:
        try:
            self._loop.run(self.fw.close())
        finally:
            self._loop.close()


@contextlib.contextmanager
def forwarder(workers: int = 2, **kwargs: Any) -> Iterator[SyncForwarder]:
    fw = SyncForwarder(workers=workers, **kwargs)
    try:
        yield fw
    finally:
        fw.close()


# ------------------------------------------------------------------------------------------
# TCP: sockets, streams
# ------------------------------------------------------------------------------------------

def sysctl_max(name: str) -> int:
    """The maximum of a TCP buffer sysctl (``tcp_rmem``, ``tcp_wmem``): how far the kernel may
    autotune a socket's queue, which differs from host to host."""
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read().split()[2])


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(port: int, host: str = LOOP4, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_stream(sock: socket.socket, data: bytes, gate: threading.Event | None = None,
                shutdown: bool = True) -> int:
    """Send ``data`` in chunks; with ``gate``, send the first half, wait for the gate, then the
    rest. Shut down the write side afterwards (half-close) unless told not to."""
    view = memoryview(data)
    half = len(data) // 2 if gate is not None else len(data)
    for lo, hi in ((0, half), (half, len(data))):
        if gate is not None and lo == half:
            if not gate.wait(TIMEOUT):
                raise AssertionError("send gate was never opened")
        for off in range(lo, hi, CHUNK):
            sock.sendall(view[off:min(off + CHUNK, hi)])
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    return len(data)


class Progress:
    """A byte counter readable from another thread (how far a receiver got)."""

    def __init__(self) -> None:
        self.nbytes = 0


def drain(sock: socket.socket, progress: Progress | None = None, bufsize: int = 1 << 20) -> Received:
    """Read until EOF, hashing everything read."""
    digest = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(buf)
        if not n:
            return Received(total, digest.hexdigest())
        digest.update(view[:n])
        total += n
        if progress is not None:
            progress.nbytes = total


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo_once(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    return recv_exact(sock, len(message))


def closed_how(sock: socket.socket, timeout: float = TIMEOUT) -> str:
    """Wait for the peer to end the connection: ``"reset"`` or ``"eof"``. Fails if data
    arrives instead or nothing happens within ``timeout``."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {timeout}s") from None
    if data:
        raise AssertionError(f"expected the connection to end, got {len(data)} bytes")
    return "eof"


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def exchange(port: int, up: bytes, host: str = LOOP4, gate: threading.Event | None = None,
             progress: Progress | None = None) -> Received:
    """Client side of a two-way transfer: send ``up`` (then half-close) while reading what the
    server sends until its EOF. Returns what was read."""
    with connect(port, host) as sock:
        sender = spawn(send_stream, sock, up, gate)
        got = drain(sock, progress)
        sender.result()
    return got


Handler = Callable[[socket.socket], Any]


def exchange_handler(down: bytes, gate: threading.Event | None = None) -> Handler:
    """Server side of a two-way transfer: send ``down`` (then half-close) while reading the
    client's stream to EOF. The handler's result is what it read."""
    def handle(conn: socket.socket) -> Received:
        sender = spawn(send_stream, conn, down, gate)
        got = drain(conn)
        sender.result()
        return got
    return handle


def echo_handler(conn: socket.socket) -> Received:
    """Echo until EOF, then half-close; the result is what was read."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = conn.recv(1 << 18)
        if not data:
            break
        digest.update(data)
        total += len(data)
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    return Received(total, digest.hexdigest())


def end_of_stream(conn: socket.socket) -> str:
    """Handler: wait for the client to finish: ``"eof"``, ``"reset"`` (data is discarded)."""
    try:
        while conn.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


class TcpServer:
    """A listening TCP socket served by a thread per connection running ``handler``.

    Each handler's outcome (return value or exception) is queued; ``result()`` takes the next
    one. ``close()`` closes the listener and every connection and joins the threads."""

    def __init__(self, handler: Handler, host: str = LOOP4, port: int = 0, backlog: int = 1024) -> None:
        self.handler = handler
        self.host = host
        self.listener = socket.socket(family_of(host), socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(backlog)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._outcomes: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="accept")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.accepted += 1
            self._conns.append(conn)
            worker = threading.Thread(target=self._serve, args=(conn,), daemon=True, name="serve")
            self._threads.append(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._outcomes.put((True, self.handler(conn)))
        except BaseException as exc:
            self._outcomes.put((False, exc))
        finally:
            conn.close()

    def result(self, timeout: float = TIMEOUT) -> Any:
        """The next handler's return value (its exception is re-raised)."""
        try:
            ok, value = self._outcomes.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no server connection finished within {timeout}s") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(TIMEOUT)
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for worker in self._threads:
            worker.join(TIMEOUT)

    def __enter__(self) -> "TcpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Many concurrent TCP connections (asyncio, one thread each side)
# ------------------------------------------------------------------------------------------

class AsyncEchoServer:
    """An asyncio echo server on its own loop thread, for thousands of connections. Echoes
    until EOF, then half-closes; ``received`` holds what each connection read."""

    def __init__(self, host: str = LOOP4, backlog: int = 4096) -> None:
        self.received: list[Received] = []
        self._loop = LoopThread()
        self._server = self._loop.run(asyncio.start_server(self._handle, host, 0, backlog=backlog))
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        total = 0
        try:
            while data := await reader.read(1 << 16):
                digest.update(data)
                total += len(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            self.received.append(Received(total, digest.hexdigest()))
        except OSError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(Exception):
            self._loop.run(stop())
        self._loop.close()

    def __enter__(self) -> "AsyncEchoServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _echo_exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> Received:
    """Send ``data`` and half-close while reading the echo to EOF."""
    try:
        async def send() -> None:
            for off in range(0, len(data), 1 << 16):
                writer.write(data[off:off + (1 << 16)])
                await writer.drain()
            writer.write_eof()
        sender = asyncio.ensure_future(send())
        got = await reader.read()  # until EOF
        await sender
        return Received.of(got)
    finally:
        writer.close()


def many_echo(port: int, payloads: list[bytes], host: str = LOOP4, timeout: float = 60.0,
              all_open: Callable[[], Any] | None = None) -> list[Received]:
    """Open one connection per payload, all at once, and call ``all_open()`` (in a thread)
    once every one is connected; then each sends its payload and half-closes, and reads the
    echo to EOF. Returns what each read (exceptions propagate)."""
    async def run_all() -> list[Received]:
        conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in payloads))
        try:
            if all_open is not None:
                await asyncio.to_thread(all_open)
        except BaseException:
            for _, writer in conns:
                writer.close()
            raise
        return list(await asyncio.gather(*(_echo_exchange(r, w, p) for (r, w), p in zip(conns, payloads))))
    return run_async(run_all(), timeout)


# ------------------------------------------------------------------------------------------
# UDP
# ------------------------------------------------------------------------------------------

def udp_socket(host: str = LOOP4, timeout: float = TIMEOUT, port: int = 0,
               bufsize: int = 4 << 20) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, bufsize)
    sock.bind((host, port))
    sock.settimeout(timeout)
    return sock


def datagram(seq: int, size: int) -> bytes:
    """A datagram of ``size`` bytes that says which one it is (as far as its size allows)."""
    if size < 4:
        return bytes((seq + i) & 0xFF for i in range(size))
    return struct.pack("!I", seq) + payload(MAX_DATAGRAM, seed=seq % 97 + 1)[:size - 4]


class UdpEcho:
    """A UDP echo server in a thread. ``received[source]`` lists, in arrival order, the
    digests of the datagrams each source address (a forwarder session) sent. With
    ``replies`` > 1 it answers each datagram that many times, suffixed ``:00``, ``:01``..."""

    def __init__(self, host: str = LOOP4, port: int = 0, replies: int = 1) -> None:
        self.replies = replies
        self.sock = udp_socket(host, timeout=0.05, port=port)
        self.port: int = self.sock.getsockname()[1]
        self.received: defaultdict[tuple[Any, ...], list[str]] = defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="udp-echo")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            self.received[source].append(hashlib.sha256(data).hexdigest())
            answers = [data] if self.replies == 1 else [data + b":%02d" % i for i in range(self.replies)]
            with contextlib.suppress(OSError):
                for answer in answers:
                    self.sock.sendto(answer, source)

    @property
    def total(self) -> int:
        return sum(len(v) for v in list(self.received.values()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.sock.close()

    def __enter__(self) -> "UdpEcho":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def udp_roundtrip(sock: socket.socket, target: tuple[str, int], data: bytes, tries: int = 3,
                  wait: float = 2.0) -> bytes:
    """Send ``data`` and return the first reply; resend (UDP may drop) up to ``tries`` times."""
    sock.settimeout(wait)
    for _ in range(tries):
        sock.sendto(data, target)
        try:
            return sock.recv(65536)
        except TimeoutError:
            continue
    raise AssertionError(f"no reply to a {len(data)}-byte datagram after {tries} tries")


# ------------------------------------------------------------------------------------------
# Ports
# ------------------------------------------------------------------------------------------

#: Ports 10000-31999 (below the ephemeral range) in blocks, one per test run on the machine:
#: room for the most a test holds at once (test_many_rules: 4,005 with 1,200 more).
PORT_BLOCK = 5500


def _claim_port_block() -> tuple[int, socket.socket | None]:
    """The first port of a block no other test run on this machine searches, and what holds
    it: an abstract Unix socket named after it, freed when this process ends. Runs that probe
    a range free and bind it a while later (a daemon starting) must not search the same ports.
    With every block claimed, the first is shared (None)."""
    for first in range(10000, 32000, PORT_BLOCK):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            claim.bind(f"\0fastfwd-tests-ports-{first}")
            return first, claim
        except OSError:
            claim.close()
    return 10000, None


# Claimed at import, before any test counts this process's fds.
_PORTS_FROM, _PORTS_CLAIM = _claim_port_block()


def free_port_range(count: int, host: str = LOOP4, kinds: tuple[int, ...] = (socket.SOCK_STREAM,),
                    start: int | None = None) -> int:
    """The first of ``count`` consecutive ports free (at the moment of asking) on ``host``, in
    this test run's block (from port ``start`` on, if given)."""
    base = start or _PORTS_FROM
    while base + count <= _PORTS_FROM + PORT_BLOCK:
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                for kind in kinds:
                    s = socket.socket(family_of(host), kind)
                    socks.append(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
                    s.bind((host, port))
            return base
        except OSError:
            base = port + 1  # the first range past the port taken
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {count} consecutive free ports")


def refusing_port(host: str = LOOP4) -> socket.socket:
    """A TCP socket bound but not listening: connections to its port are refused, and holding
    it keeps anyone else from taking the port."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


# ------------------------------------------------------------------------------------------
# A network namespace that swallows everything (root only)
# ------------------------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=TIMEOUT)


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An address that silently drops every packet sent to it: routed through a veth into a
    namespace of our own, which forwards it into a blackhole route. Yields the address."""
    tag = f"ffbh{os.getpid() % 100000}"
    ns, host_if, ns_if = tag, f"{tag}a", f"{tag}b"
    octet = 1 + os.getpid() % 250
    near, far, dead = f"10.254.{octet}.1", f"10.254.{octet}.2", f"10.253.{octet}.9"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{near}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{far}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True, capture_output=True, timeout=TIMEOUT)
        _ip("-n", ns, "route", "add", "blackhole", f"{dead}/32")
        _ip("route", "add", f"{dead}/32", "via", far)
        yield dead
    finally:
        _ip("route", "del", f"{dead}/32", check=False)
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)


# ------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------

def child_env() -> dict[str, str]:
    """The environment for a child Python that must import the same fastfwd as the tests."""
    root = str(Path(fastfwd.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def read_line(proc: subprocess.Popen[str], timeout: float = TIMEOUT) -> str:
    """The next line the child prints, waiting at most ``timeout``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"the child printed nothing within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise AssertionError(f"the child exited ({proc.poll()}) without a line: {err}")
    return line


def stop_process(proc: subprocess.Popen[str], sig: int = 2, timeout: float = TIMEOUT) -> int:
    """Signal the child (SIGINT by default) and reap it; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT)
            raise AssertionError(f"pid {proc.pid} ignored signal {sig} for {timeout}s") from None
    return proc.returncode


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_threads() -> list[str]:
    """The names of every thread of this process, the engine's C threads included (threading
    lists only Python's). A thread that ends while they are read is left out."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass
    return sorted(names)


# A forwarder in a child process: argv[1] is a JSON object {"nofile": N or null, "rules":
# [[spec, proto, {options}], ...], "workers": N}. It prints one JSON line with the real ports,
# then answers each "counters" line on stdin with the JSON counters of every rule (settled), and exits
# when stdin closes.
_CHILD = r"""
import asyncio, dataclasses, json, resource, signal, sys
config = json.loads(sys.argv[1])
if config["default_sigpipe"]:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as some host programs do
if config["nofile"]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (config["nofile"], config["nofile"]))
import fastfwd
from fastfwd.rules import Proto

async def main():
    async with fastfwd.Forwarder(workers=config["workers"]) as fw:
        rules = [await fw.add(fastfwd.Rule.parse(s, p, options=fastfwd.RuleOptions(**o)))
                 for s, p, o in config["rules"]]
        print(json.dumps([r.port for r in rules]), flush=True)
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, sys.stdin.readline)):
            if line.strip() == "counters":
                await fw.settle()   # what the clients already received is counted
                print(json.dumps([dataclasses.asdict(fw.counters(r)) for r in rules]), flush=True)

asyncio.run(main())
"""


@dataclass
class ChildForwarder:
    """A Forwarder running in its own process (own fd limit, own CPU accounting)."""

    proc: subprocess.Popen[str]
    ports: list[int]

    @classmethod
    def start(cls, rules: list[tuple[str, str, dict[str, Any]]], nofile: int | None = None,
              workers: int = 2, wrapper: tuple[str, ...] = (), default_sigpipe: bool = False,
              ) -> "ChildForwarder":
        """``wrapper`` is a command prefix the child runs under (e.g. a seccomp launcher);
        ``default_sigpipe`` gives SIGPIPE its default action (death) instead of Python's ignore."""
        config = json.dumps({"nofile": nofile, "rules": rules, "workers": workers,
                             "default_sigpipe": default_sigpipe})
        proc = subprocess.Popen([*wrapper, sys.executable, "-c", _CHILD, config], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env())
        try:
            ports = json.loads(read_line(proc, 30))
        except BaseException:
            proc.kill()
            proc.wait(TIMEOUT)
            raise
        return cls(proc, ports)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counters(self) -> list[dict[str, int]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("counters\n")
        self.proc.stdin.flush()
        return json.loads(read_line(self.proc))

    def close(self) -> int:
        """Stop the child (closing its stdin); returns its exit status."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            return stop_process(self.proc, 9)
        finally:
            for f in (self.proc.stdout, self.proc.stderr):
                if f is not None:
                    f.close()

    def __enter__(self) -> "ChildForwarder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cli_sandbox(tmp: Path) -> list[str]:
    """CLI flags that keep a ``fastfwd run`` daemon's sockets and state inside ``tmp``."""
    return ["--control-socket", str(tmp / "control.sock"), "--lease-socket", str(tmp / "lease.sock"),
            "--state-dir", str(tmp)]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fastfwd ARGS`` to completion (bounded)."""
    return subprocess.run([sys.executable, "-m", "fastfwd", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastfwd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=child_env())


def connect_retry(port: int, host: str = LOOP4, timeout: float = TIMEOUT) -> socket.socket:
    """Connect, retrying while the port refuses (a listener that is starting up)."""
    def attempt() -> socket.socket | None:
        try:
            return connect(port, host)
        except ConnectionRefusedError:
            return None
    return wait_for(attempt, timeout, interval=0.05, what=f"{host}:{port} to accept connections")


def is_refused(port: int, host: str = LOOP4) -> bool:
    """True if nothing accepts on ``port``: refused, or reset inside connect() (a SYN that
    raced the listener's close and was queued as it went)."""
    try:
        with connect(port, host, timeout=2):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True


def turned_away_how(port: int, host: str = LOOP4, timeout: float = 5.0) -> str:
    """Connect to ``port`` expecting to be turned away: ``"refused"`` (nothing listens),
    ``"reset"`` or ``"eof"`` (accepted, then closed without a byte; a reset can already show
    in connect() itself). Fails if the connection stays open for ``timeout``."""
    try:
        sock = connect(port, host, timeout=timeout)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    with sock:
        return closed_how(sock, timeout)


def turned_away(port: int, host: str = LOOP4, timeout: float = 5.0) -> bool:
    """True if a connection to ``port`` is refused or closed without a byte within ``timeout``."""
    try:
        turned_away_how(port, host, timeout)
    except AssertionError:
        return False
    return True
