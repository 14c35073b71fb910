"""Commands posted in a batch: the workers apply them in order, and leaving the batch waits
once for all of them. What each command changed must still be there after the next one,
sockets a removed rule held must close, and nothing may be left behind."""
from __future__ import annotations

import logging
import os
import socket

import pytest

from fastfwd import _engine
from netutil import (LOOP4, TcpServer, closed_how, connect, echo_handler, echo_once, forwarder, make_rule,
                     wait_for)

OPTIONS = dict(connect_timeout=5.0, idle_timeout=60.0, half_closed_timeout=60.0, splice=1,
               splice_threshold=1 << 16, udp_idle_timeout=60.0, udp_max_sessions=100, max_connections=0,
               source=())


def open_sockets() -> int:
    """Sockets this process holds (the engine's pipes and spare fds are not counted)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass                # closed meanwhile (the listing's own fd, a worker's)
    return count


@pytest.fixture
def engine():
    e = _engine.Engine(workers=2)
    yield e
    e.close()


@pytest.fixture
def echo():
    with TcpServer(echo_handler) as server:
        yield server


def test_options_set_in_a_batch_survive_the_target_set_after_them(engine, echo) -> None:
    """Each command builds on the configuration the one before published, not on what the
    workers had applied when it was posted."""
    with engine.batch():
        refusing, port_refusing = engine.add_rule("tcp", LOOP4, 0, 1)
        engine.configure(refusing, allow=("10.0.0.0/8",), **OPTIONS)
        engine.set_target(refusing, LOOP4, echo.port, False)
        admitting, port_admitting = engine.add_rule("tcp", LOOP4, 0, 1)
        engine.configure(admitting, allow=("127.0.0.0/8",), **OPTIONS)
        engine.set_target(admitting, LOOP4, echo.port, False)
    with connect(port_admitting) as sock:
        assert echo_once(sock, b"through") == b"through"
    try:
        with connect(port_refusing) as sock:
            assert closed_how(sock) in ("eof", "reset")
    except ConnectionResetError:
        pass                    # refused before connect() returned
    assert wait_for(lambda: engine.counters(refusing)["refused"]) == 1
    assert engine.counters(admitting)["accepted"] == 1
    assert echo.accepted == 1


def test_a_port_removed_in_a_batch_can_be_listened_on_again_in_it(engine, echo) -> None:
    with TcpServer(echo_handler) as other:
        first, port = engine.add_rule("tcp", LOOP4, 0, 1)
        engine.configure(first, allow=(), **OPTIONS)
        engine.set_target(first, LOOP4, echo.port, False)
        with engine.batch():
            engine.remove_rule(first, False)
            second, again = engine.add_rule("tcp", LOOP4, port, 1)
            engine.configure(second, allow=(), **OPTIONS)
            engine.set_target(second, LOOP4, other.port, False)
        assert again == port
        with connect(port) as sock:
            assert echo_once(sock, b"second") == b"second"
        assert engine.counters(second)["accepted"] == 1
        assert other.accepted == 1 and echo.accepted == 0


def test_a_batch_left_by_an_exception_still_applies_what_it_posted(engine, echo) -> None:
    with pytest.raises(RuntimeError):
        with engine.batch():
            rule, port = engine.add_rule("tcp", LOOP4, 0, 1)
            engine.configure(rule, allow=(), **OPTIONS)
            engine.set_target(rule, LOOP4, echo.port, False)
            raise RuntimeError("the caller's own failure")
    with connect(port) as sock:
        assert echo_once(sock, b"applied") == b"applied"


def test_rules_removed_in_a_batch_close_their_listeners_and_leave_nothing(engine, echo) -> None:
    before = open_sockets()
    with engine.batch():
        rules = []
        for _ in range(50):
            rule, port = engine.add_rule("tcp", LOOP4, 0, 1)
            engine.configure(rule, allow=(), **OPTIONS)
            engine.set_target(rule, LOOP4, echo.port, False)
            rules.append((rule, port))
    assert open_sockets() == before + 50
    with connect(rules[-1][1]) as sock:
        assert echo_once(sock, b"last") == b"last"
    with engine.batch():
        for rule, _ in rules:
            engine.remove_rule(rule, False)
    # The relayed connection's sockets go once the worker has seen both ends close.
    wait_for(lambda: engine.resources()["rules"] == 0 and open_sockets() == before)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOP4, rules[0][1]), timeout=2).close()


def test_an_apply_of_many_rules_logs_a_count_and_of_few_each_rule(echo, caplog) -> None:
    many = [make_rule(echo.port) for _ in range(25)]
    few = [make_rule(echo.port) for _ in range(3)]
    with forwarder() as fw, caplog.at_level(logging.INFO, logger="fastfwd"):
        fw.apply(many)
        fw.apply(many + few)
        fw.apply(few)
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert lines[0] == "forwarding 25 rules (each at debug level; 'fastfwd status' lists them)"
        assert [line.split(" ")[0] for line in lines[1:4]] == ["forwarding"] * 3
        assert lines[4] == "removed 25 rules (each at debug level; 'fastfwd status' lists them)"
        assert len(lines) == 5
        with connect(fw.fw.rules[-1].port) as sock:
            assert echo_once(sock, b"few") == b"few"
