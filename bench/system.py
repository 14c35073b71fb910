"""The machine: its description, whole-box CPU use, and the settings a run changes and restores."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .procs import CLK_TCK

PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TW_REUSE = Path("/proc/sys/net/ipv4/tcp_tw_reuse")
#: The settings a run changed and has not put back yet, with their old values. A run killed
#: before it could restore them (SIGKILL, its sandbox restarted) left the box changed, and the
#: next one would have measured on it: that run restores them first. /run is empty after a
#: boot, as the settings are back to the box's own then.
CHANGED = Path("/run/fastfwd-bench-changed.json")


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "unknown")
    mhz = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("cpu MHz")), "?")
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": model, "cpu_mhz": mhz, "cpus": os.cpu_count(),
        "hypervisor": "hypervisor" in cpuinfo,
        "kernel": platform.uname().release, "uname": " ".join(platform.uname()),
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class BoxCpu:
    """A sample of /proc/stat: how busy all cores together have been since boot."""

    busy_s: float
    at: float

    @classmethod
    def now(cls) -> BoxCpu:
        cols = [int(c) for c in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = cols[3] + cols[4]  # idle + iowait
        return cls((sum(cols) - idle) / CLK_TCK, time.monotonic())

    def cores_busy_since(self, earlier: BoxCpu) -> float:
        return (self.busy_s - earlier.busy_s) / max(self.at - earlier.at, 1e-9)


@contextlib.contextmanager
def sysctl(path: Path, value: str) -> Iterator[None]:
    """Set a kernel setting for a figure, and put it back after."""
    old = path.read_text()
    _changed(path, old)
    path.write_text(f"{value}\n")
    try:
        yield
    finally:
        path.write_text(old)
        _changed(path, None)


def restore_left_changed() -> list[str]:
    """Put back the settings a killed run left changed; one line for each, saying what."""
    restored = []
    for name, old in _read_changed().items():
        path = Path(name)
        restored.append(f"{path.name}: {' '.join(path.read_text().split())} -> {' '.join(old.split())}")
        path.write_text(old)
    CHANGED.unlink(missing_ok=True)
    return restored


def _read_changed() -> dict[str, str]:
    return json.loads(CHANGED.read_text()) if CHANGED.exists() else {}


def _changed(path: Path, old: str | None) -> None:
    changed = _read_changed()
    if old is None:
        changed.pop(str(path), None)
    else:
        changed.setdefault(str(path), old)   # the first old value is the box's own
    if not changed:
        CHANGED.unlink(missing_ok=True)
        return
    tmp = CHANGED.with_suffix(".tmp")
    tmp.write_text(json.dumps(changed))
    tmp.replace(CHANGED)


def local_port_range(low: int, high: int) -> contextlib.AbstractContextManager[None]:
    """The ephemeral port range for a connection-rate run."""
    return sysctl(PORT_RANGE, f"{low} {high}")


def forget_time_wait(*ports: int) -> None:
    """Drop the sockets in TIME_WAIT toward ``ports`` (the bench's own loopback connections),
    so a run that counts on the ephemeral range starts with all of it."""
    match = " or ".join(f"dport = :{port}" for port in ports)
    subprocess.run(["ss", "-K", "-tn", "state", "time-wait", f"( {match} )"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)


@contextlib.contextmanager
def low_latency() -> Iterator[bool]:
    """Hold /dev/cpu_dma_latency at 0 so idle cores do not sleep deeply while we measure
    round trips (waking an idle vCPU costs tens of microseconds). Yields whether it is held."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError:
        yield False
        return
    try:
        os.write(fd, struct.pack("i", 0))
        yield True
    finally:
        os.close(fd)
