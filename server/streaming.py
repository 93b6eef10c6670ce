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

    `main` gets a task of its own on purpose. Run in the calling task instead, it would save
    ~10 µs per request, but every wake-up of a stream (one per relayed chunk) would resume the
    whole chain of coroutines above it (uvicorn, each middleware, the router, the endpoint),
    and at 200 paced streams that cost 3-6 µs per chunk more (`make bench`, `load`).
    """
    main_task = asyncio.ensure_future(main)
    tasks = [main_task, *(asyncio.ensure_future(w) for w in watchers)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            release_cancel(task)
    if main_task.cancelled():
        return False
    main_task.result()
    return True


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
