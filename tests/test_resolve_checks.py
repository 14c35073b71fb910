"""A name may come to stand for an address its rules cannot use: a lease, a [hosts] entry or
the API's ``hosts=`` can give any address. Such a rule gets the checks that address would
get in a spec, and waits, pending, for an address it can use."""
from __future__ import annotations

import logging
import socket

import pytest

import fastfwd
from netutil import (LOOP4, SyncForwarder, TcpServer, connect, echo_handler, echo_once, free_port_range, forwarder,
                     is_refused)


def test_a_name_resolving_to_the_rules_own_listener_keeps_it_pending(
        fwd: SyncForwarder, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port_range(1)
    with TcpServer(echo_handler, host="127.0.0.2", port=port) as echo:
        rule = fastfwd.Rule.parse(f"{LOOP4}:{port}:vm1:{port}")
        fwd.apply([rule])
        with caplog.at_level(logging.WARNING, logger="fastfwd"):
            assert fwd.resolve("vm1", LOOP4) == []
        # Pointed at itself, each connection would come back to the rule without end.
        assert fwd.fw.find(rule).pending
        assert is_refused(port)
        assert any("stays pending: vm1 is 127.0.0.1, which it cannot use" in r.getMessage()
                   and "own listener: it would forward to itself" in r.getMessage() for r in caplog.records), caplog.text
        assert [a.rule for a in fwd.resolve("vm1", "127.0.0.2")] == [rule]
        with connect(port) as sock:
            assert echo_once(sock, b"to the other address") == b"to the other address"
        assert echo.accepted == 1


def test_a_name_given_a_multicast_address_keeps_tcp_rules_pending_and_udp_ones_not(
        caplog: pytest.LogCaptureFixture) -> None:
    base = free_port_range(2, kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM))
    tcp = fastfwd.Rule.parse(f"{base}:group:5000")
    udp = fastfwd.Rule.parse(f"{base + 1}:group:5000", "udp")
    with caplog.at_level(logging.WARNING, logger="fastfwd"), \
            forwarder(workers=1, hosts={"group": "239.1.2.3"}) as fw:
        fw.apply([tcp, udp])
        assert fw.fw.find(tcp).pending and not fw.fw.find(udp).pending
        assert fw.fw.find(udp).target_ip == "239.1.2.3"
        assert is_refused(base)
        assert any("239.1.2.3 is a multicast address" in r.getMessage() for r in caplog.records), caplog.text
