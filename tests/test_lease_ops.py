"""The lease path as a VM host runs it: ``fastfwd run`` with a rule on a VM's name, and the
DHCP hook as dnsmasq runs it (its own process), through daemon restarts and lease changes.
The "VMs" are echo servers on loopback addresses; every check is bytes at the far end."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_control import (REPO, DaemonProcess, EchoServer, connects, daemon, echo_roundtrip, free_port,
                             needs_engine, short_dir, wait_until)
from test_reload import _open_conversation, _still_talks

pytestmark = needs_engine

MAC1, MAC2 = "52:54:00:0e:00:01", "52:54:00:0e:00:02"


def hook(proc: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    """The hook as dnsmasq starts it: arguments only, the socket from the environment."""
    return subprocess.Popen([sys.executable, "-m", "fastfwd.hook", *args], cwd="/", text=True,
                            env={"PYTHONPATH": str(REPO), "FASTFWD_LEASE_SOCKET": str(proc.lease_socket)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def done(started: subprocess.Popen[str]) -> None:
    out, err = started.communicate(timeout=60)
    assert (started.returncode, out, err) == (0, "", "")


def config(path: Path, rules: dict[int, str], **options: object) -> Path:
    """A config file forwarding loopback ports to names (``{port: "vm1:PORT"}``)."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    path.write_text("".join(f'[[forward]]\nlisten = {port}\nto = "{to}"\n{extra}' for port, to in rules.items()))
    return path


@pytest.mark.parametrize("policy", ["keep", "close"])
def test_live_connections_when_the_vm_moves_and_when_its_lease_goes(policy: str) -> None:
    """A new address re-points the rule at once; a released lease makes it refuse new clients.
    Connections already open follow ``on_retarget`` both times, as docs/vm-hosts.md says."""
    old = EchoServer("127.0.0.1", greeting=b"O")
    new = EchoServer("127.0.0.2", greeting=b"N", port=old.port)
    port = free_port()
    try:
        with short_dir() as tmp, daemon(tmp, "-c", str(config(tmp / "f.toml", {port: f"vm1:{old.port}"},
                                                                on_retarget=policy))) as proc:
            assert not connects(port)  # pending: no lease yet
            done(hook(proc, "add", MAC1, "127.0.0.1", "vm1"))
            live = _open_conversation(port, b"O")
            done(hook(proc, "old", MAC1, "127.0.0.2", "vm1"))  # a renewal with a new address
            try:
                _open_conversation(port, b"N").close()  # new clients reach the new address
                assert _still_talks(live) == (policy == "keep")
            finally:
                live.close()
            live = _open_conversation(port, b"N")
            done(hook(proc, "del", MAC1, "127.0.0.2", "vm1"))
            try:
                assert not connects(port)
                assert _still_talks(live) == (policy == "keep")
            finally:
                live.close()
    finally:
        old.close()
        new.close()


def test_a_restarted_daemon_forwards_at_once_and_gets_the_event_sent_while_it_was_down() -> None:
    """Leases handed out before a restart come back from the state file before any DHCP event;
    an event dnsmasq sent while no daemon listened reaches the next one (the hook waits)."""
    vm1 = EchoServer("127.0.0.1")
    vm2 = EchoServer("127.0.0.2", port=vm1.port)
    p1, p2 = free_port(), free_port()
    try:
        with short_dir() as tmp:
            path = config(tmp / "f.toml", {p1: f"vm1:{vm1.port}", p2: f"vm2:{vm2.port}"})
            with daemon(tmp, "-c", str(path)) as proc:
                done(hook(proc, "add", MAC1, "127.0.0.1", "vm1"))
                assert echo_roundtrip(p1) and not connects(p2)
                proc.signal(signal.SIGTERM)
                assert proc.wait() == 0
            late = hook(proc, "add", MAC2, "127.0.0.2", "vm2")  # no daemon now
            try:
                with daemon(tmp, "-c", str(path)) as again:
                    assert echo_roundtrip(p1)  # from the state file: no event has come yet
                    done(late)
                    assert echo_roundtrip(p2)
                    assert again.log().count("lease 52:54:00:0e:00:02: 127.0.0.2 vm2") == 1
            finally:
                if late.poll() is None:
                    late.kill()
                    late.communicate(timeout=30)
    finally:
        vm1.close()
        vm2.close()


def test_a_rule_left_pending_by_a_taken_port_is_tried_again_by_a_reload() -> None:
    """A pending TCP rule holds its port without listening, and another program may listen
    there meanwhile: the lease then leaves that rule pending. A reload (SIGHUP) tries it
    again once the port is free, though the name's address is the same."""
    vm = EchoServer("127.0.0.1", greeting=b"V")
    port = free_port()
    try:
        with short_dir() as tmp, daemon(tmp, "-c", str(config(tmp / "f.toml", {port: f"vm1:{vm.port}"}))) as proc:
            with socket.socket() as squatter:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind(("127.0.0.1", port))
                squatter.listen()
                done(hook(proc, "add", MAC1, "127.0.0.1", "vm1"))
                proc.wait_log("stays pending")
            assert not connects(port)   # the port is free again, the rule still pending
            proc.signal(signal.SIGHUP)
            wait_until(lambda: connects(port), what="the rule to listen after the reload")
            _open_conversation(port, b"V").close()
    finally:
        vm.close()


def test_a_host_name_that_reads_as_an_address_is_dropped_and_leaves_that_addresss_rules_alone() -> None:
    """A guest picks its own host name: one that reads as an address (RFC 1123 rules out
    dotted-decimal names) must not reach the rules that target that address literally, whose
    live connections an on_retarget = "close" would reset at each of its lease events."""
    vm = EchoServer("127.0.0.1", greeting=b"V")
    port = free_port()
    try:
        with short_dir() as tmp, daemon(tmp, "-c", str(config(tmp / "f.toml", {port: f"127.0.0.1:{vm.port}"},
                                                                on_retarget="close"))) as proc:
            live = _open_conversation(port, b"V")
            try:
                started = hook(proc, "add", MAC1, "127.0.0.9", "127.0.0.1")
                out, err = started.communicate(timeout=60)
                assert (started.returncode, out) == (0, "")
                assert err == "fastfwd-dhcp-hook: ignoring invalid host name '127.0.0.1'\n"
                assert _still_talks(live)
            finally:
                live.close()
            assert f"lease {MAC1}: 127.0.0.9\n" in proc.log()
    finally:
        vm.close()
