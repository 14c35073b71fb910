"""The DHCP server on the bridge: starting a dnsmasq wired to fastfwd's hook, and finding the
dnsmasq that serves a bridge (ours or one a user or libvirt started) to check its wiring.

dnsmasq runs ``--dhcp-script`` on every lease change (``add``/``old``/``del MAC IP
[HOSTNAME]``), as root unless ``--dhcp-scriptuser`` says otherwise, and at start once per lease
already in its lease file: that is how fastfwd's hook hears about leases.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def default_range(address: ipaddress.IPv4Interface) -> tuple[ipaddress.IPv4Address,
                                                               ipaddress.IPv4Address]:
    """The upper half of the subnet's host addresses, never the host's own: without it when it
    is at that half's edge, else the lower half when it is inside (a range is one run)."""
    net = address.network
    # Counted, not listed: a /8 holds 16 million addresses.
    count = net.num_addresses - 2  # without the network and broadcast addresses
    if count < 4:
        raise ValueError(f"subnet {net} is too small for a DHCP range")
    first, last = int(net.network_address) + 1 + count // 2, int(net.broadcast_address) - 1
    host = int(address.ip)
    if first < host < last:
        first, last = int(net.network_address) + 1, first - 1
    elif host == first:
        first += 1
    elif host == last:
        last -= 1
    return ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)


def argv(bridge: str, *, dhcp_range: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address],
         netmask: ipaddress.IPv4Address, hook: str, leasefile: Path, pidfile: Path,
         dns: bool = False, foreground: bool = False, extra: Sequence[str] = ()) -> list[str]:
    first, last = dhcp_range
    return [
        "dnsmasq",
        "--conf-file=/dev/null",  # no system-wide config: this instance is exactly what we say
        f"--interface={bridge}", "--bind-interfaces", "--except-interface=lo",
        f"--dhcp-range={first},{last},{netmask},12h",
        "--dhcp-authoritative",
        f"--dhcp-script={hook}",
        f"--dhcp-leasefile={leasefile}",
        f"--pid-file={pidfile}",
        f"--port={53 if dns else 0}",
        *(["--no-daemon"] if foreground else []),
        *extra,
    ]


def start(args: list[str], pidfile: Path) -> int:
    """Run dnsmasq as a daemon; returns its pid. dnsmasq's parent exits only once the daemon
    has bound its sockets (or failed, with the reason on stderr)."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dnsmasq failed: {done.stderr.strip()}")
    return int(pidfile.read_text().strip())


def is_ours(pid: int, pidfile: str | None) -> bool:
    """``pid`` is still a dnsmasq, and with ``pidfile``, the one started with that
    ``--pid-file``: a pid alone may have gone to another dnsmasq (libvirt's, say) after ours died."""
    if not _is_dnsmasq(pid):
        return False
    return pidfile is None or f"--pid-file={pidfile}".encode() in _cmdline(pid)


def arguments(pid: int) -> list[str]:
    """The command line dnsmasq ``pid`` was started with, as :func:`argv` builds one."""
    return [a.decode(errors="replace") for a in _cmdline(pid)[:-1]]  # the last is after the final NUL


def stop(pid: int, timeout: float = 5.0, *, pidfile: str | None = None) -> bool:
    """Stop dnsmasq ``pid`` if :func:`is_ours` and wait up to ``timeout`` for it to exit;
    False if it was gone."""
    if not is_ours(pid, pidfile):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_dnsmasq(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


@dataclass
class Server:
    """A running dnsmasq and the options that matter here, from its command line and config."""

    pid: int
    interfaces: list[str] = field(default_factory=list)
    dhcp_script: str | None = None
    dhcp: bool = False


def servers_for(bridge: str) -> list[Server]:
    """The dnsmasq processes in this network namespace that serve ``bridge``."""
    own_ns = os.stat("/proc/self/ns/net").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _is_dnsmasq(int(entry.name)):
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino != own_ns:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to see
            continue
        server = _parse(int(entry.name), [a.decode(errors="replace") for a in args[1:] if a])
        if bridge in server.interfaces:
            found.append(server)
    return found


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _is_dnsmasq(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq"
    except OSError:
        return False


_SHORT = {"-i": "interface", "-6": "dhcp-script", "-F": "dhcp-range", "-C": "conf-file"}
#: Long options whose value may also come as the next argument (``--interface br0``);
#: ``--conf-file``'s value is optional, so it is only ever attached with ``=``.
_TAKES_VALUE = ("interface", "dhcp-script", "dhcp-range")


def _parse(pid: int, args: list[str]) -> Server:
    """Options from dnsmasq's arguments, then from its config file (the default one unless
    ``--conf-file`` is given; ``--conf-file`` with no value means none)."""
    options: list[tuple[str, str]] = []
    it = iter(args)
    for arg in it:
        if arg[:2] in _SHORT:
            # Like getopt: the value attached (-ibr0) or the next argument (-i br0).
            options.append((_SHORT[arg[:2]], arg[2:] or next(it, "")))
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            options.append((key, value if eq or key not in _TAKES_VALUE else next(it, "")))
    conf_files = [v for k, v in options if k == "conf-file"] or ["/etc/dnsmasq.conf"]
    for conf in conf_files:
        options.extend(_conf_options(conf))
    server = Server(pid)
    for key, value in options:
        if key == "interface":
            server.interfaces.extend(value.split(","))
        elif key == "dhcp-script":
            server.dhcp_script = value
        elif key == "dhcp-range":
            server.dhcp = True
    return server


def _conf_options(path: str) -> list[tuple[str, str]]:
    try:
        lines = Path(path).read_text().splitlines() if path else []
    except OSError:
        return []
    options = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            options.append((key.strip(), value.strip()))
    return options

