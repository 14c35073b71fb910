"""The fastfwd command: check, bad specs, port in use, help, and the commands that talk to a daemon."""
from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastfwd.cli import main

from helpers_control import BAD_CONFIGS, bad_config_ids, fastfwd, free_port, needs_engine, short_dir


@pytest.mark.parametrize("text,error", BAD_CONFIGS, ids=bad_config_ids())
def test_check_reports_each_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                       error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"{path}: {error}\n")


def test_check_lists_every_error_of_one_file_and_exits_nonzero(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[forward]]\nlisten = "8000-7999"\nto = "vm1:1-2"\nconect_timeout = 1\n'
                    '[engine]\nworkers = 0\n')
    result = fastfwd("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: forward[0].conect_timeout: unknown key (did you mean 'connect_timeout'?) (at line 4)",
        f"{path}: forward[0].listen: range 8000-7999 is reversed (at line 2)",
        f"{path}: engine.workers: expected an integer from 1 to 1024, got 0 (at line 6)",
    ]


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text('[[forward]]\nproto = "both"\nlisten = "0.0.0.0:2222"\nto = "vm1:22"\n'
                    '[hosts.vm1]\nmac = "52:54:00:00:00:01"\n')
    result = fastfwd("check", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: ok, 2 rule(s), 1 host(s), target names: vm1\n"


def test_check_of_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory\n"


@pytest.mark.parametrize("flag,spec,error", [
    ("-t", "8000-7999:127.0.0.1:9000-9001", "-t '8000-7999:127.0.0.1:9000-9001': range 8000-7999 is reversed"),
    ("-u", "8000:127.0.0.1:9000-8999", "-u '8000:127.0.0.1:9000-8999': range 9000-8999 is reversed"),
    ("-t", "8000-8009:127.0.0.1:9000", "-t '8000-8009:127.0.0.1:9000': listen range has 10 ports but target range has 1"),
    ("-t", "8000", "-t '8000': expected [ADDR:]PORT[-END]:HOST:PORT[-END]"),
    ("-t", "abc:127.0.0.1:80", "-t 'abc:127.0.0.1:80': 'abc' is not a port or a port range"),
    ("-t", "1.2.3.4.5:80:127.0.0.1:80", "-t '1.2.3.4.5:80:127.0.0.1:80': listen address '1.2.3.4.5' is not an IPv4 or IPv6 address"),
    ("-t", "80:bad_host:80", "-t '80:bad_host:80': target host 'bad_host' is neither an IP address nor a valid host name"),
    ("-u", "[::1:53:[::1]:53", "-u '[::1:53:[::1]:53': unbalanced '[' and ']'"),
    ("-t", "80:127.0.0.1:70000", "-t '80:127.0.0.1:70000': port 70000 is out of range 0-65535"),
])
def test_bad_spec_is_one_clear_line(capsys: pytest.CaptureFixture[str], flag: str, spec: str, error: str) -> None:
    assert main(["run", flag, spec]) == 2
    assert capsys.readouterr().err == f"fastfwd: {error}\n"


@pytest.mark.parametrize("args,error", [
    (["--splice", "sometimes"], "--splice: expected 'auto', 'always' or 'never', got 'sometimes'"),
    (["--splice", "ALWAYS"], "--splice: expected 'auto', 'always' or 'never', got 'ALWAYS'"),
    (["--busy-poll-us", "2000000"], "--busy-poll-us: expected microseconds from 0 to 1000000, got 2000000"),
    (["--busy-poll-us", "-1"], "--busy-poll-us: expected microseconds from 0 to 1000000, got -1"),
    (["--busy-poll-us", "50us"], "--busy-poll-us: expected microseconds from 0 to 1000000, got '50us'"),
    (["--busy-poll-us", 'fifty "us"'], """--busy-poll-us: expected microseconds from 0 to 1000000, got 'fifty "us"'"""),
])
def test_bad_run_flag_is_one_clear_line_and_exit_2(args: list[str], error: str) -> None:
    result = fastfwd("run", "-t", f"{free_port()}:127.0.0.1:9", *args)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"fastfwd: {error}\n")


def test_splice_without_a_tcp_rule_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-u", "5353:127.0.0.1:53", "--splice", "never"]) == 2
    assert capsys.readouterr().err == ("fastfwd: --splice: it applies to -t rules and none is given "
                                       "(in a config file, set 'splice' in [[forward]] or [defaults])\n")


def test_bad_spec_from_the_installed_entry_point_has_no_traceback() -> None:
    result = fastfwd("run", "-t", "8000-7999:127.0.0.1:9000-9001")
    assert result.returncode == 2
    assert result.stderr == "fastfwd: -t '8000-7999:127.0.0.1:9000-9001': range 8000-7999 is reversed\n"


def test_run_with_nothing_to_forward_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "nothing to forward" in capsys.readouterr().err


def test_run_with_a_bad_config_lists_its_errors_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[forward]]\nlisten = "8000-7999"\nto = "127.0.0.1:1-2"\n')
    result = fastfwd("run", "-c", str(path), "-t", "0:127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr == f"{path}: forward[0].listen: range 8000-7999 is reversed (at line 2)\n"


def test_run_in_process_leaves_the_sighup_handler_it_found(tmp_path: Path) -> None:
    """``main(["run", ...])`` records an early SIGHUP while it starts; once it returns (here: a
    bad config), a SIGHUP must meet the caller's handler again, not be swallowed."""
    def callers(*_: object) -> None:
        pass

    path = tmp_path / "bad.toml"
    path.write_text('[[forward]]\nlisten = "8000-7999"\nto = "127.0.0.1:1-2"\n')
    before = signal.signal(signal.SIGHUP, callers)
    try:
        assert main(["run", "-c", str(path)]) == 2
        assert signal.getsignal(signal.SIGHUP) is callers
    finally:
        signal.signal(signal.SIGHUP, before)


@needs_engine
def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = fastfwd("run", "--control-socket", str(tmp_path / "c.sock"), "--lease-socket",
                         str(tmp_path / "l.sock"), "--state-dir", str(tmp_path),
                         "-t", f"{free_port()}:127.0.0.1:9", "-t", f"{port}:127.0.0.1:9")
    assert result.returncode == 1
    line, = result.stderr.splitlines()  # the rule that did start logs nothing: the start failed
    assert line.startswith(f"fastfwd: cannot forward tcp 127.0.0.1:{port} -> 127.0.0.1:9: ")
    assert line.endswith("in use")


@pytest.mark.parametrize("make", [lambda p: p.write_text(""), lambda p: (p / "leases.json").mkdir(parents=True)])
def test_unreadable_lease_state_is_one_clear_line(tmp_path: Path, make) -> None:
    state = tmp_path / "state"
    make(state)  # a file where the directory should be, or a directory where the file should be
    result = fastfwd("run", "--control-socket", str(tmp_path / "c.sock"), "--lease-socket", str(tmp_path / "l.sock"),
                     "--state-dir", str(state), "-t", f"{free_port()}:127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr in (f"fastfwd: lease state {state / 'leases.json'}: Not a directory\n",
                             f"fastfwd: lease state {state / 'leases.json'}: Is a directory\n")


def test_a_name_that_can_never_resolve_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[sources]\ndhcp = false\n[hosts.db]\nip = "127.0.0.1"\n')
    result = fastfwd("run", "-c", str(path), "-t", "7001:db:5432", "-t", "7002:vm9:22")
    assert result.returncode == 2
    assert result.stderr == ("fastfwd: cannot forward tcp 127.0.0.1:7002 -> vm9:22: 'vm9' is not in [hosts] "
                             "and DHCP names are off ([sources] dhcp = false)\n")


@needs_engine
def test_an_engine_that_cannot_start_is_one_clear_line(tmp_path: Path) -> None:
    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))
    result = subprocess.run([sys.executable, "-m", "fastfwd", "run", "--workers", "8", "-t", "0:127.0.0.1:9",
                             "--control-socket", str(tmp_path / "c.sock"), "--lease-socket", str(tmp_path / "l.sock"),
                             "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, preexec_fn=few_fds)
    assert result.returncode == 1
    line, = result.stderr.splitlines()
    assert line.startswith("fastfwd: cannot start the engine: ") and line.endswith("Too many open files"), line


@needs_engine
@pytest.mark.parametrize("kind", ["user", "group"])
def test_unknown_user_or_group_in_control_is_one_line_at_its_key(tmp_path: Path, kind: str) -> None:
    """As docs/config.md's complete example meets a host without its ``libvirt-qemu`` user."""
    path = tmp_path / "f.toml"
    path.write_text(f'[control]\nallow_{kind}s = ["no-such-{kind}-here"]\ncontrol_socket = "c.sock"\n'
                    'lease_socket = "l.sock"\nstate_dir = "state"\n')
    result = fastfwd("run", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr == f"fastfwd: {path}: control.allow_{kind}s: no {kind} 'no-such-{kind}-here' on this host\n"


def test_help_explains_specs_default_bind_and_examples() -> None:
    for args in (["--help"], ["run", "--help"]):
        result = fastfwd(*args)
        assert result.returncode == 0
        text = result.stdout
        assert "[ADDR:]PORT[-END]:HOST:PORT[-END]" in text
        assert "127.0.0.1 (loopback only)" in text and "0.0.0.0:PORT" in text
        assert "fastfwd run -t 8080:127.0.0.1:80" in text
        assert "IPv6 addresses go in brackets" in text
    for command in ("run", "check", "status", "lease", "hook"):
        assert command in fastfwd("--help").stdout


def test_run_help_explains_splice_and_busy_polling_with_their_defaults() -> None:
    text = " ".join(fastfwd("run", "--help").stdout.split())  # unwrapped
    assert "--splice MODE how the -t rules move bytes: 'auto' copies short exchanges" in text
    assert "'always' splices from the first byte, 'never' always copies (default: auto;" in text
    assert "--busy-poll-us N after traffic, workers poll again for N microseconds (0-1000000)" in text
    assert "(default: [engine] busy_poll_us, else 0: off)" in text


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    result = fastfwd("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert result.stderr == (f"fastfwd: cannot reach fastfwd at {tmp_path / 'none.sock'}: "
                             "no such socket (is the daemon running?)\n")


def test_a_socket_that_hangs_up_without_a_reply_is_one_line_naming_it() -> None:
    with short_dir() as d, socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(d / "c.sock"))
        listener.listen()
        def hang_up_after_the_request() -> None:
            conn, _ = listener.accept()
            with conn:  # the request read first: closing on unread bytes would reset instead
                conn.recv(1 << 16)
        hang_up = threading.Thread(target=hang_up_after_the_request)
        hang_up.start()
        result = fastfwd("status", "--socket", str(d / "c.sock"))
        hang_up.join(10)
    assert result.returncode == 1
    assert result.stderr == f"fastfwd: fastfwd at {d / 'c.sock'} closed the connection without a reply\n"


def test_status_takes_the_socket_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text('[control]\ncontrol_socket = "ctl.sock"\nlease_socket = "lease.sock"\n')
    result = fastfwd("status", "-c", str(path))
    assert result.returncode == 1 and str(tmp_path / "ctl.sock") in result.stderr
    result = fastfwd("lease", "add", "52:54:00:00:00:01", "10.0.0.1", "-c", str(path), "--timeout", "2")
    assert result.returncode == 1 and str(tmp_path / "lease.sock") in result.stderr


def test_lease_snapshot_entry_must_be_mac_equals_ip(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lease", "snapshot", "52:54:00:00:00:01"]) == 2
    assert capsys.readouterr().err == "fastfwd: snapshot entry '52:54:00:00:00:01': expected MAC=IP[=HOSTNAME]\n"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_a_usage_error(tmp_path: Path, value: str) -> None:
    sock, lease = str(tmp_path / "l.sock"), ("add", "52:54:00:00:00:01", "10.0.0.1")
    for args in (("lease", *lease, "--socket", sock, "--timeout", value),
                 ("hook", "--socket", sock, "--timeout", value, *lease)):
        result = fastfwd(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"argument --timeout: expected a number of seconds > 0, got {value!r}" in result.stderr


def test_hook_dispatches_to_the_dhcp_hook(tmp_path: Path) -> None:
    assert fastfwd("hook", "init").returncode == 0  # dnsmasq's init: no leases to report
    for option in ("--socket", "--lease-socket"):  # the second: the name `fastfwd run` gives it
        result = fastfwd("hook", option, str(tmp_path / "none.sock"), "--timeout", "0.5",
                         "add", "52:54:00:00:00:01", "10.0.0.1", "vm1")
        assert result.returncode == 1, result.stderr
        assert str(tmp_path / "none.sock") in result.stderr


@pytest.mark.parametrize("value", ["1e10", "1e300"])
def test_a_timeout_beyond_what_a_socket_can_wait_is_a_usage_error(value: str) -> None:
    with short_dir() as d, socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(d / "c.sock"))
        listener.listen()  # a daemon that takes the connection and never answers
        lease = ("add", "52:54:00:00:00:01", "10.0.0.1")
        for args in (("status", "--socket", str(d / "c.sock"), "--timeout", value),
                     ("lease", *lease, "--socket", str(d / "c.sock"), "--timeout", value),
                     ("hook", "--socket", str(d / "c.sock"), "--timeout", value, *lease)):
            result = fastfwd(*args)
            assert (result.returncode, result.stderr.count("\n")) == (2, 1), (args, result.stderr)
            assert f"argument --timeout: expected at most 1e+09 seconds, got {value!r}" in result.stderr
