"""What a new user does after the README's examples: stop the daemon, read its log, see that
zero copy ran, upgrade it with connections live, and run it under scripts/fastfwd.service."""
from __future__ import annotations

import configparser
import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_control import REPO, DaemonProcess, EchoServer, daemon, echo_roundtrip, fastfwd, needs_engine, short_dir
from netutil import SyncForwarder

UNIT = REPO / "scripts" / "fastfwd.service"


def unit_service() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def status_json(control_socket: Path) -> dict:
    result = fastfwd("status", "--json", "--socket", str(control_socket))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- the log ---------------------------------------------------------------------------------------
@needs_engine
def test_a_log_beside_the_config_file_stays_quiet(echo: EchoServer) -> None:
    """``fastfwd run -c fastfwd.toml 2> fastfwd.log`` in one directory: writing the log is a
    change in the watched directory, which must not add a line to the log."""
    with short_dir() as tmp:
        config = tmp / "fastfwd.toml"
        config.write_text(f'[[forward]]\nlisten = 0\nto = "127.0.0.1:{echo.port}"\n')
        with daemon(tmp, "-c", str(config), "--log-level", "info") as d:  # its log is tmp/daemon.log
            (tmp / "notes.txt").write_text("not the config\n")
            config.write_text(config.read_text() + "# edited\n")
            d.wait_log("applied")
            assert "detected" not in d.log(), d.log()


# -- upgrading with live connections --------------------------------------------------------------
@needs_engine
def test_a_new_daemon_takes_over_while_the_old_one_drains(echo: EchoServer) -> None:
    """README's upgrade: SIGTERM the old daemon, start the new one with the same ports and
    sockets as soon as the old one logs ``draining``; the old one's live connection still
    finishes, and its exit leaves the new one's sockets alone."""
    with short_dir() as tmp:
        old_dir, new_dir = tmp / "old", tmp / "new"
        old_dir.mkdir()
        new_dir.mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        spec = f"127.0.0.1:{port}:127.0.0.1:{echo.port}"
        shared = ["--control-socket", str(tmp / "c.sock"), "--lease-socket", str(tmp / "l.sock")]
        old = DaemonProcess(old_dir, "-t", spec, *shared)
        new = None
        try:
            old.wait_log("fastfwd started")
            live = socket.create_connection(("127.0.0.1", port), timeout=10)
            with live:
                live.sendall(b"before")
                assert live.recv(64) == b"before"
                old.signal(signal.SIGTERM)
                old.wait_log("draining")
                new = DaemonProcess(new_dir, "-t", spec, *shared)
                new.wait_log("fastfwd started")
                assert echo_roundtrip(port, size=1 << 20)  # through the new daemon
                live.sendall(b"after")  # the old daemon still relays its connection
                assert live.recv(64) == b"after"
            assert old.wait() == 0
            # The new daemon's control socket survived the old one's exit, and its counters say
            # the megabyte went by splice (auto switches after 64 KiB).
            counters = status_json(tmp / "c.sock")["rules"][0]["counters"]
            assert counters["accepted"] == 1 and counters["bytes_spliced"] > 0, counters
        finally:
            old.stop()
            if new is not None:
                new.stop()


# -- exit statuses the README states ----------------------------------------------------------------
def test_status_without_a_daemon_exits_1_with_one_line() -> None:
    with short_dir() as tmp:
        result = fastfwd("status", "--socket", str(tmp / "none.sock"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "is the daemon running?" in result.stderr


@pytest.mark.parametrize("spec", ["-u 5353:127.0.0.1:5353", "-t 8080:localhost:80", "-t 8000-7999:127.0.0.1:80"])
def test_the_refusals_the_readme_names_exit_2_with_one_line(spec: str) -> None:
    readme = " ".join((REPO / "README.md").read_text().split())
    assert spec.split()[1].split(":")[1] in readme  # the README names each case
    with short_dir() as tmp:
        result = fastfwd("run", "--control-socket", str(tmp / "c"), "--lease-socket", str(tmp / "l"),
                         "--state-dir", str(tmp / "s"), *spec.split())
        assert not any(tmp.iterdir())  # a failed start leaves nothing behind
    assert result.returncode == 2
    assert result.stderr.startswith("fastfwd: ") and result.stderr.count("\n") == 1, result.stderr


# -- scripts/fastfwd.service ---------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exec_start = unit_service()["ExecStart"]
    assert exec_start.startswith("/opt/fastfwd/bin/fastfwd run ")  # the README's venv
    # verify checks that the command exists: this test's Python stands in for the venv's.
    unit = tmp_path / "fastfwd.service"
    unit.write_text(UNIT.read_text().replace("/opt/fastfwd/bin/fastfwd", f"{sys.executable} -m fastfwd"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")


def low_free_port() -> int:
    """A TCP port below 1024 free on 127.0.0.1 (root may bind it to find out)."""
    for port in range(1000, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no port from 901 to 1000 is free on 127.0.0.1")


def run_with_caps(tmp: Path, caps: list[str], *args: str) -> DaemonProcess:
    """``fastfwd run`` as a root holding only ``caps``, as the unit's CapabilityBoundingSet leaves it."""
    names = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    config = tmp / "fastfwd.toml"
    config.write_text('[control]\nallow_groups = ["nogroup"]\n')  # the sockets are handed to it
    return DaemonProcess(tmp, "-c", str(config), *args,
                         prefix=("setpriv", f"--bounding-set={names}", "--inh-caps=-all"))


@pytest.mark.root
@needs_engine
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_the_units_capabilities_are_enough_and_needed(echo: EchoServer) -> None:
    """A port below 1024, a UDP rule (SO_RCVBUFFORCE) and sockets for an allow_groups group,
    with only the capabilities the unit leaves root; without CAP_NET_BIND_SERVICE the port is
    refused, so the bounding set is what decides."""
    caps = unit_service()["CapabilityBoundingSet"].split()
    port = low_free_port()
    specs = ("-t", f"127.0.0.1:{port}:127.0.0.1:{echo.port}", "-u", f"127.0.0.1:0:127.0.0.1:{echo.port}")
    with short_dir() as tmp:
        d = run_with_caps(tmp, caps, *specs)
        try:
            d.wait_log("fastfwd started")
            assert echo_roundtrip(port)
            assert d.control_socket.stat().st_gid == grp.getgrnam("nogroup").gr_gid
        finally:
            d.stop()
        assert "CAP_NET_BIND_SERVICE" in caps
        d = run_with_caps(tmp, [c for c in caps if c != "CAP_NET_BIND_SERVICE"], *specs)
        try:
            assert d.wait() == 1
            assert d.log().endswith(f": no permission to listen on tcp port {port}\n"), d.log()
        finally:
            d.stop()


@pytest.mark.root
@needs_engine
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_a_lease_file_the_unit_cannot_read_is_sent_by_a_hook_outside_its_sandbox() -> None:
    """docs/vm-hosts.md: a lease file another user keeps 0600 is unreadable to the daemon under
    the unit's capabilities, and as unreadable to an ExecStartPost= hook, which gets the same
    bounding set; the hook run with full privileges (ExecStartPost=+...) sends it."""
    caps = unit_service()["CapabilityBoundingSet"].split()
    bounding = ("setpriv", "--bounding-set=" + ",".join(
        ["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)]), "--inh-caps=-all")
    mac = "52:54:00:12:34:56"
    with short_dir() as tmp:
        os.chmod(tmp, 0o755)
        leases = tmp / "dnsmasq.leases"
        leases.write_text(f"1900000000 {mac} 192.0.2.10 vm1 *\n")
        os.chown(leases, 65534, 65534)
        leases.chmod(0o600)
        (tmp / "fastfwd.toml").write_text(f'[sources]\ndhcp_lease_file = "{leases}"\n')
        d = DaemonProcess(tmp, "-c", str(tmp / "fastfwd.toml"), prefix=bounding)
        try:
            d.wait_log("fastfwd started")
            assert f"cannot read {leases}: Permission denied" in d.log()
            hook = [sys.executable, "-m", "fastfwd.hook", "--socket", str(d.lease_socket), "snapshot", str(leases)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            sandboxed = subprocess.run([*bounding, *hook], capture_output=True, text=True, timeout=30, env=env)
            assert sandboxed.returncode == 2 and "Permission denied" in sandboxed.stderr, sandboxed.stderr
            assert status_json(d.control_socket)["leases"] == []
            privileged = subprocess.run(hook, capture_output=True, text=True, timeout=30, env=env)
            assert privileged.returncode == 0, privileged.stderr
            assert [lease["mac"] for lease in status_json(d.control_socket)["leases"]] == [mac]
        finally:
            d.stop()


def test_the_units_writable_directories_are_the_control_defaults() -> None:
    """docs/config.md: under the unit only /run/fastfwd and /var/lib/fastfwd are writable, and
    those are where a root daemon puts its sockets and lease state by default."""
    from fastfwd.config import ControlSettings

    service = unit_service()
    assert "ReadWritePaths" not in service
    writable = {Path("/run") / service["RuntimeDirectory"], Path("/var/lib") / service["StateDirectory"]}
    assert service["ProtectSystem"] == "strict"
    if os.geteuid() != 0:
        pytest.skip("the root defaults are computed for root only")
    defaults = ControlSettings()
    assert {Path(defaults.lease_socket).parent, Path(defaults.control_socket).parent, Path(defaults.state_dir)} == writable


# -- docs/metrics.md ---------------------------------------------------------------------------
@needs_engine
def test_a_pending_rules_refused_clients_are_not_counted(fwd: SyncForwarder) -> None:
    """fastfwd_refused_total leaves out a pending rule's clients: its port does not listen, so
    the kernel refuses them."""
    import fastfwd as ff

    rule = fwd.add(ff.Rule.parse("0:vm-not-yet:80"))
    assert rule.pending
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", rule.port), timeout=5).close()
    assert fwd.counters(rule).refused == 0  # settled: every worker has counted what it saw
