"""UDP edge paths: an empty datagram at the end of a segmented run, a rule removed while
datagrams arrive, and datagrams the kernel drops at fastfwd's own full sockets."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from netutil import LOOP4, ChildForwarder, UdpEcho, child_env, datagram, spec, udp_socket, wait_for


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


_REMOVE_UNDER_TRAFFIC = r"""
import asyncio, os, socket, sys, threading
import fastfwd

target, rounds = int(sys.argv[1]), int(sys.argv[2])

async def main():
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    go, sent, port = threading.Event(), threading.Event(), [0]
    def late_sender():
        # Runs while the control plane waits for the workers to remove the rule (the engine
        # lets go of the GIL there): the datagram lands just after the command.
        while go.wait() and port[0]:
            go.clear()
            client.sendto(b"late", ("127.0.0.1", port[0]))
            sent.set()
    threading.Thread(target=late_sender, daemon=True).start()
    async with fastfwd.Forwarder(workers=1) as fw:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(rounds):
            rule = await fw.add(fastfwd.Rule.parse(f"127.0.0.1:0:127.0.0.1:{target}", "udp"))
            port[0] = rule.port
            go.set()
            await fw.remove(rule)
            sent.wait(5)
            sent.clear()
        await asyncio.sleep(0.3)  # replies to anything forwarded late come back meanwhile
        after = len(os.listdir("/proc/self/fd"))
    port[0] = 0
    go.set()
    print(before, after, flush=True)

asyncio.run(main())
"""


def test_removing_a_udp_rule_while_datagrams_arrive() -> None:
    """A datagram arriving as a UDP rule is removed must not outlive the rule: an event the
    worker had already collected for the rule's listener used to be handled after the removal
    command (commands ran in the middle of an event batch), opening a session on the removed
    rule that nothing would close, and whose replies then read the freed rule (a crash)."""
    with UdpEcho(LOOP4) as server:
        proc = subprocess.run([sys.executable, "-c", _REMOVE_UNDER_TRAFFIC, str(server.port), "1500"],
                              capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, f"the forwarder died ({proc.returncode}): {proc.stderr[-2000:]}"
    before, after = map(int, proc.stdout.split())
    assert after <= before, f"{after - before} fds (sessions of removed rules) left open"


FLOOD = 12_000      # 1 KB datagrams: about three times what a listener's 4 MiB buffer holds


def _all_accounted_for(child: ChildForwarder, sent: int, flush: Callable[[], None], key: str) -> dict[str, int]:
    """Send one more datagram at a time until the forwarder accounts for every one sent, as
    passed on (``key``) or dropped. The count of what the kernel dropped rides on the next
    datagram it queues, so whatever overflowed shows up once one more gets in."""
    counters: dict[str, int] = {}
    for extra in range(1, 51):
        flush()
        time.sleep(0.1)
        counters = child.counters()[0]
        if counters[key] + counters["drops"] == sent + extra:
            return counters
    raise AssertionError(f"{sent + extra} sent, {counters[key]} passed on and {counters['drops']} dropped")


def test_datagrams_a_full_listener_drops_in_the_kernel_are_counted() -> None:
    """What overflows the listening socket while the workers are off the CPU is lost in the
    kernel, before fastfwd reads it: it still counts, one for one, in drops."""
    with udp_socket(LOOP4) as sink, ChildForwarder.start([(spec(sink.getsockname()[1]), "udp", {})]) as child:
        (port,) = child.ports
        with udp_socket(LOOP4) as client:
            with stopped(child.pid):
                for seq in range(FLOOD):
                    client.sendto(datagram(seq, 1000), (LOOP4, port))
            counters = _all_accounted_for(child, FLOOD, lambda: client.sendto(b"flush", (LOOP4, port)),
                                          "datagrams_up")
    assert counters["drops"] > 0, counters


def test_replies_a_full_session_socket_drops_in_the_kernel_are_counted() -> None:
    """The same for replies: a target answering faster than the worker reads overflows the
    session's upstream socket, and what it lost there counts in drops."""
    with udp_socket(LOOP4) as target, ChildForwarder.start([(spec(target.getsockname()[1]), "udp", {})]) as child:
        (port,) = child.ports
        with udp_socket(LOOP4) as client:
            client.sendto(b"open a session", (LOOP4, port))
            _, session = target.recvfrom(64)
            with stopped(child.pid):
                for seq in range(FLOOD):
                    target.sendto(datagram(seq, 1000), session)
            counters = _all_accounted_for(child, FLOOD, lambda: target.sendto(b"flush", session),
                                          "datagrams_down")
    assert counters["drops"] > 0, counters
