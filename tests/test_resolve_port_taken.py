"""A name that gets an address brings every rule onto it to life, even when another program
took one rule's port while the rule was pending (a pending TCP rule holds its ports bound, not
listening, and Linux lets a SO_REUSEADDR socket listen there)."""
from __future__ import annotations

import logging
import socket

import pytest

import fastfwd
from netutil import (LOOP4, SyncForwarder, TcpServer, connect, echo_handler, echo_once, free_port_range,
                     is_refused)


def through(port: int, message: bytes) -> bytes:
    with connect(port) as sock:
        return echo_once(sock, message)


def test_a_taken_port_keeps_its_rule_pending_and_the_others_follow_the_name(
        fwd: SyncForwarder, caplog: pytest.LogCaptureFixture) -> None:
    with TcpServer(echo_handler) as echo:
        base = free_port_range(3)
        # A two-port range whose second port is taken, and a rule of its own on the third.
        taken = fastfwd.Rule.parse(f"{base}-{base + 1}:vm1:{echo.port}-{echo.port + 1}")
        free = fastfwd.Rule.parse(f"{base + 2}:vm1:{echo.port}")
        fwd.apply([taken, free])
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind((LOOP4, base + 1))
            squatter.listen()
            touched = fwd.resolve("vm1", LOOP4)
            assert [str(a.rule) for a in touched] == [str(free)]
            assert through(base + 2, b"the other rule follows") == b"the other rule follows"
            assert fwd.fw.find(taken).pending and not fwd.fw.find(free).pending
            # Pending: its first port refuses at once, not a listener no one accepts from.
            assert is_refused(base)
            assert any(f"port {base + 1} on {LOOP4} is already in use" in r.getMessage()
                       and r.levelno == logging.WARNING for r in caplog.records)
        # The same address again (a lease renewed): the rule left behind is tried again.
        assert [str(a.rule) for a in fwd.resolve("vm1", LOOP4)] == [str(taken)]
        assert through(base, b"now this one") == b"now this one"
        assert fwd.resolve("vm1", LOOP4) == []      # nothing left to do: nothing is touched
