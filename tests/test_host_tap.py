"""TAP devices in a throw-away namespace: vnet_hdr, owner, bridge port, host-side MAC, and
that the owner (and only the owner) can attach to the device as a VMM would."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastfwd.host.lab import Lab
from fastfwd.host.links import delete_link, ensure_bridge, link_state
from fastfwd.host.tap import check_ifname, create_tap, host_side_mac, tap_name

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

# What a VMM does with the TAP: attach to it with TUNSETIFF, as its own user. /dev/net/tun is
# opened first, as root, since some hosts (and containers) keep it at mode 0600.
ATTACH = """
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
uid = int(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
print("attached")
"""


def test_tap_names() -> None:
    assert tap_name("vm1") == "tap-vm1"
    long = tap_name("8f0c7f6e-2a3b-4c1d-9e8f-0a1b2c3d4e5f")
    assert long.startswith("tap-") and len(long) == 15
    assert long == tap_name("8f0c7f6e-2a3b-4c1d-9e8f-0a1b2c3d4e5f")
    assert tap_name("vm 1") != tap_name("vm 2")
    for bad in ("", "a" * 16, "has space", "a/b", ".."):
        with pytest.raises(ValueError):
            check_ifname(bad)


def test_host_side_mac() -> None:
    assert host_side_mac("52:54:00:12:34:56") == "fe:54:00:12:34:56"


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@root
def test_create_tap(lab: Lab) -> None:
    ns = lab.netns("tap")
    ensure_bridge("br0", netns=ns)
    index = create_tap("tap-vm1", "br0", "nobody", guest_mac="52:54:00:12:34:56", netns=ns)
    out = lab.run(ns, ["ip", "-d", "-j", "link", "show", "tap-vm1"]).stdout
    (link,) = json.loads(out)
    data = link["linkinfo"]["info_data"]
    assert link["ifindex"] == index
    assert data["type"] == "tap" and data["vnet_hdr"] is True and data["pi"] is False
    assert data["user"] == "nobody"
    assert link["master"] == "br0" and "UP" in link["flags"]
    assert link["address"] == "fe:54:00:12:34:56"
    # Again: reused, not duplicated or refused.
    assert create_tap("tap-vm1", "br0", 65534, netns=ns) == index


@root
def test_owner_can_attach_others_cannot(lab: Lab) -> None:
    ns = lab.netns("tapown")
    ensure_bridge("br0", netns=ns)
    create_tap("tap-own", "br0", "nobody", netns=ns)

    def attach(uid: int) -> subprocess.CompletedProcess[str]:
        return lab.run(ns, [sys.executable, "-c", ATTACH, "tap-own", str(uid)], check=False)

    assert attach(65534).stdout.strip() == "attached"
    refused = attach(4242)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr


@root
def test_refuses_missing_bridge_and_non_tap(lab: Lab) -> None:
    ns = lab.netns("tapbad")
    with pytest.raises(LookupError):
        create_tap("tap-x", "nobridge", 0, netns=ns)
    ensure_bridge("br0", netns=ns)
    with pytest.raises(ValueError):
        create_tap("br0", "br0", 0, netns=ns)
    create_tap("tap-x", "br0", 0, netns=ns)
    assert delete_link("tap-x", netns=ns) is True
    assert link_state("tap-x", netns=ns) is None
    assert delete_link("tap-x", netns=ns) is False


@root
@pytest.mark.parametrize("make, words", [
    (["mode", "tap", "user", "65534"], ["owned by uid 65534", "ip link del"]),  # another user's
    (["mode", "tap", "user", "0"], ["vnet_hdr"]),  # a VMM asking for vnet_hdr could not attach
    (["mode", "tun", "user", "0", "vnet_hdr"], ["TUN"]),  # layer 3: no bridge port
])
def test_an_existing_tap_that_is_not_as_asked_is_refused(lab: Lab, make: list[str], words: list[str]) -> None:
    # Once: re-attached and reported done with the other owner or without vnet_hdr, so the VMM
    # failed later; or, for a TUN device, a netlink traceback.
    ns = lab.netns("tapold")
    ensure_bridge("br0", netns=ns)
    lab.run(ns, ["ip", "tuntap", "add", "dev", "tap-vm1", *make])
    with pytest.raises(ValueError) as refused:
        create_tap("tap-vm1", "br0", 0, netns=ns)
    assert all(word in str(refused.value) for word in words), refused.value
    assert "master" not in lab.run(ns, ["ip", "-j", "link", "show", "tap-vm1"]).stdout  # left as it was


@root
def test_the_tap_command_refuses_a_device_not_as_asked_with_exit_2(lab: Lab) -> None:
    """docs/vm-hosts.md: ``fastfwd-bridge tap`` with a name held by another user's TAP says so
    in one line, exit status 2 (a value given that cannot be used), and leaves the device."""
    ns = lab.netns("tapcli")
    ensure_bridge("br0", netns=ns)
    lab.run(ns, ["ip", "tuntap", "add", "dev", "tap-vm1", "mode", "tap", "user", "65534", "vnet_hdr"])
    done = lab.run(ns, [sys.executable, "-m", "fastfwd.host", "--state-dir", str(lab.dir / "state"),
                        "tap", "vm1", "--bridge", "br0", "--user", "0"], check=False)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith("fastfwd-bridge: 'tap-vm1' exists owned by uid 65534") and done.stderr.count("\n") == 1
    assert "master" not in lab.run(ns, ["ip", "-j", "link", "show", "tap-vm1"]).stdout
