"""Checks of the harness's figures (bench/figures.py) with stand-in load generators:
``python -m pytest bench/``."""
from __future__ import annotations

from pathlib import Path

import pytest

from . import figures
from .figures import BY_NAME, QUICK
from .subjects import BY_NAME as SUBJECTS
from .subjects import Running


class Unsampled(Running):
    """A running subject that must not be sampled."""

    def usage(self):  # type: ignore[override]
        raise AssertionError("the forwarder was sampled inside a figure that does not report its CPU")


def stand_in(tmp_path: Path, result: str) -> str:
    script = tmp_path / "generator"
    script.write_text(f"#!/bin/sh\necho window\necho '{result}'\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("figure", ["rtt_tcp", "rtt_udp"])
def test_round_trip_window_holds_no_forwarder_sampling(figure: str, tmp_path: Path, monkeypatch) -> None:
    generator = stand_in(tmp_path, '{"n": 1, "p50_us": 1.0, "p99_us": 2.0, "lost": 0}')
    monkeypatch.setattr(figures, "tool", lambda _name: generator)
    running = Unsampled([], tmp_path)
    metrics = BY_NAME[figure].measure(QUICK, SUBJECTS["cref"], running)
    assert metrics["p99_us"] == 2.0
