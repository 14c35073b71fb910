"""Watching the config file for changes that editors and deploy tools make.

Editors save by writing a temp file and renaming it over the original, and deploy tools swap
a symlink; neither shows up as a write to the file itself. So the file's directory is watched
(and the directory its symlink points into), and any event there counts only if the bytes the
path now leads to differ from the last ones seen. Events make a reload prompt; a re-check
every ``recheck_ms`` even without one catches what no event reported (a change made while the
watch was being moved to a symlink's new directory).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from watchfiles import awatch

from .config import content_digest

log = logging.getLogger("fastfwd")


def fingerprint(path: Path) -> str | None:
    """Digest of what ``path`` leads to now; None while it is missing or unreadable."""
    try:
        return content_digest(path.read_bytes())
    except OSError:
        return None


async def watch_config(path: Path, *, since: str | None = None, step_ms: int = 50,
                       recheck_ms: int = 1000) -> AsyncIterator[None]:
    """Yield once each time the content behind ``path`` changes. Runs until cancelled.

    ``since`` is the fingerprint of the content already in use (None: whatever the file
    holds now); a file that differs from it already yields at the first check."""
    last = since if since is not None else fingerprint(path)
    while True:
        dirs = _watched_dirs(path)
        stop = asyncio.Event()
        async for _ in awatch(*dirs, watch_filter=None, recursive=False, step=step_ms, stop_event=stop,
                              rust_timeout=recheck_ms, yield_on_timeout=True):
            now = fingerprint(path)
            if now != last:
                last = now
                if now is not None:
                    yield
            if _watched_dirs(path) != dirs:
                stop.set()  # the symlink now points into another directory: watch that one instead
                break


def _watched_dirs(path: Path) -> tuple[str, ...]:
    dirs = {str(path.absolute().parent), str(path.resolve().parent)}
    return tuple(sorted(d for d in dirs if Path(d).is_dir()))
