"""Compiles the bench's C programs into bench/build/ (when a source is newer): the load
generators in bench/load/ and the reference forwarder in bench/peers/."""
from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
#: Sources relative to bench/; each builds bench/build/<its name>. All include load/common.h.
SOURCES = ("load/bulk.c", "load/echo.c", "load/connrate.c", "load/pingpong.c", "load/udpflood.c",
           "load/idlehold.c", "peers/reference_fwd.c")


def build() -> Path:
    """Returns the directory holding the compiled tools."""
    BUILD.mkdir(exist_ok=True)
    header = HERE / "load" / "common.h"
    for source in SOURCES:
        src = HERE / source
        exe = BUILD / src.stem
        newest = max(src.stat().st_mtime, header.stat().st_mtime)
        if not exe.exists() or exe.stat().st_mtime < newest:
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(exe), str(src)],
                           check=True)
    return BUILD


def tool(name: str) -> str:
    return str(BUILD / name)
