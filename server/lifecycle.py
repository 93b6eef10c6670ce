"""Process lifecycle: the streams in flight, and a graceful drain when the process is told to stop.

On SIGTERM the gateway, in this order: fails readiness and refuses new streams at once, stops
accepting connections, lets the streams in flight finish for up to `shutdown_grace` seconds,
ends those still running with a `server_shutting_down` error (their upstreams closed), and
then hands over to uvicorn's own shutdown, which closes the remaining sockets (WebSockets with
1012) and exits. SIGINT (Ctrl-C) goes straight to uvicorn, for quick local stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from server.stream_state import StreamState

log = logging.getLogger("tokenrelay.lifecycle")

Handler = Callable[[int, FrameType | None], Any]


class Lifecycle:
    """The streams in flight and whether the process is draining."""

    def __init__(self, grace: float = 20.0) -> None:
        self.grace = grace
        self.draining = False
        self.streams: set[StreamState] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, state: StreamState) -> None:
        self.streams.add(state)
        self._idle.clear()

    def remove(self, state: StreamState) -> None:
        self.streams.discard(state)
        if not self.streams:
            self._idle.set()

    async def drain(self) -> None:
        """Refuse new streams, wait up to the grace period, then end the rest with an error."""
        self.draining = True
        log.info(
            "draining", extra={"fields": {"streams": len(self.streams), "grace_s": self.grace}}
        )
        try:
            await asyncio.wait_for(self._idle.wait(), self.grace)
            return
        except TimeoutError:
            pass
        log.info("ending streams still running", extra={"fields": {"streams": len(self.streams)}})
        for state in list(self.streams):
            state.interrupt()
        try:  # a moment for their error frames to go out
            await asyncio.wait_for(self._idle.wait(), 2.0)
        except TimeoutError:
            pass

    def install_signal_handler(self, on_listeners: Callable[[], None] | None = None) -> None:
        """Drain on SIGTERM before uvicorn's own handler runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGTERM)

        def hand_over(sig: int, frame: FrameType | None) -> None:
            if callable(previous):
                previous(sig, frame)

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop now
                hand_over(sig, frame)
                return
            self.draining = True
            stop_accepting(previous)

            def start() -> None:
                task = loop.create_task(self.drain())
                task.add_done_callback(lambda _: hand_over(sig, frame))
                _keep.add(task)
                task.add_done_callback(_keep.discard)

            loop.call_soon_threadsafe(start)

        signal.signal(signal.SIGTERM, on_sigterm)


_keep: set[asyncio.Task[None]] = set()


def stop_accepting(handler: object) -> None:
    """Close uvicorn's listening sockets, found through its signal handler's server."""
    server = getattr(handler, "__self__", None)
    for listener in getattr(server, "servers", ()):
        listener.close()
