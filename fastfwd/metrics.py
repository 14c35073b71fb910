"""Per-rule counters in the Prometheus text format, served on the control socket and, when
``[control] metrics_listen`` is set, over HTTP from the daemon's event loop.

The collector reads the engine's counters at scrape time: nothing is copied or kept between
scrapes, so there is no second set of numbers to drift from the engine's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .control import endpoints, in_turns, rule_label
from .forwarder import COUNTER_NAMES, ActiveRule, Counters, Forwarder

log = logging.getLogger("fastfwd")

#: What each engine counter counts, as the HELP line says it. "Up" is client to target.
_HELP = {
    "accepted": "TCP connections accepted and sent on to the target (those whose connect then failed too)",
    "active": "TCP connections open now",
    "refused": "TCP connections reset at accept (allow list, max_connections, no fds or memory) "
               "and UDP datagrams from sources the allow list does not admit",
    "connect_failed": "TCP connects to the target refused or timed out, and ICMP errors UDP datagrams "
                      "met on the way to the target (port unreachable, prohibited, too big for the path)",
    "bytes_up": "bytes sent from clients to the target",
    "bytes_down": "bytes sent from the target to clients",
    "bytes_spliced": "TCP bytes moved with splice (zero copy), both directions",
    "bytes_copied": "TCP bytes moved through a user-space buffer, both directions",
    "splice_fallbacks": "TCP directions that went back to copying because splice does not work on the socket",
    "pipe_shortages": "times a TCP direction found no spare pipe and copied its next MiB instead",
    "accept_paused": "times a TCP listener rested 250 ms for want of fds or memory",
    "datagrams_up": "UDP datagrams sent from clients to the target",
    "datagrams_down": "UDP datagrams sent from the target to clients",
    "sessions_active": "UDP sessions open now",
    "sessions_created": "UDP sessions opened (one per client address)",
    "sessions_evicted": "UDP sessions closed to make room under udp_max_sessions",
    "sessions_expired": "UDP sessions closed after udp_idle_timeout without a datagram",
    "drops": "UDP datagrams lost: not sent on (no session: pending target, no fds; a full socket "
             "buffer), or dropped by the kernel at fastfwd's own sockets with their receive buffer full",
    "truncated": "UDP datagrams dropped for being longer than a receive buffer",
    "bytes_discarded": "TCP bytes a reset threw away that one peer counts as delivered: unread in "
                       "fastfwd's receive queue, pipe or buffer, or unacknowledged in its send queue",
}
#: Counters that go up and down; every other engine counter only grows.
_GAUGES = {"active", "sessions_active"}
#: Counters of one protocol only: the other protocol's rules have no series in their family,
#: which would only ever say 0 (and made 38% of a scrape of thousands of rules).
_ONLY = {"tcp": {"accepted", "active", "bytes_spliced", "bytes_copied", "splice_fallbacks", "pipe_shortages",
                 "accept_paused", "bytes_discarded"},
         "udp": {"datagrams_up", "datagrams_down", "sessions_active", "sessions_created", "sessions_evicted",
                 "sessions_expired", "drops", "truncated"}}
#: The counters each protocol's rules have series for.
_COUNTED = {proto: tuple(name for name in COUNTER_NAMES if name not in _ONLY[other])
            for proto, other in (("tcp", "udp"), ("udp", "tcp"))}
_LABELS = ["rule", "proto", "listen", "target"]

#: HTTP connections open at once, at most: each holds an fd and a task of the daemon, and a
#: flood of connections must not use up the fds the forwarding needs.
MAX_CONNECTIONS = 16
#: How long a client may take to send its request (a scraper sends it at once).
REQUEST_TIMEOUT = 5.0
#: How long a whole exchange may take: a scraper that stops reading goes too.
EXCHANGE_TIMEOUT = 10.0
#: How long what a refused request still sends is read and dropped before closing.
LINGER = 1.0
#: The largest request head (request line and header fields) read; a longer one gets 431.
HEAD_MAX = 1 << 16


@dataclass(frozen=True)
class RuleReading:
    """One rule's labels, counters and state, as read at one moment."""

    labels: list[str]
    counters: Counters
    pending: bool

    @property
    def proto(self) -> str:
        return self.labels[_LABELS.index("proto")]


def snapshot(fw: Forwarder) -> list[RuleReading]:
    """Every rule's counters, read at once (reading the engine's counters costs microseconds a
    rule)."""
    return [reading for active in fw.rules if (reading := _reading(fw, active)) is not None]


async def snapshot_in_turns(fw: Forwarder) -> list[RuleReading]:
    """``snapshot``, a slice of rules per turn of the event loop; a rule removed meanwhile is
    left out."""
    return [reading async for active in in_turns(fw.rules) if (reading := _reading(fw, active)) is not None]


def _reading(fw: Forwarder, active: ActiveRule) -> RuleReading | None:
    """A rule's labels and counters, read together; None once it is removed."""
    if not active.installed:
        return None
    listen, target = endpoints(active)
    return RuleReading([rule_label(active), active.rule.proto, listen, target], fw.counters(active), active.pending)


@dataclass(frozen=True)
class ReloadReading:
    """How the config file's last load ended (the one at start, until a reload), and how many
    reloads since the start were applied and rejected."""

    successful: bool
    at: float
    applied: int
    rejected: int


class RuleCollector:
    """A prometheus-client collector over rules' readings."""

    def __init__(self, readings: list[RuleReading]) -> None:
        self.readings = readings

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            name: (GaugeMetricFamily if name in _GAUGES else CounterMetricFamily)(
                f"fastfwd_{name}", f"Per rule: {_HELP[name]}", labels=_LABELS)
            for name in COUNTER_NAMES}
        pending = GaugeMetricFamily("fastfwd_rule_pending", "1 while the rule's target has no address",
                                    labels=_LABELS)
        for reading in self.readings:
            for name in _COUNTED[reading.proto]:
                families[name].add_metric(reading.labels, getattr(reading.counters, name))
            pending.add_metric(reading.labels, 1 if reading.pending else 0)
        yield from families.values()
        yield pending


class ReloadCollector:
    """A prometheus-client collector over the config file's reload outcome."""

    def __init__(self, reading: ReloadReading) -> None:
        self.reading = reading

    def collect(self) -> Iterator[Metric]:
        r = self.reading
        yield GaugeMetricFamily("fastfwd_config_last_reload_successful",
                                "1 if the config file's last load (at start, or the last reload) was applied, "
                                "0 if it was rejected and the rules from before run", value=1 if r.successful else 0)
        yield GaugeMetricFamily("fastfwd_config_last_reload_timestamp_seconds",
                                "Unix time of the config file's last load (at start, or the last reload)",
                                value=r.at)
        reloads = CounterMetricFamily("fastfwd_config_reloads", "Reloads of the config file since the start, "
                                      "by result: applied, or rejected with the rules unchanged", labels=["result"])
        reloads.add_metric(["applied"], r.applied)
        reloads.add_metric(["rejected"], r.rejected)
        yield reloads


def exposition(readings: list[RuleReading], reload: ReloadReading | None = None) -> bytes:
    """The exposition text for the rules read, the reload outcome (if the daemon has a config
    file), and this process's own metrics: open fds against their limit above all, as fds are
    what a forwarder runs out of first. Slow for many rules (about half a second for 2,000):
    ``scrape`` runs it in a thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuleCollector(readings))
    if reload is not None:
        registry.register(ReloadCollector(reload))
    ProcessCollector(registry=registry)
    return generate_latest(registry)


def render(fw: Forwarder) -> bytes:
    """The exposition text for every rule of ``fw``."""
    return exposition(snapshot(fw))


async def scrape(fw: Forwarder, reload: ReloadReading | None = None) -> bytes:
    """The exposition text, read on the event loop a slice of rules at a time and formatted in
    a thread, so that a large rule table does not hold up the loop (lease replies, reloads, the
    control socket)."""
    return await asyncio.to_thread(exposition, await snapshot_in_turns(fw), reload)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request head, up to the empty line that ends it; None past ``HEAD_MAX``. A line
    may end in a bare LF, as RFC 9112 (section 2.2) lets a recipient take it: ``nc`` probes
    and simple scrapers send that."""
    head = bytearray()
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:  # one line past the reader's limit (HEAD_MAX)
            return None
        head += line
        if len(head) > HEAD_MAX:
            return None
        if line in (b"\n", b"\r\n"):
            return bytes(head)


async def serve_http(fw: Forwarder, host: str, port: int,
                     reload: Callable[[], ReloadReading | None] = lambda: None) -> asyncio.Server:
    """A minimal HTTP/1.0 endpoint answering every GET with the metrics (``scrape``, with
    what ``reload`` reads), any other method with 405 and a header over 64 KiB
    with 431. At most ``MAX_CONNECTIONS`` are open at once; a
    connection past that closes the oldest one still waiting for its request, so idle clients
    cannot keep a scraper out (and only if every one is being answered, it is closed itself)."""
    waiting: dict[asyncio.StreamWriter, None] = {}  # oldest first
    answering: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(waiting) + len(answering) >= MAX_CONNECTIONS:
            if not waiting:
                writer.transport.abort()
                return
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.transport.abort()
        waiting[writer] = None
        closed = False
        try:
            async with asyncio.timeout(EXCHANGE_TIMEOUT):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await _read_head(reader)
                if writer not in waiting:
                    return  # its request came, but a newer connection had closed it already
                del waiting[writer]
                answering.add(writer)
                if request is not None and request.startswith(b"GET "):
                    body = await scrape(fw, reload())
                    writer.write(f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                else:
                    writer.write(b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"
                                 if request is None else
                                 b"HTTP/1.0 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\n\r\n")
                    writer.write_eof()
                    # The rest of what it sends (a header, a body), read and dropped until it
                    # closes, for a moment: closing with bytes unread would reset the
                    # connection, and the client could lose the answer before reading it.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LINGER):
                            while await reader.read(1 << 16):
                                pass
                writer.close()
                await writer.wait_closed()  # all sent: that too within the exchange's time
                closed = True
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that hangs up or talks nonsense just goes away
        finally:
            waiting.pop(writer, None)
            answering.discard(writer)
            if not closed:
                # Not close(): with an answer still unsent it keeps the connection, and its fd,
                # out of the count above, until a client that stopped reading takes the rest. A
                # reset, so that no orphan is left in the kernel sending that rest either.
                sock = writer.get_extra_info("socket")  # None once closed (an evicted one)
                with contextlib.suppress(OSError):
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()

    server = await asyncio.start_server(handle, host.strip("[]"), port, limit=HEAD_MAX)
    log.info("metrics on http://%s:%d/metrics", host, server.sockets[0].getsockname()[1])
    return server
