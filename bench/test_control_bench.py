"""pytest-benchmark cases for the control plane's hot spots: ``python -m pytest bench/``.

Not part of the main suite (which collects tests/ only). Port-spec parsing and lease
application need no engine; the rule-set diff runs ``Forwarder.apply`` on a live engine
holding 8,000 ports, so it is skipped where the engine is not built.
"""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

import fastfwd
from fastfwd.leases import Lease, LeaseTable, name_updates, resolve_names

from .control import range_rule, small_rules

LEASES = 1000
#: The lease-burst case: this many events into a saved table of that many leases.
BURST, SAVED_LEASES = 1000, 20_000


def test_parse_port_specs(benchmark) -> None:
    specs = ["8080:127.0.0.1:80", "0.0.0.0:2222:vm1:22", "8000-8099:vm1:8000-8099",
             "[::1]:5353:[::1]:53", "10.0.0.1:443:web.example:8443"]
    benchmark(lambda: [fastfwd.Rule.parse(s) for s in specs])


@pytest.fixture(scope="module")
def forwarder():
    pytest.importorskip("fastfwd._engine")
    loop = asyncio.new_event_loop()
    fw = fastfwd.Forwarder(workers=1)
    loop.run_until_complete(fw.start())
    yield loop, fw
    loop.run_until_complete(fw.close())
    loop.close()


def test_diff_8000_ports_unchanged(benchmark, forwarder) -> None:
    """A reload that changes nothing: the diff alone over 800 rules of 10 ports."""
    loop, fw = forwarder
    table = small_rules()
    loop.run_until_complete(fw.apply(table))
    diff = benchmark(lambda: loop.run_until_complete(fw.apply(table)))
    assert not diff.changed


def test_diff_8000_ports_retarget_one(benchmark, forwarder) -> None:
    """A reload that re-points one of 800 rules (and back, alternately)."""
    loop, fw = forwarder
    tables = [small_rules(), [*small_rules()[:-1], small_rules()[-1].with_target("127.0.0.2")]]
    loop.run_until_complete(fw.apply(tables[0]))
    flip = iter(range(1, 1 << 30))
    diff = benchmark(lambda: loop.run_until_complete(fw.apply(tables[next(flip) % 2])))
    assert len(diff.retargeted) == 1


def test_replace_8000_rules(benchmark, forwarder) -> None:
    """8,000 rules of one port move to another listen address: every rule removed and added,
    each new one on a port a removed one holds (bound once that one is closed)."""
    loop, fw = forwarder
    tables = [[dataclasses.replace(r, listen_host=host) for r in small_rules(span=1)]
              for host in ("127.0.0.1", "127.0.0.2")]
    loop.run_until_complete(fw.apply(tables[0]))
    flip = iter(range(1, 1 << 30))
    diff = benchmark.pedantic(lambda: loop.run_until_complete(fw.apply(tables[next(flip) % 2])), rounds=4)
    assert len(diff.added) == len(diff.removed) == 8000


def test_diff_8000_port_range_rule(benchmark, forwarder) -> None:
    loop, fw = forwarder
    table = range_rule()
    loop.run_until_complete(fw.apply(table))
    benchmark(lambda: loop.run_until_complete(fw.apply(table)))


def _leases(generation: int, n: int = LEASES) -> list[Lease]:
    return [Lease(mac=f"52:54:00:{i >> 16:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                  ip=f"10.{generation}.{i >> 8}.{i & 255}", hostname=f"vm{i}", seen=float(i)) for i in range(n)]


def test_lease_event_into_1000(benchmark) -> None:
    """One DHCP event (a guest's new address) applied to a table of 1,000 leases."""
    table = LeaseTable(_leases(0))
    moves = iter(range(1 << 30))

    def move() -> None:
        n = next(moves)
        i = n % LEASES
        table.apply_event("add", Lease(mac=f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}",
                                       ip=f"10.{1 + n // LEASES % 2}.{i >> 8}.{i & 255}", hostname=f"vm{i}"))
    benchmark(move)


def test_lease_snapshot_1000_and_names(benchmark) -> None:
    """A full snapshot of 1,000 leases, all moved, and the name updates the forwarder gets."""
    table = LeaseTable(_leases(0))
    snapshots = [_leases(1), _leases(0)]
    flip = iter(range(1 << 30))

    def reconcile() -> dict[str, str | None]:
        before = resolve_names({}, table)
        table.apply_snapshot(snapshots[next(flip) % 2])
        return name_updates(before, resolve_names({}, table))
    assert len(benchmark(reconcile)) == LEASES


@pytest.mark.parametrize("save_delay", [0.0, 1.0], ids=["saved-each", "coalesced"])
def test_lease_burst_1000_into_20000_saved(benchmark, tmp_path, save_delay: float) -> None:
    """1,000 DHCP events into a table of 20,000 with a state file, until the file holds them
    all: saved after every change, or saved once for the burst (the daemon's way, with its
    delay; the burst ends with the flush a stop would do)."""
    table = LeaseTable(_leases(0, SAVED_LEASES), state_file=tmp_path / "leases.json", save_delay=save_delay)
    table.save()
    generations = iter(range(1, 1 << 30))
    loop = asyncio.new_event_loop()

    async def burst() -> None:
        for lease in _leases(1 + next(generations) % 2, BURST):  # the first 1,000 guests move
            table.apply_event("add", lease)
        table.flush()
    benchmark.pedantic(lambda: loop.run_until_complete(burst()), rounds=1 if not save_delay else 20)
    loop.close()
    assert len(LeaseTable.restore(tmp_path / "leases.json")) == SAVED_LEASES
