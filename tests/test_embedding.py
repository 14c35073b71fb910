"""The Forwarder as a program embedding it meets it: stopping it in every way a program can
(a cancelled drain, restarts, other threads), what it reports once closed, and an IPv6
source address that is still being checked for duplicates when the rule is loaded."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

import fastfwd
from fastfwd.host.lab import Lab
from netutil import (LOOP4, LOOP6, TIMEOUT, SyncForwarder, TcpServer, closed_how, connect, echo_handler, echo_once,
                     is_refused, make_rule, open_fds, process_threads, run_async, wait_for)
from test_address_families import peer_address
from test_wire_edges import legs, listening


def engine_threads() -> list[str]:
    """The engine's worker threads in this process (C threads: threading does not list them)."""
    return [name for name in process_threads() if name.startswith("fastfwd-w")]


def test_a_cancelled_drain_still_closes_everything() -> None:
    """A program that gives up waiting on ``close(drain=...)`` (a timeout, Ctrl-C) cancels
    it: the forwarder must still stop, not stay half open with rules that no longer listen."""
    async def main(server_port: int) -> fastfwd.Forwarder:
        fw = fastfwd.Forwarder(workers=2)
        await fw.start()
        rule = await fw.add(make_rule(server_port))
        with await asyncio.to_thread(connect, rule.port) as live:
            assert await asyncio.to_thread(echo_once, live, b"before") == b"before"
            closing = asyncio.ensure_future(fw.close(drain=TIMEOUT))
            await asyncio.to_thread(wait_for, lambda: is_refused(rule.port), what="the listener to close")
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            assert await asyncio.to_thread(closed_how, live) in ("eof", "reset")
        assert fw.rules == [] and fw.find(rule) is None
        with pytest.raises(RuntimeError, match="not running"):
            await fw.apply([rule.rule])
        return fw

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))
    assert engine_threads() == []


def test_a_closed_forwarder_holds_no_rules() -> None:
    async def main(server_port: int) -> None:
        fw = fastfwd.Forwarder(workers=1)
        async with fw:
            rule = await fw.add(make_rule(server_port))
        assert not rule.installed and fw.find(rule) is None and fw.rules == []
        with pytest.raises(RuntimeError, match="not running"):
            fw.counters(rule)
        with pytest.raises(RuntimeError, match="not running"):
            await fw.add(make_rule(server_port))

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))


def test_an_exception_inside_async_with_closes_the_forwarder() -> None:
    async def main(server_port: int) -> int:
        with pytest.raises(LookupError):
            async with fastfwd.Forwarder(workers=2) as fw:
                port = (await fw.add(make_rule(server_port))).port
                raise LookupError("the embedding program failed")
        return port

    with TcpServer(echo_handler) as server:
        assert is_refused(run_async(main(server.port)))
    assert engine_threads() == []


def test_two_forwarders_at_once_restarted_from_other_threads_leave_nothing_behind() -> None:
    """Made in one thread, each run by its own event loop in another (plain asyncio), both at
    once on different ports, started and stopped over and over: every round forwards, and
    afterwards no worker thread, fd or listener is left."""
    rounds = 5
    forwarders = [fastfwd.Forwarder(workers=2) for _ in range(2)]
    ports: list[int] = []

    def run(fw: fastfwd.Forwarder, server_port: int, tag: bytes) -> None:
        async def once() -> None:
            async with fw:
                rule = await fw.add(make_rule(server_port))
                ports.append(rule.port)
                assert await asyncio.to_thread(echo_once, connect(rule.port), tag) == tag
        for _ in range(rounds):
            run_async(once())

    # Counted before the echo server starts and checked after it has joined its own threads:
    # a server thread still reading its last connection's end is not the forwarders' doing.
    fds, threads = open_fds(os.getpid()), set(threading.enumerate())
    with TcpServer(echo_handler) as server:
        runners = [threading.Thread(target=run, args=(fw, server.port, b"fw%d" % i)) for i, fw in enumerate(forwarders)]
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join(60)
    assert len(ports) == 2 * rounds, "a round failed (see the thread's traceback above)"
    assert engine_threads() == []
    assert set(threading.enumerate()) <= threads
    wait_for(lambda: open_fds(os.getpid()) <= fds, timeout=5, what="the forwarders' fds to close")
    assert all(is_refused(port) for port in ports)


# -- an IPv6 source address under duplicate-address detection ------------------------------

IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40


def address_flags(ns: str, address: str) -> int:
    with IPRoute(netns=ns) as ipr:
        (entry,) = ipr.get_addr(address=address)
        return int(entry.get_attr("IFA_FLAGS", entry["flags"]))


def tentative(ns: str, address: str) -> bool:
    """Whether ``address`` in namespace ``ns`` is still under duplicate-address detection."""
    return bool(address_flags(ns, address) & IFA_F_TENTATIVE)


@pytest.mark.root
def test_a_tentative_ipv6_source_is_accepted_and_used_once_ready(caplog: pytest.LogCaptureFixture) -> None:
    """An address added at boot is tentative for a second or two while the kernel checks that
    no neighbour has it, and cannot be bound meanwhile. A rule naming it as its source must
    load (with a log line saying why its first connections may leave from another address),
    and use it once the check is done."""
    source = "fd00:fe::1"
    with Lab() as lab:
        ns = lab.netns("dad")
        with IPRoute(netns=ns) as ipr:
            # The check waits for a carrier: while the peer is down, the address stays tentative.
            ipr.link("add", ifname="dad0", kind="veth", peer="dad1")
            dad0 = ipr.link_lookup(ifname="dad0")[0]
            ipr.link("set", index=dad0, state="up")
            ipr.addr("add", index=dad0, address=source, prefixlen=64)
        assert tentative(ns, source)
        server = lab.call(ns, TcpServer, peer_address, LOOP6)
        fwd = lab.call(ns, SyncForwarder, 1)
        try:
            with caplog.at_level(logging.INFO, logger="fastfwd"):
                rule = fwd.add(fastfwd.Rule.parse(f"[::1]:0:[::1]:{server.port}",
                                                  options=fastfwd.RuleOptions(source=(source,))))
            assert f"source {source} is still tentative" in caplog.text
            with IPRoute(netns=ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="dad1")[0], state="up")
            wait_for(lambda: not tentative(ns, source), what="duplicate-address detection to finish")
            with lab.socket(ns, socket.AF_INET6) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect((LOOP6, rule.port))
                assert sock.recv(2) == b"ok"
            assert server.result() == source
        finally:
            fwd.close()
            server.close()


@pytest.mark.root
def test_an_ipv6_source_another_host_has_is_refused() -> None:
    """Duplicate-address detection that failed leaves the address tentative for good: that
    is an error at load, saying why."""
    source = "fd00:fe::2"
    with Lab() as lab:
        owner, ns = lab.netns("dadown"), lab.netns("dad")
        lab.veth(owner, "own0", ns, "dad0")
        with IPRoute(netns=owner) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="own0")[0], address=source, prefixlen=64)
        wait_for(lambda: not tentative(owner, source), what="the owner's address to be ready")
        with IPRoute(netns=ns) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="dad0")[0], address=source, prefixlen=64)
        wait_for(lambda: address_flags(ns, source) & IFA_F_DADFAILED, what="duplicate-address detection to fail")
        fwd = lab.call(ns, SyncForwarder, 1)
        try:
            with pytest.raises(OSError, match=f"source {source} failed duplicate-address detection"):
                fwd.add(fastfwd.Rule.parse("[::1]:0:[::1]:9", options=fastfwd.RuleOptions(source=(source,))))
            assert fwd.fw.rules == []
        finally:
            fwd.close()


@pytest.mark.parametrize("setting, value, says", [
    ("workers", -1, "expected an integer from 1 to 1024"), ("workers", 1025, "from 1 to 1024"),
    ("workers", True, "expected an integer from 1 to 1024"),
    ("pipe_size", 100, "expected a byte count from 4096"), ("pipe_size", 1 << 40, "expected a byte count from 4096"),
    # A negative busy poll made every worker spin for good, burning a core each.
    ("busy_poll_us", -1, "expected microseconds from 0"),
    ("hosts", {"vm1": "not-an-ip"}, "'not-an-ip' for 'vm1' is not an IP address"),
])
def test_a_bad_setting_is_refused_when_the_forwarder_is_made(setting: str, value: object, says: str) -> None:
    with pytest.raises(fastfwd.SpecError, match=f"^{setting}: .*{says}"):
        fastfwd.Forwarder(**{setting: value})


@pytest.mark.parametrize("field, value, says", [
    ("listen_port", 80.0, "listen_port: expected an integer, got 80.0"),
    ("listen_port", True, "listen_port: expected an integer, got True"),
    ("listen_port", "80", "listen_port: expected an integer, got '80'"),
    ("target_port", None, "target_port: expected an integer, got None"),
    ("count", 2.5, "count: expected an integer, got 2.5"),
    ("target_host", None, "target_host: expected a string, got None"),
    ("listen_host", None, "listen_host: expected a string, got None"),
    ("name", 5, "name: expected a string, got 5"),
    ("options", {"splice": "never"}, "options: expected a RuleOptions, got {'splice': 'never'}"),
])
def test_a_rule_field_of_the_wrong_type_is_named(field: str, value: object, says: str) -> None:
    """A program building rules itself gets one line naming the field, not a TypeError from
    inside the checks, and never a rule like 'tcp 127.0.0.1:80.0 -> ...'."""
    fields = {"proto": "tcp", "listen_port": 8080, "target_host": "127.0.0.1", "target_port": 80, field: value}
    with pytest.raises(fastfwd.SpecError, match=f"^{re.escape(says)}$"):
        fastfwd.Rule(**fields)


@pytest.mark.parametrize("option", ["allow", "source"])
def test_one_address_given_as_a_string_for_a_list_option_is_named(option: str) -> None:
    """``allow="10.0.0.0/8"`` was read character by character ("'1' is not a CIDR network")."""
    with pytest.raises(fastfwd.SpecError, match=f"^{option}: expected a list of .*, got the string '127.0.0.1'$"):
        fastfwd.RuleOptions(**{option: "127.0.0.1"})


@contextlib.contextmanager
def forked_child() -> Iterator[None]:
    """A child forked from this process (as multiprocessing's default start method does),
    holding a copy of every fd it had, until the block ends."""
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(release_w)
        os.read(release_r, 1)       # the child runs nothing else: threads did not follow it
        os._exit(0)
    os.close(release_r)
    try:
        yield
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


def stale_epoll_items() -> list[str]:
    """Items of this process's epoll sets whose fd is closed (or now another file)."""
    stale = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                items = re.findall(r"^tfd:\s*(\d+).*\bino:([0-9a-f]+)", f.read(), re.M)
            for tfd, ino in items:
                try:
                    same = os.fstat(int(tfd)).st_ino == int(ino, 16)
                except OSError:
                    same = False
                if not same:
                    stale.append(f"epoll {fd}: fd {tfd}")
    return stale


def test_sockets_closed_while_a_forked_child_holds_copies_leave_no_epoll_items(fwd: SyncForwarder) -> None:
    """A child forked by the program embedding the forwarder holds copies of its sockets, so
    closing one in the parent does not take it out of the worker's epoll set. Such an item
    stayed, naming the freed session or connection: a reply reaching an evicted session's
    socket had the worker spin at full CPU, an event could reach a connection that reused
    the memory."""
    with listening() as lsock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as target:
        target.bind((LOOP4, 0))
        target.settimeout(TIMEOUT)
        tcp = fwd.forward(lsock.getsockname()[1])
        udp = fwd.add(make_rule(target.getsockname()[1], "udp", udp_max_sessions=1))
        client, server = legs(lsock, tcp.port)
        with client, server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
            first.sendto(b"first", (LOOP4, udp.port))
            _, first_session = target.recvfrom(64)
            with forked_child():
                second.sendto(b"second", (LOOP4, udp.port))     # evicts the first session
                target.recvfrom(64)
                target.sendto(b"late reply", first_session)
                # Both FINs passed on with shutdown: a close here would wait for the child.
                client.shutdown(socket.SHUT_WR)
                assert server.recv(10) == b""
                server.shutdown(socket.SHUT_WR)
                assert client.recv(10) == b""
                wait_for(lambda: fwd.counters(tcp).active == 0, what="the connection to close")
                fwd.wait_counter(udp, "sessions_evicted", 1)
                assert stale_epoll_items() == []
