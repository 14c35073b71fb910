"""Shared pytest setup: root-only tests skip cleanly elsewhere; a started forwarder fixture."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from netutil import SyncForwarder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fwd() -> Iterator[SyncForwarder]:
    """A started two-worker Forwarder with a synchronous face (see tests/netutil.py). Once
    closed, it must have closed every file descriptor it opened."""
    from netutil import forwarder, open_fds, wait_for

    before = open_fds(os.getpid())
    with forwarder(workers=2) as fw:
        yield fw
    wait_for(lambda: open_fds(os.getpid()) <= before, timeout=5,
             what=f"the closed forwarder to leave no fds open (there were {before} before it)")
