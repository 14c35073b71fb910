"""Processes the bench starts: spawning, readiness, stopping, and what they cost.

Every process is started in a session of its own, so stopping it signals exactly that
process group (the subject and the children it forked) and nothing else on the machine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A started process group; ``stop`` ends the group and waits for it."""

    def __init__(self, argv: Sequence[str], *, log: Path | None = None,
                 stdin: int | None = subprocess.DEVNULL, stdout: int | None = None,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.log = log
        # The child gets its own copy of the log's descriptor: ours closes right after.
        with open(log if log else os.devnull, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdin=stdin, stdout=stdout or out,
                                          stderr=out, start_new_session=True, cwd=cwd,
                                          text=stdout is not None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        if not self.log or not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self, grace: float = 3.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlive the leader (forked per connection) still carry its group id.
        deadline = time.monotonic() + grace
        while _group_members(self.pid) and time.monotonic() < deadline:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    return raw[raw.rindex(")") + 2:].split()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def tree(roots: Iterable[int]) -> list[int]:
    """The given pids and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass(frozen=True)
class Usage:
    """Resources held by a set of processes at one moment."""

    cpu_s: float
    rss_kib: int
    fds: int

    @classmethod
    def of(cls, pids: Iterable[int]) -> Usage:
        cpu = rss = fds = 0
        for pid in pids:
            fields = _stat_fields(pid)
            if not fields:
                continue
            # utime stime cutime cstime: the whole process (all threads) plus reaped children,
            # so CPU of per-connection children that exit inside the window is still counted.
            cpu += sum(int(f) for f in fields[11:15])
            rss += _rss_kib(pid)
            try:
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
        return cls(cpu / CLK_TCK, rss, fds)


def pss_kib(pids: Iterable[int]) -> int:
    """Proportional set size of anonymous and shared memory, summed over ``pids``
    (``/proc/PID/smaps_rollup``: Pss_Anon + Pss_Shmem). A page mapped by n processes counts
    1/n in each, so over a parent and its forked children (socat, one per connection) every
    page counts once; VmRSS summed over them counted each page they share once per process.
    File pages are left out: their share moves whenever an unrelated process mapping the
    same library (another Python) starts or exits."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in rollup
                     if line.startswith(("Pss_Anon:", "Pss_Shmem:")))
    return total


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bound(proto: str, port: int) -> bool:
    """Whether something on this host listens on (TCP) or is bound to (UDP) ``port``."""
    state = "0A" if proto == "tcp" else "07"
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state:
                return True
    return False


def wait_bound(endpoints: Iterable[tuple[str, int]], procs: Sequence[Proc], timeout: float = 15.0) -> None:
    """Wait until every (proto, port) is bound; raise with the log's tail if a process dies."""
    pending = set(endpoints)
    deadline = time.monotonic() + timeout
    while pending:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"exited with {proc.popen.returncode}: {proc.log_tail()}")
        pending = {e for e in pending if not bound(*e)}
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not listening after {timeout:.0f} s on {sorted(pending)}")
        time.sleep(0.02)
