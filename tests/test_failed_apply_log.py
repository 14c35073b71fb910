"""A rejected apply changes nothing, and its log says so: the steps it undid are not
reported as rules started or removed."""
from __future__ import annotations

import logging
import socket

import pytest

import fastfwd
from netutil import LOOP4, SyncForwarder, TcpServer, echo_handler, free_port_range


def test_a_rejected_apply_logs_no_rule_as_started_or_removed(fwd: SyncForwarder,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with TcpServer(echo_handler) as echo:
        base = free_port_range(3)
        kept = fastfwd.Rule.parse(f"{base}:{LOOP4}:{echo.port}")
        fwd.apply([kept])
        added = fastfwd.Rule.parse(f"{base + 1}:{LOOP4}:{echo.port}")
        blocked = fastfwd.Rule.parse(f"{base + 2}:{LOOP4}:{echo.port}")
        with socket.create_server((LOOP4, base + 2)), caplog.at_level(logging.DEBUG, "fastfwd"):
            # `added` is listening when `blocked` fails; undoing it is no removal of a rule.
            with pytest.raises(OSError, match="already in use"):
                fwd.apply([kept, added, blocked])
        assert [str(r.rule) for r in fwd.fw.rules] == [str(kept)]
        said = [r.getMessage() for r in caplog.records]
        assert not [m for m in said if m.startswith(("removed", "forwarding"))], said
