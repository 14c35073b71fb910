"""A VM bridge as a whole: setup, check and destroy.

``setup`` makes the host ready for VMs on a bridge: the bridge with the host's address, IP
forwarding, our nftables table (NAT and firewall), and optionally a dnsmasq serving DHCP on
the bridge with fastfwd's hook as its ``--dhcp-script``. It is idempotent, and it writes down
what it made (and what it changed: the old ``ip_forward``) in a record in the state
directory, so ``destroy`` removes exactly that and nothing it found already there.

``check`` looks at the host as it is (whoever set it up) and reports one line per item.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from . import dnsmasq, firewall, sysctl
from .links import (
    LinkState,
    delete_link,
    ensure_address,
    ensure_bridge,
    link_state,
    remove_address,
)
from .tap import check_ifname

IP_FORWARD = "net.ipv4.ip_forward"
HOOK_ENTRY_POINT = "fastfwd-dhcp-hook"


def default_state_dir() -> Path:
    from ..config import state_dir

    return state_dir() / "host"


def default_lease_socket() -> str:
    from ..config import ControlSettings

    return ControlSettings().lease_socket


@dataclass(frozen=True)
class Plan:
    """What the bridge should look like."""

    bridge: str
    address: ipaddress.IPv4Interface
    dhcp: bool = True
    dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    dns: bool = False
    nat: bool = True
    lease_socket: str = field(default_factory=default_lease_socket)
    state_dir: Path = field(default_factory=default_state_dir)


@dataclass
class Made:
    """What ``setup`` made or changed: all that ``destroy`` may undo."""

    bridge: bool = False
    address: str | None = None
    #: Every address setup added, not only the last: a setup run again with another
    #: ``--address`` adds that one too, and destroy must remove both.
    addresses: list[str] = field(default_factory=list)
    ip_forward_was: str | None = None
    firewall: bool = False
    dnsmasq_pid: int | None = None
    files: list[str] = field(default_factory=list)
    # The plan as last applied, so ``check`` can compare without being told again.
    plan_address: str | None = None
    plan_dhcp: bool = True
    lease_socket: str | None = None

    @staticmethod
    def path(state_dir: Path, bridge: str) -> Path:
        return state_dir / f"{bridge}.json"

    @classmethod
    def load(cls, state_dir: Path, bridge: str) -> Made:
        """The record, or an empty one if there is none. One that does not parse (cut short,
        edited, or from a later version) is a RuntimeError: guessing would undo the wrong things."""
        path = cls.path(state_dir, bridge)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()
        except (ValueError, TypeError) as exc:
            raise RuntimeError(f"setup's record {path} cannot be read: {exc}") from None

    def save(self, state_dir: Path, bridge: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(state_dir, bridge).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, self.path(state_dir, bridge))


def validate(plan: Plan) -> Plan:
    """``plan`` with its DHCP range filled in, or ValueError naming what the kernel or dnsmasq
    would refuse or mishandle: checked before anything is made."""
    check_ifname(plan.bridge)
    address, net = plan.address, plan.address.network
    if net.prefixlen == 32:
        raise ValueError(f"--address {address}: a /32 leaves no room for VMs on the bridge")
    if net.prefixlen < 31 and address.ip in (net.network_address, net.broadcast_address):
        what = "network" if address.ip == net.network_address else "broadcast"
        raise ValueError(f"--address {address}: {address.ip} is the {what} address of {net}")
    if not plan.dhcp:
        return plan
    if plan.dhcp_range is None:
        return replace(plan, dhcp_range=dnsmasq.default_range(address))
    first, last = plan.dhcp_range
    text = f"--dhcp-range {first},{last}"
    for ip in (first, last):
        if ip not in net or ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"{text}: {ip} is not a host address of the bridge's subnet {net}")
    if first > last:
        raise ValueError(f"{text}: the first address is after the last")
    if first <= address.ip <= last:
        raise ValueError(f"{text}: holds the host's own address {address.ip}")
    return plan


def setup(plan: Plan, echo: Callable[[str], None] | None = None) -> list[str]:
    """Bring the host to ``plan``; returns one line per thing done, each also passed to
    ``echo`` as it is done. Safe to run again. If a step fails (or Ctrl-C), what this run made
    is undone (each undo echoed as ``undone: ...``), the record is put back, and the error raised."""
    plan = validate(plan)
    before = Made.load(plan.state_dir, plan.bridge)
    had_record = Made.path(plan.state_dir, plan.bridge).exists()
    made = replace(before, addresses=[*before.addresses], files=[*before.files])
    done: list[str] = []

    def record(line: str) -> None:
        made.save(plan.state_dir, plan.bridge)  # after every step: a setup killed midway can be destroyed
        done.append(line)
        if echo:
            echo(line)

    try:
        _setup(plan, made, record)
    except BaseException:
        for line in _undo(plan.bridge, _made_since(before, made), plan.state_dir):
            if echo:
                echo(f"undone: {line}")
        if had_record:
            before.save(plan.state_dir, plan.bridge)
        else:
            Made.path(plan.state_dir, plan.bridge).unlink(missing_ok=True)
        raise
    return done


def _setup(plan: Plan, made: Made, record: Callable[[str], None]) -> None:
    made.plan_address, made.plan_dhcp, made.lease_socket = str(plan.address), plan.dhcp, plan.lease_socket
    if ensure_bridge(plan.bridge):
        made.bridge = True
        record(f"created bridge {plan.bridge}")
    if ensure_address(plan.bridge, plan.address):
        made.address = str(plan.address)
        made.addresses = [*(a for a in made.addresses if a != made.address), made.address]
        record(f"added {plan.address} to {plan.bridge}")
    if sysctl.read(IP_FORWARD) != "1":
        if made.ip_forward_was is None:
            made.ip_forward_was = sysctl.read(IP_FORWARD)
        sysctl.write(IP_FORWARD, "1")
        record(f"set {IP_FORWARD} = 1")
    firewall.apply(plan.bridge, plan.address.network, nat=plan.nat)
    made.firewall = True
    record(f"nftables table inet {firewall.table_name(plan.bridge)} in place")
    if plan.dhcp:
        _setup_dhcp(plan, made, record)
    elif _stop_ours(made):
        record(f"stopped dnsmasq: no DHCP wanted on {plan.bridge}")
    made.save(plan.state_dir, plan.bridge)


def _made_since(before: Made, after: Made) -> Made:
    """What a setup run made that ``before`` did not have: what undoing that run removes."""
    return Made(bridge=after.bridge and not before.bridge,
                addresses=[a for a in after.addresses if a not in before.addresses],
                ip_forward_was=after.ip_forward_was if before.ip_forward_was is None else None,
                firewall=after.firewall and not before.firewall,
                dnsmasq_pid=after.dnsmasq_pid if after.dnsmasq_pid != before.dnsmasq_pid else None,
                files=[f for f in after.files if f not in before.files])


def _stop_ours(made: Made) -> bool:
    stopped = made.dnsmasq_pid is not None and dnsmasq.stop(made.dnsmasq_pid, pidfile=_pidfile(made))
    made.dnsmasq_pid = None
    return stopped


def _pidfile(made: Made) -> str | None:
    """The pid file setup gave its dnsmasq: the pid alone may belong to another dnsmasq by now."""
    return next((f for f in made.files if f.endswith(".dnsmasq.pid")), None)


def _setup_dhcp(plan: Plan, made: Made, record: Callable[[str], None]) -> None:
    # Written every time: a new --lease-socket reaches the dnsmasq already running it.
    leasefile = plan.state_dir / f"{plan.bridge}.leases"
    # The lease file names this dnsmasq: a snapshot of it (the hook's, or the daemon's
    # dhcp_lease_file) then replaces the leases of this bridge alone.
    hook = write_hook(plan.state_dir / f"{plan.bridge}-dhcp-hook", plan.lease_socket,
                      scope=os.path.abspath(leasefile))
    pidfile = plan.state_dir / f"{plan.bridge}.dnsmasq.pid"
    made.files = sorted({*made.files, str(hook), str(leasefile), str(pidfile)})
    assert plan.dhcp_range is not None  # validate() filled it in
    args = dnsmasq.argv(plan.bridge, dhcp_range=plan.dhcp_range, netmask=plan.address.netmask,
                        hook=str(hook), leasefile=leasefile, pidfile=pidfile, dns=plan.dns)
    pid = made.dnsmasq_pid
    if pid is not None and dnsmasq.is_ours(pid, _pidfile(made)):
        if dnsmasq.arguments(pid) == args:
            record(f"dnsmasq (pid {pid}) already serves {plan.bridge}")
            return
        _stop_ours(made)
        record(f"stopped dnsmasq (pid {pid}): its options changed")
    # A dnsmasq serving only DNS on the bridge does not keep ours from serving DHCP there.
    theirs = [server for server in dnsmasq.servers_for(plan.bridge) if server.dhcp]
    if theirs:
        record(f"a DHCP server not started by us (pid {theirs[0].pid}) serves {plan.bridge}; "
               "leaving it alone")
        return
    made.dnsmasq_pid = dnsmasq.start(args, pidfile)
    record(f"started dnsmasq (pid {made.dnsmasq_pid}): {shlex.join(args)}")


def write_hook(path: Path, lease_socket: str, scope: str = "") -> Path:
    """dnsmasq's ``--dhcp-script`` takes a bare path: a small script that runs fastfwd's hook
    with the lease socket to use (the installed entry point, else this interpreter) and the
    ``scope`` naming its dnsmasq, if any."""
    installed = shutil.which(HOOK_ENTRY_POINT)
    if installed:
        command = shlex.quote(installed)
    else:
        package_root = Path(__file__).resolve().parents[2]
        command = (f"env PYTHONPATH={shlex.quote(str(package_root))} "
                   f"{shlex.quote(sys.executable)} -m fastfwd.hook")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n# made by fastfwd-bridge: dnsmasq's --dhcp-script, telling fastfwd "
                    f"about leases\nexec {command} --socket {shlex.quote(lease_socket)}"
                    f"{f' --scope {shlex.quote(scope)}' if scope else ''} \"$@\"\n")
    path.chmod(0o755)
    return path


def destroy(bridge: str, state_dir: Path | None = None) -> list[str]:
    """Undo what ``setup`` recorded for ``bridge``, newest first; returns one line per undo."""
    check_ifname(bridge)
    state_dir = state_dir or default_state_dir()
    done = _undo(bridge, Made.load(state_dir, bridge), state_dir)
    Made.path(state_dir, bridge).unlink(missing_ok=True)
    return done


def _undo(bridge: str, made: Made, state_dir: Path) -> list[str]:
    done = []
    pid = made.dnsmasq_pid
    if _stop_ours(made):
        done.append(f"stopped dnsmasq (pid {pid})")
    if made.firewall:
        done.extend(f"removed nftables table inet {name}" for name in firewall.remove(bridge))
    if made.ip_forward_was is not None:
        done.append(_restore_forwarding(bridge, made.ip_forward_was, state_dir))
    if made.bridge:
        if delete_link(bridge):
            done.append(f"deleted bridge {bridge}")
    else:
        # A record written before ``addresses`` has only ``address``.
        for address in dict.fromkeys([*made.addresses, *([made.address] if made.address else [])]):
            if remove_address(bridge, ipaddress.IPv4Interface(address)):
                done.append(f"removed {address} from {bridge}")
    for name in made.files:
        Path(name).unlink(missing_ok=True)
    return done


def _restore_forwarding(bridge: str, was: str, state_dir: Path) -> str:
    """Put ``ip_forward`` back, unless another bridge set up here still has VMs relying on it:
    then that bridge's record takes over the value to restore, for whichever goes last."""
    for path in sorted(state_dir.glob("*.json")):
        other = path.stem
        if other == bridge:
            continue
        try:
            made = Made.load(state_dir, other)
        except RuntimeError:  # not a record of ours to change
            continue
        if made.ip_forward_was is None:
            made.ip_forward_was = was
            made.save(state_dir, other)
        return f"left {IP_FORWARD} = 1: bridge {other} set up here still uses it"
    sysctl.write(IP_FORWARD, was)
    return f"restored {IP_FORWARD} = {was}"


Level = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class Check:
    level: Level
    item: str
    detail: str

    def __str__(self) -> str:
        return f"{self.level} {self.item}: {self.detail}"


def check(bridge: str, *, address: ipaddress.IPv4Interface | None = None, dhcp: bool | None = None,
          lease_socket: str | None = None, state_dir: Path | None = None) -> list[Check]:
    """One :class:`Check` per item. Settings not given come from setup's record, if any."""
    check_ifname(bridge)
    made = Made.load(state_dir or default_state_dir(), bridge)
    if address is None and made.plan_address:
        address = ipaddress.IPv4Interface(made.plan_address)
    dhcp = made.plan_dhcp if dhcp is None else dhcp
    lease_socket = lease_socket or made.lease_socket or default_lease_socket()
    link = link_state(bridge)
    return [_check_bridge(bridge, link), _check_address(bridge, link, address),
            _check_forward(), *_check_firewall(bridge), *_check_dhcp(bridge, dhcp, lease_socket)]


def _check_bridge(bridge: str, link: LinkState | None) -> Check:
    if link is None:
        return Check("FAIL", "bridge", f"{bridge} does not exist")
    if link.kind != "bridge":
        return Check("FAIL", "bridge", f"{bridge} is a {link.kind or 'plain'} link, not a bridge")
    if not link.up:
        return Check("FAIL", "bridge", f"{bridge} is down")
    return Check("PASS", "bridge", f"{bridge} present and up")


def _check_address(bridge: str, link: LinkState | None, address: ipaddress.IPv4Interface | None) -> Check:
    have = link.addresses if link is not None else ()
    if address is not None:
        if address in have:
            return Check("PASS", "address", f"{bridge} has {address}")
        return Check("FAIL", "address", f"{bridge} lacks {address} (has {', '.join(map(str, have)) or 'none'})")
    if have:
        return Check("PASS", "address", f"{bridge} has {', '.join(map(str, have))}")
    return Check("FAIL", "address", f"{bridge} has no IPv4 address: VMs have no gateway")


def _check_forward() -> Check:
    if sysctl.read(IP_FORWARD) == "1":
        return Check("PASS", "ip_forward", f"{IP_FORWARD} = 1")
    return Check("WARN", "ip_forward", f"{IP_FORWARD} = 0: VMs cannot reach beyond the host "
                 "(fastfwd's published ports work without it)")


def _check_firewall(bridge: str) -> list[Check]:
    table = firewall.table_state(bridge)
    name = f"inet {firewall.table_name(bridge)}"
    if table is None:
        return [Check("WARN", "NAT", f"no table {name}: VMs' outbound traffic is not masqueraded"),
                Check("WARN", "firewall", f"no table {name}: nothing keeps outside traffic off the VMs")]
    nat = (Check("PASS", "NAT", f"{name} masquerades the bridge subnet") if table.masquerade
           else Check("WARN", "NAT", f"{name} has no masquerade rule"))
    missing = {"forward", "input"} - table.hooks
    drops = firewall.foreign_drops(bridge)
    if missing:
        fw = Check("WARN", "firewall", f"{name} lacks chains on {', '.join(sorted(missing))}")
    elif drops:
        fw = Check("WARN", "firewall", f"{name} in place, but these chains drop by default and "
                   f"need the same accepts: {'; '.join(drops)}")
    else:
        fw = Check("PASS", "firewall", f"{name} in place (forward, input)")
    return [nat, fw]


def _check_dhcp(bridge: str, dhcp: bool, lease_socket: str) -> list[Check]:
    if not dhcp:
        return [Check("PASS", "DHCP server", "not wanted (static addresses: turn on "
                      "[sources] neighbours)"),
                Check("PASS", "hook", "not wanted without DHCP")]
    servers = [s for s in dnsmasq.servers_for(bridge) if s.dhcp]
    if not servers:
        return [Check("FAIL", "DHCP server", f"no dnsmasq serves DHCP on {bridge}"),
                Check("FAIL", "hook", "no DHCP server to run it")]
    server = servers[0]
    found = Check("PASS", "DHCP server", f"dnsmasq pid {server.pid} serves {bridge}")
    script = server.dhcp_script
    if not script:
        return [found, Check("FAIL", "hook", f"dnsmasq pid {server.pid} has no --dhcp-script: "
                             "fastfwd never hears of leases")]
    if not is_fastfwd_hook(script):
        return [found, Check("FAIL", "hook", f"--dhcp-script {script} is not fastfwd's hook")]
    if not _answers(lease_socket):
        return [found, Check("WARN", "hook", f"{script} is wired, but nothing listens on "
                             f"{lease_socket} (is fastfwd running?)")]
    return [found, Check("PASS", "hook", f"{script} is wired and {lease_socket} answers")]


def is_fastfwd_hook(path: str) -> bool:
    """The entry point itself, or a script (like ours) that runs it."""
    if Path(path).name == HOOK_ENTRY_POINT:
        return os.access(path, os.X_OK)
    try:
        text = Path(path).read_text(errors="replace")[:4096]
    except OSError:
        return False
    return os.access(path, os.X_OK) and (HOOK_ENTRY_POINT in text or "fastfwd.hook" in text)


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError:
            return False
        return True
