"""Forwarding rules: the typed rule objects, their options, and the port-spec syntax.

A spec reads ``[ADDR:]PORT[-END]:HOST:PORT[-END]``; IPv6 addresses go in brackets
(``[::1]:5353:[::1]:53``). HOST is an IP literal or a name that host entries or DHCP
leases resolve. A port range maps one to one onto a target range of the same length.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

Proto = Literal["tcp", "udp"]
SpliceMode = Literal["auto", "always", "never"]
LivePolicy = Literal["keep", "close"]
#: What identifies a rule across reloads: protocol, listen address, first port, port count.
RuleKey = tuple[str, str, int, int]

#: The engine's limits for rule options: seconds kept as milliseconds, counts as C ints.
MAX_SECONDS = 10 ** 9
MAX_COUNT = 2 ** 31 - 1
MAX_BYTES = 2 ** 63 - 1
#: A rule name is a label in logs, status and metrics: one printable line, this long at most.
MAX_NAME = 128

#: Where a spec without an address listens: loopback, so a quick forward never
#: publishes a port to the network by surprise. Say ``0.0.0.0:PORT`` to publish.
DEFAULT_LISTEN = "127.0.0.1"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class SpecError(ValueError):
    """A port spec or rule field that cannot be used; the message names the problem."""


#: The options one protocol alone uses: set on a rule of only the other, they would do
#: nothing, without a word.
_ONE_PROTOCOL: dict[str, Proto] = {
    "connect_timeout": "tcp", "idle_timeout": "tcp", "half_closed_timeout": "tcp", "splice": "tcp",
    "splice_threshold": "tcp", "max_connections": "tcp", "on_retarget": "tcp", "on_remove": "tcp",
    "udp_idle_timeout": "udp", "udp_max_sessions": "udp",
}


def options_unused(names: Iterable[str], protos: Iterable[Proto]) -> list[tuple[str, str]]:
    """Each option among ``names`` that no protocol in ``protos`` uses, with why; none when
    ``protos`` is empty (the rule's protocol is itself in error)."""
    protos = tuple(protos)
    if not protos:
        return []
    return [(name, f"a {_ONE_PROTOCOL[name].upper()} option, and this rule is {protos[0].upper()} only")
            for name in names if name in _ONE_PROTOCOL and _ONE_PROTOCOL[name] not in protos]


@dataclass(frozen=True)
class RuleOptions:
    """Per-rule behaviour. Times are in seconds; 0 disables a timeout or a cap."""

    #: Give up on a target that has not completed the TCP handshake by then.
    connect_timeout: float = 10.0
    #: Close a TCP connection with no traffic either way for this long.
    idle_timeout: float = 3600.0
    #: Close a connection this long after one direction finished (FIN) and the other went quiet.
    half_closed_timeout: float = 120.0
    #: ``auto`` copies short exchanges and switches a direction to splice(2) once it has
    #: moved ``splice_threshold`` bytes; ``always`` splices from the first byte; ``never`` copies.
    splice: SpliceMode = "auto"
    splice_threshold: int = 65536
    #: A UDP session (one client address) ends after this long without a datagram either way.
    udp_idle_timeout: float = 60.0
    #: At most this many UDP sessions per rule; a new client evicts the least recently active.
    udp_max_sessions: int = 4096
    #: Refuse TCP connections beyond this many open at once (0: no cap).
    max_connections: int = 0
    #: Only these source networks may connect (TCP) or send (UDP, checked per datagram); empty
    #: allows all. Others are refused and counted.
    allow: tuple[str, ...] = ()
    #: Local addresses to spread upstream connections and UDP sessions over, round robin (more
    #: ports in TIME_WAIT before running out).
    source: tuple[str, ...] = ()
    #: What happens to live TCP connections when the rule's target changes: ``keep`` lets
    #: them run to their end on the old target, ``close`` resets them. UDP sessions always move.
    on_retarget: LivePolicy = "keep"
    #: What happens to live TCP connections when the rule is removed: ``keep`` lets them finish,
    #: ``close`` resets them. UDP sessions end with the rule's listener either way.
    on_remove: LivePolicy = "keep"

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "idle_timeout", "half_closed_timeout", "udp_idle_timeout"):
            try:
                object.__setattr__(self, name, seconds(getattr(self, name)))
            except SpecError as exc:
                raise SpecError(f"{name}: {exc}") from None
        for name, most in (("splice_threshold", MAX_BYTES), ("udp_max_sessions", MAX_COUNT),
                           ("max_connections", MAX_COUNT)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
                raise SpecError(f"{name}: expected an integer from 0 to {most}, got {value!r}")
        if self.splice not in ("auto", "always", "never"):
            raise SpecError(f"splice: expected 'auto', 'always' or 'never', got {self.splice!r}")
        for name in ("on_retarget", "on_remove"):
            if getattr(self, name) not in ("keep", "close"):
                raise SpecError(f"{name}: expected 'keep' or 'close', got {getattr(self, name)!r}")
        for name, items in (("allow", "CIDR networks"), ("source", "addresses")):
            value = getattr(self, name)
            if isinstance(value, str):  # tuple() would read it character by character
                raise SpecError(f"{name}: expected a list of {items}, got the string {value!r}")
            if not isinstance(value, Iterable):
                raise SpecError(f"{name}: expected a list of {items}, got {value!r}")
            value = tuple(value)
            for item in value:
                if not isinstance(item, str):  # ipaddress would read an integer as an address
                    raise SpecError(f"{name}: expected a list of {items}, got the item {item!r}")
            object.__setattr__(self, name, value)
        for cidr in self.allow:
            allow_network(cidr)
        for addr in self.source:
            unmapped_ip(addr, "source")


@dataclass(frozen=True)
class Rule:
    """One forward: ``count`` consecutive listen ports onto ``count`` consecutive target ports.

    ``target_host`` is an IP literal or a name resolved at run time; a rule whose name is not
    resolved yet is *pending*. ``listen_port`` 0 asks the kernel for a free port.
    """

    proto: Proto
    listen_port: int
    target_host: str
    target_port: int
    listen_host: str = DEFAULT_LISTEN
    count: int = 1
    name: str | None = None
    options: RuleOptions = field(default_factory=RuleOptions)

    def __post_init__(self) -> None:
        self._check_types()
        if self.proto not in ("tcp", "udp"):
            raise SpecError(f"proto: expected 'tcp' or 'udp', got {self.proto!r}")
        if self.name is not None:
            check_name(self.name)
        object.__setattr__(self, "listen_host", listen_address(self.listen_host))
        check_target_host(self.target_host)
        if not is_ip(self.target_host):
            object.__setattr__(self, "target_host", self.target_host.lower())  # names ignore case
        else:
            # One spelling per address: a reload writing [0:0::1] for [::1] is no re-pointing
            # (which would reset live connections under on_retarget = "close").
            target = ip_address(self.target_host)
            object.__setattr__(self, "target_host", ip_text(target))
            if self.proto == "tcp":
                _check_tcp_target(target)
        self._check_families()
        if self.count < 1:
            raise SpecError(f"port count must be at least 1, got {self.count}")
        if self.listen_port == 0 and self.count != 1:
            raise SpecError("listen port 0 (any free port) cannot start a range")
        _check_port_range(self.listen_port, self.count, "listen", allow_zero=True)
        _check_port_range(self.target_port, self.count, "target", allow_zero=False)
        self._check_not_onto_itself()

    def _check_types(self) -> None:
        """A program building rules itself learns which field is wrong, rather than getting a
        TypeError from inside the checks, or a rule listening on port 80.0."""
        for name in ("listen_port", "target_port", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"{name}: expected an integer, got {value!r}")
        for name in ("proto", "target_host", "listen_host", "name"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "name" and value is None):
                raise SpecError(f"{name}: expected a string, got {value!r}")
        if not isinstance(self.options, RuleOptions):
            raise SpecError(f"options: expected a RuleOptions, got {self.options!r}")

    def _check_families(self) -> None:
        """Refuse what could never work: IPv6 listeners take IPv6 clients only (IPv4 ones are
        not seen as ::ffff:a.b.c.d), and an upstream socket binds only a source address of
        its target's family. The forwarder uses the pool addresses of the target's family
        (a name's once it resolves), so a pool may mix families, as a [defaults] one for a
        dual-stack host does, but must hold one of an address target's family."""
        family = ip_address(self.listen_host).version
        nets = [ipaddress.ip_network(cidr, strict=False) for cidr in self.options.allow]
        if nets and all(net.version != family for net in nets):
            raise SpecError(f"allow: no IPv{family} network, so every client of {self.listen_text} would be refused")
        if self.target_is_name or not self.options.source:
            return
        target = ip_address(self.target_host)
        versions = [ip_address(addr).version for addr in self.options.source]
        if target.version not in versions:
            raise SpecError(f"source: {self.options.source[0]!r} is IPv{versions[0]} but the target {target} "
                            f"is IPv{target.version}")

    def _check_not_onto_itself(self) -> None:
        """Refuse a target port that is one of the rule's own listeners (``5353:127.0.0.1:5353``):
        each datagram or connection would come back to it without end. Seen from the spec alone:
        the listen address itself, or loopback or the unspecified address on the same host."""
        if self.target_is_name or not self.listen_port:
            return
        target, listen = _as_reached(ip_address(self.target_host)), ip_address(self.listen_host)
        here = target == listen or (target.version == listen.version and (
            (listen.is_unspecified and target.is_loopback) or (target.is_unspecified and listen.is_loopback)))
        if here and self.target_port < self.listen_port + self.count and self.listen_port < self.target_port + self.count:
            raise SpecError(f"target {self.target_text} is this rule's own listener: it would forward to itself")

    @classmethod
    def parse(cls, spec: str, proto: Proto = "tcp", *, name: str | None = None,
              options: RuleOptions | None = None) -> "Rule":
        """Parse ``[ADDR:]PORT[-END]:HOST:PORT[-END]`` into a rule."""
        if not isinstance(spec, str):
            raise SpecError(f"expected a port spec string, got {spec!r}")
        try:
            parts = split_hostports(spec)
            if len(parts) not in (3, 4):
                hint = " (IPv6 addresses go in brackets)" if len(parts) > 4 else ""
                raise SpecError(f"expected [ADDR:]PORT[-END]:HOST:PORT[-END]{hint}")
            if len(parts) == 3 and is_ip(parts[0]):
                # ADDR:PORT:HOST, not PORT:HOST:PORT: the address is no port, the target lacks one.
                raise SpecError("expected [ADDR:]PORT[-END]:HOST:PORT[-END]: the target has no port")
            listen_host = parts[0] if len(parts) == 4 else DEFAULT_LISTEN
            (lport, lcount), thost, (tport, tcount) = (
                parse_ports(parts[-3]), parts[-2], parse_ports(parts[-1]))
            if lcount != tcount:
                raise SpecError(f"listen range has {lcount} ports but target range has {tcount}")
            return cls(proto=proto, listen_host=listen_host, listen_port=lport, count=lcount,
                       target_host=thost, target_port=tport, name=name,
                       options=options or RuleOptions())
        except SpecError as exc:
            raise SpecError(f"{spec!r}: {exc}") from None

    @property
    def key(self) -> RuleKey:
        """What identifies a rule across reloads: its protocol and listening ports."""
        return (self.proto, self.listen_host, self.listen_port, self.count)

    @property
    def target_is_name(self) -> bool:
        return not is_ip(self.target_host)

    def with_target(self, host: str, port: int | None = None) -> "Rule":
        return replace(self, target_host=host, target_port=self.target_port if port is None else port)

    @property
    def listen_text(self) -> str:
        """``ADDR:PORT[-END]``, IPv6 in brackets."""
        return self._endpoint(self.listen_host, self.listen_port)

    @property
    def target_text(self) -> str:
        """``HOST:PORT[-END]``, IPv6 in brackets."""
        return self._endpoint(self.target_host, self.target_port)

    def _endpoint(self, host: str, port: int) -> str:
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port}" + (f"-{port + self.count - 1}" if self.count > 1 else "")

    def __str__(self) -> str:
        return f"{self.proto} {self.listen_text} -> {self.target_text}"


def split_hostports(text: str) -> list[str]:
    """Split on the ':' outside brackets; bracketed IPv6 literals lose their brackets."""
    if text.count("[") != text.count("]"):
        raise SpecError("unbalanced '[' and ']'")
    parts = re.split(r":(?![^\[]*\])", text.strip())
    return [p[1:-1] if p.startswith("[") and p.endswith("]") else p for p in parts]


def parse_ports(text: str) -> tuple[int, int]:
    """``PORT`` or ``PORT-END`` into (first port, count)."""
    first, sep, last = text.partition("-")
    # ASCII digits only: int() would also read '8_0' as 80, and '+80', ' 80' or other
    # scripts' digits, so a typo could become some other port.
    if not all(part.isascii() and part.isdigit() for part in ((first, last) if sep else (first,))):
        raise SpecError(f"{text!r} is not a port or a port range")
    lo = int(first)
    hi = int(last) if sep else lo
    for port in (lo, hi):
        if not 0 <= port <= 65535:
            raise SpecError(f"port {port} is out of range 0-65535")
    if hi < lo:
        raise SpecError(f"range {lo}-{hi} is reversed")
    return lo, hi - lo + 1


def parse_ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ip_address(text.strip("[]"))
    except ValueError:
        raise SpecError(f"{what} {text!r} {why_not_ip(text.strip('[]'))}") from None


def listen_address(text: str) -> str:
    """A listen address in its normal form."""
    return str(unmapped_ip(text, "listen address"))


def unmapped_ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address to bind. An IPv4-mapped one (::ffff:a.b.c.d) cannot be bound by the
    engine's IPv6-only sockets: the IPv4 form is what works."""
    ip = parse_ip(text, what)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise SpecError(f"{what} {text!r} is an IPv4-mapped address: write {ip.ipv4_mapped}")
    return ip


def allow_network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise SpecError(f"allow: {cidr!r} is not a CIDR network") from None
    # Clients arrive in their own family, so an IPv4 client never matches ::ffff:a.b.c.d/n.
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        v4 = ipaddress.IPv4Network((net.network_address.ipv4_mapped, net.prefixlen - 96))
        raise SpecError(f"allow: {cidr!r} is an IPv4-mapped network, which no client matches: "
                        f"write '{v4}' (IPv4 clients are seen as IPv4)")
    return net


def is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address the engine can bind and connect to. Python takes an IPv6 zone
    (``fe80::1%eth0``) as part of an address, but the engine has no zone to give it and
    refuses it later: a rule would fail at start instead of at the check.

    Cached: a table of thousands of rules names a few addresses many times each, and
    parsing them was most of a large config's load (addresses are immutable)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"{text!r} has a zone")
    return ip


def why_not_ip(text: str) -> str:
    """What is wrong with ``text`` that :func:`ip_address` refused, to follow its quoted form."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "is not an IPv4 or IPv6 address"
    return f"has an IPv6 zone (%{text.partition('%')[2]}), which fastfwd cannot use: give the address without it"


def ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address in its one normal spelling; an IPv4-mapped one keeps its IPv4 part dotted,
    as users write it (Python would say ::ffff:7f00:1)."""
    mapped = _as_reached(ip)
    return f"::ffff:{mapped}" if mapped is not ip else str(ip)


def seconds(value: object) -> float:
    """A duration the engine can hold (it keeps milliseconds). TOML and JSON can say nan and
    inf: nan fails every comparison, so it is refused too. A time above 0 but under a
    millisecond is a millisecond: the engine would truncate it to 0, which means "never"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_SECONDS:
        raise SpecError(f"expected a number of seconds from 0 to {MAX_SECONDS}, got {value!r}")
    return max(float(value), 0.001) if value else 0.0


def check_name(name: str) -> None:
    # A newline would let a name forge lines in the daemon's log.
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise SpecError(f"name: expected 1 to {MAX_NAME} printable characters on one line, got {name[:40]!r}"
                        + ("..." if len(name) > 40 else ""))


def check_target_host(host: str) -> None:
    if is_ip(host):
        return
    # Digits and dots are an IPv4 address mistyped, not a name: as a name, the rule would wait
    # for a lease that never comes.
    if "." in host and set(host) <= set("0123456789."):
        raise SpecError(f"target host {host!r} is not an IPv4 address")
    if "%" in host and is_ip(host.partition("%")[0]):
        raise SpecError(f"target host {host!r} {why_not_ip(host)}")
    if not _HOSTNAME.fullmatch(host):
        raise SpecError(f"target host {host!r} is neither an IP address nor a valid host name")
    # Names are looked up in [hosts] and leases, never in /etc/hosts: 'localhost' would wait
    # for (or follow) a guest calling itself that, not reach this host.
    name = host.lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise SpecError(f"target host {name!r} is a loopback name: write 127.0.0.1 or [::1] "
                        "(names come from [hosts] and DHCP leases)")


def _as_reached(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a connection to ``ip`` reaches: the engine's IPv6 upstream sockets reach
    an IPv4-mapped target (::ffff:a.b.c.d) over IPv4, so it gets the IPv4 address's checks."""
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _check_tcp_target(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    # Every connection would fail; UDP may send to a group or the broadcast address.
    reached = _as_reached(ip)
    if reached.is_multicast:
        raise SpecError(f"target {ip_text(ip)} is a multicast address: TCP cannot connect to it")
    if reached == ipaddress.IPv4Address("255.255.255.255"):
        raise SpecError(f"target {ip_text(ip)} is the broadcast address: TCP cannot connect to it")


def _check_port_range(first: int, count: int, what: str, allow_zero: bool) -> None:
    if not (0 if allow_zero else 1) <= first <= 65535:
        raise SpecError(f"{what} port {first} is out of range {0 if allow_zero else 1}-65535")
    if first + count - 1 > 65535:
        raise SpecError(f"{what} range {first}-{first + count - 1} runs past port 65535")
