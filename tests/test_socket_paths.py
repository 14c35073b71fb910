"""The daemon's sockets: a path whose way leads through another user's symlink is refused,
as one through another user's directory is (its owner could point it elsewhere, at a
socket of their own, once the daemon listens)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfwd.unixserver import Access, bind_unix

from helpers_control import short_dir


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
