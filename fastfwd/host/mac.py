"""Deterministic MAC addresses for VMs.

A VM id (any string: a name, a UUID) maps to one MAC, so a VM keeps its address identity across
restarts without the host storing anything, and ``[hosts.NAME] mac = ...`` in fastfwd's config
can be written before the VM first boots.

The rule, stable across releases (changing it would re-address every VM):

1. ``digest = SHA-256(vm_id encoded as UTF-8)``.
2. ``mac = prefix + digest[:6 - len(prefix)]``, where ``prefix`` is 0 to 3 bytes.
3. Without a prefix, the first byte gets the locally-administered bit (0x02) set and the
   multicast bit (0x01) cleared: the address is unicast and cannot collide with a vendor's.
   A prefix must already have those two bits so (e.g. ``52:54:00``); it is never altered,
   because a caller giving a prefix wants exactly those bytes on the wire.

Examples (``tests/test_host_mac.py`` holds more vectors)::

    SHA-256("vm1") = 7b 11 e3 d1 b4 ef ...
    vm_mac("vm1")                    -> "7a:11:e3:d1:b4:ef"   (0x7b: multicast bit cleared)
    vm_mac("vm1", prefix="52:54:00") -> "52:54:00:7b:11:e3"
"""
from __future__ import annotations

import hashlib

_LOCAL = 0x02
_MULTICAST = 0x01


def parse_prefix(text: str | bytes) -> bytes:
    """A prefix as bytes, from ``b"..."`` or text like ``"52:54:00"`` / ``"525400"`` / ``""``."""
    if isinstance(text, bytes):
        raw = text
    else:
        hexdigits = text.replace(":", "").replace("-", "")
        try:
            raw = bytes.fromhex(hexdigits)
        except ValueError:
            raise ValueError(f"MAC prefix {text!r} is not hex bytes") from None
    if len(raw) > 3:
        raise ValueError(f"MAC prefix {text!r} is {len(raw)} bytes; at most 3 leave room for the id")
    if raw and (raw[0] & _MULTICAST or not raw[0] & _LOCAL):
        raise ValueError(f"MAC prefix {text!r}: first byte 0x{raw[0]:02x} must have the "
                         "locally-administered bit (0x02) set and the multicast bit (0x01) clear")
    return raw


def vm_mac(vm_id: str, prefix: str | bytes = b"") -> str:
    """The MAC for ``vm_id``, lower-case and colon-separated."""
    if not vm_id:
        raise ValueError("VM id must not be empty")
    head = parse_prefix(prefix)
    mac = bytearray(head + hashlib.sha256(vm_id.encode("utf-8")).digest()[:6 - len(head)])
    if not head:
        mac[0] = (mac[0] | _LOCAL) & ~_MULTICAST
    return format_mac(bytes(mac))


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)

