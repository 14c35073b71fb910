"""The suite's own helpers (tests/netutil.py) keep their promises on a loaded machine that
may run several test runs at once: counters read after traffic include it, and port ranges
probed free stay this run's own until bound."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from netutil import (LOOP4, ChildForwarder, SyncForwarder, TcpServer, UdpEcho, child_env, connect, echo_handler,
                     echo_once, free_port_range, payload, spec, udp_roundtrip, udp_socket)


def _exact_after_each_echo(port: int, udp_port: int, counters: Callable[[], list[dict[str, int]]]) -> None:
    """Echo through TCP rule ``port`` and UDP rule ``udp_port`` (in that order in
    ``counters()``) and, right after each reply, read counters that must already include it."""
    with connect(port) as stream, udp_socket() as dgram:
        for i in range(1, 201):
            message = payload(100 + i, i)
            assert echo_once(stream, message) == message
            assert counters()[0]["bytes_down"] == sum(range(101, 101 + i))
            assert udp_roundtrip(dgram, (LOOP4, udp_port), message) == message
            udp = counters()[1]
            assert udp["datagrams_down"] == udp["datagrams_up"] >= i


def test_the_test_helpers_read_counters_that_include_what_the_client_got(fwd: SyncForwarder) -> None:
    """The suite's forwarders (the ``fwd`` fixture, a ChildForwarder) read counters the way
    tests compare them with what a far end received: settled, or short now and then on a
    loaded machine."""
    with TcpServer(echo_handler) as tcp_server, UdpEcho() as udp_server:
        rules = [fwd.forward(tcp_server.port), fwd.forward(udp_server.port, "udp")]
        _exact_after_each_echo(rules[0].port, rules[1].port,
                               lambda: [dataclasses.asdict(fwd.counters(r)) for r in rules])
        with ChildForwarder.start([(spec(tcp_server.port), "tcp", {}), (spec(udp_server.port), "udp", {})]) as child:
            _exact_after_each_echo(*child.ports, child.counters)


def test_concurrent_test_runs_probe_port_ranges_apart() -> None:
    """Two test runs on one machine: each probes a range free, then binds it a while later (a
    daemon starting with 2,000 rules), so if their searches overlap, one binds the other's
    ports in between ("port 10390 is already in use"). A second run asks while this one
    holds its ports: the largest ranges the suite asks for (test_many_rules') must not overlap."""
    count = 4005
    mine = free_port_range(count)
    code = f"import netutil; print(netutil._PORTS_CLAIM is not None, netutil.free_port_range({count}))"
    other = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=child_env(),
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    own_block, theirs = other.stdout.split()
    if own_block == "False":
        pytest.skip("every port block is held by other test runs on this machine")
    assert mine + count <= int(theirs) or int(theirs) + count <= mine, (mine, theirs)
