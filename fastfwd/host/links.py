"""The bridge link and its addresses, through rtnetlink (pyroute2).

Every function takes ``netns`` (a named network namespace, None for our own), so the same code
sets up a real host and the throw-away namespaces of the tests.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute

from .mac import vm_mac

_IFF_UP = 0x1


@dataclass(frozen=True)
class LinkState:
    index: int
    kind: str | None
    up: bool
    addresses: tuple[ipaddress.IPv4Interface, ...]


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for the bridge: without one, Linux gives a bridge the lowest MAC among its
    ports, so the host's own address would change (and VMs' ARP caches go stale) as TAPs
    come and go."""
    return vm_mac(f"bridge:{bridge}")


def link_state(name: str, *, netns: str | None = None) -> LinkState | None:
    with IPRoute(netns=netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.link("get", index=found[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        addrs = tuple(
            ipaddress.IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(family=2, index=found[0]))
        return LinkState(index=found[0], kind=info.get_attr("IFLA_INFO_KIND") if info else None,
                         up=bool(link["flags"] & _IFF_UP), addresses=addrs)


def ensure_bridge(name: str, *, netns: str | None = None) -> bool:
    """Create bridge ``name`` (fixed MAC, up) unless it exists; True if it was created.
    An existing bridge is only brought up; an existing non-bridge is an error."""
    state = link_state(name, netns=netns)
    if state is not None and state.kind != "bridge":
        raise ValueError(f"interface {name!r} exists and is not a bridge (kind {state.kind})")
    with IPRoute(netns=netns) as ipr:
        if state is None:
            ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(name))
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
    return state is None


def ensure_address(name: str, address: ipaddress.IPv4Interface, *,
                   netns: str | None = None) -> bool:
    """Give link ``name`` the address; True if it was added, False if it had it already."""
    state = link_state(name, netns=netns)
    if state is None:
        raise LookupError(f"interface {name!r} does not exist")
    if address in state.addresses:
        return False
    with IPRoute(netns=netns) as ipr:
        ipr.addr("add", index=state.index, address=str(address.ip),
                 prefixlen=address.network.prefixlen)
    return True


def remove_address(name: str, address: ipaddress.IPv4Interface, *,
                   netns: str | None = None) -> bool:
    state = link_state(name, netns=netns)
    if state is None or address not in state.addresses:
        return False
    with IPRoute(netns=netns) as ipr:
        ipr.addr("del", index=state.index, address=str(address.ip),
                 prefixlen=address.network.prefixlen)
    return True


def delete_link(name: str, *, netns: str | None = None) -> bool:
    with IPRoute(netns=netns) as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])
        return bool(found)
