"""The Python API: a Forwarder owning the data-plane engine and the table of rules.

Usable from asyncio (and uvloop)::

    async with fastfwd.Forwarder() as fw:
        web = await fw.add(fastfwd.Rule.parse("0:127.0.0.1:8080"))
        print(web.port, fw.counters(web).bytes_up)

Engine calls return once every worker has applied them (microseconds; the workers never
wait on Python), so when ``add``/``resolve``/``apply`` return, traffic already flows.
"""
from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import functools
import ipaddress
import logging
import os
import socket
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Self

from . import engine_settings
from .rules import Rule, RuleKey, SpecError, ip_address, ip_text, is_ip

if TYPE_CHECKING:
    from ._engine import Engine

log = logging.getLogger("fastfwd")

_SPLICE_MODES = {"never": 0, "auto": 1, "always": 2}


@dataclass(frozen=True)
class Counters:
    """Per-rule counters, summed over the workers. ``up`` is client to target."""

    accepted: int = 0
    active: int = 0
    refused: int = 0
    connect_failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_spliced: int = 0
    bytes_copied: int = 0
    splice_fallbacks: int = 0
    pipe_shortages: int = 0
    accept_paused: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    sessions_active: int = 0
    sessions_created: int = 0
    sessions_evicted: int = 0
    sessions_expired: int = 0
    drops: int = 0
    truncated: int = 0
    bytes_discarded: int = 0


@dataclass(eq=False, frozen=True)
class ActiveRule:
    """A rule the forwarder holds. ``port`` is the first real listening port (useful with port 0).

    Read-only: the forwarder files it by its fields, and changes them itself (``_set``)."""

    rule: Rule
    id: int
    port: int
    target_ip: str | None = None
    #: Set while the rule is in the engine; a removed rule keeps its last value False.
    installed: bool = field(default=True, repr=False)

    def _set(self, **changes: object) -> None:
        for name, value in changes.items():
            object.__setattr__(self, name, value)

    @property
    def bound(self) -> Rule:
        """The rule with the port it really listens on (differs for ``listen_port`` 0)."""
        return self.rule if self.rule.listen_port else replace(self.rule, listen_port=self.port)

    @property
    def pending(self) -> bool:
        """True while the target is a name with no known address: the port refuses connections."""
        return self.target_ip is None

    @property
    def state(self) -> str:
        return "pending" if self.pending else "active"


@dataclass
class Diff:
    """What ``apply`` did to the rule table."""

    added: list[ActiveRule] = field(default_factory=list)
    removed: list[ActiveRule] = field(default_factory=list)
    retargeted: list[ActiveRule] = field(default_factory=list)
    reconfigured: list[ActiveRule] = field(default_factory=list)
    unchanged: list[ActiveRule] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.retargeted or self.reconfigured)


class Forwarder:
    """Owns the engine's worker threads and the rules forwarded by them.

    ``workers`` defaults to the CPUs this process may run on. ``hosts`` maps target names to
    addresses known up front; :meth:`resolve` changes them at run time.
    """

    def __init__(self, rules: Iterable[Rule] = (), *, workers: int | None = None,
                 pipe_size: int = 1 << 20, busy_poll_us: int = 0,
                 hosts: Mapping[str, str] | None = None) -> None:
        # Checked here, as the config file's [engine] is: the engine would take a negative
        # busy poll as an endless spin, and refuse other bad values only at start.
        given = {"workers": workers, "pipe_size": pipe_size, "busy_poll_us": busy_poll_us}
        for setting, value in given.items():
            if value is not None:
                try:
                    engine_settings.CHECKS[setting](value)
                except SpecError as exc:
                    raise SpecError(f"{setting}: {exc}") from None
        for name, ip in (hosts or {}).items():
            # ip_address() takes an integer too: 5 would be 0.0.0.5.
            if not isinstance(name, str) or not isinstance(ip, str):
                raise TypeError(f"hosts: expected a name and an address as strings, got {name!r}: {ip!r}")
            if not is_ip(ip):
                raise SpecError(f"hosts: {ip!r} for {name!r} is not an IP address")
        self._initial = [_check_rule(rule) for rule in rules]
        self._workers = workers or len(os.sched_getaffinity(0))
        self._pipe_size = pipe_size
        self._busy_poll_us = busy_poll_us
        self._names: dict[str, str] = {name.lower(): _spelled(ip) for name, ip in (hosts or {}).items()}
        self._table: dict[RuleKey, ActiveRule] = {}
        #: The table's rules by target host, so a name that moves visits its own rules only
        #: (a snapshot moving every VM would otherwise look at every rule once per name).
        self._by_host: dict[str, list[ActiveRule]] = {}
        self._engine: Engine | None = None
        #: Engines of close(drain=...) calls still waiting: a close without drain ends them.
        self._draining: set[Engine] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        from . import _engine  # the compiled data plane; imported late so the CLI and hook start fast

        if self._engine is not None:
            return
        self._engine = _engine.Engine(workers=self._workers, pipe_size=self._pipe_size,
                                      busy_poll_us=self._busy_poll_us)
        _RUNNING.add(self)
        try:
            await self.apply(self._initial)
        except BaseException:
            _stop(*self._detach())
            raise

    async def close(self, drain: float = 0.0) -> None:
        """Stop forwarding; live connections are reset. With ``drain`` > 0, stop accepting first
        and let live connections finish for up to that many seconds before resetting what is
        left. Cancelling a drain, or a close without drain meanwhile, resets them at once;
        either way the forwarder is closed when this returns or raises."""
        # Detached first: during a drain, calls see a closed forwarder, not rules that no
        # longer listen.
        engine, rules = self._detach()
        if engine is None:
            if drain <= 0:
                for draining in self._draining:
                    draining.close()    # its wait sees no connections left and returns
            return
        try:
            if drain > 0:
                self._draining.add(engine)
                _DRAINING.add(self)
                with engine.batch():    # every listener is closed when the batch ends
                    for active in rules:
                        self._uninstall(engine, active, close_live=False)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + drain
                while engine in self._draining and engine.live_connections() and loop.time() < deadline:
                    await asyncio.sleep(0.05)
        finally:
            # An engine a fork took out of the set has no workers in this process to close.
            owned = engine in self._draining or drain <= 0
            self._draining.discard(engine)
            if not self._draining:
                _DRAINING.discard(self)
            _stop(engine if owned else None, rules)

    def _detach(self) -> tuple[Engine | None, list[ActiveRule]]:
        """Take the engine and the rules out of the forwarder, which is closed from then on."""
        engine, self._engine = self._engine, None
        _RUNNING.discard(self)
        rules = list(self._table.values())
        self._table.clear()
        self._by_host.clear()
        return engine, rules

    def _abandon(self, _warn: Callable[..., None] = warnings.warn) -> None:
        """Close a forwarder its program left running, as a file or socket is: the workers
        would forward until the engine is collected, and at exit the kernel would end every
        connection with a FIN, which a cut transfer must not look like."""
        if getattr(self, "_engine", None) is not None:    # (None also when __init__ refused)
            message = f"unclosed {self!r}"
            _stop(*self._detach())      # first: the warning may be turned into an error
            _warn(message, ResourceWarning, source=self)

    __del__ = _abandon

    def __repr__(self) -> str:
        if self._engine is None:
            return f"<fastfwd.Forwarder closed, workers={self._workers}>"
        n = len(self._table)
        return f"<fastfwd.Forwarder running, workers={self._workers}, {n} rule{'s' * (n != 1)}>"

    async def __aenter__(self) -> Self:
        # A nested block would close the forwarder under the outer one when it ends.
        if self._engine is not None:
            raise RuntimeError("the forwarder is already running: 'async with' starts and closes it")
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def settings(self) -> dict[str, int]:
        """What the engine runs with: worker threads, the pipe size asked for, busy polling (µs)."""
        return {"workers": self._workers, "pipe_size": self._pipe_size, "busy_poll_us": self._busy_poll_us}

    # -- rules -------------------------------------------------------------------------------
    @property
    def rules(self) -> list[ActiveRule]:
        return list(self._table.values())

    def find(self, rule: Rule | ActiveRule) -> ActiveRule | None:
        """The held rule ``rule`` names: a rule with a listen port by its protocol and
        listening ports (whatever its target and options, as ``remove`` takes it); a port-0
        rule by equality; an ActiveRule while this forwarder holds it."""
        if isinstance(rule, ActiveRule):
            # By identity: another forwarder's rule may have the same key and engine id.
            return rule if self._table.get(_key(rule)) is rule else None
        if _check_rule(rule, "a fastfwd.Rule or ActiveRule").listen_port:
            return self._table.get(rule.key)
        return next((a for a in self._table.values() if a.rule == rule), None)

    async def add(self, rule: Rule) -> ActiveRule:
        """Start forwarding ``rule``. Raises OSError (port in use, address not local, ...)."""
        active = self._install(_check_rule(rule))
        _announce("forwarding", [active])
        return active

    def _install(self, rule: Rule) -> ActiveRule:
        engine = self._require()
        if rule.listen_port and rule.key in self._table:
            raise ValueError(f"{rule}: a rule already listens on these ports")
        try:
            rule_id, port = engine.add_rule(rule.proto, rule.listen_host, rule.listen_port, rule.count)
        except OSError as exc:
            # Looked for only now: a scan per add would make loading n rules cost n².
            mine = exc.errno == errno.EADDRINUSE and next(
                (a for a in self._table.values() if _overlaps(rule, a.bound) and _shared(rule, a.rule)), None)
            if mine:
                raise ValueError(f"{rule}: overlaps {mine.bound}") from None
            raise
        active = ActiveRule(rule=rule, id=rule_id, port=port)
        try:
            self._configure(active)
            self._point(active, close_live=False)
        except BaseException:
            engine.remove_rule(rule_id, True)
            raise
        self._table[_key(active)] = active
        self._index(active)
        return active

    async def remove(self, rule: Rule | ActiveRule) -> None:
        _, active = self._held(rule)
        self._discard(active)
        _announce("removed", [active])

    def _discard(self, active: ActiveRule) -> None:
        self._uninstall(self._require(), active, close_live=active.rule.options.on_remove == "close")
        del self._table[_key(active)]
        self._unindex(active, active.rule.target_host)

    async def apply(self, rules: Iterable[Rule]) -> Diff:
        """Make the table equal to ``rules``, touching only what differs.

        Unchanged rules keep their listeners, connections and sessions; a rule whose target
        changed is re-pointed in place; one whose options changed is reconfigured in place.
        New listeners are bound before anything is removed; ports that move from a removed
        rule to a new one are bound after it. If any step fails, the steps already taken are
        undone in reverse and the error is raised: the table is as it was.
        """
        engine = self._require()
        pairs, unchanged, gone = self._match(rules)
        diff = Diff(unchanged=unchanged)
        undo: list[Callable[[], object]] = []
        # One wait for the workers at the end, not a round trip per rule and step.
        with engine.batch():
            try:
                self._change(pairs, gone, diff, undo)
            except BaseException:
                for step in reversed(undo):
                    try:
                        step()
                    except Exception:
                        log.exception("could not undo a step of a failed rule change")
                raise
        _announce("forwarding", diff.added)
        _announce("removed", diff.removed)
        return diff

    def _change(self, pairs: list[tuple[Rule, ActiveRule | None]], gone: list[ActiveRule], diff: Diff,
                undo: list[Callable[[], object]]) -> None:
        """apply()'s steps, each recorded in ``undo`` as it is taken. Undone, a step is not
        logged: a rejected apply leaves the table as it was, and its log must not say otherwise."""
        held = _ports_held(gone)
        first: list[Rule] = []
        later: list[Rule] = []      # wanting a port a removed rule holds: added after the removals
        for rule in (rule for rule, active in pairs if active is None):
            wants_held = rule.listen_port and any((rule.proto, p) in held for p in _ports(rule))
            (later if wants_held else first).append(rule)
        for rule in first:
            diff.added.append(active := self._install(rule))
            undo.append(functools.partial(self._discard, active))
        reverted = Diff()   # what undoing reports goes nowhere
        for rule, kept in pairs:
            if kept is not None:
                # Undo first: an update that fails half way (the rule took its new
                # options, then could not listen) must be reverted as well.
                undo.append(functools.partial(self._update, kept, kept.rule, reverted))
                self._update(kept, rule, diff)
        for rule in later:
            # Its ports that no removed rule holds are tried before anything is removed:
            # undoing a removal starts the rule afresh (counters at 0, a gap in listening).
            _probe(rule, (p for p in _ports(rule) if not any(_shared(b, rule) for b in held.get((rule.proto, p), ()))))
        for active in gone:
            self._discard(active)
            diff.removed.append(active)
            undo.append(functools.partial(self._install, active.rule))
        for rule in later:
            diff.added.append(active := self._install(rule))
            undo.append(functools.partial(self._discard, active))

    async def resolve(self, name: str, ip: str | None) -> list[ActiveRule]:
        """Tell the forwarder where ``name`` lives now (``None``: nowhere). Rules targeting it
        are re-pointed (or made pending) before this returns. A rule that cannot use the
        address (a TCP rule and a multicast address, a rule and its own listener) stays
        pending, as does a pending TCP rule whose port another program took meanwhile; both
        are logged and tried again at the next call for the name, even with the same
        address. Returns the rules re-pointed."""
        engine = self._require()
        if not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {name!r}")
        if ip is not None and not isinstance(ip, str):
            raise TypeError(f"ip: expected a string or None, got {ip!r}")
        name = name.lower()
        if ip is not None and not is_ip(ip):
            raise ValueError(f"{ip!r} is not an IP address")
        if ip is None:
            self._names.pop(name, None)
        else:
            ip = self._names[name] = _spelled(ip)
        # Rules already there are left alone (a renewed lease changes nothing), but a rule
        # left pending by a port it could not listen on is tried again.
        touched = [active for active in self._by_host.get(name, ()) if active.target_ip != ip]
        with engine.batch():
            for active in touched:
                try:
                    self._point(active, close_live=active.rule.options.on_retarget == "close")
                except OSError as exc:
                    # Only a pending TCP rule starting to listen fails (another program took
                    # its port meanwhile). The name has moved all the same: the other rules
                    # follow it, and this one stays pending.
                    engine.set_target(active.id, None, active.rule.target_port, False)
                    log.warning("%s stays pending: %s; the next address given for %s tries again",
                                _describe(active), exc.strerror, name)
        # Not those left pending: by a port they could not listen on, or an address they cannot use.
        return [active for active in touched if active.target_ip == ip]

    @property
    def names(self) -> dict[str, str]:
        """Target names with a known address."""
        return dict(self._names)

    # -- observation -------------------------------------------------------------------------
    async def settle(self) -> None:
        """Return once every worker has counted what it has done so far. A worker counts a
        send once it returned, so a client can read the last bytes of a reply before they
        are counted; counters read after this include every byte, datagram and connection
        the far ends had received when it was called."""
        self._require().sync()

    def counters(self, rule: Rule | ActiveRule) -> Counters:
        engine, active = self._held(rule)
        return Counters(**engine.counters(active.id))

    def sessions(self, rule: Rule | ActiveRule) -> list[tuple[str, int]]:
        """Client addresses of the rule's live UDP sessions."""
        engine, active = self._held(rule)
        return engine.sessions(active.id)

    # -- internals ---------------------------------------------------------------------------
    def _held(self, rule: Rule | ActiveRule) -> tuple[Engine, ActiveRule]:
        """The running engine and the held rule ``rule`` names: RuntimeError when not running
        (before the rule is looked for), KeyError when the rule is not held."""
        engine = self._require()
        active = self.find(rule)
        if active is None:
            raise KeyError(f"no such rule: {rule}")
        return engine, active

    def _require(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the forwarder is not running (use 'async with' or await start())")
        return self._engine

    def _match(self, rules: Iterable[Rule]) -> tuple[list[tuple[Rule, ActiveRule | None]], list[ActiveRule],
                                                     list[ActiveRule]]:
        """Pair each wanted rule that differs with the entry it continues (None: a new rule);
        list the entries continued unchanged, and those no wanted rule continues. A port-0
        rule continues an equal port-0 rule."""
        free = dict(self._table)
        pairs: list[tuple[Rule, ActiveRule | None]] = []
        # Most of a large table, kept without a pair or an undo step each: allocations that
        # live until the apply ends make the cyclic collector scan the whole heap mid-apply.
        unchanged: list[ActiveRule] = []
        listed: set[RuleKey] = set()
        for rule in rules:
            if _check_rule(rule).listen_port:
                key = rule.key
                if key in listed:
                    raise ValueError(f"{rule}: listed twice")
                listed.add(key)
                kept = free.pop(key, None)
                if kept is not None and kept.rule == rule:
                    unchanged.append(kept)
                else:
                    pairs.append((rule, kept))
            else:
                slot = next((k for k, a in free.items() if a.rule == rule), None)
                if slot is not None:
                    unchanged.append(free.pop(slot))
                else:
                    pairs.append((rule, None))
        return pairs, unchanged, list(free.values())

    def _index(self, active: ActiveRule) -> None:
        self._by_host.setdefault(active.rule.target_host, []).append(active)

    def _unindex(self, active: ActiveRule, host: str) -> None:
        rules = self._by_host[host]
        rules.remove(active)
        if not rules:
            del self._by_host[host]

    def _update(self, active: ActiveRule, rule: Rule, diff: Diff) -> None:
        old, was = active.rule, active.target_ip
        active._set(rule=rule)
        if old.target_host != rule.target_host:
            self._unindex(active, old.target_host)
            self._index(active)
        if old.options != rule.options:
            self._configure(active)
            diff.reconfigured.append(active)
        if (old.target_host, old.target_port) != (rule.target_host, rule.target_port):
            self._point(active, close_live=rule.options.on_retarget == "close")
            diff.retargeted.append(active)
        elif old.options == rule.options:
            diff.unchanged.append(active)
        if old.options.source != rule.options.source and was is not None and active.target_ip == was:
            _warn_loopback_source(active, was)  # a new address: _point has looked at it

    def _configure(self, active: ActiveRule, target_ip: str | None = None) -> None:
        o = active.rule.options
        pool = _pool(o.source, target_ip or active.target_ip)
        for addr in pool:
            _check_local(addr)
        self._require().configure(
            active.id,
            connect_timeout=o.connect_timeout, idle_timeout=o.idle_timeout,
            half_closed_timeout=o.half_closed_timeout, splice=_SPLICE_MODES[o.splice],
            splice_threshold=o.splice_threshold, udp_idle_timeout=o.udp_idle_timeout,
            udp_max_sessions=o.udp_max_sessions, max_connections=o.max_connections,
            allow=o.allow, source=pool)

    def _point(self, active: ActiveRule, close_live: bool) -> None:
        host = active.rule.target_host
        ip = host if is_ip(host) else self._names.get(host)
        was = active.target_ip
        unusable = ip is not None and ip != host and _unusable(active.rule, ip)
        if unusable:
            # A name may stand for any address (a lease, [hosts], -t with hosts=): the rule
            # gets the checks that address would get in a spec, and waits for a better one.
            log.warning("%s stays pending: %s is %s, which it cannot use: %s", _describe(active), host, ip, unusable)
            ip = None
        pool = active.rule.options.source
        usable = _pool(pool, ip) if ip is not None else None
        repool = usable is not None and usable != _pool(pool, was)
        if repool:
            # The name moved to the other family: its connections take the pool's other half.
            # An address of it gone since the rule started must not keep the rule (and the
            # others on the name) on the old address: the kernel picks the source instead.
            try:
                self._configure(active, ip)
            except OSError as exc:
                log.warning("%s: %s; its connections to %s leave from the kernel's choice",
                            _describe(active), exc.strerror, ip)
        self._require().set_target(active.id, ip, active.rule.target_port, close_live)
        active._set(target_ip=ip)
        if ip is not None and ip != was:
            _warn_loopback_source(active, ip)
        if repool and not usable and ip is not None:  # (ip: for the type checker)
            log.warning("%s: no IPv%d address in its source pool; its connections leave from the kernel's "
                        "choice", _describe(active), ipaddress.ip_address(ip).version)
        if was is not None and ip is None and not unusable:
            log.warning("%s is pending: %s has no address", _describe(active), host)
        elif was is not None and ip != was:
            log.info("%s re-pointed from %s to %s", _describe(active), was, ip)

    @staticmethod
    def _uninstall(engine: Engine, active: ActiveRule, close_live: bool) -> None:
        if active.installed:
            engine.remove_rule(active.id, close_live)
            active._set(installed=False)


#: Forwarders started and not closed, closed at interpreter exit (see Forwarder._abandon).
_RUNNING: weakref.WeakSet[Forwarder] = weakref.WeakSet()
#: Forwarders that began a close(drain=...): a forked child must not close those engines either.
_DRAINING: weakref.WeakSet[Forwarder] = weakref.WeakSet()


@atexit.register
def _close_abandoned() -> None:
    for fw in list(_RUNNING):
        fw._abandon()


def _forget_after_fork() -> None:
    """In a forked child, whose forwarders' workers did not follow it: an engine used or
    freed (which closes it) would wait on them for ever. Each forwarder is closed without
    its engine, which is never freed: a reference no one drops outlives even the clearing of
    modules at exit, and the child's copies of the sockets close when it exits."""
    for fw in list(_RUNNING):
        engine, rules = fw._detach()
        _keep_forever(engine)
        _stop(None, rules)
    for fw in list(_DRAINING):
        for engine in fw._draining:
            _keep_forever(engine)
        fw._draining.clear()    # its drain sees this and ends without closing the engine


def _keep_forever(engine: Engine | None) -> None:
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(engine))


os.register_at_fork(after_in_child=_forget_after_fork)


def _stop(engine: Engine | None, rules: list[ActiveRule]) -> None:
    """Close ``engine`` (None: one that must not be closed) and mark its rules removed."""
    if engine is not None:
        engine.close()
    for active in rules:
        active._set(installed=False)


def _spelled(ip: str) -> str:
    """``ip`` in the one spelling a rule's address has: another spelling of the address a
    name has is no move (which would reset connections under on_retarget = "close")."""
    return ip_text(ip_address(ip))


def _check_rule(rule: object, what: str = "a fastfwd.Rule") -> Rule:
    """``rule`` if it is a Rule: a spec string, say, is a TypeError here, not an
    AttributeError from deep inside."""
    if not isinstance(rule, Rule):
        raise TypeError(f"expected {what}, got {rule!r}")
    return rule


def _describe(active: ActiveRule) -> str:
    label = f"{active.rule.name!r}: " if active.rule.name else ""   # quoted: a name may hold ": "
    return f"{label}{active.rule}" + (f" ({active.target_ip})" if active.rule.target_is_name and active.target_ip else "")


def _unusable(rule: Rule, ip: str) -> str | None:
    """Why ``rule`` could not forward to ``ip`` (a TCP rule onto a multicast address, a rule
    onto its own listener), or None. A source pool without the address's family is not a
    reason: those connections leave from the kernel's choice (``_point`` warns)."""
    try:
        replace(rule, options=replace(rule.options, source=())).with_target(ip)
    except SpecError as exc:
        return str(exc)
    return None


def _key(active: ActiveRule) -> RuleKey:
    # A rule on port 0 is filed under the port it got: the same rule may run twice.
    rule = active.rule
    return rule.key if rule.listen_port else (*rule.key[:2], active.port, 1)


#: Rules changed at once beyond which the log says how many, not which (each is at DEBUG).
ANNOUNCE_EACH = 20


def _announce(what: str, actives: list[ActiveRule]) -> None:
    """Log rules started or removed: each of a few, a count of many (a host publishing
    thousands of ports would otherwise write thousands of lines at every start)."""
    level = logging.INFO if len(actives) <= ANNOUNCE_EACH else logging.DEBUG
    adding = what == "forwarding"
    if log.isEnabledFor(level):
        for active in actives:
            log.log(level, "%s %s%s", what, _describe(active), " (pending: no address yet)" * (adding and active.pending))
    if len(actives) > ANNOUNCE_EACH:
        pending = sum(a.pending for a in actives) if adding else 0
        log.info("%s %d rules%s (each at debug level; 'fastfwd status' lists them)", what, len(actives),
                 f", {pending} pending: no address yet" if pending else "")


def _pool(source: tuple[str, ...], target_ip: str | None) -> tuple[str, ...]:
    """The source addresses that can reach ``target_ip`` (all while it is unknown): the
    engine binds an upstream socket only to an address of the target's family."""
    if target_ip is None or not source:
        return source
    # Both are valid IP literals here, so a colon tells the family without parsing: this
    # runs three times per rule at load.
    v6 = ":" in target_ip
    return tuple(addr for addr in source if (":" in addr) == v6)


def _warn_loopback_source(active: ActiveRule, target_ip: str) -> None:
    """Warn if the rule's connections to ``target_ip`` would leave from a loopback source
    while the target is not loopback: the kernel routes nothing from 127.x or ::1 off this
    host, so each would fail (connect_failed). Not refused: a target that is an address of
    this host's own works, and telling that would cost a look at its interfaces."""
    pool = _pool(active.rule.options.source, target_ip)
    if not pool:
        return
    target = ipaddress.ip_address(target_ip)
    looped = [addr for addr in pool if ipaddress.ip_address(addr).is_loopback]
    if looped and not (target.is_loopback or target.is_unspecified):
        log.warning("%s: source %s is loopback but the target %s is not: its connections cannot leave "
                    "this host from a loopback address, so unless %s is this host's own they fail",
                    _describe(active), ", ".join(looped), target_ip, target_ip)


def _check_local(addr: str) -> None:
    """Raise unless ``addr`` can be bound here: the engine binds each upstream socket to a
    pool address, and one it cannot bind would send that connection from the kernel's choice.
    An IPv6 address still under duplicate-address detection (for a second or two after it
    was added, as at boot) is accepted: it becomes bindable by itself."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((addr, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
                flags = _ipv6_flags(addr)
                if flags is not None and flags & _IFA_F_DADFAILED:
                    raise OSError(exc.errno, f"source {addr} failed duplicate-address detection: "
                                  "another host on its link has it") from None
                if flags is not None and flags & _IFA_F_TENTATIVE:
                    log.info("source %s is still tentative (duplicate-address detection): connections "
                             "leave from the kernel's choice of address until it is done", addr)
                    return
            reason = "is not an address of this host" if exc.errno == errno.EADDRNOTAVAIL else f"cannot be bound: {exc.strerror}"
            raise OSError(exc.errno, f"source {addr} {reason}") from None


_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40


def _ipv6_flags(addr: str) -> int | None:
    """The kernel's flags for a local IPv6 address (None: not configured here). thread-self:
    the namespace of the calling thread, which may differ from the process's."""
    packed = ipaddress.IPv6Address(addr).packed.hex()
    try:
        with open("/proc/thread-self/net/if_inet6") as table:
            for line in table:
                cols = line.split()     # address, ifindex, prefix length, scope, flags, name
                if cols[0] == packed:
                    return int(cols[4], 16)
    except FileNotFoundError:   # IPv6 is disabled: no address is configured
        pass
    return None


def _overlaps(a: Rule, b: Rule) -> bool:
    return (a.proto == b.proto and a.listen_port != 0 and b.listen_port != 0
            and a.listen_port < b.listen_port + b.count and b.listen_port < a.listen_port + a.count)


def _ports(rule: Rule) -> range:
    return range(rule.listen_port, rule.listen_port + rule.count)


def _ports_held(actives: Iterable[ActiveRule]) -> dict[tuple[str, int], list[Rule]]:
    """The rules listening on each (protocol, port): which of them holds a port another
    rule wants is then a lookup, not a scan of every rule for every port."""
    held: dict[tuple[str, int], list[Rule]] = {}
    for active in actives:
        bound = active.bound
        for port in _ports(bound):
            held.setdefault((bound.proto, port), []).append(bound)
    return held


def _probe(rule: Rule, ports: Iterable[int]) -> None:
    """Bind each port as the engine would and let it go; the first that cannot be had raises
    the engine's error for it."""
    from ._engine import bind_error
    family = socket.AF_INET6 if ":" in rule.listen_host else socket.AF_INET
    kind = socket.SOCK_STREAM if rule.proto == "tcp" else socket.SOCK_DGRAM
    for port in ports:
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((rule.listen_host, port))
            except OSError as exc:
                err = exc.errno or errno.EINVAL  # bind's errors always carry one
                raise OSError(err, bind_error(err, rule.proto, rule.listen_host, port)) from None


def _shared(a: Rule, b: Rule) -> bool:
    """Whether two listening addresses take the same port: equal, or one of them the wildcard
    of the other's family."""
    ha, hb = ipaddress.ip_address(a.listen_host), ipaddress.ip_address(b.listen_host)
    return ha.version == hb.version and (ha == hb or ha.is_unspecified or hb.is_unspecified)


COUNTER_NAMES = tuple(f.name for f in fields(Counters))
