"""The JSON-lines Unix socket server under the lease and control sockets.

What both sockets share lives here once: the socket file (restrictive mode, a stale file
replaced only when nothing answers on it), who may connect (SO_PEERCRED, checked before a
byte is read), and the framing: one JSON object per line in, exactly one JSON reply line
out, with bounded buffers so hostile or broken clients cannot grow the daemon's memory.

Memory bound: a connection's stream buffer pauses reading at ``2 * line_limit`` (plus one
socket read); lines longer than ``line_limit`` (up to ``max_line``) are collected, parsed and
answered only while holding one of a few *large-line slots*, so the total stays near
``max_clients * (2 * line_limit + one read) + large_slots * (max_line + its parsed form)``.

Fds: at most ``max_clients`` connections are open (fewer if the process may open few files);
more wait in the listen backlog, which holds none of ours. When all are taken, the connection
that has waited longest on its client (for a line, or to take a reply), if that is at least
``EVICT_AFTER``, is closed to make room, so idle clients cannot keep a DHCP hook out; one
that just connected is never taken for idle. One fd is kept in reserve: when forwarding has
taken every other, a client is still served on it.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import json
import logging
import math
import os
import pwd
import resource
import select
import socket
import stat
import struct
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fastfwd.unixserver")

#: The longest path a client can connect to: sun_path's 108 bytes, less the closing NUL.
MAX_SOCKET_PATH = 107

#: Connections not yet accepted wait in the kernel (which caps this at net.core.somaxconn), so
#: a burst of hooks is served in turn instead of refused.
BACKLOG = 4096

#: How long a connection must have waited on its client before a full house closes it to make
#: room: a hook sends its line at once, so in a burst of hooks none is taken for idle.
EVICT_AFTER = 1.0

#: A line holding a large-line slot must keep coming: a client that sends no further
#: ``line_limit`` bytes of it for this long loses the slot and its connection, so a few
#: stalled clients cannot keep every snapshot waiting for the whole idle timeout.
LARGE_LINE_STALL = 5.0

#: Linux >= 4.13: the peer's supplementary groups, fixed at connect time (not in Python's socket module).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


class RequestError(ValueError):
    """A request the server refuses; its message goes back as ``{"ok": false, "error": ...}``."""


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end, as the kernel recorded it when the peer connected."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Access:
    """Who may use a socket: root and the daemon's own user always; then ``uids``, and members
    (primary or supplementary) of ``gids``. The socket file is 0600, or 0660 owned by
    ``group`` when one is set, and ``uids`` are given access by a POSIX ACL, so other users
    cannot even connect."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    group: int | None = None

    @classmethod
    def from_names(cls, users: Iterable[str | int] = (), groups: Iterable[str | int] = ()) -> Access:
        """Resolve user and group names (or ids); the first group owns the socket file.
        Raises UnknownName for a user or group this host does not have."""
        uids = frozenset(_id(u, "user", lambda name: pwd.getpwnam(name).pw_uid) for u in users)
        gids = [_id(g, "group", lambda name: grp.getgrnam(name).gr_gid) for g in groups]
        return cls(uids=uids, gids=frozenset(gids), group=gids[0] if gids else None)

    @property
    def mode(self) -> int:
        return 0o660 if self.group is not None else 0o600

    def allows(self, peer: PeerCred) -> bool:
        if peer.uid in (0, os.geteuid()) or peer.uid in self.uids:
            return True
        return bool(({peer.gid} | peer.groups) & (self.gids | ({self.group} - {None})))


#: Root and the daemon's own user only. Access is frozen, so one instance is every default.
OWNER_ONLY = Access()


class UnknownName(KeyError):
    """A user or group name this host does not have; ``kind`` says which."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"no {kind} {name!r} on this host")
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0])


def _id(value: str | int, kind: str, lookup: Callable[[str], int]) -> int:
    if isinstance(value, int):
        return value
    try:
        return lookup(value)
    except KeyError:
        raise UnknownName(kind, value) from None


def peer_credentials(sock: socket.socket) -> PeerCred:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        # 1024 bytes is the most Python's getsockopt takes: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:  # an older kernel, or more groups than that: the primary group is all we know
        groups = frozenset()
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=groups)


def bind_unix(path: str | os.PathLike[str], access: Access, backlog: int = 1024,
              made: list[Path] | None = None) -> socket.socket:
    """A listening Unix socket at ``path`` with ``access``'s mode and group from the start.

    Missing directories on the way are made; those made are added to ``made`` (deepest
    first) for :func:`remove_dirs` once the socket is closed. If this fails, it removes them
    itself: a failed start leaves nothing behind.

    It is bound under a temporary name in a private directory, given its mode, then linked
    into place, so no one ever sees it with a wider mode. An existing socket file is replaced
    only if nothing accepts on it (a stale file from a crash); a live one, or a file that is
    not a socket, raises instead of being taken over.
    """
    path = Path(path)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        # Bound under a short temporary name and renamed, it would listen where no one can connect.
        raise OSError(errno.ENAMETOOLONG, f"too long for a Unix socket ({len(os.fsencode(path))} bytes, "
                      f"at most {MAX_SOCKET_PATH})", str(path))
    _check_owners(path.parent)
    new_dirs = make_dirs(path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".ffbind-") as private:
            tmp = os.path.join(private, "s")
            if len(os.fsencode(tmp)) <= MAX_SOCKET_PATH:
                sock.bind(tmp)
            else:
                # Through the directory's fd: its path is longer than the final one, which may
                # take all of sun_path. (Only then: it needs /proc, which a chroot may lack.)
                where = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    sock.bind(f"/proc/self/fd/{where}/s")
                finally:
                    os.close(where)
            if access.group is not None:
                os.chown(tmp, -1, access.group)
            os.chmod(tmp, access.mode)
            if access.uids:
                _grant_users(tmp, access)
            sock.listen(backlog)  # before it has its name: no client ever finds it refusing
            _take_name(tmp, path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        remove_dirs(new_dirs)
        raise
    if made is not None:
        made.extend(new_dirs)
    return sock


#: POSIX ACL entries as the kernel takes them in the ``system.posix_acl_access`` attribute
#: (<linux/posix_acl_xattr.h>): a version, then (tag, permissions, id) each, sorted by tag.
_ACL_VERSION, _ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 2, 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_RW, _ACL_NO_ID = 6, 0xFFFFFFFF


def _grant_users(path: str, access: Access) -> None:
    """Let ``access.uids`` connect to the socket file: connecting takes write permission on
    it, which its mode can give one group but not a list of users."""
    group = _ACL_RW if access.group is not None else 0
    entries = [(_ACL_USER_OBJ, _ACL_RW, _ACL_NO_ID), *((_ACL_USER, _ACL_RW, uid) for uid in sorted(access.uids)),
               (_ACL_GROUP_OBJ, group, _ACL_NO_ID), (_ACL_MASK, _ACL_RW, _ACL_NO_ID), (_ACL_OTHER, 0, _ACL_NO_ID)]
    acl = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *entry) for entry in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", acl)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        raise OSError(exc.errno, "allow_users needs POSIX ACLs, which this file system does not support "
                      "(list the users' group in allow_groups instead)") from None


def make_dirs(directory: Path) -> list[Path]:
    """Make ``directory`` and its missing parents; the ones made, deepest first. A file in
    its place is left for the caller's use of it to report (as "Not a directory")."""
    made = [d for d in (directory, *directory.parents) if not os.path.lexists(d)]
    if made:
        directory.mkdir(parents=True, exist_ok=True)
    return made


def remove_dirs(dirs: Iterable[Path]) -> None:
    """Remove the directories ``make_dirs`` made (deepest first), as far as they are empty:
    one still holding another socket or the lease state stays."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _check_owners(directory: Path) -> None:
    """Refuse a directory (or an ancestor) that another user owns: they could rename our
    socket away and put their own in its place, say in a ``/tmp/fastfwd-UID`` made before
    the daemon first ran."""
    for d in (directory.absolute(), *directory.absolute().parents):
        try:
            # A symlink's own owner counts too: in /tmp, say, they may replace it with one
            # pointing at a directory of theirs, whoever owns where it points now.
            owner = d.lstat().st_uid
            if owner in (0, os.geteuid()):
                owner = d.stat().st_uid
        except FileNotFoundError:
            continue  # made by us below
        if owner not in (0, os.geteuid()):
            raise PermissionError(errno.EPERM, f"{d} is owned by uid {owner}, not by this user or root; "
                                  "not using it")


def _take_name(tmp: str, path: Path) -> None:
    """Give the socket at ``tmp`` the name ``path``, replacing only a stale socket there.
    link() fails on a name that exists where rename() would replace it, so a socket another
    daemon names meanwhile, after the check, is never taken from it."""
    for _ in range(_NAME_TRIES):
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            _check_replaceable(path)  # raises unless it is a stale socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    # Stale sockets keep appearing there: another program is racing for the name.
    raise FileExistsError(errno.EEXIST, f"{path} keeps being taken by another program while binding")


#: Stale sockets removed from a name before binding gives up on it.
_NAME_TRIES = 5


def _check_replaceable(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: nothing listens there
    except OSError as exc:
        raise OSError(exc.errno, f"cannot tell whether it is in use ({exc.strerror})", str(path)) from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on this socket", str(path))


@dataclass(frozen=True)
class Request:
    """One decoded request line."""

    message: Any
    size: int
    peer: PeerCred


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


class LineTooLong(Exception):
    """A request line over the server's ``max_line``."""


class RefusedJson(ValueError):
    """Text that Python's json reads but that is not standard JSON, or means two things."""


def _no_constant(name: str) -> Any:
    raise RefusedJson(f"not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: Python reads it as inf, which no setting can take
        raise RefusedJson(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):  # other parsers keep the first of duplicates, Python the last
        key = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise RefusedJson(f"duplicate key {key!r:.60} in an object")
    return doc


def parse_json(line: bytes) -> Any:
    """Strict JSON: NaN, Infinity, numbers beyond a double and duplicate keys raise RefusedJson;
    anything else that is not JSON, ValueError (or RecursionError, nested too deep)."""
    return json.loads(line, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select(): the daemon's fds may pass FD_SETSIZE
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _fd_share() -> int:
    """Connections one socket may hold: an eighth of the open-file limit, so that the lease
    and control sockets together leave most fds to forwarding."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, soft // 8) if soft != resource.RLIM_INFINITY else 1 << 20


class JsonLineServer:
    """Serves ``handler`` on a Unix socket: one JSON reply per JSON request line.

    The handler returns the reply object (``"ok": true`` is added) or raises RequestError
    for an error reply. A refused peer gets one error reply and is disconnected. A line over
    ``max_line`` gets an error reply and the connection is closed (the stream cannot be
    trusted to resynchronise). Each line must arrive, and each reply be read, within
    ``idle_timeout`` seconds. Past ``max_clients`` open connections, see the module's notes.
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler, *, name: str,
                 access: Access = Access(), line_limit: int = 64 << 10, max_line: int = 64 << 10,
                 large_slots: int = 4, max_clients: int = 128, idle_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.name = name
        self._handler = handler
        self._access = access
        self._line_limit = line_limit
        self._max_line = max(max_line, line_limit)
        self._large = asyncio.Semaphore(large_slots)
        self._max_clients = max_clients
        self._idle_timeout = idle_timeout
        self._sock: socket.socket | None = None
        self._listening = False
        self._retry: asyncio.TimerHandle | None = None  # after a failed accept
        #: An fd kept aside, so a client still gets in when forwarding has taken all the others.
        self._reserve: int | None = None
        self._failing = False  # accepting failed (said once in the log) until one needs no reserve
        self._recheck: asyncio.TimerHandle | None = None  # when a waiting connection may be closed
        self._inode: int | None = None
        #: The directories made for the socket file, removed with it.
        self._made: list[Path] = []
        #: The connections holding a slot, and of those, the ones waiting on their client
        #: (oldest first) and the ones whose task has not yet taken over their socket.
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[asyncio.Task[None], float] = {}
        self._unstarted: dict[asyncio.Task[None], socket.socket] = {}

    async def start(self) -> None:
        self._sock = bind_unix(self.path, self._access, BACKLOG, made=self._made)
        self._inode = os.stat(self.path).st_ino
        self._max_clients = min(self._max_clients, _fd_share())
        self._reserve = _spare_fd()
        self._resume()
        users = f", users {', '.join(map(str, sorted(self._access.uids)))} by ACL" if self._access.uids else ""
        log.info("%s socket listening on %s (mode %o%s)", self.name, self.path, self._access.mode, users)

    async def close(self) -> None:
        if self._sock is None:
            return
        self._pause()
        for timer in (self._retry, self._recheck):
            if timer is not None:
                timer.cancel()
        self._sock.close()
        self._sock = None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._unstarted.values():  # cancelled before they ran
            sock.close()
        self._unstarted.clear()
        try:  # remove the socket file only if it is still ours, not a successor's
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        remove_dirs(self._made)
        self._made.clear()

    async def __aenter__(self) -> JsonLineServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- accepting --------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self._sock is not None and not self._listening and self._retry is None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)
            self._listening = True

    def _pause(self) -> None:
        if self._sock is not None and self._listening:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._listening = False

    def _accept(self) -> None:
        """Take the connections waiting in the backlog while there is a slot for them, or one
        can be freed; otherwise stop looking until one is (``_resume``)."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            if len(self._tasks) >= self._max_clients:
                if not _readable(self._sock):
                    return  # no one else is waiting: no one is closed for nothing
                if not self._evict():
                    break
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                out_of_fds = exc.errno in (errno.EMFILE, errno.ENFILE)
                if not self._failing:   # once, not at every retry
                    self._failing = True
                    if out_of_fds:
                        log.warning("%s socket: out of file descriptors: clients are served one at a time on "
                                    "the one kept in reserve", self.name)
                    else:
                        log.warning("%s socket: cannot accept a connection: %s", self.name, exc.strerror)
                if out_of_fds and self._reserve is not None:
                    os.close(self._reserve)
                    self._reserve = None
                    continue
                # Out of memory, or the reserve is in use: again in a second, not in a busy loop.
                self._pause()
                self._retry = loop.call_later(1.0, self._retry_accept)
                return
            if self._reserve is not None:
                self._failing = False
            conn.setblocking(False)
            task = loop.create_task(self._connection(conn))
            self._tasks.add(task)
            self._unstarted[task] = conn
            task.add_done_callback(self._ended)
        self._pause()

    def _retry_accept(self) -> None:
        self._retry = None
        self._resume()

    def _look_again(self) -> None:
        self._recheck = None
        self._resume()

    def _evict(self) -> bool:
        """Free the slot of the connection that has waited longest on its client, if that was
        ``EVICT_AFTER`` at least; False if none has (then look again once one has)."""
        task, since = next(iter(self._waiting.items()), (None, 0.0))
        if task is None:
            return False
        loop = asyncio.get_running_loop()
        wait = since + EVICT_AFTER - loop.time()
        if wait > 0:
            if self._recheck is None:
                self._recheck = loop.call_later(wait, self._look_again)
            return False
        del self._waiting[task]
        self._tasks.discard(task)  # its slot is free now; the task closes its socket as it ends
        task.cancel()
        return True

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._reserve is None and self._sock is not None:
            self._reserve = _spare_fd()  # the fd the connection held is free again, unless taken
        self._tasks.discard(task)
        self._waiting.pop(task, None)
        self._resume()

    def _set_waiting(self, task: asyncio.Task[None], waiting: bool) -> None:
        self._waiting.pop(task, None)
        if waiting:
            self._waiting[task] = asyncio.get_running_loop().time()  # at the end: the newest to wait
            self._resume()  # a full house may have one to make room with

    # -- conversing --------------------------------------------------------------------------------
    async def _connection(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        del self._unstarted[task]
        try:
            peer = peer_credentials(conn)
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=self._line_limit)
        except OSError:
            conn.close()
            return  # gone before it could be served
        except BaseException:
            conn.close()
            raise
        try:
            await self._converse(reader, writer, peer, task)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away or stalled: nothing to answer
        except Exception:  # a bug: this connection ends, the socket serves on
            log.exception("%s socket: connection failed", self.name)
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerCred,
                        task: asyncio.Task[None]) -> None:
        if not self._access.allows(peer):
            log.warning("%s socket: refused pid %d (uid %d, gid %d): not an allowed user or group",
                        self.name, peer.pid, peer.uid, peer.gid)
            await self._reply(writer, {"ok": False, "error": "permission denied: not an allowed user or group"})
            return
        while True:
            async with contextlib.AsyncExitStack() as large:
                self._set_waiting(task, True)
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        line = await self._read_line(reader, large)
                except LineTooLong:
                    await self._reply(writer, {"ok": False, "error": f"line too long (limit {self._max_line} bytes)"})
                    return
                finally:
                    self._set_waiting(task, False)
                if not line:
                    return
                if not line.strip():
                    continue
                reply = await self._answer(line, peer)
                del line  # a large one's memory goes with its slot
            self._set_waiting(task, True)
            await self._reply(writer, reply)
            self._set_waiting(task, False)

    async def _read_line(self, reader: asyncio.StreamReader, large: contextlib.AsyncExitStack) -> bytes:
        """The next line ('' at EOF); one cut short by EOF still counts as a line. A line over
        ``line_limit`` enters a large-line slot into ``large``, for the caller to hold until
        the line is answered."""
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            if self._max_line <= self._line_limit:
                raise LineTooLong from None
            consumed = exc.consumed
        await large.enter_async_context(self._large)
        buf = bytearray()
        while True:
            if len(buf) + consumed > self._max_line:
                raise LineTooLong
            buf += await reader.readexactly(consumed)
            try:
                async with asyncio.timeout(LARGE_LINE_STALL):
                    chunk = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                chunk = exc.partial
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
                continue
            if len(buf) + len(chunk) > self._max_line:
                raise LineTooLong
            return bytes(buf + chunk)

    async def _reply(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        """One reply line. A peer that does not read its replies has ``idle_timeout`` to take
        this one, as a peer that does not send has for its next line; otherwise it would hold
        its slot for good."""
        writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        async with asyncio.timeout(self._idle_timeout):
            await writer.drain()

    async def _answer(self, line: bytes, peer: PeerCred) -> dict[str, Any]:
        try:
            message = parse_json(line)
        except RefusedJson as exc:
            return {"ok": False, "error": str(exc)}
        except (ValueError, RecursionError):
            return {"ok": False, "error": "not valid JSON"}
        try:
            reply = await self._handler(Request(message=message, size=len(line), peer=peer))
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug or an engine failure must not take the socket down
            log.exception("%s socket: request failed", self.name)
            return {"ok": False, "error": f"internal error: {exc}"}
        return {"ok": True, **reply}
