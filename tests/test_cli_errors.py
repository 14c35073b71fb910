"""The commands from a new user's chair: what no arguments and --help say, one line and a
consistent exit status for every mistake (2: the command line or config is wrong; 1: it
could not be done), Ctrl-C without a traceback, and nothing left behind by a failed start."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_control import daemon, free_port, needs_engine, short_dir
from netutil import (child_env, cli_sandbox, free_port_range, is_refused, run_cli, start_cli, stop_process,
                     wait_for)

#: Root with every capability dropped: file modes and privileged ports apply as to any user,
#: and the test's interpreter (which may sit under /root) still runs.
UNPRIVILEGED = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as an unprivileged user")
#: An interpreter any user may run, for a client that really is another user.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
MAC = "52:54:00:12:34:56"


def cli(*args: str, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*wrapper, sys.executable, "-m", "fastfwd", *args], capture_output=True, text=True,
                          timeout=30, env=child_env(), stdin=subprocess.DEVNULL, check=False)


def bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastfwd.host", *args], capture_output=True, text=True,
                          timeout=30, env=child_env(), stdin=subprocess.DEVNULL, check=False)


def one_line(result: subprocess.CompletedProcess[str], status: int, *parts: str) -> str:
    """The result failed with ``status`` and exactly one stderr line holding every part."""
    assert result.returncode == status, (result.returncode, result.stderr)
    line, = result.stderr.splitlines()
    assert "Traceback" not in line and all(p in line for p in parts), line
    return line


# -- no arguments, --help -------------------------------------------------------------------------
def test_fastfwd_without_arguments_lists_the_commands_and_how_to_start() -> None:
    result = run_cli()
    assert result.returncode == 2
    for text in ("run", "check", "status", "lease", "fastfwd run -t 8080:127.0.0.1:80"):
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("tool,command", [
    *((bridge, (c,)) for c in ("setup", "check", "destroy", "tap", "mac")),
    *((run_cli, c) for c in (("run",), ("check",), ("status",), ("lease",), ("lease", "add"), ("lease", "old"),
                             ("lease", "del"), ("lease", "snapshot"), ("hook",))),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.__name__)
def test_each_command_help_says_what_it_does_and_what_its_arguments_are(tool, command: tuple[str, ...]) -> None:
    result = tool(*command, "--help")
    assert result.returncode == 0
    _usage, description, *sections = result.stdout.split("\n\n")
    assert not description.startswith(("positional arguments", "options")), result.stdout
    for section in sections:  # an argument listed without a word on it leaves the user guessing
        if section.startswith("positional arguments:"):
            assert all(len(line.split()) > 1 for line in section.splitlines()[1:]), result.stdout


def test_bridge_options_may_follow_the_command(tmp_path: Path) -> None:
    result = bridge("destroy", "br-ff-none", "--state-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nothing recorded to remove\n"


# -- usage errors: one line, exit 2 ---------------------------------------------------------------
RUN = ("run", "-t", "0:127.0.0.1:9")


@pytest.mark.parametrize("args,parts", [
    ((*RUN, "--workers", "-1"), ("--workers", "-1")),
    ((*RUN, "--workers", "many"), ("--workers", "'many'")),
    ((*RUN, "--busy-poll-us", "soon"), ("--busy-poll-us", "'soon'")),
    ((*RUN, "--log-level", "loud"), ("--log-level", "'loud'")),
    (("run", "-t", "8080"), ("-t '8080'", "expected")),
    (("status", "--timeout", "0"), ("--timeout", "'0'")),
    (("lease", "add", MAC), ("IP",)),
    (("frobnicate",), ("frobnicate",)),
], ids=["negative-workers", "workers-word", "busy-poll-word", "log-level", "bad-spec", "timeout",
        "lease-missing-ip", "unknown-command"])
def test_a_bad_command_line_is_one_line_and_exit_2(args: tuple[str, ...], parts: tuple[str, ...]) -> None:
    one_line(run_cli(*args), 2, *parts)


@pytest.mark.parametrize("make,why", [
    (lambda p: None, "No such file or directory"),
    (lambda p: p.mkdir(), "Is a directory"),
], ids=["missing", "directory"])
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_config_path_that_is_no_file_is_one_line_and_exit_2(tmp_path: Path, command: str, make, why: str) -> None:
    path = tmp_path / "f.toml"
    make(path)
    args = ("run", "-c", str(path)) if command == "run" else ("check", str(path))
    one_line(run_cli(*args), 2, str(path), why)


@needs_root
@pytest.mark.parametrize("command", ["run", "check"])
def test_an_unreadable_config_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    path = tmp_path / "f.toml"
    path.write_text("")
    path.chmod(0)
    args = ("run", "-c", str(path)) if command == "run" else ("check", str(path))
    one_line(cli(*args, wrapper=UNPRIVILEGED), 2, str(path), "Permission denied")


@pytest.mark.parametrize("args,parts", [
    (("add", "52:54:00:12:34", "10.0.0.1"), ("MAC", "'52:54:00:12:34'")),
    (("del", MAC, "10.0.0.300"), ("IP", "'10.0.0.300'")),
    (("add", MAC, "10.0.0.1", "not a name!"), ("host name", "'not a name!'")),
    (("snapshot", f"{MAC}=10.0.0"), ("'10.0.0'",)),
    (("add", MAC, "0.0.0.0"), ("ip", "'0.0.0.0'", "not a machine's address")),
    (("old", MAC, "ff02::1"), ("ip", "'ff02::1'", "not a machine's address")),
    (("snapshot", f"{MAC}=255.255.255.255"), ("'255.255.255.255'", "not a machine's address")),
], ids=["mac", "ip", "hostname", "snapshot-ip", "unspecified-ip", "multicast-ip", "snapshot-broadcast"])
def test_lease_with_a_bad_value_is_a_usage_error_before_any_daemon_is_asked(
        tmp_path: Path, args: tuple[str, ...], parts: tuple[str, ...]) -> None:
    line = one_line(run_cli("lease", *args, "--socket", str(tmp_path / "none.sock")), 2, *parts)
    assert "cannot reach" not in line


@pytest.mark.parametrize("args,parts", [
    (("setup", "br-ff-x", "--address", "10.0.0.1/24", "--dhcp-range", "1,2"), ("--dhcp-range", "'1,2'")),
    (("tap", "vm1", "--bridge", "br-ff-none", "--user", "no-such-user-here"),
     ("--user", "'no-such-user-here'", "no such user")),
    (("mac", "vm1", "--prefix", "zz"), ("'zz'",)),
    (("setup", "br-ff-x"), ("--address",)),
    (("tap", "vm1", "--bridge", "br-ff-none", "--user", "²"), ("--user", "'²'", "no such user")),
], ids=["dhcp-range", "unknown-user", "mac-prefix", "missing-address", "superscript-user"])
def test_bridge_usage_errors_name_the_option_in_one_line_and_exit_2(
        tmp_path: Path, args: tuple[str, ...], parts: tuple[str, ...]) -> None:
    one_line(bridge("--state-dir", str(tmp_path), *args), 2, *parts)


# -- it could not be done: one line, exit 1 -------------------------------------------------------
def test_status_and_lease_without_a_daemon_exit_1(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    one_line(run_cli("status", "--socket", sock), 1, sock, "is the daemon running?")
    one_line(run_cli("lease", "add", MAC, "10.0.0.1", "--socket", sock), 1, sock, "is the daemon running?")


@needs_engine
def test_a_port_in_use_exits_1_and_leaves_no_socket_behind(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("run", *cli_sandbox(tmp_path), "-t", f"{port}:127.0.0.1:9")
    one_line(result, 1, f"127.0.0.1:{port}", "in use")
    assert os.listdir(tmp_path) == []


@needs_root
@needs_engine
def test_a_privileged_port_as_an_unprivileged_user_exits_1(tmp_path: Path) -> None:
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
        pytest.skip("port 80 is not privileged here")
    result = cli("run", *cli_sandbox(tmp_path), "-t", "80:127.0.0.1:9", wrapper=UNPRIVILEGED)
    one_line(result, 1, "no permission to listen on tcp port 80")


@needs_engine
def test_a_failed_start_removes_the_socket_and_the_directories_it_made(tmp_path: Path) -> None:
    (tmp_path / "lease.sock").write_text("not a socket")
    result = run_cli("run", "-t", "0:127.0.0.1:9", "--control-socket", str(tmp_path / "run" / "ff" / "c.sock"),
                     "--lease-socket", str(tmp_path / "lease.sock"), "--state-dir", str(tmp_path / "state"))
    one_line(result, 1, str(tmp_path / "lease.sock"), "not a socket")
    assert sorted(os.listdir(tmp_path)) == ["lease.sock"]


@needs_root
@needs_engine
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3 to run a client as another user")
def test_status_against_a_socket_it_may_not_use_exits_1(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    client = ("import sys; sys.path.insert(0, sys.argv[1]); from fastfwd.cli import main; "
              "sys.exit(main(['status', '--socket', sys.argv[2]]))")
    repo = str(Path(__file__).resolve().parent.parent)

    def status_as_nobody(sock: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYSTEM_PYTHON, "-c", client, repo, str(sock)], user=nobody.pw_uid,
                              group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=30,
                              check=False)
    with short_dir() as d, daemon(d, "-t", f"{free_port()}:127.0.0.1:9") as proc:
        d.chmod(0o700)  # cannot even reach the socket
        one_line(status_as_nobody(proc.control_socket), 1, str(proc.control_socket), "permission denied")
        d.chmod(0o755)
        proc.control_socket.chmod(0o666)  # reaches it: the daemon refuses by credentials
        one_line(status_as_nobody(proc.control_socket), 1, "refused", "not an allowed user")


def test_a_bridge_that_does_not_exist_exits_1(tmp_path: Path) -> None:
    one_line(bridge("--state-dir", str(tmp_path), "tap", "vm1", "--bridge", "br-ff-none", "--user", "nobody"),
             1, "'br-ff-none' does not exist")


# -- Ctrl-C ---------------------------------------------------------------------------------------
@needs_engine
def test_ctrl_c_on_run_exits_cleanly_and_leaves_nothing(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastfwd", "run", *cli_sandbox(tmp_path), "-t",
                             f"{port}:127.0.0.1:9"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True)
    try:
        wait_for(lambda: (tmp_path / "lease.sock").exists() or proc.poll() is not None, what="the daemon's start")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends its foreground process group
        _, err = proc.communicate(timeout=20)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [] and is_refused(port)


def test_ctrl_c_on_the_hook_waiting_for_a_reply_is_one_line() -> None:
    with short_dir() as d, socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(d / "l.sock"))
        listener.listen()  # never answers
        proc = start_cli("hook", "--socket", str(d / "l.sock"), "add", MAC, "10.0.0.1")
        conn, _ = listener.accept()  # the hook is connected and waiting
        with conn:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "Traceback" not in err, err


# -- a target name nothing knows ------------------------------------------------------------------
@needs_engine
def test_a_target_name_nothing_knows_is_warned_about_and_its_port_refuses(tmp_path: Path) -> None:
    port = free_port_range(2)    # two ports at once: free_port() twice may give one port twice
    with short_dir() as d, daemon(d, "-t", f"{port}:db.example.com:5432", "-t", f"{port + 1}:127.0.0.1:9") as proc:
        assert is_refused(port)
        warning, = [line for line in proc.log().splitlines() if "WARNING" in line]
    assert warning.endswith("target 'db.example.com' has no address: it is not in [hosts] and no DHCP lease "
                            "names it yet (names are not looked up in DNS); its rules refuse connections until then")


@needs_engine
def test_a_host_booting_before_its_vms_warns_once_for_all_their_names(tmp_path: Path) -> None:
    """Hundreds of VMs not up yet: one line naming the first few, not a line per name."""
    names = [f"vm{i:02}" for i in range(12)]
    # Twelve at once from this run's block: free_port() twelve times may give one port twice.
    ports = list(range(first := free_port_range(len(names)), first + len(names)))
    specs = [arg for name, port in zip(names, ports) for arg in ("-t", f"{port}:{name}:22")]
    with short_dir() as d, daemon(d, *specs) as proc:
        assert all(is_refused(port) for port in ports)
        warning, = [line for line in proc.log().splitlines() if "WARNING" in line]
    assert warning.endswith("12 target names have no address ('vm00', 'vm01', 'vm02', 'vm03', 'vm04', 'vm05', "
                            "'vm06', 'vm07', 'vm08', 'vm09' and 2 more): not in [hosts] and no DHCP lease names "
                            "them yet (names are not looked up in DNS); their rules refuse connections until then")


# -- socket paths ---------------------------------------------------------------------------------
@needs_engine
def test_a_control_socket_path_too_long_to_connect_to_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / ("c" * (108 - len(str(tmp_path))))  # bindable in a short directory, then renamed
    result = run_cli("run", *cli_sandbox(tmp_path), "--control-socket", str(path), "-t", "0:127.0.0.1:9")
    one_line(result, 1, str(path), "too long for a Unix socket")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_text("")], ids=["directory", "file"])
def test_status_at_a_path_that_is_no_socket_says_so(tmp_path: Path, make) -> None:
    path = tmp_path / "c.sock"
    make(path)
    one_line(run_cli("status", "--socket", str(path)), 1, str(path), "not a socket")


@needs_engine
def test_a_metrics_port_in_use_exits_1_after_closing_both_sockets(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        (tmp_path / "f.toml").write_text(f'[control]\nmetrics_listen = "127.0.0.1:{port}"\n'
                                         'control_socket = "run/c.sock"\nlease_socket = "run/l.sock"\n')
        result = run_cli("run", "-c", str(tmp_path / "f.toml"), "--state-dir", str(tmp_path / "state"),
                         "-t", "0:127.0.0.1:9")
    assert one_line(result, 1) == f"fastfwd: metrics_listen 127.0.0.1:{port}: Address already in use"
    assert os.listdir(tmp_path) == ["f.toml"]


@needs_engine
def test_one_path_for_both_sockets_is_a_usage_error_not_another_process(tmp_path: Path) -> None:
    path = tmp_path / "run" / "s.sock"
    result = run_cli("run", "--control-socket", str(path), "--lease-socket", str(tmp_path / "run/../run/s.sock"),
                     "--state-dir", str(tmp_path / "state"), "-t", "0:127.0.0.1:9")
    assert one_line(result, 2) == f"fastfwd: control_socket and lease_socket are both {path}: give each its own path"
    assert os.listdir(tmp_path) == []
