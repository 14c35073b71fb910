"""One daemon per state directory: two there would overwrite each other's ``leases.json`` and
restore each other's leases. A daemon holds an ``flock`` on the directory itself, not on a
file in it, so a failed start leaves nothing behind and a killed daemon's lock goes with it."""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .unixserver import make_dirs, remove_dirs

#: Times the directory is made and locked again when it was removed meanwhile (by a daemon
#: leaving it empty): more is something else removing it over and over.
_TRIES = 5


class StateDirLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        #: The directories made for it, removed again on release if left empty.
        self._made: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self) -> str | None:
        """Make the directory if missing and lock it: None once held, else why not (another
        process holds it). OSError if it cannot be made or opened."""
        for _ in range(_TRIES):
            self._made = make_dirs(self.path)
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _flock_holder(os.fstat(fd))
                os.close(fd)
                return f"state directory {self.path}: in use by another fastfwd daemon{f' (pid {pid})' if pid else ''}"
            except BaseException:
                os.close(fd)
                raise
            if os.fstat(fd).st_nlink:  # 0: removed after it was opened, by a daemon leaving it empty
                self._fd = fd
                return None
            os.close(fd)
        raise OSError(errno.ESTALE, f"{self.path} is removed again each time it is made")

    def release(self) -> None:
        """Unlock, removing the directories made for it if they are empty (while still
        locked: no other daemon can have it yet)."""
        if self._fd is None:
            return
        remove_dirs(self._made)
        os.close(self._fd)
        self._fd = None


def _flock_holder(st: os.stat_result) -> int | None:
    """The pid of the process holding a flock on the file ``st`` is of, as /proc/locks tells
    it (None where it does not: another pid namespace, a file system it numbers otherwise)."""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii") as locks:
            for line in locks:
                # "3: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a waiter's has "->" after "3:"
                fields = line.split()
                if fields[1:2] == ["FLOCK"] and fields[5:6] == [where]:
                    return int(fields[4]) or None
    except (OSError, ValueError):
        pass
    return None
