"""The helpers that keep streams out of reference cycles, and the collector's pause metric."""

from __future__ import annotations

import asyncio
import gc

from server.errors import forget_tracebacks
from server.metrics import GC_PAUSE, watch_gc
from server.streaming import release_cancel


def _timed(generation: int) -> float:
    for metric in GC_PAUSE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels["generation"] == str(generation):
                return sample.value
    return 0.0


def test_each_collection_is_timed_once_however_often_the_watch_is_installed() -> None:
    watch_gc()
    watch_gc()
    before = _timed(2)
    gc.collect()
    assert _timed(2) == before + 1


def test_forget_tracebacks_clears_the_whole_chain_and_survives_loops() -> None:
    def fail() -> None:
        try:
            raise KeyError("first")
        except KeyError as inner:
            raise ValueError("second") from inner

    try:
        fail()
    except ValueError as exc:
        error = exc
    cause = error.__cause__
    assert error.__traceback__ is not None and cause is not None
    assert cause.__traceback__ is not None
    cause.__context__ = error  # a loop in the chain
    forget_tracebacks(error)
    assert error.__traceback__ is None
    assert cause.__traceback__ is None
    assert str(error) == "second"  # only the tracebacks go


async def test_a_cancelled_task_lets_go_of_its_cancelled_error() -> None:
    task = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    def holds_an_error() -> bool:
        return any(isinstance(r, BaseException) for r in gc.get_referents(task))

    assert holds_an_error()
    release_cancel(task)
    assert not holds_an_error()
    assert task.cancelled()
    release_cancel(task)  # again: nothing left to release, nothing raised


async def test_release_cancel_leaves_finished_tasks_alone() -> None:
    async def boom() -> None:
        raise RuntimeError("kept")

    task = asyncio.ensure_future(boom())
    await asyncio.gather(task, return_exceptions=True)
    release_cancel(task)
    assert isinstance(task.exception(), RuntimeError)
