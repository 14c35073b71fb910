"""The Forwarder embedded in a load-testing rig: started and stopped many times in one
process, many at once, counters read right after traffic and compared with what the far ends
received, driven from plain asyncio, uvloop and a pytest fixture, and the errors a rig hits
raised at the call that caused them."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import fastfwd
from netutil import (LOOP4, AsyncEchoServer, TcpServer, UdpEcho, connect, echo_handler, echo_once, is_refused,
                     make_rule, many_echo, payload, process_threads, refusing_port, run_async, udp_roundtrip,
                     udp_socket, wait_for)


def threads_back_to(threads: list[str]) -> None:
    """Wait until this process runs no thread beyond ``threads``. Bounded and short: a thread
    that has been joined (pthread_join, Thread.join) leaves /proc a moment after the join
    returns; one that was left running never does. (Fewer is fine: an earlier test's
    thread may end meanwhile.)"""
    def extra() -> Counter[str]:
        return Counter(process_threads()) - Counter(threads)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not extra(), timeout=5)
    assert not extra()


def open_fd_set() -> set[tuple[str, str]]:
    """This process's fds with what each refers to: one opened and left open since shows as
    new even if it took the number of one an earlier test's leftovers closed meanwhile."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):    # listdir's own, closed by now
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return fds


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def echo_through(port: int, message: bytes) -> bytes:
    with connect(port) as sock:
        return echo_once(sock, message)


def test_started_and_stopped_200_times_in_one_process_leaves_no_fd_or_thread(
        record_property: Callable[[str, object], None]) -> None:
    """A rig that makes a fresh forwarder per scenario: every cycle forwards, and afterwards
    the process holds exactly the fds and threads it held before (memory is measured and
    recorded, not asserted: the allocator keeps what it likes)."""
    cycles = 200

    async def cycle(server_port: int, i: int) -> None:
        async with fastfwd.Forwarder(workers=2) as fw:
            rule = await fw.add(make_rule(server_port))
            tag = b"cycle %d" % i
            assert echo_through(rule.port, tag) == tag  # blocking is fine: the workers need no loop

    async def main(server_port: int) -> tuple[int, int]:
        await cycle(server_port, -1)        # the first start loads the engine once for good
        rss = rss_kib()
        for i in range(cycles):
            await cycle(server_port, i)
        return rss, rss_kib()

    fds, threads, pythreads = open_fd_set(), process_threads(), set(threading.enumerate())
    with TcpServer(echo_handler) as server:
        before, after = run_async(main(server.port))
        assert server.accepted == cycles + 1
    record_property("rss_kib_growth_over_200_cycles", after - before)
    assert open_fd_set() <= fds
    threads_back_to(threads)
    assert set(threading.enumerate()) <= pythreads


def test_many_forwarders_at_once_count_exactly_what_the_far_ends_received() -> None:
    """Sixteen forwarders in one process, all carrying TCP and UDP at the same time: each one's
    counters, read as soon as the traffic is over, equal what its servers and clients
    received; closing them all gives every thread and fd back."""
    forwarders, conns, datagrams = 16, 8, 20

    async def main(tcp_port: int, udp_port: int) -> None:
        fws = [fastfwd.Forwarder(workers=1) for _ in range(forwarders)]
        try:
            await asyncio.gather(*(fw.start() for fw in fws))
            assert [name for name in process_threads() if name.startswith("fastfwd-w")] == ["fastfwd-w0"] * forwarders
            tcp = [await fw.add(make_rule(tcp_port)) for fw in fws]
            udp = [await fw.add(make_rule(udp_port, "udp")) for fw in fws]

            def load(i: int) -> tuple[int, int]:
                """Returns the bytes the clients got back over TCP, and datagrams over UDP."""
                sizes = [1000 * (i + 1) + 7 * k for k in range(conns)]
                got = many_echo(tcp[i].port, [payload(size, k) for k, size in enumerate(sizes)])
                assert [r.nbytes for r in got] == sizes
                with udp_socket() as sock:
                    for k in range(datagrams):
                        assert udp_roundtrip(sock, (LOOP4, udp[i].port), b"%d:%d" % (i, k)) == b"%d:%d" % (i, k)
                return sum(r.nbytes for r in got), datagrams

            results = await asyncio.gather(*(asyncio.to_thread(load, i) for i in range(forwarders)))
            await asyncio.gather(*(fw.settle() for fw in fws))
            for fw, t, u, (down, dgrams) in zip(fws, tcp, udp, results):
                c = fw.counters(t)
                assert (c.accepted, c.active, c.bytes_up, c.bytes_down) == (conns, 0, down, down)
                c = fw.counters(u)
                # A reply may be resent after a lost datagram: at least one each way, as counted.
                assert c.datagrams_up >= dgrams and c.datagrams_down == c.datagrams_up
            assert sum(fw.counters(t).bytes_up for fw, t in zip(fws, tcp)) == sum(r.nbytes for r in tcp_server.received)
        finally:
            await asyncio.gather(*(fw.close() for fw in fws))
        wait_for(lambda: not any(name.startswith("fastfwd-w") for name in process_threads()), timeout=5,
                 what="the engines' worker threads to end")

    fds, threads = open_fd_set(), process_threads()
    with AsyncEchoServer() as tcp_server, UdpEcho() as udp_server:
        run_async(main(tcp_server.port, udp_server.port))
    threads_back_to(threads)
    assert open_fd_set() <= fds


def test_counters_are_exact_as_soon_as_settle_returns() -> None:
    """A client may read the last bytes of a reply before the worker that sent them has
    counted them (it counts once its send returned): read at once, counters were short about
    one time in twenty over TCP and one in four over UDP. ``settle()`` waits for every worker
    to count what it has done, with no sleeping and hoping."""
    rounds = 300

    async def main(tcp_port: int, udp_port: int) -> None:
        async with fastfwd.Forwarder(workers=2) as fw:
            tcp = await fw.add(make_rule(tcp_port))
            udp = await fw.add(make_rule(udp_port, "udp"))
            with connect(tcp.port) as stream, udp_socket() as dgram:
                for i in range(1, rounds + 1):
                    message = payload(100 + i, i)
                    assert echo_once(stream, message) == message
                    await fw.settle()
                    c = fw.counters(tcp)
                    assert (c.accepted, c.bytes_up, c.bytes_down) == (1, c.bytes_down, sum(range(101, 101 + i)))
                    assert udp_roundtrip(dgram, (LOOP4, udp.port), message) == message
                    await fw.settle()
                    c = fw.counters(udp)
                    assert c.datagrams_down == c.datagrams_up >= i and c.bytes_down == c.bytes_up

    with TcpServer(echo_handler) as tcp_server, UdpEcho() as udp_server:
        run_async(main(tcp_server.port, udp_server.port))


def test_settle_on_a_forwarder_with_no_rules_or_not_running() -> None:
    async def main() -> fastfwd.Forwarder:
        async with fastfwd.Forwarder(workers=1) as fw:
            await fw.settle()           # nothing to count: returns at once
        return fw

    fw = run_async(main())
    with pytest.raises(RuntimeError, match="not running"):
        run_async(fw.settle())


# -- event loops ---------------------------------------------------------------------------

async def rig_scenario(server_port: int) -> None:
    """What a rig does in one run: start, forward, read settled counters, drain, stop."""
    fw = fastfwd.Forwarder(workers=2)
    await fw.start()
    try:
        rule = await fw.add(make_rule(server_port))
        assert await asyncio.to_thread(echo_through, rule.port, b"loop") == b"loop"
        await fw.settle()
        assert fw.counters(rule).bytes_down == 4
    finally:
        await fw.close(drain=1.0)
    assert await asyncio.to_thread(is_refused, rule.port)


def standard_loop(coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(asyncio.wait_for(coro, 60))


def uvloop_loop(coro: Coroutine[Any, Any, None]) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("run", [standard_loop, run_async, uvloop_loop], ids=["SelectorEventLoop", "asyncio.run", "uvloop"])
def test_the_api_on_each_event_loop(run: Callable[[Coroutine[Any, Any, None]], object]) -> None:
    with TcpServer(echo_handler) as server:
        run(rig_scenario(server.port))


@pytest.fixture
def rig() -> Iterator[fastfwd.Forwarder]:
    """A forwarder started by a fixture's own ``asyncio.run`` and closed by another, as a rig's
    conftest would do it: each test call runs on a loop of its own."""
    fw = fastfwd.Forwarder(workers=1)
    asyncio.run(fw.start())
    yield fw
    asyncio.run(fw.close())


def test_a_forwarder_from_a_fixture_serves_calls_made_on_other_loops(rig: fastfwd.Forwarder) -> None:
    with TcpServer(echo_handler) as server:
        rule = run_async(rig.add(make_rule(server.port)))
        assert echo_through(rule.port, b"fixture") == b"fixture"
        run_async(rig.settle())
        assert rig.counters(rule).bytes_up == 7
        run_async(rig.remove(rule))
        assert is_refused(rule.port)


# -- errors a rig hits ---------------------------------------------------------------------

@pytest.mark.parametrize("proto, kind", [("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)])
def test_a_port_taken_is_an_oserror_from_the_add_that_asked_for_it(proto: str, kind: int) -> None:
    async def main(port: int) -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            kept = await fw.add(make_rule(9, proto))
            with pytest.raises(OSError) as raised:
                await fw.add(make_rule(9, proto, listen_port=port))
            assert raised.value.errno == errno.EADDRINUSE and str(port) in str(raised.value)
            assert fw.rules == [kept]

    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind((LOOP4, 0))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        run_async(main(holder.getsockname()[1]))


def test_a_port_taken_at_start_is_an_oserror_from_start_and_leaves_nothing_running() -> None:
    threads = process_threads()
    with refusing_port() as holder:
        holder.listen()
        fw = fastfwd.Forwarder([make_rule(9, listen_port=holder.getsockname()[1])], workers=2)
        with pytest.raises(OSError) as raised:
            run_async(fw.start())
    assert raised.value.errno == errno.EADDRINUSE
    threads_back_to(threads)
    with pytest.raises(RuntimeError, match="not running"):
        run_async(fw.add(make_rule(9)))


@pytest.mark.parametrize("spec, says", [
    ("0:1.2.3:80", "target host '1.2.3' is not an IPv4 address"),
    ("0:10.0.0.256:80", "target host '10.0.0.256' is not an IPv4 address"),
    ("0:224.0.0.1:80", "target 224.0.0.1 is a multicast address: TCP cannot connect to it"),
    ("0:[ff02::1]:80", "target ff02::1 is a multicast address: TCP cannot connect to it"),
    ("0:255.255.255.255:80", "target 255.255.255.255 is the broadcast address: TCP cannot connect to it"),
])
def test_a_bad_tcp_target_is_a_spec_error_from_the_rule(spec: str, says: str) -> None:
    """A mistyped address used to become a target *name* that nothing would ever resolve (the
    rule pending for good), and a TCP rule to a multicast or broadcast address failed on every
    connection: both are refused where the rule is made."""
    with pytest.raises(fastfwd.SpecError, match=f"^{re.escape(f'{spec!r}: {says}')}$"):
        fastfwd.Rule.parse(spec)


def test_udp_may_target_a_multicast_group() -> None:
    assert fastfwd.Rule.parse("0:239.1.2.3:5000", "udp").target_host == "239.1.2.3"
