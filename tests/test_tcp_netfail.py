"""The TCP relay when the network around fastfwd fails: a target whose packets are dropped
(nftables) during the handshake or in the middle of a transfer, a client or target host that
vanishes (its link deleted, no FIN, no RST), ICMP unreachables and resets sent by the network.

Three namespaces of the test's own, joined by veth pairs: clients, the forwarder, the target.
They have no default route, so nothing leaves them and a cut link leaves a peer unreachable.
"""
from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pyroute2 import IPRoute

from fastfwd import ActiveRule, Counters
from fastfwd.host.lab import Lab
from netutil import (TIMEOUT, Handler, SyncForwarder, TcpServer, closed_how, connect, echo_once, end_of_stream,
                     make_rule, payload, recv_exact, turned_away_how, wait_for)
from test_discarded_bytes import fill, unacked

pytestmark = pytest.mark.root

MB = 1 << 20
NEAR, FAR = "10.99.0.1", "10.99.0.2"        # the target's link: the forwarder's end, the target
FRONT, CLIENT = "10.99.1.1", "10.99.1.2"    # the clients' link: the forwarder's end, the client
LINKS = {"target": "ft0", "client": "fc0"}  # the forwarder's end of each link


@dataclass
class Net:
    lab: Lab
    cli_ns: str
    fwd_ns: str
    tgt_ns: str
    fw: SyncForwarder           # one worker, in fwd_ns

    def server(self, handler: Handler) -> TcpServer:
        return self.lab.call(self.tgt_ns, TcpServer, handler, FAR)

    def forward(self, port: int, **options: Any) -> ActiveRule:
        return self.fw.add(make_rule(port, host=FAR, listen_host=FRONT, **options))

    def client(self, port: int) -> socket.socket:
        return self.lab.call(self.cli_ns, connect, port, FRONT)

    def turned_away_how(self, port: int) -> str:
        return self.lab.call(self.cli_ns, turned_away_how, port, FRONT, TIMEOUT)

    def nft(self, rules: str) -> None:
        """Install ``rules`` (nft syntax) in the target's namespace, table ``inet cut``."""
        self.lab.run(self.tgt_ns, ["nft", f"add table inet cut; {rules}"])

    def drop_all(self) -> None:
        self.nft("add chain inet cut in { type filter hook input priority 0; policy drop; }; "
                 "add chain inet cut out { type filter hook output priority 0; policy drop; }")

    def sysctl(self, name: str, value: int) -> None:
        """Set one of the forwarder namespace's own TCP settings."""
        self.lab.run(self.fwd_ns, ["sysctl", "-qw", f"{name}={value}"])

    def vanish(self, peer: str = "target") -> None:
        """A peer's host goes away without a word: its link is deleted."""
        self.lab.run(self.fwd_ns, ["ip", "link", "del", LINKS[peer]])


@pytest.fixture
def net() -> Iterator[Net]:
    if shutil.which("nft") is None:
        pytest.skip("needs nftables (nft)")
    with Lab() as lab:
        cli_ns, fwd_ns, tgt_ns = lab.netns("ncli"), lab.netns("nfwd"), lab.netns("ntgt")
        lab.veth(fwd_ns, LINKS["target"], tgt_ns, "tf0")
        lab.veth(fwd_ns, LINKS["client"], cli_ns, "cf0")
        for ns, ifname, address in ((fwd_ns, LINKS["target"], NEAR), (tgt_ns, "tf0", FAR),
                                    (fwd_ns, LINKS["client"], FRONT), (cli_ns, "cf0", CLIENT)):
            with IPRoute(netns=ns) as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=30)
        fw = lab.call(fwd_ns, SyncForwarder, 1)
        try:
            yield Net(lab, cli_ns, fwd_ns, tgt_ns, fw)
        finally:
            fw.close()


def hold(gate: threading.Event) -> None:
    if not gate.wait(TIMEOUT):
        raise AssertionError("the gate was never opened")


def ended(rule: ActiveRule, fw: SyncForwarder) -> Counters:
    """The rule's counters once its connections are all closed."""
    wait_for(lambda: fw.counters(rule).active == 0, what="the connection to end")
    return fw.counters(rule)


def failed_connect(rule: ActiveRule, fw: SyncForwarder) -> Counters:
    """The rule's counters once a failed connect is counted and its client's leg closed. The
    worker counts the failure, closes the legs, then counts the close: a client that saw its
    leg end can read the counters before that close is counted."""
    fw.wait_counter(rule, "connect_failed", 1)
    return ended(rule, fw)


# -- the handshake -----------------------------------------------------------------------------

def test_a_target_dropping_every_packet_fails_the_connect_at_the_connect_timeout(net: Net) -> None:
    with net.server(lambda conn: None) as server:
        net.drop_all()
        rule = net.forward(server.port, connect_timeout=0.5)
        # the kernel would send SYNs for about two minutes: only the timer ends it this soon
        assert net.turned_away_how(rule.port) in ("eof", "reset")
        counters = failed_connect(rule, net.fw)
        assert (counters.connect_failed, counters.active, counters.bytes_up) == (1, 0, 0)
        assert server.accepted == 0


def test_an_icmp_unreachable_fails_the_connect_at_once(net: Net) -> None:
    with net.server(lambda conn: None) as server:
        net.nft("add chain inet cut in { type filter hook input priority 0; }; "
                "add rule inet cut in tcp flags syn reject with icmpx type host-unreachable")
        # a connect timeout far beyond the wait below: only the ICMP error can end it
        rule = net.forward(server.port, connect_timeout=300)
        assert net.turned_away_how(rule.port) in ("eof", "reset")
        counters = failed_connect(rule, net.fw)
        assert (counters.connect_failed, counters.active) == (1, 0)
        assert server.accepted == 0


# -- in the middle of a transfer ---------------------------------------------------------------

def test_a_reset_from_the_network_reaches_the_client_after_every_byte_before_it(net: Net) -> None:
    """The network answers the forwarder's next segment to the target with a RST (a firewall
    that reset the flow). The client gets everything the forwarder read from the target, in
    order, then the reset."""
    first, rest = payload(2 * MB, seed=1), payload(32 * MB, seed=2)
    gate = threading.Event()

    def stream(conn: socket.socket) -> None:
        conn.sendall(first)
        hold(gate)
        try:
            conn.sendall(rest)
        except OSError:
            pass                # its peer is gone: the firewall reset the flow for it too

    with net.server(stream) as server:
        rule = net.forward(server.port)
        with net.client(rule.port) as sock:
            assert recv_exact(sock, len(first)) == first
            net.nft("add chain inet cut in { type filter hook input priority 0; }; "
                    f"add rule inet cut in tcp dport {server.port} reject with tcp reset")
            gate.set()
            got = bytearray()
            with pytest.raises(ConnectionResetError):
                while chunk := sock.recv(MB):
                    got += chunk
                pytest.fail(f"the connection ended with a FIN after {len(got)} bytes, not a reset")
            assert bytes(got) == rest[:len(got)]
        counters = ended(rule, net.fw)
        assert counters.bytes_down == len(first) + len(got)
        assert counters.bytes_discarded == 0


@pytest.mark.parametrize("cut", ["drop", "vanish"])
def test_a_target_gone_silent_while_sending_is_reset_at_the_idle_timeout(net: Net, cut: str) -> None:
    """The target stops answering while it sends (its packets dropped, or its link gone). The
    client keeps every byte that arrived, in order, and is reset once the idle timeout ends the
    connection; nothing is taken from the client that the target would not have got."""
    first = payload(2 * MB, seed=3)
    gate = threading.Event()

    def stream(conn: socket.socket) -> None:
        conn.sendall(first)
        hold(gate)
        try:
            conn.sendall(payload(32 * MB, seed=4))
        except OSError:
            pass                # cut off: its sends time out

    with net.server(stream) as server:
        rule = net.forward(server.port, idle_timeout=1.0)
        with net.client(rule.port) as sock:
            assert recv_exact(sock, len(first)) == first
            net.drop_all() if cut == "drop" else net.vanish("target")
            gate.set()
            assert closed_how(sock) == "reset"
        counters = ended(rule, net.fw)
        assert counters.bytes_down == len(first)
        assert (counters.accepted, counters.connect_failed) == (1, 0)


@pytest.mark.parametrize(("cut", "ender"), [("drop", "idle timeout"), ("vanish", "idle timeout"),
                                            ("drop", "retransmissions"), ("vanish", "retransmissions"),
                                            ("unreachable", "retransmissions")])
def test_a_target_gone_silent_while_the_client_sends_is_reset(net: Net, cut: str, ender: str) -> None:
    """The target stops answering while the client uploads (its packets dropped, its link gone,
    or each segment answered with an ICMP host unreachable, which TCP takes as a hint only).
    Once the path fills up, nothing moves; the idle timeout, or the kernel giving up
    retransmitting to the target (after tcp_retries2 tries: about 15 minutes by default, a
    second or two here), resets the client. The target holds an in-order prefix, and what the client saw
    acknowledged and the target never got is counted as discarded."""
    data = payload(64 * MB, seed=5)
    got = bytearray()
    gate = threading.Event()

    def take(conn: socket.socket) -> None:
        got.extend(recv_exact(conn, MB))
        hold(gate)              # then read nothing more: the cut left it nothing to read

    with net.server(take) as server:
        if ender == "retransmissions":
            net.sysctl("net.ipv4.tcp_retries2", 2)
        rule = net.forward(server.port, idle_timeout=1.0 if ender == "idle timeout" else 3600.0)
        with net.client(rule.port) as sock:
            sock.sendall(data[:MB])
            wait_for(lambda: len(got) == MB, what="the first megabyte to arrive")
            if cut == "unreachable":
                net.nft("add chain inet cut in { type filter hook input priority 0; }; "
                        f"add rule inet cut in tcp dport {server.port} reject with icmpx type host-unreachable")
            else:
                net.drop_all() if cut == "drop" else net.vanish("target")
            sock.setblocking(False)
            # The idle timeout counts from the forwarder's last move, so on a loaded machine it
            # may reset the client while the client still fills its own socket.
            took, reset_while_filling = fill(sock, data[MB:])
            sent = MB + took
            counters = ended(rule, net.fw)
            acknowledged = sent - unacked(sock)     # a reset socket keeps the count
            sock.settimeout(TIMEOUT)
            assert reset_while_filling or closed_how(sock) == "reset"
            gate.set()
        assert bytes(got) == data[:MB]
        assert counters.bytes_up >= MB
        assert counters.bytes_discarded == acknowledged - MB


@pytest.mark.parametrize("ender", ["idle timeout", "retransmissions"])
def test_a_client_gone_while_the_target_sends_resets_the_target(net: Net, ender: str) -> None:
    """The client's host vanishes in the middle of a download. The target is reset (at the
    idle timeout, or once the kernel gives up retransmitting to the client); the client kept an
    in-order prefix, and what the target saw acknowledged beyond it is counted as discarded."""
    data = payload(64 * MB, seed=6)

    def flood(conn: socket.socket) -> tuple[int, int]:
        sent = 0
        try:
            while sent < len(data):
                sent += conn.send(data[sent:sent + MB])
        except ConnectionResetError:
            return sent, unacked(conn)      # a reset socket keeps the count
        raise AssertionError("the flood was taken whole")

    with net.server(flood) as server:
        if ender == "retransmissions":
            net.sysctl("net.ipv4.tcp_retries2", 2)
        rule = net.forward(server.port, idle_timeout=1.0 if ender == "idle timeout" else 3600.0)
        with net.client(rule.port) as sock:
            got = bytearray(recv_exact(sock, MB))
            net.vanish("client")
            sent, unacknowledged = server.result()
            counters = ended(rule, net.fw)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while chunk := sock.recv(MB):   # what its kernel took before the link went
                    got += chunk
        assert bytes(got) == data[:len(got)]
        assert len(got) <= counters.bytes_down
        # Every byte the target saw acknowledged reached the client or is counted. Not exactly
        # (as where a peer resets): the client's last acknowledgements went down with its link,
        # so the forwarder counts as lost some bytes the client did get.
        assert len(got) + counters.bytes_discarded >= sent - unacknowledged


# -- a peer that vanishes from an idle connection ----------------------------------------------

def echo_then_wait(conn: socket.socket) -> str:
    """Handler: echo one message, then wait (long) for the end: "eof" or "reset"."""
    conn.sendall(conn.recv(64))
    conn.settimeout(2 * TIMEOUT)
    return end_of_stream(conn)


def shorten_keepalive(net: Net) -> None:
    """Probe after 1 s quiet, twice, 1 s apart (the sysctls are the forwarder namespace's own)."""
    for name, value in (("time", 1), ("intvl", 1), ("probes", 2)):
        net.sysctl(f"net.ipv4.tcp_keepalive_{name}", value)


@pytest.mark.parametrize("gone", ["target", "client", None])
def test_a_peer_vanishing_from_an_idle_connection_is_found_by_keepalive(net: Net, gone: str | None) -> None:
    """Keepalive probes cross no forwarder: each peer's are answered by the forwarder's own
    kernel, so a peer that vanished without a word is found only if the forwarder probes its
    legs itself. With no idle timeout, the connection would otherwise be held for ever and the
    other peer never told. It uses the system's keepalive settings (shortened here, in the
    forwarder's namespace: a dead peer is given up after about 3 s). Probes answered keep a
    quiet connection alive (None: nobody vanishes)."""
    shorten_keepalive(net)

    with net.server(echo_then_wait) as server:
        rule = net.forward(server.port, idle_timeout=0)
        with net.client(rule.port) as sock:
            assert echo_once(sock, b"hello") == b"hello"
            if gone is None:
                time.sleep(4)       # several rounds of probes, all answered
                sock.shutdown(socket.SHUT_WR)
                assert server.result() == "eof"     # still relayed: nothing was reset
            else:
                net.vanish(gone)
                if gone == "target":
                    assert closed_how(sock, timeout=TIMEOUT) == "reset"
                else:
                    assert server.result(timeout=TIMEOUT) == "reset"
        counters = ended(rule, net.fw)
        assert (counters.bytes_up, counters.bytes_down) == (5, 5)


def test_answered_keepalive_probes_are_no_traffic_to_the_idle_timeout(net: Net) -> None:
    """Probes and their answers move no byte: a quiet connection still ends at the idle
    timeout (with a reset both ways), however many probes were answered."""
    shorten_keepalive(net)

    with net.server(echo_then_wait) as server:
        rule = net.forward(server.port, idle_timeout=2.0)     # two probes' time
        with net.client(rule.port) as sock:
            assert echo_once(sock, b"hello") == b"hello"
            assert closed_how(sock) == "reset"
            assert server.result() == "reset"
        counters = ended(rule, net.fw)
        assert (counters.bytes_up, counters.bytes_down, counters.bytes_discarded) == (5, 5, 0)
