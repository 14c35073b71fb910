"""Port specs: what parses into which rule, and the one clear error for each bad input; a port
already in use is an error naming the port, from the API and from the CLI."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fastfwd import DEFAULT_LISTEN, Rule, SpecError
from fastfwd.rules import Proto
from netutil import (LOOP4, SyncForwarder, TcpServer, cli_sandbox, connect, echo_handler, echo_once,
                     free_port_range, make_rule, run_cli)


@pytest.mark.parametrize("text, proto, expected", [
    ("8080:127.0.0.1:80", "tcp", Rule("tcp", 8080, "127.0.0.1", 80, DEFAULT_LISTEN)),
    ("0.0.0.0:2222:192.168.122.10:22", "tcp", Rule("tcp", 2222, "192.168.122.10", 22, "0.0.0.0")),
    ("127.0.0.1:8000-8099:10.0.0.2:9000-9099", "tcp", Rule("tcp", 8000, "10.0.0.2", 9000, "127.0.0.1", 100)),
    ("[::1]:5353:[::1]:53", "udp", Rule("udp", 5353, "::1", 53, "::1")),
    ("[::]:80:vm1:8080", "tcp", Rule("tcp", 80, "vm1", 8080, "::")),
    ("0:vm-2.example.org:22", "tcp", Rule("tcp", 0, "vm-2.example.org", 22)),
    ("65535:10.0.0.1:65535", "udp", Rule("udp", 65535, "10.0.0.1", 65535)),
])
def test_good_specs(text: str, proto: Proto, expected: Rule) -> None:
    rule = Rule.parse(text, proto)
    assert rule == expected
    printed = str(rule).split(" ", 1)[1].replace(" -> ", ":")  # "tcp A:P -> H:Q" reads back as a spec
    assert Rule.parse(printed, proto) == rule


def test_default_listen_address_is_loopback() -> None:
    assert DEFAULT_LISTEN == "127.0.0.1"
    assert Rule.parse("8080:10.0.0.2:80").listen_host == "127.0.0.1"


@pytest.mark.parametrize("text, message", [
    ("9000-8000:127.0.0.1:80-79", "range 9000-8000 is reversed"),
    ("8000-8009:127.0.0.1:9009-9000", "range 9009-9000 is reversed"),
    ("70000:127.0.0.1:80", "port 70000 is out of range 0-65535"),
    ("8080:127.0.0.1:99999", "port 99999 is out of range"),
    ("8080:127.0.0.1:0", "target port 0 is out of range 1-65535"),
    ("http:127.0.0.1:80", "'http' is not a port or a port range"),
    ("8080:127.0.0.1:-1", "is not a port or a port range"),
    ("8080:bad_host!:80", "target host 'bad_host!' is neither an IP address nor a valid host name"),
    ("8080:-leading.example:80", "is neither an IP address nor a valid host name"),
    ("localhost:8080:127.0.0.1:80", "listen address 'localhost' is not an IPv4 or IPv6 address"),
    ("999.1.1.1:8080:127.0.0.1:80", "listen address '999.1.1.1' is not an IPv4 or IPv6 address"),
    ("[::1:5353:[::1]:53", "unbalanced '[' and ']'"),
    ("::1]:5353:127.0.0.1:53", "unbalanced '[' and ']'"),
    ("8000-8009:127.0.0.1:9000-9004", "listen range has 10 ports but target range has 5"),
    ("8000:127.0.0.1:9000-9001", "listen range has 1 ports but target range has 2"),
    ("0-9:127.0.0.1:9000-9009", "listen port 0 (any free port) cannot start a range"),
    ("8080", "expected [ADDR:]PORT[-END]:HOST:PORT[-END]"),
    ("8080:80", "expected [ADDR:]PORT[-END]:HOST:PORT[-END]"),
    ("a:b:c:d:e", "expected [ADDR:]PORT[-END]:HOST:PORT[-END]"),
    ("::1:5353:::1:53", "expected [ADDR:]PORT[-END]:HOST:PORT[-END] (IPv6 addresses go in brackets)"),
    ("8080:::1:80", "(IPv6 addresses go in brackets)"),
    ("[::ffff:127.0.0.1]:8080:127.0.0.1:80",
     "listen address '::ffff:127.0.0.1' is an IPv4-mapped address: write 127.0.0.1"),
    ("[::]:8080-8081:[::1]:80", "listen range has 2 ports but target range has 1"),
    ("[::1]:65535-65536:[::1]:80-81", "port 65536 is out of range 0-65535"),
])
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        Rule.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_protocol() -> None:
    with pytest.raises(SpecError, match="proto: expected 'tcp' or 'udp', got 'sctp'"):
        Rule.parse("80:127.0.0.1:80", "sctp")  # type: ignore[arg-type]


def busy_port(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((LOOP4, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(1)
    return sock


@pytest.mark.parametrize("proto, kind", [("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)])
def test_port_in_use_raises_oserror_naming_the_port(fwd: SyncForwarder, proto: Proto, kind: int) -> None:
    with busy_port(kind) as busy, TcpServer(echo_handler) as server:
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:
            fwd.add(make_rule(9, proto, listen_port=port))
        assert str(port) in str(info.value)
        assert fwd.fw.rules == []
        rule = fwd.forward(server.port)  # the forwarder is unharmed
        with connect(rule.port) as sock:
            assert echo_once(sock, b"fine") == b"fine"


def test_port_range_partly_in_use_binds_nothing(fwd: SyncForwarder) -> None:
    base = free_port_range(5)
    with socket.create_server((LOOP4, base + 2)):
        with pytest.raises(OSError) as info:
            fwd.add(make_rule(9000, listen_port=base, count=5))
        assert str(base + 2) in str(info.value)
        for port in (base, base + 1, base + 3, base + 4):  # what it bound before the clash is released
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # others' TIME_WAIT is no clash
                probe.bind((LOOP4, port))
                probe.listen(1)


def test_cli_port_in_use_exits_with_one_line(tmp_path: Path) -> None:
    """(test_cli.py checks the CLI's bad-spec lines word for word.)"""
    with busy_port() as busy:
        port = busy.getsockname()[1]
        result = run_cli("run", "-t", f"127.0.0.1:{port}:127.0.0.1:9", *cli_sandbox(tmp_path))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert str(port) in result.stderr and "in use" in result.stderr


@pytest.mark.parametrize("options, message", [
    ({"allow": [1]}, "allow: expected a list of CIDR networks, got the item 1"),  # ipaddress reads 1 as 0.0.0.1
    ({"allow": None}, "allow: expected a list of CIDR networks, got None"),
    ({"source": [None]}, "source: expected a list of addresses, got the item None"),
    ({"source": 5}, "source: expected a list of addresses, got 5"),
])
def test_rule_options_of_other_types_than_lists_of_strings_say_which(options: dict[str, object],
                                                                    message: str) -> None:
    # A program building options itself gets the SpecError naming the field, not a TypeError
    # from deep inside, nor a number taken for an address.
    from fastfwd import RuleOptions

    with pytest.raises(SpecError) as info:
        RuleOptions(**options)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_a_spec_that_is_not_a_string_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="^expected a port spec string, got 8080$"):
        Rule.parse(8080)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["127.0.0.1:8080:10.0.0.5", "[::1]:8080:[::1]", "0.0.0.0:8080:vm1"])
def test_a_spec_whose_target_has_no_port_says_so(text: str) -> None:
    # Read as PORT:HOST:PORT, the listen address would be blamed for not being a port.
    with pytest.raises(SpecError) as info:
        Rule.parse(text)
    assert str(info.value) == f"{text!r}: expected [ADDR:]PORT[-END]:HOST:PORT[-END]: the target has no port"
