"""The lease socket on a real Unix socket, under asyncio and uvloop: replies come after the
change is live, hostile input changes nothing, many clients at once, and who may connect."""
from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfwd.lease_server import EVENT_MAX, SNAPSHOT_MAX, LeaseServer
from fastfwd.leases import NEIGHBOURS, STATE_FILE, Lease, LeaseChange, LeaseTable
from fastfwd.unixserver import Access, JsonLineServer, PeerCred, Request

from helpers_control import short_dir

A, B = "52:54:00:00:00:0a", "52:54:00:00:00:0b"
Run = Callable[[Awaitable[Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a coroutine to completion on a fresh loop of the given kind, bounded in time."""
    factory = None
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    def run(coro: Awaitable[Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, 120))
    return run


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


class Recorder:
    """The daemon's ``on_change`` stand-in: records each call, and can be held or made to fail."""

    def __init__(self) -> None:
        self.calls: list[list[LeaseChange]] = []
        self.finished = 0
        self.gate: asyncio.Event | None = None
        self.entered: asyncio.Event | None = None
        self.fail = False

    async def __call__(self, changes: list[LeaseChange]) -> None:
        self.calls.append(changes)
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("engine said no")
        self.finished += 1


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(*await asyncio.open_unix_connection(str(path), limit=1 << 20))

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        line = await self.reader.readline()
        assert line.endswith(b"\n"), f"no reply line: {line!r}"
        return json.loads(line)

    async def ask(self, message: Any) -> dict[str, Any]:
        await self.send_raw(json.dumps(message).encode() + b"\n")
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()


def event(kind: str, mac: str = A, ip: str = "10.0.0.1", hostname: str | None = "vm1") -> dict[str, Any]:
    return {"event": kind, "mac": mac, "ip": ip, "hostname": hostname}


def test_event_is_applied_and_the_reply_comes_after_on_change_returned(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()

    async def main() -> None:
        on_change.gate, on_change.entered = asyncio.Event(), asyncio.Event()
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            await c.send_raw(json.dumps(event("add")).encode() + b"\n")
            await on_change.entered.wait()
            pending = asyncio.ensure_future(c.reply())
            await asyncio.sleep(0.2)  # plenty for a reply that (wrongly) did not wait
            assert not pending.done(), "replied before the rules were live"
            assert table.for_mac(A) is not None  # the table already has it; on_change sees it
            on_change.gate.set()
            assert await pending == {"ok": True, "changed": 1}
            assert on_change.finished == 1
            await c.close()
    run(main())
    assert [(c.old, c.new.ip) for c in on_change.calls[0]] == [(None, "10.0.0.1")]


def test_events_in_order_on_one_connection(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            replies = [await c.ask(m) for m in (event("add"), event("old"), event("add", ip="10.0.0.2"),
                                                event("del", ip="10.0.0.1"), event("del", ip="10.0.0.2"))]
            await c.close()
            return replies
    replies = run(main())
    assert [r["changed"] for r in replies] == [1, 0, 1, 0, 1]
    assert len(on_change.calls) == 3 and len(table) == 0


def test_snapshot_reconciles_and_a_large_one_fits(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()
    many = [{"mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "ip": f"10.2.{i // 256}.{i % 256}",
             "hostname": f"guest-{i}"} for i in range(3000)]

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            assert (await c.ask(event("add", mac="52:54:00:ff:ff:ff", ip="10.9.9.9")))["ok"]
            big = await c.ask({"snapshot": many})
            small = await c.ask({"snapshot": many[:1]})
            await c.close()
            return big, small
    big, small = run(main())
    assert len(json.dumps({"snapshot": many})) > EVENT_MAX
    assert big == {"ok": True, "changed": 3001}
    assert small == {"ok": True, "changed": 2999}
    assert [(x.mac, x.ip, x.hostname) for x in table] == [("52:54:00:00:00:00", "10.2.0.0", "guest-0")]


BAD_MESSAGES: list[tuple[bytes, str]] = [
    (b"garbage\n", "not valid JSON"),
    (b"{\"event\": \"add\"\n", "not valid JSON"),
    (b"\xff\xfe{}\n", "not valid JSON"),
    (b"[" * 100000 + b"\n", "not valid JSON"),
    (b"[1, 2]\n", "expected a JSON object"),
    (b"\"add\"\n", "expected a JSON object"),
    (b"{}\n", "expected an 'event' or a 'snapshot' key"),
    (json.dumps(event("renew")).encode() + b"\n", "event: expected one of add, old, del"),
    (json.dumps(event(None)).encode() + b"\n", "event: expected a string"),  # type: ignore[arg-type]
    (json.dumps({**event("add"), "mac": 525400}).encode() + b"\n", "mac"),
    (json.dumps(event("add", mac="52:54:00:00:00")).encode() + b"\n", "not a MAC address"),
    (json.dumps(event("add", mac="52:54:00:00:00:0g")).encode() + b"\n", "not a MAC address"),
    (json.dumps(event("add", ip="10.0.0.256")).encode() + b"\n", "not an IPv4 or IPv6 address"),
    (json.dumps({**event("add"), "ip": ["10.0.0.1"]}).encode() + b"\n", "ip: expected a string"),
    # No machine holds these: a rule following the lease would forward to this host itself.
    *((json.dumps(event("add", ip=ip)).encode() + b"\n", f"ip: {ip!r} is not a machine's address")
      for ip in ("0.0.0.0", "::", "224.0.0.5", "ff02::1", "255.255.255.255")),
    (json.dumps(event("add", hostname="bad_name")).encode() + b"\n", "not a valid host name"),
    (json.dumps(event("add", hostname="x" * 64)).encode() + b"\n", "not a valid host name"),
    (json.dumps({**event("add"), "hostname": 7}).encode() + b"\n", "hostname: expected a string"),
    (json.dumps({**event("add"), "lease_time": 3600}).encode() + b"\n", "unknown key 'lease_time'"),
    (json.dumps({"event": "add", "ip": "10.0.0.1"}).encode() + b"\n", "missing 'mac'"),
    (json.dumps({"snapshot": {"mac": A}}).encode() + b"\n", "snapshot: expected a list"),
    (json.dumps({"snapshot": [], "event": "add"}).encode() + b"\n", "only the 'snapshot', 'family' and 'scope' keys"),
    (json.dumps({"snapshot": [], "family": 5}).encode() + b"\n", "family: expected 4 or 6, got 5"),
    (json.dumps({"snapshot": [], "family": True}).encode() + b"\n", "family: expected 4 or 6, got True"),
    (json.dumps({"snapshot": [], "family": 4.0}).encode() + b"\n", "family: expected 4 or 6, got 4.0"),
    (json.dumps({"snapshot": [{"mac": A, "ip": "fd00::5"}], "family": 4}).encode() + b"\n",
     "an IPv4 snapshot lists fd00::5"),
    (json.dumps({"snapshot": [{"mac": A, "ip": "10.0.0.5"}, {"mac": B, "ip": "nope"}]}).encode() + b"\n",
     "snapshot[1]: ip"),
    (json.dumps({"snapshot": [{"mac": A, "ip": "10.0.0.5"}, {"mac": A, "ip": "10.0.0.6"}]}).encode() + b"\n",
     "twice"),
    (b'{"event": "add", "mac": "%s", "ip": "10.0.0.5"' % A.encode() + b" " * EVENT_MAX + b"}\n",
     "event line too long"),
]


def test_bad_messages_get_an_error_change_nothing_and_the_connection_keeps_serving(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()
    table.apply_event("add", Lease(mac=B, ip="10.0.0.2"))

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            replies = []
            for raw, _ in BAD_MESSAGES:
                await c.send_raw(raw)
                replies.append(await c.reply())
            replies.append(await c.ask(event("add")))  # the same connection still works
            await c.close()
            return replies
    replies = run(main())
    for (raw, expected), reply in zip(BAD_MESSAGES, replies[:-1], strict=True):
        assert reply["ok"] is False and expected in reply["error"], (raw[:60], reply)
    assert replies[-1] == {"ok": True, "changed": 1}
    assert len(on_change.calls) == 1  # only the good event reached the daemon
    assert sorted(x.mac for x in table) == [A, B]


def test_oversized_line_gets_an_error_and_the_server_keeps_serving(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()

    async def main() -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            sender = asyncio.ensure_future(c.send_raw(b'{"snapshot": [' + b" " * (SNAPSHOT_MAX + 1024) + b"]}\n"))
            error = await c.reply()
            rest = await c.reader.read()  # then the server hangs up
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await c.close()
            other = await Client.connect(sockdir / "l.sock")
            ok = await other.ask(event("add"))
            await other.close()
            return error, rest, ok
    error, rest, ok = run(main())
    assert error == {"ok": False, "error": f"line too long (limit {SNAPSHOT_MAX} bytes)"}
    assert rest == b""
    assert ok == {"ok": True, "changed": 1} and len(table) == 1


def test_failing_on_change_gives_an_error_and_the_server_keeps_serving(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()
    on_change.fail = True

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            failed = await c.ask(event("add"))
            on_change.fail = False
            ok = await c.ask(event("add", ip="10.0.0.3"))
            await c.close()
            return failed, ok
    failed, ok = run(main())
    assert failed == {"ok": False, "error": "lease recorded, but re-pointing rules failed: engine said no"}
    assert ok == {"ok": True, "changed": 1}


def test_a_thousand_clients_at_once(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()
    n = 1000

    async def one(i: int) -> dict[str, Any]:
        c = await Client.connect(sockdir / "l.sock")
        try:
            if i % 4 == 3:  # a quarter of them are hostile
                await c.send_raw(b"\x00garbage" * 100 + b"\n")
            else:
                await c.send_raw(json.dumps(event("add", mac=f"52:54:00:01:{i // 256:02x}:{i % 256:02x}",
                                                  ip=f"10.3.{i // 256}.{i % 256}", hostname=f"g{i}")).encode() + b"\n")
            return await c.reply()
        finally:
            await c.close()

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            clients = [asyncio.ensure_future(one(i)) for i in range(n)]
            return await asyncio.gather(*clients)
    replies = run(main())
    good = [r for i, r in enumerate(replies) if i % 4 != 3]
    bad = [r for i, r in enumerate(replies) if i % 4 == 3]
    assert all(r == {"ok": True, "changed": 1} for r in good)
    assert all(r == {"ok": False, "error": "not valid JSON"} for r in bad)
    assert len(table) == len(good) == len(on_change.calls)


def test_changes_persist_through_the_server(run: Run, sockdir: Path) -> None:
    state = sockdir / "state" / STATE_FILE

    async def main(table: LeaseTable) -> None:
        async with LeaseServer(sockdir / "l.sock", table, Recorder()):
            c = await Client.connect(sockdir / "l.sock")
            assert (await c.ask(event("add")))["ok"]
            assert (await c.ask(event("add", mac=B, ip="fd00::b", hostname=None)))["ok"]
            await c.close()
    run(main(LeaseTable.restore(state)))
    restored = LeaseTable.restore(state)
    assert [(x.mac, x.ip, x.hostname) for x in restored] == [(A, "10.0.0.1", "vm1"), (B, "fd00::b", None)]


# -- the socket file ---------------------------------------------------------------------------
def test_socket_is_0600_by_default_and_removed_at_close(run: Run, sockdir: Path) -> None:
    path = sockdir / "l.sock"

    async def main() -> int:
        async with LeaseServer(path, LeaseTable(), Recorder()):
            return os.stat(path).st_mode
    mode = run(main())
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert not path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the socket another group")
def test_socket_with_a_group_is_0660_owned_by_it(run: Run, sockdir: Path) -> None:
    path = sockdir / "l.sock"
    gid = grp.getgrnam("nogroup").gr_gid

    async def main() -> os.stat_result:
        async with LeaseServer(path, LeaseTable(), Recorder(), access=Access.from_names(groups=["nogroup"])):
            return os.stat(path)
    st = run(main())
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid


def test_stale_socket_file_is_replaced(run: Run, sockdir: Path) -> None:
    path = sockdir / "l.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a crashed daemon leaves the file behind

    async def main() -> dict[str, Any]:
        async with LeaseServer(path, LeaseTable(), Recorder()):
            c = await Client.connect(path)
            reply = await c.ask(event("add"))
            await c.close()
            return reply
    assert run(main())["ok"] is True


def test_live_socket_and_non_socket_files_are_not_taken_over(run: Run, sockdir: Path) -> None:
    path = sockdir / "l.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(OSError, match="another process is listening"):
            run(LeaseServer(path, LeaseTable(), Recorder()).start())
    finally:
        live.close()
    path.unlink()
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        run(LeaseServer(path, LeaseTable(), Recorder()).start())
    assert path.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_a_directory_another_user_owns_is_not_used(run: Run, sockdir: Path) -> None:
    """Its owner could swap the socket for their own (say, a /tmp/fastfwd-UID made in advance)."""
    theirs = sockdir / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 65534, not by this user or root"):
        run(LeaseServer(theirs / "sub" / "l.sock", LeaseTable(), Recorder()).start())
    assert list(theirs.iterdir()) == []


def test_close_leaves_a_successors_socket_alone(run: Run, sockdir: Path) -> None:
    path = sockdir / "l.sock"

    async def main() -> None:
        first = LeaseServer(path, LeaseTable(), Recorder())
        await first.start()
        path.unlink()  # e.g. an operator removed it, and a new daemon bound the path
        successor = socket.socket(socket.AF_UNIX)
        successor.bind(str(path))
        try:
            await first.close()
            assert path.exists()
        finally:
            successor.close()
    run(main())


# -- who may connect ---------------------------------------------------------------------------
_AS_NOBODY = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
try:
    s.sendall(b'{"event": "add", "mac": "52:54:00:00:00:0a", "ip": "10.0.0.1"}\\n')
except BrokenPipeError:
    pass  # refused before the server read a byte; its reply is still there to read
print(s.makefile().readline().strip())
"""


#: An interpreter any user may run (the test's own may sit under /root).
_SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0 or _SYSTEM_PYTHON is None,
                    reason="needs root and a system python3 to run a client as another user")
def test_other_users_cannot_connect_and_are_refused_by_credentials(
        run: Run, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, table = sockdir / "l.sock", LeaseTable()
    nobody = pwd.getpwnam("nobody")
    os.chmod(sockdir, 0o755)

    def as_nobody(extra_groups: list[int] | None = None) -> str:
        proc = subprocess.run([_SYSTEM_PYTHON, "-c", _AS_NOBODY, str(path)], user=nobody.pw_uid,
                              group=nobody.pw_gid, extra_groups=extra_groups or [], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    users = grp.getgrnam("users").gr_gid

    async def main() -> list[str]:
        seen = []
        async with LeaseServer(path, table, Recorder()):
            seen.append(await asyncio.to_thread(as_nobody))
            os.chmod(path, 0o666)  # as if someone loosened the mode: credentials still refuse
            seen.append(await asyncio.to_thread(as_nobody))
        async with LeaseServer(path, table, Recorder(), access=Access.from_names(users=["nobody"])):
            os.chmod(path, 0o666)
            seen.append(await asyncio.to_thread(as_nobody))
        # A supplementary group of the peer's (SO_PEERGROUPS) lets it in through a 0660 socket.
        async with LeaseServer(path, table, Recorder(), access=Access.from_names(groups=["users"])):
            seen.append(await asyncio.to_thread(as_nobody, [users]))
            seen.append(await asyncio.to_thread(as_nobody))
        return seen
    by_mode, by_cred, by_uid, by_group, not_in_group = run(main())
    assert by_mode == not_in_group == "EACCES"
    assert json.loads(by_cred) == {"ok": False, "error": "permission denied: not an allowed user or group"}
    assert f"uid {nobody.pw_uid}" in caplog.text and "refused" in caplog.text
    assert json.loads(by_uid) == {"ok": True, "changed": 1}
    assert json.loads(by_group) == {"ok": True, "changed": 0}  # the same lease again: accepted, no change
    assert len(table) == 1


def test_access_rules() -> None:
    me = os.geteuid()
    access = Access(uids=frozenset({1001}), gids=frozenset({2001}), group=2002)
    allowed = [PeerCred(1, 0, 0), PeerCred(1, me, me), PeerCred(1, 1001, 5000), PeerCred(1, 5000, 2001),
               PeerCred(1, 5000, 5000, frozenset({7, 2001})), PeerCred(1, 5000, 2002)]
    refused = [PeerCred(1, 5000, 5000), PeerCred(1, 5000, 5000, frozenset({7, 8}))]
    assert [access.allows(p) for p in allowed] == [True] * len(allowed)
    assert [access.allows(p) for p in refused] == [False] * len(refused)
    assert (Access().mode, access.mode) == (0o600, 0o660)
    with pytest.raises(KeyError):
        Access.from_names(users=["no-such-user-here"])
    with pytest.raises(KeyError):
        Access.from_names(groups=["no-such-group-here"])


def test_silent_client_is_disconnected_after_the_idle_timeout(run: Run, sockdir: Path) -> None:
    async def main() -> bytes:
        async with LeaseServer(sockdir / "l.sock", LeaseTable(), Recorder(), idle_timeout=0.3):
            c = await Client.connect(sockdir / "l.sock")
            await c.send_raw(b'{"event": "add"')  # half a line, then nothing
            rest = await c.reader.read()  # returns only once the server hangs up
            await c.close()
            return rest
    assert run(main()) == b""


def test_a_client_that_stops_reading_its_replies_loses_its_slot_after_the_idle_timeout(
        run: Run, sockdir: Path) -> None:
    async def big_reply(request: Request) -> dict[str, Any]:
        return {"pad": "x" * 60_000}

    async def main() -> dict[str, Any]:
        async with JsonLineServer(sockdir / "s.sock", big_reply, name="test", max_clients=1, idle_timeout=0.3):
            stuck = await Client.connect(sockdir / "s.sock")
            await stuck.send_raw(b"{}\n" * 100)  # 6 MB of replies it never reads: the server's writes stall
            for _ in range(100):
                await asyncio.sleep(0.1)
                other = await Client.connect(sockdir / "s.sock")
                answer = await other.ask({})
                await other.close()
                if answer["ok"]:
                    break
            await stuck.close()
            return answer
    assert run(main())["ok"] is True


def test_each_lease_change_is_logged_and_a_large_snapshot_as_a_count(
        run: Run, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    many = [{"mac": f"52:54:00:00:01:{i:02x}", "ip": f"10.0.1.{i}"} for i in range(1, 31)]

    async def main() -> None:
        async with LeaseServer(sockdir / "l.sock", LeaseTable(), Recorder()):
            c = await Client.connect(sockdir / "l.sock")
            for message in (event("add"), event("add", ip="10.0.0.2"), event("del", ip="10.0.0.2"),
                            {"snapshot": many}):
                assert (await c.ask(message))["ok"]
            await c.close()
    with caplog.at_level(logging.INFO, logger="fastfwd.leases"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "fastfwd.leases"] == [
        f"lease {A}: 10.0.0.1 vm1", f"lease {A}: 10.0.0.2 vm1 (was 10.0.0.1 vm1)", f"lease {A}: 10.0.0.2 gone",
        "leases: 30 changed"]


def test_past_the_cap_the_longest_idle_client_makes_room_and_the_rest_are_served(run: Run, sockdir: Path) -> None:
    async def main() -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", LeaseTable(), Recorder(), max_clients=2):
            held = [await Client.connect(sockdir / "l.sock") for _ in range(2)]
            for c in held:  # each is being served (an answered request proves it), then idles
                assert (await c.ask({}))["ok"] is False
            extra = await Client.connect(sockdir / "l.sock")  # waits in the backlog, then is served
            answer = await extra.ask(event("add"))
            await extra.close()
            oldest = await held[0].reader.read()  # closed to make room
            still = await held[1].ask(event("del"))
            for c in held:
                await c.close()
            return answer, oldest, still
    answer, oldest, still = run(main())
    assert answer == {"ok": True, "changed": 1}
    assert oldest == b""
    assert still == {"ok": True, "changed": 1}


async def forwards(port: int) -> bool:
    """True if a connection to ``port`` echoes; False if it is refused (a pending rule)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        got = await reader.read()
        writer.close()
    except (ConnectionRefusedError, ConnectionResetError):
        return False
    assert got == b"ping"
    return True


def test_traffic_flows_as_soon_as_the_reply_arrives_and_stops_after_del(run: Run, sockdir: Path) -> None:
    """The whole contract with a real engine: pending -> active on the reply -> pending on del."""
    pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
    from fastfwd.forwarder import Forwarder
    from fastfwd.leases import HostEntry, name_updates, resolve_names
    from fastfwd.rules import Rule

    hosts = {"web": HostEntry(mac=A)}

    async def main() -> list[list[bool]]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()
        target = await asyncio.start_server(echo, "127.0.0.2", 0)
        port = target.sockets[0].getsockname()[1]
        table = LeaseTable()
        async with Forwarder(workers=1) as fw, target:
            names: dict[str, str] = {}

            async def on_change(changes: list[LeaseChange]) -> None:  # what the daemon does
                nonlocal names
                fresh = resolve_names(hosts, table)
                for name, ip in name_updates(names, fresh).items():
                    await fw.resolve(name, ip)
                names = fresh

            rules = [await fw.add(Rule.parse(f"0:web:{port}")), await fw.add(Rule.parse(f"0:vm7:{port}"))]
            seen = [[await forwards(r.port) for r in rules]]
            async with LeaseServer(sockdir / "l.sock", table, on_change):
                c = await Client.connect(sockdir / "l.sock")
                assert (await c.ask(event("add", ip="127.0.0.2", hostname="vm7")))["ok"]
                seen.append([await forwards(r.port) for r in rules])  # at once: the reply means live
                assert (await c.ask(event("del", ip="127.0.0.2")))["ok"]
                seen.append([await forwards(r.port) for r in rules])
                await c.close()
            return seen
    assert run(main()) == [[False, False], [True, True], [False, False]]


def test_a_shared_lock_holds_changes_while_another_writer_works(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()

    async def main() -> dict[str, Any]:
        lock = asyncio.Lock()
        async with LeaseServer(sockdir / "l.sock", table, on_change, lock=lock):
            c = await Client.connect(sockdir / "l.sock")
            async with lock:  # another source of leases is mid-change
                await c.send_raw(json.dumps(event("add")).encode() + b"\n")
                pending = asyncio.ensure_future(c.reply())
                await asyncio.sleep(0.2)  # plenty for a server that (wrongly) ignored the lock
                assert not pending.done() and len(table) == 0
            reply = await pending
            await c.close()
            return reply
    assert run(main()) == {"ok": True, "changed": 1}
    assert len(table) == 1


def test_many_large_snapshots_at_once_take_turns_and_all_apply(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()

    def snapshot(k: int) -> list[dict[str, Any]]:
        return [{"mac": f"52:54:00:{k:02x}:{i // 256:02x}:{i % 256:02x}", "ip": f"10.{k}.{i // 256}.{i % 256}"}
                for i in range(4000)]

    async def one(k: int) -> dict[str, Any]:
        c = await Client.connect(sockdir / "l.sock")
        try:
            return await c.ask({"snapshot": snapshot(k)})
        finally:
            await c.close()

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):  # 4 large-line slots
            return await asyncio.gather(*(one(k) for k in range(12)))
    replies = run(main())
    assert len(json.dumps({"snapshot": snapshot(0)})) > 2 * EVENT_MAX
    assert all(r["ok"] for r in replies) and len(on_change.calls) == 12
    last = {x.mac[:11] for x in table}
    assert len(last) == 1 and len(table) == 4000  # exactly one whole snapshot, the last applied


def test_a_del_without_a_mac_removes_the_dhcp_lease_holding_the_address(run: Run, sockdir: Path) -> None:
    table, on_change = LeaseTable(), Recorder()
    table.apply_event("add", Lease(mac=A, ip="fd00::1"))
    table.apply_event("add", Lease(mac=B, ip="fd00::2", source=NEIGHBOURS))

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, on_change):
            c = await Client.connect(sockdir / "l.sock")
            replies = [await c.ask({"event": "del", "ip": "fd00::1"}),
                       await c.ask({"event": "del", "ip": "fd00::2"}),   # not DHCP's to remove
                       await c.ask({"event": "del", "ip": "fd00::9"}),   # no one holds it
                       await c.ask({"event": "add", "ip": "fd00::3"}),
                       await c.ask({"event": "del", "ip": "fd00::3", "iaid": 1})]
            await c.close()
            return replies
    replies = run(main())
    assert replies[:3] == [{"ok": True, "changed": 1}, {"ok": True, "changed": 0}, {"ok": True, "changed": 0}]
    assert replies[3] == {"ok": False, "error": "missing 'mac'"}
    assert replies[4] == {"ok": False, "error": "unknown key 'iaid'"}
    assert [(x.mac, x.ip) for x in table] == [(B, "fd00::2")]
    assert [[(c.old.mac, c.new) for c in changes] for changes in on_change.calls] == [[(A, None)]]


def test_a_snapshot_replaces_the_leases_of_its_scope_and_a_message_without_one_is_unscoped(
        run: Run, sockdir: Path) -> None:
    """Several DHCP servers feed one socket, each naming itself by a scope. The daemon's own
    lease file (``[sources] dhcp_lease_file``), which it snapshots unscoped, names the unnamed
    server by its path, so the hook of the dnsmasq writing it agrees with that snapshot."""
    table = LeaseTable()
    own = str(sockdir / "br-a.leases")

    async def main() -> list[dict[str, Any]]:
        async with LeaseServer(sockdir / "l.sock", table, Recorder(), lease_file=own):
            c = await Client.connect(sockdir / "l.sock")
            replies = [await c.ask(message) for message in (
                {**event("add"), "scope": own},
                {**event("add", mac=B, ip="10.0.0.2", hostname="vm2"), "scope": "br-b"},
                {"snapshot": [], "family": 4},  # before scopes: the unnamed server's
                {"snapshot": [{"mac": "52:54:00:00:00:0c", "ip": "10.0.0.3"}], "scope": "br-b"},
                {**event("add"), "scope": 5},
                {"event": "del", "ip": "10.0.0.3"},  # not the unnamed server's lease
                {"snapshot": [], "scope": "br-c"},
            )]
            leases = [(x.mac, x.scope) for x in table]
            replies.append(await c.ask({"event": "del", "ip": "10.0.0.3", "scope": "br-b"}))
            await c.close()
            return [*replies, leases]
    *replies, leases = run(main())
    assert [r.get("changed") for r in replies] == [1, 1, 1, 2, None, 0, 0, 1]
    assert "scope" in replies[4]["error"]
    assert leases == [("52:54:00:00:00:0c", "br-b")] and len(table) == 0
