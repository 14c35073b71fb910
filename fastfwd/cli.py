"""The ``fastfwd`` command: run the daemon, check a config, query status, feed leases, DHCP hook.

Every failure ends in one line on stderr naming the problem, never a traceback. Exit status:
0 done; 1 it could not be done (a port in use, no permission, no daemon, a refusal); 2 the
command line or the config file is wrong; 130 interrupted (Ctrl-C) before the daemon was up.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import __version__
from .config import (
    Config,
    ConfigError,
    ControlSettings,
    load_config,
    parse_engine_settings,
    parse_rule_options,
)
from .engine_settings import MAX_WORKERS
from .rules import DEFAULT_LISTEN, Proto, Rule, RuleOptions, SpecError
from .unixclient import Parser, timeout_arg

SPEC_HELP = f"""\
port specs:
  [ADDR:]PORT[-END]:HOST:PORT[-END]
    ADDR   where to listen; without it, {DEFAULT_LISTEN} (loopback only), so a quick forward
           never publishes a port by surprise. Say 0.0.0.0:PORT (or [::]:PORT) to publish.
    HOST   an IPv4/IPv6 address, or a name resolved through [hosts] or DHCP leases (not DNS).
    PORT-END  a range, mapped one to one onto a target range of the same length.
  IPv6 addresses go in brackets.

examples:
  fastfwd run -t 8080:127.0.0.1:80                       loopback 8080 -> local web server
  fastfwd run -t 0.0.0.0:2222:192.168.122.10:22          publish SSH of a VM
  fastfwd run -t 127.0.0.1:8000-8099:10.0.0.2:9000-9099  100 ports as one rule
  fastfwd run -u [::1]:5353:[::1]:53                     UDP over IPv6
  fastfwd run -c /etc/fastfwd/fastfwd.toml               rules from a watched config file
  fastfwd check /etc/fastfwd/fastfwd.toml                validate without running
  fastfwd status --json

exit status: 0 done; 1 it could not be done (a port in use, no permission, no daemon, a
refusal); 2 a bad command line or config file.
"""

_DEFAULT_SOCKETS = "default: [control] in the config, else /run/fastfwd (root) or $XDG_RUNTIME_DIR/fastfwd"
_T = TypeVar("_T")


class UsageError(Exception):
    """The command line or config file is wrong: one line and exit status 2."""


class Failed(Exception):
    """What was asked could not be done (a port in use, no daemon, a refusal): one line and
    exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastfwd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="High-performance TCP/UDP port forwarder for Linux.", epilog=SPEC_HELP)
    parser.add_argument("--version", action="version", version=f"fastfwd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="forward ports until SIGTERM (drain) or SIGINT", epilog=SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Forward ports from a config file, from -t/-u specs, or both.\n\n"
                    "The config file is watched and reloaded on change and on SIGHUP: a bad file is\n"
                    "logged and changes nothing; a good one is applied as a diff that leaves\n"
                    "unchanged rules and their connections alone. SIGTERM stops accepting and lets\n"
                    "live connections finish (up to [control] drain_deadline, then exit 0); a second\n"
                    "SIGTERM, or SIGINT, stops at once. A bad spec or config exits 2, a port in use\n"
                    "or any other failure to start exits 1, with one line naming the problem.")
    run.add_argument("-c", "--config", metavar="FILE", help="TOML config file (see docs/config.md)")
    run.add_argument("-t", "--tcp", metavar="SPEC", action="append", default=[], help="forward TCP (repeatable)")
    run.add_argument("-u", "--udp", metavar="SPEC", action="append", default=[], help="forward UDP (repeatable)")
    run.add_argument("--workers", type=int, metavar="N", help=f"worker threads, 1-{MAX_WORKERS} (default: [engine] workers, else one per CPU)")
    run.add_argument("--splice", metavar="MODE",
                     help="how the -t rules move bytes: 'auto' copies short exchanges and moves a direction "
                          f"to splice(2) once it has carried {RuleOptions.splice_threshold // 1024} KiB, "
                          "'always' splices from the first byte, 'never' always copies "
                          f"(default: {RuleOptions.splice}; in a config file, the 'splice' key)")
    run.add_argument("--busy-poll-us", metavar="N",
                     help="after traffic, workers poll again for N microseconds (0-1000000) before "
                          "sleeping: lower latency for CPU time (default: [engine] busy_poll_us, else 0: off)")
    run.add_argument("--control-socket", metavar="PATH", help=f"control socket ({_DEFAULT_SOCKETS})")
    run.add_argument("--lease-socket", metavar="PATH", help=f"lease socket ({_DEFAULT_SOCKETS})")
    run.add_argument("--state-dir", metavar="DIR", help="where leases persist (default: [control] state_dir, else "
                                                          "/var/lib/fastfwd (root) or $XDG_STATE_HOME/fastfwd)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log to stderr from this level on (default: info)")
    run.set_defaults(func=_run)

    check = sub.add_parser(
        "check", help="validate a config file and list every problem",
        description="Validate a config file completely without running anything. Every problem is\n"
                    "printed on its own line, naming the key path (forward[3].listen: ...).\n"
                    "Exit status: 0 valid, 2 otherwise.\n\n"
                    "example: fastfwd check /etc/fastfwd/fastfwd.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("file", metavar="FILE", help="the TOML config file (see docs/config.md)")
    check.set_defaults(func=_check)

    status = sub.add_parser(
        "status", help="rules (active/pending), counters and leases of a running daemon",
        description="Ask a running daemon over its control socket for its rules (active, or pending\n"
                    "while a target name has no address), their counters, and the leases it knows.\n"
                    "Exit status: 0 done; 1 the daemon could not be reached or refused; 2 bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_daemon_socket_args("control")])
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--sessions", action="store_true", help="also list each UDP rule's client addresses")
    status.add_argument("--pending", action="store_true", help="only the rules whose target has no address yet")
    status.add_argument("rules", nargs="*", metavar="RULE",
                        help="only these rules (and the leases of their targets): a rule's name, a port it "
                             "listens on, or its target's name or address; one that matches none is an error")
    status.set_defaults(func=_status)

    lease = sub.add_parser(
        "lease", help="send a lease event or snapshot to a running daemon by hand",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tell a running daemon about a DHCP lease, as the dnsmasq hook does. The reply\n"
                    "comes once the rules that follow the lease forward to its address.\n"
                    "Exit status: 0 done; 1 the daemon could not be reached or refused; 2 bad arguments.",
        epilog="examples:\n  fastfwd lease add 52:54:00:12:34:56 192.168.122.10 vm1\n"
               "  fastfwd lease del 52:54:00:12:34:56 192.168.122.10\n"
               "  fastfwd lease snapshot 52:54:00:12:34:56=192.168.122.10=vm1 ...\n")
    common = _daemon_socket_args("lease")
    common.add_argument("--scope", metavar="NAME",
                        help="the DHCP server the lease comes from, where several feed the daemon: a "
                             "snapshot replaces that server's leases only (default: none, the unnamed one)")
    lsub = lease.add_subparsers(dest="action", required=True, metavar="ACTION", help="what to send")
    events = {
        "add": "MAC now holds IP (a new lease): rules that follow the MAC, or HOSTNAME, forward to IP\n"
               "once this returns.\n\nexample: fastfwd lease add 52:54:00:12:34:56 192.168.122.10 vm1",
        "old": "A lease the DHCP server already had (it sends these when it starts): the same as add.\n\n"
               "example: fastfwd lease old 52:54:00:12:34:56 192.168.122.10 vm1",
        "del": "MAC's lease on IP ended (one for an address MAC no longer holds changes nothing): with\n"
               "no other address for it, the rules that follow it go pending, their ports refusing\n"
               "connections.\n\n"
               "example: fastfwd lease del 52:54:00:12:34:56 192.168.122.10",
    }
    for action, description in events.items():
        ev = lsub.add_parser(action, help=f"a DHCP '{action}' event", description=description, parents=[common],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        ev.add_argument("mac", metavar="MAC", help="six hex pairs with colons, like 52:54:00:12:34:56")
        ev.add_argument("ip", metavar="IP", help="the leased IPv4 or IPv6 address")
        ev.add_argument("hostname", metavar="HOSTNAME", nargs="?", help="the host name the guest gave, if any")
    snap = lsub.add_parser("snapshot", help="all the DHCP leases; DHCP leases not listed are gone",
                           parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Every DHCP lease there is: the daemon adds those it lacks and drops the DHCP\n"
                                       "leases not listed (leases from the neighbour table stay).\n\n"
                                       "example: fastfwd lease snapshot 52:54:00:12:34:56=192.168.122.10=vm1 "
                                       "52:54:00:12:34:57=192.168.122.11")
    snap.add_argument("--family", type=int, choices=(4, 6),
                      help="the snapshot covers this IP version only; the other's leases stay (default: both)")
    snap.add_argument("leases", nargs="*", metavar="MAC=IP[=HOSTNAME]", help="one per lease; none: there are none")
    lease.set_defaults(func=_lease)

    # Listed for --help only: main() hands "hook ..." to fastfwd.hook before parsing.
    sub.add_parser("hook", help="dnsmasq --dhcp-script entry point (add|old|del MAC IP [HOSTNAME]; see hook --help)")
    return parser


def _daemon_socket_args(which: str) -> Parser:
    """The options of a command that asks a running daemon on its ``which`` socket."""
    args = Parser(add_help=False)
    # --WHICH-socket too: the name `fastfwd run` gives the same path.
    args.add_argument("--socket", f"--{which}-socket", dest="socket", metavar="PATH",
                      help=f"{which} socket ({_DEFAULT_SOCKETS})")
    args.add_argument("-c", "--config", metavar="FILE", help="take the socket path from this config file")
    args.add_argument("--timeout", type=timeout_arg, default=10.0, metavar="SECONDS",
                      help="seconds to wait for the reply (default: 10)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C anywhere before the daemon handles SIGINT itself
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["hook"]:
        # dnsmasq's arguments go to the hook untouched (argparse would claim its options).
        from .hook import main as hook_main

        return hook_main(argv[1:])
    parser = build_parser()
    if not argv:  # the user asks what to do: the commands and examples, not a bare error
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastfwd: {exc}", file=sys.stderr)
        return 2
    except Failed as exc:
        print(f"fastfwd: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # one line per problem, each naming the file and key path
        return 2


def cli_rules(tcp: Sequence[str], udp: Sequence[str], options: RuleOptions | None = None) -> list[Rule]:
    """Rules from -t/-u specs, with ``options``; a bad spec is a UsageError naming the flag and
    the problem."""
    rules = []
    kinds: tuple[tuple[str, Proto, Sequence[str]], ...] = (("-t", "tcp", tcp), ("-u", "udp", udp))
    for flag, proto, specs in kinds:
        for spec in specs:
            try:
                rules.append(Rule.parse(spec, proto, options=options))
            except SpecError as exc:  # its message starts with the spec
                raise UsageError(f"{flag} {exc}") from None
    return rules


def _run(args: argparse.Namespace) -> int:
    options, busy_poll_us = _run_settings(args)
    rules = cli_rules(args.tcp, args.udp, options)
    if not rules and not args.config:
        raise UsageError("nothing to forward: give -c FILE and/or -t/-u SPEC (see fastfwd run --help)")
    if args.workers is not None:
        _checked("--workers", lambda: parse_engine_settings({"workers": args.workers}))
    # Until the daemon handles SIGHUP (a reload), its default action would kill the process,
    # and a service manager may send one as soon as it started us: from here on, through the
    # slow imports and the config load, one is recorded, and the daemon reloads once it is up.
    # A plain list, not a threading.Event: the next SIGHUP can enter the handler again while it
    # runs, and Event.set() would then wait for the lock it holds itself.
    early_hup: list[bool] = []
    before = signal.signal(signal.SIGHUP, lambda *_: early_hup.append(True) if not early_hup else None)
    # Ctrl-C raises KeyboardInterrupt wherever Python is; where that is a finalizer or one of
    # the import system's callbacks, Python reports it and drops it, and the start went on as
    # if nothing came. So it is recorded too, and the daemon looks once it handles SIGINT itself.
    interrupted: list[bool] = []

    def on_int(signum: int, frame: object) -> None:
        interrupted.append(True)
        raise KeyboardInterrupt
    before_int = signal.signal(signal.SIGINT, on_int)
    try:
        from .daemon import DaemonError, Overrides, SettingsError, run_daemon

        config = load_config(args.config) if args.config else Config(source="command line")
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
        overrides = Overrides(workers=args.workers, busy_poll_us=busy_poll_us, control_socket=args.control_socket,
                              lease_socket=args.lease_socket, state_dir=args.state_dir)
        try:
            return run_daemon(config, args.config, rules, overrides, lambda: bool(early_hup),
                              lambda: bool(interrupted))
        except SettingsError as exc:
            raise UsageError(str(exc)) from None
        except DaemonError as exc:
            raise Failed(str(exc)) from None
    finally:
        # Called in-process (tests, library users), the caller's handlers are theirs again.
        signal.signal(signal.SIGHUP, before)
        signal.signal(signal.SIGINT, before_int)


def _run_settings(args: argparse.Namespace) -> tuple[RuleOptions, int | None]:
    """The options of the command-line rules (--splice) and the busy polling (--busy-poll-us,
    None: not given), each checked as the config file's key is."""
    options = RuleOptions()
    if args.splice is not None:
        if not args.tcp:
            raise UsageError("--splice: it applies to -t rules and none is given "
                             "(in a config file, set 'splice' in [[forward]] or [defaults])")
        options = _checked("--splice", lambda: parse_rule_options({"splice": args.splice}))
    if args.busy_poll_us is None:
        return options, None
    # A number goes in as an integer, anything else as the string, which the check refuses in
    # its own words.
    value: int | str
    try:
        value = int(args.busy_poll_us)
    except ValueError:
        value = args.busy_poll_us
    return options, _checked("--busy-poll-us", lambda: parse_engine_settings({"busy_poll_us": value}).busy_poll_us)


def _checked(flag: str, check: Callable[[], _T]) -> _T:
    """``check()``, which validates a flag's value as the config file's key; its error (one,
    under the key's path) becomes a UsageError naming the flag instead."""
    try:
        return check()
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc.errors[0].partition(': ')[2]}") from None


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    names = sorted({r.target_host for r in config.rules if r.target_is_name})
    print(f"{args.file}: ok, {len(config.rules)} rule(s), {len(config.hosts)} host(s)"
          + (f", target names: {', '.join(names)}" if names else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    reply = _call(args.socket or _settings(args).control_socket,
                  {"cmd": "status", **({"sessions": True} if args.sessions else {})}, timeout=args.timeout)
    everything = reply.get("rules", [])
    unmatched: list[str] = []
    if args.rules or args.pending:
        reply, unmatched = select_rules(reply, args.rules, args.pending)
    print(json.dumps(reply, indent=2) if args.json else format_status(reply, of=everything))
    for text in unmatched:
        print(f"fastfwd: no rule matches {text!r}", file=sys.stderr)
    return 1 if unmatched else 0


def select_rules(reply: dict[str, Any], wanted: Sequence[str], pending: bool) -> tuple[dict[str, Any], list[str]]:
    """A ``status`` reply cut to the rules ``wanted`` names (all if none; only pending ones
    with ``pending``) and the leases of their addresses; and the names that matched no rule."""
    matched: set[str] = set()
    rules = []
    for rule in reply.get("rules", []):
        hits = [text for text in wanted if _rule_matches(rule, text)]
        matched.update(hits)
        if (hits or not wanted) and (rule["state"] == "pending" or not pending):
            rules.append(rule)
    addresses = {rule["target_ip"] for rule in rules}
    leases = [lease for lease in reply.get("leases", []) if lease["ip"] in addresses]
    return {**reply, "rules": rules, "leases": leases}, [text for text in wanted if text not in matched]


def _rule_matches(rule: dict[str, Any], text: str) -> bool:
    """Is ``text`` the rule's name, a port it listens on, or its target's name or address?"""
    first, _, last = rule["listen"].rpartition(":")[2].partition("-")
    host = rule["target"].rpartition(":")[0].strip("[]")
    return (text == rule["name"] or text == rule["target_ip"] or text.lower() == host.lower()
            or (text.isascii() and text.isdigit() and int(first) <= int(text) <= int(last or first)))


def _lease(args: argparse.Namespace) -> int:
    if args.action == "snapshot":
        leases = []
        for item in args.leases:
            mac, _, rest = item.partition("=")
            ip, _, hostname = rest.partition("=")
            if not mac or not ip:
                raise UsageError(f"snapshot entry {item!r}: expected MAC=IP[=HOSTNAME]")
            leases.append(_lease_fields(mac, ip, hostname or None, f"snapshot entry {item!r}: "))
        message: dict = {"snapshot": leases}
        if args.family is not None:
            message["family"] = args.family
    else:
        message = {"event": args.action, **_lease_fields(args.mac, args.ip, args.hostname)}
    if args.scope is not None:  # none: a daemon from before scopes takes the message too
        from .leases import normalize_scope

        message["scope"] = _lease_checked("", lambda: normalize_scope(args.scope))
    reply = _call(args.socket or _settings(args).lease_socket, message, timeout=args.timeout)
    print(f"ok, {reply['changed']} lease(s) changed; rules follow")
    return 0


def _lease_fields(mac: str, ip: str, hostname: str | None, where: str = "") -> dict[str, str | None]:
    """A lease's fields, checked here: a typo is a usage error, not a refusal from the daemon."""
    from .leases import held_address, normalize_hostname, normalize_mac

    def fields() -> dict[str, str | None]:
        # held_address, as the daemon checks it: 0.0.0.0, a multicast or the broadcast
        # address is as much a typo as a malformed one.
        return {"mac": normalize_mac(mac), "ip": held_address(ip),
                "hostname": normalize_hostname(hostname) if hostname is not None else None}
    return _lease_checked(where, fields)


def _lease_checked(where: str, check: Callable[[], _T]) -> _T:
    """``check()``, which validates a lease's fields; its LeaseError becomes a UsageError: a
    typo is the user's to mend, not a refusal from the daemon."""
    from .leases import LeaseError

    try:
        return check()
    except LeaseError as exc:
        raise UsageError(f"{where}{exc}") from None


def _settings(args: argparse.Namespace) -> ControlSettings:
    return load_config(args.config).control if args.config else ControlSettings()


def _call(path: str, message: dict, timeout: float) -> dict:
    """One request to a daemon socket; an unreachable daemon or an error reply is a Failed."""
    from .unixclient import DaemonError, call

    try:
        reply = call(path, message, timeout=timeout)
    except DaemonError as exc:
        raise Failed(str(exc)) from None
    if not reply["ok"]:
        raise Failed(f"refused: {reply.get('error')}")
    return reply


# -- fastfwd status: the control socket's status reply as tables ----------------------------------
def format_status(reply: dict[str, Any], now: float | None = None, of: list[dict[str, Any]] | None = None) -> str:
    """A ``status`` reply as the tables ``fastfwd status`` prints, ending with a count of the
    rules ``of`` (the reply's own by default; all of the daemon's when the reply holds a
    selection), so that the sum is seen after thousands of rows."""
    now = time.time() if now is None else now
    rows: list[tuple[str, ...]] = [("NAME", "PROTO", "LISTEN", "TARGET", "ADDRESS", "STATE", "CONNS", "ACCEPTED",
                                    "UP", "DOWN", "DGRAMS-UP", "DGRAMS-DOWN", "SESSIONS")]
    for r in reply.get("rules", []):
        c = r["counters"]
        # UP and DOWN are bytes for both protocols; connections are TCP's, datagrams and sessions UDP's.
        tcp = r["proto"] == "tcp"
        conns = (str(c["active"]), str(c["accepted"])) if tcp else ("-", "-")
        udp = ("-", "-", "-") if tcp else (str(c["datagrams_up"]), str(c["datagrams_down"]), str(c["sessions_active"]))
        rows.append((r["name"] or "-", r["proto"], r["listen"], r["target"], r["target_ip"] or "-", r["state"],
                     *conns, _bytes(c["bytes_up"]), _bytes(c["bytes_down"]), *udp))
    lease_rows: list[tuple[str, ...]] = [("MAC", "IP", "HOSTNAME", "SINCE")]  # held as it is, for how long
    for lease in reply.get("leases", []):
        lease_rows.append((lease["mac"], lease["ip"], lease["hostname"] or "-", _age(now - lease["seen"])))
    everything = reply.get("rules", []) if of is None else of
    shown = len(rows) - 1
    parts = [_table(rows) if shown else "no rules shown" if everything else "no rules",
             _table(lease_rows) if len(lease_rows) > 1 else "no leases"]
    if engine := reply.get("engine"):
        workers, poll = engine["workers"], engine["busy_poll_us"]
        parts.append(f"engine: {workers} worker{'s' * (workers != 1)}, pipes of {_bytes(engine['pipe_size'])}, "
                     + (f"busy polling {poll} us" if poll else "no busy polling"))
    if config := reply.get("config"):
        last = config["last_reload"]
        parts.append(f"config: {config['file']}, " + (
            "not reloaded since the start" if last is None else f"last reload {_age(now - last['at'])} "
            + ("applied" if last["applied"] else f"rejected (the rules from before run): {last['error']}")))
    if everything:
        protos, states = Counter(r["proto"] for r in everything), Counter(r["state"] for r in everything)
        parts.append(f"rules: {len(everything)} ({protos['tcp']} tcp, {protos['udp']} udp), {states['active']} active, "
                     f"{states['pending']} pending" + (f", {shown} shown" if shown != len(everything) else ""))
    return "\n\n".join(parts)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
