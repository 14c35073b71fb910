"""How fastfwd-bridge builds dnsmasq's command line and reads another dnsmasq's options
(command line and config file) to check its wiring. No root needed."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from fastfwd.host.bridge import is_fastfwd_hook, write_hook
from fastfwd.host.dnsmasq import _parse, argv, default_range


def test_default_range_is_the_upper_half_without_the_host() -> None:
    assert default_range(ipaddress.IPv4Interface("10.77.0.1/24")) == (
        ipaddress.IPv4Address("10.77.0.128"), ipaddress.IPv4Address("10.77.0.254"))
    first, last = default_range(ipaddress.IPv4Interface("10.77.0.254/24"))
    assert (str(first), str(last)) == ("10.77.0.128", "10.77.0.253")
    with pytest.raises(ValueError):
        default_range(ipaddress.IPv4Interface("10.77.0.1/30"))


@pytest.mark.parametrize("address, first, last", [
    ("10.77.0.200/24", "10.77.0.1", "10.77.0.127"),  # the host inside the upper half: the lower one
    ("10.77.0.128/24", "10.77.0.129", "10.77.0.254"),  # at its edge: the upper half without it
    ("10.0.0.1/8", "10.128.0.0", "10.255.255.254"),  # a large subnet is not "too small"
    ("10.0.0.1/29", "10.0.0.4", "10.0.0.6"),
])
def test_default_range_never_holds_the_host(address: str, first: str, last: str) -> None:
    low, high = default_range(ipaddress.IPv4Interface(address))
    assert (str(low), str(high)) == (first, last)
    assert not low <= ipaddress.IPv4Interface(address).ip <= high


def test_argv_round_trips_through_the_parser(tmp_path: Path) -> None:
    args = argv("br-vms", dhcp_range=(ipaddress.IPv4Address("10.0.0.10"), ipaddress.IPv4Address("10.0.0.20")),
                netmask=ipaddress.IPv4Address("255.255.255.0"), hook="/x/hook",
                leasefile=tmp_path / "l", pidfile=tmp_path / "p")
    assert "--port=0" in args and "--dhcp-range=10.0.0.10,10.0.0.20,255.255.255.0,12h" in args
    server = _parse(1, args[1:])
    assert server.interfaces == ["br-vms"] and server.dhcp_script == "/x/hook" and server.dhcp


def test_short_options_and_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text("# libvirt-style\ninterface=virbr0\ndhcp-range=192.168.122.2,192.168.122.254\n"
                    "dhcp-script=/usr/bin/fastfwd-dhcp-hook  # ours\n")
    server = _parse(7, ["-C", str(conf), "-i", "br1"])
    assert server.interfaces == ["br1", "virbr0"]
    assert server.dhcp_script == "/usr/bin/fastfwd-dhcp-hook" and server.dhcp
    bare = _parse(8, ["--conf-file=", "--interface=br2,br3"])  # no config file at all
    assert bare.interfaces == ["br2", "br3"] and bare.dhcp_script is None and not bare.dhcp


def test_values_attached_to_short_options_or_apart_from_long_ones(tmp_path: Path) -> None:
    """dnsmasq reads its options with getopt: ``-ibr0`` and ``--interface br0`` are as good as
    ``-i br0`` and ``--interface=br0``."""
    server = _parse(9, ["-C", "", "-6/x/hook", "-F10.0.0.10,10.0.0.20", "--interface", "br1",
                        "--dhcp-script", "/y/hook", "--conf-file"])
    assert server.interfaces == ["br1"] and server.dhcp_script == "/y/hook" and server.dhcp
    attached = _parse(10, ["-ibr0", "-6/x/hook", "-F10.0.0.10,10.0.0.20", "--conf-file="])
    assert attached.interfaces == ["br0"] and attached.dhcp_script == "/x/hook" and attached.dhcp


def test_hook_detection(tmp_path: Path) -> None:
    ours = write_hook(tmp_path / "hook", "/run/x.sock")
    assert is_fastfwd_hook(str(ours))
    assert "--socket /run/x.sock" in ours.read_text()
    other = tmp_path / "other"
    other.write_text("#!/bin/sh\nlogger lease \"$@\"\n")
    other.chmod(0o755)
    assert not is_fastfwd_hook(str(other))
    assert not is_fastfwd_hook(str(tmp_path / "missing"))
    ours.chmod(0o644)
    assert not is_fastfwd_hook(str(ours))  # dnsmasq could not run it
