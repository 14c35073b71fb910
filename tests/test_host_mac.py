"""Deterministic VM MACs: fixed vectors (the rule must never drift) and the bit rules."""
from __future__ import annotations

import pytest

from fastfwd.host.mac import parse_prefix, vm_mac

# Worked out by hand from SHA-256 of the id (first bytes shown): a change here re-addresses VMs.
VECTORS = [
    # id, SHA-256 head, no prefix, prefix 52:54:00, prefix 02
    ("vm1", "7b11e3d1b4ef", "7a:11:e3:d1:b4:ef", "52:54:00:7b:11:e3", "02:7b:11:e3:d1:b4"),
    ("vm2", "36d01e0ccdf7", "36:d0:1e:0c:cd:f7", "52:54:00:36:d0:1e", "02:36:d0:1e:0c:cd"),
    ("web-01", "0b9d9f06cc8c", "0a:9d:9f:06:cc:8c", "52:54:00:0b:9d:9f", "02:0b:9d:9f:06:cc"),
    ("8f0c7f6e-2a3b-4c1d-9e8f-0a1b2c3d4e5f", "1e49157733f6",
     "1e:49:15:77:33:f6", "52:54:00:1e:49:15", "02:1e:49:15:77:33"),
    ("é", "4a99557e4033", "4a:99:55:7e:40:33", "52:54:00:4a:99:55", "02:4a:99:55:7e:40"),
]


@pytest.mark.parametrize("vm_id,digest,plain,qemu,short", VECTORS)
def test_vectors(vm_id: str, digest: str, plain: str, qemu: str, short: str) -> None:
    assert vm_mac(vm_id) == plain
    assert vm_mac(vm_id, prefix="52:54:00") == qemu
    assert vm_mac(vm_id, prefix=b"\x52\x54\x00") == qemu
    assert vm_mac(vm_id, prefix="02") == short


@pytest.mark.parametrize("n", range(200))
def test_unicast_and_local_without_prefix(n: int) -> None:
    first = int(vm_mac(f"vm-{n}")[:2], 16)
    assert first & 0x02 and not first & 0x01


def test_distinct_ids_distinct_macs() -> None:
    macs = {vm_mac(f"vm-{n}") for n in range(1000)}
    assert len(macs) == 1000


@pytest.mark.parametrize("prefix", ["01", "52:54:00:00", "00:16:3e", "zz", "53"])
def test_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError):
        parse_prefix(prefix)


def test_empty_id_refused() -> None:
    with pytest.raises(ValueError):
        vm_mac("")

