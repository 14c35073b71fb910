"""The daemon's Unix sockets and metrics endpoint under hostile or clumsy clients: a bad
message gets an error reply, everyone else is still served, memory and fds stay bounded, and
nothing already applied is lost. Checked on a real daemon and real sockets."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfwd import metrics, unixserver
from fastfwd.unixclient import call
from fastfwd.unixserver import JsonLineServer, Request

from helpers_control import (REPO, DaemonProcess, EchoServer, daemon, echo_roundtrip, fd_flood, free_port,
                             short_dir, wait_until)
from test_metrics_http import no_rules

A = "52:54:00:00:00:0a"


def run(coro: Awaitable[Any]) -> Any:
    """On uvloop, as the daemon runs, bounded in time."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with contextlib.closing(EchoServer()) as server:
        yield server


@pytest.fixture(scope="module")
def fastfwd_run(echo: EchoServer) -> Iterator[tuple[DaemonProcess, int]]:
    """A daemon forwarding one port to ``echo``, its sockets in a directory anyone may enter."""
    pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
    port = free_port()
    with short_dir() as tmp:
        os.chmod(tmp, 0o755)
        (tmp / "f.toml").write_text(f'[[forward]]\nname = "web"\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')
        with daemon(tmp, "-c", "f.toml") as proc:
            yield proc, port


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    return sock


def replies(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    """The next ``count`` reply lines."""
    reader = sock.makefile("rb")
    lines = [reader.readline() for _ in range(count)]
    assert all(line.endswith(b"\n") for line in lines), lines
    return [json.loads(line) for line in lines]


def status(proc: DaemonProcess) -> dict[str, Any]:
    reply = call(proc.control_socket, {"cmd": "status"}, timeout=30)
    assert reply["ok"], reply
    return reply


def event(kind: str, mac: str = A, ip: str = "10.0.0.1") -> bytes:
    return json.dumps({"event": kind, "mac": mac, "ip": ip}).encode() + b"\n"


def snapshot(count: int) -> bytes:
    leases = [{"mac": f"52:54:00:{i >> 16:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
               "ip": f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}"} for i in range(count)]
    return json.dumps({"snapshot": leases}).encode() + b"\n"


# -- framing and JSON ---------------------------------------------------------------------------
def test_pipelined_requests_get_one_reply_each_in_order(fastfwd_run: tuple[DaemonProcess, int]) -> None:
    proc, _ = fastfwd_run
    lines = [
        event("add"),
        b"\xff\xfe not utf-8\n",
        b'{"event": "add", "mac": 525400, "ip": 10}\n',
        b'{"event": {"add": 1}, "mac": "%s", "ip": "10.0.0.2"}\n' % A.encode(),
        b'{"snapshot": [[1, 2]]}\n',
        b'{"snapshot": ' + json.dumps([7] * 200_000).encode() + b"}\n",
        b"\n",  # blank: no reply of its own
        event("add", ip="10.0.0.2"),
        event("del", ip="10.0.0.2"),
    ]
    with connect(proc.lease_socket) as sock:
        sock.sendall(b"".join(lines))
        got = replies(sock, len(lines) - 1)
    assert got == [
        {"ok": True, "changed": 1},
        {"ok": False, "error": "not valid JSON"},
        {"ok": False, "error": "mac: 525400 is not a MAC address like 52:54:00:12:34:56"},
        {"ok": False, "error": "event: expected a string, got dict"},
        {"ok": False, "error": "snapshot[0]: expected a lease object, got list"},
        {"ok": False, "error": "snapshot[0]: expected a lease object, got int"},
        {"ok": True, "changed": 1},
        {"ok": True, "changed": 1},
    ]
    assert status(proc)["leases"] == []


BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]


def test_numbers_json_does_not_have_and_duplicate_keys_are_errors(fastfwd_run: tuple[DaemonProcess, int]) -> None:
    """Python's json reads NaN, Infinity and 1e999 (as inf) and keeps the last of duplicate
    keys; other parsers do otherwise, so a message meaning two things must be refused."""
    proc, _ = fastfwd_run
    adds = [b'{"cmd": "add", "spec": "127.0.0.1:0:127.0.0.1:9", "options": {"idle_timeout": %s}}\n' % n.encode()
            for n in BAD_NUMBERS]
    with connect(proc.control_socket) as sock:
        sock.sendall(b"".join(adds) + b'{"cmd": "remove", "cmd": "status"}\n' + b'{"cmd": "status"}\n')
        *errors, duplicate, ok = replies(sock, len(adds) + 2)
    with connect(proc.lease_socket) as sock:
        sock.sendall(b'{"event": "del", "event": "add", "mac": "%s", "ip": "10.0.0.1"}\n' % A.encode())
        [lease_duplicate] = replies(sock, 1)
    assert [e["error"] for e in errors] == [
        "not valid JSON: NaN is not a JSON number", "not valid JSON: Infinity is not a JSON number",
        "not valid JSON: -Infinity is not a JSON number", "number 1e999 is out of range",
        "number -1e999 is out of range"]
    assert duplicate == {"ok": False, "error": "duplicate key 'cmd' in an object"}
    assert lease_duplicate == {"ok": False, "error": "duplicate key 'event' in an object"}
    assert ok["ok"] is True and [r["name"] for r in ok["rules"]] == ["web"]
    assert ok["leases"] == []


def test_control_requests_with_a_wrong_type_or_a_stray_key_are_errors(fastfwd_run: tuple[DaemonProcess, int]) -> None:
    """As on the lease socket, a typo is an error, not a silent no-op."""
    proc, _ = fastfwd_run
    requests = [{"cmd": "status", "sessions": "yes"}, {"cmd": "status", "sesions": True},
                {"cmd": "metrics", "format": "json"}, {"cmd": "status", "sessions": False}]
    with connect(proc.control_socket) as sock:
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        *errors, ok = replies(sock, len(requests))
    assert errors == [{"ok": False, "error": '"sessions" must be true or false'},
                      {"ok": False, "error": "unknown key 'sesions' for status"},
                      {"ok": False, "error": "unknown key 'format' for metrics"}]
    assert ok["ok"] is True


# -- disconnects ----------------------------------------------------------------------------------
def test_a_snapshot_is_applied_whole_when_its_client_hangs_up_before_the_reply(
        fastfwd_run: tuple[DaemonProcess, int]) -> None:
    """100,000 leases fit in one snapshot line; the client gone, it is still applied, and
    never seen half applied."""
    proc, _ = fastfwd_run
    with connect(proc.lease_socket) as sock:
        sock.sendall(snapshot(100_000))
    seen: list[int] = []

    def applied() -> bool:
        seen.append(len(status(proc)["leases"]))
        return seen[-1] == 100_000
    wait_until(applied, timeout=30, what="the whole snapshot applied")
    assert set(seen) <= {0, 100_000}
    with connect(proc.lease_socket) as sock:  # emptied again, for the other tests
        sock.sendall(b'{"snapshot": []}\n')
        assert replies(sock, 1) == [{"ok": True, "changed": 100_000}]


# -- who may connect ----------------------------------------------------------------------------
_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"event": "add", "mac": "52:54:00:00:00:0a", "ip": "10.0.0.1"}\\n' * 3)
except BrokenPipeError:
    pass  # refused before the server read a byte: its reply is still there to read
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except ConnectionResetError:
    pass  # closed with our lines unread: a reset, after the reply
sys.stdout.write(data.decode())
"""
_SETPRIV = shutil.which("setpriv")
_SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0 or not _SETPRIV or not _SYSTEM_PYTHON,
                    reason="needs root, setpriv and a system python3 to be another user")
def test_a_refused_peer_gets_one_error_line_the_connection_closes_and_nothing_applies(
        fastfwd_run: tuple[DaemonProcess, int]) -> None:
    proc, _ = fastfwd_run
    assert _SETPRIV and _SYSTEM_PYTHON
    os.chmod(proc.lease_socket, 0o666)  # as if someone loosened the mode: credentials still refuse
    out = subprocess.run([_SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", _SYSTEM_PYTHON, "-c",
                          _CLIENT, str(proc.lease_socket)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == '{"ok":false,"error":"permission denied: not an allowed user or group"}\n'
    assert status(proc)["leases"] == []
    assert "lease socket: refused pid" in proc.log() and "(uid 65534, gid 65534)" in proc.log()


# -- many clients ---------------------------------------------------------------------------------
def test_a_flood_of_idle_clients_cannot_use_up_the_daemons_fds_nor_keep_the_hook_out(
        tmp_path: Path, echo: EchoServer) -> None:
    pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
    port = free_port()
    (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')
    with short_dir() as sockets, daemon(sockets, "-c", str(tmp_path / "f.toml")) as proc, \
            fd_flood(proc.proc.pid, lambda: connect(proc.lease_socket)):
        hook = subprocess.run([sys.executable, "-m", "fastfwd.hook", "--socket", str(proc.lease_socket),
                               "--timeout", "20", "add", A, "10.0.0.1"], capture_output=True, text=True,
                              timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert (hook.returncode, hook.stderr) == (0, "")
        assert echo_roundtrip(port), "the flood stopped forwarding"
        assert [x["mac"] for x in status(proc)["leases"]] == [A]


def test_status_answers_when_forwarding_has_used_up_the_daemons_fds(tmp_path: Path, echo: EchoServer) -> None:
    """Forwarded connections take every fd the daemon may open: the control socket still
    answers (each socket server keeps one fd in reserve for this) and says so once in the log,
    not every second, and the config watcher waits the shortage out instead of stopping: an
    edit made once fds are free again is applied."""
    pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
    port, added = free_port(), free_port()
    config = tmp_path / "f.toml"
    config.write_text(f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n')
    with short_dir() as sockets, daemon(sockets, "-c", str(config)) as proc:
        with fd_flood(proc.proc.pid, lambda: socket.create_connection(("127.0.0.1", port), timeout=2), room=64):
            limit = resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE)[0]
            wait_until(lambda: len(os.listdir(f"/proc/{proc.proc.pid}/fd")) >= limit - 1, what="the daemon's fds used up")
            for _ in range(3):
                reply = status(proc)
            (rule,) = reply["rules"]
            assert rule["counters"]["accept_paused"] > 0, rule
        config.write_text(config.read_text() + f'[[forward]]\nlisten = {added}\nto = "127.0.0.1:{echo.port}"\n')
        wait_until(lambda: len(status(proc)["rules"]) == 2, timeout=30, what="the edit applied: " + proc.log())
        assert echo_roundtrip(added)
        log = proc.log()
        assert 1 <= log.count("control socket: out of file descriptors") <= 3, log
        assert "ERROR" not in log, log


def test_the_client_waits_for_room_in_a_full_listen_backlog() -> None:
    """Connections past the server's cap wait in its listen backlog; when that is full too, a
    client (the hook, ``fastfwd status``) waits for room within its timeout instead of failing
    at once."""
    with short_dir() as d:
        path = str(d / "s.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(0)
        listener.settimeout(10)
        queued = socket.socket(socket.AF_UNIX)
        queued.setblocking(False)
        queued.connect(path)  # the backlog is now full

        def serve_later() -> None:
            time.sleep(0.3)
            listener.accept()[0].close()  # the queued one, first in line
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b'{"ok": true}\n')
        server = threading.Thread(target=serve_later)
        server.start()
        try:
            reply = call(path, {"cmd": "status"}, timeout=20)
        finally:
            queued.close()
            server.join(30)
            listener.close()
    assert reply == {"ok": True}


def test_a_large_request_holds_its_slot_until_it_is_answered() -> None:
    """Lines over the line limit take one of a few slots: a parsed message waiting for the
    handler (a snapshot waiting for the lease lock, say) must still hold it, or every client
    could have one in memory at once."""
    inside, peak = 0, 0

    async def handler(request: Request) -> dict[str, Any]:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await gate.wait()
        inside -= 1
        return {}

    async def one(path: Path) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"pad": "' + b"x" * 20_000 + b'"}\n')
        line = await reader.readline()
        writer.close()
        return json.loads(line)

    async def main(path: Path) -> list[dict[str, Any]]:
        async with JsonLineServer(path, handler, name="test", line_limit=1024, max_line=1 << 20, large_slots=2):
            clients = [asyncio.ensure_future(one(path)) for _ in range(6)]
            for _ in range(500):
                if inside == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # plenty for the others to (wrongly) reach the handler too
            seen = peak
            gate.set()
            answers = await asyncio.gather(*clients)
            assert seen == 2
            return answers

    gate = asyncio.Event()
    with short_dir() as d:
        assert run(main(d / "s.sock")) == [{"ok": True}] * 6


def test_clients_that_stall_in_the_middle_of_large_lines_lose_their_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a large line, then nothing: without a bound of its own, each staller would hold a
    large-line slot for the whole idle timeout, and a snapshot (the hook waits 10 s) none."""
    monkeypatch.setattr(unixserver, "LARGE_LINE_STALL", 0.3)

    async def handler(request: Request) -> dict[str, Any]:
        return {"size": request.size}

    async def main(path: Path) -> tuple[list[bytes], dict[str, Any]]:
        async with JsonLineServer(path, handler, name="test", line_limit=1024, max_line=1 << 20, large_slots=2):
            stallers = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
            for _, writer in stallers:
                writer.write(b'{"pad": "' + b"x" * 5000)
            await asyncio.sleep(0.1)  # they hold both slots now
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"pad": "' + b"x" * 5000 + b'"}\n')
            answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
            writer.close()
            dropped = [await r.read() for r, _ in stallers]
            for _, w in stallers:
                w.close()
            return dropped, answer

    with short_dir() as d:
        dropped, answer = run(main(d / "s.sock"))
    assert answer == {"ok": True, "size": 5012}
    assert dropped == [b"", b""]


def test_a_client_that_never_reads_its_replies_stalls_only_itself() -> None:
    """Its replies are not buffered without bound: the server stops taking its requests until
    it reads, while others are served; then every reply comes, in order."""
    answered = 0

    async def handler(request: Request) -> dict[str, Any]:
        nonlocal answered
        answered += 1
        return {"n": request.message["n"], "pad": "x" * 1000}

    async def main(path: Path) -> tuple[int, list[int], dict[str, Any]]:
        async with JsonLineServer(path, handler, name="test"):
            reader, writer = await asyncio.open_unix_connection(str(path))
            total = 3000  # 3 MB of replies: far beyond what socket buffers hold
            writer.write(b"".join(b'{"n": %d}\n' % n for n in range(total)))
            last = -1
            for _ in range(100):
                if answered == last:
                    break
                last = answered
                await asyncio.sleep(0.1)
            stalled_at = answered
            r2, w2 = await asyncio.open_unix_connection(str(path))
            w2.write(b'{"n": -1}\n')
            other = json.loads(await r2.readline())
            w2.close()
            got = [json.loads(await reader.readline())["n"] for _ in range(total)]
            writer.close()
            return stalled_at, got, other

    with short_dir() as d:
        stalled_at, got, other = run(main(d / "s.sock"))
    assert stalled_at < 3000
    assert got == list(range(3000))
    assert other["ok"] is True and other["n"] == -1


# -- metrics over HTTP ------------------------------------------------------------------------------
def http(port: int, request: bytes) -> bytes:
    """Sends ``request``, half-closes, and returns all the server sent before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_metrics_answers_bad_requests_with_http_errors_and_keep_alive_with_a_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "snapshot_in_turns", no_rules)
    monkeypatch.setattr(metrics, "exposition", lambda readings, reload: b"# the metrics\n")
    requests = [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 300_000 + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n" + b"X-Junk: a\n" * 10_000 + b"\n",  # short lines, 100 KB in all
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    ]

    async def main() -> list[bytes]:
        server = await metrics.serve_http(None, "127.0.0.1", 0)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        try:
            return [await asyncio.to_thread(http, port, r) for r in requests]
        finally:
            server.close()
            await server.wait_closed()
    too_large, too_many, post, keep_alive = run(main())
    for answer in (too_large, too_many):
        assert answer.startswith(b"HTTP/1.0 431 Request Header Fields Too Large\r\n"), answer[:200]
    assert post.startswith(b"HTTP/1.0 405 Method Not Allowed\r\n") and b"\r\nAllow: GET\r\n" in post
    # HTTP/1.0 answers close the connection (the helper read to the end), whatever was asked.
    assert keep_alive.startswith(b"HTTP/1.0 200 OK\r\n") and keep_alive.endswith(b"\r\n\r\n# the metrics\n")


def test_a_refused_request_that_keeps_sending_is_dropped_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """What follows a refused request is read and dropped only for a moment (LINGER), not for
    the whole exchange: 16 such clients must not hold every slot."""
    monkeypatch.setattr(metrics, "EXCHANGE_TIMEOUT", 3600.0)  # only the linger may end it
    monkeypatch.setattr(metrics, "LINGER", 0.2)

    def endless_post(port: int) -> bool:
        """True once the server has closed the connection under it (within 30 s)."""
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    sock.sendall(b"x" * 4096)
                    time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                return True
            return False

    async def main() -> bool:
        server = await metrics.serve_http(None, "127.0.0.1", 0)  # type: ignore[arg-type]
        try:
            return await asyncio.to_thread(endless_post, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()
    assert run(main()) is True
