"""Running a stream's producer beside what watches it: a watcher that fires cancels the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from starlette.types import Receive, Send

from server.guard import gone_watch
from server.stream_state import StreamState


async def wait_disconnect(receive: Receive) -> None:
    """Return when the HTTP client goes away (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def watch_disconnect(
    receive: Receive, state: StreamState | None, ended: Callable[[], bool] | None = None
) -> None:
    """Return when the HTTP client goes away, noting that as the stream's cancel (unless
    `state` is None). Once the response has ended (`ended()`), `receive` says
    `http.disconnect` whatever the client does: that is no disconnect, and this waits to be
    cancelled instead (the work after a stream's last event is the stream's own)."""
    await wait_disconnect(receive)
    if ended is not None and ended():
        await asyncio.get_running_loop().create_future()
    if state is not None:
        state.cancel("client_disconnected")


class Watcher(Protocol):
    """Something that runs beside a stream (see `race`): given the stream's stop when it
    starts, closed (and waited for) when the stream is over."""

    def start(self, stop: Callable[[], None]) -> None: ...

    async def close(self) -> None: ...


class TaskWatcher:
    """A coroutine in a task of its own; its end, or its failure, stops the stream."""

    __slots__ = ("_coro", "_task")

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = coro
        self._task: asyncio.Future[None] | None = None

    def start(self, stop: Callable[[], None]) -> None:
        self._task = asyncio.ensure_future(self._coro)
        self._task.add_done_callback(lambda _: stop())

    async def close(self) -> None:
        task = self._task
        if task is None:
            self._coro.close()
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        release_cancel(task)


class Disconnect:
    """Stops the stream when the HTTP client goes away, noting that as its cancel (unless
    `state` is None): through the server's watch where it has one (`server.guard`: a
    callback, no task, and none once the response is complete), else a task waiting on
    `receive` for `http.disconnect`, which `ended` (the response has ended: an event stream
    that sent its last event) tells from a client that left."""

    __slots__ = ("_watch", "_receive", "_state", "_ended", "_fallback", "_unwatch")

    def __init__(
        self,
        send: Send,
        receive: Receive,
        state: StreamState | None,
        ended: Callable[[], bool] | None = None,
    ) -> None:
        self._watch = gone_watch(send)
        self._receive = receive
        self._state = state
        self._ended = ended
        self._fallback: TaskWatcher | None = None
        self._unwatch: Callable[[], None] | None = None

    def start(self, stop: Callable[[], None]) -> None:
        state = self._state
        if self._watch is None:
            self._fallback = TaskWatcher(watch_disconnect(self._receive, state, self._ended))
            self._fallback.start(stop)
            return

        def gone() -> None:
            if state is not None:
                state.cancel("client_disconnected")
            stop()

        self._unwatch = self._watch(gone)

    async def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        elif self._fallback is not None:
            await self._fallback.close()


async def race(main: Coroutine[Any, Any, None], *watchers: Watcher) -> bool:
    """Run `main` with its watchers; when a watcher stops it, cancel `main` and wait for it.

    Returns True when `main` finished on its own. An exception from `main` propagates; a
    watcher stopping it (a client disconnect) cancels `main`, which closes its upstream. The
    watchers are closed, and waited for, before this returns, however `main` ended.

    `main` gets a task of its own on purpose. Run in the calling task instead, every wake-up
    of the stream would resume the whole chain of coroutines above it (uvicorn, each
    middleware, the router, the endpoint): measured, that costs more per request (~50 µs for
    one-token streams) than the task saves, even now that most chunks are written from the
    upstream's read callback. Watchers are callbacks where they can be (a timer, the server's
    disconnect hook), not tasks: two tasks beside each stream cost ~25 µs per request.
    """
    main_task = asyncio.ensure_future(main)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not main_task.done():
            stopped = True
            main_task.cancel()

    started: list[Watcher] = []
    try:
        for watcher in watchers:
            watcher.start(stop)
            started.append(watcher)
        try:
            await main_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not stopped or (task is not None and task.cancelling()):
                raise  # this request itself was cancelled (the server is stopping)
    finally:
        if not main_task.done():
            main_task.cancel()
            await asyncio.gather(main_task, return_exceptions=True)
        for watcher in started:
            await watcher.close()
        release_cancel(main_task)
    return not main_task.cancelled()


def release_cancel(task: asyncio.Future[Any]) -> None:
    """Let a cancelled task drop the `CancelledError` that ended it.

    The task keeps that error until someone asks for it, and the error's traceback keeps every
    frame it unwound, one of which holds the task again (its timeout scope does): a reference
    cycle per cancelled stream, with the stream's objects in it, left to the cycle collector.
    Asking for the error hands it over, and the task forgets it.
    """
    if task.cancelled():
        try:
            task.exception()
        except asyncio.CancelledError:
            pass
