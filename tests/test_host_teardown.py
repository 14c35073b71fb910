"""fastfwd-bridge set-up and tear-down: one bridge's setup or destroy must never touch the
nftables table of another bridge, whatever the two are called; destroy removes what setup
made (addresses, tables under older names) and nothing that is not its own."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fastfwd.host import bridge, firewall

from helpers_control import wait_until
from test_host_bridge import Bridge


def test_table_names_of_different_bridges_differ() -> None:
    names = {firewall.table_name(b) for b in ("br-vms", "br_vms", "br.vms")}
    assert len(names) == 3
    assert firewall.table_name("br-vms") == "fastfwd_br_vms"  # the name docs/vm-hosts.md shows


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_setup_and_destroy_of_a_similarly_named_bridge_leave_the_other_table(br: Bridge) -> None:
    br.setup("--no-dhcp")
    ours = br.sh("nft", "list", "table", "inet", "fastfwd_br_vms")
    assert f"{br.subnet}.0/24" in ours
    br("setup", "br_vms", "--address", "10.254.254.1/24", "--no-dhcp")
    assert br.sh("nft", "list", "table", "inet", "fastfwd_br_vms") == ours
    br("destroy", "br_vms")
    assert br.sh("nft", "list", "table", "inet", "fastfwd_br_vms") == ours
    br("destroy", "br-vms")
    assert br.sh("nft", "list", "ruleset").strip() == ""


def _tables(br: Bridge) -> set[str]:
    return {line.removeprefix("table ") for line in br.sh("nft", "list", "tables").splitlines()}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_destroy_removes_our_table_left_under_the_name_before_bridges_got_their_own(br: Bridge) -> None:
    # What setup of br_vms made before table names told '-', '_' and '.' apart: the record,
    # and its table under the name br-vms now has.
    br("setup", "br_vms", "--address", "10.254.254.1/24", "--no-dhcp")
    br.sh("nft", f"delete table inet {firewall.table_name('br_vms')}")
    br.sh("nft", 'add table inet fastfwd_br_vms { comment "made by fastfwd-bridge for br_vms"; }')
    br.sh("nft", "add table inet theirs")
    assert "removed nftables table inet fastfwd_br_vms" in br("destroy", "br_vms").stdout
    assert _tables(br) == {"inet theirs"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_destroy_leaves_a_table_under_the_old_name_that_is_not_ours(br: Bridge) -> None:
    br("setup", "br_vms", "--address", "10.254.254.1/24", "--no-dhcp")
    br.sh("nft", "add table inet fastfwd_br_vms")  # someone else's: it does not say it is ours
    br("destroy", "br_vms")
    assert _tables(br) == {"inet fastfwd_br_vms"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_destroy_removes_every_address_setup_added_to_a_bridge_it_found(br: Bridge) -> None:
    br.sh("ip", "link", "add", "br-vms", "type", "bridge")  # the host's own bridge
    br("setup", "br-vms", "--address", "10.254.1.1/24", "--no-dhcp")
    br("setup", "br-vms", "--address", "10.254.2.1/24", "--no-dhcp")  # moved to another subnet
    br("destroy", "br-vms")
    assert "br-vms" in br.sh("ip", "-br", "link")  # not ours: it stays
    assert br.sh("ip", "-4", "-br", "addr", "show", "dev", "br-vms").split()[2:] == []


def test_an_id_or_name_ending_in_a_newline_is_not_an_interface_name() -> None:
    # '$' also matches before a final newline: 'tap-vm1\n' passed as a valid name, and the
    # kernel refused it later instead of the id being hashed.
    from fastfwd.host.tap import check_ifname, tap_name

    assert tap_name("vm1\n") == "tap-" + hashlib.sha256(b"vm1\n").hexdigest()[:11]
    with pytest.raises(ValueError):
        check_ifname("tap0\n")


def test_destroy_leaves_alone_a_dnsmasq_that_took_over_the_recorded_pid(tmp_path: Path) -> None:
    # Our dnsmasq died and its pid went to another dnsmasq (libvirt's, say): it is not ours.
    fake = tmp_path / "dnsmasq"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    other = subprocess.Popen([str(fake), "60"])
    try:
        wait_until(lambda: Path(f"/proc/{other.pid}/comm").read_text().strip() == "dnsmasq",
                   what="the stand-in running")
        state = tmp_path / "state"
        state.mkdir()
        (state / "br-x.json").write_text(json.dumps(
            {"dnsmasq_pid": other.pid, "files": [str(state / "br-x.dnsmasq.pid")]}))
        assert bridge.destroy("br-x", state) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_setup_again_replaces_our_table_left_under_the_old_name(br: Bridge) -> None:
    # Set up again after an upgrade: the old table would otherwise stay, a second copy of
    # the same rules, until destroy.
    br.sh("nft", 'add table inet fastfwd_br_vms { comment "made by fastfwd-bridge for br_vms"; }')
    br("setup", "br_vms", "--address", "10.254.254.1/24", "--no-dhcp")
    assert _tables(br) == {f"inet {firewall.table_name('br_vms')}"}
    br("destroy", "br_vms")


@pytest.mark.parametrize("record", ['{"bridge": true', '["bridge"]', '{"bridge": true, "from_a_later_version": 1}'])
@pytest.mark.parametrize("command", ["destroy", "check"])
def test_a_record_setup_cannot_read_is_one_line_and_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             record: str, command: str) -> None:
    # Cut short, hand-edited or written by a later version: not a traceback, and destroy
    # neither guesses what setup made nor deletes the record that says so.
    from fastfwd.host.cli import main

    (tmp_path / "br-x.json").write_text(record)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    assert main([command, "br-x", "--state-dir", str(tmp_path)]) == 1
    # Its handlers put back: left in place, a fork of the caller (pyroute2's netns helper) took
    # the SIGTERM that stops it as SystemExit and ran on as a copy of the whole test session.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastfwd-bridge: setup's record {tmp_path / 'br-x.json'} cannot be read: ")
    assert "\n" not in err and (tmp_path / "br-x.json").read_text() == record


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_destroying_one_bridge_leaves_forwarding_on_for_another(br: Bridge) -> None:
    # br-a's setup turned forwarding on, br-b's found it on. Once destroying br-a turned it
    # off under br-b's VMs; now the last of them to go restores it.
    br("setup", "br-a", "--address", "10.254.1.1/24", "--no-dhcp")
    br("setup", "br-b", "--address", "10.254.2.1/24", "--no-dhcp")
    out = br("destroy", "br-a").stdout
    assert "restored" not in out and "br-b" in out
    assert br.sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    assert "restored net.ipv4.ip_forward = 0" in br("destroy", "br-b").stdout
    br.assert_untouched()
