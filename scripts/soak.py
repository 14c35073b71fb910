#!/usr/bin/env python3
"""Soak fastfwd under rule churn and traffic, and say what went wrong.

Clients push TCP streams (every byte compared as it comes back) and UDP request/response
through a forwarder while the rule table churns: rules added, removed, re-pointed among live
echo servers, reconfigured (allow, splice mode, timeouts, on_remove/on_retarget), ports moved
from one rule to another in one apply, target names resolved to changing addresses (or to
none). Two targets: a ``fastfwd.Forwarder`` in this process (``inprocess``) and a
``fastfwd run`` daemon whose watched config file is rewritten and SIGHUPed (``daemon``).

What counts as a defect:

- a client reads bytes it did not send (always);
- a connection or datagram on a *steady* rule fails: steady rules are never removed, are
  re-pointed with ``on_retarget = "keep"`` among live servers and reconfigured with options
  that still admit the clients, so nothing they carry may be refused, reset or cut;
- a connection on a *churned* port fails while no change that docs/config.md lets end it
  (the rule removed; re-pointed or made pending with ``on_retarget = "close"``; for UDP any
  re-pointing, as sessions move at once) happened during its life;
- a rule whose ``allow`` refuses the clients lets a byte through, whatever else changes;
- after traffic stops and every rule is gone, the engine still holds connections or
  sessions, or the process holds more fds or threads than at the start; the steady rules'
  counters after ``settle()`` differ from what the clients and far ends moved.

RSS is sampled and reported (growth over the second half of a run is flagged).

    python scripts/soak.py inprocess --duration 300
    python scripts/soak.py daemon --duration 120
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fastfwd  # noqa: E402
from fastfwd import Rule, RuleOptions  # noqa: E402

LOOP = "127.0.0.1"
#: The addresses a target name moves among: each has an echo server on the same port.
NAME_ADDRS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
#: Admitting allow lists the churn cycles through; REFUSING never admits a loopback client.
ADMITTING = ((), ("127.0.0.0/8",), ("127.0.0.1/32", "10.0.0.0/8"), ("::1/128", "127.0.0.0/8"))
REFUSING = ("10.0.0.0/8",)
PATTERN = random.Random(7).randbytes(1 << 21)   # streams are slices of it


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> Counter[str]:
    """What a process's fds are (socket, pipe, anon_inode:[eventfd], a path), counted."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            kinds[os.readlink(f"/proc/{pid}/fd/{fd}").split(":[")[0]] += 1
    return kinds


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def consecutive_ports(count: int, hosts: tuple[str, ...] = (LOOP,)) -> int:
    """A first port of ``count`` ports free for TCP and UDP on every one of ``hosts``."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(10000, 32000 - count)     # below the ephemeral ports clients get
        held: list[socket.socket] = []
        try:
            for host in hosts:
                for port in range(first, first + count):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        s = socket.socket(socket.AF_INET, kind)
                        held.append(s)
                        s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


# -- the far ends ----------------------------------------------------------------------------
class Farm:
    """TCP and UDP echo servers served by one selector thread; each counts what it received."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-farm", daemon=True)
        self.tcp_bytes: Counter[tuple[str, int]] = Counter()
        self.udp_datagrams: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._new: list[socket.socket] = []

    def serve(self, host: str, first: int, count: int = 1) -> None:
        for port in range(first, first + count):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            tcp.listen(512)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((host, port))
            for s in (tcp, udp):
                s.setblocking(False)
            with self._lock:
                self._new += [tcp, udp]

    def __enter__(self) -> "Farm":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()     # type: ignore[union-attr]
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                new, self._new = self._new, []
            for s in new:
                self._sel.register(s, selectors.EVENT_READ, ("listen" if s.type == socket.SOCK_STREAM else "udp", None))
            for key, events in self._sel.select(0.1):
                kind, state = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if kind == "listen":
                        self._accept(sock)
                    elif kind == "udp":
                        self._udp(sock)
                    else:
                        self._conn(sock, state, events)
                except OSError:
                    self._drop(sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self._sel.register(conn, selectors.EVENT_READ,
                               ("conn", {"out": bytearray(), "eof": False, "at": listener.getsockname()}))

    def _udp(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, peer = sock.recvfrom(65536)
            except BlockingIOError:
                return
            self.udp_datagrams[sock.getsockname()] += 1
            sock.sendto(data, peer)

    def _conn(self, conn: socket.socket, state: dict, events: int) -> None:
        out: bytearray = state["out"]
        if events & selectors.EVENT_READ and len(out) < 1 << 20:
            data = conn.recv(1 << 16)
            if data:
                self.tcp_bytes[state["at"]] += len(data)
                out += data
            else:
                state["eof"] = True
        if out:
            with contextlib.suppress(BlockingIOError):
                del out[:conn.send(out)]
        if state["eof"] and not out:
            self._drop(conn)        # echoed everything: the client sees the end of the stream
            return
        want = (selectors.EVENT_READ if len(out) < 1 << 20 and not state["eof"] else 0) | \
            (selectors.EVENT_WRITE if out else 0)
        self._sel.modify(conn, want or selectors.EVENT_READ, ("conn", state))

    def _drop(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()


# -- what the clients may see ----------------------------------------------------------------
class Ledger:
    """Per listening port: whether it forwards now, and a count of the changes that may end a
    connection or lose a datagram on it. A client notes both when it starts; a failure is
    allowed only if the port was not forwarding then or the count moved during its life."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[str, int], bool] = {}
        self._changes: Counter[tuple[str, int]] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.defects: list[str] = []
        self.bytes_moved = 0
        self.datagrams = 0
        #: Steady rules' traffic as the clients saw it: port -> [connections, bytes up, bytes down, replies]
        self.steady: dict[tuple[str, int], list[int]] = {}

    def disrupt(self, proto: str, port: int) -> None:
        with self._lock:
            self._changes[(proto, port)] += 1
            self._live[(proto, port)] = False

    def forwarding(self, proto: str, port: int, live: bool) -> None:
        with self._lock:
            self._live[(proto, port)] = live

    def mark(self, proto: str, port: int) -> tuple[bool, int]:
        with self._lock:
            return self._live.get((proto, port), False), self._changes[(proto, port)]

    def settle(self, proto: str, port: int, start: tuple[bool, int], outcome: str, detail: str,
               steady: bool) -> None:
        with self._lock:
            self.outcomes[f"{proto} {outcome}"] += 1
            if outcome in ("ok", "refused as wanted"):
                return
            excused = not start[0] or self._changes[(proto, port)] != start[1]
            if outcome == "wrong bytes" or not excused:
                self.defects.append(f"{proto} port {port}: {outcome} ({detail}){' on a steady rule' * steady}")

    def count_steady(self, port: int, index: int, amount: int) -> None:
        with self._lock:
            self.steady.setdefault(("tcp" if index < 3 else "udp", port), [0, 0, 0, 0])[index] += amount


def tcp_stream(port: int, size: int, offset: int, timeout: float = 30.0) -> tuple[str, str, int]:
    """Send PATTERN[offset:offset+size] through ``port`` to an echo server and compare what
    comes back. Returns (outcome, detail, bytes echoed)."""
    want = memoryview(PATTERN)[offset:offset + size]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    try:
        sock.connect((LOOP, port))
    except OSError as exc:
        sock.close()
        return "refused", exc.strerror or str(exc), 0
    sock.setblocking(False)
    sent = got = 0
    deadline = time.monotonic() + timeout
    with sock, selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while time.monotonic() < deadline:
            ready = sel.select(1.0)
            if not ready:
                continue
            events = ready[0][1]
            try:
                if events & selectors.EVENT_WRITE and sent < size:
                    sent += sock.send(want[sent:sent + (1 << 17)])
                    if sent == size:
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    data = sock.recv(1 << 17)
                    if not data:
                        return ("ok", "", got) if got == size else ("cut", f"end after {got} of {size}", got)
                    if data != want[got:got + len(data)]:
                        return "wrong bytes", f"at offset {got} of {size}", got
                    got += len(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                return "reset", f"{exc.strerror} after {got} of {size}", got
        return "stalled", f"{got} of {size} back after {timeout}s", got


def tcp_refused(port: int) -> tuple[str, str]:
    """A client of a rule whose allow list refuses it: nothing may come back."""
    try:
        with socket.create_connection((LOOP, port), timeout=5.0) as sock:
            sock.sendall(b"let me in")
            data = sock.recv(100)
    except OSError:
        return "refused as wanted", ""
    return ("refused as wanted", "") if not data else ("wrong bytes", f"{len(data)} bytes through a refusing rule")


class Clients:
    """Client threads: TCP streams on every rule's ports, UDP request/response per session."""

    def __init__(self, ledger: Ledger, tcp_ports: list[tuple[int, bool]], udp_ports: list[tuple[int, bool]],
                 refusing: list[int], tcp_threads: int = 6, udp_threads: int = 3, max_size: int = 1 << 20) -> None:
        self.ledger = ledger
        self.tcp_ports = tcp_ports
        self.udp_ports = udp_ports
        self.refusing = refusing
        self.max_size = max_size
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._tcp, args=(i,), daemon=True) for i in range(tcp_threads)]
        self.threads += [threading.Thread(target=self._udp, args=(i,), daemon=True) for i in range(udp_threads)]

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _tcp(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if self.refusing and rng.random() < 0.05:
                port = rng.choice(self.refusing)
                outcome, detail = tcp_refused(port)
                self.ledger.settle("tcp", port, (True, 0), outcome, detail, steady=True)
                continue
            port, steady = rng.choice(self.tcp_ports)
            # Mostly short exchanges (copied), some long enough to be spliced.
            size = rng.choice((rng.randrange(1, 4096), rng.randrange(1, 1 << 16), rng.randrange(1, self.max_size)))
            start = self.ledger.mark("tcp", port)
            outcome, detail, got = tcp_stream(port, size, rng.randrange(len(PATTERN) - size))
            self.ledger.bytes_moved += got
            if steady and outcome == "ok":
                self.ledger.count_steady(port, 0, 1)
                self.ledger.count_steady(port, 1, size)
                self.ledger.count_steady(port, 2, got)
            self.ledger.settle("tcp", port, start, outcome, detail, steady)

    def _udp(self, seed: int) -> None:
        rng = random.Random(1000 + seed)
        socks = {port: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for port, _ in self.udp_ports}
        try:
            seq = 0
            while not self.stop.is_set():
                # Half on the steady rules: a churned port's lost datagram costs a second's wait.
                steady_turn = rng.random() < 0.5
                port, steady = rng.choice([p for p in self.udp_ports if p[1] == steady_turn] or self.udp_ports)
                sock = socks[port]
                seq += 1
                message = seq.to_bytes(8, "big") + PATTERN[seq % 4096:seq % 4096 + rng.randrange(1, 1400)]
                start = self.ledger.mark("udp", port)
                outcome, detail = self._ask(sock, port, message, steady)
                self.ledger.datagrams += outcome == "ok"
                self.ledger.settle("udp", port, start, outcome, detail, steady)
        finally:
            for port, sock in socks.items():
                self._drain(sock, port, dict(self.udp_ports)[port])
                sock.close()

    def _drain(self, sock: socket.socket, port: int, steady: bool) -> None:
        # Late replies still count: the rule counted them as sent.
        sock.settimeout(0.3)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                if steady:
                    self.ledger.count_steady(port, 3, 1)

    def _ask(self, sock: socket.socket, port: int, message: bytes, steady: bool) -> tuple[str, str]:
        sock.sendto(message, (LOOP, port))
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(65536)
            except TimeoutError:
                break
            except OSError as exc:      # an ICMP error from a port that stopped listening
                return "refused", exc.strerror or str(exc)
            if steady:
                self.ledger.count_steady(port, 3, 1)
            if reply == message:
                return "ok", ""
            if reply[8:] != PATTERN[int.from_bytes(reply[:8], "big") % 4096:][:len(reply) - 8]:
                return "wrong bytes", f"a {len(reply)}-byte reply no one sent"
            # An earlier question's late reply: right bytes, keep waiting for this one's.
        return "lost", "no reply in 1s"


# -- the rule tables -------------------------------------------------------------------------
@dataclasses.dataclass
class Layout:
    """Ports of one soak: steady rules, a refusing rule, a churned block per protocol, and
    the echo servers they point at."""

    steady_tcp: list[int]
    steady_udp: list[int]
    refusing: int
    churn: int                      # first port of the churned block (TCP and UDP)
    churn_count: int
    blocked: int                    # after the block, held by another socket: a rule there fails
    steady_targets: list[int]       # echo servers on LOOP for the steady rules
    groups: list[int]               # first ports of 3-port echo server groups for churned ranges
    name_port: int                  # echo servers on every NAME_ADDRS address
    named_tcp: int                  # steady rules onto the name "steady"
    named_udp: int

    @classmethod
    def make(cls, farm: Farm, churn_count: int = 10) -> "Layout":
        # Each server bound before the next ports are looked for, so none is picked twice.
        steady_targets = []
        for _ in range(3):
            steady_targets.append(consecutive_ports(1))
            farm.serve(LOOP, steady_targets[-1])
        groups = []
        for _ in range(3):
            groups.append(consecutive_ports(3))
            farm.serve(LOOP, groups[-1], 3)
        name_port = consecutive_ports(1, NAME_ADDRS)
        for host in NAME_ADDRS:
            farm.serve(host, name_port)
        listen = consecutive_ports(9 + churn_count)
        return cls(steady_tcp=[listen, listen + 1, listen + 2], steady_udp=[listen + 3, listen + 4],
                   refusing=listen + 5, named_tcp=listen + 6, named_udp=listen + 7,
                   churn=listen + 8, churn_count=churn_count, blocked=listen + 8 + churn_count, steady_targets=steady_targets,
                   groups=groups, name_port=name_port)

    def client_ports(self) -> tuple[list[tuple[int, bool]], list[tuple[int, bool]]]:
        tcp = [(p, True) for p in self.steady_tcp + [self.named_tcp]]
        udp = [(p, True) for p in self.steady_udp + [self.named_udp]]
        churned = [(p, False) for p in range(self.churn, self.churn + self.churn_count)]
        return tcp + churned, udp + churned


def random_options(rng: random.Random, admitting: bool = True, **fixed: object) -> RuleOptions:
    return RuleOptions(**{
        "connect_timeout": rng.choice((2.0, 5.0, 10.0)),
        "idle_timeout": rng.choice((30.0, 600.0, 0.0)),
        "half_closed_timeout": rng.choice((20.0, 120.0)),
        "splice": rng.choice(("auto", "always", "never")),
        "splice_threshold": rng.choice((1, 4096, 65536)),
        "udp_idle_timeout": rng.choice((10.0, 60.0)),
        "udp_max_sessions": rng.choice((64, 4096)),
        "allow": rng.choice(ADMITTING) if admitting else REFUSING,
        "on_retarget": rng.choice(("keep", "close")),
        "on_remove": rng.choice(("keep", "close")),
        **fixed})


def table(layout: Layout, rng: random.Random) -> list[Rule]:
    """One rule table: the steady rules (targets and options drawn anew), the refusing rule,
    and the churned block cut into rules of 1 to 3 ports at random, some absent."""
    rules = [Rule.parse(f"{p}:{LOOP}:{rng.choice(layout.steady_targets)}", "tcp",
                        options=random_options(rng, on_retarget="keep")) for p in layout.steady_tcp]
    # Re-pointing a UDP rule loses the replies in flight: the first steady UDP rule never
    # moves (a datagram it loses is a defect), the others seldom.
    rules += [Rule.parse(f"{p}:{LOOP}:{layout.steady_targets[i > 0 and rng.random() < 0.05]}", "udp",
                         options=random_options(rng, on_retarget="keep")) for i, p in enumerate(layout.steady_udp)]
    rules.append(Rule.parse(f"{layout.refusing}:{LOOP}:{layout.steady_targets[0]}", "tcp",
                            options=random_options(rng, admitting=False)))
    rules += [Rule.parse(f"{layout.named_tcp}:steady:{layout.name_port}", "tcp", options=random_options(rng, on_retarget="keep")),
              Rule.parse(f"{layout.named_udp}:steady:{layout.name_port}", "udp", options=random_options(rng, on_retarget="keep"))]
    for proto in ("tcp", "udp"):
        port, end = layout.churn, layout.churn + layout.churn_count
        while port < end:
            count = min(rng.randint(1, 3), end - port)
            if rng.random() < 0.75:
                if rng.random() < 0.2 and count == 1:
                    target = f"flaky:{layout.name_port}"
                else:
                    first = rng.choice(layout.groups)
                    target = f"{LOOP}:{first}" + (f"-{first + count - 1}" if count > 1 else "")
                listen = f"{port}" + (f"-{port + count - 1}" if count > 1 else "")
                rules.append(Rule.parse(f"{listen}:{target}", proto, options=random_options(rng)))
            port += count
    return rules


def rejected(layout: Layout, rules: list[Rule], rng: random.Random) -> list[Rule]:
    """``rules`` with a TCP rule on the blocked port added: half the time taking the churned
    block's last port too (its rule removed), so the failure comes after removals are planned
    and kept rules were updated, rather than among the first new rules."""
    last = layout.blocked - 1
    if rng.random() < 0.5:
        return rules + [Rule.parse(f"{layout.blocked}:{LOOP}:{layout.groups[0]}")]
    rest = [r for r in rules if not (r.proto == "tcp" and r.listen_port <= last < r.listen_port + r.count)]
    return rest + [Rule.parse(f"{last}-{layout.blocked}:{LOOP}:{layout.groups[0]}-{layout.groups[0] + 1}")]


def disrupted(before: dict[tuple[str, int], Rule], after: dict[tuple[str, int], Rule],
              names_before: dict[str, str | None], names_after: dict[str, str | None]) -> set[tuple[str, int]]:
    """Ports where going from ``before`` to ``after`` (rules by protocol and port, names to
    addresses) may end a connection or lose a datagram, as docs/config.md has it."""
    out = set()
    for slot, old in before.items():
        new = after.get(slot)
        if new is None or new.key != old.key:
            out.add(slot)           # removed (or its port went to another rule)
            continue
        old_at = (names_before.get(old.target_host, old.target_host), old.target_port)
        new_at = (names_after.get(new.target_host, new.target_host), new.target_port)
        if old_at != new_at and (new.proto == "udp" or new.options.on_retarget == "close" or new_at[0] is None):
            out.add(slot)
    return out


def by_port(rules: list[Rule]) -> dict[tuple[str, int], Rule]:
    return {(r.proto, p): r for r in rules for p in range(r.listen_port, r.listen_port + r.count)}


# -- the in-process soak ---------------------------------------------------------------------
@dataclasses.dataclass
class Report:
    seconds: float = 0.0
    applies: int = 0
    resolves: int = 0
    reloads: int = 0
    rejected: int = 0
    defects: list[str] = dataclasses.field(default_factory=list)
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    bytes_echoed: int = 0
    datagrams: int = 0
    rss_kib: list[int] = dataclasses.field(default_factory=list)
    fds: tuple[int, int] = (0, 0)
    threads: tuple[int, int] = (0, 0)

    def close(self, ledger: Ledger) -> "Report":
        """Take the clients' findings in, and judge the RSS samples."""
        self.defects += ledger.defects
        self.outcomes = ledger.outcomes
        self.bytes_echoed, self.datagrams = ledger.bytes_moved, ledger.datagrams
        if (growth := rss_growth_defect(self.rss_kib)) is not None:
            self.defects.append(growth)
        return self

    def summary(self) -> str:
        rss = f"{self.rss_kib[0]}..{max(self.rss_kib)}..{self.rss_kib[-1]} KiB" if self.rss_kib else "-"
        lines = [f"ran {self.seconds:.0f}s: {self.applies} applies ({self.rejected} rejected as meant), "
                 f"{self.resolves} resolves, {self.reloads} reloads",
                 f"traffic: {self.bytes_echoed / 1e6:.1f} MB echoed over TCP, {self.datagrams} UDP round trips",
                 "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
                 f"fds start/end {self.fds[0]}/{self.fds[1]}, threads start/end {self.threads[0]}/{self.threads[1]}, "
                 f"RSS start..max..end {rss}",
                 f"defects: {len(self.defects)}"]
        return "\n".join(lines + [f"  {d}" for d in self.defects[:50]])


def rss_growth_defect(samples: list[int], slack_kib: int = 32 * 1024) -> str | None:
    """RSS over the second half of a run may wobble, not climb past ``slack_kib``."""
    if len(samples) < 6:
        return None
    half = samples[len(samples) // 2:]
    if half[-1] - min(half) > slack_kib and half[-1] == max(half):
        return f"RSS kept growing: {min(half)} -> {half[-1]} KiB over the second half"
    return None


async def wait_idle(fw: fastfwd.Forwarder, seconds: float = 20.0) -> dict[str, int]:
    engine = fw._require()
    deadline = time.monotonic() + seconds
    while True:
        held = engine.resources()
        if not (held["connections"] or held["sessions"] or held["rules"]) or time.monotonic() > deadline:
            return held
        await asyncio.sleep(0.1)


async def expect_rejected(fw: fastfwd.Forwarder, failing: list[Rule], current: list[Rule], ledger: Ledger) -> None:
    """Apply ``failing`` (one rule of it cannot listen): it must raise and change nothing."""
    try:
        await fw.apply(failing)
    except OSError:
        pass
    else:
        ledger.defects.append("an apply with a port held by another socket succeeded")
    held = sorted((str(a.rule), a.rule.options) for a in fw.rules)
    if held != sorted((str(r), r.options) for r in current):
        ledger.defects.append("a rejected apply left the table changed")


async def soak_inprocess(duration: float, pause: float = 0.0, tcp_threads: int = 6, udp_threads: int = 3,
                         max_size: int = 1 << 20, log_every: float = 30.0) -> Report:
    """Churn a 2-worker Forwarder in this process under traffic for ``duration`` seconds."""
    report = Report()
    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")) or None)
    ledger = Ledger()
    pid = os.getpid()
    with Farm() as farm, contextlib.ExitStack() as hold:
        layout = Layout.make(farm)
        hold.enter_context(socket.create_server((LOOP, layout.blocked)))
        await asyncio.sleep(0.3)        # the farm's thread takes the new sockets
        fds0, threads0 = fd_count(pid), thread_count(pid)
        fw = fastfwd.Forwarder(workers=2)
        await fw.start()
        names = {"steady": NAME_ADDRS[0], "flaky": NAME_ADDRS[0]}
        for name, ip in names.items():
            await fw.resolve(name, ip)
        current = table(layout, rng)
        await fw.apply(current)
        for slot in by_port(current):
            ledger.forwarding(*slot, True)
        tcp, udp = layout.client_ports()
        started = time.monotonic()
        next_log = started + log_every
        with Clients(ledger, tcp, udp, [layout.refusing], tcp_threads, udp_threads, max_size):
            while time.monotonic() - started < duration:
                names_after = dict(names)
                resolve = None
                if rng.random() < 0.3:
                    name = rng.choice(("steady", "flaky"))
                    resolve = (name, rng.choice(NAME_ADDRS + ((None,) if name == "flaky" else ())))
                    names_after[resolve[0]] = resolve[1]
                wanted = table(layout, rng) if resolve is None or rng.random() < 0.5 else current
                before, after = by_port(current), by_port(wanted)
                for slot in disrupted(before, after, names, names_after) if resolve is None else \
                        disrupted(before, before, names, names_after) | disrupted(before, after, names_after, names_after):
                    ledger.disrupt(*slot)
                if resolve is not None:
                    await fw.resolve(*resolve)
                    report.resolves += 1
                    names = names_after
                if resolve is None and rng.random() < 0.05:
                    # A rejected apply: steps taken are undone, so either side may be seen.
                    failing = rejected(layout, wanted, rng)
                    for slot in disrupted(before, by_port(failing), names, names) | \
                            disrupted(by_port(failing), before, names, names):
                        ledger.disrupt(*slot)
                    await expect_rejected(fw, failing, current, ledger)
                    report.rejected += 1
                if wanted is not current:
                    await fw.apply(wanted)
                    report.applies += 1
                    current = wanted
                for slot, rule in by_port(current).items():
                    ledger.forwarding(*slot, names.get(rule.target_host, rule.target_host) is not None)
                if time.monotonic() > next_log:
                    report.rss_kib.append(rss_kib(pid))
                    next_log += log_every
                    print(f"[{time.monotonic() - started:5.0f}s] {report.applies} applies, "
                          f"{ledger.bytes_moved / 1e6:.0f} MB, {ledger.datagrams} datagrams, "
                          f"{len(ledger.defects)} defects, RSS {report.rss_kib[-1]} KiB", flush=True)
                await asyncio.sleep(pause * rng.random() if pause else 0)
        report.seconds = time.monotonic() - started
        # Traffic has stopped: the steady rules' counters must equal what the clients moved.
        await fw.settle()
        for port in layout.steady_tcp + [layout.named_tcp]:
            conns, up, down, _ = ledger.steady.get(("tcp", port), [0, 0, 0, 0])
            c = fw.counters(Rule.parse(f"{port}:{LOOP}:1"))
            if (c.accepted, c.bytes_up, c.bytes_down) != (conns, up, down):
                ledger.defects.append(f"tcp port {port}: counters accepted/up/down {c.accepted}/{c.bytes_up}/"
                                      f"{c.bytes_down}, clients completed {conns}/{up}/{down}")
        for port in layout.steady_udp + [layout.named_udp]:
            replies = ledger.steady.get(("udp", port), [0, 0, 0, 0])[3]
            c = fw.counters(Rule.parse(f"{port}:{LOOP}:1", "udp"))
            if c.datagrams_down != replies:
                ledger.defects.append(f"udp port {port}: counters datagrams_down {c.datagrams_down}, "
                                      f"clients got {replies} replies")
        # Only steady rules point at the steady targets (the refusing one never connects).
        far = [(LOOP, port) for port in layout.steady_targets]
        up = sum(fw.counters(Rule.parse(f"{p}:{LOOP}:1")).bytes_up for p in layout.steady_tcp)
        datagrams = sum(fw.counters(Rule.parse(f"{p}:{LOOP}:1", "udp")).datagrams_up for p in layout.steady_udp)
        if (up, datagrams) != (sum(farm.tcp_bytes[a] for a in far), sum(farm.udp_datagrams[a] for a in far)):
            ledger.defects.append(f"steady rules counted {up} bytes and {datagrams} datagrams up, their targets got "
                                  f"{sum(farm.tcp_bytes[a] for a in far)} and {sum(farm.udp_datagrams[a] for a in far)}")
        await fw.apply([])
        held = await wait_idle(fw)
        if held["connections"] or held["sessions"] or held["rules"]:
            ledger.defects.append(f"engine still holds {held} with no rules and no traffic")
        await fw.close()
        report.rss_kib.append(rss_kib(pid))
        fds1, threads1 = fd_count(pid), thread_count(pid)
        report.fds, report.threads = (fds0, fds1), (threads0, threads1)
        if fds1 != fds0 or threads1 != threads0:
            ledger.defects.append(f"process holds {fds1} fds and {threads1} threads, {fds0} and {threads0} at start")
    return report.close(ledger)


# -- the daemon soak -------------------------------------------------------------------------
def toml_value(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def render(rules: list[Rule], names: dict[str, str | None]) -> str:
    """A config file holding ``rules``, with [hosts] entries for the names that have an address."""
    out = ["# written by scripts/soak.py"]     # with no rule, forwards nothing (not: empty)
    for r in rules:
        last = r.listen_port + r.count - 1
        listen = f"{r.listen_host}:{r.listen_port}" + (f"-{last}" if r.count > 1 else "")
        to = f"{r.target_host}:{r.target_port}" + (f"-{r.target_port + r.count - 1}" if r.count > 1 else "")
        out += ["[[forward]]", f'proto = "{r.proto}"', f'listen = "{listen}"', f'to = "{to}"']
        out += [f"{f.name} = {toml_value(getattr(r.options, f.name))}" for f in dataclasses.fields(r.options)
                if f.name != "source"]
        out.append("")
    for name, ip in names.items():
        if ip is not None:
            out += [f"[hosts.{name}]", f'ip = "{ip}"', ""]
    return "\n".join(out)


def soak_daemon(duration: float, pause: float = 0.2, log_every: float = 30.0) -> Report:
    """Churn a ``fastfwd run -c FILE`` daemon (2 workers) by rewriting its config file (every
    other change also sent SIGHUP) under traffic for ``duration`` seconds."""
    report = Report()
    rng = random.Random(int(os.environ.get("SOAK_SEED", "0")) or None)
    ledger = Ledger()
    with Farm() as farm, tempfile.TemporaryDirectory(prefix="fastfwd-soak-") as tmp:
        layout = Layout.make(farm)
        config = Path(tmp) / "fastfwd.toml"
        names: dict[str, str | None] = {"steady": NAME_ADDRS[0], "flaky": NAME_ADDRS[0]}
        first = current = table(layout, rng)
        config.write_text(render(current, names))
        log_path = Path(tmp) / "daemon.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fastfwd", "run", "-c", str(config), "--workers", "2",
                 "--control-socket", f"{tmp}/control.sock", "--lease-socket", f"{tmp}/lease.sock",
                 "--state-dir", f"{tmp}/state"], stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env)
        try:
            def wait_log(text: str, count: int, seconds: float = 20.0) -> None:
                deadline = time.monotonic() + seconds
                while log_path.read_text().count(text) < count:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"no {text!r} #{count} in the daemon log:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.02)

            def wait_quiet(text: str) -> None:
                """Until no reload has ended for a moment: the watcher and SIGHUP each reload."""
                seen = log_path.read_text().count(text)
                while True:
                    time.sleep(0.3)
                    now = log_path.read_text().count(text)
                    if now == seen:
                        return
                    seen = now

            def reload(wanted: list[Rule], names_after: dict[str, str | None], hup: bool) -> None:
                nonlocal current, names
                for slot in disrupted(by_port(current), by_port(wanted), names, names_after):
                    ledger.disrupt(*slot)
                text = render(wanted, names_after)
                if text != render(current, names):
                    applied = log_path.read_text().count(" applied: ")
                    fresh = config.with_suffix(".new")
                    fresh.write_text(text)
                    os.replace(fresh, config)       # as an editor saves: the watcher sees a rename
                    if hup:
                        proc.send_signal(signal.SIGHUP)
                    wait_log(" applied: ", applied + 1)
                    wait_quiet(" applied: ")
                current, names = wanted, names_after
                for slot, rule in by_port(current).items():
                    ledger.forwarding(*slot, names.get(rule.target_host, rule.target_host) is not None)

            wait_log("fastfwd started", 1)
            for slot in by_port(current):
                ledger.forwarding(*slot, True)
            # The baseline forwards nothing, after a reload there and back: what a reload starts
            # once (an executor thread) is then in it, and no UDP session (they end at idle
            # timeout) is. Pipes are left out: the engine keeps up to 64 spare per worker.
            reload(table(layout, rng), names, hup=True)
            reload([], names, hup=False)
            kinds0, threads0 = fd_kinds(proc.pid), thread_count(proc.pid)
            reload(first, names, hup=True)
            report.rss_kib.append(rss_kib(proc.pid))
            tcp, udp = layout.client_ports()
            started = time.monotonic()
            next_log = started + log_every
            with Clients(ledger, tcp, udp, [layout.refusing]):
                while time.monotonic() - started < duration:
                    names_after = dict(names)
                    if rng.random() < 0.3:
                        name = rng.choice(("steady", "flaky"))
                        names_after[name] = rng.choice(NAME_ADDRS + ((None,) if name == "flaky" else ()))
                        report.resolves += 1
                    reload(table(layout, rng), names_after, hup=rng.random() < 0.5)
                    report.reloads += 1
                    if time.monotonic() > next_log:
                        report.rss_kib.append(rss_kib(proc.pid))
                        next_log += log_every
                        print(f"[{time.monotonic() - started:5.0f}s] {report.reloads} reloads, "
                              f"{ledger.bytes_moved / 1e6:.0f} MB, {ledger.datagrams} datagrams, "
                              f"{len(ledger.defects)} defects, RSS {report.rss_kib[-1]} KiB", flush=True)
                    time.sleep(pause * rng.random())
            report.seconds = time.monotonic() - started
            # Forwarding nothing, with no traffic: the daemon holds what it held at the start.
            reload([], names, hup=True)
            deadline = time.monotonic() + 20
            while fd_kinds(proc.pid) - Counter(pipe=10 ** 6) != kinds0 - Counter(pipe=10 ** 6) and time.monotonic() < deadline:
                time.sleep(0.1)
            kinds1, threads1 = fd_kinds(proc.pid), thread_count(proc.pid)
            report.fds = (sum(kinds0.values()), sum(kinds1.values()))
            report.threads = (threads0, threads1)
            report.rss_kib.append(rss_kib(proc.pid))
            if kinds1 - Counter(pipe=10 ** 6) != kinds0 - Counter(pipe=10 ** 6) or threads1 != threads0:
                ledger.defects.append(f"daemon holds {threads1} threads, {threads0} at start; fds gained "
                                      f"{kinds1 - kinds0}, lost {kinds0 - kinds1}")
            log_text = log_path.read_text()
            for line in log_text.splitlines():
                if "Traceback" in line or " ERROR " in line or "could not undo" in line:
                    ledger.defects.append(f"daemon log: {line.strip()}")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.returncode not in (0, -signal.SIGINT):
                ledger.defects.append(f"daemon exited with {proc.returncode}")
    return report.close(ledger)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Exit status 1 if any defect was seen. SOAK_SEED=N repeats a run's choices.")
    parser.add_argument("mode", choices=("inprocess", "daemon"), help="what to churn")
    parser.add_argument("--duration", type=float, default=60.0, metavar="SECONDS", help="how long (default 60)")
    parser.add_argument("--pause", type=float, default=None, metavar="SECONDS",
                        help="up to this long between changes (default: 0.02 in process, 0.2 for the daemon)")
    parser.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS", help="progress line interval")
    args = parser.parse_args()
    # Rules going pending and coming back are the point here, not news.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
    if args.mode == "inprocess":
        import uvloop
        pause = 0.02 if args.pause is None else args.pause
        report = uvloop.run(soak_inprocess(args.duration, pause, log_every=args.log_every))
    else:
        report = soak_daemon(args.duration, 0.2 if args.pause is None else args.pause, log_every=args.log_every)
    print(report.summary())
    return 1 if report.defects else 0


if __name__ == "__main__":
    sys.exit(main())
