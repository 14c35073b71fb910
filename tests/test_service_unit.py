"""scripts/fastfwd.service against what the daemon does, short of a systemd to run it. One
session (a config file with TCP rules that copy and splice, UDP, [hosts] names followed by a
lease and by dnsmasq's lease file, allow_users and allow_groups, metrics over HTTP; status, a
reload by SIGHUP and one by saving the file, then a drain) runs as the unit runs it: a root
holding only its CapabilityBoundingSet, with no new privileges. Under strace, the same session
must do nothing the unit's sandbox refuses: system calls outside SystemCallFilter, executable
memory, other address families, writes outside its two directories."""
from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers_control import (DaemonProcess, EchoServer, UdpEcho, daemon, echo_roundtrip, fastfwd, free_port,
                             needs_engine, short_dir, udp_ask, wait_until)
from test_docs_walkthrough import low_free_port, unit_service

pytestmark = [pytest.mark.root, needs_engine,
              pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")]

#: vm1 gets its address from a lease event on the lease socket, vm2 from dnsmasq's lease file.
VM1_MAC, VM2_MAC = "52:54:00:00:00:01", "52:54:00:00:00:02"


#: The capabilities a whole session shows the use of (CAP_SYS_RESOURCE has a test of its own).
SESSION_CAPS = ("net_bind_service", "net_admin", "lease", "chown")


def unit_prefix(needed: tuple[str, ...]) -> list[str]:
    """setpriv as systemd starts the unit's root: only the bounding set's capabilities
    (permitted and effective, none inheritable or ambient) and no_new_privs. Where this
    machine's own bounding set lacks some of them, without those: fewer can only fail a test,
    unless the test needs them."""
    service = unit_service()
    assert service["NoNewPrivileges"] == "yes"
    unit = [c.removeprefix("CAP_").lower() for c in service["CapabilityBoundingSet"].split()]
    assert set(needed) <= set(unit), f"the unit no longer keeps {needed}"
    dump = subprocess.run(["setpriv", "--dump"], capture_output=True, text=True, timeout=10, check=True).stdout
    have = re.search(r"^Capability bounding set: (.*)$", dump, re.MULTILINE)[1].split(",")
    if missing := [c for c in needed if c not in have]:
        pytest.skip(f"this machine's capability bounding set lacks {', '.join(missing)}")
    caps = [c for c in unit if c in have]
    return ["setpriv", "--bounding-set=" + ",".join(["-all", *("+" + c for c in caps)]), "--inh-caps=-all",
            "--ambient-caps=-all", "--no-new-privs"]


@dataclass
class Session:
    tmp: Path
    config: Path
    echo: EchoServer
    udp: UdpEcho
    ports: dict[str, int]

    def config_text(self, extra: str = "") -> str:
        p = self.ports
        return (f'[hosts.vm1]\nmac = "{VM1_MAC}"\n[hosts.vm2]\nmac = "{VM2_MAC}"\n'
                f'[control]\nallow_users = ["nobody"]\nallow_groups = ["nogroup"]\n'
                f'metrics_listen = "127.0.0.1:{p["metrics"]}"\n'
                f'[sources]\nneighbours = true\ndhcp_lease_file = "dnsmasq.leases"\n'
                f'[[forward]]\nname = "low"\nlisten = {p["low"]}\nto = "127.0.0.1:{self.echo.port}"\n'
                f'[[forward]]\nname = "copy"\nlisten = {p["copy"]}\nto = "127.0.0.1:{self.echo.port}"\nsplice = "never"\n'
                f'[[forward]]\nname = "splice"\nlisten = {p["splice"]}\nto = "127.0.0.1:{self.echo.port}"\n'
                f'splice = "always"\n'
                f'[[forward]]\nname = "udp"\nproto = "udp"\nlisten = {p["udp"]}\nto = "127.0.0.1:{self.udp.port}"\n'
                f'[[forward]]\nname = "vm1"\nlisten = {p["vm1"]}\nto = "vm1:{self.echo.port}"\n'
                f'[[forward]]\nname = "vm2"\nlisten = {p["vm2"]}\nto = "vm2:{self.echo.port}"\n' + extra)


@contextlib.contextmanager
def session_files() -> Iterator[Session]:
    """The session's peers and files. The config belongs to another user (reading whether it
    is still being written takes a file lease: CAP_LEASE); the directory lets allow_users in."""
    echo, udp = EchoServer(), UdpEcho(b"udp:")
    try:
        with short_dir() as tmp:
            tmp.chmod(0o711)
            ports = {name: free_port() for name in ("copy", "splice", "udp", "vm1", "vm2", "metrics", "added")}
            s = Session(tmp, tmp / "fastfwd.toml", echo, udp, {"low": low_free_port(), **ports})
            (tmp / "dnsmasq.leases").write_text(f"4000000000 {VM2_MAC} 127.0.0.1 vm2 *\n")
            s.config.write_text(s.config_text())
            os.chown(s.config, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
            yield s
    finally:
        echo.close()
        udp.close()


@contextlib.contextmanager
def root_pipes_past_the_soft_limit() -> Iterator[None]:
    """Pipes of 1 MiB held by this (root) process until root's pipes together pass
    fs.pipe-user-pages-soft, as a busy host's may: the kernel counts them per user, and past
    that grants a new pipe of a root without CAP_SYS_RESOURCE 8 KiB and refuses to enlarge it."""
    soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    pipes: list[tuple[int, int]] = []
    try:
        for _ in range(soft * os.sysconf("SC_PAGE_SIZE") // (1 << 20) + 1 if soft else 0):
            pipes.append(os.pipe())
            fcntl.fcntl(pipes[-1][1], fcntl.F_SETPIPE_SZ, 1 << 20)
        yield
    finally:
        for fds in pipes:
            for fd in fds:
                os.close(fd)


def pipe_sizes(pid: int) -> list[int]:
    """The sizes of the pipes process ``pid`` holds, opened through /proc."""
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fd).startswith("pipe:"):
                own = os.open(fd, os.O_RDONLY | os.O_NONBLOCK)
                try:
                    sizes.append(fcntl.fcntl(own, fcntl.F_GETPIPE_SZ))
                finally:
                    os.close(own)
    return sizes


def as_nobody_connects(path: Path) -> bool:
    """Can user nobody (allow_users) connect to the Unix socket at ``path``?"""
    code = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, timeout=30).returncode == 0


def run_session(s: Session, d: DaemonProcess, pid: int) -> None:
    """Everything a daemon under the unit does, each checked at the far end; ``pid`` is the
    daemon's (``d`` may be a tracer of it)."""
    d.wait_log("fastfwd started")
    p = s.ports
    for rule in ("low", "copy", "splice", "vm2"):
        assert echo_roundtrip(p[rule]), f"rule {rule} does not forward:\n{d.log()}"
    assert udp_ask(p["udp"], b"ping") == b"udp:ping"

    lease = fastfwd("lease", "add", VM1_MAC, "127.0.0.1", "vm1", "--socket", str(d.lease_socket))
    assert lease.returncode == 0, lease.stderr
    assert echo_roundtrip(p["vm1"])

    status = fastfwd("status", "--socket", str(d.control_socket))
    assert status.returncode == 0 and "vm1" in status.stdout, status.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{p['metrics']}/metrics", timeout=10) as reply:
        assert b"fastfwd_" in reply.read()
    for sock in (d.control_socket, d.lease_socket):
        assert sock.stat().st_gid == grp.getgrnam("nogroup").gr_gid
        assert as_nobody_connects(sock), f"allow_users cannot reach {sock}"

    if shutil.which("ss"):  # SO_RCVBUFFORCE (CAP_NET_ADMIN): the kernel doubles what it was given
        sockets = subprocess.run(["ss", "-Huanm", f"sport = :{p['udp']}"], capture_output=True, text=True, timeout=10)
        assert int(re.search(r"rb(\d+)", sockets.stdout)[1]) >= 8 << 20, sockets.stdout

    os.kill(pid, signal.SIGHUP)
    d.wait_log("applied")
    # An editor's save: while the file is open for writing nothing is applied. Knowing that
    # takes a file lease, on a file of another user's: CAP_LEASE.
    with open(s.config, "w") as editor:
        editor.write(s.config_text(f'[[forward]]\nlisten = {p["added"]}\nto = "127.0.0.1:{s.echo.port}"\n'))
        editor.flush()
        d.wait_log("is open for writing")
    d.wait_log("applied", count=2)
    assert echo_roundtrip(p["added"])

    # A connection live through the drain still carries bytes both ways.
    with socket.create_connection(("127.0.0.1", p["splice"]), timeout=10) as live:
        live.sendall(b"before")
        assert live.recv(100) == b"before"
        os.kill(pid, signal.SIGTERM)
        d.wait_log("draining")
        live.sendall(b"after")
        assert live.recv(100) == b"after"
    assert d.wait() == 0, d.log()


def test_the_units_capabilities_and_no_new_privileges_serve_a_whole_session() -> None:
    with session_files() as s:
        d = DaemonProcess(s.tmp, "-c", str(s.config), prefix=unit_prefix(SESSION_CAPS))
        try:
            run_session(s, d, d.proc.pid)
        finally:
            d.stop()


def test_splice_pipes_keep_their_size_past_roots_share_of_pipes(echo: EchoServer) -> None:
    prefix, port = unit_prefix(("sys_resource",)), free_port()
    with short_dir() as tmp, daemon(tmp, "-t", f"{port}:127.0.0.1:{echo.port}", "--splice", "always",
                                    prefix=prefix) as d:
        with root_pipes_past_the_soft_limit():
            assert echo_roundtrip(port)
        # The pipes splice used are kept for the next connections: [engine] pipe_size each.
        assert 1 << 20 in pipe_sizes(d.proc.pid), pipe_sizes(d.proc.pid)


def syscall_group(name: str) -> set[str]:
    """The system calls of a systemd-analyze group, its nested groups expanded."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:  # the first line is the group's own name
        word = line.strip()
        if word.startswith("@"):
            calls |= syscall_group(word)
        elif word and not word.startswith("#"):
            calls.add(word)
    return calls


def traced_child(tracer: int) -> int:
    """The pid of the program strace ``tracer`` runs (strace blocks fatal signals itself)."""
    children = Path(f"/proc/{tracer}/task/{tracer}/children")
    wait_until(lambda: children.read_text().split(), 15, "strace to start the daemon")
    return int(children.read_text().split()[0])


#: A line of strace -ff (a file per thread, so no call is split in two): the call's name.
TRACE_LINE = re.compile(r"(\w+)\(")
#: The paths of calls that change the file system (link and rename: both).
WRITES = re.compile(r'(?:mkdir|rmdir|unlink|chmod|chown|setxattr)\("([^"]+)"|(?:link|rename)\("([^"]+)", "([^"]+)"'
                    r'|openat\(AT_FDCWD, "([^"]+)", [^,)]*O_(?:WRONLY|RDWR|CREAT)')


@pytest.mark.skipif(shutil.which("strace") is None or shutil.which("systemd-analyze") is None,
                    reason="needs strace and systemd-analyze")
def test_the_session_makes_only_calls_the_units_sandbox_allows(tmp_path: Path) -> None:
    """A call outside SystemCallFilter fails with EPERM under the unit, one needing a dropped
    capability with EPERM or EACCES; MemoryDenyWriteExecute refuses memory made executable
    (mprotect) or mapped writable and executable at once; RestrictAddressFamilies, sockets
    of other families; ProtectSystem=strict, writes but to the sockets' directory
    (RuntimeDirectory) and the state directory (StateDirectory)."""
    service = unit_service()
    allowed = set().union(*(syscall_group(entry) if entry.startswith("@") else {entry}
                            for entry in service["SystemCallFilter"].split()))
    families = set(service["RestrictAddressFamilies"].split())
    with session_files() as s:
        strace = ["strace", "-ff", "-qq", "-o", str(tmp_path / "trace")]  # the workers and helper threads too
        d = DaemonProcess(s.tmp, "-c", str(s.config), prefix=[*unit_prefix(SESSION_CAPS), *strace])
        try:
            run_session(s, d, traced_child(d.proc.pid))
        finally:
            d.stop()
    lines = [line for trace in tmp_path.glob("trace.*") for line in trace.read_text().splitlines()]
    calls = {m[1] for line in lines if (m := TRACE_LINE.match(line))}
    assert {"splice", "recvmmsg", "sendmmsg", "setxattr", "flock", "inotify_add_watch", "link"} <= calls  # it was all there
    assert calls <= allowed, f"refused by SystemCallFilter: {sorted(calls - allowed)}"
    # Pipes past root's share are refused a size without CAP_SYS_RESOURCE (see the test above),
    # which this machine may lack; the daemon takes a smaller pipe.
    refused = [line for line in lines if re.search(r"= -1 E(PERM|ACCES) ", line) and "F_SETPIPE_SZ" not in line]
    assert not refused, "\n".join(refused)
    executable = [line for line in lines if re.search(r"^(pkey_)?mprotect\(.*PROT_EXEC|PROT_WRITE\|PROT_EXEC", line)]
    assert not executable, "\n".join(executable)
    used = {m[1] for line in lines if (m := re.match(r"socket(?:pair)?\((AF_\w+)", line))}
    assert used <= families, f"refused by RestrictAddressFamilies: {sorted(used - families)}"
    # Beside the sockets: their names and the private directories they are bound in first.
    writable = re.compile(rf"{re.escape(str(s.tmp))}/(control\.sock|lease\.sock|\.ffbind-\w+(/s)?|state(/.*)?)"
                          r"|/proc/self/task/\d+/comm")  # thread names
    written = {path for line in lines if (m := WRITES.match(line)) for path in m.groups() if path}
    assert written and not {path for path in written if not writable.fullmatch(path)}, sorted(written)
