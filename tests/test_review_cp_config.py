"""Config checks found missing in review: input that was accepted but should be an error."""
from __future__ import annotations

import pytest

from fastfwd.config import ConfigError, parse_config
from fastfwd.rules import Rule, SpecError


def test_two_host_entries_differing_only_in_case_are_an_error() -> None:
    # Names ignore case, so these are one name: silently keeping the last would forward to
    # whichever entry happened to come second.
    with pytest.raises(ConfigError) as info:
        parse_config('[hosts.VM1]\nip = "10.0.0.1"\n[hosts.vm1]\nip = "10.0.0.2"\n')
    assert info.value.errors == ["hosts.vm1: 'vm1' is the same name as hosts.VM1 (names ignore case)"]


@pytest.mark.parametrize("ports", ["8_0", "+80", "80 -90", "٨٠", "80-+90"])
def test_a_port_is_ascii_digits_only(ports: str) -> None:
    # int() also reads '8_0' as 80, '+80', padded text and other scripts' digits.
    with pytest.raises(SpecError, match="is not a port or a port range"):
        Rule.parse(f"{ports}:127.0.0.1:80")
    with pytest.raises(ConfigError) as info:
        parse_config(f'[[forward]]\nlisten = "{ports}"\nto = "127.0.0.1:80"\n')
    assert info.value.errors == [f"forward[0].listen: {ports!r} is not a port or a port range"]


def test_a_host_entry_named_by_an_address_is_an_error() -> None:
    # A 'to' with an address forwards to that address: such an entry would never be used.
    with pytest.raises(ConfigError) as info:
        parse_config('[hosts."10.0.0.9"]\nmac = "52:54:00:00:00:01"\n')
    assert info.value.errors == ["hosts.10.0.0.9: '10.0.0.9' is not a valid host name"]
