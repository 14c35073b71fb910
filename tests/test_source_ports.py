"""Upstream source ports running out, and the source pool that lifts the limit.

Every relayed connection takes a local port toward its target, and the forwarder closes that
leg first (it passes the client's FIN on), so the port then waits out TIME_WAIT. Toward one
target the kernel's ephemeral range is all there is; a pool of source addresses multiplies it.
Loopback reuses TIME_WAIT ports by default (``tcp_tw_reuse = 2``) and a real network does not,
so the test runs in a namespace of its own with reuse off and a range of only 8 ports: the
9th connection toward the target finds none. Client and listening ports are fixed outside the
range, so only the upstream side draws from it.
"""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastfwd.host.lab import Lab
from netutil import LOOP4, TIMEOUT, SyncForwarder, TcpServer, echo_handler, echo_once, make_rule

pytestmark = pytest.mark.root

RANGE = (40000, 40007)
PORTS = RANGE[1] - RANGE[0] + 1
ATTEMPTS = 20
POOL = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


@pytest.fixture
def ns() -> Iterator[tuple[Lab, str]]:
    with Lab() as lab:
        name = lab.netns("ports")
        lab.run(name, ["sysctl", "-qw", f"net.ipv4.ip_local_port_range={RANGE[0]} {RANGE[1]}",
                       "net.ipv4.tcp_tw_reuse=0"])
        yield lab, name


def round_trips(port: int, first_client_port: int) -> list[bool]:
    """ATTEMPTS connections one after the other, each from its own fixed port: send, expect the
    echo, close first. Which of them came back whole."""
    results = []
    for i in range(ATTEMPTS):
        with socket.socket() as sock:
            sock.bind((LOOP4, first_client_port + i))
            sock.settimeout(TIMEOUT)
            message = b"round trip %d" % i
            try:
                sock.connect((LOOP4, port))
                results.append(echo_once(sock, message) == message)
            except (OSError, EOFError):     # turned away: reset, or closed without a byte
                results.append(False)
    return results


def test_without_a_pool_the_range_runs_out_and_each_client_turned_away_is_counted(ns: tuple[Lab, str]) -> None:
    lab, name = ns
    fw = lab.call(name, SyncForwarder, 1)
    try:
        with lab.call(name, TcpServer, echo_handler, LOOP4, 31000):
            rule = fw.add(make_rule(31000, listen_port=32000))
            assert lab.call(name, round_trips, 32000, 30000) == [True] * PORTS + [False] * (ATTEMPTS - PORTS)
            counters = fw.wait_counter(rule, "connect_failed", ATTEMPTS - PORTS)
            assert (counters.accepted, counters.connect_failed) == (ATTEMPTS, ATTEMPTS - PORTS)
    finally:
        fw.close()


def test_a_pool_of_source_addresses_gives_each_its_own_range(ns: tuple[Lab, str]) -> None:
    lab, name = ns
    fw = lab.call(name, SyncForwarder, 1)
    try:
        with lab.call(name, TcpServer, echo_handler, LOOP4, 31001):
            rule = fw.add(make_rule(31001, listen_port=32001, source=POOL))
            assert lab.call(name, round_trips, 32001, 30100) == [True] * ATTEMPTS
            assert fw.counters(rule).connect_failed == 0
            # Past the pool's reach (4 addresses × 8 ports, 20 taken) the range runs out again.
            assert lab.call(name, round_trips, 32001, 30200).count(True) == len(POOL) * PORTS - ATTEMPTS
    finally:
        fw.close()
