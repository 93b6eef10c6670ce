"""server.streaming.race: a stream's producer beside its watchers; a watcher that fires stops it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from server.guard import DirectSend
from server.stream_state import StreamState
from server.streaming import Disconnect, TaskWatcher, race


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

    assert (
        await race(
            main(), TaskWatcher(_forever(log, "watcher")), TaskWatcher(_forever(log, "other"))
        )
        is True
    )
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

    assert (
        await race(main(), TaskWatcher(watcher()), TaskWatcher(_forever(log, "keepalive"))) is False
    )
    assert log == ["main stopped", "keepalive stopped"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # the task was not left with a pending cancel


async def test_a_failing_watcher_counts_as_finishing() -> None:
    log: list[str] = []

    async def watcher() -> None:
        raise OSError("the socket broke")

    assert await race(_forever(log, "main"), TaskWatcher(watcher())) is False
    assert log == ["main stopped"]


async def test_an_error_from_main_propagates_and_stops_the_watchers() -> None:
    log: list[str] = []

    async def main() -> None:
        await asyncio.sleep(0)
        raise ValueError("upstream broke")

    with pytest.raises(ValueError, match="upstream broke"):
        await race(main(), TaskWatcher(_forever(log, "watcher")))
    assert log == ["watcher stopped"]


async def test_a_cancel_from_outside_propagates() -> None:
    log: list[str] = []
    outer = asyncio.ensure_future(
        race(_forever(log, "main"), TaskWatcher(_forever(log, "watcher")))
    )
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(log) == ["main stopped", "watcher stopped"]


async def test_a_timeout_around_the_race_is_a_timeout() -> None:
    log: list[str] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await race(_forever(log, "main"), TaskWatcher(_forever(log, "watcher")))
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

    assert await race(main(), TaskWatcher(watcher())) is True
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)


class _Fires:
    """A watcher with no task: stops the stream from a timer, as the server's hooks do."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    def start(self, stop: Callable[[], None]) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.after, stop)

    async def close(self) -> None:
        assert self._timer is not None
        self._timer.cancel()
        self.closed = True


async def test_a_callback_watcher_cancels_main_and_is_closed() -> None:
    log: list[str] = []
    fires = _Fires(0.01)
    assert await race(_forever(log, "main"), fires) is False
    assert log == ["main stopped"] and fires.closed
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_callback_watcher_that_never_fires_is_closed() -> None:
    fires = _Fires(60)

    async def main() -> None:
        await asyncio.sleep(0)

    assert await race(main(), fires) is True
    assert fires.closed


def _state() -> StreamState:
    return StreamState("req-1", 0.0, "sse")


async def test_disconnect_without_a_server_watch_waits_on_receive() -> None:
    """Another server (no `server.guard`): a task reads `receive` until `http.disconnect`."""
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent")

    log: list[str] = []
    state = _state()
    asyncio.get_running_loop().call_later(0.01, gone.set)
    assert await race(_forever(log, "main"), Disconnect(send, receive, state)) is False
    assert log == ["main stopped"] and state.cancel_cause == "client_disconnected"


async def test_after_the_response_ended_receive_saying_disconnect_is_not_a_disconnect() -> None:
    """Another server: once the response is complete, `receive` answers `http.disconnect`
    at once; the work a stream does after its last event (a cache write) runs on."""
    ended = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await ended.wait()  # uvicorn wakes `receive` when the response completes
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing is sent")

    log: list[str] = []

    async def main() -> None:
        ended.set()  # the last event went out with the end of the body
        await asyncio.sleep(0.02)  # work after it
        log.append("main done")

    state = _state()
    assert await race(main(), Disconnect(send, receive, state, ended.is_set)) is True
    assert log == ["main done"] and state.cancel_cause is None


class _Watched:
    """A server's side with a watch for the client leaving (as `server.guard` gives)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []
        self.unwatched = 0
        self.send = DirectSend(self._raw, self._raw, None, self._watch)

    def _watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return self._unwatch

    def _unwatch(self) -> None:
        self.unwatched += 1

    async def _raw(self, message: Any) -> None:
        return None

    @staticmethod
    async def receive() -> dict[str, Any]:
        raise AssertionError("the watch replaces reading `receive`")


async def test_disconnect_through_the_server_watch_needs_no_task() -> None:
    """`server.guard`'s watch: a callback called when the connection is lost, unwatched after."""
    server = _Watched()
    log: list[str] = []
    state = _state()
    tasks_before = len(asyncio.all_tasks())

    async def main() -> None:
        assert len(asyncio.all_tasks()) == tasks_before + 1  # its own, and no watcher's
        asyncio.get_running_loop().call_soon(server.callbacks[0])  # the client goes
        await _forever(log, "main")

    assert await race(main(), Disconnect(server.send, server.receive, state)) is False
    assert log == ["main stopped"] and state.cancel_cause == "client_disconnected"
    assert server.unwatched == 1


async def test_a_finished_stream_unwatches_and_notes_no_cancel() -> None:
    server = _Watched()

    async def main() -> None:
        await asyncio.sleep(0)

    state = _state()
    assert await race(main(), Disconnect(server.send, server.receive, state)) is True
    assert server.unwatched == 1 and state.cancel_cause is None
