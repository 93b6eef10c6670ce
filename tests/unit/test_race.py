"""server.streaming.race: a stream's producer beside its watchers; the first to finish wins."""

from __future__ import annotations

import asyncio

import pytest

from server.streaming import race


async def _forever(log: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        log.append(f"{name} stopped")


async def test_main_finishing_first_stops_the_watchers() -> None:
    log: list[str] = []

    async def main() -> None:
        await asyncio.sleep(0)
        log.append("main done")

    assert await race(main(), _forever(log, "watcher"), _forever(log, "other")) is True
    assert log == ["main done", "watcher stopped", "other stopped"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_watcher_finishing_first_cancels_main_and_nothing_else() -> None:
    log: list[str] = []
    go = asyncio.Event()

    async def watcher() -> None:
        await go.wait()

    async def main() -> None:
        go.set()
        await _forever(log, "main")

    assert await race(main(), watcher(), _forever(log, "keepalive")) is False
    assert log == ["main stopped", "keepalive stopped"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the task was not left with a pending cancel


async def test_a_failing_watcher_counts_as_finishing() -> None:
    log: list[str] = []

    async def watcher() -> None:
        raise OSError("the socket broke")

    assert await race(_forever(log, "main"), watcher()) is False
    assert log == ["main stopped"]


async def test_an_error_from_main_propagates_and_stops_the_watchers() -> None:
    log: list[str] = []

    async def main() -> None:
        await asyncio.sleep(0)
        raise ValueError("upstream broke")

    with pytest.raises(ValueError, match="upstream broke"):
        await race(main(), _forever(log, "watcher"))
    assert log == ["watcher stopped"]


async def test_a_cancel_from_outside_propagates() -> None:
    log: list[str] = []
    outer = asyncio.ensure_future(race(_forever(log, "main"), _forever(log, "watcher")))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(log) == ["main stopped", "watcher stopped"]


async def test_a_timeout_around_the_race_is_a_timeout() -> None:
    log: list[str] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await race(_forever(log, "main"), _forever(log, "watcher"))
    assert sorted(log) == ["main stopped", "watcher stopped"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_main_that_swallows_the_cancel_leaves_no_cancel_behind() -> None:
    go = asyncio.Event()

    async def watcher() -> None:
        await go.wait()

    async def main() -> None:
        go.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass  # finishes its own way

    assert await race(main(), watcher()) is True
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)
