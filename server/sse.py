"""Server-sent events: the framing every SSE dialect shares, and Chat Completions' chunk stream.

A Chat Completions stream is `chat.completion.chunk` events ending in `[DONE]`; other dialects
subclass `EventStreamSink` with their own events (see `server/dialects/`).

Headers go out with the first token (or the first heartbeat), so a failure before that is an
ordinary JSON error with its HTTP status; after it, a failure is an SSE event carrying the same
error object and no `[DONE]` follows, so it never looks like a clean completion.
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Send

from providers.errors import GatewayError
from providers.types import Delta, FinishReason, ReasoningDelta, RefusalDelta, TextDelta, Usage
from server import protocol
from server.chat import ERROR_WRITE_TIMEOUT, ChatService, Prepared, write_or_abort
from server.errors import ErrorEnvelope, error_body
from server.http import send_error
from server.stream_state import StreamState
from server.streaming import race, watch_disconnect

CACHE_HIT_HEADER = (b"x-tokenrelay-cache", b"hit")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EventStreamSink:
    """What every SSE dialect shares: headers with the first output (or the first keepalive),
    keepalives while nothing else is sent, and an error as a JSON response before the headers
    or as an event after them. A dialect's subclass frames the deltas and the finish itself
    (its `delta` is the per-chunk hot path: one `isinstance` chain, byte templates, one send)
    and says how its keepalive and its errors look.
    """

    __slots__ = ("_send", "_headers", "_state", "_loop", "started", "complete", "last_sent")

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]], state: StreamState) -> None:
        self._send = send
        self._headers = headers
        self._state = state
        self._loop = asyncio.get_running_loop()  # kept: each lookup costs a system call
        self.started = False
        self.complete = False
        self.last_sent = self._loop.time()

    async def _body(self, data: bytes) -> None:
        self.last_sent = self._loop.time()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _start(self) -> None:
        """Send the headers (with the first output, or a heartbeat while waiting for it)."""
        self.started = True
        headers = self._headers
        if self._state.cached:  # known before the first event, as the lookup comes first
            headers = [*headers, CACHE_HIT_HEADER]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    def keepalive_event(self) -> bytes:
        """What is sent to keep the stream alive: a comment line, unless the dialect says."""
        return protocol.SSE_HEARTBEAT

    async def end(self) -> None:
        """Close the response body."""
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def delta(self, event: Delta) -> None:
        raise NotImplementedError

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        raise NotImplementedError

    async def error(self, exc: GatewayError) -> None:
        if not self.started:
            self.started = self.complete = True
            await self.error_response(exc)
            return
        await self._body(self.error_event(exc))

    async def error_response(self, exc: GatewayError) -> None:
        """The whole response for a failure before the headers went out."""
        await send_error(self._send, exc, self._state.request_id)

    def error_event(self, exc: GatewayError) -> bytes:
        """The event for a failure after the headers went out."""
        return protocol.sse_event(ErrorEnvelope(error_body(exc, self._state.request_id)))

    async def keepalive(self, interval: float) -> None:
        """Send a heartbeat whenever nothing else was sent for `interval` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self.last_sent + interval - loop.time(), 0.0))
            if loop.time() - self.last_sent >= interval:
                if not self.started:
                    await self._start()
                await self._body(self.keepalive_event())


class SSESink(EventStreamSink):
    """Chat Completions: `chat.completion.chunk` events ending in `[DONE]`."""

    __slots__ = ("_framer", "_completion", "_usage")

    def __init__(
        self,
        send: Send,
        completion: tuple[str, int],
        headers: list[tuple[bytes, bytes]],
        include_usage: bool,
        state: StreamState,
    ) -> None:
        super().__init__(send, headers, state)
        self._framer: protocol.ChunkFramer | None = None
        self._completion = completion  # (id, created) shared by every chunk
        self._usage = include_usage

    async def _open(self) -> protocol.ChunkFramer:
        """At the first output: the framer for the model that answers (a fallback, maybe)."""
        if not self.started:
            await self._start()
        completion_id, created = self._completion
        self._framer = protocol.ChunkFramer(
            completion_id=completion_id, created=created, model=self._state.model
        )
        return self._framer

    async def delta(self, event: Delta) -> None:
        framer = self._framer
        opening = b""
        if framer is None:
            framer = await self._open()
            opening = framer.role()
        if isinstance(event, TextDelta):
            data = framer.content(event.text)
        elif isinstance(event, ReasoningDelta):
            data = framer.reasoning(event.text)
        elif isinstance(event, RefusalDelta):
            data = framer.refusal(event.text)
        else:
            data = framer.tool_call(event)
        await self._body(opening + data if opening else data)

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        framer = self._framer
        opening = b""
        if framer is None:
            framer = await self._open()
            opening = framer.role()
        data = opening + framer.finish(reason)
        if self._usage:
            data += framer.usage(usage)
        await self._body(data + protocol.SSE_DONE)


async def stream_sse(
    service: ChatService,
    prepared: Prepared,
    state: StreamState,
    receive: Receive,
    sink: EventStreamSink,
    *,
    heartbeat: float,
) -> None:
    """Serve one SSE stream until it ends or the client disconnects (which cancels it)."""
    finished = await race(
        service.run(prepared, sink, state),
        sink.keepalive(heartbeat),
        watch_disconnect(receive, state),
    )
    if finished and not sink.complete:
        await write_or_abort(sink.end(), state, ERROR_WRITE_TIMEOUT)
