"""The command's life cycle at its edges: Ctrl-C while Python is still loading it, and settings
that could never start (a worker count no machine runs)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fastfwd.unixclient import call

from helpers_control import EchoServer, connects, daemon, echo_roundtrip, free_port, needs_engine
from netutil import child_env, cli_sandbox, run_cli

# ``python -m fastfwd ARGS`` that receives a real SIGINT, as a terminal's Ctrl-C in the first
# tenth of a second would, sent (argv[1]) from inside the import of fastfwd.cli, from inside the
# building of the command line parser, or while fastfwd.daemon is imported, from inside an
# object's finalizer: the KeyboardInterrupt is raised there, and Python reports and drops it (as
# it does when the signal lands in one of the import system's own weakref callbacks).
_INTERRUPTED = r"""
import os, runpy, signal, sys

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)

class Finalized:
    def __del__(self):
        interrupt()

class Interrupt:
    def __init__(self, module):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            sys.meta_path.remove(self)
            if self.module == "fastfwd.cli":
                interrupt()
            else:
                Finalized()  # collected at once
        return None

if sys.argv[1] == "import":
    sys.meta_path.insert(0, Interrupt("fastfwd.cli"))
elif sys.argv[1] == "finalizer":
    sys.meta_path.insert(0, Interrupt("fastfwd.daemon"))
else:
    import fastfwd.cli
    build = fastfwd.cli.build_parser
    fastfwd.cli.build_parser = lambda: (interrupt(), build())[1]
sys.argv = ["fastfwd", *sys.argv[2:]]
runpy.run_module("fastfwd", run_name="__main__", alter_sys=True)
"""


def _interrupted(tmp_path: Path, during: str) -> subprocess.CompletedProcess[str]:
    """``fastfwd run`` sent a SIGINT ``during`` its start (see _INTERRUPTED); it must not hang."""
    return subprocess.run([sys.executable, "-c", _INTERRUPTED, during, "run", *cli_sandbox(tmp_path),
                           "-t", "0:127.0.0.1:9"], capture_output=True, text=True, timeout=30,
                          env=child_env(), stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("during", ["import", "parser"])
def test_ctrl_c_while_the_command_is_still_loading_exits_130_without_a_traceback(tmp_path: Path, during: str) -> None:
    result = _interrupted(tmp_path, during)
    assert (result.returncode, result.stderr) == (130, "")
    assert list(tmp_path.iterdir()) == []


@needs_engine
def test_a_ctrl_c_that_python_drops_during_the_start_still_stops_it(tmp_path: Path) -> None:
    """Without this the daemon started and forwarded on, the user's Ctrl-C lost."""
    result = _interrupted(tmp_path, "finalizer")
    assert result.returncode == 130, result.stderr
    assert "fastfwd started" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", ["100000", "1025"])
def test_a_worker_count_beyond_the_bound_is_one_line_and_exit_2(tmp_path: Path, workers: str) -> None:
    result = run_cli("run", *cli_sandbox(tmp_path), "--workers", workers, "-t", "0:127.0.0.1:9")
    assert (result.returncode, result.stderr) == (
        2, f"fastfwd: --workers: expected an integer from 1 to 1024, got {workers}\n")
    assert list(tmp_path.iterdir()) == []


def test_the_config_file_has_the_same_worker_bound(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("[engine]\nworkers = 100000\n")
    result = run_cli("check", str(path))
    assert (result.returncode, result.stderr) == (
        2, f"{path}: engine.workers: expected an integer from 1 to 1024, got 100000 (at line 2)\n")


@needs_engine
def test_a_second_daemon_on_the_same_sockets_is_refused_and_a_crashed_ones_are_taken_over(
        tmp_path: Path, echo: EchoServer) -> None:
    first_port, second_port = free_port(), free_port()
    with daemon(tmp_path, "-t", f"{first_port}:127.0.0.1:{echo.port}") as first:
        # The same control socket, then only the same lease socket (its control socket is opened first).
        for control, taken in ((first.control_socket, first.control_socket),
                               (tmp_path / "other.sock", first.lease_socket)):
            second = run_cli("run", "--control-socket", str(control), "--lease-socket", str(first.lease_socket),
                             "--state-dir", str(tmp_path / "state"), "-t", f"{second_port}:127.0.0.1:{echo.port}")
            assert (second.returncode, second.stderr) == (
                1, f"fastfwd: {taken}: another process is listening on this socket\n")
        assert not (tmp_path / "other.sock").exists()
        # The first daemon still answers on its own sockets, with its own rules.
        reply = call(first.control_socket, {"cmd": "status"})
        assert [r["port"] for r in reply["rules"]] == [first_port]
        with socket.socket(socket.AF_UNIX) as lease_client:
            lease_client.connect(str(first.lease_socket))
        assert echo_roundtrip(first_port) and not connects(second_port)
        first.proc.kill()
        first.wait()
        assert first.control_socket.exists() and first.lease_socket.exists()  # left behind by the crash
    with daemon(tmp_path, "-t", f"{second_port}:127.0.0.1:{echo.port}") as third:
        reply = call(third.control_socket, {"cmd": "status"})
        assert [r["port"] for r in reply["rules"]] == [second_port]
        assert echo_roundtrip(second_port)
