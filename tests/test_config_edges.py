"""Config input a user meets in practice and the tool must not misread: a file saved with a
byte-order mark or CRLF line endings, bytes that are not UTF-8, a timeout shorter than the
engine's millisecond, an IPv4-mapped target that is a rule's own listener, and a reloaded
file taking the port of a rule given on the command line."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fastfwd.config import ConfigError, parse_config
from fastfwd.rules import Rule, RuleOptions

from helpers_control import EchoServer, daemon, echo_roundtrip, fastfwd, free_port, needs_engine
from netutil import closed_how, forwarder
from test_reload import write_atomic

pytestmark = pytest.mark.timeout(60)


@needs_engine
def test_a_file_saved_with_a_byte_order_mark_and_crlf_lines_runs(tmp_path: Path, echo: EchoServer) -> None:
    # What Windows editors write (Notepad's "UTF-8" has the mark): TOML in every other way.
    port = free_port()
    text = f'# forwarded\r\n[[forward]]\r\nlisten = {port}\r\nto = "127.0.0.1:{echo.port}"\r\n'
    (tmp_path / "f.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    result = fastfwd("check", str(tmp_path / "f.toml"))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    with daemon(tmp_path, "-c", "f.toml"):
        assert echo_roundtrip(port)


def test_bytes_that_are_not_utf8_are_one_error_naming_their_line(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_bytes(b'[[forward]]\nlisten = 8000\nto = "caf\xe9:80"\n')   # Latin-1, not UTF-8
    result = fastfwd("check", str(path))
    assert result.returncode == 2
    assert result.stderr == f"{path}: not UTF-8 text: byte 0xe9 at line 3, column 10\n"


def test_bytes_that_are_not_utf8_after_a_byte_order_mark_are_named_where_they_are(tmp_path: Path) -> None:
    # The mark is not text: lines and columns count as the user's editor shows them.
    path = tmp_path / "f.toml"
    path.write_bytes(b'\xef\xbb\xbf[[forward]]\nlisten = 8000\nto = "caf\xe9:80"\n')
    result = fastfwd("check", str(path))
    assert (result.returncode, result.stderr) == (2, f"{path}: not UTF-8 text: byte 0xe9 at line 3, column 10\n")


@needs_engine
def test_a_timeout_under_a_millisecond_is_a_millisecond_not_never(echo: EchoServer) -> None:
    # The engine keeps milliseconds, and 0 there means "never": 0.0004 s must not become that.
    with forwarder() as fw:
        rule = fw.add(Rule.parse(f"0:127.0.0.1:{echo.port}", options=RuleOptions(idle_timeout=0.0004)))
        with socket.create_connection(("127.0.0.1", rule.port), timeout=10) as sock:
            assert closed_how(sock, timeout=10) == "reset"
    assert RuleOptions(udp_idle_timeout=0.0004) == RuleOptions(udp_idle_timeout=0.001)


def test_a_negative_zero_timeout_is_zero() -> None:
    assert str(RuleOptions(idle_timeout=-0.0).idle_timeout) == "0.0"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_an_ipv4_mapped_target_that_is_the_rules_own_listener_is_refused(proto: str) -> None:
    # The engine reaches ::ffff:127.0.0.1 over IPv4: a datagram or connection would come back
    # to the rule for good, exactly as with 127.0.0.1.
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nproto = "{proto}"\nlisten = 8000\nto = "[::ffff:127.0.0.1]:8000"\n')
    assert info.value.errors == [
        "forward[0].to: target [::ffff:127.0.0.1]:8000 is this rule's own listener: it would forward to itself"
        " (at line 4)"]


def test_an_ipv4_mapped_multicast_target_is_refused_for_tcp() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nlisten = 8000\nto = "[::ffff:224.0.0.1]:80"\n')
    assert info.value.errors == [
        "forward[0].to: target ::ffff:224.0.0.1 is a multicast address: TCP cannot connect to it (at line 3)"]


@needs_engine
def test_a_reload_taking_a_command_line_rules_port_names_both_and_changes_nothing(
        tmp_path: Path, echo: EchoServer) -> None:
    port, cli_port = free_port(), free_port()
    path = tmp_path / "f.toml"
    entry = f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
    path.write_text(entry)
    with daemon(tmp_path, "-c", "f.toml", "-t", f"{cli_port}:127.0.0.1:{echo.port}") as proc:
        write_atomic(path, entry + f'[[forward]]\nlisten = {cli_port}\nto = "127.0.0.1:9"\n')
        proc.wait_log("rejected, rules unchanged")
        assert (f"config changed: f.toml rejected, rules unchanged: tcp 127.0.0.1:{cli_port} -> 127.0.0.1:9 "
                f"takes the ports of tcp 127.0.0.1:{cli_port} -> 127.0.0.1:{echo.port}, a rule given on the "
                f"command line\n") in proc.log()
        assert echo_roundtrip(cli_port) and echo_roundtrip(port)


@pytest.mark.parametrize("defaults, error", [
    ('allow = ["10.0.0.0/8"]', "forward[0].allow: no IPv6 network, so every client of [::1]:8000 would be refused"),
    ('source = ["::1"]', "forward[0].source: '::1' is IPv6 but the target 127.0.0.1 is IPv4"),
])
def test_an_option_that_does_not_fit_a_rule_says_when_it_comes_from_defaults(defaults: str, error: str) -> None:
    # The entry has no such key: without the hint, the user looks for it there in vain. The
    # line is the entry's, the one the key path names.
    with pytest.raises(ConfigError) as info:
        parse_config(f'[defaults]\n{defaults}\n[[forward]]\nlisten = "[::1]:8000"\nto = "127.0.0.1:80"\n')
    assert info.value.errors == [f"{error} (set in [defaults]) (at line 3)"]
