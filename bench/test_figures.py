"""Checks of the harness's figures (bench/figures.py) with stand-in load generators:
``python -m pytest bench/``."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from . import figures
from .figures import BY_NAME, QUICK
from .subjects import BY_NAME as SUBJECTS
from .subjects import Running
from .system import PORT_RANGE, TW_REUSE, forget_time_wait


class Unsampled(Running):
    """A running subject that must not be sampled."""

    def usage(self):  # type: ignore[override]
        raise AssertionError("the forwarder was sampled inside a figure that does not report its CPU")


def stand_in(tmp_path: Path, result: str) -> str:
    script = tmp_path / "generator"
    script.write_text(f"#!/bin/sh\necho window\necho '{result}'\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("figure", ["rtt_tcp", "rtt_udp"])
def test_round_trip_window_holds_no_forwarder_sampling(figure: str, tmp_path: Path, monkeypatch) -> None:
    generator = stand_in(tmp_path, '{"n": 1, "p50_us": 1.0, "p99_us": 2.0, "lost": 0}')
    monkeypatch.setattr(figures, "tool", lambda _name: generator)
    running = Unsampled([], tmp_path)
    metrics = BY_NAME[figure].measure(QUICK, SUBJECTS["cref"], running)
    assert metrics["p99_us"] == 2.0


def _in_namespace(check) -> None:
    """Run ``check`` in a namespace of its own: /proc/sys/net and ``ss`` then see its settings
    and sockets, not the host's."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    from fastfwd.host.lab import Lab
    with Lab() as lab:
        lab.call(lab.netns("bench"), check)


def test_scarce_ports_sets_the_kernel_settings_and_puts_them_back() -> None:
    def check() -> None:
        before = (PORT_RANGE.read_text(), TW_REUSE.read_text())
        with figures.scarce_ports():
            assert PORT_RANGE.read_text().split() == [str(p) for p in figures.SCARCE_PORTS]
            assert TW_REUSE.read_text().strip() == "0"
        assert (PORT_RANGE.read_text(), TW_REUSE.read_text()) == before
    _in_namespace(check)


def test_time_wait_toward_the_given_ports_is_dropped_and_no_other() -> None:
    def time_wait(port: int) -> int:
        out = subprocess.run(["ss", "-tnH", "state", "time-wait", f"( dport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
        return len(out.splitlines())

    def check() -> None:
        servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        ports = [s.getsockname()[1] for s in servers]
        for server in servers:
            for _ in range(3):   # the client closes first: its end waits in TIME_WAIT
                client = socket.create_connection(server.getsockname())
                accepted, _ = server.accept()
                client.close()
                accepted.close()
        assert [time_wait(p) for p in ports] == [3, 3]
        forget_time_wait(ports[0])
        assert [time_wait(p) for p in ports] == [0, 3]
        for server in servers:
            server.close()
    _in_namespace(check)
