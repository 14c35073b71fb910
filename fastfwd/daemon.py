"""The daemon: one Forwarder on uvloop, kept equal to the config file, the CLI rules and the
rules added at run time, with targets resolved from host entries and DHCP leases.

Lifecycle: SIGHUP (or a change to the config file) reloads; a reload is validated completely
before anything changes and applied as a diff. SIGTERM stops accepting and lets live
connections finish up to ``[control] drain_deadline``, then exits 0; a second SIGTERM or a
SIGINT stops at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import logging.handlers
import os
import signal
import stat
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import uvloop

from .config import Config, ConfigError, ControlSettings, EngineSettings, content_digest, load_config
from .control import ControlServer, in_turns, rule_label
from .forwarder import ActiveRule, Counters, Diff, Forwarder
from .lease_server import LeaseServer, apply_lease_file, reread_lease_file
from .leases import STATE_FILE, HostEntry, LeaseChange, LeaseTable, name_updates, resolve_name, resolve_names
from .notify import notify, reloading, watchdog_interval
from .rules import Rule, split_hostports
from .state_dir import StateDirLock
from .unixserver import Access, JsonLineServer, UnknownName
from .watcher import watch_config

if TYPE_CHECKING:
    from .metrics import ReloadReading

log = logging.getLogger("fastfwd")
_T = TypeVar("_T")

#: Seconds the lease state file may lag behind the table: a burst of lease events costs one
#: save, not one each. A clean stop saves at once; a crash loses at most this window, which
#: the DHCP server's next snapshot or events restore.
LEASE_SAVE_DELAY = 1.0
_EMPTY = content_digest(b"")
#: Target names without an address at start warned about one by one; more are one line.
_UNKNOWN_ONE_BY_ONE = 10
#: Problems of a rejected reload logged one per line; the rest are counted in one more.
LOGGED_CONFIG_ERRORS = 20
#: Seconds between the log's failure summaries: at most one line per rule each.
FAILURE_LOG_INTERVAL = 60.0
#: The counters the failure summary reports: each counts a client turned away or traffic
#: lost. Pipe shortages and splice fallbacks are left to the metrics: their bytes still move.
FAILURE_COUNTERS = ("connect_failed", "refused", "accept_paused", "drops", "truncated", "bytes_discarded")


class DaemonError(Exception):
    """The daemon cannot start; the message is one line naming the problem."""


class SettingsError(DaemonError):
    """The daemon cannot start because its settings ask for what can never work (a target
    name nothing can resolve, an unknown user): as wrong as a bad config file."""


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that win over the config file's."""

    workers: int | None = None
    busy_poll_us: int | None = None
    control_socket: str | None = None
    lease_socket: str | None = None
    state_dir: str | None = None


class Daemon:
    """The rules of the config file, the command line and the control socket, forwarded by
    one Forwarder whose target names follow the lease table. ``run`` serves until a signal."""

    def __init__(self, config: Config, config_path: str | Path | None = None,
                 cli_rules: Iterable[Rule] = (), overrides: Overrides = Overrides()) -> None:
        self.config = config
        self.path = Path(config_path) if config_path is not None else None
        self.cli_rules = list(cli_rules)
        #: Rules added through the control socket; they live until removed the same way.
        self.runtime_rules: dict[tuple, Rule] = {}
        self.overrides = overrides
        self.control = self._control_settings(config)
        #: [sources] as started: a reload that changes them takes effect only at the next start.
        self.sources = config.sources
        self.leases = LeaseTable()
        self.fw: Forwarder | None = None
        self._names: dict[str, str] = {}
        #: The [hosts] names of each MAC, for the [hosts] mapping they were made from.
        self._hosts_by_mac: tuple[Mapping[str, HostEntry], dict[str, set[str]]] = ({}, {})
        #: Serialises every change to the rule table: reloads, lease changes, run-time rules.
        self._lock = asyncio.Lock()
        #: Serialises reloads (parse and apply), so that a file read later is never applied first.
        self._reload_lock = asyncio.Lock()
        #: Serialises the writers of the lease table: the lease socket and the neighbour table.
        self._lease_lock = asyncio.Lock()
        self._stop: asyncio.Future[str] | None = None
        self._draining: asyncio.Future[None] | None = None
        #: A stop-at-once signal came (SIGINT, a second SIGTERM), maybe before the drain began.
        self._hurried = False
        self._reloads: set[asyncio.Task[Diff | None]] = set()
        #: READY=1 was sent: from then on reloads are announced too. One asked for during the
        #: start runs before the servers are up, and its READY=1 would come too early.
        self._up = False
        #: How the last reload ended, for status: None until one ran.
        self.last_reload: dict[str, Any] | None = None
        #: Reloads since the start by how they ended, and when the config was read at start,
        #: for the metrics.
        self.reload_results = {"applied": 0, "rejected": 0}
        self._loaded_at = time.time()
        #: The state directory, held locked while this daemon serves (None with DHCP off).
        self._state_lock: StateDirLock | None = None
        #: Why this daemon may not start: another holds the state directory. Said once the
        #: sockets are open, so that one on the same sockets too is told about them first.
        self._state_taken: str | None = None

    # -- what should be forwarded -------------------------------------------------------------
    def wanted_rules(self, config: Config | None = None) -> list[Rule]:
        return [*(config or self.config).rules, *self.cli_rules, *self.runtime_rules.values()]

    def _check_target(self, rule: Rule) -> None:
        """With DHCP off, a target name can only come from [hosts]; any other would leave the
        rule pending for good. (The config file's own rules are checked when it is loaded.)"""
        if rule.target_is_name and not self.sources.dhcp and rule.target_host not in self.config.hosts:
            raise ValueError(f"{rule.target_host!r} is not in [hosts] and DHCP names are off ([sources] dhcp = false)")

    def _engine_settings(self) -> EngineSettings:
        return _overridden(self.config.engine, workers=self.overrides.workers, busy_poll_us=self.overrides.busy_poll_us)

    def _control_settings(self, config: Config) -> ControlSettings:
        o = self.overrides
        return _overridden(config.control, control_socket=o.control_socket, lease_socket=o.lease_socket,
                           state_dir=o.state_dir)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Forwarder:
        """Start forwarding every wanted rule; a rule that cannot listen, or lease state that
        cannot be read, is a DaemonError. A reload asked for meanwhile waits until this is done."""
        async with self._lock:
            for rule in self.cli_rules:
                try:
                    self._check_target(rule)
                except ValueError as exc:
                    raise SettingsError(f"cannot forward {rule}: {exc}") from None
            if self.config.sources.dhcp:  # with DHCP off, leases from an earlier run must not resolve names
                state = Path(self.control.state_dir) / STATE_FILE
                try:
                    self._state_lock = StateDirLock(state.parent)
                    self._state_taken = self._state_lock.take()
                    if self._state_taken is None:  # else another daemon's: not read, not touched
                        self.leases = LeaseTable.restore(state, save_delay=LEASE_SAVE_DELAY)
                except OSError as exc:
                    raise DaemonError(f"lease state {state}: {_reason(exc)}") from None
                if self.sources.dhcp_lease_file:  # what dnsmasq granted or took back while this was down
                    await apply_lease_file(self.leases, self.sources.dhcp_lease_file)
            self._names = resolve_names(self.config.hosts, self.leases)
            engine = self._engine_settings()
            fw = Forwarder(workers=engine.workers, pipe_size=engine.pipe_size, busy_poll_us=engine.busy_poll_us,
                           hosts=self._names)
            try:
                await fw.start()
            except ImportError as exc:
                raise DaemonError(f"the data-plane engine is not built ({exc}); "
                                  "run: python setup.py build_ext --inplace") from None
            except OSError as exc:  # threads, epoll sets, eventfds: the system's limits
                raise DaemonError(f"cannot start the engine: {_reason(exc)}") from None
            # With the state directory another daemon's, this one refuses once its sockets are
            # checked (see _serve): it takes no port meanwhile, nor forwards for a moment.
            for rule in self.wanted_rules() if self._state_taken is None else ():
                try:
                    await fw.add(rule)  # one by one, so a failure names its rule
                except ValueError as exc:  # rules that clash with each other; the message names them
                    await fw.close()
                    raise SettingsError(f"cannot forward {exc}") from None
                except OSError as exc:
                    await fw.close()
                    raise DaemonError(f"cannot forward {rule}: {_reason(exc)}") from None
            self.cli_rules = [a.bound for a in fw.rules if a.rule in self.cli_rules]
            self.fw = fw
            # A name typed for a DNS name would otherwise just sit pending, said only at INFO.
            # A host booting before its VMs has hundreds: they are one line then.
            missing = sorted({r.target_host for r in self.wanted_rules() if r.target_is_name}
                             - self._names.keys() - self.config.hosts.keys())
            if len(missing) > _UNKNOWN_ONE_BY_ONE:
                log.warning("%d target names have no address (%s and %d more): not in [hosts] and no DHCP lease "
                            "names them yet (names are not looked up in DNS); their rules refuse connections "
                            "until then", len(missing), ", ".join(map(repr, missing[:_UNKNOWN_ONE_BY_ONE])),
                            len(missing) - _UNKNOWN_ONE_BY_ONE)
            else:
                for name in missing:
                    log.warning("target %r has no address: it is not in [hosts] and no DHCP lease names it yet "
                                "(names are not looked up in DNS); its rules refuse connections until then", name)
            return fw

    async def run(self, early_hup: Callable[[], bool] | None = None,
                  interrupted: Callable[[], bool] | None = None) -> int:
        """Serve until stopped by a signal. Returns the exit status.

        ``early_hup`` tells whether a SIGHUP came before this handles the signals itself (see
        cli); the daemon reloads once it is up, as that SIGHUP asked. ``interrupted`` tells
        whether a SIGINT came before (its KeyboardInterrupt may have been lost): the start is
        abandoned with KeyboardInterrupt."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        signals = {signal.SIGHUP: self._on_hup, signal.SIGTERM: self._on_term, signal.SIGINT: self._on_int}
        before = {sig: signal.getsignal(sig) for sig in signals}
        for sig, handler in signals.items():
            loop.add_signal_handler(sig, handler)
        try:
            if interrupted is not None and interrupted():
                raise KeyboardInterrupt
            with _logs_held_until_started():
                fw = await self.start()
                try:
                    servers = await self._serve()
                except BaseException:
                    await fw.close()
                    raise
            if early_hup is not None and early_hup():
                self._on_hup()  # before the watcher starts: this reload is the first applied
            tasks = [_background(self._watch(), "the config file watcher")] if self.path else []
            if self.config.sources.neighbours:
                tasks.append(_background(self._watch_neighbours(), "the neighbour-table source"))
            tasks.append(_background(self._log_failures(), "the failure summary"))
            busy_poll_us = self._engine_settings().busy_poll_us
            log.info("fastfwd started: %d rule(s), %d worker(s)%s%s", len(fw.rules), fw.workers,
                     f", busy polling {busy_poll_us} us" if busy_poll_us else "",
                     f", watching {self.path}" if self.path else "")
            self._up = True
            self._ready()
            if (interval := watchdog_interval()) is not None:
                tasks.append(_background(_feed_watchdog(interval), "the systemd watchdog"))
            how = await self._stop
            notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # A SIGHUP reload under way finishes (cancelling it could leave a rule half applied);
            # one still waiting for the lock sees the stop and does nothing.
            await asyncio.gather(*self._reloads, return_exceptions=True)
            await _close_all(servers)
            # Nothing changes the leases any more: a new daemon may take them over while
            # this one drains.
            self._let_go_of_state_dir()
            async with self._lock:  # a reload under way finishes before the engine goes
                await self._shutdown(fw, how)
        finally:
            self._let_go_of_state_dir()
            for sig in signals:
                loop.remove_signal_handler(sig)  # which leaves the default action: put back the one before
                if before[sig] is not None:
                    signal.signal(sig, before[sig])
        return 0

    def _let_go_of_state_dir(self) -> None:
        """Save the leases for the last time and unlock the state directory, removing the
        directories made for it if they are empty; this daemon writes no more there. (Only a
        daemon holding it has a lease table bound to a state file.)"""
        if self._state_lock is None or not self._state_lock.held:
            return
        self.leases.flush()  # however the run ends, what it learnt is on disk
        self.leases.state_file = None
        self._state_lock.release()

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.done()

    def stop(self, how: str = "now") -> None:
        """Ask ``run`` to end: ``drain`` waits for live connections, ``now`` does not."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(how)

    async def _shutdown(self, fw: Forwarder, how: str) -> None:
        if how == "drain" and not self._hurried:
            deadline = self.control.drain_deadline
            self._draining = asyncio.ensure_future(fw.close(drain=deadline))
            # The forwarder closes every listener before it first waits (8,000 take about half
            # a second): only then may a new daemon take the ports, which this line tells it.
            await asyncio.sleep(0)
            log.info("draining: no new connections, waiting up to %gs for live ones", deadline)
            await asyncio.wait([self._draining])
            if self._draining.cancelled():
                log.info("stopping now: live connections closed")
        await fw.close()
        log.info("fastfwd stopped")

    def _on_hup(self) -> None:
        task = _background(self._hup(), "a SIGHUP reload")
        self._reloads.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._reloads.discard)

    async def _hup(self) -> Diff | None:
        # dnsmasq's lease file first: SIGHUP is how a running daemon catches up on lost events.
        # One during the start is left out: the start reads the file itself.
        if self.sources.dhcp_lease_file and self.fw is not None and not self._stopping:
            await reread_lease_file(self.leases, self.sources.dhcp_lease_file, self.leases_changed,
                                    self._lease_lock)
        return await self.reload("SIGHUP")

    def _on_term(self) -> None:
        if self._stopping:
            self._hurry()  # the second SIGTERM: stop at once
        self.stop("drain")

    def _on_int(self) -> None:
        self._hurry()
        self.stop("now")

    def _hurry(self) -> None:
        # The drain begins only once a reload or lease change under way is done; a signal
        # that comes before must not be lost, or the drain would run its whole deadline.
        self._hurried = True
        if self._draining is not None:
            self._draining.cancel()

    # -- reloading ----------------------------------------------------------------------------
    async def reload(self, why: str = "reload", expect: str | None = None) -> Diff | None:
        """Re-read the config file and apply it as a diff. On any problem, log it and change
        nothing (returns None). ``expect`` is the fingerprint of the content the watcher saw
        finished; a file that reads otherwise now is being written again, and is left to the
        watcher to hand over once that write is finished too."""
        # A service manager waiting on the reload (systemctl reload of a Type=notify-reload
        # unit) hears when it is over, whether it applied or not, or there was nothing to read.
        announce = self._up and not self._stopping
        if announce:
            reloading()
        try:
            return await self._reload(why, expect)
        finally:
            if announce and not self._stopping:
                self._ready()

    def _ready(self) -> None:
        assert self.fw is not None
        notify("READY=1", f"STATUS=forwarding {len(self.fw.rules)} rule(s)")

    async def _reload(self, why: str, expect: str | None) -> Diff | None:
        if self.path is None:
            log.info("%s: no config file, nothing to reload", why)
            return None
        # One reload at a time, in the order asked. The file is parsed before the rule table's
        # lock is taken and off the event loop: thousands of rules take most of a second to
        # parse, and lease events, the control socket and the watchdog must not wait for it.
        async with self._reload_lock:
            if not _reads_at_once(self.path):
                # A FIFO (`-c <(...)`): opened again, it would wait for a writer that may never come.
                log.error("%s: %s is not a regular file, rules unchanged (a pipe is read once, at start)",
                          why, self.path)
                self._reloaded("not a regular file (a pipe is read once, at start)")
                return None
            try:
                config = await asyncio.to_thread(load_config, self.path)
            except ConfigError as exc:
                # A bad edit to a large file (a [hosts] name renamed) can break thousands of
                # entries, and a watched file is reloaded at every save.
                for error in exc.errors[:LOGGED_CONFIG_ERRORS]:
                    log.error("%s: %s: %s", why, exc.source, error)
                unlogged = len(exc.errors) - LOGGED_CONFIG_ERRORS
                if unlogged > 0:
                    log.error("%s: %s: %d more problems ('fastfwd check %s' lists them all)",
                              why, exc.source, unlogged, self.path)
                log.error("%s: %s rejected, rules unchanged", why, exc.source)
                more = len(exc.errors) - 1
                where = "in the log" if unlogged <= 0 else "'fastfwd check' lists them all"
                self._reloaded(exc.errors[0] + (f" (and {more} more, {where})" if more else ""))
                return None
            async with self._lock:
                if self.fw is None or self._stopping:
                    log.info("%s: not forwarding (start failed or stopping), nothing to reload", why)
                    return None
                return await self._apply(why, config, expect)

    async def _apply(self, why: str, config: Config, expect: str | None) -> Diff | None:
        """Apply a reloaded ``config`` as a diff; under the rule table's lock."""
        assert self.fw is not None and self.path is not None
        if expect is not None and config.digest != expect:
            log.info("%s: %s changed again while being read: waiting for it to be finished", why, self.path)
            return None
        if config.digest == _EMPTY:
            # What `: > FILE` leaves until the next command fills it: applied, it would
            # close every listener in between. A file meant to forward nothing says so.
            log.warning("%s: %s is empty: the running rules stay (to forward nothing, write a comment in it)",
                        why, self.path)
            self._reloaded("the file is empty (to forward nothing, write a comment in it)")
            return None
        if (config.engine, self._control_settings(config), config.sources) != (
                self.config.engine, self.control, self.config.sources):
            log.warning("%s: [engine], [control] and [sources] changes take effect at the next start", why)
        taken = self._takes_kept_ports(config)
        if taken is not None:
            self._rejected(why, taken)
            return None
        # Names the new file brings are known before its rules change: a rule re-pointed
        # to one would otherwise go pending until the _resolve below, closing its
        # listener and resetting the connections waiting in its accept queue.
        await self._resolve(config.hosts, new_only=True)
        try:
            diff = await self.fw.apply(self.wanted_rules(config))
        except (OSError, ValueError) as exc:
            await self._resolve()  # the names of the file still running
            fresh = [str(r) for r in self.wanted_rules(config) if self.fw.find(r) is None]
            self._rejected(why, f"{_reason(exc)} (new: {'; '.join(fresh) or 'none'})")
            return None
        self.config = config
        self._reloaded(None)
        await self._resolve()
        log.info("%s: %s applied: %d added, %d removed, %d re-pointed, %d reconfigured, %d unchanged",
                 why, self.path, len(diff.added), len(diff.removed), len(diff.retargeted),
                 len(diff.reconfigured), len(diff.unchanged))
        return diff

    def _takes_kept_ports(self, config: Config) -> str | None:
        """Why ``config`` cannot run beside the rules a reload keeps (the command line's and
        the control socket's): one of its rules has exactly the ports of one of those. The
        forwarder would see one rule listed twice, and name neither where it came from."""
        kept = {r.key: r for r in (*self.cli_rules, *self.runtime_rules.values()) if r.listen_port}
        rule = next((r for r in config.rules if r.key in kept), None)
        if rule is None:
            return None
        other = kept[rule.key]
        where = "given on the command line" if other in self.cli_rules else "added through the control socket"
        return f"{rule} takes the ports of {other}, a rule {where}"

    def _rejected(self, why: str, error: str) -> None:
        log.error("%s: %s rejected, rules unchanged: %s", why, self.path, error)
        self._reloaded(error)

    def _reloaded(self, error: str | None) -> None:
        """Record for status how this reload ended: applied (no ``error``) or why not."""
        self.last_reload = {"at": time.time(), "applied": error is None, "error": error}
        self.reload_results["applied" if error is None else "rejected"] += 1

    async def _watch(self) -> None:
        assert self.path is not None
        # From the file the running rules came from: an edit saved while the daemon was
        # starting (after the file was read, before this watch) would otherwise never apply.
        async for digest in watch_config(self.path, since=self.config.digest):
            await self.reload("config changed", expect=digest)

    # -- leases and names ---------------------------------------------------------------------
    async def leases_changed(self, changes: list[LeaseChange]) -> None:
        """The lease sources' callback once the table changed (each logs the leases itself):
        re-point every name whose address moved, so that when this returns (and the lease
        socket replies), the affected rules already forward to their new targets. Only the
        names the changed leases carry or their MACs stand for are looked at: an event costs
        the same however many leases and names there are."""
        macs = {lease.mac for change in changes for lease in (change.old, change.new) if lease is not None}
        names = {lease.hostname for change in changes for lease in (change.old, change.new)
                 if lease is not None and lease.hostname is not None}
        async with self._lock:
            by_mac = self._host_names_by_mac()
            await self._resolve(only=names.union(*(by_mac.get(mac, ()) for mac in macs)))

    def _host_names_by_mac(self) -> dict[str, set[str]]:
        hosts, by_mac = self._hosts_by_mac
        if hosts is not self.config.hosts:  # the config was reloaded since
            by_mac = {}
            for name, entry in self.config.hosts.items():
                if entry.mac is not None:
                    by_mac.setdefault(entry.mac, set()).add(name)
            self._hosts_by_mac = (self.config.hosts, by_mac)
        return by_mac

    async def _watch_neighbours(self) -> None:
        """Addresses of static VMs from the kernel's neighbour table, into the lease table;
        only the MACs of [hosts] entries count, so other machines on the bridge stay out."""
        from .host.neighbours import feed_neighbours

        def macs() -> set[str]:
            return {entry.mac for entry in self.config.hosts.values() if entry.mac}
        await feed_neighbours(self.leases, self.leases_changed, macs=macs, lock=self._lease_lock)

    async def _resolve(self, hosts: Mapping[str, HostEntry] | None = None, *, new_only: bool = False,
                       only: Iterable[str] | None = None) -> None:
        """Tell the forwarder the names' addresses under ``hosts`` (default: the running
        config's). With ``new_only``, only names without an address so far are added; with
        ``only``, only those names are looked at."""
        assert self.fw is not None
        hosts = self.config.hosts if hosts is None else hosts
        # Names whose address is unchanged are given again, except when only new ones are
        # wanted: a rule still pending on one (its port was taken, or it cannot use the
        # address) is tried again at each lease event for the name and at each reload.
        if only is not None:
            updates = {name: resolve_name(name, hosts, self.leases) for name in sorted(only)}
        elif new_only:
            updates = name_updates(self._names, {**resolve_names(hosts, self.leases), **self._names})
        else:
            names = resolve_names(hosts, self.leases)
            updates = {**names, **name_updates(self._names, names)}
        for name, ip in updates.items():
            moved = self._names.get(name) != ip
            touched = await self.fw.resolve(name, ip)
            if ip is None:
                self._names.pop(name, None)
            else:
                self._names[name] = ip
            if moved or touched:
                log.info("name %s is now %s (%d rule(s))", name, ip or "unknown, its rules are pending", len(touched))

    # -- what the control socket asks (control.ControlTarget) ---------------------------------
    @property
    def rules(self) -> list[ActiveRule]:
        return self.fw.rules if self.fw is not None else []

    def counters(self, rule: ActiveRule) -> Counters:
        assert self.fw is not None
        return self.fw.counters(rule)

    @property
    def engine(self) -> dict[str, int]:
        return self.fw.settings if self.fw is not None else {}

    @property
    def reload_status(self) -> dict[str, Any] | None:
        return None if self.path is None else {"file": str(self.path), "last_reload": self.last_reload}

    def sessions(self, rule: ActiveRule) -> list[tuple[str, int]]:
        assert self.fw is not None
        return self.fw.sessions(rule)

    async def add_rule(self, rule: Rule) -> ActiveRule:
        assert self.fw is not None
        self._check_target(rule)
        async with self._lock:
            active = await self.fw.add(rule)
            self.runtime_rules[active.bound.key] = active.bound
            return active

    async def remove_rule(self, rule: Rule) -> None:
        """Remove a rule added at run time. Rules of the config file or the command line are
        refused: the next reload would bring them back, so removing them would only mislead."""
        assert self.fw is not None
        async with self._lock:  # looked up under the lock: a concurrent remove may have won
            active = self.fw.find(rule)
            if active is None:
                raise KeyError(str(rule))
            key = active.bound.key
            if key not in self.runtime_rules:
                raise ValueError(f"{active.rule} comes from the config file or the command line; edit those instead")
            await self.fw.remove(active)
            del self.runtime_rules[key]

    async def metrics(self) -> str:
        from .metrics import scrape

        assert self.fw is not None
        return (await scrape(self.fw, self._reload_reading())).decode()

    def _reload_reading(self) -> ReloadReading | None:
        """The reload outcome for the metrics; None without a config file (nothing to reload).
        Before any reload, the file read at start counts as the last load, applied."""
        from .metrics import ReloadReading

        if self.path is None:
            return None
        last = self.last_reload
        return ReloadReading(successful=last is None or last["applied"],
                             at=self._loaded_at if last is None else last["at"], **self.reload_results)

    async def _log_failures(self) -> None:
        """Every FAILURE_LOG_INTERVAL, one warning for each rule whose failure counters rose,
        with how much: the counters alone would let 10,000 refused connects pass unseen."""
        assert self.fw is not None
        seen: dict[ActiveRule, tuple[int, ...]] = {}
        zero = (0,) * len(FAILURE_COUNTERS)
        while True:
            interval = FAILURE_LOG_INTERVAL
            await asyncio.sleep(interval)
            now = {}
            async for active in in_turns(self.fw.rules):  # thousands of rules: others are served between slices
                if not active.installed:
                    continue
                counters = self.fw.counters(active)
                now[active] = values = tuple(getattr(counters, name) for name in FAILURE_COUNTERS)
                rose = [f"{name} +{v - was}" for name, v, was in zip(FAILURE_COUNTERS, values, seen.get(active, zero),
                                                                    strict=True) if v > was]
                if rose:
                    log.warning("failures on rule %r in the last %gs: %s", rule_label(active), interval, ", ".join(rose))
            seen = now  # a rule removed is forgotten; one added back starts again at 0

    # -- servers ------------------------------------------------------------------------------
    async def _serve(self) -> list[JsonLineServer | asyncio.AbstractServer]:
        """The control socket, the lease socket (unless DHCP is off) and the optional metrics
        HTTP endpoint. A failure to open any of them is a DaemonError."""
        assert self.fw is not None
        c = self.control
        try:
            access = Access.from_names(c.allow_users, c.allow_groups)
        except UnknownName as exc:  # only the config file names users and groups
            raise SettingsError(f"{self.path}: control.allow_{exc.kind}s: {exc}") from None
        servers: list[JsonLineServer | asyncio.AbstractServer] = []
        units: list[JsonLineServer] = [ControlServer(c.control_socket, self, access=access)]
        if self.config.sources.dhcp:
            if os.path.abspath(c.control_socket) == os.path.abspath(c.lease_socket):
                # Else the second socket finds the first listening there, "another process".
                raise SettingsError(f"control_socket and lease_socket are both {os.path.abspath(c.lease_socket)}: "
                                    "give each its own path")
            units.append(LeaseServer(c.lease_socket, self.leases, self.leases_changed, access=access,
                                     lock=self._lease_lock, lease_file=self.sources.dhcp_lease_file))
        for unit in units:
            try:
                await unit.start()
            except OSError as exc:
                await _close_all(servers)
                raise DaemonError(f"{unit.path}: {_reason(exc)}") from None
            servers.append(unit)
        if self._state_taken is not None:
            await _close_all(servers)
            raise DaemonError(self._state_taken)
        if c.metrics_listen:
            from .metrics import serve_http

            host, port = split_hostports(c.metrics_listen)
            try:
                servers.append(await serve_http(self.fw, host, int(port), self._reload_reading))
            except OSError as exc:
                await _close_all(servers)
                # asyncio's message repeats the address as a tuple: the errno alone says it.
                why = os.strerror(exc.errno) if exc.errno else _reason(exc)
                raise DaemonError(f"metrics_listen {c.metrics_listen}: {why}") from None
        return servers


async def _feed_watchdog(interval: float) -> None:
    # Sent from the event loop, so a loop that is blocked stops the pings and the service
    # manager restarts the daemon.
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _reads_at_once(path: Path) -> bool:
    """Whether reading ``path`` ends at once: a pipe's read would wait for a writer. A
    directory counts, load_config saying what is wrong with it, as with a missing file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return True  # load_config tells what is wrong
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def _background(coro: Coroutine[Any, Any, _T], what: str) -> asyncio.Task[_T]:
    """A task of its own; if it ends on an error, the log says so at once instead of the
    error waiting, unseen, for the shutdown to collect it."""
    def ended(task: asyncio.Task[_T]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("%s stopped: %s", what, _reason(exc), exc_info=exc)
    task = asyncio.create_task(coro)
    task.add_done_callback(ended)
    return task


@contextlib.contextmanager
def _logs_held_until_started() -> Iterator[None]:
    """Hold log lines back until startup succeeds: a failed start shows only its one error line."""
    root = logging.getLogger()
    handlers, held = root.handlers[:], logging.handlers.BufferingHandler(capacity=1 << 30)
    root.handlers = [held]
    started = False
    try:
        yield
        started = True
    finally:
        root.handlers = handlers
        for record in held.buffer if started else ():
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


async def _close_all(servers: Iterable[JsonLineServer | asyncio.AbstractServer]) -> None:
    # Last started, first closed: a directory the first socket made is empty by its turn.
    for server in reversed(list(servers)):
        if isinstance(server, JsonLineServer):
            await server.close()
        else:
            server.close()


_Settings = TypeVar("_Settings", EngineSettings, ControlSettings)


def _overridden(settings: _Settings, **given: Any) -> _Settings:
    """``settings`` with the values the command line gave (None: not given)."""
    return dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def run_daemon(config: Config, config_path: str | Path | None, cli_rules: Iterable[Rule],
               overrides: Overrides = Overrides(), early_hup: Callable[[], bool] | None = None,
               interrupted: Callable[[], bool] | None = None) -> int:
    """Run the daemon on uvloop until a signal stops it; returns the exit status. See
    ``Daemon.run`` for ``early_hup`` and ``interrupted``."""
    return uvloop.run(Daemon(config, config_path, cli_rules, overrides).run(early_hup, interrupted))
