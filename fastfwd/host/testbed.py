"""A whole VM host in namespaces, with real parts: for the end-to-end test and the
lease-latency measurement.

- "host": a bridge, a real dnsmasq serving DHCP on it with fastfwd's hook as
  ``--dhcp-script``, and ``fastfwd run -c CONFIG`` forwarding ``0.0.0.0:PORT -> vm1:PORT`` (TCP
  and UDP) where ``vm1`` is a ``[hosts]`` entry with a MAC;
- VMs: one namespace each, attached to the bridge by a veth with the VM's MAC, getting an
  address from busybox udhcpc (or a static one) and running an echo server for TCP and UDP;
- "client": a namespace linked to the host, from which traffic is sent to the host's port.

Replies carry the name of the VM that answered, so a test sees where traffic went, and the
whole payload, so it can compare hashes of what was sent and what came back.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import dnsmasq
from .bridge import write_hook
from .lab import DhcpClient, Lab
from .links import ensure_address, ensure_bridge

T = TypeVar("T")
BRIDGE = "br0"
CLIENT_NET = ipaddress.IPv4Network("192.0.2.0/24")  # the client link (TEST-NET-1, namespaces only)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def wait_for(what: Callable[[], T], timeout: float = 30.0, interval: float = 0.01,
              message: str = "condition") -> T:
    """``what()`` once it returns something true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = what()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message}: not within {timeout:g}s")
        time.sleep(interval)


class EchoServer:
    """TCP: read to EOF, answer ``NAME\\n`` + the bytes read, close. UDP: answer each datagram
    with ``NAME\\n`` + the datagram. Threads in this process, sockets in the VM's namespace."""

    def __init__(self, lab: Lab, ns: str, name: str, port: int) -> None:
        self.name = name.encode()
        self.udp_count = 0
        self.tcp = lab.socket(ns)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", port))
        self.tcp.listen(64)
        self.udp = lab.socket(ns, kind=socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", port))
        for target in (self._serve_tcp, self._serve_udp):
            threading.Thread(target=target, daemon=True).start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = _read_to_eof(conn)
                conn.sendall(self.name + b"\n" + data)
            except OSError:
                pass

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self.udp.recvfrom(65536)
                if peer is None:  # shut down by close()
                    return
                self.udp_count += 1
                self.udp.sendto(self.name + b"\n" + data, peer)
            except OSError:
                return

    def close(self) -> None:
        for sock in (self.tcp, self.udp):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
            except OSError:
                pass
            sock.close()


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Vm:
    name: str
    mac: str
    ns: str
    server: EchoServer
    dhcp: DhcpClient | None = None
    static_ip: str | None = None

    @property
    def ip(self) -> str | None:
        return self.static_ip if self.dhcp is None else self.dhcp.address()


class VmHost:
    def __init__(self, lab: Lab, *, port: int = 8022, sources: str = "dhcp = true") -> None:
        self.lab = lab
        self.port = port
        self.sources = sources
        n = int(lab.id[:4], 16)
        self.net = ipaddress.IPv4Network(f"10.{100 + n % 100}.{n % 251}.0/24")
        self.gateway = ipaddress.IPv4Interface(f"{self.net[1]}/{self.net.prefixlen}")
        self.host = lab.netns("host")
        self.client = lab.netns("client")
        ensure_bridge(BRIDGE, netns=self.host)
        ensure_address(BRIDGE, self.gateway, netns=self.host)
        lab.veth(self.host, "to-client", self.client, "eth0")
        self.public = str(CLIENT_NET[1])
        lab.run(self.host, ["ip", "addr", "add", f"{self.public}/24", "dev", "to-client"])
        lab.run(self.client, ["ip", "addr", "add", f"{CLIENT_NET[2]}/24", "dev", "eth0"])
        d = lab.dir
        (d / "etc").mkdir()
        self.config = d / "etc" / "fastfwd.toml"  # alone in its directory, which is watched
        self.lease_socket = d / "lease.sock"
        self.control_socket = d / "control.sock"
        self.state_dir = d / "state"
        self.log = d / "fastfwd.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.vms: list[Vm] = []

    # -- the host's services ------------------------------------------------------------------
    def start_dnsmasq(self) -> None:
        hook = write_hook(self.lab.dir / "dhcp-hook", str(self.lease_socket))
        args = dnsmasq.argv(BRIDGE, dhcp_range=(self.net[100], self.net[199]),
                            netmask=self.net.netmask, hook=str(hook),
                            leasefile=self.lab.dir / "dnsmasq.leases",
                            pidfile=self.lab.dir / "dnsmasq.pid", foreground=True,
                            # Before offering an address for the first time, dnsmasq pings it
                            # and ignores the client for 3 s: right on a shared LAN, only
                            # slow in a namespace nobody else is on.
                            extra=["--no-ping"])
        with open(self.lab.dir / "dnsmasq.log", "ab") as log:  # the child keeps its own copy
            self.dnsmasq = self.lab.spawn(self.host, args, stdout=log, stderr=log)

    def stop_dnsmasq(self) -> None:
        assert self.dnsmasq is not None
        self.lab.stop(self.dnsmasq)
        self.dnsmasq = None

    def write_config(self, mac: str) -> None:
        """The config, written whole and renamed into place as an editor would."""
        text = f"""
[[forward]]
name = "vm1"
proto = "both"
listen = "0.0.0.0:{self.port}"
to = "vm1:{self.port}"

[hosts.vm1]
mac = "{mac}"

[control]
lease_socket = "{self.lease_socket}"
control_socket = "{self.control_socket}"
state_dir = "{self.state_dir}"

[sources]
{self.sources}
"""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def start_daemon(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
        with open(self.log, "ab") as log:  # the child keeps its own copy
            self.daemon = self.lab.spawn(self.host, [sys.executable, "-m", "fastfwd", "run", "-c",
                                                     str(self.config), "--log-level", "debug"],
                                         env=env, stdout=log, stderr=log)
        wait_for(lambda: self.status() is not None or self.daemon_exited(), timeout,
                 message="fastfwd's control socket")
        if self.daemon_exited():
            raise RuntimeError(f"fastfwd exited at start:\n{self.log_text()}")

    def daemon_exited(self) -> bool:
        return self.daemon is None or self.daemon.poll() is not None

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        self.lab.stop(self.daemon, sig)
        self.daemon = None

    def status(self) -> dict | None:
        from ..unixclient import DaemonError, call

        try:
            reply = call(self.control_socket, {"cmd": "status"}, timeout=5)
        except DaemonError:
            return None
        return reply if reply.get("ok") else None

    def log_text(self) -> str:
        parts = []
        for name in ("fastfwd.log", "dnsmasq.log"):
            path = self.lab.dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    # -- VMs -------------------------------------------------------------------------------------
    def add_vm(self, name: str, mac: str, *, static_ip: str | None = None) -> Vm:
        """A VM on the bridge with ``mac``, serving on the port; by DHCP unless ``static_ip``."""
        ns = self.lab.netns(name)
        self.lab.veth(self.host, f"{name}-port", ns, "eth0", mac_b=mac)
        self.lab.run(self.host, ["ip", "link", "set", f"{name}-port", "master", BRIDGE])
        vm = Vm(name, mac, ns, EchoServer(self.lab, ns, name, self.port))
        if static_ip is None:
            vm.dhcp = self.lab.dhcp_client(ns, hostname=name)
        else:
            vm.static_ip = static_ip
            self.lab.run(ns, ["ip", "addr", "add", f"{static_ip}/{self.net.prefixlen}", "dev", "eth0"])
        self.vms.append(vm)
        return vm

    def remove_vm(self, vm: Vm) -> None:
        if vm.dhcp is not None:
            vm.dhcp.stop()
        vm.server.close()
        self.lab.remove_netns(vm.ns)  # its end of the veth goes, and with it the bridge port
        self.vms.remove(vm)

    # -- traffic from the client -----------------------------------------------------------------
    def tcp(self, size: int = 256 * 1024, timeout: float = 10.0) -> str:
        """One connection to the host's port: send ``size`` random bytes, half-close, read the
        reply to EOF. Returns the name of the VM that answered, after checking that the bytes
        it echoed hash the same as those sent. Raises OSError if the connection is refused."""
        payload = os.urandom(size)
        with self.lab.socket(self.client) as sock:
            sock.settimeout(timeout)
            sock.connect((self.public, self.port))
            sender = threading.Thread(target=_send_and_shut, args=(sock, payload), daemon=True)
            sender.start()
            reply = _read_to_eof(sock)
            sender.join(timeout)
        name, _, echoed = reply.partition(b"\n")
        if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
            raise AssertionError(f"TCP bytes differ at the far end ({len(echoed)} of {size} came back)")
        return name.decode()

    def refused(self) -> bool:
        """True if a TCP connection to the port is turned away (the rule is pending)."""
        try:
            self.tcp(size=16, timeout=5)
        except (ConnectionRefusedError, ConnectionResetError):
            return True
        except OSError:  # a timeout: accepted, but the target does not answer
            return False
        return False

    def udp_flow(self) -> UdpFlow:
        return UdpFlow(self)


def _send_and_shut(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class UdpFlow:
    """One client socket, so every datagram belongs to the same forwarder session."""

    def __init__(self, host: VmHost) -> None:
        self.sock = host.lab.socket(host.client, kind=socket.SOCK_DGRAM)
        self.sock.connect((host.public, host.port))

    def send(self, size: int = 1200, timeout: float = 1.0) -> str | None:
        """Send one datagram; the name of the VM whose echo came back intact, or None if no
        reply came within ``timeout`` (UDP may be dropped while the rule is pending)."""
        payload = os.urandom(size)
        self.sock.sendall(payload)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self.sock.recv(65536)
            except (TimeoutError, ConnectionRefusedError):
                return None
            name, _, echoed = reply.partition(b"\n")
            if hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest():
                return name.decode()
            # else: a late echo of an earlier datagram; keep reading
        return None

    def close(self) -> None:
        self.sock.close()
