"""Server-sent events: an OpenAI-compatible `chat.completion.chunk` stream ending in `[DONE]`.

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
from server.chat import ERROR_WRITE_TIMEOUT, ChatService, Prepared, StreamState, write_or_abort
from server.errors import ErrorEnvelope, error_body
from server.http import send_error
from server.streaming import race, watch_disconnect

CACHE_HIT_HEADER = (b"x-tokenrelay-cache", b"hit")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class SSESink:
    """Writes one stream as SSE; tracks whether headers went out and when anything was last sent."""

    __slots__ = (
        "_send",
        "_framer",
        "_completion",
        "_headers",
        "_usage",
        "_state",
        "started",
        "complete",
        "last_sent",
    )

    def __init__(
        self,
        send: Send,
        completion: tuple[str, int],
        headers: list[tuple[bytes, bytes]],
        include_usage: bool,
        state: StreamState,
    ) -> None:
        self._send = send
        self._framer: protocol.ChunkFramer | None = None
        self._completion = completion  # (id, created) shared by every chunk
        self._headers = headers
        self._usage = include_usage
        self._state = state
        self.started = False
        self.complete = False
        self.last_sent = asyncio.get_running_loop().time()

    async def _body(self, data: bytes) -> None:
        self.last_sent = asyncio.get_running_loop().time()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _start(self) -> None:
        """Send the headers (with the first output, or a heartbeat while waiting for it)."""
        self.started = True
        headers = self._headers
        if self._state.cached:  # known before the first event, as the lookup comes first
            headers = [*headers, CACHE_HIT_HEADER]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

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

    async def error(self, exc: GatewayError) -> None:
        if not self.started:
            self.started = self.complete = True
            await send_error(self._send, exc, self._state.request_id)
            return
        body = ErrorEnvelope(error_body(exc, self._state.request_id))
        await self._body(protocol.sse_event(body))

    async def keepalive(self, interval: float) -> None:
        """Send a comment whenever nothing else was sent for `interval` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(self.last_sent + interval - loop.time(), 0.0))
            if loop.time() - self.last_sent >= interval:
                if not self.started:
                    await self._start()
                await self._body(protocol.SSE_HEARTBEAT)


async def stream_sse(
    service: ChatService,
    prepared: Prepared,
    state: StreamState,
    receive: Receive,
    send: Send,
    *,
    completion_id: str,
    created: int,
    heartbeat: float,
    extra_headers: list[tuple[bytes, bytes]],
) -> None:
    """Serve one SSE stream until it ends or the client disconnects (which cancels it)."""
    sink = SSESink(
        send,
        (completion_id, created),
        SSE_HEADERS + extra_headers,
        prepared.body.include_usage,
        state,
    )
    finished = await race(
        service.run(prepared, sink, state),
        sink.keepalive(heartbeat),
        watch_disconnect(receive, state),
    )
    if finished and not sink.complete:
        end = send({"type": "http.response.body", "body": b"", "more_body": False})
        await write_or_abort(end, state, ERROR_WRITE_TIMEOUT)
