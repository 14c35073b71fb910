"""Engine-wide options: busy polling, small pipes, one worker; traffic stays intact."""
from __future__ import annotations

import pytest

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
