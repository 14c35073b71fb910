"""End to end on a VM host made of real parts in namespaces (see fastfwd/host/testbed.py):
a bridge, dnsmasq with fastfwd's hook, ``fastfwd run -c``, VMs that take DHCP leases or
static addresses, and a client. Every forwarded byte is compared by hash at the far end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fastfwd.host.lab import Lab
from fastfwd.host.testbed import VmHost, wait_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not (shutil.which("dnsmasq") and shutil.which("busybox")),
                       reason="needs dnsmasq and busybox (udhcpc)"),
]

MAC1 = "52:54:00:e2:e0:01"
MAC2 = "52:54:00:e2:e0:02"


@pytest.fixture
def host() -> Iterator[VmHost]:
    with Lab() as lab:
        vmhost = VmHost(lab)
        try:
            yield vmhost
        finally:
            print(vmhost.log_text())  # pytest shows it only if the test failed


def _ready(host: VmHost, vm_name: str) -> bool:
    try:
        return host.tcp(size=16, timeout=5) == vm_name
    except OSError:
        return False


def _saved(host: VmHost) -> bool:
    """Does the state file hold the leases the daemon reports, as of their last sighting?"""
    state, status = host.state_dir / "leases.json", host.status()
    return state.exists() and status is not None and json.loads(state.read_text())["leases"] == [
        {"mac": x["mac"], "ip": x["ip"], "hostname": x["hostname"], "seen": x["seen"]} for x in status["leases"]]


def test_dhcp_vm_is_followed_through_lease_changes_and_restarts(host: VmHost) -> None:
    host.start_dnsmasq()
    host.write_config(MAC1)
    host.start_daemon()

    # 1. No lease yet: the rule is pending and a connection is refused.
    (rule,) = [r for r in host.status()["rules"] if r["proto"] == "tcp"]
    assert rule["state"] == "pending"
    assert host.refused()

    # 2. The VM takes a lease; the hook tells fastfwd; TCP and UDP reach the VM.
    vm1 = host.add_vm("vm1", MAC1)
    ip1 = vm1.dhcp.wait_address()
    wait_for(lambda: _ready(host, "vm1"), message="forwarding to vm1 after its lease")
    assert host.tcp(size=4 << 20) == "vm1"
    flow = host.udp_flow()
    assert flow.send() == "vm1"

    # 3. The VM is replaced by one with a new MAC and address; the host entry follows it.
    vm2 = host.add_vm("vm2", MAC2)
    ip2 = vm2.dhcp.wait_address()
    assert ip2 != ip1
    host.write_config(MAC2)  # the watched config is reloaded
    wait_for(lambda: _ready(host, "vm2"), message="forwarding to vm2 after the config change")
    assert host.tcp(size=1 << 20) == "vm2"
    # The same UDP flow (one forwarder session) now reaches vm2, and vm1 hears no more of it.
    wait_for(lambda: flow.send() == "vm2", timeout=10, message="the UDP session moving to vm2")
    heard_by_vm1 = vm1.server.udp_count
    for _ in range(50):
        assert flow.send() == "vm2"
    assert vm1.server.udp_count == heard_by_vm1

    # 4. vm2 releases its lease: dnsmasq's hook says del, and the rule is pending again.
    vm2.dhcp.release()
    wait_for(lambda: host.refused(), message="the rule going back to pending after release")
    assert any(r["state"] == "pending" for r in host.status()["rules"])

    # 5. A new lease, then fastfwd is killed and restarted with dnsmasq gone, so no DHCP
    #    event can reach it: forwarding resumes from the persisted leases alone.
    vm2.dhcp.stop()
    vm2.dhcp = host.lab.dhcp_client(vm2.ns, hostname="vm2")
    vm2.dhcp.wait_address()
    wait_for(lambda: _ready(host, "vm2"), message="forwarding to vm2 after its new lease")
    # The state file follows the table within a second (LEASE_SAVE_DELAY); a kill before
    # that would lose the lease until dnsmasq, gone here, said it again.
    wait_for(lambda: _saved(host), message="the lease table saved")
    host.stop_dnsmasq()
    host.kill_daemon()
    host.start_daemon()
    assert host.tcp(size=1 << 20) == "vm2"
    assert host.udp_flow().send() == "vm2"
    flow.close()


def test_static_vm_is_reached_through_the_neighbour_table(host: VmHost) -> None:
    host.sources = "dhcp = false\nneighbours = true"
    host.write_config(MAC1)
    host.start_daemon()
    assert host.refused()
    vm = host.add_vm("vm1", MAC1, static_ip=str(host.net[50]))
    # The guest talks to its gateway, as every booting guest does (ARP for it, at least).
    host.lab.run(vm.ns, ["busybox", "ping", "-c1", "-W2", str(host.gateway.ip)])
    wait_for(lambda: _ready(host, "vm1"), timeout=15, message="forwarding to the static VM")
    assert host.tcp(size=1 << 20) == "vm1"
    assert host.udp_flow().send() == "vm1"


def test_a_dhcp_snapshot_keeps_the_static_vm_the_neighbour_table_found(host: VmHost) -> None:
    """Both sources on one lease table: a DHCP snapshot that does not list the static VM (it
    never asked for a lease) leaves its rule forwarding, not pending until the next resync."""
    host.sources = "dhcp = true\nneighbours = true"
    host.write_config(MAC1)
    host.start_daemon()
    vm = host.add_vm("vm1", MAC1, static_ip=str(host.net[50]))
    host.lab.run(vm.ns, ["busybox", "ping", "-c1", "-W2", str(host.gateway.ip)])
    wait_for(lambda: _ready(host, "vm1"), timeout=15, message="forwarding to the static VM")
    snapshot = subprocess.run([sys.executable, "-m", "fastfwd", "lease", "snapshot", "--socket",
                               str(host.lease_socket), f"{MAC2}={host.net[120]}=other"],
                              capture_output=True, text=True, timeout=30, check=False)
    assert snapshot.returncode == 0, snapshot.stderr
    # Right after the reply, with the neighbour source's next resync 30 s away.
    assert host.tcp(size=1 << 20) == "vm1"
    status = host.status()
    assert status is not None
    assert sorted((x["mac"], x.get("source", "dhcp")) for x in status["leases"]) == [
        (MAC1, "neighbours"), (MAC2, "dhcp")]
