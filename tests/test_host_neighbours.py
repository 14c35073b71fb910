"""The neighbour-table address source: a static-address VM behind a veth on the bridge is
seen, fed to the lease table, kept through DHCP snapshots, dropped when it stops answering,
and restored after its lease is lost; and the feeder never deletes what DHCP granted."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import threading
from collections.abc import AsyncIterator

import pytest
import uvloop

from fastfwd.host.lab import Lab
from fastfwd.host.links import ensure_address, ensure_bridge
from fastfwd.host.neighbours import Sighting, feed_neighbours, watch_neighbours
from fastfwd.leases import NEIGHBOURS, Lease, LeaseChange, LeaseTable

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

VM_MAC = "52:54:00:aa:00:01"
OTHER_MAC = "52:54:00:aa:00:02"


async def _replay(*sightings: Sighting) -> AsyncIterator[Sighting]:
    for s in sightings:
        yield s


def _feed(table: LeaseTable, *sightings: Sighting, **kw) -> list[list[LeaseChange]]:
    seen: list[list[LeaseChange]] = []

    async def on_change(changes: list[LeaseChange]) -> None:
        seen.append(changes)

    asyncio.run(feed_neighbours(table, on_change, sightings=_replay(*sightings), **kw))
    return seen


def test_add_then_failed_removes_own_lease() -> None:
    table = LeaseTable()
    calls = _feed(table, Sighting("add", "10.0.0.5", VM_MAC), Sighting("add", "10.0.0.5", VM_MAC),
                  Sighting("del", "10.0.0.5"))
    assert [len(c) for c in calls] == [1, 1]  # the repeated sighting changed nothing
    assert calls[0][0].new is not None and calls[0][0].new.ip == "10.0.0.5"
    assert calls[1][0].new is None and table.for_mac(VM_MAC) is None


def test_failed_neighbour_never_deletes_a_dhcp_lease() -> None:
    table = LeaseTable([Lease(VM_MAC, "10.0.0.5", "vm1")])
    calls = _feed(table, Sighting("add", "10.0.0.5", VM_MAC), Sighting("del", "10.0.0.5"))
    assert calls == []
    lease = table.for_mac(VM_MAC)
    assert lease is not None and lease.hostname == "vm1"  # not overwritten by a nameless copy


def test_failed_neighbour_removes_a_lease_found_before_a_restart() -> None:
    table = LeaseTable([Lease(VM_MAC, "10.0.0.5", source=NEIGHBOURS)])  # as restored from the state file
    calls = _feed(table, Sighting("del", "10.0.0.5"))
    assert [len(c) for c in calls] == [1] and len(table) == 0


def test_sightings_are_neighbour_leases_that_a_dhcp_snapshot_keeps() -> None:
    table = LeaseTable()
    _feed(table, Sighting("add", "10.0.0.5", VM_MAC))
    assert table.apply_snapshot([Lease(OTHER_MAC, "10.0.0.6", "vm2")]) != []
    lease = table.for_mac(VM_MAC)
    assert lease is not None and (lease.ip, lease.source) == ("10.0.0.5", NEIGHBOURS)


def test_mac_filter() -> None:
    table = LeaseTable()
    _feed(table, Sighting("add", "10.0.0.5", VM_MAC), Sighting("add", "10.0.0.6", OTHER_MAC),
          macs=lambda: [OTHER_MAC])
    assert [lease.mac for lease in table] == [OTHER_MAC]


class _Topology:
    """Host namespace with a bridge; a VM namespace on it by veth, with a static address."""

    def __init__(self, lab: Lab) -> None:
        n = ipaddress.IPv4Network(f"10.{int(lab.id[:2], 16)}.{int(lab.id[2:4], 16)}.0/24")
        self.host_ip, self.vm_ip = n[1], n[50]
        self.host = lab.netns("host")
        self.vm = lab.netns("vm")
        ensure_bridge("br0", netns=self.host)
        ensure_address("br0", ipaddress.IPv4Interface(f"{self.host_ip}/24"), netns=self.host)
        lab.veth(self.host, "vm-port", self.vm, "eth0", mac_b=VM_MAC)
        lab.run(self.host, ["ip", "link", "set", "vm-port", "master", "br0"])
        lab.run(self.vm, ["ip", "addr", "add", f"{self.vm_ip}/24", "dev", "eth0"])
        # A second link: other1 is a bridge port (so the bridge keeps its carrier when the VM's
        # goes down, which would flush its neighbours), other0 is not on the bridge.
        lab.veth(self.host, "other0", self.host, "other1")
        lab.run(self.host, ["ip", "link", "set", "other1", "master", "br0"])


async def _wait(what, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not what():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def _sh(lab: Lab, ns: str, *argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(*lab.argv(ns, argv), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


@root
def test_static_vm_seen_lost_and_resynced() -> None:
    with Lab() as lab:
        topo = _Topology(lab)
        # A static entry on another link must not be taken for the bridge's.
        lab.run(topo.host, ["ip", "neigh", "add", "10.254.0.9", "lladdr", OTHER_MAC,
                            "dev", "other0", "nud", "permanent"])
        vm_ip = str(topo.vm_ip)

        async def scenario() -> None:
            table = LeaseTable()
            changes: list[LeaseChange] = []

            async def on_change(c: list[LeaseChange]) -> None:
                changes.extend(c)

            feeder = asyncio.create_task(feed_neighbours(
                table, on_change, interfaces=["br0"], netns=topo.host, resync=0.5))
            try:
                # The VM talks to its gateway, as every booting guest does.
                assert await _sh(lab, topo.vm, "busybox", "ping", "-c1", "-W2", str(topo.host_ip)) == 0
                await _wait(lambda: table.for_mac(VM_MAC) is not None)
                lease = table.for_mac(VM_MAC)
                assert lease is not None and lease.ip == vm_ip
                assert table.for_mac(OTHER_MAC) is None

                # A DHCP snapshot leaves it alone.
                table.apply_snapshot([])
                assert lease.same(table.for_mac(VM_MAC))  # ("seen" may have been refreshed)
                # Its lease lost (as if an event had been): the next resync brings it back.
                table.apply_snapshot([], source=NEIGHBOURS)
                assert table.for_mac(VM_MAC) is None
                await _wait(lambda: table.for_mac(VM_MAC) is not None)

                # The VM goes away; the host asks for it, nobody answers: the lease goes.
                await _sh(lab, topo.vm, "ip", "addr", "flush", "dev", "eth0")
                await _sh(lab, topo.host, "busybox", "ping", "-c1", "-W1", vm_ip)
                await _wait(lambda: table.for_mac(VM_MAC) is None)
                assert changes[-1].old is not None and changes[-1].new is None
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            # Cancelling the feeder stops the netlink reader's thread too.
            assert "fastfwd-neighbours" not in {t.name for t in threading.enumerate()}

        asyncio.run(scenario())


@root
@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_watch_reports_existing_entries_at_start(run) -> None:
    """Also on uvloop, which the daemon runs on and which pyroute2 cannot run netlink on."""
    with Lab() as lab:
        topo = _Topology(lab)
        lab.run(topo.host, ["ip", "neigh", "add", "10.99.0.7", "lladdr", OTHER_MAC,
                            "dev", "br0", "nud", "permanent"])

        async def first() -> Sighting:
            watch = watch_neighbours(["br0"], netns=topo.host)
            try:
                return await asyncio.wait_for(watch.__anext__(), 10)
            finally:
                await watch.aclose()

        assert run(first()) == Sighting("add", "10.99.0.7", OTHER_MAC)


@root
def test_an_entry_deleted_by_hand_counts_as_failed_until_the_vm_talks_again() -> None:
    """docs/vm-hosts.md: the kernel's own garbage collection of an entry is ignored, but
    ``ip neigh del`` (or ``flush``) first reports the entry failed, so its lease goes; the VM's
    next packet to the host brings it back."""
    with Lab() as lab:
        topo = _Topology(lab)
        vm_ip = str(topo.vm_ip)

        async def scenario() -> None:
            table = LeaseTable()

            async def on_change(changes: list[LeaseChange]) -> None:
                pass

            feeder = asyncio.create_task(feed_neighbours(table, on_change, interfaces=["br0"], netns=topo.host))
            try:
                assert await _sh(lab, topo.vm, "busybox", "ping", "-c1", "-W2", str(topo.host_ip)) == 0
                await _wait(lambda: table.for_mac(VM_MAC) is not None)
                assert await _sh(lab, topo.host, "ip", "neigh", "del", vm_ip, "dev", "br0") == 0
                await _wait(lambda: table.for_mac(VM_MAC) is None)
                assert await _sh(lab, topo.vm, "busybox", "ping", "-c1", "-W2", str(topo.host_ip)) == 0
                await _wait(lambda: table.for_mac(VM_MAC) is not None)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)

        asyncio.run(scenario())
