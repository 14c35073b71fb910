"""Shared pytest setup: root-only tests skip cleanly elsewhere; a started forwarder fixture."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fwd() -> Iterator["netutil.SyncForwarder"]:
    """A started two-worker Forwarder with a synchronous face (see tests/netutil.py)."""
    import netutil

    with netutil.forwarder(workers=2) as fw:
        yield fw
