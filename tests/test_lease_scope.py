"""Several DHCP servers feeding one daemon, each hook naming its own (a scope): a snapshot of
one server's leases leaves the others' leases, and the forwarding to them, alone. Real
daemons, the hook scripts ``fastfwd-bridge`` writes run as dnsmasq runs them, real bytes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd.host import bridge

from helpers_control import EchoServer, daemon, echo_roundtrip, fastfwd, free_port, needs_engine

pytestmark = [needs_engine, pytest.mark.timeout(60)]

A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


@pytest.fixture
def echoes() -> Iterator[tuple[EchoServer, ...]]:
    """Echo servers on 127.0.0.2, .3 and .4: the addresses of VMs on several bridges."""
    servers = tuple(EchoServer(host=f"127.0.0.{i}") for i in (2, 3, 4))
    yield servers
    for server in servers:
        server.close()


def hook_script(tmp: Path, bridge_name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hook script ``fastfwd-bridge setup`` writes for a bridge, running this tree's hook."""
    monkeypatch.setattr(bridge.shutil, "which", lambda name: None)
    return bridge.write_hook(tmp / f"{bridge_name}-dhcp-hook", str(tmp / "lease.sock"),
                             scope=str(tmp / f"{bridge_name}.leases"))


def dnsmasq_runs(script: Path, *args: str, interface: str) -> None:
    """``script`` as dnsmasq runs it: arguments and dnsmasq's environment, no FASTFWD_ one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DNSMASQ_", "FASTFWD_"))}
    env.update(DNSMASQ_INTERFACE=interface, DNSMASQ_LEASE_EXPIRES="1900000000", DNSMASQ_TIME_REMAINING="3600")
    proc = subprocess.run([str(script), *args], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, ""), args


def write_config(tmp: Path, rules: dict[str, str], extra: str = "") -> dict[str, int]:
    ports = {name: free_port() for name in rules}
    text = extra
    for name, target in rules.items():
        text += f'[[forward]]\nname = "{name}"\nlisten = {ports[name]}\nto = "{target}"\n'
    (tmp / "f.toml").write_text(text)
    return ports


def leases_of(tmp: Path) -> list[tuple[str, str, str | None]]:
    result = fastfwd("status", "--json", "--socket", str(tmp / "control.sock"))
    assert result.returncode == 0, result.stderr
    return sorted((x["mac"], x["ip"], x.get("scope")) for x in json.loads(result.stdout)["leases"])


def test_a_snapshot_of_one_bridge_leaves_the_other_bridges_vms_forwarding(
        tmp_path: Path, echoes: tuple[EchoServer, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    a_hook, b_hook = (hook_script(tmp_path, name, monkeypatch) for name in ("br-a", "br-b"))
    a_scope, b_scope = str(tmp_path / "br-a.leases"), str(tmp_path / "br-b.leases")
    ports = write_config(tmp_path, {"a": f"vm1:{echoes[0].port}", "b": f"vm2:{echoes[1].port}",
                                    "u": f"vm3:{echoes[2].port}"})
    with daemon(tmp_path, "-c", "f.toml"):
        dnsmasq_runs(a_hook, "add", A, "127.0.0.2", "vm1", interface="br-a")
        dnsmasq_runs(b_hook, "add", B, "127.0.0.3", "vm2", interface="br-b")
        assert fastfwd("lease", "add", C, "127.0.0.4", "vm3", "--socket", str(tmp_path / "lease.sock")).returncode == 0
        assert all(echo_roundtrip(port) for port in ports.values())
        assert leases_of(tmp_path) == [(A, "127.0.0.2", a_scope), (B, "127.0.0.3", b_scope), (C, "127.0.0.4", None)]
        # vm1 released on br-a while the daemon missed it: br-a's file is exact again, and alone.
        Path(a_scope).write_text(f"1900000000 {A} 127.0.0.9 vm1 *\n")
        dnsmasq_runs(a_hook, "snapshot", a_scope, interface="br-a")
        assert echo_roundtrip(ports["b"]) and not echo_roundtrip(ports["a"])
        assert leases_of(tmp_path) == [(A, "127.0.0.9", a_scope), (B, "127.0.0.3", b_scope), (C, "127.0.0.4", None)]
        # A snapshot without a scope, as before scopes: the unnamed server's leases alone.
        assert fastfwd("lease", "snapshot", "--socket", str(tmp_path / "lease.sock")).returncode == 0
        assert echo_roundtrip(ports["b"]) and not echo_roundtrip(ports["u"])
        assert leases_of(tmp_path) == [(A, "127.0.0.9", a_scope), (B, "127.0.0.3", b_scope)]


def test_the_daemons_lease_file_and_its_bridges_hook_speak_for_the_same_server(
        tmp_path: Path, echoes: tuple[EchoServer, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """``[sources] dhcp_lease_file`` names br-a's file: the daemon's snapshot of it on SIGHUP
    replaces what br-a's hook brought, and leaves br-b's leases alone."""
    a_hook, b_hook = (hook_script(tmp_path, name, monkeypatch) for name in ("br-a", "br-b"))
    a_file = tmp_path / "br-a.leases"
    a_file.write_text(f"1900000000 {A} 127.0.0.2 vm1 *\n")
    ports = write_config(tmp_path, {"a": f"vm1:{echoes[0].port}", "b": f"vm2:{echoes[1].port}"},
                         extra=f'[sources]\ndhcp_lease_file = "{a_file}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["a"])
        dnsmasq_runs(a_hook, "old", A, "127.0.0.2", "vm1", interface="br-a")  # the same server: no change
        dnsmasq_runs(b_hook, "add", B, "127.0.0.3", "vm2", interface="br-b")
        assert leases_of(tmp_path) == [(A, "127.0.0.2", None), (B, "127.0.0.3", str(tmp_path / "br-b.leases"))]
        a_file.write_text(f"1900000000 {C} 127.0.0.4 vm3 *\n")  # vm1's release missed
        proc.signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: ")
        assert echo_roundtrip(ports["b"]) and not echo_roundtrip(ports["a"])
        assert [mac for mac, _, _ in leases_of(tmp_path)] == [B, C]


def test_the_daemons_lease_file_named_through_another_spelling_is_the_unnamed_scope(
        tmp_path: Path, echoes: tuple[EchoServer, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook may name ``dhcp_lease_file`` through a symlinked directory, a ``..`` or a doubled
    slash: it is the same file, so its leases are the unnamed scope's, which the daemon's
    snapshot of that file replaces."""
    monkeypatch.setattr(bridge.shutil, "which", lambda name: None)
    a_file = tmp_path / "br-a.leases"
    a_file.write_text(f"1900000000 {C} 127.0.0.4 vm3 *\n")
    (tmp_path / "link").symlink_to(tmp_path)
    (tmp_path / "sub").mkdir()
    spellings = {A: f"{tmp_path}/link/br-a.leases", B: f"{tmp_path}/sub/../br-a.leases//"}
    hooks = {mac: bridge.write_hook(tmp_path / f"hook-{i}", str(tmp_path / "lease.sock"), scope=scope)
             for i, (mac, scope) in enumerate(spellings.items())}
    ports = write_config(tmp_path, {"a": f"vm1:{echoes[0].port}", "b": f"vm2:{echoes[1].port}"},
                         extra=f'[sources]\ndhcp_lease_file = "{a_file}"\n')
    with daemon(tmp_path, "-c", "f.toml") as proc:
        dnsmasq_runs(hooks[A], "add", A, "127.0.0.2", "vm1", interface="br-a")
        dnsmasq_runs(hooks[B], "add", B, "127.0.0.3", "vm2", interface="br-a")
        assert leases_of(tmp_path) == [(A, "127.0.0.2", None), (B, "127.0.0.3", None), (C, "127.0.0.4", None)]
        assert all(echo_roundtrip(port) for port in ports.values())
        proc.signal(signal.SIGHUP)  # the file never had vm1 and vm2: the snapshot takes them away
        proc.wait_log("SIGHUP: ")
        assert leases_of(tmp_path) == [(C, "127.0.0.4", None)]


def test_leases_sent_by_hand_name_their_scope(tmp_path: Path, echoes: tuple[EchoServer, ...]) -> None:
    """``fastfwd lease --scope``: what an operator sends by hand for one server is replaced by
    that server's snapshot only; a scope the daemon would refuse is a usage error here."""
    ports = write_config(tmp_path, {"a": f"vm1:{echoes[0].port}", "b": f"vm2:{echoes[1].port}"})
    sock = ("--socket", str(tmp_path / "lease.sock"))
    with daemon(tmp_path, "-c", "f.toml"):
        assert fastfwd("lease", "add", "--scope", "br-a", A, "127.0.0.2", "vm1", *sock).returncode == 0
        assert fastfwd("lease", "add", "--scope", "br-b", B, "127.0.0.3", "vm2", *sock).returncode == 0
        assert leases_of(tmp_path) == [(A, "127.0.0.2", "br-a"), (B, "127.0.0.3", "br-b")]
        assert fastfwd("lease", "snapshot", "--scope", "br-a", *sock).returncode == 0
        assert echo_roundtrip(ports["b"]) and not echo_roundtrip(ports["a"])
        assert leases_of(tmp_path) == [(B, "127.0.0.3", "br-b")]
        bad = fastfwd("lease", "del", "--scope", "br\x01b", B, "127.0.0.3", *sock)
        assert (bad.returncode, bad.stderr.strip()) == (
            2, "fastfwd: scope: 'br\\x01b' is not a string of up to 4096 printable characters")
        assert leases_of(tmp_path) == [(B, "127.0.0.3", "br-b")]
