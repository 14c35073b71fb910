"""The DHCP hook: dnsmasq's ``--dhcp-script``, forwarding lease events to the lease socket.

dnsmasq runs it as ``SCRIPT add|old|del MAC IP [HOSTNAME]`` for each lease change (``old``
for leases it already had, at its start and on SIGHUP), and with other actions (``init``,
``tftp``, ``arp-add``, ``arp-del``, ``relay-snoop``, ...) that say nothing about leases: those
exit 0 at once (``init`` must print the lease database; printing nothing means "none").
For DHCPv6, dnsmasq passes the client's DUID where the MAC goes and the MAC, if known, in
``DNSMASQ_MAC``; a v6 lease with no known MAC cannot be keyed and is skipped with a note,
but its ``del`` is sent with the address alone (dnsmasq forgets v6 MACs when it restarts).

``SCRIPT snapshot LEASEFILE`` sends every IPv4 lease in a dnsmasq lease file as one IPv4
snapshot (for example after a restart of both), which the daemon reconciles against its
table; the IPv6 leases it holds are left alone. An empty lease file sends nothing (dnsmasq
empties it before writing it again).

Where several dnsmasq instances feed one daemon (one per bridge), each hook names its own with
``--scope NAME`` (or ``$FASTFWD_SCOPE``), which goes with its events and snapshots: a snapshot
then replaces only the leases that dnsmasq granted.

A daemon that is restarting (its socket missing or refusing) is tried again until the
timeout: dnsmasq never runs a failed script again.

Exit status: 0 done or ignored; 1 the daemon could not be reached in time or refused the
event (one line on stderr names the event and says why); 2 bad arguments; 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .lease_file import read_lease_file
from .leases import (EVENTS, LeaseError, client_hostname, held_address, normalize_mac,
                     normalize_scope)
from .unixclient import DaemonError, DaemonUnreachable, Parser, call, timeout_arg

SOCKET_ENV = "FASTFWD_LEASE_SOCKET"
SCOPE_ENV = "FASTFWD_SCOPE"
#: Seconds between tries to reach a daemon whose socket is missing or refuses (restarting).
RETRY_INTERVAL = 0.2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        message = _message(args.action, args.args)
        if message is not None and args.scope:  # none: a daemon from before scopes takes it
            message["scope"] = normalize_scope(args.scope)
    except LeaseError as exc:
        print(f"fastfwd-dhcp-hook: {exc}", file=sys.stderr)
        return 2
    if message is None:
        return 0
    # dnsmasq logs what the script prints and its exit status, never its arguments: a failure
    # names the event, so that a lost one can be made good.
    what = " ".join([args.action, *args.args])
    try:
        reply = _send(args.socket or _default_socket(), message, args.timeout)
    except DaemonError as exc:
        print(f"fastfwd-dhcp-hook: {what}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # run by hand and interrupted while the daemon was busy
        print(f"fastfwd-dhcp-hook: {what}: interrupted before the daemon replied", file=sys.stderr)
        return 130
    if not reply["ok"]:
        print(f"fastfwd-dhcp-hook: {what} refused: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fastfwd-dhcp-hook", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="dnsmasq --dhcp-script: send lease events to fastfwd's lease socket and wait\n"
                    "until the rules follow them.\n\n"
                    "  dnsmasq ... --dhcp-script=/usr/local/bin/fastfwd-dhcp-hook",
        epilog="exit status: 0 done or ignored; 1 the daemon could not be reached in time or\n"
               "refused; 2 bad arguments; 130 interrupted.")
    parser.add_argument("--socket", "--lease-socket", dest="socket", metavar="PATH",
                        default=os.environ.get(SOCKET_ENV),
                        help=f"the lease socket (default: ${SOCKET_ENV}, else the daemon's default)")
    parser.add_argument("--scope", metavar="NAME", default=os.environ.get(SCOPE_ENV),
                        help="the DHCP server this one is, where several feed the daemon: a snapshot "
                             f"replaces the leases of its scope only (default: ${SCOPE_ENV}, else none)")
    parser.add_argument("--timeout", type=timeout_arg, default=10.0, metavar="SECONDS",
                        help="seconds the whole exchange may take (default: 10)")
    parser.add_argument("action", help="add, old, del, snapshot; anything else is ignored")
    # REMAINDER: dnsmasq's own arguments (a TFTP file name, say) may start with '-'.
    parser.add_argument("args", nargs=argparse.REMAINDER, help="add|old|del: MAC IP [HOSTNAME]; snapshot: LEASEFILE")
    return parser


def _send(path: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The daemon's reply. While nothing listens on the socket (the daemon restarting), tried
    again until ``timeout``: dnsmasq never runs a failed script again, so the event would be
    lost until dnsmasq itself restarts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(path, message, timeout=max(deadline - time.monotonic(), 1e-3))
        except DaemonUnreachable:
            # Nothing was sent: a retry cannot apply the event twice.
            if time.monotonic() + RETRY_INTERVAL >= deadline:
                raise
        time.sleep(RETRY_INTERVAL)


def _message(action: str, args: list[str]) -> dict[str, Any] | None:
    """The lease socket message for dnsmasq's arguments; None for actions that carry no lease."""
    if action == "snapshot":
        if len(args) != 1:
            raise LeaseError("snapshot takes one argument: the dnsmasq lease file")
        parsed = read_lease_file(args[0], _note)
        if parsed is None:
            _note(f"{args[0]} is empty (being rewritten?): nothing sent")
            return None
        # The file's DHCPv6 part has no MACs: the snapshot speaks for IPv4 only, so it leaves
        # the IPv6 leases that events brought alone.
        return {"snapshot": parsed[0], "family": 4}
    if action not in EVENTS:
        return None
    if len(args) not in (2, 3):
        raise LeaseError(f"{action} takes MAC IP [HOSTNAME], got {len(args)} argument(s)")
    mac = args[0]
    if os.environ.get("DNSMASQ_IAID") is not None or not _is_mac(mac):
        mac = os.environ.get("DNSMASQ_MAC", "")  # DHCPv6: the argument is the client's DUID
        if not _is_mac(mac):
            if action == "del":  # the address alone says which lease went
                return {"event": action, "ip": held_address(args[1])}
            _skipped(f"{action} {args[1]}")
            return None
    # held_address, as the daemon checks it: 0.0.0.0 or a multicast address is a bad argument.
    message: dict[str, Any] = {"event": action, "mac": normalize_mac(mac), "ip": held_address(args[1])}
    if len(args) == 3:
        message["hostname"] = client_hostname(args[2], _note)
    return message


def _skipped(what: str) -> None:
    _note(f"{what}: no MAC known for this lease; skipped")


def _is_mac(text: str) -> bool:
    try:
        normalize_mac(text)
    except LeaseError:
        return False
    return True


def _note(text: str) -> None:
    print(f"fastfwd-dhcp-hook: {text}", file=sys.stderr)


def _default_socket() -> str:
    from .config import runtime_dir  # only when no socket is named: config costs a little start time

    return str(runtime_dir() / "lease.sock")


if __name__ == "__main__":
    sys.exit(main())
