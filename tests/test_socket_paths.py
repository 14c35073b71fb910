"""The daemon's sockets: a path whose way leads through another user's symlink is refused,
as one through another user's directory is (its owner could point it elsewhere, at a
socket of their own, once the daemon listens)."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd.unixclient import DaemonError, call
from fastfwd.unixserver import MAX_SOCKET_PATH, Access, bind_unix

from helpers_control import daemon, fastfwd, needs_engine, short_dir


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a symlink another user owns")
def test_a_symlink_another_user_owns_on_the_way_is_not_used(sockdir: Path) -> None:
    os.chmod(sockdir, 0o1777)  # like /tmp: anyone may add entries, and remove their own
    mine = sockdir / "mine"
    mine.mkdir()
    link = sockdir / "link"
    link.symlink_to(mine)
    os.lchown(link, 65534, 65534)  # their link to our directory: they may re-point it at will
    with pytest.raises(PermissionError, match="owned by uid 65534, not by this user or root"):
        bind_unix(link / "l.sock", Access())
    assert list(mine.iterdir()) == []


def test_a_path_of_the_longest_length_a_client_can_use_is_bound_however_short_its_last_name(
        sockdir: Path) -> None:
    # The file is made under a temporary name in the same directory first: that name must
    # not make a path that fits too long to bind.
    path = sockdir / ("d" * (MAX_SOCKET_PATH - len(str(sockdir)) - len("/c.sock") - 1)) / "c.sock"
    assert len(str(path)) == MAX_SOCKET_PATH
    with bind_unix(path, Access()) as listener, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        listener.setblocking(True)
        listener.accept()[0].close()
    assert sorted(os.listdir(path.parent)) == ["c.sock"]


def _as_user(uid: int, path: Path) -> str:
    """What ``uid`` (with its own group only) gets asking the socket at ``path`` for status:
    "ok", or the one-line error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # only socket calls here, then _exit: nothing of pytest's runs in the child
        try:
            os.setgroups([])
            os.setgid(pwd.getpwuid(uid).pw_gid)
            os.setuid(uid)
            try:
                reply = call(path, {"cmd": "status"} if path.name == "control.sock" else {"snapshot": []}, 20)
                outcome = "ok" if reply["ok"] else reply["error"]
            except DaemonError as exc:
                outcome = str(exc)
            os.write(write, outcome.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


@needs_engine
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_a_user_in_allow_users_may_use_both_sockets_and_another_user_may_not(sockdir: Path) -> None:
    os.chmod(sockdir, 0o755)
    (sockdir / "f.toml").write_text('[control]\nallow_users = ["nobody"]\n')
    nobody, other = pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("daemon").pw_uid
    with daemon(sockdir, "-c", "f.toml", "-t", "0:127.0.0.1:9") as proc:
        for path in (proc.control_socket, proc.lease_socket):
            assert _as_user(nobody, path) == "ok"
            assert _as_user(other, path).endswith("permission denied")


def test_a_socket_another_daemon_binds_while_this_one_starts_is_not_taken(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two daemons started at once on one path: both find it free, and the one that names its
    socket second must fail, not rename over the other's live socket."""
    path = sockdir / "c.sock"
    other = socket.socket(socket.AF_UNIX)
    chmod = os.chmod

    def other_daemon_binds_meanwhile(target: str, mode: int) -> None:
        chmod(target, mode)
        if not path.exists():  # after this one found the path free, before it names its socket
            other.bind(str(path))
            other.listen()
    monkeypatch.setattr(os, "chmod", other_daemon_binds_meanwhile)
    with other:
        with pytest.raises(OSError, match="another process is listening on this socket"):
            bind_unix(path, Access())
        monkeypatch.undo()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the other daemon's
            other.accept()[0].close()
        assert sorted(os.listdir(sockdir)) == ["c.sock"]



def test_a_name_that_keeps_filling_with_stale_sockets_is_given_up_on(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each stale socket found at the name is removed and the bind tried again, a bounded
    number of times: a program putting one there after every removal would hold the start
    for ever."""
    path = sockdir / "c.sock"
    link = os.link

    def a_stale_socket_appears_first(src: str, dst: Path) -> None:
        with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: what a crash leaves
            stale.bind(str(dst))
        link(src, dst)
    monkeypatch.setattr(os, "link", a_stale_socket_appears_first)
    with pytest.raises(FileExistsError, match="keeps being taken by another program"):
        bind_unix(path, Access())
    monkeypatch.undo()
    assert os.listdir(sockdir) == []  # the stale ones removed, no temporary left behind

@needs_engine
def test_a_killed_daemons_socket_is_replaced_and_a_live_ones_is_not(sockdir: Path) -> None:
    with daemon(sockdir, "-t", "0:127.0.0.1:9") as first:
        first.proc.kill()
        first.wait()
    assert first.control_socket.is_socket()  # left behind: nothing listens on it
    with daemon(sockdir, "-t", "0:127.0.0.1:9") as second:
        assert call(second.control_socket, {"cmd": "status"})["ok"]
        again = fastfwd("run", "--control-socket", str(second.control_socket), "--lease-socket",
                        str(sockdir / "other.sock"), "--state-dir", str(sockdir / "other"), "-t", "0:127.0.0.1:9")
        assert (again.returncode, again.stderr) == (
            1, f"fastfwd: {second.control_socket}: another process is listening on this socket\n")
        assert call(second.control_socket, {"cmd": "status"})["ok"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a mount namespace without /proc")
def test_a_socket_is_bound_where_proc_is_not_mounted(sockdir: Path) -> None:
    """A chroot or a minimal container may lack /proc: a path that fits sun_path as it is binds
    without it (the longest ones need /proc/self/fd)."""
    path = sockdir / "c.sock"
    code = ("from fastfwd.unixserver import Access, bind_unix; import sys; "
            "bind_unix(sys.argv[1], Access()); print('bound')")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           'umount -l /proc && exec "$0" -c "$1" "$2"', sys.executable, code, str(path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert (proc.returncode, proc.stdout) == (0, "bound\n"), proc.stderr
