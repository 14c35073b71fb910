"""The dnsmasq hook as dnsmasq runs it: a separate process with dnsmasq's exact arguments,
talking to a real lease server; and run by a real dnsmasq."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd.lease_server import LeaseServer
from fastfwd.leases import Lease, LeaseChange, LeaseTable

from helpers_control import short_dir

REPO = Path(__file__).resolve().parents[1]
A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


class ServerThread:
    """A lease server on its own event loop in a thread, as the daemon would run it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = LeaseTable()
        self.calls: list[list[LeaseChange]] = []
        self.fail = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _on_change(self, changes: list[LeaseChange]) -> None:
        if self.fail:
            raise RuntimeError("engine said no")
        self.calls.append(changes)

    def leases(self) -> list[tuple[str, str, str | None]]:
        async def read() -> list[tuple[str, str, str | None]]:
            return [(x.mac, x.ip, x.hostname) for x in self.table]
        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=30)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._server = LeaseServer(self.path, self.table, self._on_change)
        asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._server.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
def server(sockdir: Path) -> Iterator[ServerThread]:
    with ServerThread(sockdir / "lease.sock") as srv:
        yield srv


def hook(*args: str, socket_path: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the hook the way dnsmasq does: its own process, arguments only, config in the environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DNSMASQ_", "FASTFWD_"))}
    full_env["PYTHONPATH"] = str(REPO)
    if socket_path is not None:
        full_env["FASTFWD_LEASE_SOCKET"] = str(socket_path)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastfwd.hook", *args], env=full_env, cwd="/",
                          capture_output=True, text=True, timeout=timeout)


def test_add_old_del_with_dnsmasqs_arguments(server: ServerThread) -> None:
    for args in (["add", A.upper(), "10.0.0.1", "vm1"], ["add", B, "10.0.0.2"], ["old", A, "10.0.0.1", "vm1"]):
        proc = hook(*args, socket_path=server.path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert server.leases() == [(A, "10.0.0.1", "vm1"), (B, "10.0.0.2", None)]
    assert len(server.calls) == 2  # "old" for an unchanged lease is no change
    assert hook("del", A, "10.0.0.1", "vm1", socket_path=server.path).returncode == 0
    assert server.leases() == [(B, "10.0.0.2", None)]


def test_socket_option_wins_over_the_environment(server: ServerThread, sockdir: Path) -> None:
    proc = hook("--socket", str(server.path), "add", A, "10.0.0.1", socket_path=sockdir / "elsewhere.sock")
    assert proc.returncode == 0, proc.stderr
    assert server.leases() == [(A, "10.0.0.1", None)]


def test_dhcpv6_event_uses_the_mac_from_the_environment(server: ServerThread) -> None:
    duid = "00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a"
    proc = hook("add", duid, "fd00::10", "vm6", socket_path=server.path,
                env={"DNSMASQ_IAID": "1234", "DNSMASQ_MAC": A})
    assert proc.returncode == 0, proc.stderr
    assert server.leases() == [(A, "fd00::10", "vm6")]


def test_dhcpv6_event_without_a_known_mac_is_skipped(server: ServerThread) -> None:
    proc = hook("add", "00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a", "fd00::10", socket_path=server.path,
                env={"DNSMASQ_IAID": "1234"})
    assert proc.returncode == 0 and "no MAC known" in proc.stderr
    assert server.leases() == []


def test_invalid_client_hostname_is_dropped_but_the_lease_arrives(server: ServerThread) -> None:
    proc = hook("add", A, "10.0.0.1", "bad_name!", socket_path=server.path)
    assert proc.returncode == 0 and "ignoring invalid host name" in proc.stderr
    assert server.leases() == [(A, "10.0.0.1", None)]


@pytest.mark.parametrize("args", [["init"], ["tftp", "1024", "10.0.0.1", "/srv/tftp/-boot.img"],
                                  ["arp-add", A, "10.0.0.1"], ["arp-del", A, "10.0.0.1"],
                                  ["relay-snoop", "10.0.0.1"], ["something-new", "x"]])
def test_other_actions_exit_0_silently_without_a_daemon(args: list[str], sockdir: Path) -> None:
    proc = hook(*args, socket_path=sockdir / "nobody-listens.sock")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_no_daemon_fails_with_one_line(sockdir: Path) -> None:
    proc = hook("--timeout", "0.5", "add", A, "10.0.0.1", socket_path=sockdir / "absent.sock")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "cannot reach fastfwd" in proc.stderr and "no such socket" in proc.stderr
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "stale.sock"))
    stale.close()
    proc = hook("--timeout", "0.5", "add", A, "10.0.0.1", socket_path=sockdir / "stale.sock")
    assert proc.returncode == 1 and "connection refused" in proc.stderr


def test_daemon_that_never_answers_times_out(sockdir: Path) -> None:
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(sockdir / "mute.sock"))
    mute.listen(8)  # accepts into the backlog, never replies
    try:
        proc = hook("--timeout", "0.5", "add", A, "10.0.0.1", socket_path=sockdir / "mute.sock")
    finally:
        mute.close()
    assert proc.returncode == 1 and "no reply from fastfwd" in proc.stderr


def test_error_reply_fails_with_its_message(server: ServerThread) -> None:
    server.fail = True
    proc = hook("add", A, "10.0.0.1", socket_path=server.path)
    assert proc.returncode == 1
    assert proc.stderr == (f"fastfwd-dhcp-hook: add {A} 10.0.0.1 refused: "
                           "lease recorded, but re-pointing rules failed: "
                           "engine said no\n")


@pytest.mark.parametrize("args, error", [
    (["add", A], "add takes MAC IP [HOSTNAME]"),
    (["add", A, "10.0.0.1", "vm1", "extra"], "add takes MAC IP [HOSTNAME]"),
    (["add", A, "10.0.0.300"], "not an IPv4 or IPv6 address"),
    (["add", A, "0.0.0.0"], "not a machine's address"),
    (["del", "00:01:00:01:aa:bb:cc:dd", "ff02::1"], "not a machine's address"),
    (["snapshot"], "snapshot takes one argument"),
    (["snapshot", "/nonexistent/dnsmasq.leases"], "cannot read /nonexistent/dnsmasq.leases: No such file or directory\n"),
])
def test_bad_arguments_exit_2(args: list[str], error: str, server: ServerThread) -> None:
    proc = hook(*args, socket_path=server.path)
    assert proc.returncode == 2 and error in proc.stderr
    assert server.leases() == [] and server.calls == []


def test_snapshot_from_a_dnsmasq_lease_file(server: ServerThread, sockdir: Path) -> None:
    server.table.apply_event("add", Lease(mac=C, ip="10.0.0.3"))
    server.table.apply_event("add", Lease(mac=C, ip="fd00::3"))    # from a DHCPv6 event
    leases = sockdir / "dnsmasq.leases"
    leases.write_text(f"1900000000 {A} 10.0.0.1 vm1 01:{A}\n"
                      f"1900000000 {B.upper()} 10.0.0.2 * *\n"
                      "duid 00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a\n"
                      "1900000000 1234 fd00::10 vm6 00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a\n")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert proc.returncode == 0, proc.stderr
    # The file's IPv6 part has no MACs: the snapshot is IPv4's, and C's IPv6 lease stays.
    assert sorted(server.leases()) == [(A, "10.0.0.1", "vm1"), (B, "10.0.0.2", None), (C, "fd00::3", None)]


def test_snapshot_of_a_damaged_lease_file_sends_nothing(server: ServerThread, sockdir: Path) -> None:
    leases = sockdir / "dnsmasq.leases"
    leases.write_text(f"1900000000 {A} 10.0.0.1 vm1 *\n1900000000 {B}\n")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert proc.returncode == 2 and "dnsmasq.leases:2: not a dnsmasq lease line" in proc.stderr
    assert server.leases() == []


def test_snapshot_skips_a_lease_without_an_ethernet_mac(server: ServerThread, sockdir: Path) -> None:
    """dnsmasq writes other hardware types with their type first (token ring, or no address at
    all): such a lease cannot be keyed, like its events, but the rest of the file still counts."""
    leases = sockdir / "dnsmasq.leases"
    leases.write_text(f"1900000000 {A} 10.0.0.1 vm1 *\n"
                      "1900000000 06-01:23:45:67:89:ab 10.0.0.5 tr *\n"
                      "1900000000 01- 10.0.0.6 * 01:02:03\n"
                      f"1900000000 {B} 10.0.0.2 * *\n")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("no MAC") == 2
    assert server.leases() == [(A, "10.0.0.1", "vm1"), (B, "10.0.0.2", None)]


def test_snapshot_of_a_mac_with_two_leases_keeps_its_newest(server: ServerThread, sockdir: Path) -> None:
    """One MAC holds two IPv4 leases when its client id changed (a reinstalled guest, PXE then
    the OS): the one that expires last is the one granted last, and what the guest uses."""
    leases = sockdir / "dnsmasq.leases"
    leases.write_text(f"1900000500 {A} 10.0.0.7 vm1 ff:00:00:00:01\n"
                      f"1900000000 {B} 10.0.0.2 * *\n"
                      f"1900000900 {A} 10.0.0.8 vm1 ff:00:00:00:02\n"
                      f"1900000100 {A} 10.0.0.9 vm1 *\n")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert proc.returncode == 0, proc.stderr
    assert server.leases() == [(A, "10.0.0.8", "vm1"), (B, "10.0.0.2", None)]


def test_hook_does_not_load_the_engine_or_asyncio() -> None:
    code = ("import sys; from fastfwd import hook; "
            "print(sorted(m for m in ('asyncio', 'fastfwd._engine', 'fastfwd.forwarder', 'uvloop') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


# -- a real dnsmasq ----------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.skipif(shutil.which("dnsmasq") is None or shutil.which("unshare") is None,
                    reason="needs dnsmasq and unshare")
def test_real_dnsmasq_reports_its_leases_through_the_hook(server: ServerThread, sockdir: Path) -> None:
    """dnsmasq runs its script with 'old' for each current lease in its lease file and 'del' for
    each expired one when it starts: the hook must turn those into the lease table."""
    os.chmod(sockdir, 0o755)
    now = int(time.time())
    leasefile = sockdir / "dnsmasq.leases"
    leasefile.write_text(f"{now + 3600} {A} 10.99.0.11 vm-a *\n"
                         f"{now + 3600} {B} 10.99.0.12 * *\n"
                         f"{now - 3600} {C} 10.99.0.13 vm-c *\n")
    server.table.apply_event("add", Lease(mac=C, ip="10.99.0.13", hostname="vm-c"))
    script = sockdir / "hook.sh"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m fastfwd.hook \"$@\" 2>>{sockdir}/hook.err\n")
    script.chmod(0o755)
    # A network namespace of its own: no DHCP traffic or port 67 outside the test.
    dnsmasq = subprocess.Popen(
        ["unshare", "--net", "dnsmasq", "--no-daemon", "--port=0", "--conf-file=/dev/null",
         "--dhcp-range=10.99.0.10,10.99.0.50,12h", f"--dhcp-leasefile={leasefile}",
         f"--dhcp-script={script}", "--dhcp-scriptuser=root", f"--pid-file={sockdir}/dnsmasq.pid",
         "--user=root"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # The socket reaches the hook through dnsmasq's environment, as docs/leases.md says.
        env={**os.environ, "FASTFWD_LEASE_SOCKET": str(server.path), "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(server.calls) < 3 and dnsmasq.poll() is None:
            time.sleep(0.05)
    finally:
        dnsmasq.send_signal(signal.SIGTERM)
        try:
            _, err = dnsmasq.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            dnsmasq.kill()
            _, err = dnsmasq.communicate(timeout=30)
    hook_err = (sockdir / "hook.err").read_text() if (sockdir / "hook.err").exists() else ""
    assert server.leases() == [(A, "10.99.0.11", "vm-a"), (B, "10.99.0.12", None)], (err, hook_err)
    assert hook_err == ""


def test_refusal_sent_before_reading_is_still_reported(sockdir: Path) -> None:
    """A daemon that refuses a peer replies and hangs up without reading what it sent."""
    path = sockdir / "strict.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.sendall(b'{"ok": false, "error": "permission denied: not an allowed user or group"}\n')
        conn.close()
    refuser = threading.Thread(target=refuse, daemon=True)
    refuser.start()
    try:
        leases = _big_lease_file(sockdir)
        proc = hook("snapshot", str(leases), socket_path=path)
    finally:
        refuser.join(timeout=30)
        listener.close()
    assert proc.returncode == 1
    assert proc.stderr == (f"fastfwd-dhcp-hook: snapshot {leases} refused: "
                           "permission denied: not an allowed user or group\n")


def _big_lease_file(directory: Path) -> Path:
    """A lease file whose snapshot is far larger than a socket buffer, so sending it must fail."""
    path = directory / "big.leases"
    path.write_text("".join(f"1900000000 52:54:00:02:{i // 256:02x}:{i % 256:02x} 10.4.{i // 256}.{i % 256} "
                            f"guest-{i} *\n" for i in range(20000)))
    return path


def test_hook_waits_for_a_restarting_daemon(sockdir: Path) -> None:
    """dnsmasq never runs a failed script again: an event sent while the daemon restarts (its
    socket gone, or left behind and refusing) must wait for the new daemon, not be lost."""
    path = sockdir / "lease.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # what a killed daemon leaves behind: connecting is refused
    stale.close()
    proc = subprocess.Popen([sys.executable, "-m", "fastfwd.hook", "--timeout", "30", "add", A, "10.0.0.1", "vm1"],
                            env={**os.environ, "PYTHONPATH": str(REPO), "FASTFWD_LEASE_SOCKET": str(path)}, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Long enough for the hook to have tried the dead socket; the new daemon replaces it.
        time.sleep(1.5)
        with ServerThread(path) as server:
            out, err = proc.communicate(timeout=60)
            assert (proc.returncode, out, err) == (0, "", "")
            assert server.leases() == [(A, "10.0.0.1", "vm1")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_snapshot_of_an_empty_lease_file_removes_no_lease(server: ServerThread, sockdir: Path) -> None:
    """dnsmasq rewrites its lease file in place, emptying it first: a snapshot read at that
    moment must not drop every lease (dnsmasq reports no renewals, so none would come back)."""
    server.table.apply_event("add", Lease(mac=A, ip="10.0.0.1", hostname="vm1"))
    leases = sockdir / "dnsmasq.leases"
    leases.write_text("")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert proc.returncode == 0
    assert proc.stderr == f"fastfwd-dhcp-hook: {leases} is empty (being rewritten?): nothing sent\n"
    assert server.leases() == [(A, "10.0.0.1", "vm1")] and server.calls == []


def test_snapshot_of_a_lease_file_that_is_a_pipe_is_refused_without_waiting(server: ServerThread,
                                                                            sockdir: Path) -> None:
    """Opening a FIFO for reading waits for a writer: a hook run from a timer would hang."""
    fifo = sockdir / "dnsmasq.leases"
    os.mkfifo(fifo)
    proc = hook("snapshot", str(fifo), socket_path=server.path, timeout=20)
    assert (proc.returncode, proc.stderr) == (2, f"fastfwd-dhcp-hook: cannot read {fifo}: not a regular file\n")
    assert server.calls == []


def test_dhcpv6_del_without_a_known_mac_removes_the_lease_holding_the_address(server: ServerThread) -> None:
    """dnsmasq's lease file keeps no MAC for a DHCPv6 lease: once dnsmasq restarted, the lease's
    expiry ('del') comes with the DUID alone. Were it skipped, the lease would never go, and
    its name would point at an address no machine holds."""
    duid = "00:01:00:01:2c:5e:7a:10:52:54:00:00:00:0a"
    server.table.apply_event("add", Lease(mac=A, ip="fd00::10", hostname="vm6"))
    server.table.apply_event("add", Lease(mac=A, ip="10.0.0.1", hostname="vm6"))
    proc = hook("del", duid, "fd00::10", "vm6", socket_path=server.path, env={"DNSMASQ_IAID": "1234"})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert server.leases() == [(A, "10.0.0.1", "vm6")]


def test_snapshot_of_a_lease_file_with_blank_lines(server: ServerThread, sockdir: Path) -> None:
    """dnsmasq reads its lease file word by word, so a blank line (a file edited by hand) is
    nothing to it: it must not make the file unusable here either."""
    server.table.apply_event("add", Lease(mac=C, ip="10.0.0.3"))
    leases = sockdir / "dnsmasq.leases"
    leases.write_text(f"\n1900000000 {A} 10.0.0.1 vm1 *\n  \n\t\n1900000000 {B} 10.0.0.2 * *\n\n")
    proc = hook("snapshot", str(leases), socket_path=server.path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert server.leases() == [(A, "10.0.0.1", "vm1"), (B, "10.0.0.2", None)]


def test_an_event_the_daemon_did_not_get_is_named_in_the_error(sockdir: Path) -> None:
    """dnsmasq logs the script's stderr and exit status, never its arguments: the line must say
    which lease event was lost, so that it can be made good (by hand, or by a snapshot)."""
    path = sockdir / "absent.sock"
    proc = hook("--timeout", "0.5", "del", A, "10.0.0.1", "vm1", socket_path=path)
    assert proc.returncode == 1
    assert proc.stderr == (f"fastfwd-dhcp-hook: del {A} 10.0.0.1 vm1: cannot reach fastfwd at {path}: "
                           "no such socket (is the daemon running?)\n")


def _scoped(server: ServerThread) -> list[tuple[str, str, str]]:
    async def read() -> list[tuple[str, str, str]]:
        return [(x.mac, x.ip, x.scope) for x in server.table]
    return asyncio.run_coroutine_threadsafe(read(), server._loop).result(timeout=30)


def test_the_scope_goes_with_events_and_snapshots(server: ServerThread, sockdir: Path) -> None:
    """One dnsmasq per bridge, each hook told its scope: a snapshot of one bridge's lease file
    replaces that bridge's leases alone. The option wins over the environment."""
    bridge_a = {"FASTFWD_SCOPE": "br-a", "DNSMASQ_INTERFACE": "br-a", "DNSMASQ_LEASE_EXPIRES": "1900000000"}
    for args, env in ((["add", A, "10.0.0.1", "vm1"], bridge_a), (["--scope", "br-b", "add", B, "10.0.0.2"], bridge_a),
                      (["add", C, "10.0.0.3"], {})):
        proc = hook(*args, socket_path=server.path, env=env)
        assert (proc.returncode, proc.stderr) == (0, ""), args
    assert _scoped(server) == [(A, "10.0.0.1", "br-a"), (B, "10.0.0.2", "br-b"), (C, "10.0.0.3", "")]
    leasefile = sockdir / "br-a.leases"
    leasefile.write_text(f"1900000000 {C} 10.0.0.9 * *\n")  # A released (its del lost), C moved here
    assert hook("snapshot", str(leasefile), socket_path=server.path, env=bridge_a).returncode == 0
    assert _scoped(server) == [(B, "10.0.0.2", "br-b"), (C, "10.0.0.9", "br-a")]
    proc = hook("--scope", "br\x01a", "add", A, "10.0.0.1", socket_path=server.path)
    assert proc.returncode == 2 and "scope" in proc.stderr
