"""Config input that looks plausible but is an error (host names that clash by case or are
addresses, ports that are not ASCII digits, numbers the engine cannot hold, rule names that
would forge log lines), and the IPv4/IPv6 wildcard pair that is not."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest

from fastfwd.config import ConfigError, parse_config, parse_rule_options
from fastfwd.rules import Rule, SpecError

from helpers_control import EchoServer, daemon, free_port, needs_engine


def test_two_host_entries_differing_only_in_case_are_an_error() -> None:
    # Names ignore case, so these are one name: silently keeping the last would forward to
    # whichever entry happened to come second.
    with pytest.raises(ConfigError) as info:
        parse_config('[hosts.VM1]\nip = "10.0.0.1"\n[hosts.vm1]\nip = "10.0.0.2"\n')
    assert info.value.errors == ["hosts.vm1: 'vm1' is the same name as hosts.VM1 (names ignore case) (at line 3)"]


@pytest.mark.parametrize("ports", ["8_0", "+80", "80 -90", "٨٠", "80-+90"])
def test_a_port_is_ascii_digits_only(ports: str) -> None:
    # int() also reads '8_0' as 80, '+80', padded text and other scripts' digits.
    with pytest.raises(SpecError, match="is not a port or a port range"):
        Rule.parse(f"{ports}:127.0.0.1:80")
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = "{ports}"\nto = "127.0.0.1:80"\n')
    assert info.value.errors == [f"forward[0].listen: {ports!r} is not a port or a port range (at line 2)"]


def test_a_host_entry_named_by_an_address_is_an_error() -> None:
    # A 'to' with an address forwards to that address: such an entry would never be used.
    with pytest.raises(ConfigError) as info:
        parse_config('[hosts."10.0.0.9"]\nmac = "52:54:00:00:00:01"\n')
    assert info.value.errors == ["hosts.10.0.0.9: '10.0.0.9' is not a valid host name (at line 1)"]


@pytest.mark.parametrize("to, proto, says", [
    ("10.0.0.256:80", "tcp", "target host '10.0.0.256' is not an IPv4 address"),
    ("224.0.0.1:80", "tcp", "target 224.0.0.1 is a multicast address: TCP cannot connect to it"),
    ("224.0.0.1:80", "both", "target 224.0.0.1 is a multicast address: TCP cannot connect to it"),
])
def test_a_target_no_connection_could_reach_is_an_error_at_to(to: str, proto: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = 8080\nto = "{to}"\nproto = "{proto}"\n')
    assert info.value.errors == [f"forward[0].to: {says} (at line 3)"]


def test_one_port_on_the_ipv4_and_the_ipv6_wildcard_is_not_an_overlap() -> None:
    # The engine's IPv6 listeners are IPv6-only: publishing a port on both families takes
    # two rules, which do not clash. Within one family a wildcard still clashes.
    config = parse_config('[[forward]]\nlisten = "0.0.0.0:8000"\nto = "127.0.0.1:80"\n'
                          '[[forward]]\nlisten = "[::]:8000"\nto = "127.0.0.1:80"\n'
                          '[[forward]]\nlisten = "[::1]:8001"\nto = "127.0.0.1:80"\n'
                          '[[forward]]\nlisten = "0.0.0.0:8001"\nto = "127.0.0.1:80"\n')
    assert len(config.rules) == 4
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nlisten = "[::]:8000"\nto = "127.0.0.1:80"\n'
                     '[[forward]]\nlisten = "[::1]:8000"\nto = "127.0.0.1:80"\n')
    assert info.value.errors == [
        "forward[1].listen: tcp port 8000 overlaps forward[0] (tcp [::]:8000 -> 127.0.0.1:80) (at line 5)"]


@needs_engine
@pytest.mark.timeout(60)
def test_a_port_published_on_both_wildcards_forwards_over_both_families(tmp_path: Path, echo: EchoServer) -> None:
    port = free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = "0.0.0.0:{port}"\nto = "127.0.0.1:{echo.port}"\n'
                                     f'[[forward]]\nlisten = "[::]:{port}"\nto = "127.0.0.1:{echo.port}"\n')
    with daemon(tmp_path, "-c", "f.toml"):
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.create_connection((host, port), timeout=10) as sock:
                assert sock.family == family
                sock.sendall(b"both")
                assert sock.recv(4) == b"both"


@pytest.mark.parametrize("key, toml, value", [("idle_timeout", "nan", math.nan), ("connect_timeout", "inf", math.inf),
                                              ("udp_max_sessions", "100000000000000000000000", 10 ** 23)])
def test_rule_options_refuse_numbers_no_engine_can_take(key: str, toml: str, value: float) -> None:
    # TOML and JSON can say nan and inf, and neither bounds an integer: the engine keeps
    # seconds as milliseconds and counts as C ints.
    with pytest.raises(ConfigError) as info:
        parse_rule_options({key: value})
    assert info.value.errors[0].startswith(f"options.{key}: expected ")
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = "8000"\nto = "127.0.0.1:80"\n{key} = {toml}\n')
    assert info.value.errors[0].startswith(f"forward[0].{key}: expected ")


@pytest.mark.parametrize("name", ["web\n2026-01-01 00:00:00,000 INFO forged line", "x" * 100_000, ""])
def test_a_rule_name_that_would_forge_log_lines_is_refused(name: str) -> None:
    with pytest.raises(SpecError, match="name: expected 1 to 128 printable characters"):
        Rule.parse("0:127.0.0.1:9", name=name)
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = "8000"\nto = "127.0.0.1:80"\nname = {json.dumps(name)}\n')
    assert info.value.errors[0].startswith("forward[0].name: expected 1 to 128 printable characters")


def test_daemon_settings_refuse_nan_and_infinite_seconds() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[control]\ndrain_deadline = nan\n")
    assert info.value.errors == [
        "control.drain_deadline: expected a number of seconds from 0 to 1000000000, got nan (at line 2)"]


@pytest.mark.parametrize("proto", ['["tcp", 1]', '[{}, "udp"]', '[["tcp"], "udp"]'])
def test_a_proto_list_of_other_things_than_names_is_an_error(proto: str) -> None:
    # Not a TypeError from comparing a name with a number: every value gets its one line.
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = "8000"\nto = "127.0.0.1:80"\nproto = {proto}\n')
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith("forward[0].proto: expected ")


def test_a_rule_name_that_is_not_a_string_is_reported_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nlisten = "8000"\nto = "127.0.0.1:80"\nname = 5\n')
    assert info.value.errors == ["forward[0].name: expected a string, got an integer (at line 4)"]


@pytest.mark.parametrize("section, key", [("control", "lease_socket"), ("control", "control_socket"),
                                          ("control", "state_dir"), ("sources", "dhcp_lease_file")])
def test_a_path_with_a_nul_character_is_an_error(section: str, key: str) -> None:
    # No system call takes such a path: accepted, it stopped the daemon with a traceback.
    with pytest.raises(ConfigError) as info:
        parse_config(f'[{section}]\n{key} = "/run/a\\u0000b"\n')
    assert info.value.errors == [
        f"{section}.{key}: '/run/a\\x00b' holds a NUL character, which no file path can (at line 2)"]


@pytest.mark.parametrize("ip, listen, to, says", [
    ("224.0.0.1", "8080", "80", "target 224.0.0.1 is a multicast address: TCP cannot connect to it"),
    ("127.0.0.1", "0.0.0.0:8080", "8080", "target 127.0.0.1:8080 is this rule's own listener: it would forward to itself"),
])
def test_a_host_entry_with_an_ip_is_checked_as_that_address_would_be(ip: str, listen: str, to: str, says: str) -> None:
    # The name stands for the address: a target no connection could reach, or the rule's own
    # listener (each connection would open another, without end), is the same error through it.
    with pytest.raises(ConfigError) as info:
        parse_config(f'[hosts.vm1]\nip = "{ip}"\n[[forward]]\nlisten = "{listen}"\nto = "vm1:{to}"\n')
    assert info.value.errors == [f"forward[0].to: {says} (hosts.vm1) (at line 5)"]


@pytest.mark.parametrize("key", ["allow_users", "allow_groups"])
@pytest.mark.parametrize("number", [-5, 4294967295, 1 << 40])
def test_a_numeric_user_or_group_id_no_system_has_is_an_error(key: str, number: int) -> None:
    # Accepted, it stopped the daemon with an OverflowError traceback from chown; and
    # 4294967295 is chown's "leave as is", not an id.
    with pytest.raises(ConfigError) as info:
        parse_config(f"[control]\n{key} = [0, {number}]\n")
    assert info.value.errors == [f"control.{key}: id {number} is not a {key[6:-1]} id (0 to 4294967294) (at line 2)"]


def test_an_option_only_the_other_protocol_uses_is_an_error_where_the_rule_sets_it() -> None:
    # It would do nothing: a UDP rule has no connections to cap, a TCP rule no sessions.
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nlisten = 80\nto = "127.0.0.1:9"\nudp_max_sessions = 5\n'
                     '[[forward]]\nproto = "udp"\nlisten = 53\nto = "127.0.0.1:9"\nmax_connections = 9\n'
                     'on_retarget = "close"\n')
    assert info.value.errors == [
        "forward[0].udp_max_sessions: a UDP option, and this rule is TCP only (at line 4)",
        "forward[1].max_connections: a TCP option, and this rule is UDP only (at line 9)",
        "forward[1].on_retarget: a TCP option, and this rule is UDP only (at line 10)"]
    # Both protocols use them; [defaults] serve rules of either.
    config = parse_config('[defaults]\nudp_max_sessions = 5\nmax_connections = 9\n'
                          '[[forward]]\nproto = "both"\nlisten = 80\nto = "127.0.0.1:9"\nudp_idle_timeout = 3\n'
                          'splice = "never"\n[[forward]]\nlisten = 81\nto = "127.0.0.1:9"\n')
    assert [(r.proto, r.options.udp_max_sessions, r.options.max_connections) for r in config.rules] == [
        ("tcp", 5, 9), ("udp", 5, 9), ("tcp", 5, 9)]


def test_an_unknown_proto_is_the_one_error_for_its_rules_options() -> None:
    # Which protocol's options fit is not known then: the check once failed with IndexError.
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nproto = "sctp"\nlisten = 80\nto = "127.0.0.1:9"\nsplice = "never"\n')
    assert [e.split(":")[0] for e in info.value.errors] == ["forward[0].proto"]
