"""The worker threads keep out of the host program's signals. A SIGPIPE raised in a worker
(splice into a socket the peer reset has no MSG_NOSIGNAL) must not kill a program that gave
SIGPIPE its default action back."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from netutil import ChildForwarder, TcpServer, child_env, connect, echo_handler, echo_once, wait_for

_libc = ctypes.CDLL(None, use_errno=True)


def worker_threads(pid: int) -> list[int]:
    """The thread ids of the forwarder's workers (they are named fastfwd-w0, -w1, ...)."""
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            if f.read().startswith("fastfwd-w"):
                tids.append(int(tid))
    return tids


def test_workers_are_named_one_per_worker() -> None:
    with TcpServer(echo_handler) as server, \
            ChildForwarder.start([(f"0:127.0.0.1:{server.port}", "tcp", {})], workers=3) as child:
        assert len(worker_threads(child.pid)) == 3


def test_a_sigpipe_in_a_worker_leaves_a_program_with_default_sigpipe_running() -> None:
    with TcpServer(echo_handler) as server, \
            ChildForwarder.start([(f"0:127.0.0.1:{server.port}", "tcp", {})], workers=2,
                                 default_sigpipe=True) as child:
        tids = wait_for(lambda: worker_threads(child.pid))
        for tid in tids:
            if _libc.tgkill(child.pid, tid, signal.SIGPIPE) != 0:
                raise OSError(ctypes.get_errno(), "tgkill")
        # Every worker has woken (or will wake) with the signal pending; still forwarding:
        for _ in range(4):
            with connect(child.ports[0]) as sock:
                assert echo_once(sock, b"still here") == b"still here"
        assert child.proc.poll() is None
        assert child.close() == 0


_START_OUT_OF_FDS = r"""
import os, resource
from fastfwd import _engine
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
def open_fds():
    return len(os.listdir("/proc/self/fd")) - 1         # less the one listdir holds
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(64 - 4 - open_fds())]
before, failed = open_fds(), 0
for _ in range(20):
    try:
        _engine.Engine(workers=4)       # 3 fds a worker: the second cannot start
    except OSError:
        failed += 1
print(failed, before, open_fds())
"""


def test_a_start_that_runs_out_of_fds_leaks_none() -> None:
    proc = subprocess.run([sys.executable, "-c", _START_OUT_OF_FDS], capture_output=True, text=True,
                          timeout=60, env=child_env())
    assert proc.returncode == 0, proc.stderr
    failed, before, after = map(int, proc.stdout.split())
    assert (failed, after) == (20, before)
