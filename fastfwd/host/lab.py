"""A disposable VM-host lab in network namespaces, for the tests and the lease-latency script.

Everything a :class:`Lab` makes (namespaces, the links inside them, processes started in them)
carries a short random suffix so parallel runs never clash, and is torn down by ``close()``
even after a failure. Nothing is created in the caller's own namespace.
"""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns


T = TypeVar("T")


def suffix() -> str:
    return secrets.token_hex(3)


class Lab:
    def __init__(self) -> None:
        self.id = suffix()
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._proc_ns: dict[int, str] = {}  # pid -> the namespace it was started in
        self.dir = Path(tempfile.mkdtemp(prefix=f"ffw-lab-{self.id}-"))
        self._threads: dict[str, ThreadPoolExecutor] = {}

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, role: str) -> str:
        """A new namespace ``ffw-<role>-<id>`` with loopback up."""
        name = f"ffw-{role}-{self.id}"
        netns.create(name)
        self.namespaces.append(name)
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def remove_netns(self, name: str) -> None:
        """Remove one of our namespaces now (its links go with it)."""
        for proc in [p for p in self.procs if self._proc_ns.get(p.pid) == name]:
            self.stop(proc)
        _kill_remaining(name)
        netns.remove(name)
        self.namespaces.remove(name)
        pool = self._threads.pop(name, None)
        if pool is not None:
            pool.shutdown()

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str, *,
             mac_b: str | None = None) -> None:
        """A veth pair with ``name_a`` in ``ns_a`` and ``name_b`` in ``ns_b``, both up."""
        with IPRoute(netns=ns_a) as ipr:
            ipr.link("add", ifname=name_a, kind="veth", peer=name_b)
            ipr.link("set", index=ipr.link_lookup(ifname=name_b)[0], net_ns_fd=ns_b)
            ipr.link("set", index=ipr.link_lookup(ifname=name_a)[0], state="up")
        with IPRoute(netns=ns_b) as ipr:
            attrs = {"address": mac_b} if mac_b else {}
            ipr.link("set", index=ipr.link_lookup(ifname=name_b)[0], state="up", **attrs)

    def call(self, ns: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` run by a thread that entered ``ns`` (setns changes only the calling
        thread's namespace): the sockets it makes, and the threads it starts, live there."""
        if ns not in self._threads:
            self._threads[ns] = ThreadPoolExecutor(
                1, initializer=functools.partial(netns.setns, ns, flags=0, fork=False))
        return self._threads[ns].submit(fn, *args).result()

    def socket(self, ns: str, family: int = socket.AF_INET,
               kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in namespace ``ns``, usable from any thread of this process."""
        return self.call(ns, socket.socket, family, kind)

    @staticmethod
    def argv(ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 30,
            check: bool = True, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(ns, argv), capture_output=True, text=True,
                              timeout=timeout, check=check, env=env)

    def spawn(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in ``ns`` (``ip netns exec`` execs it, so the pid is the process's
        own); it is stopped by ``stop`` or ``close``."""
        proc = subprocess.Popen(self.argv(ns, argv), **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        self._proc_ns[proc.pid] = ns
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
             timeout: float = 5) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def close(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        for name in reversed(self.namespaces[:]):
            self.remove_netns(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def dhcp_client(self, ns: str, iface: str = "eth0", *,
                    hostname: str | None = None) -> DhcpClient:
        return DhcpClient(self, ns, iface, hostname)


# udhcpc configures nothing itself: it runs this script on each state change. The bound
# address and the time the lease arrived (before the address is configured) are also written
# to a file, renamed into place so readers never see half of it.
_UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; rm -f "$OUT" ;;
  bound|renew)
    t=$(date +%s.%N)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    echo "$ip $t" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT" ;;
esac
"""


class DhcpClient:
    """busybox udhcpc in a namespace, in the foreground so it can be told to release."""

    def __init__(self, lab: Lab, ns: str, iface: str, hostname: str | None) -> None:
        self.lab = lab
        self.out = lab.dir / f"{ns}-{iface}.ip"
        script = lab.dir / "udhcpc.script"
        if not script.exists():
            script.write_text(_UDHCPC_SCRIPT)
            script.chmod(0o755)
        argv = ["env", f"OUT={self.out}", "busybox", "udhcpc", "-f", "-i", iface, "-s", str(script),
                "-t", "20", "-T", "1", "-A", "1"]
        if hostname:
            argv += ["-x", f"hostname:{hostname}"]
        self.proc = lab.spawn(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _bound(self) -> list[str]:
        try:
            return self.out.read_text().split()
        except FileNotFoundError:
            return []

    def address(self) -> str | None:
        return next(iter(self._bound()), None)

    def bound_at(self) -> float | None:
        """When the client got its lease (wall clock), for latency measurements."""
        fields = self._bound()
        return float(fields[1]) if len(fields) > 1 else None

    def wait_address(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while (ip := self.address()) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"no DHCP lease within {timeout:g}s")
            time.sleep(0.02)
        return ip

    def release(self) -> None:
        """Send DHCPRELEASE (udhcpc does on SIGUSR2) and drop the address."""
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while self.address() is not None and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.lab.stop(self.proc)


def _kill_remaining(ns: str) -> None:
    """Processes left in the namespace (daemons that forked away from us, like dnsmasq) would
    keep it alive after its name is gone: kill them, by pid, once we know they are in it."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in out.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass

