"""Running a stream's producer beside the tasks that watch it: first to finish cancels the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.types import Receive

from server.stream_state import StreamState


async def wait_disconnect(receive: Receive) -> None:
    """Return when the HTTP client goes away (the request body has already been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def watch_disconnect(receive: Receive, state: StreamState) -> None:
    """Return when the HTTP client goes away, noting that as the stream's cancel."""
    await wait_disconnect(receive)
    state.cancel("client_disconnected")


async def race(main: Coroutine[Any, Any, None], *watchers: Coroutine[Any, Any, None]) -> bool:
    """Run `main` with its watchers; when any of them finishes, cancel the others and wait for them.

    Returns True when `main` finished first. An exception from `main` propagates; a watcher
    finishing first (a client disconnect) cancels `main`, which closes its upstream. A watcher's
    own failure counts as it finishing.

    `main` runs in the calling task, not in one of its own: a stream's every chunk is relayed
    by this task, and a task per stream would cost a task switch and a wake-up per request.
    The watchers are tasks; the first to finish cancels this task, and that cancel is taken
    back once it has stopped `main`. A cancel from elsewhere (a timeout around the race, the
    server stopping) propagates as usual.
    """
    current = asyncio.current_task()
    if current is None:  # pragma: no cover - always called from a task
        raise RuntimeError("race() must run in a task")
    fired = False  # a watcher finished and cancelled this task
    racing = True  # `main` is still running: a watcher finishing now stops it

    def stop(_: asyncio.Future[None]) -> None:
        nonlocal fired
        if racing and not fired:
            fired = True
            current.cancel()

    tasks = [asyncio.ensure_future(watcher) for watcher in watchers]
    for task in tasks:
        task.add_done_callback(stop)
    finished = True
    try:
        try:
            await main
        except asyncio.CancelledError:
            racing = False
            if not fired or current.uncancel() > 0:
                raise  # cancelled from elsewhere, too
            finished = False
        except BaseException:
            racing = False
            if fired:  # the cancel stopped `main`, which failed on its way out
                current.uncancel()
            raise
        else:
            racing = False
            if fired:  # `main` swallowed the watcher's cancel and returned
                current.uncancel()
    finally:
        racing = False
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return finished
