"""The lease socket: DHCP events and snapshots in, one reply each once forwarding follows them.

Messages (one JSON object per line)::

    {"event": "add"|"old"|"del", "mac": "52:54:00:12:34:56", "ip": "10.0.0.5", "hostname": "vm1"}
    {"snapshot": [{"mac": ..., "ip": ..., "hostname": ...}, ...], "family": 4}

Replies: ``{"ok": true, "changed": N}`` once the table has the change and the daemon's
``on_change`` callback (which re-points the rules) has returned; or ``{"ok": false, "error":
"..."}`` with nothing changed. Messages are applied one at a time, in arrival order, so a
reply also means every earlier message is live. Saving the table is the table's business
(see ``LeaseTable``'s ``save_delay``). A snapshot replaces the DHCP leases only: what other
sources (the neighbour table) found stays; with ``family`` (optional, 4 or 6) it replaces the
DHCP leases of that IP version only.

Line caps: an event line may be 64 KiB, a snapshot line 8 MiB (about 100,000 leases with host names).
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .leases import Lease, LeaseChange, LeaseError, LeaseTable
from .unixserver import Access, JsonLineServer, Request, RequestError

log = logging.getLogger("fastfwd.leases")

EVENT_MAX = 64 << 10
SNAPSHOT_MAX = 8 << 20

OnChange = Callable[[list[LeaseChange]], Awaitable[None]]


class LeaseServer(JsonLineServer):
    """Serves ``table`` on ``path``; ``on_change(changes)`` must return once rules are live."""

    def __init__(self, path: str | os.PathLike[str], table: LeaseTable, on_change: OnChange, *,
                 access: Access = Access(), lock: asyncio.Lock | None = None, **limits: Any) -> None:
        """``lock`` serializes changes with other writers of ``table`` (say, an address source
        watching the bridge); each message holds it from applying until ``on_change`` returned."""
        super().__init__(path, self._handle, name="lease", access=access, line_limit=EVENT_MAX,
                         max_line=SNAPSHOT_MAX, **limits)
        self.table = table
        self._on_change = on_change
        self._lock = lock if lock is not None else asyncio.Lock()

    async def _handle(self, request: Request) -> dict[str, Any]:
        event, leases, family = _parse(request)
        async with self._lock:
            try:
                changes = (self.table.apply_snapshot(leases, family=family) if event is None
                           else self.table.apply_event(event, leases[0]))
            except LeaseError as exc:
                raise RequestError(str(exc)) from None
            _log_changes(changes)
            if changes:
                try:
                    await self._on_change(changes)
                except Exception as exc:
                    log.exception("leases recorded but re-pointing rules failed")
                    raise RequestError(f"lease recorded, but re-pointing rules failed: {exc}") from None
        return {"changed": len(changes)}


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


def _parse(request: Request) -> tuple[str | None, list[Lease], int | None]:
    """Validate a whole message before anything is applied: ``(event, leases, family)``, where
    the event is None for a snapshot (an event's name is checked by the table) and the family
    (4, 6, or None: both) is the IP version a snapshot covers."""
    doc = request.message
    if not isinstance(doc, dict):
        raise RequestError(f"expected a JSON object, got {type(doc).__name__}")
    try:
        if "snapshot" in doc:
            if not set(doc) <= {"snapshot", "family"}:
                raise LeaseError("a snapshot message has only the 'snapshot' and 'family' keys")
            family = doc.get("family")
            if family not in (None, 4, 6) or isinstance(family, bool):
                raise LeaseError(f"family: expected 4 or 6, got {family!r}")
            if not isinstance(doc["snapshot"], list):
                raise LeaseError(f"snapshot: expected a list of leases, got {type(doc['snapshot']).__name__}")
            leases = []
            for i, entry in enumerate(doc["snapshot"]):
                try:
                    leases.append(Lease.from_message(entry))
                except LeaseError as exc:
                    raise LeaseError(f"snapshot[{i}]: {exc}") from None
            return None, leases, family
        if request.size > EVENT_MAX:
            raise LeaseError(f"event line too long (limit {EVENT_MAX} bytes)")
        if "event" not in doc:
            raise LeaseError("expected an 'event' or a 'snapshot' key")
        if not isinstance(doc["event"], str):
            raise LeaseError(f"event: expected a string, got {type(doc['event']).__name__}")
        return doc["event"], [Lease.from_message(doc, extra=("event",))], None
    except LeaseError as exc:
        raise RequestError(str(exc)) from None

