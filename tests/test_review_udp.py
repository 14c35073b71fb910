"""UDP defects found in review: each test names the path it guards."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import Iterator

from netutil import LOOP4, ChildForwarder, UdpEcho, datagram, spec, udp_socket, wait_for


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Hold a process stopped, so whatever is sent meanwhile waits in its sockets and is read
    in one batch when it runs again."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_empty_datagram_at_the_end_of_an_equal_sized_run_is_forwarded() -> None:
    """A run of equal-sized datagrams may end with a shorter one and still leave as one
    segmented write; an empty one cannot (the kernel makes no segment of it), so it must not
    be folded in and lost while counted as sent."""
    burst = [datagram(seq, 64) for seq in range(4)] + [b""]
    with UdpEcho(LOOP4) as server, ChildForwarder.start([(spec(server.port), "udp", {})]) as child:
        (port,) = child.ports
        with udp_socket(LOOP4) as sock, stopped(child.pid):
            for d in burst:
                sock.sendto(d, (LOOP4, port))
        counters = wait_for(lambda: (c := child.counters()[0])["datagrams_up"] >= len(burst) and c,
                            what="the burst to be forwarded")
        wait_for(lambda: server.total >= len(burst), timeout=5,
                 what=f"{len(burst)} datagrams at the target (got {server.total})")
        (stream,) = server.received.values()
        assert stream == [hashlib.sha256(d).hexdigest() for d in burst]
    assert counters["datagrams_up"] == len(burst) and counters["drops"] == 0

