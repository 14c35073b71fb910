"""IPv4, IPv6 and the wildcards across the product: forwards from one family to the other
(single ports and ranges, TCP and UDP), what the ``0.0.0.0`` and ``[::]`` listeners take,
replies from the address a UDP client sent to, ``allow`` and ``source`` lists of either
family, target names that move between families, and the specs that cannot work refused
with one line when they are loaded instead of failing per connection."""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from fastfwd.config import ConfigError, parse_config
from fastfwd.host.lab import Lab
from fastfwd.rules import Proto, Rule, RuleOptions, SpecError
from netutil import (LOOP4, LOOP6, TIMEOUT, Handler, Received, SyncForwarder, TcpServer, UdpEcho, bracket, connect,
                     echo_handler, echo_once, free_port_range, make_rule, payload, turned_away_how,
                     udp_roundtrip, udp_socket)

PROTOS = ("tcp", "udp")
KINDS = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def plain(host: str) -> str:
    """An address as its own family writes it: a dual-stack server sees IPv4 peers mapped."""
    ip = ipaddress.ip_address(host)
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def peer_address(conn: socket.socket) -> str:
    """TCP handler: tell the client which address the connection came from."""
    conn.sendall(b"ok")
    return plain(conn.getpeername()[0])


def reach(port: int, host: str = LOOP4) -> None:
    """One connection through the forwarder to a ``peer_address`` server."""
    with connect(port, host) as sock:
        assert sock.recv(2) == b"ok"


# -- forwarding from one family to the other -------------------------------------------------

def check_tcp_ports(listen: str, first: int, servers: list[TcpServer], size: int = 200_000) -> None:
    """Each port of the range reaches its own target port, bytes intact both ways (the payload
    is past the splice threshold, so both copy and splice carry it)."""
    for i, server in enumerate(servers):
        message = payload(size, seed=i + 1)
        with connect(first + i, listen) as sock:
            assert echo_once(sock, message) == message
            sock.shutdown(socket.SHUT_WR)
        assert server.result() == Received.of(message), f"target port {server.port}"


def check_udp_ports(listen: str, first: int, servers: list[UdpEcho]) -> None:
    with udp_socket(listen) as sock:
        for i, server in enumerate(servers):
            message = payload(1200, seed=i + 1)
            assert udp_roundtrip(sock, (listen, first + i), message) == message
            assert [Received.of(message).digest] in server.received.values(), f"target port {server.port}"


@pytest.mark.parametrize("proto", PROTOS)
@pytest.mark.parametrize("listen, target", [(LOOP6, LOOP4), ("127.0.0.2", LOOP6), (LOOP6, LOOP6)],
                         ids=["6to4", "4to6", "6to6"])
def test_a_port_range_forwards_across_families(fwd: SyncForwarder, proto: Proto, listen: str, target: str) -> None:
    count = 3
    kinds = (KINDS[proto],)
    target_port = free_port_range(count, target, kinds)
    listen_port = free_port_range(count, listen, kinds, start=target_port + count + 100)
    servers = [TcpServer(echo_handler, target, target_port + i) if proto == "tcp" else UdpEcho(target, target_port + i)
               for i in range(count)]
    try:
        fwd.add(make_rule(target_port, proto, target, listen_port=listen_port, count=count, listen_host=listen))
        if proto == "tcp":
            check_tcp_ports(listen, listen_port, servers)
        else:
            check_udp_ports(listen, listen_port, servers)
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize("proto", PROTOS)
def test_the_last_port_forwards(fwd: SyncForwarder, proto: Proto) -> None:
    try:
        server = TcpServer(echo_handler, LOOP4, 65535) if proto == "tcp" else UdpEcho(LOOP4, 65535)
    except OSError:
        pytest.skip("port 65535 is taken on 127.0.0.1")
    with server:
        try:
            fwd.add(Rule.parse("[::1]:65535:127.0.0.1:65535", proto))
        except OSError:
            pytest.skip("port 65535 is taken on ::1")
        if proto == "tcp":
            check_tcp_ports(LOOP6, 65535, [server])
        else:
            check_udp_ports(LOOP6, 65535, [server])


# -- the wildcards ---------------------------------------------------------------------------

def refused(proto: Proto, host: str, port: int) -> bool:
    """Nothing listens on ``host:port``: a TCP connect is refused, a UDP datagram draws an ICMP
    port-unreachable (reported on a connected socket's next receive)."""
    if proto == "tcp":
        return turned_away_how(port, host) == "refused"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        sock.send(b"anyone?")
        try:
            sock.recv(64)
        except ConnectionRefusedError:
            return True
        return False


def tag_handler(tag: bytes) -> Handler:
    def handle(conn: socket.socket) -> None:
        conn.sendall(tag + conn.recv(64))
    return handle


def ask(proto: Proto, host: str, port: int, message: bytes) -> bytes:
    if proto == "udp":
        with udp_socket(host) as sock:
            return udp_roundtrip(sock, (host, port), message)
    with connect(port, host) as sock:
        sock.sendall(message)
        return sock.recv(64)


class TaggedUdp(UdpEcho):
    """A UDP echo that puts its tag in front of each answer, to tell two targets apart."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        super().__init__()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
                self.sock.sendto(self.tag + data, source)
            except (TimeoutError, OSError):
                continue


def tagged_server(proto: Proto, tag: bytes) -> TcpServer | UdpEcho:
    return TcpServer(tag_handler(tag)) if proto == "tcp" else TaggedUdp(tag)


@pytest.mark.parametrize("proto", PROTOS)
def test_the_ipv6_wildcard_takes_ipv6_clients_only(fwd: SyncForwarder, proto: Proto) -> None:
    # Deliberate (IPV6_V6ONLY): an IPv4 client never shows up on [::] as ::ffff:a.b.c.d, so
    # allow lists see one family per listener and 0.0.0.0 can take the port's IPv4 side.
    with tagged_server(proto, b"v6:") as server:
        port = free_port_range(1, LOOP4, (KINDS[proto],))
        fwd.add(Rule.parse(f"[::]:{port}:127.0.0.1:{server.port}", proto))
        assert ask(proto, LOOP6, port, b"hi") == b"v6:hi"
        assert refused(proto, LOOP4, port)


@pytest.mark.parametrize("proto", PROTOS)
def test_both_wildcards_on_one_port_each_forward_their_own_family(fwd: SyncForwarder, proto: Proto) -> None:
    with tagged_server(proto, b"four:") as four, tagged_server(proto, b"six:") as six:
        port = free_port_range(1, LOOP4, (KINDS[proto],))
        fwd.apply([Rule.parse(f"0.0.0.0:{port}:127.0.0.1:{four.port}", proto),
                   Rule.parse(f"[::]:{port}:127.0.0.1:{six.port}", proto)])
        for _ in range(2):
            assert ask(proto, "127.0.0.2", port, b"a") == b"four:a"
            assert ask(proto, LOOP6, port, b"b") == b"six:b"


@pytest.fixture
def v6_lab() -> Iterator[tuple[Lab, str]]:
    """A namespace whose lo has ::1 and two more IPv6 addresses, fd00:ff::1 and fd00:ff::2."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    with Lab() as lab:
        ns = lab.netns("fam6")
        with IPRoute(netns=ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for address in ("fd00:ff::1", "fd00:ff::2"):
                ipr.addr("add", index=lo, address=address, prefixlen=128)
        yield lab, ns


@pytest.mark.root
def test_udp_on_the_ipv6_wildcard_replies_from_the_address_the_client_sent_to(v6_lab: tuple[Lab, str]) -> None:
    lab, ns = v6_lab
    server = lab.call(ns, UdpEcho, LOOP6)
    fwd = lab.call(ns, SyncForwarder, 2)
    sock = lab.call(ns, udp_socket, LOOP6)
    try:
        rule = fwd.add(Rule.parse(f"[::]:0:[::1]:{server.port}", "udp"))
        for local in ("fd00:ff::2", "::1", "fd00:ff::1"):
            message = f"via {local}".encode()
            sock.sendto(message, (local, rule.port))
            data, source = sock.recvfrom(64)
            assert data == message
            assert source[:2] == (local, rule.port), f"sent to {local}, reply came from {source}"
    finally:
        sock.close()
        fwd.close()
        server.close()


@pytest.mark.root
def test_an_ipv6_source_pool_spreads_upstream_connections(v6_lab: tuple[Lab, str]) -> None:
    lab, ns = v6_lab
    pool = ("fd00:ff::1", "fd00:ff::2")
    server = lab.call(ns, TcpServer, peer_address, LOOP6)
    fwd = lab.call(ns, SyncForwarder, 1)
    try:
        rule = fwd.add(Rule.parse(f"[::1]:0:[::1]:{server.port}", options=RuleOptions(source=pool)))
        for _ in range(4):
            with lab.socket(ns, socket.AF_INET6) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect((LOOP6, rule.port))
                assert sock.recv(2) == b"ok"
        assert sorted(server.result() for _ in range(4)) == sorted(pool * 2)
    finally:
        fwd.close()
        server.close()


@pytest.mark.root
def test_a_name_moving_family_is_followed_by_every_rule_though_a_pool_address_went_away(
        v6_lab: tuple[Lab, str]) -> None:
    """A name moves from IPv4 to IPv6 after the pool's IPv6 address was removed from the host.
    Checking the pool again for the new family raised out of resolve: the rule stayed on the
    old address, the next rule on the name was never re-pointed, and the name counted as
    resolved, so sending the same address again changed nothing. Both rules must follow (the
    connections leaving from the kernel's choice), with a warning."""
    lab, ns = v6_lab
    server = lab.call(ns, TcpServer, peer_address, "::")
    fwd = lab.call(ns, SyncForwarder, 1)
    try:
        rules = [fwd.add(Rule.parse(f"0:vm1:{server.port}", options=RuleOptions(source=("127.0.0.1", "fd00:ff::1"))))
                 for _ in range(2)]
        fwd.resolve("vm1", LOOP4)
        with IPRoute(netns=ns) as ipr:
            ipr.addr("del", index=ipr.link_lookup(ifname="lo")[0], address="fd00:ff::1", prefixlen=128)
        assert fwd.resolve("vm1", LOOP6) == rules
        for rule in rules:
            with lab.socket(ns, socket.AF_INET) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect((LOOP4, rule.port))
                assert sock.recv(2) == b"ok"
            assert server.result() == "::1"
    finally:
        fwd.close()
        server.close()


# -- allow lists -----------------------------------------------------------------------------

@pytest.mark.parametrize("listen, allow, admitted", [
    (LOOP6, ("::1/128",), True),
    (LOOP6, ("fd00::/8",), False),
    (LOOP6, ("10.0.0.0/8", "::/0"), True),
    (LOOP6, ("127.0.0.0/8", "fd00::/8"), False),     # an IPv4 network never admits an IPv6 client
    (LOOP4, ("::/0", "127.0.0.0/8"), True),
    (LOOP4, ("::/0", "10.0.0.0/8"), False),          # nor an IPv6 network an IPv4 client
], ids=["v6-host", "v6-other", "mixed-v6-any", "mixed-v6-none", "mixed-v4-match", "mixed-v4-none"])
def test_an_allow_list_admits_by_the_clients_own_family(fwd: SyncForwarder, listen: str, allow: tuple[str, ...],
                                                       admitted: bool) -> None:
    with TcpServer(echo_handler) as server:
        rule = fwd.add(make_rule(server.port, listen_host=listen, allow=allow))
        if admitted:
            with connect(rule.port, listen) as sock:
                assert echo_once(sock, b"in") == b"in"
        else:
            assert turned_away_how(rule.port, listen) in ("eof", "reset")
            assert fwd.wait_counter(rule, "refused", 1).accepted == 0


@pytest.mark.parametrize("listen", [LOOP4, LOOP6])
def test_an_allow_list_keeps_other_sources_off_a_udp_rule(fwd: SyncForwarder, listen: str) -> None:
    """Admitted sources are forwarded; a reload that narrows the list turns away the next
    datagram of a session already open (the list is checked per datagram, not per session)."""
    own = "127.0.0.0/8" if listen == LOOP4 else "::1/128"
    others = ("192.0.2.0/24", "2001:db8::/32")
    with UdpEcho(listen) as server:
        rule = fwd.add(make_rule(server.port, "udp", listen, allow=(own, *others)))
        with udp_socket(listen) as sock:
            assert udp_roundtrip(sock, (listen, rule.port), b"let in") == b"let in"
            fwd.apply([make_rule(server.port, "udp", listen, listen_port=rule.port, allow=others)])
            sock.sendto(b"keep out", (listen, rule.port))
            counters = fwd.wait_counter(rule, "refused", 1)
        assert (counters.datagrams_up, counters.sessions_created, server.total) == (1, 1, 1)


@pytest.mark.parametrize("listen, allow", [
    ("::1", ("127.0.0.0/8",)), ("::", ("127.0.0.0/8", "10.0.0.0/8")), ("127.0.0.1", ("::1/128",)),
    ("0.0.0.0", ("fd00::/8",)),
])
def test_an_allow_list_with_no_network_of_the_listeners_family_is_refused(listen: str, allow: tuple[str, ...]) -> None:
    # Every client of the listener would be refused: say so when the rule is made.
    with pytest.raises(SpecError, match=r"allow: no IPv[46] network, so every client of .* would be refused"):
        Rule.parse(f"{bracket(listen)}:8000:127.0.0.1:80", options=RuleOptions(allow=allow))


def test_an_ipv4_mapped_allow_network_names_its_ipv4_form() -> None:
    with pytest.raises(SpecError) as info:
        RuleOptions(allow=("::ffff:127.0.0.0/104",))
    assert str(info.value) == ("allow: '::ffff:127.0.0.0/104' is an IPv4-mapped network, which no client "
                               "matches: write '127.0.0.0/8' (IPv4 clients are seen as IPv4)")


# -- source pools ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, source, message", [
    ("0:127.0.0.1:80", ("::1",), "source: '::1' is IPv6 but the target 127.0.0.1 is IPv4"),
    ("[::1]:0:[::1]:80", ("127.0.0.2", "127.0.0.3"), "source: '127.0.0.2' is IPv4 but the target ::1 is IPv6"),
])
def test_a_source_of_the_other_family_than_the_target_is_refused(spec: str, source: tuple[str, ...],
                                                                  message: str) -> None:
    with pytest.raises(SpecError) as info:
        Rule.parse(spec, options=RuleOptions(source=source))
    assert str(info.value) == f"{spec!r}: {message}"


def test_a_pool_of_both_families_in_defaults_serves_address_targets_of_either(fwd: SyncForwarder) -> None:
    """One [defaults] pool for a dual-stack host, as one allow list may be: each rule with an
    address target takes the pool's addresses of its target's family. Refusing every rule
    whose target is of one family rejected such a config outright."""
    with TcpServer(peer_address, "::") as server:
        config = parse_config('[defaults]\nsource = ["127.0.0.2", "::1", "127.0.0.3"]\n'
                              f'[[forward]]\nlisten = 0\nto = "127.0.0.1:{server.port}"\n'
                              f'[[forward]]\nlisten = 0\nto = "[::1]:{server.port}"\n')
        for rule, expected in zip(config.rules, ({"127.0.0.2", "127.0.0.3"}, {"::1"})):
            active = fwd.add(rule)
            for _ in range(4):
                reach(active.port)
            seen = {server.result() for _ in range(4)}
            assert seen == expected, f"to {rule.target_host}: connections came from {seen}"


def test_an_ipv4_mapped_source_names_its_ipv4_form() -> None:
    with pytest.raises(SpecError, match=r"source '::ffff:127.0.0.2' is an IPv4-mapped address: write 127.0.0.2$"):
        RuleOptions(source=("::ffff:127.0.0.2",))


def test_a_name_target_uses_the_pool_addresses_of_the_family_it_resolves_to(fwd: SyncForwarder) -> None:
    # A dual-stack server: one port for both families, so the name can move between them.
    with TcpServer(peer_address, "::") as server:
        pool = ("127.0.0.2", "::1", "127.0.0.3")
        rule = fwd.add(Rule.parse(f"0:vm1:{server.port}", options=RuleOptions(source=pool)))
        for ip, expected in ((LOOP4, {"127.0.0.2", "127.0.0.3"}), (LOOP6, {"::1"})):
            fwd.resolve("vm1", ip)
            for _ in range(6):
                reach(rule.port)
            seen = {server.result() for _ in range(6)}
            assert seen == expected, f"to {ip}: connections came from {seen}"


# -- target names ----------------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOS)
def test_a_name_target_moves_between_families(fwd: SyncForwarder, proto: Proto) -> None:
    # A dual-stack target: the forwarder's upstream leg shows which family it used.
    if proto == "tcp":
        server: TcpServer | UdpEcho = TcpServer(peer_address, "::")
    else:
        server = UdpEcho("::")
    with server:
        rule = fwd.add(Rule.parse(f"[::1]:0:vm1:{server.port}", proto))
        with udp_socket(LOOP6) as sock:
            for n, ip in enumerate((LOOP6, LOOP4, LOOP6)):
                fwd.resolve("vm1", ip)
                if proto == "tcp":
                    reach(rule.port, LOOP6)
                    assert server.result() == ip
                else:
                    message = f"{n}: to {ip}".encode()
                    assert udp_roundtrip(sock, (LOOP6, rule.port), message) == message
                    last = [plain(source[0]) for source, digests in server.received.items()
                            if Received.of(message).digest in digests]
                    assert last == [ip]


@pytest.mark.parametrize("name", ["localhost", "LocalHost", "db.localhost"])
def test_localhost_as_a_target_name_is_refused_with_the_addresses_to_write(name: str) -> None:
    # Names come from [hosts] and DHCP leases only: 'localhost' would wait for a guest that
    # calls itself so, instead of reaching this host.
    with pytest.raises(SpecError) as info:
        Rule.parse(f"8000:{name}:80")
    assert str(info.value) == (f"'8000:{name}:80': target host {name.lower()!r} is a loopback name: write "
                               "127.0.0.1 or [::1] (names come from [hosts] and DHCP leases)")


def test_a_name_target_that_nothing_resolves_is_pending_and_refuses(fwd: SyncForwarder) -> None:
    rule = fwd.add(Rule.parse("[::1]:0:vm9:80"))
    assert rule.pending
    assert turned_away_how(rule.port, LOOP6) == "refused"


# -- specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, listen, target", [
    ("[::]:80:127.0.0.1:80", "::", "127.0.0.1"),
    ("[0:0::0]:80:[::FFFF:127.0.0.1]:80", "::", "::ffff:127.0.0.1"),   # a mapped target is fine to connect to
    ("[::1]:0:[::1]:65535", "::1", "::1"),
])
def test_good_specs_of_either_family(spec: str, listen: str, target: str) -> None:
    rule = Rule.parse(spec)
    assert (rule.listen_host, ipaddress.ip_address(rule.target_host)) == (listen, ipaddress.ip_address(target))


@pytest.mark.parametrize("entry, error", [
    ('listen = "[::1]:8000"\nto = "127.0.0.1:80"\nallow = ["127.0.0.0/8"]\n',
     "forward[0].allow: no IPv6 network, so every client of [::1]:8000 would be refused (at line 4)"),
    ('listen = 8000\nto = "127.0.0.1:80"\nallow = ["::ffff:10.0.0.0/104"]\n',
     ("forward[0].allow: '::ffff:10.0.0.0/104' is an IPv4-mapped network, which no client matches: "
      "write '10.0.0.0/8' (IPv4 clients are seen as IPv4) (at line 4)")),
    ('listen = 8000\nto = "[::1]:80"\nsource = ["127.0.0.2"]\n',
     "forward[0].source: '127.0.0.2' is IPv4 but the target ::1 is IPv6 (at line 4)"),
    ('listen = "[::ffff:127.0.0.1]:8000"\nto = "127.0.0.1:80"\n',
     "forward[0].listen: listen address '::ffff:127.0.0.1' is an IPv4-mapped address: write 127.0.0.1 (at line 2)"),
    ('listen = 8000\nto = "localhost:80"\n',
     ("forward[0].to: target host 'localhost' is a loopback name: write 127.0.0.1 or [::1] "
      "(names come from [hosts] and DHCP leases) (at line 3)")),
])
def test_a_config_names_the_key_of_a_family_mistake(entry: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[[forward]]\n" + entry)
    assert info.value.errors == [error]


def test_defaults_may_hold_networks_of_both_families() -> None:
    # One [defaults] allow list serves IPv4 and IPv6 listeners alike.
    config = parse_config('[defaults]\nallow = ["10.0.0.0/8", "fd00::/8"]\n'
                          '[[forward]]\nlisten = "0.0.0.0:8000"\nto = "127.0.0.1:80"\n'
                          '[[forward]]\nlisten = "[::]:8000"\nto = "127.0.0.1:80"\n')
    assert [r.options.allow for r in config.rules] == [("10.0.0.0/8", "fd00::/8")] * 2



@pytest.mark.parametrize("spec, source", [("0:127.0.0.1:80", "192.0.2.7"), ("[::1]:0:[::1]:80", "2001:db8::7")])
def test_a_source_that_is_not_an_address_of_this_host_is_refused(fwd: SyncForwarder, spec: str, source: str) -> None:
    # The engine could not bind it, and every connection would leave from the kernel's choice.
    with pytest.raises(OSError) as info:
        fwd.add(Rule.parse(spec, options=RuleOptions(source=("127.0.0.2" if "." in source else "::1", source))))
    assert (info.value.errno, info.value.strerror) == (errno.EADDRNOTAVAIL, f"source {source} is not an address of this host")
    assert fwd.fw.rules == []
