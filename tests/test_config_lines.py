"""Config errors name the line of the key or table header they are about, wherever it can be
told for certain, and no line where it cannot: files written for real, messages compared whole."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastfwd.config import ConfigError, load_config

from helpers_control import fastfwd

TO = 'to = "127.0.0.1:9"'
VALID = ("proto, listen, to, name, connect_timeout, idle_timeout, half_closed_timeout, splice, "
         "splice_threshold, udp_idle_timeout, udp_max_sessions, max_connections, allow, source, on_retarget, on_remove")


def errors_of(tmp_path: Path, data: bytes) -> list[str]:
    path = tmp_path / "fastfwd.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_check_names_the_line_of_each_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[forward]]\nlisten = 80\ntarget = "x:y"\n\n[[forward]]\nlisten = "abc"\nto = "127.0.0.1:1"\n')
    result = fastfwd("check", str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"{path}: forward[0].target: unknown key (did you mean 'on_retarget'?) (at line 3)",
        f"{path}: forward[0]: missing required key 'to' (at line 1)",
        f"{path}: forward[1].listen: 'abc' is not a port or a port range (at line 6)",
    ]


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_line_endings_and_byte_order_mark_do_not_shift_lines(tmp_path: Path, newline: str, bom: bytes) -> None:
    text = newline.join(["# fastfwd", "[[forward]]", "listen = 8001", TO, "", "[[forward]]", "listen = 8002",
                         TO, "idle_timeot = 5", ""])
    assert errors_of(tmp_path, bom + text.encode()) == [
        "forward[1].idle_timeot: unknown key (did you mean 'idle_timeout'?) (at line 9)"]


# (file text, the errors it must give)
LOCATED = [
    pytest.param('# [[forward]] entries follow\n[[forward]]\nlisten = 8001\n' + TO + '\n'
                 '   # [[forward]]\n[[forward]]\nlisten = "x"\n' + TO + '\n',
                 ["forward[1].listen: 'x' is not a port or a port range (at line 7)"], id="comments"),
    pytest.param('[[forward]]\nlisten = 8001\n' + TO + '\nnote = """\n[[forward]]\nlisten = "y"\n"""\n'
                 "text = '''\n[[forward]]'''\n[[forward]]\nlisten = 8002\nto = 3\n",
                 ["forward[0].note: unknown key (valid keys: " + VALID + ") (at line 4)",
                  "forward[0].text: unknown key (valid keys: " + VALID + ") (at line 8)",
                  "forward[1].to: expected 'HOST:PORT[-END]', got 3 (at line 12)"], id="multi-line strings"),
    pytest.param('[[forward]]\nlisten = 8001\n' + TO + '\nallow = [\n  "10.0.0.0/8",  # lab\n  "10.0.0.0/33",\n]\n'
                 'max_connections = -1\n',
                 ["forward[0].max_connections: expected an integer from 0 to 2147483647, got -1 (at line 8)",
                  "forward[0].allow: '10.0.0.0/33' is not a CIDR network (at line 4)"], id="multi-line array"),
    pytest.param('[hosts.vm1]\nmac = "zz"\n\n[hosts.vm2]\nip = "10.0.0.2"\nmac = "52:54:00:00:00:01"\n',
                 ["hosts.vm1.mac: 'zz' is not a MAC address like 52:54:00:12:34:56 (at line 2)",
                  "hosts.vm2: give exactly one of 'mac' or 'ip' (at line 4)"], id="hosts"),
    pytest.param('[defaults]\nidle_timeout = -1\n[engine]\nworkers = 0\n[control]\n\ndrain_deadline = "x"\n'
                 '[sources]\ndhcp = 1\n',
                 ["sources.dhcp: expected true or false, got 1 (at line 9)",
                  "defaults.idle_timeout: expected a number of seconds from 0 to 1000000000, got -1 (at line 2)",
                  "engine.workers: expected an integer from 1 to 1024, got 0 (at line 4)",
                  "control.drain_deadline: expected a number of seconds from 0 to 1000000000, got 'x' (at line 7)"],
                 id="sections"),
    pytest.param('\nengine.workers = 0\nhosts.vm1.mac = "zz"\n[control]\n  metrics . listen = 1\n',
                 ["hosts.vm1.mac: 'zz' is not a MAC address like 52:54:00:12:34:56 (at line 3)",
                  "engine.workers: expected an integer from 1 to 1024, got 0 (at line 2)",
                  "control.metrics: unknown key (did you mean 'metrics_listen'?) (at line 5)"], id="dotted keys"),
    pytest.param('[hosts]\nvm1 = { ip = "10.0.0.1" }\nvm2 = { allow = ["a",\n  "b"], mac = "zz" }\n',
                 ["hosts.vm2.allow: unknown key (valid keys: mac, ip) (at line 3)",
                  "hosts.vm2.mac: 'zz' is not a MAC address like 52:54:00:12:34:56 (at line 4)"], id="inline tables"),
    pytest.param('[[control]]\n[[forward]]\nto = "127.0.0.1:1"\n[forward.extra]\n[[forward]]\n'
                 'listen = 8001\n' + TO + '\n',
                 ["forward[0].extra: unknown key (valid keys: " + VALID + ") (at line 4)",
                  "forward[0]: missing required key 'listen' (at line 2)",
                  "control: expected a table, got an array (at line 1)"], id="tables"),
    pytest.param('[hosts."v\\u006d1"]\nmac = "zz"\n',
                 ["hosts.vm1.mac: 'zz' is not a MAC address like 52:54:00:12:34:56 (at line 2)"], id="escaped key"),
    pytest.param('[defaults]\nsource = ["::1"]\n\n[[forward]]\nlisten = 8001\n' + TO + '\n',
                 ["forward[0].source: '::1' is IPv6 but the target 127.0.0.1 is IPv4 (set in [defaults]) (at line 4)"],
                 id="key set in defaults"),
]


@pytest.mark.parametrize("text,errors", LOCATED)
def test_errors_give_the_line_of_their_key_or_header(tmp_path: Path, text: str, errors: list[str]) -> None:
    assert errors_of(tmp_path, text.encode()) == errors


# Where a line cannot be told for certain, none is given.
UNLOCATED = [
    pytest.param('forward = [{ listen = 8001, to = "127.0.0.1:9" },\n  { listen = "z", to = "127.0.0.1:2" }]\n',
                 ["forward[1].listen: 'z' is not a port or a port range"], id="inline array of tables"),
    pytest.param('"engine.workers" = 0\n[engine]\nworkers = 0\n',
                 ["engine.workers: unknown key (did you mean 'engine'?)",
                  "engine.workers: expected an integer from 1 to 1024, got 0"], id="two keys spelled alike"),
]


@pytest.mark.parametrize("text,errors", UNLOCATED)
def test_no_line_where_it_is_not_certain(tmp_path: Path, text: str, errors: list[str]) -> None:
    assert errors_of(tmp_path, text.encode()) == errors
