"""The machine's ceilings the workers scenario prints beside its ratio (pure arithmetic)."""

from __future__ import annotations

from loadtests import harness


def test_each_ceiling_takes_one_worker_s_rate_and_its_own_workers_costs() -> None:
    cores = harness.cores()
    # One worker: 0.5 ms of CPU in all per stream, and a quarter of what the cores could run
    # at that cost. Two workers: each stream costs 0.625 ms in all, and 1,234 streams/s (a
    # rate no ceiling may use).
    one = {"streams_per_s": cores / 0.5e-3 / 4, "all_cpu_per_stream_ms": 0.5}
    two = {"streams_per_s": 1234.0, "all_cpu_per_stream_ms": 0.625}
    assert harness.ceilings(one, two) == {"at_one_worker_costs": 4.0, "at_two_worker_costs": 3.2}


def test_no_ceiling_without_its_figures() -> None:
    one = {"streams_per_s": 100.0, "all_cpu_per_stream_ms": None}
    two = {"streams_per_s": 100.0, "all_cpu_per_stream_ms": 0.0}
    assert harness.ceilings(one, two) == {"at_one_worker_costs": None, "at_two_worker_costs": None}
    assert harness.ceilings({"all_cpu_per_stream_ms": 0.5}, {"all_cpu_per_stream_ms": 0.5}) == {
        "at_one_worker_costs": None,
        "at_two_worker_costs": None,
    }


def test_the_rows_name_each_ceiling() -> None:
    figures = {"ceiling": {"at_one_worker_costs": 1.73, "at_two_worker_costs": 1.56}}
    rows = harness.ceiling_rows(figures, "native load: ")
    assert [(r[0], r[2]) for r in rows] == [
        (
            "native load: the machine's ceiling, 2 workers vs 1, at one worker's CPU per stream",
            "1.73x",
        ),
        (
            "native load: the machine's ceiling, 2 workers vs 1, at two workers' CPU per stream",
            "1.56x",
        ),
    ]
