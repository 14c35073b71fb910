"""The lease table: validation, events, snapshots, name resolution and crash-safe persistence."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastfwd.leases import (DHCP, NEIGHBOURS, STATE_FILE, HostEntry, Lease, LeaseChange, LeaseError,
                            LeaseTable, name_updates, normalize_hostname, normalize_ip, normalize_mac,
                            resolve_names)

REPO = Path(__file__).resolve().parents[1]
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def lease(mac: str, ip: str, hostname: str | None = None, seen: float = 1000.0, source: str = DHCP) -> Lease:
    return Lease(mac=mac, ip=ip, hostname=hostname, seen=seen, source=source)


def seen_on_bridge(mac: str, ip: str) -> Lease:
    """A lease the neighbour table found."""
    return lease(mac, ip, source=NEIGHBOURS)


# -- validation --------------------------------------------------------------------------------
def test_mac_is_normalized_to_lowercase() -> None:
    assert normalize_mac("52:54:00:AB:cd:EF") == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize("bad", ["52:54:00:ab:cd", "52-54-00-ab-cd-ef", "5254.00ab.cdef", "52:54:00:ab:cd:eg",
                                 "52:54:00:ab:cd:ef:00", " 52:54:00:ab:cd:ef", "52:54:00:ab:cd:ef\n", "", 525400, None, ["52:54:00:ab:cd:ef"]])
def test_bad_mac_is_rejected(bad: object) -> None:
    with pytest.raises(LeaseError, match="mac"):
        normalize_mac(bad)


def test_ip_is_normalized_to_its_compressed_form() -> None:
    assert normalize_ip("10.0.0.5") == "10.0.0.5"
    assert normalize_ip("FD00:0:0::0005") == "fd00::5"


@pytest.mark.parametrize("bad", ["10.0.0.256", "10.0.0", "fd00::5::1", "vm1", "", "10.0.0.5/24", 167772165, None])
def test_bad_ip_is_rejected(bad: object) -> None:
    with pytest.raises(LeaseError, match="ip"):
        normalize_ip(bad)


def test_hostname_follows_rfc_1123_and_is_lowercased() -> None:
    assert normalize_hostname("VM-1") == "vm-1"
    assert normalize_hostname("1vm.example") == "1vm.example"
    assert normalize_hostname("a" * 63) == "a" * 63
    assert normalize_hostname(".".join(["a" * 63] * 3) + "." + "b" * 61) is not None  # 253 characters
    assert normalize_hostname(None) is None and normalize_hostname("") is None


@pytest.mark.parametrize("bad", ["-vm", "vm-", "vm_1", "vm 1", "a" * 64, "vm..x", ".vm", "vm.",
                                 ".".join(["a" * 63] * 4), "vm\n", "ví", 5, ["vm"]])
def test_bad_hostname_is_rejected(bad: object) -> None:
    with pytest.raises(LeaseError, match="hostname"):
        normalize_hostname(bad)


def test_lease_message_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(LeaseError, match="unknown key 'expires'"):
        Lease.from_message({"mac": A, "ip": "10.0.0.1", "expires": 5})
    with pytest.raises(LeaseError, match="missing 'ip'"):
        Lease.from_message({"mac": A})
    with pytest.raises(LeaseError, match="expected a lease object"):
        Lease.from_message([A, "10.0.0.1"])


def test_host_entry_takes_exactly_one_of_mac_or_ip() -> None:
    assert HostEntry(mac="52:54:00:AA:BB:CC").mac == "52:54:00:aa:bb:cc"
    assert HostEntry(ip="fd00:0::1").ip == "fd00::1"
    for bad in ({}, {"mac": A, "ip": "10.0.0.1"}):
        with pytest.raises(LeaseError, match="exactly one"):
            HostEntry(**bad)
    with pytest.raises(LeaseError):
        HostEntry(mac="nope")


# -- events ------------------------------------------------------------------------------------
def test_add_then_del_reports_each_change() -> None:
    table = LeaseTable()
    added = table.apply_event("add", lease(A, "10.0.0.1", "vm1"))
    assert added == [LeaseChange(None, lease(A, "10.0.0.1", "vm1"))]
    assert table.for_mac(A) == lease(A, "10.0.0.1", "vm1")
    gone = table.apply_event("del", lease(A, "10.0.0.1"))
    assert gone == [LeaseChange(lease(A, "10.0.0.1", "vm1"), None)]
    assert len(table) == 0 and table.for_mac(A) is None


def test_old_repeating_the_same_lease_is_no_change_and_keeps_seen() -> None:
    # ``seen`` is when the lease took its form: the order of claims to a host name.
    table = LeaseTable([lease(A, "10.0.0.1", "vm1", seen=1.0)])
    assert table.apply_event("old", lease(A, "10.0.0.1", "vm1", seen=2.0)) == []
    assert table.for_mac(A).seen == 1.0


def test_new_address_for_a_mac_replaces_the_old_one() -> None:
    table = LeaseTable([lease(A, "10.0.0.1")])
    changes = table.apply_event("add", lease(A, "10.0.0.7"))
    assert changes == [LeaseChange(lease(A, "10.0.0.1"), lease(A, "10.0.0.7"))]
    assert [x.ip for x in table] == ["10.0.0.7"]


def test_late_del_for_an_address_the_mac_no_longer_holds_changes_nothing() -> None:
    table = LeaseTable([lease(A, "10.0.0.7")])
    assert table.apply_event("del", lease(A, "10.0.0.1")) == []
    assert table.for_mac(A).ip == "10.0.0.7"


def test_address_given_to_a_new_mac_is_taken_from_its_previous_holder() -> None:
    table = LeaseTable([lease(A, "10.0.0.1", "old-vm")])
    changes = table.apply_event("add", lease(B, "10.0.0.1", "new-vm"))
    assert LeaseChange(lease(A, "10.0.0.1", "old-vm"), None) in changes
    assert LeaseChange(None, lease(B, "10.0.0.1", "new-vm")) in changes
    assert table.for_mac(A) is None


def test_ipv4_and_ipv6_leases_of_one_mac_live_side_by_side() -> None:
    table = LeaseTable()
    table.apply_event("add", lease(A, "10.0.0.1"))
    table.apply_event("add", lease(A, "fd00::1"))
    assert len(table) == 2
    assert table.for_mac(A).ip == "10.0.0.1"  # IPv4 first
    table.apply_event("del", lease(A, "10.0.0.1"))
    assert table.for_mac(A).ip == "fd00::1"


def test_unknown_event_is_rejected_and_changes_nothing() -> None:
    table = LeaseTable([lease(A, "10.0.0.1")])
    with pytest.raises(LeaseError, match="event"):
        table.apply_event("renew", lease(A, "10.0.0.2"))
    assert [x.ip for x in table] == ["10.0.0.1"]


# -- snapshots ---------------------------------------------------------------------------------
def test_snapshot_reconciles_anything_absent_is_gone() -> None:
    table = LeaseTable([lease(A, "10.0.0.1"), lease(B, "10.0.0.2"), lease(C, "10.0.0.3", "c")])
    changes = table.apply_snapshot([lease(A, "10.0.0.1"), lease(C, "10.0.0.9", "c")])
    assert changes == [LeaseChange(lease(B, "10.0.0.2"), None),
                       LeaseChange(lease(C, "10.0.0.3", "c"), lease(C, "10.0.0.9", "c"))]
    assert {x.mac: x.ip for x in table} == {A: "10.0.0.1", C: "10.0.0.9"}


def test_empty_snapshot_clears_the_table() -> None:
    table = LeaseTable([lease(A, "10.0.0.1")])
    assert len(table.apply_snapshot([])) == 1 and len(table) == 0


@pytest.mark.parametrize("snapshot, error", [
    ([lease(A, "10.0.0.1"), lease(A, "10.0.0.2")], "twice"),
    ([lease(A, "10.0.0.1"), lease(B, "10.0.0.1")], "both"),
])
def test_inconsistent_snapshot_changes_nothing(snapshot: list[Lease], error: str) -> None:
    table = LeaseTable([lease(C, "10.0.0.3")])
    with pytest.raises(LeaseError, match=error):
        table.apply_snapshot(snapshot)
    assert [x.mac for x in table] == [C]


def test_a_snapshot_of_one_family_leaves_the_other_familys_leases() -> None:
    table = LeaseTable([lease(A, "10.0.0.1"), lease(A, "fd00::1"), lease(B, "fd00::2")])
    changes = table.apply_snapshot([lease(C, "10.0.0.3")], family=4)
    assert sorted(changes, key=str) == sorted([LeaseChange(lease(A, "10.0.0.1"), None),
                                              LeaseChange(None, lease(C, "10.0.0.3"))], key=str)
    assert sorted((x.mac, x.ip) for x in table) == [(A, "fd00::1"), (B, "fd00::2"), (C, "10.0.0.3")]
    with pytest.raises(LeaseError, match="an IPv4 snapshot lists fd00::9"):
        table.apply_snapshot([lease(C, "fd00::9")], family=4)
    assert table.apply_snapshot([], family=6) == [LeaseChange(lease(A, "fd00::1"), None),
                                                  LeaseChange(lease(B, "fd00::2"), None)]
    assert [(x.mac, x.ip) for x in table] == [(C, "10.0.0.3")]


# -- sources: DHCP and the neighbour table ------------------------------------------------------
def test_a_dhcp_snapshot_keeps_the_leases_the_neighbour_table_found() -> None:
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1"), lease(B, "10.0.0.2")])
    changes = table.apply_snapshot([lease(C, "10.0.0.3")])
    assert changes == [LeaseChange(lease(B, "10.0.0.2"), None), LeaseChange(None, lease(C, "10.0.0.3"))]
    assert list(table) == [seen_on_bridge(A, "10.0.0.1"), lease(C, "10.0.0.3")]
    assert table.apply_snapshot([]) == [LeaseChange(lease(C, "10.0.0.3"), None)]
    assert list(table) == [seen_on_bridge(A, "10.0.0.1")]


def test_a_neighbour_snapshot_keeps_the_dhcp_leases() -> None:
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1"), lease(B, "10.0.0.2")])
    assert table.apply_snapshot([], source=NEIGHBOURS) == [LeaseChange(seen_on_bridge(A, "10.0.0.1"), None)]
    assert list(table) == [lease(B, "10.0.0.2")]
    # DHCP wins where they meet: B's address and B's MAC stay B's DHCP lease.
    assert table.apply_snapshot([seen_on_bridge(C, "10.0.0.2"), seen_on_bridge(B, "10.0.0.9")],
                                source=NEIGHBOURS) == []
    assert list(table) == [lease(B, "10.0.0.2")]
    with pytest.raises(LeaseError, match="a neighbours snapshot lists a dhcp lease"):
        table.apply_snapshot([lease(C, "10.0.0.3")], source=NEIGHBOURS)


def test_dhcp_wins_over_the_neighbour_table_for_a_mac_and_for_an_address() -> None:
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1"), seen_on_bridge(B, "10.0.0.2")])
    # A DHCP lease replaces what the bridge saw of the same MAC, and takes its address from another.
    assert table.apply_event("add", lease(A, "10.0.0.5", "vm1")) == [
        LeaseChange(seen_on_bridge(A, "10.0.0.1"), lease(A, "10.0.0.5", "vm1"))]
    assert table.apply_event("add", lease(C, "10.0.0.2")) == [
        LeaseChange(seen_on_bridge(B, "10.0.0.2"), None), LeaseChange(None, lease(C, "10.0.0.2"))]
    # A sighting never replaces a DHCP lease, neither its MAC's nor its address's.
    assert table.apply_event("add", seen_on_bridge(A, "10.0.0.7")) == []
    assert table.apply_event("add", seen_on_bridge(B, "10.0.0.5")) == []
    assert list(table) == [lease(A, "10.0.0.5", "vm1"), lease(C, "10.0.0.2")]


def test_a_dhcp_snapshot_takes_over_what_the_bridge_saw_of_its_macs_and_addresses() -> None:
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1"), seen_on_bridge(B, "10.0.0.2")])
    changes = table.apply_snapshot([lease(A, "10.0.0.1", "vm1"), lease(C, "10.0.0.2")])
    assert changes == [LeaseChange(seen_on_bridge(A, "10.0.0.1"), lease(A, "10.0.0.1", "vm1")),
                       LeaseChange(seen_on_bridge(B, "10.0.0.2"), None), LeaseChange(None, lease(C, "10.0.0.2"))]


def test_a_source_deletes_only_its_own_leases() -> None:
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1"), lease(B, "10.0.0.2")])
    assert table.apply_event("del", lease(A, "10.0.0.1")) == []
    assert table.apply_event("del", seen_on_bridge(B, "10.0.0.2")) == []
    assert len(table) == 2
    assert table.apply_event("del", seen_on_bridge(A, "10.0.0.1")) == [LeaseChange(seen_on_bridge(A, "10.0.0.1"), None)]
    assert table.holding("10.0.0.2") == lease(B, "10.0.0.2") and table.holding("10.0.0.1") is None


def test_a_source_changing_is_a_change() -> None:
    """Saved, so that after a restart the right source may remove it."""
    table = LeaseTable([seen_on_bridge(A, "10.0.0.1")])
    assert table.apply_event("add", lease(A, "10.0.0.1")) == [LeaseChange(seen_on_bridge(A, "10.0.0.1"),
                                                                          lease(A, "10.0.0.1"))]


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(LeaseError, match="source: expected one of neighbours, dhcp, got 'arp'"):
        lease(A, "10.0.0.1", source="arp")


# -- names -------------------------------------------------------------------------------------
def test_dhcp_hostnames_resolve_to_their_address() -> None:
    table = LeaseTable([lease(A, "10.0.0.1", "vm1"), lease(B, "10.0.0.2")])
    assert resolve_names({}, table) == {"vm1": "10.0.0.1"}


def test_host_entries_by_mac_and_by_ip() -> None:
    table = LeaseTable([lease(A, "10.0.0.1"), lease(B, "fd00::2")])
    hosts = {"web": HostEntry(mac=A), "db": HostEntry(mac=B), "fixed": HostEntry(ip="192.0.2.1"),
             "off": HostEntry(mac=C)}
    assert resolve_names(hosts, table) == {"web": "10.0.0.1", "db": "fd00::2", "fixed": "192.0.2.1"}


def test_explicit_host_entry_wins_over_a_dhcp_hostname_even_without_a_lease() -> None:
    table = LeaseTable([lease(A, "10.0.0.1", "web"), lease(B, "10.0.0.2", "db")])
    hosts = {"web": HostEntry(ip="192.0.2.1"), "db": HostEntry(mac=C)}
    assert resolve_names(hosts, table) == {"web": "192.0.2.1"}


def test_shared_dhcp_hostname_goes_to_the_most_recently_seen_and_prefers_ipv4() -> None:
    table = LeaseTable([lease(A, "10.0.0.1", "vm", seen=1.0), lease(B, "10.0.0.2", "vm", seen=2.0),
                        lease(C, "fd00::3", "vm", seen=3.0)])
    assert resolve_names({}, table) == {"vm": "10.0.0.2"}


def test_name_updates_lists_moved_new_and_gone_names() -> None:
    before = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    after = {"a": "10.0.0.1", "b": "10.0.0.9", "d": "10.0.0.4"}
    assert name_updates(before, after) == {"b": "10.0.0.9", "c": None, "d": "10.0.0.4"}


# -- persistence -------------------------------------------------------------------------------
def test_changes_are_saved_and_restored(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    table = LeaseTable.restore(state)
    assert len(table) == 0 and not state.exists()
    table.apply_event("add", lease(A, "10.0.0.1", "vm1", seen=5.0))
    table.apply_event("add", lease(B, "fd00::2", seen=6.0))
    again = LeaseTable.restore(state)
    assert list(again) == list(table) == [lease(A, "10.0.0.1", "vm1", 5.0), lease(B, "fd00::2", None, 6.0)]
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind


def test_no_change_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    table = LeaseTable.restore(state)
    table.apply_event("del", lease(A, "10.0.0.1"))
    assert not state.exists()


@pytest.mark.timeout(30)
def test_a_large_table_restores_and_takes_events_in_linear_time(tmp_path: Path) -> None:
    """40,000 leases (a snapshot's limit is about 80,000): restoring once took minutes, every
    restored entry scanning the whole table for its address."""
    state = tmp_path / STATE_FILE
    many = [lease(f"52:54:00:{i >> 16:02x}:{i >> 8 & 255:02x}:{i & 255:02x}", f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}")
            for i in range(40_000)]
    LeaseTable(state_file=state).apply_snapshot(many)
    table = LeaseTable.restore(state)
    assert list(table) == many
    taken = lease("52:54:01:00:00:01", many[-1].ip)  # a MAC not in the table takes an address
    assert table.apply_event("add", taken) == [LeaseChange(many[-1], None), LeaseChange(None, taken)]
    assert len(LeaseTable.restore(state)) == 40_000


def test_the_table_agrees_with_a_plain_model_over_random_events() -> None:
    """Events of both sources and DHCP snapshots against a table that scans everything: the
    address index and the precedence of DHCP must never disagree with it."""
    rng = random.Random(7)
    table, model = LeaseTable(), {}
    macs, ips = [A, B, C], ["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"]
    for step in range(3000):
        if step % 97 == 0:
            chosen = {(x.mac, x.key[1]): x for x in (lease(rng.choice(macs), ip) for ip in rng.sample(ips, 2))}
            table.apply_snapshot(chosen.values())
            taken = {x.ip for x in chosen.values()}
            model = {k: v for k, v in model.items() if v.source == NEIGHBOURS and k not in chosen and v.ip not in taken}
            model.update(chosen)
            assert list(table) == sorted(model.values(), key=lambda x: x.key)
            continue
        event = rng.choice(["add", "old", "del"])
        new = lease(rng.choice(macs), rng.choice(ips), source=rng.choice([DHCP, NEIGHBOURS]))
        before = dict(model)
        if event == "del":
            if new.key in model and model[new.key].ip == new.ip and model[new.key].source == new.source:
                del model[new.key]
        elif new.source == DHCP or not any(v.source == DHCP for k, v in model.items()
                                           if k == new.key or v.ip == new.ip):
            model = {k: v for k, v in model.items() if v.ip != new.ip or k == new.key}
            model[new.key] = new
        expected = [LeaseChange(before.get(k), model.get(k)) for k in sorted(before.keys() | model.keys())
                    if before.get(k) != model.get(k)]
        assert table.apply_event(event, new) == expected, (step, event, new)
        assert list(table) == sorted(model.values(), key=lambda x: x.key)


def _saved(tmp_path: Path) -> tuple[Path, bytes]:
    state = tmp_path / STATE_FILE
    table = LeaseTable.restore(state)
    table.apply_snapshot([lease(A, "10.0.0.1", "vm1"), lease(B, "10.0.0.2", "vm2"), lease(C, "fd00::3")])
    return state, state.read_bytes()


def test_state_file_cut_short_anywhere_never_loads(tmp_path: Path) -> None:
    state, whole = _saved(tmp_path)
    cuts = sorted({1, 10, len(whole) // 3, len(whole) // 2, len(whole) - 30, len(whole) - 3, len(whole) - 2})
    for cut in cuts:
        state.write_bytes(whole[:cut])
        table = LeaseTable.restore(state)
        assert len(table) == 0, f"cut at {cut} of {len(whole)} loaded"
        aside = state.with_name(STATE_FILE + ".corrupt")
        assert aside.read_bytes() == whole[:cut] and not state.exists()


def test_state_file_with_an_altered_entry_is_rejected_whole(tmp_path: Path) -> None:
    state, whole = _saved(tmp_path)
    state.write_bytes(whole.replace(b"10.0.0.2", b"10.0.0.9"))  # still valid JSON, checksum now wrong
    assert len(LeaseTable.restore(state)) == 0
    assert state.with_name(STATE_FILE + ".corrupt").exists()


@pytest.mark.parametrize("text", ["", "null", "[]", '{"version": 99, "leases": []}', "\x00\x00\x00"])
def test_state_file_that_is_not_lease_state_is_rejected(tmp_path: Path, text: str) -> None:
    state = tmp_path / STATE_FILE
    state.write_text(text)
    assert len(LeaseTable.restore(state)) == 0
    assert state.with_name(STATE_FILE + ".corrupt").exists()


def _write_state(state: Path, entries: list) -> None:
    """A state file as version 1 has always written it (the checksum computed here, not by
    the code under test, so that the format stays what older files hold)."""
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    state.write_text(json.dumps({"version": 1, "sha256": digest, "leases": entries}))


def test_intact_state_keeps_the_entries_that_validate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = [lease(A, "10.0.0.1", "vm1").to_json(), {"mac": "bogus", "ip": "10.0.0.2", "hostname": None, "seen": 1.0},
               {"mac": B, "ip": "10.0.0.3", "hostname": None}]
    state = tmp_path / STATE_FILE
    _write_state(state, entries)
    table = LeaseTable.restore(state)
    assert [x.mac for x in table] == [A]
    assert "entry 1 skipped" in caplog.text and "entry 2 skipped" in caplog.text


def test_a_saved_host_name_now_refused_loses_the_name_not_the_lease(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # Saved before dotted-decimal names were refused: the MAC's rules still need its address.
    state = tmp_path / STATE_FILE
    _write_state(state, [{"mac": A, "ip": "10.0.0.1", "hostname": "10.0.0.9", "seen": 1.0}])
    assert list(LeaseTable.restore(state)) == [lease(A, "10.0.0.1", seen=1.0)]
    assert "'10.0.0.9'" in caplog.text


def test_restore_removes_temp_files_of_an_interrupted_write(tmp_path: Path) -> None:
    state, whole = _saved(tmp_path)
    partial = tmp_path / f".{STATE_FILE}.abc123.tmp"
    partial.write_bytes(whole[:20])
    assert len(LeaseTable.restore(state)) == 3
    assert not partial.exists()


_WRITER = textwrap.dedent("""
    import os, signal, sys
    from fastfwd.leases import Lease, LeaseTable
    table = LeaseTable.restore(sys.argv[1])
    for i in range(1, 10**6):
        table.apply_event("add", Lease(mac="52:54:00:00:%02x:%02x" % (i // 256 % 256, i % 256),
                                       ip="10.1.%d.%d" % (i // 256 % 256, i % 256), seen=float(i)))
        print("saved", flush=True)
        if sys.argv[2] == "after-save" and i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_9_right_after_a_save_restores_everything(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(state), "after-save"], cwd=REPO,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    table = LeaseTable.restore(state)
    assert len(table) == 5 and table.for_mac("52:54:00:00:00:05").ip == "10.1.0.5"


def test_kill_9_in_the_middle_of_writing_leaves_a_consistent_state(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(state), "forever"], cwd=REPO,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        for _ in range(20):  # 20 saves done; the writer is now busy with the next ones
            assert proc.stdout.readline() == b"saved\n"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    table = LeaseTable.restore(state)
    n = len(table)
    assert n >= 20
    # Every save holds leases 1..n: a torn or partial write would break the sequence or be rejected.
    assert sorted(x.seen for x in table) == [float(i) for i in range(1, n + 1)]
    assert not state.with_name(STATE_FILE + ".corrupt").exists()


def test_sources_are_saved_and_a_file_from_before_sources_loads_as_dhcp(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    table = LeaseTable(state_file=state)
    table.apply_event("add", lease(A, "10.0.0.1", "vm1"))
    table.apply_event("add", seen_on_bridge(B, "10.0.0.2"))
    assert list(LeaseTable.restore(state)) == [lease(A, "10.0.0.1", "vm1"), seen_on_bridge(B, "10.0.0.2")]
    # DHCP, the default, is not written: a file of DHCP leases reads as before, old versions included.
    entries = json.loads(state.read_text())["leases"]
    assert [e.get("source") for e in entries] == [None, "neighbours"] and "source" not in entries[0]
    _write_state(state, [{"mac": A, "ip": "10.0.0.1", "hostname": "vm1", "seen": 5.0}])
    assert list(LeaseTable.restore(state)) == [lease(A, "10.0.0.1", "vm1", seen=5.0, source=DHCP)]


def _burst(table: LeaseTable, n: int) -> None:
    for i in range(n):
        table.apply_event("add", lease(f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}", f"10.1.{i >> 8}.{i & 255}"))


def test_with_a_save_delay_a_burst_is_saved_once_on_flush(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE

    async def burst() -> LeaseTable:
        table = LeaseTable.restore(state, save_delay=3600)
        _burst(table, 1000)
        assert not state.exists()  # nothing written yet: the delay has an hour to run
        table.flush()
        return table
    table = asyncio.run(burst())
    assert list(LeaseTable.restore(state)) == list(table) and len(table) == 1000
    table.flush()  # nothing new: no timer left, nothing to write


def test_with_a_save_delay_a_burst_is_saved_when_it_runs_out(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE

    async def burst() -> None:
        table = LeaseTable.restore(state, save_delay=0.05)
        _burst(table, 300)
        for _ in range(400):  # bounded: 20 s
            if state.exists():
                break
            await asyncio.sleep(0.05)
        assert len(LeaseTable.restore(state)) == 300
    asyncio.run(burst())


def test_a_state_file_that_cannot_be_written_does_not_stop_the_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    table = LeaseTable(state_file=tmp_path / "file" / STATE_FILE)
    assert len(table.apply_event("add", lease(A, "10.0.0.1"))) == 1
    assert table.for_mac(A) is not None
    assert "cannot save leases" in caplog.text
    (tmp_path / "file").unlink()  # the disk is writable again: the next flush saves what was missed
    table.flush()
    assert list(LeaseTable.restore(tmp_path / "file" / STATE_FILE)) == [lease(A, "10.0.0.1")]


def test_a_timed_save_that_fails_is_retried_until_it_succeeds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fastfwd.leases")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # the state file's directory cannot be made, even by root
    state = blocker / STATE_FILE

    async def run() -> None:
        table = LeaseTable(state_file=state, save_delay=0.01)
        attempts = []
        save = table.save
        table.save = lambda: (attempts.append(1), save())[1]  # type: ignore[method-assign]
        table.apply_event("add", lease(A, "10.0.0.1"))
        for _ in range(1000):  # bounded: 20 s
            if len(attempts) >= 3:
                break
            await asyncio.sleep(0.02)
        assert len(attempts) >= 3 and not state.exists()
        blocker.unlink()  # the disk is writable again; no further change comes
        for _ in range(1000):
            if state.exists():
                break
            await asyncio.sleep(0.02)
        table.flush()  # cancels any timer left, so none outlives the loop
    asyncio.run(run())
    assert list(LeaseTable.restore(state)) == [lease(A, "10.0.0.1")]
    failures = [r for r in caplog.records if "cannot save leases" in r.getMessage()]
    assert len(failures) == 1  # one line for the streak, not one per retry
    assert f"leases saved to {state} again" in caplog.text


def test_a_change_during_a_streak_of_failed_saves_is_tried_within_the_save_delay(tmp_path: Path) -> None:
    """The backoff paces retries of what is already unsaved; a new change must not wait up to
    SAVE_RETRY_MAX behind it (the disk may have been fixed since)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = blocker / STATE_FILE

    async def run() -> None:
        loop = asyncio.get_running_loop()
        table = LeaseTable(state_file=state, save_delay=0.01)
        attempts = []
        save = table.save
        table.save = lambda: (attempts.append(1), save())[1]  # type: ignore[method-assign]
        table.apply_event("add", lease(A, "10.0.0.1"))
        for _ in range(1000):  # bounded: 20 s; the 8th retry waits 1.28 s
            if len(attempts) >= 8:
                break
            await asyncio.sleep(0.02)
        assert table._save_timer is not None and table._save_timer.when() - loop.time() > 0.5
        blocker.unlink()
        table.apply_event("add", lease(B, "10.0.0.2"))
        due = table._save_timer.when() if table._save_timer is not None else None
        assert due is not None and due - loop.time() <= 0.01
        table.apply_event("del", lease(B, "10.0.0.2"))
        table.apply_event("add", lease(B, "10.0.0.2"))
        assert table._save_timer is not None and table._save_timer.when() == due  # not put off
        for _ in range(1000):
            if state.exists():
                break
            await asyncio.sleep(0.005)
        table.flush()
    asyncio.run(run())
    assert list(LeaseTable.restore(state)) == [lease(A, "10.0.0.1"), lease(B, "10.0.0.2")]


def test_a_flush_that_fails_says_so_even_while_timed_saves_keep_failing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Timed retries log a failure once per streak; the flush at stop is the last chance, and
    its failure must be logged too, or the daemon ends losing leases without a word."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    state = blocker / STATE_FILE

    async def run() -> None:
        table = LeaseTable(state_file=state, save_delay=0.01)
        table.apply_event("add", lease(A, "10.0.0.1"))
        for _ in range(1000):  # bounded: 20 s
            if "cannot save leases" in caplog.text:
                break
            await asyncio.sleep(0.02)
        table.apply_event("add", lease(B, "10.0.0.2"))
        table.flush()
    asyncio.run(run())
    failures = [r for r in caplog.records if "cannot save leases" in r.getMessage()]
    assert len(failures) == 2, caplog.text


def test_leases_are_validated_and_normalized_however_they_are_made() -> None:
    assert Lease(mac="52:54:00:AA:BB:CC", ip="FD00::0:1", hostname="VM1") == Lease(
        mac="52:54:00:aa:bb:cc", ip="fd00::1", hostname="vm1")
    with pytest.raises(LeaseError, match="mac"):
        Lease(mac="bogus", ip="10.0.0.1")


@pytest.mark.parametrize("name", ["10.0.0.9", "127.0.0.1", "1.2.3.4"])
def test_a_host_name_that_reads_as_an_ipv4_address_is_rejected(name: str) -> None:
    with pytest.raises(LeaseError, match="hostname"):
        normalize_hostname(name)
    assert normalize_hostname("10.0.0.vm") == "10.0.0.vm" and normalize_hostname("42") == "42"


# -- scopes: which DHCP server granted a lease ---------------------------------------------------
def test_a_snapshot_replaces_only_the_leases_of_its_scope() -> None:
    table = LeaseTable([Lease(A, "10.0.0.1", "vm1", scope="br-a"), Lease(B, "10.0.1.2", "vm2", scope="br-b"),
                        Lease(C, "10.0.2.3", "vm3"), Lease(A, "fd00::a", scope="br-a")])
    changes = table.apply_snapshot([Lease(A, "10.0.0.9", scope="br-a")], family=4, scope="br-a")
    assert [(c.old and c.old.ip, c.new and c.new.ip) for c in changes] == [("10.0.0.1", "10.0.0.9")]
    assert sorted((x.ip, x.scope) for x in table) == [
        ("10.0.0.9", "br-a"), ("10.0.1.2", "br-b"), ("10.0.2.3", ""), ("fd00::a", "br-a")]
    # A snapshot without a scope is the unnamed server's, as before scopes: the others stay.
    assert [c.old.ip for c in table.apply_snapshot([]) if c.old] == ["10.0.2.3"]
    assert sorted(x.ip for x in table) == ["10.0.0.9", "10.0.1.2", "fd00::a"]
    with pytest.raises(LeaseError, match="scope"):
        table.apply_snapshot([Lease(C, "10.0.2.3", scope="br-a")], scope="br-b")


def test_a_scope_takes_a_lease_another_scope_granted_and_removes_only_its_own() -> None:
    """A VM moved to another bridge: that bridge's server now speaks for its lease. The move is
    no new claim to the lease's host name, so it does not take the name from a later claim."""
    table = LeaseTable([lease(A, "10.0.0.1", "vm1", seen=1.0, source=DHCP)])
    table.apply_event("add", Lease(B, "10.0.0.2", "vm1", seen=2.0, scope="br-b"))
    moved = table.apply_event("old", Lease(A, "10.0.0.1", "vm1", seen=3.0, scope="br-a"))
    assert [(c.old.scope, c.new.scope) for c in moved if c.old and c.new] == [("", "br-a")]
    assert table.for_mac(A) == Lease(A, "10.0.0.1", "vm1", seen=1.0, scope="br-a")
    assert table.named("vm1") == "10.0.0.2"
    # The snapshot of the server that lost it does not remove it, nor does that server's del.
    assert table.apply_snapshot([], scope="") == []
    assert table.apply_event("del", Lease(A, "10.0.0.1")) == []
    assert len(table.apply_event("del", Lease(A, "10.0.0.1", scope="br-a"))) == 1
    # A snapshot that lists another scope's lease takes it, as an event would.
    table.apply_snapshot([Lease(B, "10.0.0.2", "vm1", scope="br-a")], scope="br-a")
    assert [(x.mac, x.scope, x.seen) for x in table] == [(B, "br-a", 2.0)]


def test_scopes_are_saved_and_a_file_from_before_scopes_loads_unscoped(tmp_path: Path) -> None:
    state = tmp_path / STATE_FILE
    table = LeaseTable(state_file=state)
    table.apply_event("add", Lease(A, "10.0.0.1", "vm1", seen=1.0, scope="/var/lib/fastfwd/host/br-a.leases"))
    table.apply_event("add", Lease(B, "10.0.0.2", seen=2.0))
    assert list(LeaseTable.restore(state)) == list(table)
    entries = json.loads(state.read_text())["leases"]
    assert [e.get("scope") for e in entries] == ["/var/lib/fastfwd/host/br-a.leases", None]
    _write_state(state, [{"mac": A, "ip": "10.0.0.1", "hostname": "vm1", "seen": 5.0}])
    assert [x.scope for x in LeaseTable.restore(state)] == [""]


@pytest.mark.parametrize("bad", [5, "br\n0", "x" * 4097, ["br-a"]], ids=["int", "newline", "long", "list"])
def test_a_scope_is_a_string_of_printable_characters(bad: object) -> None:
    with pytest.raises(LeaseError, match="scope"):
        Lease(A, "10.0.0.1", scope=bad)  # type: ignore[arg-type]
