"""The control socket: status, counters, leases and run-time rule changes, for ``fastfwd status``
and any other program.

Requests (one JSON object per line), each answered by one reply line::

    {"cmd": "status"}                       rules (state, target, counters), leases, the last reload
    {"cmd": "status", "sessions": true}     ... and each UDP rule's client addresses
    {"cmd": "add", "spec": "0.0.0.0:2222:vm1:22", "proto": "tcp", "name": "ssh", "options": {...}}
    {"cmd": "remove", "spec": "0.0.0.0:2222:vm1:22", "proto": "tcp"}
    {"cmd": "metrics"}                      Prometheus text in "text"

The server asks the daemon only through :class:`ControlTarget`, so it does not depend on
the daemon's internals.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .config import ConfigError, parse_rule_options
from .forwarder import COUNTER_NAMES
from .leases import Lease
from .rules import Rule, SpecError, options_unused
from .unixserver import OWNER_ONLY, Access, JsonLineServer, Request, RequestError

if TYPE_CHECKING:
    from .forwarder import ActiveRule, Counters

_T = TypeVar("_T")

#: Rules a status or a scrape reads between two turns of the event loop (a few ms of work):
#: with thousands of rules, lease events and other requests wait one slice, not the table.
RULES_PER_TURN = 500


class ControlTarget(Protocol):
    """What the control socket needs from the daemon."""

    @property
    def rules(self) -> list[ActiveRule]: ...

    def counters(self, rule: ActiveRule) -> Counters: ...

    def sessions(self, rule: ActiveRule) -> list[tuple[str, int]]: ...

    @property
    def leases(self) -> Iterable[Lease]: ...

    @property
    def engine(self) -> Mapping[str, int]:
        """The engine's settings (:attr:`Forwarder.settings`)."""
        ...

    @property
    def reload_status(self) -> Mapping[str, Any] | None:
        """The config file (``file``) and how its last reload ended (``last_reload``: None
        before any, else ``at``, ``applied`` and ``error``); None without a config file, and
        the status reply then has no ``config``."""
        ...

    async def add_rule(self, rule: Rule) -> ActiveRule:
        """Forward ``rule`` from now on (kept across config reloads); OSError/ValueError if it cannot."""
        ...

    async def remove_rule(self, rule: Rule) -> None:
        """Stop the rule listening on ``rule``'s ports; KeyError if there is none, ValueError
        if it may not be removed this way."""
        ...

    async def metrics(self) -> str:
        """Prometheus text exposition (formatted off the event loop: it can take a while)."""
        ...


class ControlServer(JsonLineServer):
    def __init__(self, path: str | os.PathLike[str], target: ControlTarget, *,
                 access: Access = OWNER_ONLY, **limits: Any) -> None:
        super().__init__(path, self._handle, name="control", access=access, **limits)
        self._target = target

    async def _handle(self, request: Request) -> dict[str, Any]:
        doc = request.message
        if not isinstance(doc, dict) or not isinstance(doc.get("cmd"), str):
            raise RequestError('expected an object with a "cmd" string')
        cmd = doc["cmd"]
        if cmd == "status":
            _only(doc, ("cmd", "sessions"))
            sessions = doc.get("sessions", False)
            if not isinstance(sessions, bool):
                raise RequestError('"sessions" must be true or false')
            return await self._status(sessions=sessions)
        if cmd == "metrics":
            _only(doc, ("cmd",))
            return {"text": await self._target.metrics()}
        if cmd == "add":
            rule = _rule(doc, ("cmd", "spec", "proto", "name", "options"))
            try:
                active = await self._target.add_rule(rule)
            except (OSError, ValueError) as exc:
                raise RequestError(f"cannot add: {exc}") from None
            return {"rule": self._describe(active, sessions=False)}
        if cmd == "remove":
            rule = _rule(doc, ("cmd", "spec", "proto"))
            try:
                await self._target.remove_rule(rule)
            except KeyError:
                raise RequestError(f"no rule listens on {doc['spec']}") from None
            except ValueError as exc:
                raise RequestError(f"cannot remove: {exc}") from None
            return {}
        raise RequestError(f"unknown cmd {cmd[:40]!r}: expected status, add, remove or metrics")

    async def _status(self, sessions: bool) -> dict[str, Any]:
        rules = [self._describe(a, sessions) async for a in in_turns(self._target.rules) if a.installed]
        status = {"rules": rules,
                  "leases": [lease.to_json() for lease in self._target.leases],
                  "engine": dict(self._target.engine)}
        if (config := self._target.reload_status) is not None:
            status["config"] = dict(config)
        return status

    def _describe(self, active: ActiveRule, sessions: bool) -> dict[str, Any]:
        rule = active.rule
        listen, target = endpoints(active)
        out: dict[str, Any] = {
            "name": rule.name, "proto": rule.proto, "listen": listen, "port": active.port, "target": target,
            "target_ip": active.target_ip, "state": active.state,
            "counters": _counters(self._target.counters(active))}
        if sessions and rule.proto == "udp":
            out["sessions"] = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self._target.sessions(active)]
        return out


def _counters(counters: Counters) -> dict[str, int]:
    # Not dataclasses.asdict: its deep copy took three quarters of a status of 8,000 rules,
    # which the event loop serves nothing else while it builds.
    return {name: getattr(counters, name) for name in COUNTER_NAMES}


async def in_turns(items: Sequence[_T]) -> AsyncIterator[_T]:
    """``items``, letting the event loop run other work after each ``RULES_PER_TURN``."""
    for start in range(0, len(items), RULES_PER_TURN):
        if start:
            await asyncio.sleep(0)
        for item in items[start:start + RULES_PER_TURN]:
            yield item


def endpoints(active: ActiveRule) -> tuple[str, str]:
    """A running rule's listen and target as status and the metrics labels show them, with the
    real port where the rule asked for any free one."""
    return active.bound.listen_text, active.bound.target_text


def rule_label(active: ActiveRule) -> str:
    """How logs and the metrics' ``rule`` label name a rule: its name, else what it forwards."""
    listen, target = endpoints(active)
    return active.rule.name or f"{active.rule.proto} {listen} -> {target}"


def _only(doc: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A key the command does not take is an error: a typo must not be a silent no-op."""
    unknown = set(doc) - set(keys)
    if unknown:
        raise RequestError(f"unknown key {sorted(unknown)[0]!r:.60} for {doc['cmd']}")


def _rule(doc: dict[str, Any], keys: tuple[str, ...]) -> Rule:
    """The rule a request names, every field checked."""
    _only(doc, keys)
    spec, proto, name, options = doc.get("spec"), doc.get("proto", "tcp"), doc.get("name"), doc.get("options", {})
    if not isinstance(spec, str):
        raise RequestError('"spec" must be a port spec string like "0.0.0.0:2222:vm1:22"')
    if proto not in ("tcp", "udp"):
        raise RequestError('"proto" must be "tcp" or "udp"')
    if name is not None and not isinstance(name, str):
        raise RequestError('"name" must be a string')
    if not isinstance(options, dict):
        raise RequestError('"options" must be an object of rule options')
    try:
        rule_options = parse_rule_options(options)
    except ConfigError as exc:
        raise RequestError("; ".join(exc.errors)) from None
    unused = options_unused(options, (proto,))
    if unused:
        raise RequestError("; ".join(f"options.{key}: {why}" for key, why in unused))
    try:
        return Rule.parse(spec, proto, name=name, options=rule_options)
    except SpecError as exc:
        raise RequestError(str(exc)) from None
