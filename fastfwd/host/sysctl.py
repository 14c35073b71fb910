"""Kernel settings through /proc/sys, which shows the network namespace of the process that reads it."""
from __future__ import annotations

from pathlib import Path


def _path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read(name: str) -> str:
    return _path(name).read_text().strip()


def write(name: str, value: str) -> None:
    _path(name).write_text(value + "\n")
