"""``fastfwd-bridge``: set up, check and tear down a VM bridge; create TAPs; print VM MACs.

Run as ``fastfwd-bridge ...`` (once the entry point is installed), ``python -m fastfwd.host
...`` or ``scripts/fastfwd-bridge ...``.
"""
from __future__ import annotations

import argparse
import functools
import grp
import ipaddress
import os
import pwd
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import NetlinkError

EPILOG = """examples:
  fastfwd-bridge setup br-vms --address 10.77.0.1/24
  fastfwd-bridge check br-vms
  fastfwd-bridge tap vm1 --bridge br-vms --user qemu
  fastfwd-bridge mac vm1 --prefix 52:54:00
  fastfwd-bridge destroy br-vms
"""


def _parser() -> argparse.ArgumentParser:
    from ..unixclient import Parser

    p = Parser(prog="fastfwd-bridge", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Host networking for VMs behind fastfwd.\n\nExit status: 0 done (check: no FAIL); "
                           "1 it could not be done (check: a FAIL);\n2 bad arguments; 130 interrupted (Ctrl-C), "
                           "143 stopped by SIGTERM, 129 by SIGHUP.")
    state_help = "where setup records what it made (default: /var/lib/fastfwd/host)"
    p.add_argument("--state-dir", type=Path, help=state_help)
    # What setup, check and destroy share. --state-dir also after the command, where users put
    # options; SUPPRESS keeps one given before it.
    on_bridge = Parser(add_help=False)
    on_bridge.add_argument("bridge", help="the bridge's interface name, like br-vms")
    on_bridge.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, help=state_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str,
                parents: Sequence[Parser] = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, parents=parents,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = command("setup", "create or complete the bridge, NAT, firewall and DHCP (idempotent)",
                "Create the bridge with the host's address, an nftables table of fastfwd's own (NAT\n"
                "for the VMs' outbound traffic, a firewall in front of them) and dnsmasq for DHCP\n"
                "with fastfwd's hook. What exists already is kept; what it makes is recorded\n"
                "for destroy. Run again with other DHCP options, it restarts its dnsmasq with them.\n"
                "If a step fails or it is interrupted, what that run made is undone.\n"
                "Example: fastfwd-bridge setup br-vms --address 10.77.0.1/24",
                parents=[on_bridge])
    s.add_argument("--address", required=True, type=ipaddress.IPv4Interface,
                   help="the host's address on the bridge, with prefix: 10.77.0.1/24")
    s.add_argument("--dhcp-range", metavar="FIRST,LAST",
                   help="addresses DHCP hands out (default: the upper half of the subnet, or the "
                        "lower half when the host's address is inside the upper one)")
    s.add_argument("--no-dhcp", action="store_true", help="no DHCP server (VMs with static addresses)")
    s.add_argument("--dns", action="store_true", help="let dnsmasq answer DNS on the bridge too")
    s.add_argument("--no-nat", action="store_true", help="no masquerade for the VMs' outbound traffic")
    s.add_argument("--lease-socket", metavar="PATH", help="fastfwd's lease socket, for the hook (default: the daemon's)")

    c = command("check", "one PASS/WARN/FAIL line per item; exit 1 on any FAIL",
                "Look at the host as it is, whoever set it up, and print one PASS / WARN / FAIL\n"
                "line per item: bridge, address, forwarding, NAT, firewall, DHCP server, hook.\n"
                "Exit status 1 if any item FAILs.", parents=[on_bridge])
    c.add_argument("--address", type=ipaddress.IPv4Interface, help="the address to expect (default: setup's)")
    c.add_argument("--no-dhcp", action="store_true", help="expect no DHCP server")
    c.add_argument("--lease-socket", metavar="PATH", help="fastfwd's lease socket (default: setup's, else the daemon's)")

    command("destroy", "remove what setup made, and only that",
                "Undo what setup recorded for this bridge: stop its dnsmasq, delete its nftables\n"
                "table, restore ip_forward if it changed it (once no other bridge set up here\n"
                "needs it), delete the bridge if it created it (else only the addresses it added).\n"
                "What setup found there stays.", parents=[on_bridge])

    t = command("tap", "create (or re-attach) a VM's TAP on the bridge",
                "Create the TAP device of a VM on the bridge, owned by the user the VMM runs as,\n"
                "and print its name and the MAC to give the VM's NIC. An existing TAP is\n"
                "attached again. Example: fastfwd-bridge tap vm1 --bridge br-vms --user qemu")
    t.add_argument("vm_id", help="the VM's id: names the TAP and derives the VM's MAC")
    t.add_argument("--bridge", required=True, help="the bridge to attach it to")
    t.add_argument("--user", required=True, help="who may attach to it (the VMM's user, name or id)")
    t.add_argument("--group", help="a group that may attach to it too (name or id)")
    t.add_argument("--name", help="interface name (default: tap-ID, or a hash for long ids)")
    t.add_argument("--prefix", default="", help="0-3 leading bytes of the VM's MAC, e.g. 52:54:00 (default: none)")

    m = command("mac", "print the deterministic MAC of a VM id",
                "Print the MAC a VM id always gets (the same as tap gives it), for a VM\n"
                "started some other way. Example: fastfwd-bridge mac vm1 --prefix 52:54:00")
    m.add_argument("vm_id", help="the VM's id")
    m.add_argument("--prefix", default="", help="0-3 leading bytes, e.g. 52:54:00 (default: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the user asks what to do: the commands and examples, not a bare error
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    # A setup stopped by SIGTERM (a service manager, kill) or a closed terminal undoes what it
    # made, as after Ctrl-C: the default action would end the process before the undo runs.
    # Put back after: a program calling main() keeps its own handlers (a forked child of its
    # would otherwise raise SystemExit on SIGTERM and run on as a copy of it).
    before = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    except ValueError as exc:  # a value given that cannot be used
        print(f"fastfwd-bridge: {exc}", file=sys.stderr)
        return 2
    except (OSError, LookupError, RuntimeError, NetlinkError) as exc:
        print(f"fastfwd-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    if args.command == "mac":
        from .mac import vm_mac

        print(vm_mac(args.vm_id, args.prefix))
        return 0
    if os.geteuid() != 0:
        # Netlink, nftables and /proc/sys refuse an ordinary user, and check would see neither
        # root's dnsmasq nor the nftables tables: its lines would be wrong, not merely short.
        raise PermissionError(f"{args.command} needs root: network interfaces, nftables and "
                              "sysctls are root's to change, and to read in full")
    if args.command == "tap":
        from .mac import vm_mac
        from .tap import create_tap, tap_name

        mac = vm_mac(args.vm_id, args.prefix)
        name = args.name or tap_name(args.vm_id)
        create_tap(name, args.bridge, _uid(args.user), guest_mac=mac,
                   group=_gid(args.group) if args.group else None)
        print(f"{name} {mac}")  # the TAP, and the MAC to give the VM's NIC
        return 0

    from . import bridge

    state_dir = args.state_dir or bridge.default_state_dir()
    if args.command == "setup":
        plan = bridge.Plan(args.bridge, args.address, dhcp=not args.no_dhcp,
                           dhcp_range=_range(args.dhcp_range), dns=args.dns, nat=not args.no_nat,
                           state_dir=state_dir,
                           **({"lease_socket": args.lease_socket} if args.lease_socket else {}))
        # Each step printed as it is done, so a failure after some of them is seen in context.
        bridge.setup(plan, echo=functools.partial(print, flush=True))
        return 0
    if args.command == "destroy":
        for line in bridge.destroy(args.bridge, state_dir) or ["nothing recorded to remove"]:
            print(line)
        return 0
    results = bridge.check(args.bridge, address=args.address, dhcp=False if args.no_dhcp else None,
                           lease_socket=args.lease_socket, state_dir=state_dir)
    for result in results:
        print(result)
    return 1 if any(r.level == "FAIL" for r in results) else 0


def _uid(text: str) -> int:
    try:
        return int(text) if text.isascii() and text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"--user {text!r}: no such user") from None


def _gid(text: str) -> int:
    try:
        return int(text) if text.isascii() and text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"--group {text!r}: no such group") from None


def _range(text: str | None) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    if text is None:
        return None
    first, sep, last = text.partition(",")
    try:
        if not sep:
            raise ValueError("no comma")
        return ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
    except ValueError as exc:
        raise ValueError(f"--dhcp-range {text!r}: expected FIRST,LAST IPv4 addresses ({exc})") from None
