"""Checks of the iperf3 load generator (bench/iperf_window.py): ``python -m pytest bench/``."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .iperf_window import OPENED, follow, received
from .procs import Proc, wait_bound

#: What iperf3 3.12 prints with -V -i 0 --get-server-output against an ``iperf3 -s -J`` server,
#: cut down to the lines that matter.
OUTPUT = f"""iperf 3.12
Starting Test: protocol: TCP, 2 streams, 131072 byte blocks, omitting 1 seconds, 1 second test, tos 0
{OPENED}
[SUM]   0.00-1.00   sec  3.78 GBytes  32446511 Kbits/sec    0             sender
[SUM]   0.00-1.00   sec  3.78 GBytes  32444650 Kbits/sec                  receiver

Server JSON output:
{{
\t"start":\t{{"test_start":\t{{"num_streams":\t2, "omit":\t1, "duration":\t1}}}},
\t"intervals":\t[],
\t"end":\t{{
\t\t"sum_sent":\t{{"start":\t0, "end":\t1.000012, "seconds":\t1.000012, "bytes":\t0}},
\t\t"sum_received":\t{{"start":\t0, "end":\t1.000012, "seconds":\t1.000012, "bytes":\t4055629930}}
\t}}
}}

iperf Done.
"""


class Recorder(io.StringIO):
    """Where ``window`` goes: notes the last of iperf3's lines read when it came."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines, self.last = lines, ""
        self.at: str | None = None

    def feed(self) -> Iterator[str]:
        for line in self.lines:
            self.last = line
            yield line

    def write(self, text: str) -> int:
        if text.strip() == "window":
            self.at = self.last
        return super().write(text)


def test_window_opens_as_the_warmup_ends_and_counts_the_servers_bytes() -> None:
    out = Recorder(OUTPUT.splitlines(keepends=True))
    result = follow(out.feed(), out)
    assert out.getvalue() == "window\n"
    assert out.at is not None and out.at.strip() == OPENED  # at that line, not once the output ended
    # The server's exact receiver count, not the client's rounded or sender-side summary.
    assert result == {"bytes": 4055629930, "seconds": 1.000012, "gbit_s": 4055629930 * 8 / 1.000012 / 1e9}


def test_no_warmup_no_window() -> None:
    # Without -O iperf3 never prints the line: nothing may pass for a window.
    lines = [line for line in OUTPUT.splitlines(keepends=True) if line.strip() != OPENED]
    out = io.StringIO()
    with pytest.raises(ValueError, match="never ended its warm-up"):
        follow(lines, out)
    assert out.getvalue() == ""


def test_a_server_without_json_is_refused() -> None:
    text = OUTPUT.replace("Server JSON output:", "Server output:")
    with pytest.raises(ValueError, match="must run with -J"):
        received(text)


def test_a_server_error_is_reported() -> None:
    with pytest.raises(ValueError, match="iperf3 server: boom"):
        received('Server JSON output:\n{"start": {}, "end": {}, "error": "boom"}\n')


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_a_real_run_on_loopback(tmp_path: Path) -> None:
    server = Proc(["iperf3", "-s", "-J", "-B", "127.0.0.1", "-p", "10604"], log=tmp_path / "server.log")
    try:
        wait_bound([("tcp", 10604)], [server])
        started = time.monotonic()
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("iperf_window.py")),
                              "127.0.0.1", "10604", "2", "1", "1"],
                             capture_output=True, text=True, timeout=30, check=True)
    finally:
        server.stop()
    lines = out.stdout.splitlines()
    assert lines[0] == "window" and len(lines) == 2, out.stdout
    result = json.loads(lines[1])
    assert result["bytes"] > 0
    assert 0 < result["seconds"] < time.monotonic() - started
    assert result["gbit_s"] == pytest.approx(result["bytes"] * 8 / result["seconds"] / 1e9)
