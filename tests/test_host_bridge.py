"""fastfwd-bridge setup / check / destroy, run as the real command inside a fresh namespace
(its own bridge, sysctls, nftables and processes), so the host itself is never touched."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers_control import wait_until

from fastfwd.host.lab import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "fastfwd-bridge")
VM_MAC = "52:54:00:bb:00:01"


class Bridge:
    """The CLI against one namespace and one state directory."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns = lab.netns("br")
        self.state = lab.dir / "state"
        self.sock = str(lab.dir / "lease.sock")
        self.subnet = f"10.{int(lab.id[:2], 16)}.{int(lab.id[2:4], 16)}"

    def __call__(self, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        done = self.lab.run(self.ns, [sys.executable, SCRIPT, "--state-dir", str(self.state), *args],
                            check=False)
        if ok is not None:
            assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done

    def setup(self, *extra: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
        return self("setup", "br-vms", "--address", f"{self.subnet}.1/24", "--lease-socket", self.sock, *extra,
                    ok=ok)

    def checks(self, *extra: str) -> dict[str, str]:
        """item -> level, from the check command's lines."""
        out = self("check", "br-vms", *extra, ok=None).stdout
        lines = [line.split(" ", 1) for line in out.splitlines()]
        return {rest.split(":", 1)[0]: level for level, rest in lines}

    def sh(self, *argv: str) -> str:
        return self.lab.run(self.ns, list(argv)).stdout

    def dnsmasq_pids(self) -> list[int]:
        pids = [int(p) for p in self.sh("ip", "netns", "pids", self.ns).split()]
        return [p for p in pids if _comm(p) == "dnsmasq"]

    def assert_untouched(self) -> None:
        """The namespace as the lab made it: no links but lo, no nftables, forwarding off, no
        dnsmasq, and nothing left in the state directory."""
        assert [link["ifname"] for link in json.loads(self.sh("ip", "-j", "link"))] == ["lo"]
        assert self.sh("nft", "list", "ruleset").strip() == ""
        assert self.sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"
        assert self.dnsmasq_pids() == []
        assert not self.state.exists() or not list(self.state.iterdir())


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


class FakeDaemon:
    """A lease socket that records each message and answers ok, as fastfwd would."""

    def __init__(self, path: str) -> None:
        self.messages: list[dict] = []
        self.got = threading.Event()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                line = f.readline()
                if line:
                    self.messages.append(json.loads(line))
                    f.write(b'{"ok": true}\n')
                    f.flush()
                    self.got.set()

    def close(self) -> None:
        self.sock.close()


def test_check_fails_on_a_bare_host(br: Bridge) -> None:
    done = br("check", "br-vms", ok=False)
    assert done.returncode == 1
    levels = br.checks()
    assert levels == {"bridge": "FAIL", "address": "FAIL", "ip_forward": "WARN", "NAT": "WARN",
                      "firewall": "WARN", "DHCP server": "FAIL", "hook": "FAIL"}


def test_setup_check_idempotent_destroy(br: Bridge) -> None:
    first = br.setup().stdout
    assert "created bridge br-vms" in first and "started dnsmasq" in first
    record = (br.state / "br-vms.json").read_text()
    pids = br.dnsmasq_pids()  # dnsmasq and its script helper
    assert "already serves br-vms" in br.setup().stdout
    assert json.loads((br.state / "br-vms.json").read_text()) == json.loads(record)
    assert br.dnsmasq_pids() == pids

    levels = br.checks()
    assert set(levels.values()) == {"PASS", "WARN"} and levels["hook"] == "WARN"  # no daemon yet
    daemon = FakeDaemon(br.sock)
    try:
        assert set(br.checks().values()) == {"PASS"}
        br("check", "br-vms")  # exit status 0
    finally:
        daemon.close()

    assert "masquerade" in br.sh("nft", "list", "table", "inet", "fastfwd_br_vms")
    out = br("destroy", "br-vms").stdout
    assert "deleted bridge br-vms" in out and "restored net.ipv4.ip_forward = 0" in out
    br.assert_untouched()
    assert "nothing recorded" in br("destroy", "br-vms").stdout


def test_check_fails_when_the_bridge_lacks_the_expected_address(br: Bridge) -> None:
    """docs/vm-hosts.md's check table: the address item fails not only with no address but
    also without the one expected (given, else setup's record)."""
    br.setup("--no-dhcp")
    assert br.checks()["address"] == "PASS"
    assert br.checks("--address", f"{br.subnet}.2/24")["address"] == "FAIL"
    br.sh("ip", "addr", "add", f"{br.subnet}.3/24", "dev", "br-vms")
    br.sh("ip", "addr", "del", f"{br.subnet}.1/24", "dev", "br-vms")
    out = br("check", "br-vms", ok=False).stdout
    assert f"FAIL address: br-vms lacks {br.subnet}.1/24" in out
    br("destroy", "br-vms")


def test_destroy_leaves_what_it_found(br: Bridge) -> None:
    # Already there before setup: the bridge (with another address), forwarding, a table.
    br.sh("ip", "link", "add", "br-vms", "type", "bridge")
    br.sh("ip", "addr", "add", "192.0.2.1/24", "dev", "br-vms")
    br.sh("sysctl", "-w", "net.ipv4.ip_forward=1")
    br.sh("nft", "add", "table", "inet", "theirs")
    br.setup("--no-dhcp")
    assert br.checks()["DHCP server"] == "PASS"  # not wanted, as setup recorded
    br("destroy", "br-vms")
    addrs = br.sh("ip", "-4", "-o", "addr", "show", "dev", "br-vms")
    assert "192.0.2.1/24" in addrs and f"{br.subnet}.1/" not in addrs
    assert br.sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"
    assert "theirs" in br.sh("nft", "list", "tables")
    assert "fastfwd" not in br.sh("nft", "list", "tables")


def test_check_warns_about_foreign_drop_policy(br: Bridge) -> None:
    br.setup("--no-dhcp")
    br.sh("nft", "add", "table", "inet", "theirs")
    br.sh("nft", "add chain inet theirs guard { type filter hook forward priority 0; policy drop; }")
    levels = br.checks()
    assert levels["firewall"] == "WARN"
    assert "inet theirs guard (forward)" in br("check", "br-vms").stdout


def test_check_fails_when_dnsmasq_lacks_our_hook(br: Bridge) -> None:
    br.setup("--no-dhcp")
    br.lab.spawn(br.ns, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=br-vms",
                         "--bind-interfaces", "--port=0", f"--dhcp-range={br.subnet}.100,{br.subnet}.150",
                         f"--dhcp-leasefile={br.lab.dir}/other.leases"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):  # until dnsmasq is up
        if br.dnsmasq_pids():
            break
        time.sleep(0.01)
    out = br.lab.run(br.ns, [sys.executable, SCRIPT, "--state-dir", str(br.lab.dir / "none"),
                             "check", "br-vms"], check=False)
    assert out.returncode == 1
    assert "PASS DHCP server" in out.stdout and "FAIL hook" in out.stdout and "no --dhcp-script" in out.stdout


def test_a_real_lease_reaches_the_lease_socket(br: Bridge) -> None:
    """setup's dnsmasq hands a VM a lease and its hook tells the lease socket."""
    daemon = FakeDaemon(br.sock)
    try:
        br.setup()
        vm = br.lab.netns("vm")
        br.lab.veth(br.ns, "vm1-port", vm, "eth0", mac_b=VM_MAC)
        br.sh("ip", "link", "set", "vm1-port", "master", "br-vms")
        ip = br.lab.dhcp_client(vm, hostname="vm1").wait_address()
        assert daemon.got.wait(30)
        assert daemon.messages[0] == {"event": "add", "mac": VM_MAC, "ip": ip, "hostname": "vm1",
                                      "scope": str(br.state / "br-vms.leases")}
        assert ip.startswith(br.subnet + ".")
    finally:
        daemon.close()


def _one_line_error(done: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    """The command failed with ``status`` and said why in one line naming ``words``."""
    err = done.stderr.strip()
    assert done.returncode == status, done.stdout + done.stderr
    assert err.startswith("fastfwd-bridge: ") and "\n" not in err, err
    assert all(word in err for word in words), err


@pytest.mark.parametrize("args, words", [
    (["setup", "br-vms-is-too-long", "--address", "10.9.0.1/24"], ["br-vms-is-too-long", "15"]),
    (["setup", "br/vms", "--address", "10.9.0.1/24"], ["br/vms"]),
    (["check", "br-vms-is-too-long"], ["br-vms-is-too-long"]),
    (["destroy", "../br-vms"], ["../br-vms"]),
    (["setup", "br-vms", "--address", "10.9.0.0/24"], ["10.9.0.0", "network address"]),
    (["setup", "br-vms", "--address", "10.9.0.255/24"], ["10.9.0.255", "broadcast"]),
    (["setup", "br-vms", "--address", "10.9.0.1/32"], ["/32"]),
    (["setup", "br-vms", "--address", "10.9.0.1/30"], ["10.9.0.0/30", "too small"]),
    (["setup", "br-vms", "--address", "10.9.0.1/24", "--dhcp-range", "10.8.0.10,10.8.0.20"],
     ["10.8.0.10", "10.9.0.0/24"]),
    (["setup", "br-vms", "--address", "10.9.0.1/24", "--dhcp-range", "10.9.0.20,10.9.0.10"],
     ["10.9.0.20,10.9.0.10"]),
    (["setup", "br-vms", "--address", "10.9.0.50/24", "--dhcp-range", "10.9.0.10,10.9.0.100"],
     ["10.9.0.50"]),
    (["setup", "br-vms", "--address", "10.9.0.1/24", "--dhcp-range", "10.9.0.10,10.9.0.255"],
     ["10.9.0.255"]),
])
def test_bad_names_and_addresses_are_refused_before_anything_is_made(br: Bridge, args: list[str],
                                                                     words: list[str]) -> None:
    # Once these went through: a traceback from the kernel's refusal, a bridge whose address is
    # the subnet's own, a range dnsmasq serves nothing from, or a bridge, address and table
    # left behind by the error that came after them.
    _one_line_error(br(*args, ok=None), 2, *words)
    br.assert_untouched()


# What a non-root user runs: the modules it needs imported first (the test's interpreter is
# root's), then privileges dropped, then the command.
AS_NOBODY = """
import os, sys
from fastfwd.host import bridge, cli, dnsmasq, firewall, links, mac, tap
cli._parser()
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["setup", "br-vms", "--address", "10.9.0.1/24"], ["check", "br-vms"],
                                  ["destroy", "br-vms"], ["tap", "vm1", "--bridge", "br-vms", "--user", "0"]])
def test_without_root_one_line_says_so(br: Bridge, args: list[str]) -> None:
    # Once: setup and tap a netlink traceback, check a FAIL for a dnsmasq it cannot see and a
    # WARN for a table it may not list, destroy "nothing recorded" from the user's own state.
    br.sh("ip", "link", "add", "br-vms", "type", "bridge")
    done = br.lab.run(br.ns, [sys.executable, "-c", AS_NOBODY, "--state-dir", str(br.state), *args],
                      check=False, env={**os.environ, "PYTHONPATH": str(Path(SCRIPT).parents[1])})
    _one_line_error(done, 1, "root")
    assert done.stdout == ""


def test_a_setup_that_fails_undoes_what_it_made(br: Bridge) -> None:
    # Something else holds the DHCP port, so dnsmasq cannot start, after the bridge, the
    # address, forwarding and the table are in place: its reason is shown, and all of them go.
    holder = br.lab.socket(br.ns, kind=socket.SOCK_DGRAM)
    try:
        holder.bind(("0.0.0.0", 67))
        done = br.setup(ok=None)
    finally:
        holder.close()
    _one_line_error(done, 1, "dnsmasq", "failed to bind DHCP server socket")
    assert "created bridge br-vms" in done.stdout and "undone: deleted bridge br-vms" in done.stdout
    br.assert_untouched()
    # And a setup run again once the port is free completes.
    assert "started dnsmasq" in br.setup().stdout
    br("destroy", "br-vms")
    br.assert_untouched()


def test_a_dns_only_dnsmasq_on_the_bridge_is_not_taken_for_a_dhcp_server(br: Bridge) -> None:
    # Once: "a DHCP server not started by us serves br-vms; leaving it alone", and no DHCP.
    br.sh("ip", "link", "add", "br-vms", "type", "bridge")
    br.sh("ip", "addr", "add", f"{br.subnet}.1/24", "dev", "br-vms")
    br.sh("ip", "link", "set", "br-vms", "up")
    theirs = br.lab.spawn(br.ns, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--interface=br-vms",
                                  "--bind-interfaces", "--port=5353"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: theirs.pid in br.dnsmasq_pids(), what="their DNS-only dnsmasq")
    assert "started dnsmasq" in br.setup().stdout
    assert br.checks()["DHCP server"] == "PASS"
    br("destroy", "br-vms")
    assert br.dnsmasq_pids() == [theirs.pid]


def test_setup_again_with_other_dhcp_options_applies_them(br: Bridge) -> None:
    # Once: "dnsmasq already serves br-vms", still with the old range, and the hook still
    # telling the old lease socket.
    br.setup()
    other_sock = str(br.lab.dir / "other.sock")
    out = br("setup", "br-vms", "--address", f"{br.subnet}.1/24", "--lease-socket", other_sock,
             "--dhcp-range", f"{br.subnet}.10,{br.subnet}.20").stdout
    assert "started dnsmasq" in out
    (pid,) = {int((br.state / "br-vms.dnsmasq.pid").read_text())} & set(br.dnsmasq_pids())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert f"--dhcp-range={br.subnet}.10,{br.subnet}.20,255.255.255.0,12h".encode() in cmdline
    assert f"--socket {other_sock} " in (br.state / "br-vms-dhcp-hook").read_text()
    assert "already serves" in br("setup", "br-vms", "--address", f"{br.subnet}.1/24", "--lease-socket",
                                  other_sock, "--dhcp-range", f"{br.subnet}.10,{br.subnet}.20").stdout
    br("setup", "br-vms", "--address", f"{br.subnet}.1/24", "--no-dhcp")
    assert br.dnsmasq_pids() == []  # no DHCP wanted now: ours is stopped
    br("destroy", "br-vms")
    br.assert_untouched()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_setup_interrupted_undoes_what_it_made(br: Bridge, tmp_path: Path, sig: signal.Signals) -> None:
    # A dnsmasq that hangs while starting: the operator presses Ctrl-C, a service manager
    # stops the unit, the terminal closes. Once the bridge, address, forwarding and table
    # stayed, with exit status 130 and not a word (Ctrl-C), or nothing undone at all.
    stand_in = tmp_path / "dnsmasq"
    started = tmp_path / "started"
    stand_in.write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 60\n")
    stand_in.chmod(0o755)
    out = tmp_path / "out"
    with out.open("w") as stdout:
        setup = br.lab.spawn(br.ns, [sys.executable, SCRIPT, "--state-dir", str(br.state), "setup", "br-vms",
                                     "--address", f"{br.subnet}.1/24"],
                             env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}, stdout=stdout)
    wait_until(started.exists, what="setup to start dnsmasq")
    setup.send_signal(sig)
    assert setup.wait(30) == 128 + sig
    assert "undone: deleted bridge br-vms" in out.read_text()
    br.assert_untouched()
