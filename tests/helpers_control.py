"""Shared by the control-plane tests: the table of bad configs with the exact error each must
give, loopback echo servers, short socket directories, and the ``fastfwd`` command as a
process (one-shot, or the daemon until stopped)."""
from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: (config text, the error line it must produce). Each is a complete file on its own.
BAD_CONFIGS: list[tuple[str, str]] = [
    ('[[forward]]\nlisten = "8000-7999"\nto = "127.0.0.1:9000-9001"\n',
     "forward[0].listen: range 8000-7999 is reversed (at line 2)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\nconect_timeout = 3\n',
     "forward[0].conect_timeout: unknown key (did you mean 'connect_timeout'?) (at line 4)"),
    ('[[forward]]\nproto = "sctp"\nlisten = 8000\nto = "127.0.0.1:9000"\n',
     "forward[0].proto: expected 'tcp', 'udp', 'both' or [\"tcp\", \"udp\"], got 'sctp' (at line 2)"),
    ('[[forward]]\nlisten = "8000-8009"\nto = "127.0.0.1:9000-9004"\n',
     "forward[0]: listen has 10 ports but to has 5 (at line 1)"),
    ('[[forward]]\nlisten = "1.2.3:8000"\nto = "127.0.0.1:9000"\n',
     "forward[0].listen: listen address '1.2.3' is not an IPv4 or IPv6 address (at line 2)"),
    ('[[forward]]\nlisten = 8000\nto = "bad_host:9000"\n',
     "forward[0].to: target host 'bad_host' is neither an IP address nor a valid host name (at line 3)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:70000"\n',
     "forward[0].to: port 70000 is out of range 0-65535 (at line 3)"),
    ('[[forward]]\nlisten = 8000\n',
     "forward[0]: missing required key 'to' (at line 1)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\nsplice = "maybe"\n',
     "forward[0].splice: expected 'auto', 'always' or 'never', got 'maybe' (at line 4)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\nidle_timeout = -1\n',
     "forward[0].idle_timeout: expected a number of seconds from 0 to 1000000000, got -1 (at line 4)"),
    ('[[forward]]\nproto = "udp"\nlisten = 8000\nto = "127.0.0.1:9000"\nudp_max_sessions = 1.5\n',
     "forward[0].udp_max_sessions: expected an integer from 0 to 2147483647, got 1.5 (at line 5)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\nallow = "10.0.0.0/8"\n',
     "forward[0].allow: expected an array of strings, got '10.0.0.0/8' (at line 4)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\nallow = ["10.0.0.0/33"]\n',
     "forward[0].allow: '10.0.0.0/33' is not a CIDR network (at line 4)"),
    ('[[forward]]\nlisten = 8000\nto = "127.0.0.1:9000"\non_remove = "drop"\n',
     "forward[0].on_remove: expected 'keep' or 'close', got 'drop' (at line 4)"),
    ('[[forward]]\nlisten = "8000-8010"\nto = "127.0.0.1:9000-9010"\n'
     '[[forward]]\nlisten = "0.0.0.0:8005"\nto = "127.0.0.1:9000"\n',
     "forward[1].listen: tcp port 8005 overlaps forward[0] (tcp 127.0.0.1:8000-8010 -> 127.0.0.1:9000-9010)"
     " (at line 5)"),
    ('[[forward]]\nname = "web"\nlisten = 8000\nto = "127.0.0.1:9000"\n'
     '[[forward]]\nname = "web"\nlisten = 8001\nto = "127.0.0.1:9000"\n',
     "forward[1].name: 'web' is already the name of forward[0] (at line 6)"),
    ('[hosts.vm1]\nmac = "52:54:00:zz:00:01"\n',
     "hosts.vm1.mac: '52:54:00:zz:00:01' is not a MAC address like 52:54:00:12:34:56 (at line 2)"),
    ('[hosts.vm1]\nmac = "52:54:00:00:00:01"\nip = "10.0.0.1"\n',
     "hosts.vm1: give exactly one of 'mac' or 'ip' (at line 1)"),
    ('[hosts.vm1]\nip = "10.0.0.300"\n',
     "hosts.vm1.ip: '10.0.0.300' is not an IPv4 or IPv6 address (at line 2)"),
    ('[sources]\ndhcp = false\n[[forward]]\nlisten = 8000\nto = "vm9:22"\n',
     "forward[0].to: 'vm9' is not in [hosts] and DHCP names are off ([sources] dhcp = false) (at line 5)"),
    ('[engine]\nworkers = 0\n', "engine.workers: expected an integer from 1 to 1024, got 0 (at line 2)"),
    ('[engine]\npipesize = 65536\n', "engine.pipesize: unknown key (did you mean 'pipe_size'?) (at line 2)"),
    ('[engine]\nbusy_poll_us = -5\n',
     "engine.busy_poll_us: expected microseconds from 0 to 1000000, got -5 (at line 2)"),
    ('[control]\ndrain_deadline = "soon"\n',
     "control.drain_deadline: expected a number of seconds from 0 to 1000000000, got 'soon' (at line 2)"),
    ('[control]\nmetrics_listen = "localhost:9100"\n',
     "control.metrics_listen: 'localhost:9100': expected ADDR:PORT with an IP address (IPv6 in brackets) (at line 2)"),
    ('[control]\nallow_groups = [true]\n',
     "control.allow_groups: expected an array of group names or numeric ids, got [True] (at line 2)"),
    ('[forwards]\n', "forwards: unknown key (did you mean 'forward'?) (at line 1)"),
    ('[[forward]\n', "invalid TOML: Expected ']]' at the end of an array declaration (at line 1, column 10)"),
]


def bad_config_ids() -> list[str]:
    return [error.split(":")[0] + ":" + error.split(":")[1][:30] for _, error in BAD_CONFIGS]


# -- loopback peers ----------------------------------------------------------------------------
class _Server:
    """A loopback socket served by a thread (one ``_once`` at a time) until ``close``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)  # so the thread sees close() soon
        self.port = sock.getsockname()[1]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                self._once()
            except TimeoutError:
                continue
            except OSError:
                return

    def _once(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()


class EchoServer(_Server):
    """TCP: sends ``greeting`` on accept, then echoes each connection's bytes back."""

    def __init__(self, host: str = "127.0.0.1", greeting: bytes = b"", port: int = 0) -> None:
        self.greeting = greeting
        super().__init__(socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET))

    def _once(self) -> None:
        conn, _ = self.sock.accept()
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                conn.sendall(self.greeting)
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class UdpEcho(_Server):
    """UDP: replies to each datagram with ``tag`` and the datagram."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        super().__init__(sock)

    def _once(self) -> None:
        data, addr = self.sock.recvfrom(65535)
        self.sock.sendto(self.tag + data, addr)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echo_roundtrip(port: int, size: int = 256 * 1024, timeout: float = 10.0) -> bool:
    """Send ``size`` random bytes through 127.0.0.1:``port`` to an echo server, half-close,
    and compare the SHA-256 of what comes back. False if the connection fails."""
    payload = os.urandom(size)

    def send(s: socket.socket) -> None:
        # A reset connection shows in the reads below; here it would be an unhandled exception.
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            sender = threading.Thread(target=send, args=(s,))
            sender.start()
            got = hashlib.sha256()
            n = 0
            while data := s.recv(1 << 16):
                got.update(data)
                n += len(data)
            sender.join(timeout)
    except OSError:
        return False
    return n == size and got.digest() == hashlib.sha256(payload).digest()


def connects(port: int) -> bool:
    """Does a TCP connection to 127.0.0.1:``port`` get established?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def udp_ask(port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    """One datagram to 127.0.0.1:``port`` and its reply (None if none comes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def fd_flood(pid: int, connect: Callable[[], socket.socket], room: int = 256) -> Iterator[list[socket.socket]]:
    """Lets process ``pid`` open only ``room`` more fds than it has open now, then opens twice
    that many idle connections to it with ``connect`` (fewer if one fails: the daemon stopped
    accepting, or its backlog is full); they are closed afterwards."""
    limit = len(os.listdir(f"/proc/{pid}/fd")) + room
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    junk: list[socket.socket] = []
    try:
        for _ in range(2 * room):
            try:
                junk.append(connect())
            except OSError:
                break
        yield junk
    finally:
        for sock in junk:
            sock.close()


def engine_built() -> bool:
    try:
        from fastfwd import _engine  # noqa: F401
    except ImportError:
        return False
    return True


needs_engine = pytest.mark.skipif(not engine_built(), reason="the data-plane engine is not built")


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory with a short path, removed afterwards: a Unix socket path may have only
    107 bytes, too few for pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="ff-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the command as a process --------------------------------------------------------------------
def fastfwd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m fastfwd ARGS`` to its end, output captured."""
    return subprocess.run([sys.executable, "-m", "fastfwd", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class DaemonProcess:
    """``fastfwd run`` in a child process with its log captured to a file."""

    def __init__(self, tmp: Path, *args: str, prefix: Sequence[str] = ()) -> None:
        """``prefix`` is a command the daemon runs under (setpriv, strace)."""
        self.log_path = tmp / "daemon.log"
        self.control_socket = tmp / "control.sock"
        self.lease_socket = tmp / "lease.sock"
        cmd = [*prefix, sys.executable, "-m", "fastfwd", "run", "--log-level", "debug",
               "--control-socket", str(self.control_socket), "--lease-socket", str(self.lease_socket),
               "--state-dir", str(tmp / "state"), *args]
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp, env=env,
                                     stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        wait_until(lambda: self.log().count(text) >= count or self.proc.poll() is not None, timeout,
                   f"{text!r} in the daemon log")
        assert self.log().count(text) >= count, f"daemon exited early:\n{self.log()}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@contextlib.contextmanager
def daemon(tmp: Path, *args: str, ready: str = "fastfwd started", prefix: Sequence[str] = ()) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp, *args, prefix=prefix)
    try:
        proc.wait_log(ready)
        yield proc
    finally:
        proc.stop()
