"""The lease socket: DHCP events and snapshots in, one reply each once forwarding follows them.

Messages (one JSON object per line)::

    {"event": "add"|"old"|"del", "mac": "52:54:00:12:34:56", "ip": "10.0.0.5", "hostname": "vm1",
     "scope": "br0"}
    {"event": "del", "ip": "fd00::5"}    (the DHCP lease holding the address, whichever MAC)
    {"snapshot": [{"mac": ..., "ip": ..., "hostname": ...}, ...], "family": 4, "scope": "br0"}

Replies: ``{"ok": true, "changed": N}`` once the table has the change and the daemon's
``on_change`` callback (which re-points the rules) has returned; or ``{"ok": false, "error":
"..."}`` with nothing changed. Messages are applied one at a time, in arrival order, so a
reply also means every earlier message is live. Saving the table is the table's business
(see ``LeaseTable``'s ``save_delay``). A snapshot replaces the DHCP leases only: what other
sources (the neighbour table) found stays; with ``family`` (optional, 4 or 6) it replaces the
DHCP leases of that IP version only. ``scope`` (optional) names the DHCP server a message
comes from: a snapshot replaces the leases of its scope only. A message without one is the
unnamed server's, and so is one whose scope is the path of the daemon's own lease file. A
scope that is an absolute path is resolved (``os.path.realpath``) before it is compared or kept.

Line caps: an event line may be 64 KiB, a snapshot line 8 MiB (about 100,000 leases with host names).

``apply_lease_file`` and ``reread_lease_file`` take the same snapshot from dnsmasq's lease
file (``[sources] dhcp_lease_file``), as the unnamed server's: events lost while the daemon was
down are made good.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .lease_file import read_lease_file
from .leases import (Lease, LeaseChange, LeaseError, LeaseTable, OnChange, held_address,
                     normalize_hostname, normalize_scope)
from .unixserver import OWNER_ONLY, Access, JsonLineServer, Request, RequestError

log = logging.getLogger("fastfwd.leases")

EVENT_MAX = 64 << 10
SNAPSHOT_MAX = 8 << 20


class LeaseServer(JsonLineServer):
    """Serves ``table`` on ``path``; ``on_change(changes)`` must return once rules are live."""

    def __init__(self, path: str | os.PathLike[str], table: LeaseTable, on_change: OnChange, *,
                 access: Access = OWNER_ONLY, lock: asyncio.Lock | None = None, lease_file: str | None = None,
                 **limits: Any) -> None:
        """``lock`` serializes changes with other writers of ``table`` (say, an address source
        watching the bridge); each message holds it from applying until ``on_change`` returned.
        ``lease_file`` is the daemon's ``dhcp_lease_file``: the scope naming it is the unnamed
        one, whose leases that file's snapshots replace, so the hook of the dnsmasq writing it
        (``fastfwd-bridge`` names each dnsmasq by its lease file) agrees with them."""
        super().__init__(path, self._handle, name="lease", access=access, line_limit=EVENT_MAX,
                         max_line=SNAPSHOT_MAX, **limits)
        self.table = table
        self._on_change = on_change
        self._lock = lock if lock is not None else asyncio.Lock()
        self._unnamed = {"", _resolved(lease_file)} if lease_file is not None else {""}

    async def _handle(self, request: Request) -> dict[str, Any]:
        change = _parse(request, self._unnamed)
        async with self._lock:
            try:
                changes = change(self.table)
            except LeaseError as exc:
                raise RequestError(str(exc)) from None
            _log_changes(changes)
            await _follow(changes, self._on_change)
        return {"changed": len(changes)}


async def _follow(changes: list[LeaseChange], on_change: OnChange) -> None:
    """Wait until the rules follow ``changes``; a failure is logged and a RequestError."""
    if changes:
        try:
            await on_change(changes)
        except Exception as exc:
            log.exception("leases recorded but re-pointing rules failed")
            raise RequestError(f"lease recorded, but re-pointing rules failed: {exc}") from None


async def apply_lease_file(table: LeaseTable, path: str) -> list[LeaseChange]:
    """Apply dnsmasq's lease file to ``table`` as the hook's ``snapshot`` sends it: its IPv4
    leases replace the DHCP IPv4 leases. Never raises: a file that cannot be read, or that
    was still being rewritten over several reads, changes nothing (one log line). A malformed
    line is skipped with a log line, and then the file's leases are only added or updated:
    the skipped line may have held a lease the table has, and a lease dropped for it would
    not come back. An empty file changes nothing, for the same reason: dnsmasq rewrites the
    file in place, emptying it first. The file is read in a thread (waiting for it to hold
    still); the table is changed on the caller's loop."""
    def note(text: str) -> None:
        log.warning("DHCP lease file %s", text)

    try:
        parsed = await asyncio.to_thread(read_lease_file, path, note, strict=False)
        if parsed is None:
            log.info("DHCP lease file %s is empty (being rewritten?): no lease removed", path)
            return []
        entries, malformed = parsed
        now = time.time()  # the claims of one snapshot are equal (see LeaseTable.named)
        leases = [Lease.from_message(entry, seen=now) for entry in entries]
        changes = ([change for lease in leases for change in table.apply_event("old", lease)] if malformed
                   else table.apply_snapshot(leases, family=4))
    except LeaseError as exc:
        log.warning("DHCP lease file not applied: %s; going on with the %d lease(s) known", exc, len(table))
        return []
    log.info("DHCP lease file %s: %d lease(s), %d changed%s", path, len(leases), len(changes),
             f" ({malformed} line(s) skipped, so no lease removed)" if malformed else "")
    _log_changes(changes)
    return changes


async def reread_lease_file(table: LeaseTable, path: str, on_change: OnChange, lock: asyncio.Lock) -> None:
    """``apply_lease_file`` on a running daemon; returns once the rules follow. ``lock`` is the
    lease socket's, so that no event lands between the file's reading and its applying."""
    async with lock:
        try:
            await _follow(await apply_lease_file(table, path), on_change)
        except RequestError:
            pass  # logged; the leases stay, as on the socket


#: A snapshot that changes more leases than this is logged as a count, not lease by lease.
_LOGGED_ONE_BY_ONE = 20


def _log_changes(changes: list[LeaseChange]) -> None:
    if len(changes) > _LOGGED_ONE_BY_ONE:
        log.info("leases: %d changed", len(changes))
        return
    for old, new in ((c.old, c.new) for c in changes):
        if new is None:
            assert old is not None
            log.info("lease %s: %s gone", old.mac, old.ip)
        elif old is None:
            log.info("lease %s: %s", new.mac, _held(new))
        else:
            log.info("lease %s: %s (was %s)", new.mac, _held(new), _held(old))


def _held(lease: Lease) -> str:
    return f"{lease.ip} {lease.hostname}" if lease.hostname else lease.ip


def _resolved(scope: str) -> str:
    """A scope that is an absolute path names a lease file: resolved as the file system does
    (symlinks, ``..``, doubled slashes), so that every spelling of one file is one server.
    realpath, not normpath: a symlinked directory is a common spelling, and ``..`` after a
    symlink is not what normpath makes of it. It costs a few lstat calls per such message."""
    return os.path.realpath(scope) if os.path.isabs(scope) else scope


def _parse(request: Request, unnamed: set[str]) -> Callable[[LeaseTable], list[LeaseChange]]:
    """Validate a whole message before anything is applied: what applies it to the table (an
    event's name is checked by the table). A scope in ``unnamed`` is the unnamed one."""
    doc = request.message
    if not isinstance(doc, dict):
        raise RequestError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        scope = _resolved(normalize_scope(doc.get("scope")))
        scope = "" if scope in unnamed else scope
        if "snapshot" in doc:
            if not set(doc) <= {"snapshot", "family", "scope"}:
                raise LeaseError("a snapshot message has only the 'snapshot', 'family' and 'scope' keys")
            family = doc.get("family")
            if family is not None and (type(family) is not int or family not in (4, 6)):  # not True, not 4.0
                raise LeaseError(f"family: expected 4 or 6, got {family!r}")
            if not isinstance(doc["snapshot"], list):
                raise LeaseError(f"snapshot: expected a list of leases, got {type(doc['snapshot']).__name__}")
            leases = []
            now = time.time()  # the claims of one snapshot are equal (see LeaseTable.named)
            for i, entry in enumerate(doc["snapshot"]):
                try:
                    leases.append(Lease.from_message(entry, seen=now, scope=scope))
                except LeaseError as exc:
                    raise LeaseError(f"snapshot[{i}]: {exc}") from None
            return functools.partial(LeaseTable.apply_snapshot, leases=leases, family=family, scope=scope)
        if request.size > EVENT_MAX:
            raise LeaseError(f"event line too long (limit {EVENT_MAX} bytes)")
        if "event" not in doc:
            raise LeaseError("expected an 'event' or a 'snapshot' key")
        if not isinstance(doc["event"], str):
            raise LeaseError(f"event: expected a string, got {type(doc['event']).__name__}")
        if doc["event"] == "del" and "mac" not in doc:
            # DHCPv6: dnsmasq keeps no MAC for a lease across its restart, so its expiry may
            # come with the address alone.
            Lease.check_keys(doc, extra=("event", "scope"), required=("ip",))
            normalize_hostname(doc.get("hostname"))  # checked as in any event, though unused
            return functools.partial(LeaseTable.release, ip=held_address(doc["ip"]), scope=scope)
        lease = Lease.from_message(doc, scope=scope, extra=("event", "scope"))
        return functools.partial(LeaseTable.apply_event, event=doc["event"], lease=lease)
    except LeaseError as exc:
        raise RequestError(str(exc)) from None

