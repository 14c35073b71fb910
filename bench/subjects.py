"""The subjects compared: the direct path, fastfwd's variants, the peers and a reference.

The reference is a minimal C forwarder (bench/peers/reference_fwd.c): what user space can
reach on this box, measured in the same run. It is no peer (nobody would deploy it), so it
never counts as the best peer.

Each forwarder listens on a backend's port plus ``SHIFT`` and relays to the backend; the
direct path is the client talking to the backend itself. Peers run from configs written
into the run's scratch directory, never as the system's services.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .build import tool
from .procs import Proc, Usage, pss_kib, tree, wait_bound

SHIFT = 10
REPO = Path(__file__).resolve().parent.parent

#: (proto, listen port, target port) for every forward a subject sets up.
Forward = tuple[str, int, int]
FORWARDS: tuple[Forward, ...] = (
    ("tcp", backends.BULK + SHIFT, backends.BULK),
    ("tcp", backends.ECHO + SHIFT, backends.ECHO),
    ("tcp", backends.IPERF3 + SHIFT, backends.IPERF3),
    ("udp", backends.ECHO + SHIFT, backends.ECHO),
    ("udp", backends.SINK + SHIFT, backends.SINK),
)

Launcher = Callable[[Path, Sequence[Forward]], list[list[str]]]


@dataclass
class Running:
    """A started subject: its processes, and what they hold and have used."""

    procs: list[Proc]
    workdir: Path  # scratch for this subject: configs, logs

    def usage(self) -> Usage | None:
        return Usage.of(tree(p.pid for p in self.procs)) if self.procs else None

    def pss_kib(self) -> int | None:
        return pss_kib(tree(p.pid for p in self.procs)) if self.procs else None

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@dataclass(frozen=True)
class Subject:
    name: str
    label: str
    kind: str  # "direct", "fastfwd", "peer" or "reference"
    protos: frozenset[str]
    launch: Launcher | None = None
    #: Executables it needs; a missing one makes the subject unavailable.
    needs: tuple[str, ...] = ()
    #: Figures it takes part in (None: every figure of a protocol it forwards).
    only: frozenset[str] | None = None
    #: Idle connections to hold, when the subject cannot hold the full number (and why).
    idle_cap: tuple[int, str] | None = None
    #: Protocols it cannot forward correctly, and why (the table says so).
    broken: tuple[tuple[str, str], ...] = ()

    def port(self, backend_port: int) -> int:
        return backend_port if self.kind == "direct" else backend_port + SHIFT

    def takes(self, figure: str, proto: str) -> bool:
        return proto in self.protos and (self.only is None or figure in self.only)

    def broken_for(self, proto: str) -> str | None:
        return dict(self.broken).get(proto)

    def unavailable(self) -> str | None:
        missing = [n for n in self.needs if shutil.which(n) is None]
        if missing:
            return f"not installed: {', '.join(missing)}"
        if self.kind == "fastfwd":
            try:
                import fastfwd._engine  # noqa: F401
            except ImportError as exc:
                return f"engine not built: {exc}"
        return None

    def start(self, scratch: Path) -> Running:
        workdir = scratch / self.name
        workdir.mkdir(parents=True, exist_ok=True)
        if self.launch is None:
            return Running([], workdir)
        forwards = [f for f in FORWARDS if f[0] in self.protos]
        procs = [Proc(argv, log=workdir / f"out{i}.log", cwd=REPO)
                 for i, argv in enumerate(self.launch(workdir, forwards))]
        running = Running(procs, workdir)
        try:
            wait_bound([(proto, listen) for proto, listen, _ in forwards], procs)
        except BaseException:
            running.stop()
            raise
        return running


def engine_build() -> str | None:
    """Which compiled engine the fastfwd subjects ran: its file's hash and build time."""
    import importlib.util
    spec = importlib.util.find_spec("fastfwd._engine")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))
    return f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}, built {stamp}"


def _python_forwarder(module: str, *extra: str) -> Launcher:
    def launch(_: Path, forwards: Sequence[Forward]) -> list[list[str]]:
        args = [a for p, l, t in forwards for a in ("--forward", f"{p}:{l}:{t}")]
        return [[sys.executable, "-m", module, *extra, *args]]
    return launch


def _reference(_: Path, forwards: Sequence[Forward]) -> list[list[str]]:
    return [[tool("reference_fwd"), *(f"{p}:{l}:{t}" for p, l, t in forwards)]]


def _haproxy(splice: bool) -> Launcher:
    def launch(workdir: Path, forwards: Sequence[Forward]) -> list[list[str]]:
        lines = ["global", "    log stderr format short local0 err",
                 "defaults", "    mode tcp", "    timeout connect 5s",
                 "    timeout client 1h", "    timeout server 1h"]
        if splice:
            lines.append("    option splice-auto")
        for _, listen, target in forwards:
            lines += [f"listen fwd{listen}", f"    bind 127.0.0.1:{listen}",
                      f"    server backend 127.0.0.1:{target}"]
        cfg = workdir / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        return [["haproxy", "-db", "-f", str(cfg)]]
    return launch


def _nginx(workdir: Path, forwards: Sequence[Forward]) -> list[list[str]]:
    servers = "\n".join(
        f"    server {{ listen 127.0.0.1:{listen}{' udp' if proto == 'udp' else ''}; "
        f"proxy_pass 127.0.0.1:{target}; }}"
        for proto, listen, target in forwards)
    # Debian builds the stream module as a loadable module (package libnginx-mod-stream).
    module = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    load = f"load_module {module};\n" if module.exists() else ""
    cfg = workdir / "nginx.conf"
    cfg.write_text(f"""{load}daemon off;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log error;
events {{ worker_connections 20000; }}
stream {{
{servers}
}}
""")
    return [["nginx", "-p", str(workdir), "-e", f"{workdir}/error.log", "-c", str(cfg)]]


def _socat(_: Path, forwards: Sequence[Forward]) -> list[list[str]]:
    # One socat per forward; each forks a child per TCP connection (or per UDP client).
    return [["socat", f"TCP4-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay",
             f"TCP4:127.0.0.1:{target},nodelay"] if proto == "tcp" else
            ["socat", f"UDP4-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork", f"UDP4:127.0.0.1:{target}"]
            for proto, listen, target in forwards]


def _rinetd(workdir: Path, forwards: Sequence[Forward]) -> list[list[str]]:
    cfg = workdir / "rinetd.conf"
    cfg.write_text("".join(f"127.0.0.1 {listen}/{proto} 127.0.0.1 {target}/{proto}\n"
                           for proto, listen, target in forwards))
    return [["rinetd", "-f", "-c", str(cfg)]]


TCP, BOTH = frozenset({"tcp"}), frozenset({"tcp", "udp"})
BULK_ONLY = frozenset({"tcp1", "tcp8", "tcp8_iperf3"})
CONNS_ONLY, RTT_ONLY = frozenset({"conns", "conns_ports"}), frozenset({"rtt_tcp", "rtt_udp"})


def _fastfwd(splice: str, workers: int, *, sources: int = 0, busy_poll_us: int = 0,
             only: frozenset[str] | None = None) -> Subject:
    name = f"fastfwd-{splice}-{workers}w"
    label = f"fastfwd (splice {splice}, {workers} worker{'s' * (workers > 1)}"
    if sources:
        name, label = f"{name}-pool{sources}", f"{label}, {sources} upstream source addresses"
    if busy_poll_us:
        name, label = f"{name}-poll{busy_poll_us}", f"{label}, busy poll {busy_poll_us} µs"
    return Subject(
        name, label + ")",
        "fastfwd", BOTH, _python_forwarder("bench.peers.fastfwd_fwd", "--workers", str(workers), "--splice", splice,
                                           "--sources", str(sources), "--busy-poll-us", str(busy_poll_us)),
        only=only if only is not None else None if splice == "auto" else BULK_ONLY)


SUBJECTS: tuple[Subject, ...] = (
    Subject("direct", "direct (no forwarder)", "direct", BOTH),
    Subject("cref", "C reference forwarder (bench/peers)", "reference", BOTH, _reference),
    *(_fastfwd(splice, workers) for splice in ("auto", "always", "never") for workers in (1, 2)),
    _fastfwd("auto", 1, sources=8, only=CONNS_ONLY),
    _fastfwd("auto", 1, busy_poll_us=50, only=RTT_ONLY),
    Subject("haproxy", "HAProxy (TCP mode)", "peer", TCP, _haproxy(False), ("haproxy",)),
    Subject("haproxy-splice", "HAProxy (TCP mode, splice-auto)", "peer", TCP, _haproxy(True), ("haproxy",),
            idle_cap=(7900, ("with splice HAProxy sizes maxconn from the open-files limit leaving room for "
                             "pipes (about 8,000 here): 7,900 held, not 9,900"))),
    Subject("nginx", "nginx stream", "peer", BOTH, _nginx, ("nginx",)),
    Subject("socat", "socat", "peer", BOTH, _socat, ("socat",),
            idle_cap=(1000, "socat forks a process per connection: 1,000 held, not 9,900")),
    Subject("rinetd", "rinetd", "peer", TCP, _rinetd, ("rinetd",),
            idle_cap=(4000, ("rinetd's cost per event grows with the connections it holds (at 8,000 it "
                             "accepted about 20 a second at full CPU): 4,000 held, not 9,900")),
            broken=(("udp", "rinetd 0.73 relays each UDP datagram as an empty one (seen with strace): not run"),)),
    Subject("uvloop", "uvloop forwarder (bench/peers)", "peer", BOTH,
            _python_forwarder("bench.peers.uvloop_fwd")),
)

BY_NAME = {s.name: s for s in SUBJECTS}
