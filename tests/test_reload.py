"""Reloading: the watcher sees how files really get replaced; a bad file changes nothing; a good
one is applied as a diff that leaves unchanged rules' connections alone and re-points at once."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from fastfwd.unixclient import call
from fastfwd.watcher import _open_for_writing, watch_config

from helpers_control import (BAD_CONFIGS, DaemonProcess, EchoServer, UdpEcho, connects, daemon, echo_roundtrip,
                             free_port, needs_engine, udp_ask, wait_until)

pytestmark = pytest.mark.timeout(120)


def write_atomic(path: Path, text: str) -> None:
    """What editors do: write a temp file beside it, rename it over the original."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def swap_symlink(path: Path, target: Path) -> None:
    """What deploy tools do: point a new symlink at the new file, rename it over the old link."""
    tmp = path.with_name(f".{path.name}.link")
    tmp.symlink_to(target)
    os.replace(tmp, path)


# -- the watcher --------------------------------------------------------------------------------
async def _changes(path: Path, steps, settle: float = 0.4) -> list[int]:
    """Run ``steps`` of (action, expected yields) while watching; for each, count the yields:
    wait for an expected one (bounded), then a quiet moment in which an extra would show."""
    counts: list[int] = []
    seen = 0

    async def consume() -> None:
        nonlocal seen
        async for _ in watch_config(path):
            seen += 1

    task = asyncio.create_task(consume())
    await asyncio.sleep(settle)  # the watch is up
    for action, expected in steps:
        before = seen
        action()
        for _ in range(250 if expected else 0):
            if seen > before:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle)
        counts.append(seen - before)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return counts


def test_watcher_sees_renames_writes_and_symlink_swaps_but_not_touches(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("a = 1\n")
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "v1.toml").write_text("a = 3\n")
    (versions / "v2.toml").write_text("a = 4\n")
    steps = [
        (lambda: write_atomic(path, "a = 2\n"), 1),             # editor save
        (lambda: path.write_text("a = 2\n"), 0),                # same bytes again: no change
        (lambda: os.utime(path), 0),                            # touch: no change
        (lambda: swap_symlink(path, versions / "v1.toml"), 1),  # now a symlink into another directory
        (lambda: (versions / "v1.toml").write_text("a = 5\n"), 1),  # written in place behind the link
        (lambda: swap_symlink(path, versions / "v2.toml"), 1),
        (lambda: path.unlink(), 0),                             # gone: nothing to load
        (lambda: path.write_text("a = 6\n"), 1),                # back
        (lambda: (tmp_path / "other.toml").write_text("x"), 0),  # a neighbour: not our file
    ]
    assert asyncio.run(asyncio.wait_for(_changes(path, steps), 60)) == [n for _, n in steps]


def test_watcher_sees_a_swapped_directory_symlink(tmp_path: Path) -> None:
    """The layout some deploy tools mount: f.toml -> data/f.toml, and data -> v1 swapped to v2."""
    for version, text in (("v1", "a = 1\n"), ("v2", "a = 2\n")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "f.toml").write_text(text)
    (tmp_path / "data").symlink_to("v1")
    path = tmp_path / "f.toml"
    path.symlink_to(Path("data") / "f.toml")
    assert asyncio.run(asyncio.wait_for(_changes(path, [(lambda: swap_symlink(tmp_path / "data", Path("v2")), 1)]), 30)) == [1]


def test_watcher_outlives_a_path_that_is_briefly_no_file(tmp_path: Path) -> None:
    """A directory or a FIFO where the file was is nothing to load (and a FIFO is not opened
    the blocking way); the watch goes on and sees the file once it is back."""
    path = tmp_path / "f.toml"
    path.write_text("a = 1\n")
    steps = [
        (lambda: (path.unlink(), path.mkdir()), 0),
        (lambda: (path.rmdir(), os.mkfifo(path)), 0),
        (lambda: (path.unlink(), path.write_text("a = 2\n")), 1),
    ]
    assert asyncio.run(asyncio.wait_for(_changes(path, steps), 60)) == [n for _, n in steps]


def needs_leases(path: Path) -> None:
    """Skip unless the kernel tells the watcher whether ``path`` is open for writing (a file
    lease): without, only the settle time decides, and a writer pausing longer is caught."""
    with open(path, "ab"), open(path, "rb") as reader:
        if not _open_for_writing(reader.fileno()):
            pytest.skip("file leases are refused here: the watcher goes by the settle time alone")


def test_the_lease_probe_sees_writers_and_where_not_allowed_says_no(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("a = 1\n")
    needs_leases(path)
    with open(path, "rb") as reader:
        assert not _open_for_writing(reader.fileno())
        with open(path, "r+b"):
            assert _open_for_writing(reader.fileno())
            # Neither the file's owner nor holding CAP_LEASE: the lease is refused (EACCES),
            # which must mean "cannot tell", not an error.
            pid = os.fork()
            if pid == 0:
                try:
                    os.setuid(65534)
                    os._exit(0 if _open_for_writing(reader.fileno()) is False else 1)
                finally:
                    os._exit(2)
            assert os.waitpid(pid, 0)[1] == 0
        assert not _open_for_writing(reader.fileno())  # the lease taken is dropped at once: no writer waits


def test_a_write_begun_while_the_consumer_handles_a_change_is_handed_over_even_if_the_same(
        tmp_path: Path) -> None:
    """The daemon reads the file again after the watcher saw it finished; if a new write has
    begun by then, it applies nothing, so what that write ends with must come again."""
    path = tmp_path / "f.toml"
    path.write_text("a = 1\n")
    needs_leases(path)

    async def main() -> list[str]:
        changes = watch_config(path)
        first = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0.4)  # the watch is up
        write_atomic(path, "a = 2\n")
        got = [await first]
        begun = threading.Event()

        def rewrite() -> None:  # in place, while the consumer still handles "a = 2"; ends the same
            with open(path, "r+b") as writer:
                writer.truncate(0)
                writer.write(b"a =")
                writer.flush()
                begun.set()
                time.sleep(0.5)
                writer.write(b" 2\n")
        writer = threading.Thread(target=rewrite)
        writer.start()
        await asyncio.to_thread(begun.wait, 10)
        got.append(await anext(changes))
        writer.join()
        await changes.aclose()
        return got
    first, again = asyncio.run(asyncio.wait_for(main(), 30))
    assert first == again == hashlib.sha256(b"a = 2\n").hexdigest()


# -- reloads of a running daemon -------------------------------------------------------------------
def forward(listen: int | str, target: str, **options: object) -> str:
    """One [[forward]] entry; values are written as JSON, which TOML reads the same."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    return f'[[forward]]\nlisten = {json.dumps(listen)}\nto = "{target}"\n{extra}'


def one_rule(tmp_path: Path, target: int, **options: object) -> tuple[int, Path]:
    """A config file forwarding a free loopback port to ``target``: (that port, the file)."""
    port, path = free_port(), tmp_path / "f.toml"
    path.write_text(forward(port, f"127.0.0.1:{target}", **options))
    return port, path


def reloads(proc: DaemonProcess) -> int:
    return proc.log().count(" applied: ")


def one_rule_added_by_one_reload(proc: DaemonProcess, added: int, kept: int) -> None:
    """Once the reload under way is applied: it was the only one, it added the rule on
    ``added`` and kept the one on ``kept``, and both forward."""
    proc.wait_log(" applied: ")
    assert "config changed: f.toml applied: 1 added, 0 removed, 0 re-pointed, 0 reconfigured, 1 unchanged" \
        in proc.log()
    assert reloads(proc) == 1
    assert echo_roundtrip(added) and echo_roundtrip(kept)


def reload_with(proc: DaemonProcess, path: Path, text: str) -> None:
    before = reloads(proc)
    write_atomic(path, text)
    proc.wait_log(" applied: ", count=before + 1)


@needs_engine
def test_every_bad_config_is_rejected_by_a_running_daemon_and_old_rules_keep_forwarding(
        tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        for i, (text, error) in enumerate(BAD_CONFIGS, 1):
            write_atomic(path, text)
            proc.wait_log("rejected, rules unchanged", count=i)
            assert f"config changed: f.toml: {error}\n" in proc.log(), error
            assert echo_roundtrip(port, 64 * 1024), f"stopped forwarding after: {error}"
        assert " applied: " not in proc.log()


def rule_ports(proc: DaemonProcess) -> list[int]:
    reply = call(proc.control_socket, {"cmd": "status"})
    assert reply["ok"], reply
    return [rule["port"] for rule in reply["rules"]]


def hold_forwarding(proc: DaemonProcess, port: int, rounds: int = 10) -> None:
    """While a writer holds the config file half written: ``port`` keeps its rule and forwards."""
    for _ in range(rounds):
        assert port in rule_ports(proc), proc.log()
        assert echo_roundtrip(port, 4096), proc.log()
        time.sleep(0.1)


@needs_engine
def test_a_file_written_in_place_with_a_pause_applies_once_closed_and_never_half(
        tmp_path: Path, echo: EchoServer) -> None:
    keep, path = one_rule(tmp_path, echo.port)
    needs_leases(path)
    added = free_port()
    # Its first half is valid on its own and lacks the rule that stays: applied, it would remove it.
    first, rest = forward(added, f"127.0.0.1:{echo.port}"), forward(keep, f"127.0.0.1:{echo.port}")
    with daemon(tmp_path, "-c", "f.toml") as proc:
        with open(path, "r+b") as writer:
            writer.truncate(0)
            writer.write(first.encode())
            writer.flush()
            hold_forwarding(proc, keep)
            writer.write(rest.encode())
        one_rule_added_by_one_reload(proc, added, keep)


@needs_engine
def test_a_file_truncated_in_place_changes_nothing_while_open_nor_once_closed_empty(
        tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    needs_leases(path)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        with open(path, "r+b") as writer:
            writer.truncate(0)
            hold_forwarding(proc, port)
        # Closed empty: what `: > FILE` leaves before the next command fills it.
        proc.wait_log("f.toml is empty: the running rules stay")
        hold_forwarding(proc, port, rounds=3)
        assert reloads(proc) == 0


@needs_engine
def test_sighup_reloads(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        proc.signal(signal.SIGHUP)
        proc.wait_log("SIGHUP: ")
        assert f"SIGHUP: {path.name} applied: 0 added, 0 removed, 0 re-pointed, 0 reconfigured, 1 unchanged" in proc.log()
        assert echo_roundtrip(port)


@needs_engine
def test_long_transfer_on_an_unchanged_rule_survives_50_reloads(tmp_path: Path, echo: EchoServer) -> None:
    other = EchoServer()
    a, b, c = free_port(), free_port(), free_port()
    conf = tmp_path / "conf"
    conf.mkdir()
    path = conf / "f.toml"
    keep = forward(a, f"127.0.0.1:{echo.port}")
    path.write_text(keep)
    chunks = [os.urandom(64 * 1024) for _ in range(50)]
    try:
        with daemon(tmp_path, "-c", str(path)) as proc:
            client = socket.create_connection(("127.0.0.1", a), timeout=20)
            digest, total = hashlib.sha256(), [0]
            reader = threading.Thread(target=_hash_all, args=(client, digest, total))
            reader.start()
            for i, chunk in enumerate(chunks):
                client.sendall(chunk)
                target = echo.port if i % 2 else other.port
                text = keep + forward(b, f"127.0.0.1:{target}") + (forward(c, f"127.0.0.1:{target}") if i % 3 else "")
                before = reloads(proc)
                _write_one_of_three_ways(path, text, i)
                proc.wait_log(" applied: ", count=before + 1)
                assert echo_roundtrip(b, 4096)
            client.shutdown(socket.SHUT_WR)
            reader.join(30)
            client.close()
            assert total[0] == 50 * 64 * 1024
            assert digest.digest() == hashlib.sha256(b"".join(chunks)).digest()
            assert reloads(proc) == 50
            assert "rejected" not in proc.log()
    finally:
        other.close()


@needs_engine
def test_a_repointed_rule_sends_new_connections_and_datagrams_to_the_new_target_at_once(tmp_path: Path) -> None:
    tcp_a, tcp_b = EchoServer(greeting=b"A"), EchoServer(greeting=b"B")
    udp_a, udp_b = UdpEcho(b"A"), UdpEcho(b"B")
    t, u = free_port(), free_port(socket.SOCK_DGRAM)
    path = tmp_path / "f.toml"

    def config(tcp: EchoServer, udp: UdpEcho) -> str:
        return forward(t, f"127.0.0.1:{tcp.port}") + forward(u, f"127.0.0.1:{udp.port}", proto="udp")

    path.write_text(config(tcp_a, udp_a))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one client address: one UDP session
    client.settimeout(5)
    try:
        with daemon(tmp_path, "-c", "f.toml") as proc:
            assert _greeting(t) == b"A"
            client.sendto(b"1", ("127.0.0.1", u))
            assert client.recv(100) == b"A1"
            reload_with(proc, path, config(tcp_b, udp_b))
            assert "2 re-pointed" in proc.log()
            assert _greeting(t) == b"B"
            client.sendto(b"2", ("127.0.0.1", u))  # the live session moved with the rule
            assert client.recv(100) == b"B2"
            assert udp_ask(u, b"3") == b"B3"  # and a new session starts there too
    finally:
        client.close()
        for server in (tcp_a, tcp_b, udp_a, udp_b):
            server.close()


@needs_engine
@pytest.mark.parametrize("policy", ["keep", "close"])
def test_live_connections_on_retarget_and_remove_follow_the_rule_option(tmp_path: Path, policy: str) -> None:
    old, new = EchoServer(greeting=b"O"), EchoServer(greeting=b"N")
    port, path = one_rule(tmp_path, old.port, on_retarget=policy, on_remove=policy)
    try:
        with daemon(tmp_path, "-c", "f.toml") as proc:
            live = _open_conversation(port, b"O")
            reload_with(proc, path, forward(port, f"127.0.0.1:{new.port}", on_retarget=policy, on_remove=policy))
            assert _greeting(port) == b"N"
            assert _still_talks(live) == (policy == "keep")
            live.close()
            live = _open_conversation(port, b"N")
            reload_with(proc, path, "# no rules\n")
            assert "1 removed" in proc.log()
            wait_until(lambda: not connects(port), what="the removed rule's listener to close")
            assert _still_talks(live) == (policy == "keep")
            live.close()
    finally:
        old.close()
        new.close()


@needs_engine
def test_reload_with_a_port_in_use_changes_nothing(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with socket.create_server(("127.0.0.1", 0)) as taken, daemon(tmp_path, "-c", "f.toml") as proc:
        busy = taken.getsockname()[1]
        write_atomic(path, forward(busy, f"127.0.0.1:{echo.port}"))  # the old rule goes, a busy one comes
        proc.wait_log("rejected, rules unchanged")
        assert f"(new: tcp 127.0.0.1:{busy} -> 127.0.0.1:{echo.port})" in proc.log()
        assert echo_roundtrip(port)


def _hash_all(sock: socket.socket, digest: hashlib._Hash, total: list[int]) -> None:
    while data := sock.recv(1 << 16):
        digest.update(data)
        total[0] += len(data)


def _write_one_of_three_ways(path: Path, text: str, i: int) -> None:
    """Rotate through an editor's rename, an in-place rewrite, and a symlink swap."""
    if i % 3 == 0:
        write_atomic(path, text)
    elif i % 3 == 1:
        path.write_text(text)
    else:
        version = path.parent.parent / f"v{i}.toml"
        version.write_text(text)
        swap_symlink(path, version)


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.recv(1)


def _open_conversation(port: int, greeting: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert s.recv(1) == greeting
    return s


def _still_talks(s: socket.socket) -> bool:
    """Does an established connection still echo? A reset or EOF says it was closed."""
    try:
        s.sendall(b"ping")
        got = b""
        while len(got) < 4:
            data = s.recv(4 - len(got))
            if not data:
                return False
            got += data
        return got == b"ping"
    except OSError:
        return False


@needs_engine
def test_changed_options_reconfigure_in_place_keeping_live_connections(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        live = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _still_talks(live)
        reload_with(proc, path, forward(port, f"127.0.0.1:{echo.port}", idle_timeout=600, splice="never"))
        assert "0 added, 0 removed, 0 re-pointed, 1 reconfigured" in proc.log()
        assert _still_talks(live)
        live.close()
        assert echo_roundtrip(port)


@needs_engine
def test_a_host_entry_given_a_new_ip_repoints_its_rules(tmp_path: Path) -> None:
    first = EchoServer(greeting=b"1")
    try:
        second = EchoServer("127.0.0.2", greeting=b"2", port=first.port)  # the same port, another address
    except OSError:
        first.close()
        pytest.skip("the port is taken on 127.0.0.2")
    port = free_port()
    path = tmp_path / "f.toml"
    rule = forward(port, f"db:{first.port}")
    path.write_text(rule + '[hosts.db]\nip = "127.0.0.1"\n')
    try:
        with daemon(tmp_path, "-c", "f.toml") as proc:
            assert _greeting(port) == b"1"
            reload_with(proc, path, rule + '[hosts.db]\nip = "127.0.0.2"\n')
            assert "name db is now 127.0.0.2 (1 rule(s))" in proc.log()
            assert _greeting(port) == b"2"
    finally:
        first.close()
        second.close()


@needs_engine
def test_an_8000_port_range_loads_and_survives_a_reload_of_another_rule(tmp_path: Path, echo: EchoServer) -> None:
    # Below the ephemeral range, so no client socket holds one of these ports.
    # Nor on the target range below the echo server's port: a range onto itself is refused.
    first = next((base for base in (20000, 12000, 4000)
                  if (base + 7999 < echo.port - 7999 or base > echo.port) and _bindable(base, 8000)), None)
    if first is None:
        pytest.skip("no 8000 free ports below the ephemeral range here")
    other, path = one_rule(tmp_path, echo.port)
    big = forward(f"127.0.0.1:{first}-{first + 7999}", f"127.0.0.1:{echo.port - 7999}-{echo.port}")
    path.write_text(big + forward(other, f"127.0.0.1:{echo.port}"))
    with daemon(tmp_path, "-c", "f.toml") as proc:
        assert echo_roundtrip(first + 7999)  # the last port of the range maps onto the echo server
        live = socket.create_connection(("127.0.0.1", first + 7999), timeout=5)
        reload_with(proc, path, big + forward(other, f"127.0.0.1:{echo.port}", splice="never"))
        assert "0 added, 0 removed, 0 re-pointed, 1 reconfigured, 1 unchanged" in proc.log()
        assert _still_talks(live)
        live.close()
        assert echo_roundtrip(first + 7999) and echo_roundtrip(other)


def _bindable(first: int, count: int) -> bool:
    for port in range(first, first + count):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do: TIME_WAIT is no clash
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@needs_engine
def test_start_time_sections_changed_by_a_reload_warn_and_rules_still_apply(tmp_path: Path, echo: EchoServer) -> None:
    port, path = one_rule(tmp_path, echo.port)
    with daemon(tmp_path, "-c", "f.toml") as proc:
        added = free_port()
        reload_with(proc, path, forward(port, f"127.0.0.1:{echo.port}") + forward(added, f"127.0.0.1:{echo.port}")
                    + "[engine]\nworkers = 7\n")
        assert "[engine], [control] and [sources] changes take effect at the next start" in proc.log()
        assert "1 added" in proc.log()
        assert echo_roundtrip(added)
