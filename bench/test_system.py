"""Checks of the settings a run changes (bench/system.py): ``python -m pytest bench/``."""
from __future__ import annotations

from pathlib import Path

import pytest

from . import system


@pytest.fixture
def setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file standing in for a /proc/sys setting, and a private record of changes."""
    monkeypatch.setattr(system, "CHANGED", tmp_path / "changed.json")
    path = tmp_path / "ip_local_port_range"
    path.write_text("32768\t60999\n")
    return path


def test_a_run_that_ends_puts_the_setting_back_and_leaves_no_record(setting: Path) -> None:
    with system.sysctl(setting, "50000 61999"):
        assert setting.read_text() == "50000 61999\n"
    assert setting.read_text() == "32768\t60999\n"
    assert not system.CHANGED.exists()
    assert system.restore_left_changed() == []


def test_the_next_run_restores_what_a_killed_run_left_changed(setting: Path) -> None:
    # A run killed inside the figure: its context never exits (held, or collecting it would).
    killed = system.sysctl(setting, "50000 61999")
    killed.__enter__()
    assert setting.read_text() == "50000 61999\n"
    assert system.restore_left_changed() == ["ip_local_port_range: 50000 61999 -> 32768 60999"]
    assert setting.read_text() == "32768\t60999\n"
    assert not system.CHANGED.exists()
