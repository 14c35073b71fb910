"""Addresses the engine cannot use are refused where they come in: an IPv6 address with a
zone (``fe80::1%eth0``) parses as an address in Python, but the data plane has no zone to
give it, so taking one in would leave a lease, a host entry or a rule that fails later."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastfwd.config import ConfigError, parse_config
from fastfwd.leases import LeaseError, normalize_ip
from fastfwd.rules import Rule, SpecError
from fastfwd.unixclient import call

from helpers_control import EchoServer, daemon, echo_roundtrip, free_port, needs_engine

MAC = "52:54:00:00:00:01"
SCOPED = "fe80::1%lo"
ZONE = "has an IPv6 zone (%lo), which fastfwd cannot use: give the address without it"


def test_a_lease_with_a_zone_is_refused() -> None:
    with pytest.raises(LeaseError, match=re.escape(f"ip: '{SCOPED}' {ZONE}")):
        normalize_ip(SCOPED)


@pytest.mark.parametrize("spec, what", [(f"[{SCOPED}]:8000:127.0.0.1:80", "listen address"),
                                        (f"8000:[{SCOPED}]:80", "target host")])
def test_a_spec_with_a_zone_is_refused_saying_why(spec: str, what: str) -> None:
    with pytest.raises(SpecError, match=re.escape(f"{what} '{SCOPED}' {ZONE}")):
        Rule.parse(spec)


@pytest.mark.parametrize("text, error", [
    (f'[hosts.vm1]\nip = "{SCOPED}"\n', f"hosts.vm1.ip: '{SCOPED}' {ZONE} (at line 2)"),
    (f'[[forward]]\nlisten = "[{SCOPED}]:8000"\nto = "127.0.0.1:80"\n',
     f"forward[0].listen: listen address '{SCOPED}' {ZONE} (at line 2)"),
    (f'[[forward]]\nlisten = 8000\nto = "[{SCOPED}]:80"\n',
     f"forward[0].to: target host '{SCOPED}' {ZONE} (at line 3)"),
])
def test_a_config_with_a_zone_names_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors == [error]


@needs_engine
@pytest.mark.timeout(60)
def test_a_lease_with_a_zone_does_not_stop_the_daemon_from_starting_again(tmp_path: Path) -> None:
    echo = EchoServer()
    try:
        port = free_port()
        (tmp_path / "f.toml").write_text(f'[[forward]]\nlisten = {port}\nto = "vm1:{echo.port}"\n'
                                         f'[hosts.vm1]\nmac = "{MAC}"\n')
        with daemon(tmp_path, "-c", "f.toml") as proc:
            reply = call(proc.lease_socket, {"event": "add", "mac": MAC, "ip": SCOPED})
            assert reply == {"ok": False, "error": f"ip: '{SCOPED}' {ZONE}"}
            assert call(proc.lease_socket, {"event": "add", "mac": "52:54:00:00:00:02", "ip": "127.0.0.2"}
                        ) == {"ok": True, "changed": 1}
        # Restarted with what was saved (a clean stop saves at once): it starts and forwards.
        with daemon(tmp_path, "-c", "f.toml") as proc:
            assert call(proc.lease_socket, {"event": "add", "mac": MAC, "ip": "127.0.0.1"})["ok"]
            assert echo_roundtrip(port)
    finally:
        echo.close()
