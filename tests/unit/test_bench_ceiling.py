"""The machine's ceiling the workers scenario prints beside its ratio (pure arithmetic)."""

from __future__ import annotations

import os

import pytest

from loadtests import harness


def test_the_ceiling_is_what_the_cores_allow_at_that_cost_over_one_worker() -> None:
    cores = len(os.sched_getaffinity(0))
    # Every process together spends 0.5 ms of CPU per stream: the cores run at most
    # cores / 0.5 ms streams a second; one worker managed a quarter of that.
    one = cores / 0.5e-3 / 4
    assert harness.ceiling(0.5, one) == 4.0


@pytest.mark.parametrize(("per_stream", "one"), [(None, 100.0), (0.0, 100.0), (0.5, None)])
def test_no_ceiling_without_its_figures(per_stream: float | None, one: float | None) -> None:
    assert harness.ceiling(per_stream, one) is None
