#!/usr/bin/env python3
"""How fast a lease turns into forwarding, on a VM host built in namespaces (root only).

Two figures, p50 / p99 / min / max over repeated runs:

1. **DHCP lease -> first forwarded connection.** A VM (fresh namespace, the MAC of the
   ``[hosts.vm1]`` entry) takes a lease from a real dnsmasq whose ``--dhcp-script`` is
   fastfwd's hook. Clock starts when udhcpc's script receives the lease (before it even
   configures the address); it stops when a client connection through fastfwd's port first
   reaches the VM's server and its echo checks out. The client retries every 0.5 ms, each
   try bounded to 0.2 s. The lease is then released (the rule goes back to pending) and the
   VM removed, for the next run.
2. **Lease-socket event -> rule live.** ``add`` sent straight to the lease socket: the time
   until the reply (which fastfwd sends only once the rule is live), and until a connection
   made right after the reply has completed; then ``del``, so each run starts from pending.

Everything (client, fastfwd, dnsmasq, VM) shares this machine's CPUs; the numbers include
waking them. Usage: ``python -m bench.lease_latency [--dhcp-runs N] [--event-runs N]
[--json FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from fastfwd.host.lab import Lab
from fastfwd.host.testbed import VmHost, wait_for
from fastfwd.unixclient import call

MAC = "52:54:00:1a:7e:01"


def first_forwarded(host: VmHost, vm: str, limit: float = 30.0) -> float:
    """Wall-clock time at which a connection through the port first reached ``vm``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if host.tcp(size=64, timeout=0.2) == vm:
                return time.time()
        except OSError:
            pass
        time.sleep(0.0005)
    raise TimeoutError("no forwarded connection")


def dhcp_runs(host: VmHost, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        vm = host.add_vm(f"vm{i}", MAC)
        assert vm.dhcp is not None
        live = first_forwarded(host, vm.name)
        bound = vm.dhcp.bound_at()
        assert bound is not None
        out.append(live - bound)
        vm.dhcp.release()
        wait_for(host.refused, message="pending again after release")
        host.remove_vm(vm)
    return out


def event_runs(host: VmHost, runs: int) -> tuple[list[float], list[float]]:
    vm = host.add_vm("vmev", MAC, static_ip=str(host.net[60]))
    replies, connected = [], []
    for _ in range(runs):
        start = time.perf_counter()
        reply = call(host.lease_socket, {"event": "add", "mac": MAC, "ip": vm.static_ip}, timeout=10)
        replied = time.perf_counter()
        assert reply["ok"], reply
        assert host.tcp(size=64, timeout=5) == vm.name  # live when the reply came: no retry
        replies.append(replied - start)
        connected.append(time.perf_counter() - start)
        assert call(host.lease_socket, {"event": "del", "mac": MAC, "ip": vm.static_ip}, timeout=10)["ok"]
    host.remove_vm(vm)
    return replies, connected


def summary(name: str, values: list[float]) -> dict[str, float | int | str]:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"what": name, "runs": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(p99, 3), "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dhcp-runs", type=int, default=20)
    parser.add_argument("--event-runs", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    with Lab() as lab:
        host = VmHost(lab)
        host.start_dnsmasq()
        host.write_config(MAC)
        host.start_daemon()
        try:
            rows = [summary("DHCP lease -> first forwarded connection", dhcp_runs(host, args.dhcp_runs))]
            replies, connected = event_runs(host, args.event_runs)
            rows += [summary("lease event -> reply (rule live)", replies),
                     summary("lease event -> forwarded connection done", connected)]
        except BaseException:
            print(host.log_text(), file=sys.stderr)
            raise
    print(f"{'what':45} {'runs':>5} {'p50 ms':>9} {'p99 ms':>9} {'min ms':>9} {'max ms':>9}")
    for r in rows:
        print(f"{r['what']:45} {r['runs']:>5} {r['p50_ms']:>9} {r['p99_ms']:>9} {r['min_ms']:>9} {r['max_ms']:>9}")
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
