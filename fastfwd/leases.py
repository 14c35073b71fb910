"""The lease table: which machine (MAC) holds which address, as the DHCP server reports it.

Leases are keyed by MAC *and* address family, so a dual-stack guest keeps its IPv4 and its
IPv6 lease side by side (an IPv6 event never overwrites the IPv4 target). Events are
reconciled rather than trusted one by one: an address handed to a new MAC is taken from the
MAC that held it before (its ``del`` may have been lost), and a ``del`` for an address the
MAC no longer holds changes nothing (it arrived after the newer ``add``).

Two sources write the table: DHCP (the lease socket) and the kernel's neighbour table (static
VMs seen on the bridge). Each lease remembers its source, and a source only ever removes its
own leases: a DHCP ``del`` or snapshot never drops a lease the neighbour table found, nor the
other way round. Where both know a MAC, or one address, **DHCP wins**: a DHCP lease replaces
a neighbour-learned one, and a sighting never replaces a DHCP lease (the grant is what the
guest was told to use; a sighting is only what answered on the bridge, and may be stale).

A DHCP lease also remembers its *scope*: which DHCP server granted it (a name; "" for the
unnamed one). Several servers (one dnsmasq per bridge) may feed one table, and a snapshot
replaces the leases of its own scope only; an event takes the MAC's lease whatever scope held
it (the VM moved to another server), and a ``del`` removes only a lease of its own scope.

The table persists to one JSON file in the state directory: written to a temporary file,
fsynced, renamed over the old one, and the directory fsynced, so a crash leaves either the
old or the new file. With a ``save_delay``, changes are saved together at most that long
after the first of them (a crash loses at most that window); a timed save that fails is
retried by itself, at intervals doubling up to ``SAVE_RETRY_MAX``; ``flush`` saves at once. A
file that fails its checksum or does not parse is rejected whole (moved aside to
``leases.json.corrupt``) and the table starts empty: a damaged file cannot say which of its
entries are still true. Entries of an intact file that fail validation are skipped one by
one, with a log line each.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .rules import ip_address, is_ip, why_not_ip

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("fastfwd.leases")

Event = Literal["add", "old", "del"]
#: A lease's identity: its MAC and address family (4 or 6).
LeaseKey = tuple[str, int]
EVENTS: tuple[Event, ...] = ("add", "old", "del")
Source = Literal["neighbours", "dhcp"]
DHCP: Source = "dhcp"
NEIGHBOURS: Source = "neighbours"
#: Lowest precedence first: where two sources disagree, the later one here wins.
SOURCES: tuple[Source, ...] = (NEIGHBOURS, DHCP)

STATE_FILE = "leases.json"
_STATE_VERSION = 1
#: A state file larger than this is not lease data (tens of thousands of leases fit easily).
_STATE_MAX_BYTES = 64 << 20
#: The longest wait, in seconds, between retries of a timed save that keeps failing.
SAVE_RETRY_MAX = 30.0

_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
#: A scope may be a lease file's path: up to PATH_MAX, and no control characters, which would
#: break the log lines that name it.
_SCOPE = re.compile(r"^[^\x00-\x1f\x7f]{0,4096}$")


class LeaseError(ValueError):
    """A lease field or message that cannot be used; the message names the problem."""


def normalize_mac(value: object) -> str:
    """``AA:bb:CC:dd:EE:ff`` into ``aa:bb:cc:dd:ee:ff``; anything else is a LeaseError."""
    if not isinstance(value, str) or not _MAC.fullmatch(value.lower()):
        raise LeaseError(f"mac: {value!r} is not a MAC address like 52:54:00:12:34:56")
    return value.lower()


def normalize_ip(value: object) -> str:
    """An IPv4 or IPv6 address in its compressed form (so equal addresses compare equal)."""
    if not isinstance(value, str):
        raise LeaseError(f"ip: expected a string, got {type(value).__name__}")
    # Without an IPv6 zone (fe80::1%eth0): a lease with one would be saved, fail every
    # re-pointing, and then stop the daemon's next start.
    try:
        return str(ip_address(value))
    except ValueError:
        raise LeaseError(f"ip: {value!r} {why_not_ip(value)}") from None


def held_address(value: object) -> str:
    """A lease's address, in normal form: one a machine can hold. A rule that followed the
    unspecified address would forward to this host itself; a multicast or broadcast one, to
    no one machine."""
    ip = normalize_ip(value)
    addr = ipaddress.ip_address(ip)
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise LeaseError(f"ip: {value!r} is not a machine's address")
    return ip


def normalize_hostname(value: object) -> str | None:
    """A host name by RFC 1123 (labels of 1-63 letters, digits and inner hyphens; 253 in all,
    and never dotted-decimal), lowercased since names compare case-insensitively. None or ""
    means no name."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LeaseError(f"hostname: expected a string, got {type(value).__name__}")
    name = value.lower()
    # A name that reads as an address would re-point, at each of its lease events, the rules
    # that target that address itself (resetting their connections with on_retarget = close).
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")) or is_ip(name):
        raise LeaseError(f"hostname: {value[:80]!r} is not a valid host name")
    return name


def normalize_scope(value: object) -> str:
    """The name of the DHCP server that granted a lease; None or "" for the unnamed one."""
    if value is None:
        return ""
    if not isinstance(value, str) or not _SCOPE.fullmatch(value):
        raise LeaseError(f"scope: {value!r:.80} is not a string of up to 4096 printable characters")
    return value


def client_hostname(value: str, note: Callable[[str], None]) -> str | None:
    """A host name a DHCP client chose: an invalid one is dropped with a ``note``, not fatal,
    since the lease (and the rules that follow its MAC) still matter."""
    try:
        return normalize_hostname(value)
    except LeaseError:
        note(f"ignoring invalid host name {value[:80]!r}")
        return None


@dataclasses.dataclass(frozen=True)
class Lease:
    """One address held by one machine. ``seen`` is when its source first reported it as it
    stands: a report that repeats it changes nothing, so ``seen`` orders the claims to a name."""

    mac: str
    ip: str
    hostname: str | None = None
    seen: float = 0.0
    source: Source = DHCP
    scope: str = ""

    def __post_init__(self) -> None:
        # Every way in (socket, state file, other address sources) is validated and normalized here.
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        object.__setattr__(self, "ip", held_address(self.ip))
        object.__setattr__(self, "hostname", normalize_hostname(self.hostname))
        if self.source not in SOURCES:
            raise LeaseError(f"source: expected one of {', '.join(SOURCES)}, got {self.source!r:.80}")
        object.__setattr__(self, "scope", normalize_scope(self.scope))

    @functools.cached_property
    def key(self) -> LeaseKey:
        return (self.mac, ipaddress.ip_address(self.ip).version)

    @classmethod
    def from_message(cls, doc: object, *, seen: float | None = None, source: object = DHCP,
                     scope: object = "", extra: Iterable[str] = ()) -> Lease:
        """Validate ``{"mac", "ip", "hostname"?}``; ``extra`` names further keys the caller reads."""
        doc = cls.check_keys(doc, extra)
        return cls(mac=doc["mac"], ip=doc["ip"], hostname=doc.get("hostname"),
                   seen=time.time() if seen is None else seen, source=source, scope=scope)  # type: ignore[arg-type]

    @staticmethod
    def check_keys(doc: object, extra: Iterable[str] = (),
                   required: Iterable[str] = ("mac", "ip")) -> dict[str, Any]:
        """``doc``, checked to be a lease object with the ``required`` keys and no other key than
        a lease's and the ``extra`` ones."""
        if not isinstance(doc, dict):
            raise LeaseError(f"expected a lease object, got {type(doc).__name__}")
        unknown = set(doc) - {"mac", "ip", "hostname", *extra}
        if unknown:
            raise LeaseError(f"unknown key {sorted(map(str, unknown))[0]!r:.60}")
        for key in required:
            if key not in doc:
                raise LeaseError(f"missing {key!r}")
        return doc

    def same(self, other: Lease | None) -> bool:
        """Equal but for ``seen``: what matters for forwarding, and who may remove it."""
        return other is not None and self.same_claim(other) and self.scope == other.scope

    def same_claim(self, other: Lease | None) -> bool:
        """Equal but for ``seen`` and ``scope``: another DHCP server reporting a lease as it
        stands (the VM moved to its bridge) claims its host name no more than a repeat does."""
        return other is not None and (self.mac, self.ip, self.hostname, self.source) == (
            other.mac, other.ip, other.hostname, other.source)

    def as_repeat_of(self, old: Lease | None) -> Lease:
        """This lease with ``old``'s ``seen`` if it makes the same claim (see ``same_claim``)."""
        if old is None or not self.same_claim(old) or self.seen == old.seen:
            return self
        return dataclasses.replace(self, seen=old.seen)

    def outranks(self, other: Lease) -> bool:
        """May this lease replace ``other`` (the same MAC and family, or the same address)?"""
        return SOURCES.index(self.source) >= SOURCES.index(other.source)

    def to_json(self) -> dict[str, Any]:
        # DHCP and the unnamed scope, the defaults, are left out: a state file of such leases
        # stays readable by versions that predate sources and scopes.
        doc: dict[str, Any] = {"mac": self.mac, "ip": self.ip, "hostname": self.hostname, "seen": self.seen}
        if self.source != DHCP:
            doc["source"] = self.source
        if self.scope:
            doc["scope"] = self.scope
        return doc

    @functools.cached_property
    def record(self) -> str:
        """The lease as the state file stores it: compact with sorted keys, which is also the
        form its checksum hashes, so a save encodes only the leases that are new since."""
        return _encode(self.to_json())


@dataclasses.dataclass(frozen=True)
class LeaseChange:
    """One lease that appeared (``old`` None), went (``new`` None) or changed."""

    old: Lease | None
    new: Lease | None


#: What a lease source (the lease socket, the neighbour table) awaits after it changed the
#: table: the daemon's re-pointing of the rules, so that its reply comes once they follow.
OnChange = Callable[[list[LeaseChange]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class HostEntry:
    """A ``[hosts.NAME]`` entry: the name follows a MAC's lease, or stands for a fixed IP."""

    mac: str | None = None
    ip: str | None = None

    def __post_init__(self) -> None:
        if (self.mac is None) == (self.ip is None):
            raise LeaseError("a host entry needs exactly one of 'mac' or 'ip'")
        if self.mac is not None:
            object.__setattr__(self, "mac", normalize_mac(self.mac))
        if self.ip is not None:
            object.__setattr__(self, "ip", normalize_ip(self.ip))


class LeaseTable:
    """The current leases. With a ``state_file``, changes are saved: each before it is
    returned, or with a ``save_delay`` (seconds, on the running event loop) together at most
    that long after the first of them."""

    def __init__(self, leases: Iterable[Lease] = (), *, state_file: str | os.PathLike[str] | None = None,
                 save_delay: float = 0.0) -> None:
        self._leases: dict[LeaseKey, Lease] = {}
        #: Who holds each address, so that an event or a restored entry costs the same however
        #: large the table is.
        self._holders: dict[str, LeaseKey] = {}
        #: The leases that claim each host name, so that a name is resolved from its own.
        self._named: dict[str, set[LeaseKey]] = {}
        for lease in leases:
            self._put(lease)
        self.state_file = Path(state_file) if state_file is not None else None
        self.save_delay = save_delay
        self._unsaved = False
        self._save_timer: asyncio.TimerHandle | None = None
        self._save_failing = False  # so that a streak of failed saves is logged once
        #: The wait before the next retry of a failed timed save; 0 while saves succeed.
        self._retry_delay = 0.0

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[Lease]:
        return iter(sorted(self._leases.values(), key=lambda lease: lease.key))

    def for_mac(self, mac: str) -> Lease | None:
        """The MAC's lease, IPv4 before IPv6: the address a guest is most often reached on."""
        mac = normalize_mac(mac)
        return self._leases.get((mac, 4)) or self._leases.get((mac, 6))

    def holding(self, ip: str) -> Lease | None:
        """The lease that holds the address, if any."""
        key = self._holders.get(normalize_ip(ip))
        return None if key is None else self._leases[key]

    def hostnames(self) -> Iterable[str]:
        """The host names some lease claims."""
        return self._named.keys()

    def named(self, hostname: str) -> str | None:
        """The address of the host name's claim that wins: an IPv4 lease over an IPv6 one,
        then the latest claim (``seen``), then, for claims made together (one snapshot), the
        greater MAC. Decided by the table alone, so a restart resolves every name the same."""
        keys = self._named.get(hostname)
        if not keys:
            return None
        return max((self._leases[key] for key in keys), key=lambda lease: (lease.key[1] == 4, lease.seen, lease.mac)).ip

    # -- changing ----------------------------------------------------------------------------
    def apply_event(self, event: str, lease: Lease) -> list[LeaseChange]:
        """Apply one event from ``lease.source`` and ``lease.scope``. ``add``/``old`` set the
        lease unless a lease of a source that outranks it holds the MAC (for that family) or
        the address; ``del`` removes it if the MAC still holds that address, from the same
        source and scope. Returns what changed (a refreshed ``seen`` alone is not a change)."""
        if event not in EVENTS:
            raise LeaseError(f"event: expected one of {', '.join(EVENTS)}, got {event!r:.80}")
        holder = self._holders.get(lease.ip)
        # Only the MAC's own lease and the address's previous holder can change.
        before = {key: self._leases.get(key) for key in {lease.key, holder} if key is not None}
        if event == "del":
            held = self._leases.get(holder) if holder == lease.key else None
            if held is not None and (held.source, held.scope) == (lease.source, lease.scope):
                self._drop(lease.key)
        elif all(lease.outranks(old) for old in before.values() if old is not None):
            self._put(lease)
        return self._commit(before)

    def release(self, ip: str, source: Source = DHCP, scope: str = "") -> list[LeaseChange]:
        """A ``del`` that names the address alone (a DHCPv6 lease whose MAC the DHCP server no
        longer knows): the lease of ``source`` and ``scope`` that holds it goes, whichever MAC
        that is."""
        held = self.holding(ip)
        return [] if held is None else self.apply_event("del", Lease(held.mac, held.ip, source=source, scope=scope))

    def apply_snapshot(self, leases: Iterable[Lease], source: Source = DHCP,
                       family: int | None = None, scope: str = "") -> list[LeaseChange]:
        """Make the part of the table of ``source`` and ``scope`` exactly ``leases``: any lease
        of theirs absent from it is gone; the other leases stay, unless the snapshot claims
        their MAC or address and their source does not outrank it. With ``family`` (4 or 6)
        the snapshot covers only that IP version. Validated whole first, so a snapshot that
        lists a MAC twice per family, or one address twice, or a lease of another source,
        scope or family, changes nothing."""
        wanted: dict[LeaseKey, Lease] = {}
        holders: dict[str, LeaseKey] = {}
        for lease in leases:
            if lease.source != source:
                raise LeaseError(f"a {source} snapshot lists a {lease.source} lease ({lease.mac})")
            if lease.scope != scope:
                raise LeaseError(f"a snapshot of scope {scope!r:.80} lists a lease of scope {lease.scope!r:.80}")
            if family is not None and lease.key[1] != family:
                raise LeaseError(f"an IPv{family} snapshot lists {lease.ip} ({lease.mac})")
            if lease.key in wanted:
                raise LeaseError(f"snapshot lists {lease.mac} twice for IPv{lease.key[1]}")
            if lease.ip in holders:
                raise LeaseError(f"snapshot gives {lease.ip} to both {holders[lease.ip][0]} and {lease.mac}")
            wanted[lease.key] = lease
            holders[lease.ip] = lease.key
        old = self._leases
        before: dict[LeaseKey, Lease | None] = {key: None for key in wanted}
        before.update(old)
        rank = SOURCES.index(source)

        def covered(lease: Lease) -> bool:
            return (lease.source, lease.scope) == (source, scope) and family in (None, lease.key[1])
        # Lower sources, and the source's leases the snapshot does not cover (another scope or
        # family), keep what the snapshot does not claim; higher sources displace it.
        below = [lease for lease in old.values() if (SOURCES.index(lease.source) < rank or (
                 lease.source == source and not covered(lease))) and lease.key not in wanted
                 and lease.ip not in holders]
        above = [lease for lease in old.values() if SOURCES.index(lease.source) > rank]
        self._leases, self._holders, self._named = {}, {}, {}
        for key, lease in wanted.items():
            self._set(lease.as_repeat_of(old.get(key)))  # a repeat keeps its ``seen``
        for lease in (*below, *above):
            self._put(lease)
        return self._commit(before)

    def _put(self, lease: Lease) -> None:
        replaced = self._leases.get(lease.key)
        if lease.same(replaced):
            # A repeat (dnsmasq's ``old`` at its restart) claims nothing anew: were its
            # ``seen`` renewed, it would take a contested name back from the later claim.
            return
        lease = lease.as_repeat_of(replaced)
        if replaced is not None:
            self._drop(lease.key)
        # The newest holder of an address wins: the previous holder's del may have been lost.
        previous = self._holders.get(lease.ip)
        if previous is not None:
            self._drop(previous)
        self._set(lease)

    def _set(self, lease: Lease) -> None:
        self._leases[lease.key] = lease
        self._holders[lease.ip] = lease.key
        if lease.hostname is not None:
            self._named.setdefault(lease.hostname, set()).add(lease.key)

    def _drop(self, key: LeaseKey) -> None:
        lease = self._leases.pop(key)
        del self._holders[lease.ip]
        if lease.hostname is not None:
            claims = self._named[lease.hostname]
            claims.discard(key)
            if not claims:
                del self._named[lease.hostname]

    def _commit(self, before: Mapping[LeaseKey, Lease | None]) -> list[LeaseChange]:
        """The changes against ``before``, which holds every key that may have changed (None:
        absent before); saved to the state file (or scheduled to be) if there are any."""
        changes = [LeaseChange(before[key], self._leases.get(key))
                   for key in sorted(before) if not _same(before[key], self._leases.get(key))]
        if changes and self.state_file is not None:
            self._unsaved = True
            if not self.save_delay:
                self.flush()
            else:
                self._save_within(self.save_delay)
        return changes

    # -- persistence -------------------------------------------------------------------------
    def flush(self) -> None:
        """Save the changes not saved yet, if any. A failure is logged and the leases stay in
        memory (forwarding must follow them even when the disk cannot); the next change or
        flush tries again."""
        if self._save_timer is not None:
            self._save_timer.cancel()
            self._save_timer = None
        if self._unsaved:
            # Logged even within a streak of failed timed saves: this may be the last try (stop).
            self._try_save(quiet=False)

    def _save_within(self, delay: float) -> None:
        # Imported here: the DHCP hook reads this module and must start without asyncio.
        import asyncio

        loop = asyncio.get_running_loop()
        if self._save_timer is not None:
            if self._save_timer.when() <= loop.time() + delay:
                return
            # A retry paced by the backoff of a streak of failed saves: a new change is tried
            # as soon as any other would be (the disk may have been fixed meanwhile).
            self._save_timer.cancel()
        self._save_timer = loop.call_later(delay, self._timed_save)

    def _timed_save(self) -> None:
        self._save_timer = None
        if self._unsaved and not self._try_save():
            # Retried by itself: no further change or stop may come for days, and the file
            # would stay behind the table all that time.
            self._retry_delay = min(max(2 * self._retry_delay, self.save_delay), SAVE_RETRY_MAX)
            self._save_within(self._retry_delay)

    def _try_save(self, quiet: bool = True) -> bool:
        """Save; of a streak of failures only the first is logged (a retry fails the same way),
        unless not ``quiet``."""
        try:
            self.save()
        except OSError as exc:
            if not self._save_failing or not quiet:
                log.error("cannot save leases to %s: %s; they are kept in memory until a save "
                          "succeeds", self.state_file, exc)
                self._save_failing = True
            return False
        if self._save_failing:
            log.info("leases saved to %s again", self.state_file)
            self._save_failing = False
        self._retry_delay = 0.0
        return True

    def save(self) -> None:
        """Write the table to ``state_file`` atomically (temp file, fsync, rename, fsync dir)."""
        if self.state_file is None:
            raise RuntimeError("this lease table has no state file")
        records = [lease.record for lease in self]
        directory = self.state_file.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.state_file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                # One entry a line: readable, and cheap to write (each lease encodes itself once).
                f.write(f'{{"version": {_STATE_VERSION}, "sha256": "{_digest(records)}", "leases": [')
                f.write(",".join(f"\n{record}" for record in records) + "\n]}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # makes the rename itself survive a power cut
        finally:
            os.close(dir_fd)
        self._unsaved = False

    @classmethod
    def restore(cls, state_file: str | os.PathLike[str], *, save_delay: float = 0.0) -> LeaseTable:
        """The table saved in ``state_file``, bound to it for later saves. A missing file gives
        an empty table; a damaged one is moved aside to ``*.corrupt`` and gives an empty table.
        An entry without a ``source`` (written before there were sources) is a DHCP lease, one
        without a ``scope`` a lease of the unnamed DHCP server."""
        path = Path(state_file)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)  # a write cut short by a crash: never valid state
        table = cls(state_file=path, save_delay=save_delay)
        try:
            raw = path.read_bytes() if path.stat().st_size <= _STATE_MAX_BYTES else None
        except FileNotFoundError:
            return table
        entries = _verified_entries(raw)
        if entries is None:
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
                kept = f"moved to {aside}"
            except OSError as exc:  # the next save replaces it all the same
                kept = f"could not move it aside ({exc.strerror})"
            log.error("lease state %s is damaged (cut short or altered); %s; starting with no leases", path, kept)
            return table
        for i, entry in enumerate(entries):
            try:
                seen = entry.get("seen") if isinstance(entry, dict) else None
                if not isinstance(seen, (int, float)) or isinstance(seen, bool):
                    raise LeaseError("seen: expected a time")
                if isinstance(entry.get("hostname"), str):
                    # Saved before its kind of name was refused (dotted decimal): the lease
                    # still matters to the rules following its MAC.
                    note = functools.partial(log.warning, "lease state %s: entry %d: %s", path, i)
                    entry = {**entry, "hostname": client_hostname(entry["hostname"], note)}
                table._put(Lease.from_message(entry, seen=float(seen), source=entry.get("source", DHCP),
                                              scope=entry.get("scope"), extra=("seen", "source", "scope")))
            except LeaseError as exc:
                log.warning("lease state %s: entry %d skipped: %s", path, i, exc)
        log.info("restored %d lease(s) from %s", len(table), path)
        return table


def _same(a: Lease | None, b: Lease | None) -> bool:
    return a is b or (a is not None and a.same(b))


def _encode(entry: Any) -> str:
    """One state-file entry, compact with sorted keys: the form the checksum covers."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def _digest(records: list[str]) -> str:
    """The checksum of the encoded entries, as the JSON array they make."""
    return hashlib.sha256(f"[{','.join(records)}]".encode()).hexdigest()


def _verified_entries(raw: bytes | None) -> list[Any] | None:
    """The entries of an intact state file, or None if it is damaged in any way."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != _STATE_VERSION:
        return None
    entries = doc.get("leases")
    if not isinstance(entries, list) or doc.get("sha256") != _digest([_encode(e) for e in entries]):
        return None
    return entries


def resolve_names(hosts: Mapping[str, HostEntry], table: LeaseTable) -> dict[str, str]:
    """Every target name with a known address: DHCP host names from the leases, and the
    ``[hosts]`` entries (see ``resolve_name``)."""
    return {name: ip for name in sorted({*table.hostnames(), *hosts})
            if (ip := resolve_name(name, hosts, table)) is not None}


def resolve_name(name: str, hosts: Mapping[str, HostEntry], table: LeaseTable) -> str | None:
    """The name's address: a ``[hosts]`` entry wins over a DHCP host name it shares (even
    while its MAC has no lease: an explicit entry is never silently replaced by whatever
    guest claims the name); else the DHCP claim that wins (``LeaseTable.named``)."""
    entry = hosts.get(name)
    if entry is None:
        return table.named(name)
    if entry.mac is None:
        return entry.ip
    held = table.for_mac(entry.mac)
    return held.ip if held is not None else None


def name_updates(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, str | None]:
    """The names whose address differs between two ``resolve_names`` results (None: gone),
    i.e. the calls the daemon makes to ``Forwarder.resolve``."""
    return {name: after.get(name) for name in sorted(before.keys() | after.keys())
            if before.get(name) != after.get(name)}
