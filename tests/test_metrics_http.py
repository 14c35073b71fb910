"""The metrics HTTP endpoint (``[control] metrics_listen``) under a flood of idle connections:
its fds stay bounded, forwarding goes on, and a scraper still gets through."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from fastfwd import metrics

from helpers_control import EchoServer, daemon, echo_roundtrip, fd_flood, free_port, wait_until

pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
import fastfwd  # noqa: E402


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def idle_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)  # for closed_by_server: a socket with a timeout waits in recv
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed this idle connection (it never sends it anything)?"""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_past_the_cap_make_room_so_a_scrape_gets_through(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")  # as the daemon runs
    # Only the cap may close a connection here, never a timeout.
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 3600.0)
    monkeypatch.setattr(metrics, "EXCHANGE_TIMEOUT", 3600.0)
    cap, extra = metrics.MAX_CONNECTIONS, 5

    def flood(forward_port: int, metrics_port: int) -> None:
        junk = [idle_connection(metrics_port) for _ in range(cap + extra)]
        try:
            wait_until(lambda: sum(map(closed_by_server, junk)) >= extra, what="idle connections closed")
            assert [closed_by_server(s) for s in junk] == [True] * extra + [False] * cap  # the oldest go
            assert "fastfwd_accepted_total" in scrape(metrics_port)  # while idle ones fill the cap
            assert echo_roundtrip(forward_port)
        finally:
            for s in junk:
                s.close()
        assert "fastfwd_accepted_total" in scrape(metrics_port)

    async def main(echo: EchoServer) -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            rule = await fw.add(fastfwd.Rule.parse(f"0:127.0.0.1:{echo.port}", "tcp"))
            server = await metrics.serve_http(fw, "127.0.0.1", 0)
            try:
                await asyncio.to_thread(flood, rule.port, server.sockets[0].getsockname()[1])
            finally:
                server.close()
                await server.wait_closed()

    with contextlib.closing(EchoServer()) as echo:
        uvloop.run(asyncio.wait_for(main(echo), 60))


def test_a_flood_of_idle_connections_cannot_use_up_the_daemons_fds(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    with contextlib.closing(EchoServer()) as echo:
        (tmp_path / "f.toml").write_text(f'[[forward]]\nname = "web"\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
                                         f'[control]\nmetrics_listen = "127.0.0.1:{mport}"\n')
        with daemon(tmp_path, "-c", "f.toml") as proc:
            # 256 fds beyond what it has open now: room for the cap, a burst of connections
            # queued for accept (backlog 100) and forwarding, and only half the flood.
            with fd_flood(proc.proc.pid, lambda: socket.create_connection(("127.0.0.1", mport), timeout=2)):
                assert echo_roundtrip(port), "the flood stopped forwarding"
                assert 'rule="web"' in scrape(mport)
            assert "fastfwd_accepted_total{listen" in scrape(mport)


def test_a_request_whose_lines_end_in_a_bare_lf_is_answered(tmp_path: Path) -> None:
    """``printf 'GET / HTTP/1.0\\n\\n' | nc``: RFC 9112 lets a recipient take a bare LF as a
    line's end, and simple probes and scrapers send it."""
    port, mport = free_port(), free_port()
    with contextlib.closing(EchoServer()) as echo:
        (tmp_path / "f.toml").write_text(f'[[forward]]\nname = "web"\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
                                         f'[control]\nmetrics_listen = "127.0.0.1:{mport}"\n')
        with daemon(tmp_path, "-c", "f.toml"):
            for request in (b"GET / HTTP/1.0\n\n", b"GET /metrics HTTP/1.0\nHost: x\r\nAccept: */*\n\n"):
                with socket.create_connection(("127.0.0.1", mport), timeout=10) as sock:
                    sock.sendall(request)
                    answer = b"".join(iter(lambda: sock.recv(1 << 16), b""))
                assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), (request, answer[:200])
                assert b"fastfwd_accepted_total{" in answer, request


async def no_rules(fw: object) -> list:
    """What ``metrics.snapshot_in_turns`` reads from a forwarder with no rules (or none at all)."""
    return []


def test_a_scraper_that_stops_reading_is_dropped_at_the_exchange_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer the client never takes must not hold the connection (and its fd, outside the
    cap's count) once the exchange's time is up: close() would wait for the client forever."""
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr(metrics, "EXCHANGE_TIMEOUT", 0.5)
    monkeypatch.setattr(metrics, "snapshot_in_turns", no_rules)
    monkeypatch.setattr(metrics, "exposition", lambda readings, reload: b"#" * (16 << 20))  # more than socket buffers hold

    def stalled_scrape(port: int) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reset: list[int] = []  # SO_ERROR reads once, then clears

            def was_reset() -> bool:
                reset.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                return any(reset)
            wait_until(was_reset, what="the stalled scrape dropped by the server")
        finally:
            sock.close()

    async def main() -> None:
        server = await metrics.serve_http(None, "127.0.0.1", 0)  # type: ignore[arg-type]
        try:
            await asyncio.to_thread(stalled_scrape, server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(asyncio.wait_for(main(), 60))


def test_a_scrape_is_formatted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Formatting thousands of rules' series takes a good part of a second: done on the
    daemon's event loop it would hold lease replies and reloads that long, every scrape.
    Here the formatting waits for the loop to run a step meanwhile, so a scrape can only
    finish if the loop is free while it formats."""
    uvloop = pytest.importorskip("uvloop")
    formatting, loop_ran = threading.Event(), threading.Event()
    real = metrics.generate_latest

    def waiting_for_the_loop(registry):  # type: ignore[no-untyped-def]
        formatting.set()
        if not loop_ran.wait(5):
            raise AssertionError("the event loop stood still while the scrape was formatted")
        return real(registry)
    monkeypatch.setattr(metrics, "generate_latest", waiting_for_the_loop)

    async def main(echo: EchoServer) -> str:
        async with fastfwd.Forwarder(workers=1) as fw:
            await fw.add(fastfwd.Rule.parse(f"0:127.0.0.1:{echo.port}", "tcp", name="web"))
            server = await metrics.serve_http(fw, "127.0.0.1", 0)
            try:
                text = asyncio.ensure_future(asyncio.to_thread(scrape, server.sockets[0].getsockname()[1]))
                await asyncio.to_thread(formatting.wait, 10)
                loop_ran.set()
                return await text
            finally:
                server.close()
                await server.wait_closed()

    with contextlib.closing(EchoServer()) as echo:
        assert 'rule="web"' in uvloop.run(asyncio.wait_for(main(echo), 60))
