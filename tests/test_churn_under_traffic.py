"""A short soak: TCP streams and UDP exchanges verified byte for byte at the far end while a few
hundred applies and resolves churn the rule table (rules added, removed, re-pointed,
reconfigured, ports moved between rules in one apply, names going pending and back). Apply
and resolve post their commands in one engine batch; a configuration freed or a listener
closed too early, or a command lost, shows here as wrong bytes, a failure where no change
allowed one, counters that differ from what the clients moved, or fds left behind."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from netutil import run_async

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"
_spec = importlib.util.spec_from_file_location("fastfwd_soak", _SCRIPT)
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = soak      # dataclasses look their module up by name
_spec.loader.exec_module(soak)


def test_traffic_survives_hundreds_of_applies_and_everything_is_given_back() -> None:
    report = run_async(soak.soak_inprocess(8.0, pause=0.02, tcp_threads=3, udp_threads=2, max_size=1 << 18,
                                           log_every=3600), timeout=90)
    print(report.summary())
    assert report.defects == []
    assert report.applies >= 200 and report.resolves >= 50
    # The checks saw traffic of every kind, not a run where nothing got through.
    assert report.outcomes["tcp ok"] >= 100 and report.outcomes["udp ok"] >= 20
    assert report.outcomes["tcp refused as wanted"] > 0
    assert report.fds[0] == report.fds[1] and report.threads[0] == report.threads[1]
