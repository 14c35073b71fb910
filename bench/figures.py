"""The figures: what each one runs against a subject and what it reports.

Every load generator prints ``window`` when its measured window opens and one JSON line when
it closes; the forwarder's CPU time and the whole box's busy time are sampled at those two
moments, so CPU figures cover exactly the measured traffic.
"""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .build import tool
from .procs import Proc
from .subjects import Running, Subject
from .system import TW_REUSE, BoxCpu, forget_time_wait, local_port_range, low_latency, sysctl

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Settings:
    warmup: float  # seconds of load before a window opens
    seconds: float  # length of a measured window
    round_trips: int
    idle_conns: int
    concurrency: int  # connections in flight in the connection-rate run
    sources: int  # client addresses 127.0.1.1..N for the connection-rate run


FULL = Settings(warmup=1.0, seconds=4.0, round_trips=20000, idle_conns=9900, concurrency=64, sources=16)
QUICK = Settings(warmup=0.3, seconds=1.0, round_trips=3000, idle_conns=2000, concurrency=64, sources=16)

Metrics = dict[str, float | int | str | None]


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    higher_better: bool | None = None  # None: informational, not ranked


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    proto: str
    #: The first column is the headline: ranked, and the one ratios are given for.
    columns: tuple[Column, ...]
    measure: Callable[[Settings, Subject, Running], Metrics]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    needs_forwarder: bool = False
    setting: str = ""
    #: How many leading columns get ratios to the direct path and the best peer.
    compared: int = 1
    #: Programs it runs besides the bench's own (checked before a run starts).
    needs: tuple[str, ...] = ()
    #: Rounds of a full run when --repeats does not say: more for a figure whose rounds
    #: spread widely, so its median settles.
    rounds: int = 3

    @property
    def headline(self) -> Column:
        return self.columns[0]

    @property
    def ratio_columns(self) -> tuple[Column, ...]:
        return self.columns[:self.compared]


def windowed(argv: list[str], running: Running, limit: float = 120.0,
             forwarder_cpu: bool = True) -> tuple[dict, float | None, float]:
    """Run a load generator; returns its result, the forwarder CPU seconds spent in its
    window (None on the direct path, or when not asked for) and how many cores the whole box
    kept busy. A generator still running after ``limit`` seconds is stopped (a stuck subject).

    Sampling the forwarder walks all of /proc (a few ms of this process on one core) right as
    the window opens; a figure that does not report the forwarder's CPU passes
    ``forwarder_cpu=False`` so that work does not land in its window."""
    proc = Proc(argv, stdout=subprocess.PIPE, log=running.workdir / "load.log")
    watchdog = threading.Timer(limit, proc.stop)
    watchdog.start()
    try:
        assert proc.popen.stdout is not None
        first = proc.popen.stdout.readline().strip()
        if first != "window":
            raise RuntimeError(f"{Path(argv[0]).name} failed (exit {proc.popen.wait()}): "
                               f"{first or proc.log_tail(2)}")
        box, fwd = BoxCpu.now(), running.usage() if forwarder_cpu else None
        line = proc.popen.stdout.readline()
        box_end, fwd_end = BoxCpu.now(), running.usage() if forwarder_cpu else None
        if proc.popen.wait(30) != 0 or not line:
            raise RuntimeError(f"{Path(argv[0]).name} failed (exit {proc.popen.returncode}): {proc.log_tail(2)}")
    finally:
        watchdog.cancel()
        proc.stop()
    cpu = fwd_end.cpu_s - fwd.cpu_s if fwd and fwd_end else None
    return json.loads(line), cpu, box_end.cores_busy_since(box)


def _per(cpu: float | None, amount: float, scale: float) -> float | None:
    return cpu / amount * scale if cpu is not None and amount else None


def _bulk(argv: list[str], running: Running) -> Metrics:
    res, cpu, cores = windowed(argv, running)
    return {"gbit_s": res["gbit_s"], "cpu_s_per_gb": _per(cpu, res["bytes"], 1e9), "cores": cores}


def tcp_bulk(streams: int) -> Callable[[Settings, Subject, Running], Metrics]:
    def measure(s: Settings, subject: Subject, running: Running) -> Metrics:
        return _bulk([tool("bulk"), "recv", HOST, str(subject.port(backends.BULK)),
                      str(streams), str(s.warmup), str(s.seconds)], running)
    return measure


IPERF_WINDOW = str(Path(__file__).with_name("iperf_window.py"))


def iperf3_bulk(streams: int) -> Callable[[Settings, Subject, Running], Metrics]:
    def measure(s: Settings, subject: Subject, running: Running) -> Metrics:
        # iperf3 counts whole seconds, and opens its window only after at least one of warm-up.
        return _bulk([sys.executable, IPERF_WINDOW, HOST, str(subject.port(backends.IPERF3)), str(streams),
                      str(max(1, math.ceil(s.warmup))), str(math.ceil(s.seconds))], running)
    return measure


def conn_rate(s: Settings, subject: Subject, running: Running) -> Metrics:
    res, cpu, cores = windowed([tool("connrate"), HOST, str(subject.port(backends.ECHO)), str(s.concurrency),
                                str(s.warmup), str(s.seconds), str(s.sources)], running)
    return {"conns_s": res["conns_s"], "p50_us": res["p50_us"], "p99_us": res["p99_us"],
            "cpu_us_per_conn": _per(cpu, res["conns"], 1e6), "errors": res["errors"], "cores": cores}


def conn_rate_scarce_ports(s: Settings, subject: Subject, running: Running) -> Metrics:
    forget_time_wait(backends.ECHO, subject.port(backends.ECHO))  # no run inherits another's
    return conn_rate(s, subject, running)


def round_trip(proto: str) -> Callable[[Settings, Subject, Running], Metrics]:
    def measure(s: Settings, subject: Subject, running: Running) -> Metrics:
        # No forwarder CPU here: its /proc walk would run inside the latency window of every
        # forwarder but not of the direct path (which has no processes), adding to their tails only.
        res, _, cores = windowed([tool("pingpong"), proto, HOST, str(subject.port(backends.ECHO)), "64",
                                  str(s.round_trips // 10), str(s.round_trips)], running, forwarder_cpu=False)
        if res["lost"]:
            raise RuntimeError(f"{res['lost']} datagrams unanswered within 100 ms (after {res['n']} answered)")
        return {"p50_us": res["p50_us"], "p99_us": res["p99_us"], "cores": cores}
    return measure


def udp_flood(size: int) -> Callable[[Settings, Subject, Running], Metrics]:
    def measure(s: Settings, subject: Subject, running: Running) -> Metrics:
        res, cpu, cores = windowed([tool("udpflood"), str(backends.SINK), HOST, str(subject.port(backends.SINK)),
                                    str(size), str(s.warmup), str(s.seconds)], running)
        return {"delivered_s": res["delivered_s"], "loss": res["loss"], "sent_s": res["sent_s"],
                "cpu_us_per_dgram": _per(cpu, res["delivered"], 1e6), "cores": cores}
    return measure


def idle(s: Settings, subject: Subject, running: Running) -> Metrics:
    conns = subject.idle_cap[0] if subject.idle_cap else s.idle_conns
    before, pss_before = running.usage(), running.pss_kib()
    holder = Proc([tool("idlehold"), HOST, str(subject.port(backends.ECHO)), str(conns)],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, log=running.workdir / "load.log")
    watchdog = threading.Timer(120.0, holder.stop)  # a subject that stops accepting
    watchdog.start()
    try:
        assert holder.popen.stdout is not None
        if not holder.popen.stdout.readline():
            raise RuntimeError(f"idlehold failed (exit {holder.popen.wait()}): {holder.log_tail(2)}")
        time.sleep(1.0)  # let the forwarder settle: deferred frees, lazy upstream setup
        after, pss_after = running.usage(), running.pss_kib()
    finally:
        watchdog.cancel()
        holder.stop()
    assert before and after and pss_before is not None and pss_after is not None
    # Memory is the growth of anonymous PSS, not of VmRSS, summed over the subject's processes:
    # the same for one process, but a subject that forks per connection (socat) shares most of
    # each child with its parent, and summed VmRSS counted those pages once per child.
    return {"kib_per_conn": (pss_after - pss_before) / conns,
            "rss_kib_per_conn": (after.rss_kib - before.rss_kib) / conns,
            "fds_per_conn": (after.fds - before.fds) / conns, "held": conns}


@contextlib.contextmanager
def wide_ports() -> Iterator[None]:
    with local_port_range(11000, 65535):
        yield


#: The ephemeral range of the scarce-ports run: 12,000 ports. A forwarder connecting from one
#: address fills most of them within its warm-up, and then each connect() waits on the
#: kernel's ever longer search for a free one; a pool of 8 addresses (96,000 ports) keeps its
#: rate through the whole run. The client's 16 addresses have 192,000.
SCARCE_PORTS = (50000, 61999)


@contextlib.contextmanager
def scarce_ports() -> Iterator[None]:
    # TIME_WAIT reuse off, as off loopback (the default, 2, reuses on loopback only): every
    # connection's port then waits 60 s, and the port supply, not the CPU, caps the rate.
    with local_port_range(*SCARCE_PORTS), sysctl(TW_REUSE, "0"):
        yield


GBIT = Column("gbit_s", "Gbit/s", True)
CPU_GB = Column("cpu_s_per_gb", "fwd CPU-s/GB", False)
P50, P99 = Column("p50_us", "p50 µs", False), Column("p99_us", "p99 µs", False)
CORES = Column("cores", "cores busy")
DELIVERED = (Column("delivered_s", "delivered/s", True), Column("loss", "loss"),
             Column("cpu_us_per_dgram", "fwd CPU µs/datagram", False), CORES)

FIGURES: tuple[Figure, ...] = (
    # One stream's rounds spread about ±10% on this box: five, so the median is worth a ratio.
    Figure("tcp1", "TCP bulk, 1 stream", "tcp", (GBIT, CPU_GB, CORES), tcp_bulk(1), rounds=5),
    Figure("tcp8", "TCP bulk, 8 streams", "tcp", (GBIT, CPU_GB, CORES), tcp_bulk(8)),
    # The bar's 8-stream figures were measured this way: one client thread drives all 8 streams.
    Figure("tcp8_iperf3", "TCP bulk, 8 streams (iperf3 -P 8: single-threaded client)", "tcp",
           (GBIT, CPU_GB, CORES), iperf3_bulk(8), needs=("iperf3",)),
    Figure("conns", "TCP connections/s (connect, 64 B echo, close)", "tcp",
           (Column("conns_s", "conns/s", True), P50, P99,
            Column("cpu_us_per_conn", "fwd CPU µs/conn", False), CORES),
           conn_rate, wide_ports, setting="64 in flight from 16 client addresses", rounds=5),
    # What off loopback caps a forwarder first at a sustained rate: ports toward one target.
    Figure("conns_ports", "TCP connections/s with scarce source ports (TIME_WAIT reuse off, 12,000-port range)",
           "tcp", (Column("conns_s", "conns/s", True), Column("errors", "failed in window"), P50, P99, CORES),
           conn_rate_scarce_ports, scarce_ports, needs=("ss",),
           setting="64 in flight from 16 client addresses; TIME_WAIT sockets of earlier runs dropped before each"),
    # A p99 is one stall away from doubling: five rounds.
    Figure("rtt_tcp", "TCP 64 B round trip", "tcp", (P50, P99, CORES), round_trip("tcp"), low_latency,
           setting="/dev/cpu_dma_latency held at 0", compared=2, rounds=5),
    Figure("rtt_udp", "UDP 64 B round trip", "udp", (P50, P99, CORES), round_trip("udp"), low_latency,
           setting="/dev/cpu_dma_latency held at 0", compared=2, rounds=5),
    Figure("udp64", "UDP flood, 64 B datagrams", "udp", DELIVERED, udp_flood(64)),
    Figure("udp1400", "UDP flood, 1400 B datagrams", "udp", DELIVERED, udp_flood(1400)),
    Figure("idle", "Idle TCP connections held", "tcp",
           (Column("kib_per_conn", "fwd KiB/conn", False), Column("fds_per_conn", "fwd fds/conn", False),
            Column("held", "held")),
           idle, needs_forwarder=True, compared=2),
)

BY_NAME = {f.name: f for f in FIGURES}
