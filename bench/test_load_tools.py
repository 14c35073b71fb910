"""Checks of the bench's load generators (bench/load/*.c): ``python -m pytest bench/``.

Each runs a freshly built generator for a fraction of a second on loopback (ports below
11000) and checks what it reports against what it can know exactly.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from .build import build, tool


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    build()


def run(*argv: str) -> dict:
    out = subprocess.run([tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=30, check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == "window"
    return json.loads(lines[1])


@pytest.mark.parametrize("size", [64, 1400])
def test_udpflood_counts_only_the_windows_datagrams(size: int) -> None:
    # Straight into its own sink: nothing in between drops anything, so every datagram sent
    # in the window is delivered, and nothing sent outside it may be counted (arrivals counted
    # between two moments gave sent + 64 here, the batch in flight when the window closed).
    res = run("udpflood", "10603", "127.0.0.1", "10603", str(size), "0.1", "0.3")
    assert res["sent"] > 0
    assert res["delivered"] <= res["sent"]
    assert res["loss"] >= 0


def test_connrate_counts_connections_cut_short(tmp_path) -> None:
    # A server that echoes 10 of the 64 bytes and closes: no connection completes, and every
    # one of them is an error (a read that ended early used to be dropped without counting).
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 10602), backlog=256)
    done = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                got = b""
                while len(got) < 64 and (chunk := conn.recv(64 - len(got))):
                    got += chunk
                conn.sendall(got[:10])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        res = run("connrate", "127.0.0.1", "10602", "4", "0.1", "0.3", "2")
    finally:
        done.set()
        thread.join()
        server.close()
    assert res["conns"] == 0
    assert res["errors"] > 0
