"""Shared pytest setup: root-only tests skip cleanly elsewhere; a started forwarder fixture; a
loopback echo server."""
from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from helpers_control import EchoServer
    from netutil import SyncForwarder
    from test_host_bridge import Bridge

# A run started in the background (`cmd &`, nohup) inherits SIGINT ignored, and so would every
# command a test starts, which the Ctrl-C tests need to be interruptible. With a handler of its
# own here, each child starts with the default again (exec resets handled signals, not ignored).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A loopback TCP echo server (tests/helpers_control.py), closed afterwards."""
    from helpers_control import EchoServer

    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def br() -> Iterator[Bridge]:
    """fastfwd-bridge run as the real command inside a fresh namespace lab (see
    tests/test_host_bridge.py); the host itself is never touched."""
    from fastfwd.host.lab import Lab
    from test_host_bridge import Bridge

    if shutil.which("nft") is None:
        pytest.skip("needs nftables (nft): the bridge's firewall is an nftables table")
    with Lab() as lab:
        yield Bridge(lab)
