"""The kernel neighbour table as an address source, for VMs with static addresses.

A VM that configures its own address sends no DHCP, but the first time it talks to the host
(an ARP request for its gateway, which every booting guest sends) the kernel records its
(MAC, IP) in the neighbour table of the bridge. :func:`watch_neighbours` reads that table
through rtnetlink and follows its changes; :func:`feed_neighbours` turns what it sees into
events on the same :class:`~fastfwd.leases.LeaseTable` that the lease socket feeds.

What counts:

- an entry with a link-layer address in a valid state (reachable, stale, delay, probe,
  permanent) is a sighting: ``add``;
- an entry that turns *failed* (the host asked and nobody answered) means the machine is gone
  from that address: ``del``;
- an entry the kernel deletes says nothing (unused entries are garbage-collected while the
  VM lives on), so it is ignored.

Netlink events can be lost (a full socket buffer), so the watcher reconciles: every
``resync`` seconds it dumps the table again and repeats each sighting; repeating one the
table already holds changes nothing. The leases it adds are marked as the neighbour table's
(:data:`~fastfwd.leases.NEIGHBOURS`), and the lease table keeps the sources apart: a failed
neighbour never deletes a lease the DHCP server granted (dnsmasq would not say it again until
the lease renews), a sighting never overrides one, and a DHCP snapshot leaves these alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
)
from dataclasses import dataclass
from typing import Any, Literal

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_NEIGH

from ..leases import (
    NEIGHBOURS,
    Lease,
    LeaseError,
    LeaseTable,
    OnChange,
    normalize_ip,
    normalize_mac,
)

log = logging.getLogger("fastfwd.neighbours")

# Neighbour states (linux/neighbour.h) that matter here.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE = 0x02, 0x04, 0x08, 0x10
NUD_FAILED, NUD_PERMANENT = 0x20, 0x80
_ALIVE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT
_FAMILIES = {4: 2, 6: 10}  # IP version -> AF_INET / AF_INET6


@dataclass(frozen=True)
class Sighting:
    """``add``: ``mac`` answers at ``ip``. ``del``: nothing answers at ``ip`` any more
    (``mac`` is None: a failed entry carries no link-layer address)."""

    event: Literal["add", "del"]
    ip: str
    mac: str | None = None


async def watch_neighbours(interfaces: Collection[str] | None = None, *,
                           families: Collection[int] = (4,), netns: str | None = None,
                           resync: float = 30.0) -> AsyncGenerator[Sighting, None]:
    """Sightings on ``interfaces`` (names; None: all), from a full dump at start and every
    ``resync`` seconds, and from netlink events in between. Runs until closed or cancelled;
    a failed netlink socket is reopened (with a dump, so nothing is missed).

    Netlink is read in a thread of its own, on a plain asyncio loop: pyroute2's async sockets
    cannot run on uvloop (it has no netlink datagram transport), and the daemon runs on uvloop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Sighting | BaseException] = asyncio.Queue()
    reader = _NetlinkThread(
        lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
        _watch(interfaces, {_FAMILIES[f] for f in families}, netns, resync))
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        reader.stop()
        await loop.run_in_executor(None, reader.thread.join, 5.0)


class _NetlinkThread:
    def __init__(self, deliver: Callable[[Sighting | BaseException], object],
                 source: AsyncIterator[Sighting]) -> None:
        self.loop = asyncio.SelectorEventLoop()  # not new_event_loop(): that may be uvloop's
        self.task = self.loop.create_task(self._pump(deliver, source))
        self.thread = threading.Thread(target=self._run, name="fastfwd-neighbours", daemon=True)
        self.thread.start()

    @staticmethod
    async def _pump(deliver: Callable[[Sighting | BaseException], object],
                    source: AsyncIterator[Sighting]) -> None:
        try:
            async for sighting in source:
                deliver(sighting)
        except Exception as exc:  # handed to the reader, which raises it
            deliver(exc)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def stop(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.task.cancel)
        except RuntimeError:  # the loop has already finished
            pass


async def _watch(interfaces: Collection[str] | None, families: set[int], netns: str | None,
                 resync: float) -> AsyncIterator[Sighting]:
    while True:
        try:
            async with AsyncIPRoute(netns=netns) as ipr:
                await ipr.bind(groups=RTMGRP_NEIGH)  # before the dump: no change falls between
                while True:
                    indexes = await _indexes(ipr, interfaces)
                    async for msg in await ipr.neigh("dump"):
                        sighting = _sighting(msg, indexes, families)
                        if sighting is not None and sighting.event == "add":
                            yield sighting
                    deadline = time.monotonic() + resync
                    while (left := deadline - time.monotonic()) > 0:
                        try:
                            batch = await asyncio.wait_for(_next_batch(ipr), left)
                        except TimeoutError:
                            break
                        for msg in batch:
                            sighting = _sighting(msg, indexes, families)
                            if sighting is not None:
                                yield sighting
        except OSError as exc:  # ENOBUFS (events lost) and the like: start over with a dump
            log.warning("neighbour watch: netlink failed (%s); reopening", exc)
            await asyncio.sleep(1.0)


async def _next_batch(ipr: AsyncIPRoute) -> list[Any]:
    return [msg async for msg in ipr.get()]


async def _indexes(ipr: AsyncIPRoute, names: Collection[str] | None) -> set[int] | None:
    if names is None:
        return None
    return {link["index"] async for link in await ipr.link("dump")
            if link.get_attr("IFLA_IFNAME") in names}


def _sighting(msg: Any, indexes: set[int] | None, families: set[int]) -> Sighting | None:
    if msg.get("event") != "RTM_NEWNEIGH" or msg["family"] not in families:
        return None
    if indexes is not None and msg["ifindex"] not in indexes:
        return None
    dst = msg.get_attr("NDA_DST")
    if dst is None or not _unicast(dst):
        return None
    state = msg["state"]
    if state & NUD_FAILED:
        return Sighting("del", normalize_ip(dst))
    lladdr = msg.get_attr("NDA_LLADDR")
    if state & _ALIVE and lladdr:
        try:
            return Sighting("add", normalize_ip(dst), normalize_mac(lladdr))
        except LeaseError:  # not an Ethernet address (another link type)
            return None
    return None


def _unicast(text: str) -> bool:
    ip = ipaddress.ip_address(text)
    return not (ip.is_multicast or ip.is_link_local or ip.is_unspecified or ip.is_loopback
                or ip == ipaddress.IPv4Address("255.255.255.255"))


async def feed_neighbours(table: LeaseTable, on_change: OnChange, *,
                          sightings: AsyncGenerator[Sighting, None] | None = None,
                          macs: Callable[[], Iterable[str]] | None = None,
                          lock: asyncio.Lock | None = None, **watch: Any) -> None:
    """Apply neighbour sightings to ``table`` and await ``on_change(changes)`` after each change,
    exactly as the lease socket does. Runs until cancelled.

    ``sightings`` defaults to ``watch_neighbours(**watch)``. ``macs``, if given, returns the
    MACs worth tracking (the ``[hosts]`` entries), so other machines on the bridge stay out of
    the lease table. ``lock`` is held around each change, to serialize with other sources.
    """
    source = sightings if sightings is not None else watch_neighbours(**watch)
    async with contextlib.aclosing(source):  # stops the netlink thread when we are cancelled
        async for sighting in source:
            await _apply(sighting, table, on_change, macs, lock)


async def _apply(sighting: Sighting, table: LeaseTable, on_change: OnChange,
                 macs: Callable[[], Iterable[str]] | None, lock: asyncio.Lock | None) -> None:
    if sighting.event == "add" and macs is not None and sighting.mac not in set(macs()):
        return
    async with lock if lock is not None else contextlib.nullcontext():
        if sighting.event == "add":
            assert sighting.mac is not None
            lease = Lease(sighting.mac, sighting.ip, seen=time.time(), source=NEIGHBOURS)
        else:
            held = table.holding(sighting.ip)
            if held is None:
                return
            # A del from this source: the table removes the lease only if this source put it there.
            lease = Lease(held.mac, held.ip, source=NEIGHBOURS)
        changes = table.apply_event(sighting.event, lease)
        if changes:
            log.info("neighbour %s: %s %s", sighting.event, lease.mac, lease.ip)
            await on_change(changes)
