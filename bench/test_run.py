"""Checks of the harness's run order (bench/run.py): ``python -m pytest bench/``."""
from __future__ import annotations

import pytest

from .run import round_order


@pytest.mark.parametrize("n", range(3, 15))
@pytest.mark.parametrize("rounds", [3, 5])
def test_no_subject_always_follows_the_same_one(n: int, rounds: int) -> None:
    subjects = list(range(n))
    sequence = [s for r in range(rounds) for s in round_order(subjects, r)]
    assert all(sorted(round_order(subjects, r)) == subjects for r in range(rounds))
    before: dict[int, set[int]] = {s: set() for s in subjects}
    for prev, cur in zip(sequence, sequence[1:]):
        before[cur].add(prev)
    assert all(len(p) >= 2 for p in before.values()), before
