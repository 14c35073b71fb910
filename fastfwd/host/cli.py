"""``fastfwd-bridge``: set up, check and tear down a VM bridge; create TAPs; print VM MACs.

Run as ``fastfwd-bridge ...`` (once the entry point is installed), ``python -m fastfwd.host
...`` or ``scripts/fastfwd-bridge ...``.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

EPILOG = """examples:
  fastfwd-bridge setup br-vms --address 10.77.0.1/24
  fastfwd-bridge check br-vms
  fastfwd-bridge tap vm1 --bridge br-vms --user qemu
  fastfwd-bridge mac vm1 --prefix 52:54:00
  fastfwd-bridge destroy br-vms
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastfwd-bridge", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Host networking for VMs behind fastfwd.")
    p.add_argument("--state-dir", type=Path, help="where setup records what it made "
                   "(default: /var/lib/fastfwd/host for root)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("setup", help="create or complete the bridge, NAT, firewall and DHCP (idempotent)")
    s.add_argument("bridge")
    s.add_argument("--address", required=True, type=ipaddress.IPv4Interface,
                   help="the host's address on the bridge, with prefix: 10.77.0.1/24")
    s.add_argument("--dhcp-range", metavar="FIRST,LAST",
                   help="addresses DHCP hands out (default: the upper half of the subnet)")
    s.add_argument("--no-dhcp", action="store_true", help="no DHCP server (VMs with static addresses)")
    s.add_argument("--dns", action="store_true", help="let dnsmasq answer DNS on the bridge too")
    s.add_argument("--no-nat", action="store_true", help="no masquerade for the VMs' outbound traffic")
    s.add_argument("--lease-socket", help="fastfwd's lease socket, for the hook (default: the daemon's)")

    c = sub.add_parser("check", help="one PASS/WARN/FAIL line per item; exit 1 on any FAIL")
    c.add_argument("bridge")
    c.add_argument("--address", type=ipaddress.IPv4Interface, help="the address to expect (default: setup's)")
    c.add_argument("--no-dhcp", action="store_true", help="expect no DHCP server")
    c.add_argument("--lease-socket", help="fastfwd's lease socket (default: setup's, else the daemon's)")

    d = sub.add_parser("destroy", help="remove what setup made, and only that")
    d.add_argument("bridge")

    t = sub.add_parser("tap", help="create (or re-attach) a VM's TAP on the bridge")
    t.add_argument("vm_id")
    t.add_argument("--bridge", required=True)
    t.add_argument("--user", required=True, help="who may attach to it (the VMM's user)")
    t.add_argument("--group")
    t.add_argument("--name", help="interface name (default: tap-ID, or a hash for long ids)")
    t.add_argument("--prefix", default="", help="MAC prefix for the VM's MAC (0-3 bytes)")

    m = sub.add_parser("mac", help="print the deterministic MAC of a VM id")
    m.add_argument("vm_id")
    m.add_argument("--prefix", default="", help="0-3 leading bytes, e.g. 52:54:00")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError, LookupError, RuntimeError) as exc:
        print(f"fastfwd-bridge: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "mac":
        from .mac import vm_mac

        print(vm_mac(args.vm_id, args.prefix))
        return 0
    if args.command == "tap":
        from .mac import vm_mac
        from .tap import create_tap, tap_name

        mac = vm_mac(args.vm_id, args.prefix)
        name = args.name or tap_name(args.vm_id)
        create_tap(name, args.bridge, _id_or_name(args.user), guest_mac=mac,
                   group=_id_or_name(args.group) if args.group else None)
        print(f"{name} {mac}")  # the TAP, and the MAC to give the VM's NIC
        return 0

    from . import bridge

    state_dir = args.state_dir or bridge.default_state_dir()
    if args.command == "setup":
        plan = bridge.Plan(args.bridge, args.address, dhcp=not args.no_dhcp,
                           dhcp_range=_range(args.dhcp_range), dns=args.dns, nat=not args.no_nat,
                           state_dir=state_dir,
                           **({"lease_socket": args.lease_socket} if args.lease_socket else {}))
        for line in bridge.setup(plan) or ["nothing to do"]:
            print(line)
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


def _id_or_name(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _range(text: str | None) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None:
    if text is None:
        return None
    first, sep, last = text.partition(",")
    if not sep:
        raise ValueError(f"--dhcp-range {text!r}: expected FIRST,LAST")
    return ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
