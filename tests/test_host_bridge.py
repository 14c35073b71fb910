"""fastfwd-bridge setup / check / destroy, run as the real command inside a fresh namespace
(its own bridge, sysctls, nftables and processes), so the host itself is never touched."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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

    def setup(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self("setup", "br-vms", "--address", f"{self.subnet}.1/24", "--lease-socket", self.sock, *extra)

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
    assert br.sh("ip", "-j", "link") .count("br-vms") == 0
    assert br.sh("nft", "list", "ruleset").strip() == ""
    assert br.sh("sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"
    assert br.dnsmasq_pids() == []
    assert not list(br.state.iterdir())
    assert "nothing recorded" in br("destroy", "br-vms").stdout


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
        assert daemon.messages[0] == {"event": "add", "mac": VM_MAC, "ip": ip, "hostname": "vm1"}
        assert ip.startswith(br.subnet + ".")
    finally:
        daemon.close()
