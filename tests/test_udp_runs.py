"""Runs of equal-sized datagrams from one client leave as one segmented write (UDP_SEGMENT);
the target must still see each datagram whole, separate and in order."""
from __future__ import annotations

import hashlib
import os

import pytest

from netutil import LOOP4, LOOP6, SyncForwarder, UdpEcho, datagram, udp_socket, wait_for


@pytest.mark.parametrize("host", [LOOP4, LOOP6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size,count", [(64, 300), (1400, 40), (8000, 12)])
def test_equal_sized_bursts_arrive_whole_and_in_order(fwd: SyncForwarder, host: str, size: int,
                                                      count: int) -> None:
    burst = [datagram(seq, size) for seq in range(count)]
    with UdpEcho(host) as server:
        rule = fwd.forward(server.port, "udp", host)
        affinity = os.sched_getaffinity(0)
        # On one CPU the burst is queued before the worker runs, so it reads it in batches.
        os.sched_setaffinity(0, {min(affinity)})
        try:
            with udp_socket(host) as sock:
                for d in burst:
                    sock.sendto(d, (host, rule.port))
        finally:
            os.sched_setaffinity(0, affinity)
        wait_for(lambda: server.total >= count, what=f"{count} datagrams at the target (got {server.total})")
        (stream,) = server.received.values()
        assert stream == [hashlib.sha256(d).hexdigest() for d in burst]
    counters = fwd.counters(rule)
    assert counters.datagrams_up == count and counters.bytes_up == count * size
    assert counters.drops == counters.truncated == 0
