"""Compiles the C load generators in bench/load/ into bench/build/ (when a source is newer)."""
from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "load"
BUILD = HERE / "build"
TOOLS = ("bulk", "echo", "connrate", "pingpong", "udpflood", "idlehold")


def build() -> Path:
    """Returns the directory holding the compiled tools."""
    BUILD.mkdir(exist_ok=True)
    header = SOURCES / "common.h"
    for tool in TOOLS:
        src, exe = SOURCES / f"{tool}.c", BUILD / tool
        newest = max(src.stat().st_mtime, header.stat().st_mtime)
        if not exe.exists() or exe.stat().st_mtime < newest:
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(exe), str(src)],
                           check=True)
    return BUILD


def tool(name: str) -> str:
    return str(BUILD / name)
