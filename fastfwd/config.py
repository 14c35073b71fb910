"""The TOML config file: loading, complete validation, and the typed settings it yields.

Validation collects every problem before giving up, and each message names its key path
and, where it can be told for certain, its line (``forward[3].listen: range 8000-7999 is
reversed (at line 14)``), so one run of ``fastfwd check`` shows everything to fix.
``docs/config.md`` is the reference for the schema and its defaults.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from . import config_lines, engine_settings
from .leases import HostEntry, LeaseError
from .rules import (DEFAULT_LISTEN, Proto, Rule, RuleOptions, SpecError, check_name, check_target_host,
                    is_ip, listen_address, options_unused, parse_ports, seconds, split_hostports)

_OPTION_KEYS = tuple(f.name for f in fields(RuleOptions))
_S = TypeVar("_S", "EngineSettings", "ControlSettings", "SourceSettings")
_TUPLE_OPTIONS = ("allow", "source")


class ConfigError(ValueError):
    """A config that cannot be used. ``errors`` holds one message per problem, each naming its key path."""

    def __init__(self, errors: list[str], source: str = "<config>") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(f"{source}: {e}" for e in self.errors))


def runtime_dir() -> Path:
    """Where sockets go by default: /run/fastfwd for root, a per-user directory otherwise."""
    if os.geteuid() == 0:
        return Path("/run/fastfwd")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/fastfwd-{os.geteuid()}"
    return Path(base) / "fastfwd"


def state_dir() -> Path:
    """Where leases are kept across restarts by default."""
    if os.geteuid() == 0:
        return Path("/var/lib/fastfwd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fastfwd"


@dataclass(frozen=True)
class EngineSettings:
    """``[engine]``: how the data plane runs. Read at start only."""

    #: Worker threads; None means one per CPU this process may run on.
    workers: int | None = None
    #: Size asked for each splice pipe (F_SETPIPE_SZ); the kernel may grant less.
    pipe_size: int = 1 << 20
    #: After traffic, workers poll again for this many microseconds before sleeping: lower
    #: round-trip latency for CPU time. 0 turns it off.
    busy_poll_us: int = 0


@dataclass(frozen=True)
class ControlSettings:
    """``[control]``: the daemon's sockets, state and lifecycle. Read at start only."""

    lease_socket: str = field(default_factory=lambda: str(runtime_dir() / "lease.sock"))
    control_socket: str = field(default_factory=lambda: str(runtime_dir() / "control.sock"))
    state_dir: str = field(default_factory=lambda: str(state_dir()))
    #: Who may connect to the sockets besides root and the daemon's own user (names or ids).
    allow_users: tuple[str | int, ...] = ()
    allow_groups: tuple[str | int, ...] = ()
    #: On SIGTERM, how long live connections may take to finish before they are closed.
    drain_deadline: float = 30.0
    #: ``ADDR:PORT`` for Prometheus metrics over HTTP; None serves them on the control socket only.
    metrics_listen: str | None = None


@dataclass(frozen=True)
class SourceSettings:
    """Where target addresses come from besides fixed ``ip`` entries."""

    #: Leases from the lease socket (the DHCP hook). Off: no lease socket is opened.
    dhcp: bool = True
    #: The kernel neighbour table (addresses seen on the bridge); used by the VM-host tooling.
    neighbours: bool = False
    #: dnsmasq's lease file, read at start and on SIGHUP as a snapshot of the DHCP (IPv4)
    #: leases, so that events the daemon missed while it was down are not lost. None: not read.
    dhcp_lease_file: str | None = None


@dataclass(frozen=True)
class Config:
    """A validated config file; ``source`` names it in messages."""

    rules: tuple[Rule, ...] = ()
    hosts: Mapping[str, HostEntry] = field(default_factory=dict)
    engine: EngineSettings = field(default_factory=EngineSettings)
    control: ControlSettings = field(default_factory=ControlSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)
    source: str = "<config>"
    #: content_digest() of the bytes a file was loaded from, as the watcher fingerprints them.
    digest: str | None = None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    try:
        # utf-8-sig: Windows editors (Notepad) start a UTF-8 file with a byte-order mark,
        # which TOML would take for a statement.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # The decoder counts bytes from the start of the file: a user looks for a line. It
        # counts them after a byte-order mark, in the bytes it was left (exc.object).
        data, at = exc.object, exc.start
        before = data[:at]
        line, column = before.count(b"\n") + 1, at - before.rfind(b"\n")
        raise ConfigError([f"not UTF-8 text: byte 0x{data[at]:02x} at line {line}, column {column}"],
                          str(path)) from None
    return replace(parse_config(text, str(path), base=path.parent), digest=content_digest(raw))


def content_digest(raw: bytes) -> str:
    """A config file's fingerprint: the loaded config and the watcher compare these."""
    return hashlib.sha256(raw).hexdigest()


def parse_config(text: str, source: str = "<config>", *, base: Path | None = None) -> Config:
    """Validate config text completely. Relative paths in [control] are taken from ``base``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], source) from None
    v = _Validator(base or Path.cwd())
    config = v.config(doc, source)
    if v.errors:
        # The text is read again for the lines only now: a good file is not slowed down.
        lines = config_lines.key_lines(text)
        errors = (_at_line(error, lines.get(place)) for error, place in zip(v.errors, v.places))
        raise ConfigError(list(dict.fromkeys(errors)), source)
    return config


def _at_line(error: str, line: int | None) -> str:
    # At the end, as tomllib places a syntax error's "(at line L, column C)".
    return error if line is None else f"{error} (at line {line})"


def parse_rule_options(doc: Any, path: str = "options") -> RuleOptions:
    """Per-rule options given by name (the control socket's ``options``), checked exactly as
    a config file's are; a ConfigError lists every problem under ``path``."""
    v = _Validator(Path())  # no paths among rule options: the base is never used
    options = v.options(v.table(doc, path, _OPTION_KEYS), path, RuleOptions())
    if v.errors:
        raise ConfigError(v.errors, path)
    return options


def parse_engine_settings(doc: Any, path: str = "engine") -> EngineSettings:
    """``[engine]`` settings given by name (the command line's overrides), checked exactly as
    a config file's are; a ConfigError lists every problem under ``path``."""
    v = _Validator(Path())  # no paths among engine settings: the base is never used
    settings = v.settings(EngineSettings, doc, path)
    if v.errors:
        raise ConfigError(v.errors, path)
    return settings


class _Validator:
    """Walks the parsed document, recording every problem under its key path."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.errors: list[str] = []
        self.places: list[str] = []  # each error's key path in the file, for its line

    def error(self, path: str, message: str, *, at: str | None = None) -> None:
        """Record a problem at ``path``; ``at`` is where the file shows it, when not there."""
        self.errors.append(f"{path}: {message}")
        self.places.append(at or path)

    def table(self, doc: Any, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        """The table at ``path`` with unknown keys reported (naming the closest valid one)."""
        if not isinstance(doc, dict):
            self.error(path, f"expected a table, got {_kind(doc)}")
            return {}
        for key in doc:
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(keys)}"
                self.error(f"{path}.{key}" if path else key, f"unknown key ({hint})")
        return {k: v for k, v in doc.items() if k in keys}

    def config(self, doc: dict[str, Any], source: str) -> Config:
        top = self.table(doc, "", ("forward", "hosts", "defaults", "engine", "control", "sources"))
        hosts = self.hosts(top.get("hosts", {}))
        sources = self.settings(SourceSettings, top.get("sources", {}), "sources")
        if sources.dhcp_lease_file is not None and not sources.dhcp:
            self.error("sources.dhcp_lease_file", "needs dhcp = true (its leases are DHCP leases)")
        defaults = self.options(self.table(top.get("defaults", {}), "defaults", _OPTION_KEYS), "defaults",
                                RuleOptions())
        forwards = top.get("forward", [])
        if not isinstance(forwards, list):
            self.error("forward", "expected an array of tables ([[forward]])")
            forwards = []
        rules: list[tuple[str, Rule]] = []
        for i, entry in enumerate(forwards):
            rules.extend((f"forward[{i}]", r) for r in self.forward(entry, f"forward[{i}]", defaults, hosts, sources))
        self.overlaps(rules)
        return Config(
            rules=tuple(r for _, r in rules), hosts=hosts,
            engine=self.settings(EngineSettings, top.get("engine", {}), "engine"),
            control=self.settings(ControlSettings, top.get("control", {}), "control"),
            sources=sources, source=source)

    # -- sections ----------------------------------------------------------------------------
    def hosts(self, doc: Any) -> dict[str, HostEntry]:
        if not isinstance(doc, dict):
            self.error("hosts", f"expected a table of [hosts.NAME] entries, got {_kind(doc)}")
            return {}
        hosts = {}
        spelled: dict[str, str] = {}  # each name as the file first spelled it
        for name, entry in doc.items():
            path = f"hosts.{name}"
            try:
                check_target_host(name)
                if is_ip(name):  # a 'to' with an address never looks it up: the entry would be dead
                    raise SpecError(name)
            except SpecError:
                self.error(path, f"{name!r} is not a valid host name")
                continue
            entry = self.table(entry, path, ("mac", "ip"))
            if len(entry) != 1:
                self.error(path, "give exactly one of 'mac' or 'ip'")
                continue
            (key, value), = entry.items()
            # Names ignore case: [hosts.VM1] and [hosts.vm1] are one name, and keeping either
            # silently would forward to whichever entry the file happened to list last.
            first = spelled.setdefault(name.lower(), name)
            if first != name:
                self.error(path, f"{name.lower()!r} is the same name as hosts.{first} (names ignore case)")
                continue
            try:
                hosts[name.lower()] = HostEntry(**{key: value})
            except LeaseError as exc:
                self.error(f"{path}.{key}", str(exc).removeprefix(f"{key}: "))
        return hosts

    def settings(self, cls: type[_S], doc: Any, path: str) -> _S:
        """A settings dataclass from its table; each field checked by its ``_SETTINGS`` checker."""
        checks = _SETTINGS[cls]
        values: dict[str, Any] = {}
        for key, value in self.table(doc, path, tuple(checks)).items():
            checked = self.check(f"{path}.{key}", value, checks[key])
            if checked is not None:
                values[key] = _resolve_path(self.base, checked) if key in _PATHS else checked
        return cls(**values)

    def options(self, doc: Any, path: str, base: RuleOptions) -> RuleOptions:
        """RuleOptions from the option keys of ``doc`` over ``base``; each field checked alone
        so that every bad one is reported."""
        good: dict[str, Any] = {}
        for key in _OPTION_KEYS:
            if key not in doc:
                continue
            value = doc[key]
            if key in _TUPLE_OPTIONS:
                if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                    self.error(f"{path}.{key}", f"expected an array of strings, got {value!r}")
                    continue
                value = tuple(value)
            try:
                RuleOptions(**{key: value})
            except SpecError as exc:
                self.error(f"{path}.{key}", str(exc).removeprefix(f"{key}: "))
                continue
            good[key] = value
        if not good:
            return base     # shared: thousands of rules with the defaults hold one object
        return RuleOptions(**{**{f: getattr(base, f) for f in _OPTION_KEYS}, **good})

    def forward(self, doc: Any, path: str, defaults: RuleOptions, hosts: Mapping[str, HostEntry],
                sources: SourceSettings) -> list[Rule]:
        entry = self.table(doc, path, ("proto", "listen", "to", "name") + _OPTION_KEYS)
        if not isinstance(doc, dict):
            return []
        protos = self.check(f"{path}.proto", entry.get("proto", "tcp"), _protos)
        name = entry.get("name")
        if name is not None:
            try:
                if not isinstance(name, str):
                    raise SpecError(f"expected a string, got {_kind(name)}")
                check_name(name)
            except SpecError as exc:
                self.error(f"{path}.name", str(exc).removeprefix("name: "))
                name = None  # reported: the rules are still checked, without it
        options = self.options(entry, path, defaults)
        for key, why in options_unused(entry, protos or ()):
            self.error(f"{path}.{key}", why)
        listen = target = None
        for key in ("listen", "to"):
            if key not in entry:
                self.error(path, f"missing required key {key!r}")
        if "listen" in entry:
            listen = self.check(f"{path}.listen", entry["listen"], _listen)
        if "to" in entry:
            target = self.check(f"{path}.to", entry["to"], _target)
        if listen and target:
            (lhost, lport, lcount), (thost, tport, tcount) = listen, target
            if lcount != tcount:
                self.error(path, f"listen has {lcount} ports but to has {tcount}")
                return []
            if thost not in hosts and not is_ip(thost) and not sources.dhcp:
                self.error(f"{path}.to", f"{thost!r} is not in [hosts] and DHCP names are off ([sources] dhcp = false)")
                return []
            fixed = hosts[thost].ip if thost in hosts else None
            via = f" (hosts.{thost})" if fixed is not None else ""
            try:
                rules = [Rule(proto=p, listen_host=lhost, listen_port=lport, count=lcount,
                              target_host=thost, target_port=tport, name=name, options=options)
                         for p in protos or ()]
                if fixed is not None:
                    # The name stands for that address: it gets the checks the address would
                    # (TCP can reach it, it is not the rule's own listener, sources fit it).
                    for rule in rules:
                        rule.with_target(fixed)
                return rules
            except SpecError as exc:
                # An option that does not fit the rule's addresses is reported at its key, a
                # target the protocol cannot reach at 'to'.
                key, _, problem = str(exc).partition(": ")
                if key in _TUPLE_OPTIONS:
                    if key in entry:
                        self.error(f"{path}.{key}", problem + via)
                    else:  # the user would look for the key in the entry in vain; its line is the entry's
                        self.error(f"{path}.{key}", problem + via + " (set in [defaults])", at=path)
                elif key.startswith("target "):
                    self.error(f"{path}.to", str(exc) + via)
                else:
                    self.error(path, str(exc) + via)
        return []

    def overlaps(self, rules: list[tuple[str, Rule]]) -> None:
        """Two entries may not share a name (status and metrics tell rules apart by it), nor
        two rules of one protocol a port on clashing addresses. The ports are swept in order,
        so thousands of rules check in about linear time."""
        named: dict[str, str] = {}
        for path, rule in rules:
            if rule.name is not None and named.setdefault(rule.name, path) != path:
                self.error(f"{path}.name", f"{rule.name!r} is already the name of {named[rule.name]}")
        starts = sorted((rule.proto, rule.listen_port, i) for i, (_, rule) in enumerate(rules) if rule.listen_port)
        live: list[int] = []  # rules of this protocol whose ports reach the current start
        reported: set[int] = set()
        for proto, start, i in starts:
            live = [j for j in live if rules[j][1].proto == proto and _last(rules[j][1]) >= start]
            for j in live:
                (early_path, early), (late_path, late) = rules[min(i, j)], rules[max(i, j)]
                if early_path != late_path and max(i, j) not in reported and _addresses_clash(early, late):
                    reported.add(max(i, j))  # the later entry in the file gets the error
                    self.error(f"{late_path}.listen", f"{late.proto} {_ports(late)} overlaps {early_path} ({early})")
            live.append(i)

    def check(self, path: str, value: Any, checker: Callable[[Any], Any]) -> Any:
        """Run one value checker; a SpecError becomes an error at ``path`` and gives None."""
        try:
            return checker(value)
        except SpecError as exc:
            self.error(path, str(exc))
            return None


# -- value checkers: each returns the typed value or raises SpecError naming the problem -------
def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise SpecError(f"expected {what}, got {value!r}")
    return value


def _protos(value: Any) -> tuple[Proto, ...]:
    # Compared whole, never sorted: a list may hold anything, and names do not order with numbers.
    if value in ("both", ["tcp", "udp"], ["udp", "tcp"]):
        return ("tcp", "udp")
    if value in ("tcp", ["tcp"]):
        return ("tcp",)
    if value in ("udp", ["udp"]):
        return ("udp",)
    raise SpecError(f"expected 'tcp', 'udp', 'both' or [\"tcp\", \"udp\"], got {value!r}")


def _listen(value: Any) -> tuple[str, int, int]:
    """``[ADDR:]PORT[-END]`` (or a bare integer port) into (address, first port, count)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    _expect(value, str, "'[ADDR:]PORT[-END]'")
    parts = split_hostports(value)
    if len(parts) > 2:
        raise SpecError(f"{value!r}: expected [ADDR:]PORT[-END] (IPv6 addresses go in brackets)")
    host = listen_address(parts[0] if len(parts) == 2 else DEFAULT_LISTEN)
    first, count = parse_ports(parts[-1])
    if first == 0 and count > 1:
        raise SpecError("port 0 (any free port) cannot start a range")
    return host, first, count


def _target(value: Any) -> tuple[str, int, int]:
    """``HOST:PORT[-END]`` into (host, first port, count)."""
    _expect(value, str, "'HOST:PORT[-END]'")
    parts = split_hostports(value)
    if len(parts) != 2:
        raise SpecError(f"{value!r}: expected HOST:PORT[-END] (IPv6 addresses go in brackets)")
    check_target_host(parts[0])
    first, count = parse_ports(parts[1])
    if first == 0:
        raise SpecError("target port 0 is not a port")
    # Names compare case-insensitively, and DHCP names arrive lowercased.
    host = parts[0] if is_ip(parts[0]) else parts[0].lower()
    return host, first, count


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"expected a file path, got {value!r}")
    if "\0" in value:  # TOML can say \u0000, but no system call takes such a path
        raise SpecError(f"{value!r} holds a NUL character, which no file path can")
    return value


_MAX_ID = 2 ** 32 - 2


def _principals(kind: str) -> Callable[[Any], tuple[str | int, ...]]:
    """A checker for a list of user or group names or numeric ids. Names are looked up when
    the daemon starts, not here, so a file checks the same on any machine."""
    def check(value: Any) -> tuple[str | int, ...]:
        if not isinstance(value, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value):
            raise SpecError(f"expected an array of {kind} names or numeric ids, got {value!r}")
        for x in value:
            # What chown takes: 2**32 - 1 means "leave as is", and past it is an OverflowError.
            if isinstance(x, int) and not 0 <= x <= _MAX_ID:
                raise SpecError(f"id {x} is not a {kind} id (0 to {_MAX_ID})")
        return tuple(value)
    return check


def _flag(value: Any) -> bool:
    return _expect(value, bool, "true or false")


def _hostport(value: Any) -> str:
    _expect(value, str, "'ADDR:PORT'")
    parts = split_hostports(value)
    if len(parts) != 2 or not is_ip(parts[0]):
        raise SpecError(f"{value!r}: expected ADDR:PORT with an IP address (IPv6 in brackets)")
    if parse_ports(parts[1])[1] != 1:
        raise SpecError(f"{value!r}: expected one port, not a range")
    return value


_SETTINGS: dict[type, dict[str, Callable[[Any], Any]]] = {
    EngineSettings: engine_settings.CHECKS,
    ControlSettings: {"lease_socket": _path, "control_socket": _path, "state_dir": _path,
                      "allow_users": _principals("user"), "allow_groups": _principals("group"),
                      "drain_deadline": seconds, "metrics_listen": _hostport},
    SourceSettings: {"dhcp": _flag, "neighbours": _flag, "dhcp_lease_file": _path},
}
_PATHS = ("lease_socket", "control_socket", "state_dir", "dhcp_lease_file")


def _resolve_path(base: Path, value: str) -> str:
    """Relative paths in a config file mean relative to the file, not to wherever the daemon started."""
    return str(base / value)


def _last(rule: Rule) -> int:
    return rule.listen_port + rule.count - 1


def _ports(rule: Rule) -> str:
    return f"port {rule.listen_port}" if rule.count == 1 else f"ports {rule.listen_port}-{_last(rule)}"


def _addresses_clash(a: Rule, b: Rule) -> bool:
    """Both would bind the same port: the same address, or either one the wildcard of the
    other's IP version. The engine's IPv6 listeners are IPv6-only, so 0.0.0.0 and :: (the
    way to publish a port on both) do not clash."""
    if (":" in a.listen_host) != (":" in b.listen_host):
        return False
    wild = ("0.0.0.0", "::")
    return a.listen_host == b.listen_host or a.listen_host in wild or b.listen_host in wild
