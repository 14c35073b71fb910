"""TAP devices for VMs: persistent, vnet_hdr on, owned by the VMM's user, attached to the bridge.

The host side of a TAP must not carry the VM's own MAC: the bridge treats its ports' addresses
as local, so frames meant for the VM would be delivered to the host instead. Like other VM
managers, we give the TAP the VM's MAC with the first byte replaced by 0xfe (locally
administered, unicast, and high, so it is never picked as the bridge's address either).
"""
from __future__ import annotations

import grp
import hashlib
import pwd
import re

from pyroute2 import IPRoute

from ..leases import normalize_mac
from .links import link_state

IFNAMSIZ = 15  # usable characters; the kernel's IFNAMSIZ of 16 includes the NUL
# \Z, not $: '$' also matches before a final newline, which the kernel refuses in a name.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


def check_ifname(name: str) -> str:
    """The name if the kernel will take it as an interface name, else ValueError."""
    if not _IFNAME_RE.match(name) or name in (".", ".."):
        raise ValueError(f"interface name {name!r}: 1 to {IFNAMSIZ} characters from "
                         "letters, digits, '_', '.', '-'")
    return name


def tap_name(vm_id: str) -> str:
    """``tap-<id>`` when that is a valid interface name, else ``tap-`` and 11 hex digits of
    SHA-256 of the id, so long ids (UUIDs) still get a stable name within 15 characters."""
    name = f"tap-{vm_id}"
    if _IFNAME_RE.match(name):
        return name
    return "tap-" + hashlib.sha256(vm_id.encode("utf-8")).hexdigest()[:IFNAMSIZ - 4]


def host_side_mac(guest_mac: str) -> str:
    return "fe" + normalize_mac(guest_mac)[2:]


def _uid(user: int | str) -> int:
    return user if isinstance(user, int) else pwd.getpwnam(user).pw_uid


def _gid(group: int | str) -> int:
    return group if isinstance(group, int) else grp.getgrnam(group).gr_gid


def create_tap(name: str, bridge: str, user: int | str, *, group: int | str | None = None,
               guest_mac: str | None = None, netns: str | None = None) -> int:
    """Create TAP ``name`` on ``bridge`` for ``user`` and bring it up; returns its ifindex.

    An existing TAP of that name is reused (attached and brought up again), so a VM manager
    can call this on every VM start. ``netns`` names a network namespace to work in.
    Remove a TAP with :func:`fastfwd.host.links.delete_link`.
    """
    check_ifname(name)
    uid = _uid(user)
    gid = _gid(group) if group is not None else None
    br = link_state(bridge, netns=netns)
    if br is None or br.kind != "bridge":
        raise LookupError(f"bridge {bridge!r} does not exist")
    existing = link_state(name, netns=netns)
    if existing is not None and existing.kind != "tun":
        raise ValueError(f"interface {name!r} exists and is not a TAP (kind {existing.kind})")
    with IPRoute(netns=netns) as ipr:
        if existing is not None:
            _check_reusable(ipr, name, existing.index, uid, gid)
        else:
            extra = {"gid": gid} if gid is not None else {}
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", uid=uid,
                     ifr={"vnet_hdr": True, "no_pi": True}, **extra)
        (index,) = ipr.link_lookup(ifname=name)
        attrs = {"address": host_side_mac(guest_mac)} if guest_mac else {}
        ipr.link("set", index=index, master=br.index, state="up", **attrs)
        return index


_TUN_TYPE_TAP = 2


def _check_reusable(ipr: IPRoute, name: str, index: int, uid: int, gid: int | None) -> None:
    """An existing TUN/TAP device is reused only if it is what we would make: its owner, group
    and flags cannot be changed here, and the VMM would fail to attach to it (or the bridge to
    take it) long after we said it was done."""
    (link,) = ipr.link("get", index=index)
    data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
    tun = {key: value for key, value in data["attrs"]} if data else {}
    # The kernel leaves out the owner and group attributes when none is set.
    wrong = [what for what, ok in (
        ("a TUN device (layer 3), not a TAP", tun.get("IFLA_TUN_TYPE") == _TUN_TYPE_TAP),
        ("without vnet_hdr", tun.get("IFLA_TUN_VNET_HDR") == 1),
        ("with a packet-info header", tun.get("IFLA_TUN_PI") == 0),
        (f"owned by uid {tun.get('IFLA_TUN_OWNER', 'none')}, not {uid}", tun.get("IFLA_TUN_OWNER") == uid),
        (f"of group {tun.get('IFLA_TUN_GROUP', 'none')}, not {gid}", gid is None or tun.get("IFLA_TUN_GROUP") == gid),
    ) if not ok]
    if wrong:
        raise ValueError(f"{name!r} exists {', '.join(wrong)}: remove it (ip link del {name}) "
                         "to have it made again")
