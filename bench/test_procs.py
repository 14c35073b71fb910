"""Checks of the harness's process accounting (bench/procs.py): ``python -m pytest bench/``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .procs import Usage, pss_kib, tree

# Allocates and touches 64 MiB, forks a child that shares it, then waits.
FORKER = """
import os, sys, time
block = bytearray(64 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_memory_of_forked_children_counts_shared_pages_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        pids = tree([proc.pid])
        assert len(pids) == 2
        # Summed VmRSS counts the 64 MiB the child shares with its parent twice ...
        assert Usage.of(pids).rss_kib > 120 << 10
        # ... the anonymous PSS the idle figure measures counts it once.
        assert 60 << 10 < pss_kib(pids) < 80 << 10
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
