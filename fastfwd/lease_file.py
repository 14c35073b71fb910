"""dnsmasq's lease file, read as a snapshot of its IPv4 leases: for the DHCP hook's snapshot
(``read_lease_file``) and the daemon's ``[sources] dhcp_lease_file``. ``settled_text`` waits
for the file to hold still, since dnsmasq rewrites it in place."""
from __future__ import annotations

import math
import os
import re
import stat
import time
from collections.abc import Callable
from typing import Any

from .leases import LeaseError, held_address, client_hostname, normalize_mac

#: How dnsmasq writes the hardware address of a client that is not Ethernet (token ring:
#: ``06-01:23:45:67:89:ab``) or sent none (``01-``): its type first.
_OTHER_HARDWARE = re.compile(r"[0-9a-f]{2}-(?:[0-9a-f]{2}(?::[0-9a-f]{2})*)?", re.IGNORECASE)


def read_lease_file(path: str, note: Callable[[str], None], *,
                    strict: bool = True) -> tuple[list[dict[str, Any]], int] | None:
    """``parse_lease_file`` of the file's text, read once it held still; None for an empty
    file, which says nothing: dnsmasq empties the file before it writes it again."""
    text = settled_text(path)
    return parse_lease_file(text, path, note, strict=strict) if text else None


def parse_lease_file(text: str, path: str, note: Callable[[str], None], *,
                     strict: bool = True) -> tuple[list[dict[str, Any]], int]:
    """The IPv4 leases of a dnsmasq lease file's text (``EXPIRY MAC IP HOSTNAME|* CLIENTID``
    per line) as lease-socket snapshot entries, and how many lines were skipped as malformed.
    The DHCPv6 part (after the ``duid`` line) is keyed by DUID, not MAC, and is left out;
    a client that is not Ethernet is skipped with a ``note``. A malformed line is a
    LeaseError if ``strict``, else skipped with a ``note``. ``path`` names the file in both."""
    #: Per MAC, the lease that expires last, and when: a MAC holds two when its client id
    #: changed (a reinstalled guest), and the newer grant is the address it uses.
    newest: dict[str, tuple[float, dict[str, Any]]] = {}
    malformed = 0
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:  # dnsmasq reads the file word by word: a blank line is nothing to it
            continue
        if fields[0] == "duid":
            break
        try:
            # ASCII digits only: isdigit() is also true of '²', which int() refuses.
            if len(fields) < 4 or not (fields[0].isascii() and fields[0].isdigit()):
                raise LeaseError("not a dnsmasq lease line")
            if _OTHER_HARDWARE.fullmatch(fields[1]):
                note(f"{path}:{number}: {fields[2]}: no MAC known for this lease; skipped")
                continue
            mac = normalize_mac(fields[1])
            lease = {"mac": mac, "ip": held_address(fields[2]),
                     "hostname": client_hostname(fields[3], note) if fields[3] != "*" else None}
        except LeaseError as exc:
            if strict:
                raise LeaseError(f"{path}:{number}: {exc}") from None
            note(f"{path}:{number}: {exc}; skipped")
            malformed += 1
            continue
        expires = int(fields[0]) or math.inf  # 0: a lease that never expires
        if mac not in newest or expires >= newest[mac][0]:
            newest[mac] = (expires, lease)
    return [lease for _, lease in newest.values()], malformed


#: dnsmasq rewrites its lease file in place (truncated, then written in several writes), so a
#: read can catch the first part alone, cut at a line's end, and look whole. A read is trusted
#: once the file held still (same inode, size and modification time, every byte read) for
#: ``SETTLE`` seconds after it; a file still changing after ``SETTLE_READS`` reads is an error.
SETTLE = 0.02
SETTLE_READS = 5


def settled_text(path: str) -> str:
    """The lease file's text, read once the file held still (a LeaseError if it cannot be read,
    does not hold still, or is not a regular file); sleeps, so off the event loop."""
    try:
        for _ in range(SETTLE_READS):
            with open(path, "rb", opener=_open_regular) as f:
                before = os.fstat(f.fileno())
                data = f.read()
            time.sleep(SETTLE)
            after = os.stat(path)
            if len(data) == after.st_size and _version(before) == _version(after):
                return data.decode("utf-8", errors="replace")
    except OSError as exc:
        raise LeaseError(f"cannot read {path}: {exc.strerror}") from None
    raise LeaseError(f"{path} was still being written after {SETTLE_READS} reads")


def _open_regular(path: str, flags: int) -> int:
    # Non-blocking: opening a FIFO would wait for a writer (the daemon's thread, the hook).
    fd = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LeaseError(f"cannot read {path}: not a regular file")
    return fd


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
