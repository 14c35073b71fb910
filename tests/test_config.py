"""The config schema: what a good file yields, and the exact error every bad one gives."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastfwd.config import ConfigError, ControlSettings, EngineSettings, SourceSettings, load_config, parse_config
from fastfwd.leases import HostEntry
from fastfwd.rules import Rule, RuleOptions

from helpers_control import BAD_CONFIGS, bad_config_ids

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    return info.value.errors


@pytest.mark.parametrize("text,error", BAD_CONFIGS, ids=bad_config_ids())
def test_each_bad_config_names_key_path_and_problem(text: str, error: str) -> None:
    assert errors_of(text) == [error]


def test_all_errors_are_collected_not_just_the_first() -> None:
    text = "\n".join(t for t, _ in BAD_CONFIGS if "[[forward]\n" not in t and "[hosts." not in t
                     and "[engine]" not in t and "[control]" not in t and "[sources]" not in t
                     and "[forwards]" not in t)
    errors = errors_of(text)
    assert "forward[0].listen: range 8000-7999 is reversed (at line 2)" in errors
    assert "forward[1].conect_timeout: unknown key (did you mean 'connect_timeout'?) (at line 8)" in errors
    assert "forward[8].splice: expected 'auto', 'always' or 'never', got 'maybe' (at line 37)" in errors
    assert len(errors) >= 12


def test_error_message_carries_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[[forward]]\nlisten = "9-1"\nto = "1.2.3.4:1-9"\n', "/etc/fastfwd.toml")
    assert str(info.value) == "/etc/fastfwd.toml: forward[0].listen: range 9-1 is reversed (at line 2)"


def test_unknown_key_far_from_any_lists_the_valid_ones() -> None:
    assert errors_of('[sources]\nzzz = 1\n') == [
        "sources.zzz: unknown key (valid keys: dhcp, neighbours, dhcp_lease_file) (at line 2)"]


def test_wrong_shapes_are_errors_not_crashes() -> None:
    errors = errors_of('forward = 3\nhosts = "x"\nengine = []\n[[control]]\n')
    assert errors == [
        "hosts: expected a table of [hosts.NAME] entries, got a string (at line 2)",
        "forward: expected an array of tables ([[forward]]) (at line 1)",
        "engine: expected a table, got an array (at line 3)",
        "control: expected a table, got an array (at line 4)",
    ]
    # An entry of an inline array has no line of its own: none is given.
    assert errors_of('forward = [1]\n') == ["forward[0]: expected a table, got an integer"]
    assert errors_of('[[forward]]\nlisten = true\nto = 5\nname = 3\n') == [
        "forward[0].name: expected a string, got an integer (at line 4)",
        "forward[0].listen: expected '[ADDR:]PORT[-END]', got True (at line 2)",
        "forward[0].to: expected 'HOST:PORT[-END]', got 5 (at line 3)",
    ]


def test_full_config_yields_typed_rules_and_settings(tmp_path: Path) -> None:
    path = tmp_path / "fastfwd.toml"
    path.write_text("""
[defaults]
connect_timeout = 3
[[forward]]
name = "ssh"
proto = "both"
listen = "0.0.0.0:2222"
to = "VM1:22"
on_retarget = "close"
[[forward]]
proto = ["udp"]
listen = "[::1]:5353"
to = "[::1]:53"
[[forward]]
listen = "8000-8099"
to = "10.0.0.2:9000-9099"
allow = ["10.0.0.0/8", "::1/128"]
splice = "never"
connect_timeout = 1.5
[hosts.vm1]
mac = "52:54:00:AA:BB:CC"
[hosts.db]
ip = "10.0.0.7"
[engine]
workers = 2
pipe_size = 65536
busy_poll_us = 50
[control]
lease_socket = "run/lease.sock"
control_socket = "/tmp/ctl.sock"
allow_users = ["qemu", 1000]
drain_deadline = 5
metrics_listen = "127.0.0.1:9109"
[sources]
neighbours = true
""")
    config = load_config(path)
    ssh = RuleOptions(connect_timeout=3, on_retarget="close")
    assert config.rules == (
        Rule("tcp", 2222, "vm1", 22, listen_host="0.0.0.0", name="ssh", options=ssh),
        Rule("udp", 2222, "vm1", 22, listen_host="0.0.0.0", name="ssh", options=ssh),
        Rule("udp", 5353, "::1", 53, listen_host="::1", options=RuleOptions(connect_timeout=3)),
        Rule("tcp", 8000, "10.0.0.2", 9000, listen_host="127.0.0.1", count=100,
             options=RuleOptions(connect_timeout=1.5, allow=("10.0.0.0/8", "::1/128"), splice="never")),
    )
    assert config.hosts == {"vm1": HostEntry(mac="52:54:00:aa:bb:cc"), "db": HostEntry(ip="10.0.0.7")}
    assert config.engine == EngineSettings(workers=2, pipe_size=65536, busy_poll_us=50)
    assert config.control.lease_socket == str(tmp_path / "run" / "lease.sock")  # relative to the file
    assert config.control.control_socket == "/tmp/ctl.sock"
    assert config.control.allow_users == ("qemu", 1000)
    assert config.control.drain_deadline == 5.0
    assert config.control.metrics_listen == "127.0.0.1:9109"
    assert config.sources == SourceSettings(dhcp=True, neighbours=True)
    assert config.source == str(path)


def test_empty_file_gives_the_documented_defaults() -> None:
    config = parse_config("", "empty.toml")
    assert config.rules == () and config.hosts == {}
    assert config.engine == EngineSettings(workers=None, pipe_size=1 << 20, busy_poll_us=0)
    assert config.control.drain_deadline == 30.0 and config.control.metrics_listen is None
    assert config.control == ControlSettings()
    assert config.sources == SourceSettings(dhcp=True, neighbours=False)


def test_listen_without_address_is_loopback_only() -> None:
    config = parse_config('[[forward]]\nlisten = "8080"\nto = "10.0.0.1:80"\n')
    assert config.rules[0].listen_host == "127.0.0.1"


def test_unreadable_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.errors == ["cannot read: No such file or directory"]
    (tmp_path / "latin1.toml").write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "latin1.toml")
    assert info.value.errors == ["not UTF-8 text: byte 0xff at line 1, column 9"]


def test_every_option_key_of_rule_options_is_accepted() -> None:
    values = {"connect_timeout": 1, "idle_timeout": 2, "half_closed_timeout": 3, "splice": '"always"',
              "splice_threshold": 4096, "udp_idle_timeout": 5, "udp_max_sessions": 6,
              "max_connections": 7, "allow": '["127.0.0.0/8"]', "source": '["127.0.0.2"]',
              "on_retarget": '"close"', "on_remove": '"close"'}
    assert set(values) == set(RuleOptions.__dataclass_fields__)
    body = "".join(f"{k} = {v}\n" for k, v in values.items())
    # Both protocols: each takes its own options and the other's (a rule of one only would
    # refuse the other's, test_config_strictness).
    rules = parse_config(f'[[forward]]\nproto = "both"\nlisten = 1\nto = "127.0.0.1:2"\n{body}').rules
    assert [r.proto for r in rules] == ["tcp", "udp"]
    assert {r.options for r in rules} == {RuleOptions(1, 2, 3, "always", 4096, 5, 6, 7, ("127.0.0.0/8",),
                                                      ("127.0.0.2",), "close", "close")}


def test_docs_example_is_valid_and_documents_every_default() -> None:
    """The complete example in docs/config.md parses, and its defaults table matches the code."""
    text = DOCS.read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    config = parse_config(example, "docs/config.md")
    assert len(config.rules) >= 3 and config.hosts
    for name, field in RuleOptions.__dataclass_fields__.items():
        assert f"| `{name}` | `{_toml(field.default)}` |" in text, f"{name}: default differs from the code"
    for key in ("workers", "pipe_size", "lease_socket", "control_socket", "state_dir", "allow_users",
                "allow_groups", "drain_deadline", "metrics_listen", "dhcp", "neighbours"):
        assert f"| `{key}` |" in text, f"{key} is not documented"


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[]"
    return str(value)


def test_overlaps_among_thousands_of_rules_are_each_reported_once_on_the_later_entry() -> None:
    text = "".join(f'[[forward]]\nlisten = {10000 + i}\nto = "127.0.0.1:{20000 + i}"\n' for i in range(4000))
    text += '[[forward]]\nproto = "udp"\nlisten = "10000-13999"\nto = "127.0.0.1:20000-23999"\n'  # other protocol
    text += '[[forward]]\nlisten = "127.0.0.2:10000-10009"\nto = "127.0.0.1:1-10"\n'  # another address: fine
    text += '[[forward]]\nlisten = "0.0.0.0:10005-10007"\nto = "127.0.0.1:1-3"\n'  # a wildcard clashes with both
    assert errors_of(text) == [
        "forward[4002].listen: tcp ports 10005-10007 overlaps forward[4001] (tcp 127.0.0.2:10000-10009 -> 127.0.0.1:1-10)"
        " (at line 12009)"]
