"""``[sources] dhcp_lease_file``: the daemon reads dnsmasq's lease file at start (after its
saved leases) and on SIGHUP, and reconciles it as the hook's ``snapshot`` would, so leases
granted while it was down are not lost. Real daemons, real bytes through real sockets."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd import lease_file as lease_file_module
from fastfwd.config import ConfigError, parse_config
from fastfwd.lease_server import apply_lease_file
from fastfwd.leases import STATE_FILE, Lease, LeaseTable

from helpers_control import EchoServer, daemon, echo_roundtrip, fastfwd, free_port, needs_engine

pytestmark = [needs_engine, pytest.mark.timeout(60)]

A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


@pytest.fixture
def echo2() -> Iterator[EchoServer]:
    """An echo server on 127.0.0.2: a lease's address that is not the test's own."""
    server = EchoServer(host="127.0.0.2")
    yield server
    server.close()


def write_config(tmp: Path, rules: dict[str, str], lease_file: str = "dnsmasq.leases") -> dict[str, int]:
    """A config reading ``lease_file`` (relative: beside the config) with one TCP rule per
    ``name: target``; returns each rule's listening port."""
    ports = {name: free_port() for name in rules}
    text = f'[sources]\ndhcp_lease_file = "{lease_file}"\n'
    for name, target in rules.items():
        text += f'[[forward]]\nname = "{name}"\nlisten = {ports[name]}\nto = "{target}"\n'
    (tmp / "f.toml").write_text(text)
    return ports


def save_state(tmp: Path, *leases: Lease) -> None:
    """The leases a previous run of the daemon saved."""
    LeaseTable(leases, state_file=tmp / "state" / STATE_FILE).save()


def leases_of(tmp: Path) -> list[tuple[str, str, str | None]]:
    result = fastfwd("status", "--json", "--socket", str(tmp / "control.sock"))
    assert result.returncode == 0, result.stderr
    return sorted((x["mac"], x["ip"], x["hostname"]) for x in json.loads(result.stdout)["leases"])


@pytest.mark.parametrize("saved, text, said", [
    # A lease granted while the daemon was down forwards from the start.
    ((), f"1900000000 {A} 127.0.0.2 vm1 01:{A}\n", "DHCP lease file dnsmasq.leases: 1 lease(s), 1 changed"),
    # What a read finds while dnsmasq rewrites its file in place (emptied first): applied as a
    # snapshot, it would drop every lease until dnsmasq's next change.
    ((Lease(A, "127.0.0.2", "vm1"),), "", "dnsmasq.leases is empty (being rewritten?): no lease removed"),
], ids=["granted-while-down", "empty"])
def test_the_lease_file_at_start(tmp_path: Path, echo2: EchoServer, saved: tuple[Lease, ...], text: str,
                                 said: str) -> None:
    save_state(tmp_path, *saved)
    (tmp_path / "dnsmasq.leases").write_text(text)
    ports = write_config(tmp_path, {"ssh": f"vm1:{echo2.port}"})
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["ssh"])
        assert leases_of(tmp_path) == [(A, "127.0.0.2", "vm1")]
        assert said in proc.log()


def test_a_saved_lease_the_file_no_longer_has_is_dropped(tmp_path: Path, echo2: EchoServer) -> None:
    """As a snapshot: the file's IPv4 leases replace the saved ones; the saved IPv6 lease (the
    file's DHCPv6 part names no MACs) stays."""
    save_state(tmp_path, Lease(A, "127.0.0.3", "old1"), Lease(A, "fd00::3"), Lease(B, "127.0.0.4", "vm2"))
    (tmp_path / "dnsmasq.leases").write_text(f"1900000000 {B} 127.0.0.2 vm2 *\n"
                                             "duid 00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a\n")
    ports = write_config(tmp_path, {"gone": f"old1:{echo2.port}", "moved": f"vm2:{echo2.port}"})
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["moved"])  # to its new address, where the echo server is
        assert not echo_roundtrip(ports["gone"])  # pending: refused
        assert leases_of(tmp_path) == [(A, "fd00::3", None), (B, "127.0.0.2", "vm2")]
        assert f"lease {A}: 127.0.0.3 gone" in proc.log()


@pytest.mark.parametrize("make, why", [
    (lambda p: None, "No such file or directory"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: os.mkfifo(p), "not a regular file"),  # opened, it would wait for a writer forever
])
def test_a_lease_file_that_cannot_be_read_leaves_the_saved_leases(tmp_path: Path, echo2: EchoServer, make,
                                                                   why: str) -> None:
    save_state(tmp_path, Lease(A, "127.0.0.2", "vm1"))
    make(tmp_path / "dnsmasq.leases")
    ports = write_config(tmp_path, {"ssh": f"vm1:{echo2.port}"})
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["ssh"])
        lines = [line for line in proc.log().splitlines() if "dnsmasq.leases" in line]
        assert len(lines) == 1 and why in lines[0] and "going on with the 1 lease(s) known" in lines[0], lines


def test_a_malformed_line_is_skipped_and_then_no_lease_is_removed(tmp_path: Path, echo2: EchoServer) -> None:
    """The skipped line may have held a lease the daemon knows (a file read while dnsmasq
    rewrote it, say): the file's good leases are added, none is taken away."""
    save_state(tmp_path, Lease(C, "127.0.0.3", "vm3"))
    (tmp_path / "dnsmasq.leases").write_text(f"1900000000 {A} 127.0.0.2 vm1 *\n"
                                             f"1900000000 {C} 127.0\n")
    ports = write_config(tmp_path, {"ssh": f"vm1:{echo2.port}"})
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["ssh"])
        assert leases_of(tmp_path) == [(A, "127.0.0.2", "vm1"), (C, "127.0.0.3", "vm3")]
        assert "dnsmasq.leases:2: not a dnsmasq lease line; skipped" in proc.log()
        assert "no lease removed" in proc.log()


def test_sighup_reads_the_lease_file_again(tmp_path: Path, echo2: EchoServer) -> None:
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text(f"1900000000 {A} 127.0.0.2 vm1 *\n")
    ports = write_config(tmp_path, {"one": f"vm1:{echo2.port}", "two": f"vm2:{echo2.port}"})
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(ports["one"]) and not echo_roundtrip(ports["two"])
        leases.write_text(f"1900000000 {B} 127.0.0.2 vm2 *\n")  # vm1 released, vm2 granted: events lost
        proc.signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: ")  # the config reload, which comes after the lease file
        assert echo_roundtrip(ports["two"]) and not echo_roundtrip(ports["one"])
        assert proc.log().count("DHCP lease file") == 2


def test_the_setting_is_a_path_beside_the_config_and_needs_dhcp(tmp_path: Path) -> None:
    config = parse_config('[sources]\ndhcp_lease_file = "dnsmasq.leases"\n', base=tmp_path)
    assert config.sources.dhcp_lease_file == str(tmp_path / "dnsmasq.leases")
    assert parse_config("").sources.dhcp_lease_file is None
    with pytest.raises(ConfigError) as info:
        parse_config('[sources]\ndhcp = false\ndhcp_lease_file = "/var/lib/misc/dnsmasq.leases"\n')
    assert info.value.errors == ["sources.dhcp_lease_file: needs dhcp = true (its leases are DHCP leases) (at line 3)"]


LINES = [f"1900000000 {mac} 127.0.0.{i} vm{i} *\n" for i, mac in enumerate((A, B, C), 2)]


@pytest.mark.parametrize("writes, settle, kept", [
    # The first write of a rewrite, cut at a line's end, looks like a whole file without B and
    # C. The second comes 20 ms later: a long settle leaves room for a loaded machine.
    ([LINES[0], "".join(LINES[1:])], 1.0, [A, B, C]),
    # A file that never holds still (60 writes 20 ms apart, over 5 short settles) is not applied.
    ([line for _ in range(20) for line in LINES], 0.1, [B]),
], ids=["cut-at-a-line-end", "never-still"])
def test_a_lease_file_read_while_dnsmasq_rewrites_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture, writes: list[str],
                                                     settle: float, kept: list[str]) -> None:
    """dnsmasq rewrites its lease file in place: emptied, then written in several writes. A
    read between two of them must not remove the leases still to be written."""
    monkeypatch.setattr(lease_file_module, "SETTLE", settle)
    table = LeaseTable([Lease(B, "127.0.0.3", "vm3")])
    path = tmp_path / "dnsmasq.leases"
    with open(path, "w") as f:
        f.write(writes[0])
        f.flush()

        def rewrite_the_rest() -> None:
            for text in writes[1:]:
                time.sleep(0.02)
                f.write(text)
                f.flush()
        writer = threading.Thread(target=rewrite_the_rest)
        writer.start()
        asyncio.run(apply_lease_file(table, str(path)))
        writer.join()
    assert sorted(lease.mac for lease in table) == kept
    if len(writes) > 2:
        assert "was still being written after 5 reads; going on with the 1 lease(s) known" in caplog.text


def test_a_lease_file_emptied_after_it_was_looked_at_removes_no_lease(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """dnsmasq empties its file first when it rewrites it: emptied between the daemon's first
    look and its read, it must change nothing, as a file found empty does."""
    path = tmp_path / "dnsmasq.leases"
    path.write_text(LINES[0])
    read = asyncio.to_thread

    async def emptied_first(*args: object, **kwargs: object) -> object:
        path.write_text("")  # dnsmasq's truncate, just before the read
        return await read(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(asyncio, "to_thread", emptied_first)
    table = LeaseTable([Lease(A, "127.0.0.2", "vm2")])
    assert asyncio.run(apply_lease_file(table, str(path))) == []
    assert [lease.mac for lease in table] == [A]


@pytest.mark.parametrize("expiry", ["１９００００００００", "²"])
def test_a_lease_line_whose_expiry_is_not_ascii_digits_is_malformed(tmp_path: Path, expiry: str) -> None:
    # str.isdigit() is true of other scripts' digits and of '²', which int() refuses.
    path = tmp_path / "dnsmasq.leases"
    path.write_text(f"{expiry} {A} 127.0.0.2 vm2 *\n{LINES[1]}")
    notes: list[str] = []
    text = path.read_text()
    assert lease_file_module.parse_lease_file(text, str(path), notes.append, strict=False) == (
        [{"mac": B, "ip": "127.0.0.3", "hostname": "vm3"}], 1)
    assert notes == [f"{path}:1: not a dnsmasq lease line; skipped"]
    with pytest.raises(lease_file_module.LeaseError, match=":1: not a dnsmasq lease line"):
        lease_file_module.read_lease_file(str(path), notes.append)


def test_a_lease_line_of_an_address_no_machine_holds_is_malformed(tmp_path: Path) -> None:
    # Skipped alone, as the lease socket refuses it, rather than failing the whole file.
    notes: list[str] = []
    text = f"1900000000 {A} 0.0.0.0 vm2 *\n{LINES[1]}"
    assert lease_file_module.parse_lease_file(text, "f", notes.append, strict=False) == (
        [{"mac": B, "ip": "127.0.0.3", "hostname": "vm3"}], 1)
    assert notes == ["f:1: ip: '0.0.0.0' is not a machine's address; skipped"]
