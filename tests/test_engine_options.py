"""Engine-wide options: busy polling, small pipes, one worker; traffic stays intact."""
from __future__ import annotations

import os

import pytest

from fastfwd import _engine
from netutil import (Received, TcpServer, UdpEcho, exchange, exchange_handler, forwarder, payload,
                     udp_roundtrip, udp_socket)


@pytest.mark.parametrize("options", [{"busy_poll_us": 200, "workers": 1},
                                     {"busy_poll_us": 200, "workers": 2},
                                     {"pipe_size": 4096, "workers": 1}])
def test_engine_options_keep_traffic_intact(options: dict[str, int]) -> None:
    up, down = payload(3 << 20, seed=5), payload(3 << 20, seed=6)
    with forwarder(**options) as fw, TcpServer(exchange_handler(down)) as server, UdpEcho() as echo:
        tcp = fw.forward(server.port, splice="always")
        udp = fw.forward(echo.port, "udp")
        for _ in range(3):
            assert exchange(tcp.port, up) == Received.of(down)
            assert server.result() == Received.of(up)
        with udp_socket() as sock:
            for size in (1, 1400, 65507):
                message = payload(size, seed=size)
                assert udp_roundtrip(sock, ("127.0.0.1", udp.port), message) == message
        assert fw.counters(tcp).bytes_spliced == 3 * (len(up) + len(down))


@pytest.mark.parametrize(("options", "message"), [({"busy_poll_us": -1}, "busy_poll_us"),
                                                  ({"pipe_size": 100}, "pipe_size")])
def test_the_engine_refuses_settings_it_cannot_run_with(options: dict[str, int], message: str) -> None:
    # A negative busy poll would keep every worker spinning for ever; nothing may start.
    threads = len(os.listdir("/proc/self/task"))
    with pytest.raises(ValueError, match=message):
        _engine.Engine(workers=1, **options)
    assert len(os.listdir("/proc/self/task")) == threads
