"""Watching the config file for changes that editors and deploy tools make.

Editors save by writing a temp file and renaming it over the original, and deploy tools swap
a symlink; neither shows up as a write to the file itself. So the file's directory is watched
(and the directory its symlink points into), and any event there counts only if the bytes the
path now leads to differ from the last ones seen. Events make a reload prompt; a re-check
every ``recheck_ms`` even without one catches what no event reported (a change made while the
watch was being moved to a symlink's new directory).

Content is handed over only once its writer has finished. A tool that rewrites the file in
place (truncates it, then writes, maybe in several writes with pauses: ``cat > FILE``, an
editor that keeps the inode, a deploy script) would otherwise be caught half way, and a
truncated file that is still valid TOML, or an empty one (no rules), would be applied. So a
change waits until no process has the file open for writing and two reads ``settle_ms``
apart agree; while it keeps changing, the wait goes on and the later content wins.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from watchfiles import awatch
from watchfiles._rust_notify import WatchfilesRustInternalError

from .config import content_digest

log = logging.getLogger("fastfwd")
# The library logs every change it sees in the watched directories at INFO: a log file kept
# beside the config would log its own writes, for good.
logging.getLogger("watchfiles").setLevel(logging.WARNING)

#: Milliseconds the content must stay the same to count as finished. Where the kernel cannot
#: tell whether the file is open for writing (see _open_for_writing), this alone decides, and
#: a writer pausing longer between two writes is caught half way.
SETTLE_MS = 150
#: Errors that are a shortage (of fds, memory, inotify watches), not the file's doing: the
#: watch waits them out.
_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC)


def fingerprint(path: Path) -> str | None:
    """Digest of what ``path`` leads to now; None while it is missing, unreadable or not a
    regular file."""
    return _look(path, probe=False)[1]


async def watch_config(path: Path, *, since: str | None = None, step_ms: int = 50,
                       recheck_ms: int = 1000, settle_ms: int = SETTLE_MS) -> AsyncIterator[str]:
    """Yield the fingerprint of the content behind ``path`` each time it changes, once its
    writer has finished. Runs until cancelled.

    ``since`` is the fingerprint of the content already in use (None: whatever the file
    holds now); a file that differs from it already yields at the first check."""
    last = since if since is not None else fingerprint(path)
    short = False
    while True:
        dirs = _watched_dirs(path)
        stop = asyncio.Event()
        try:
            async for _ in awatch(*dirs, watch_filter=None, recursive=False, step=step_ms, stop_event=stop,
                                  rust_timeout=recheck_ms, yield_on_timeout=True):
                short = False
                if fingerprint(path) != last:
                    now = await _finished(path, settle_ms)
                    if now != last:
                        last = now
                        if now is None:  # nothing to load: say why the rules do not change
                            what = "is not a readable file" if path.exists() else "is gone"
                            log.warning("%s %s: the running rules stay until it is back", path, what)
                        else:
                            yield now
                            # The consumer may read the file again (the daemon does) and find a
                            # new write begun, applying nothing: what that write ends with is
                            # then handed over too, even if it is this content again.
                            if fingerprint(path) != last:
                                last = None
                if _watched_dirs(path) != dirs:
                    stop.set()  # the symlink now points into another directory: watch that one instead
                    break
        except FileNotFoundError:
            # A directory was deleted between being chosen and being watched (a symlinked
            # directory swapped, the old one removed at once): choose the directories again.
            await asyncio.sleep(step_ms / 1000)
        except (OSError, WatchfilesRustInternalError) as exc:
            if _errno_of(exc) not in _SHORT_OF:
                raise
            # Forwarding took every fd, say: a change made meanwhile is seen once it is over.
            if not short:
                log.warning("cannot watch %s: %s; trying again every %d ms", path, exc, recheck_ms)
                short = True
            await asyncio.sleep(recheck_ms / 1000)


def _errno_of(exc: Exception) -> int | None:
    """The errno behind ``exc``: the watcher library gives it only in its message."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


async def _finished(path: Path, settle_ms: int) -> str | None:
    """The fingerprint of what ``path`` holds once its writer is done: no process has it open
    for writing, and it read the same ``settle_ms`` ago. None: missing, unreadable or not a
    regular file."""
    _, seen = _look(path)
    told = False
    while True:
        await asyncio.sleep(settle_ms / 1000)
        writing, now = _look(path)
        if not writing and now == seen:
            return now
        if writing and not told:  # a writer may hold it for long (cat > FILE): say why nothing happens
            log.info("%s is open for writing: reloading once it is closed", path)
            told = True
        seen = now


def _look(path: Path, probe: bool = True) -> tuple[bool, str | None]:
    """(whether some process has ``path`` open for writing, its fingerprint), from one open;
    ``probe`` False: the first is False, unasked."""
    try:
        # O_NONBLOCK: a file under another process's write lease refuses at once instead of
        # blocking the event loop until that lease is broken, and a FIFO opens without
        # waiting for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _SHORT_OF:
            raise
        return exc.errno == errno.EWOULDBLOCK, None
    try:
        # Only a regular file: a FIFO (`-c <(...)`) was read once, at start, and a read now
        # would take another writer's bytes or wait for them. Asked before open(), which
        # refuses a directory (and would leave the fd open).
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False, None
        with open(fd, "rb", closefd=False) as file:
            return probe and _open_for_writing(fd), content_digest(file.read())
    except OSError:
        return False, None
    finally:
        os.close(fd)


def _open_for_writing(fd: int) -> bool:
    """Does any process have this file open for writing? The kernel refuses a read lease
    (EAGAIN) exactly then; granted, it is dropped at once. Where leases are not allowed (not
    the file's owner and no CAP_LEASE: EACCES; a filesystem without them: EINVAL) the answer
    is no, and the settle time alone decides."""
    # A writer opening the file while the lease is held makes the kernel signal the holder,
    # SIGIO by default, whose default action kills the process; SIGURG is ignored by default.
    fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _watched_dirs(path: Path) -> tuple[str, ...]:
    dirs = {str(path.absolute().parent), str(path.resolve().parent)}
    return tuple(sorted(d for d in dirs if Path(d).is_dir()))
