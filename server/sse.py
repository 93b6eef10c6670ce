"""Server-sent events: the framing every SSE dialect shares, and Chat Completions' chunk stream.

A Chat Completions stream is `chat.completion.chunk` events ending in `[DONE]`; other dialects
subclass `EventStreamSink` with their own events (see `server/dialects/`).

Headers go out with the first token (or the first heartbeat), so a failure before that is an
ordinary JSON error with its HTTP status; after it, a failure is an SSE event carrying the same
error object and no `[DONE]` follows, so it never looks like a clean completion.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Receive, Send

from providers.errors import GatewayError
from providers.types import Delta, FinishReason, ReasoningDelta, RefusalDelta, TextDelta, Usage
from server import protocol
from server.chat import ERROR_WRITE_TIMEOUT, ChatService, Prepared, write_or_abort
from server.errors import ErrorBody, ErrorEnvelope, error_body
from server.guard import direct_write
from server.http import send_error, send_error_body
from server.journal import Done, Head
from server.resume import Follower, Streams, Tee, replay
from server.stream_state import StreamState
from server.streaming import Disconnect, race, release_cancel, watch_disconnect

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

    __slots__ = (
        "_send",
        "_write",
        "_headers",
        "_state",
        "_loop",
        "_opened",
        "_unsent",
        "_unsent_event",
        "_beats",
        "started",
        "complete",
        "last_sent",
    )

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]], state: StreamState) -> None:
        self._send = send
        self._write = direct_write(send)  # the socket write for a body piece, where there is one
        self._headers = headers
        self._state = state
        self._loop = asyncio.get_running_loop()  # kept: each lookup costs a system call
        self._opened = False  # the answer's opening events went out (with the headers)
        self._unsent: bytes | None = None  # a delta `write_now` framed but could not write
        self._unsent_event: Delta | None = None  # ... and that delta
        self._beats: Heartbeat | None = None  # the keepalive, stopped when the body ends
        self.started = False
        self.complete = False
        self.last_sent = self._loop.time()

    async def _put(self, data: bytes) -> None:
        """Send a piece of the body: written at once where the server allows (the usual case:
        no coroutine, no message), else through `send`, which waits while the client's
        socket buffer is full."""
        self.last_sent = self._loop.time()
        write = self._write
        if write is None or not write(data):
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    def _seal(self, data: bytes) -> bytes:
        """One event's bytes as they go out: dialects may add to them (an `id:`)."""
        return data

    def _sealed(self, data: bytes) -> bytes:
        """One event's bytes as they go out, after any a refused `write_now` left (`delta`
        sends those itself; this keeps them from being lost)."""
        sealed = self._seal(data)
        unsent = self._unsent
        if unsent is not None:
            self._unsent = self._unsent_event = None
            sealed = unsent + sealed
        return sealed

    async def _body(self, data: bytes) -> None:
        """Send one event's bytes (a delta, an error)."""
        await self._put(self._sealed(data))

    async def _last(self, data: bytes) -> None:
        """Send the stream's last event (the finish, or an error after the headers) and end
        the body with it: one write, and the response is complete at once, so a client that
        closes its connection when it has read the last event is not a disconnect. The
        keepalive stops first (nothing may follow the end); one already on its way, waiting for
        the client's socket to drain, goes out before it."""
        beats, self._beats = self._beats, None
        if beats is not None:
            sending = beats.halt()
            if sending is not None:
                await asyncio.wait((sending,))
        sealed = self._sealed(data)
        self.last_sent = self._loop.time()
        await self._send({"type": "http.response.body", "body": sealed, "more_body": False})
        self.complete = True

    # Bytes that are not an event of the stream (a keepalive).
    _comment = _put

    async def _start(self) -> None:
        """Send the headers (with the first output, or a heartbeat while waiting for it)."""
        self.started = True
        headers = self._headers
        if self._state.cached:  # known before the first event, as the lookup comes first
            headers = [*headers, CACHE_HIT_HEADER]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    def ended(self) -> bool:
        """Whether the response is complete (after it, `receive` reports a disconnect)."""
        return self.complete

    def keepalive_event(self) -> bytes:
        """What is sent to keep the stream alive: a comment line, unless the dialect says."""
        return protocol.SSE_HEARTBEAT

    async def end(self) -> None:
        """Close the response body (where `_last` did not)."""
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _opening(self) -> bytes:
        """Before the first delta: send the headers (unless a keepalive did), and return the
        events that open the answer; sets `_opened`."""
        raise NotImplementedError

    def _frame(self, event: Delta) -> bytes:
        """A delta's events, once the answer is open (the dialect's framing state moves on)."""
        raise NotImplementedError

    async def delta(self, event: Delta) -> None:
        unsent = self._unsent
        if unsent is not None and self._unsent_event is event:
            # This delta, framed by `write_now` when the socket was full: as it was framed.
            self._unsent = self._unsent_event = None
            await self._put(unsent)
            return
        opening = b"" if self._opened else await self._opening()
        data = self._frame(event)
        await self._body(opening + data if opening else data)

    def write_now(self, event: Delta) -> bool:
        """Write a delta's events at once (True), or nothing (False): before the answer is
        open, or when the server's writer refuses. Framing may move the dialect's state on,
        so refused bytes are kept, and the `delta` that follows for this event sends them."""
        write = self._write
        if write is None or not self._opened or self._unsent is not None:
            return False
        data = self._seal(self._frame(event))
        if write(data):
            self.last_sent = self._loop.time()
            return True
        self._unsent, self._unsent_event = data, event
        return False

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        raise NotImplementedError

    async def error(self, exc: GatewayError) -> None:
        if self.complete:  # the body ended with the finish: nothing can follow it
            return
        if not self.started:
            self.started = self.complete = True
            await self.error_response(exc)
            return
        await self._last(self.error_event(exc))

    async def error_response(self, exc: GatewayError) -> None:
        """The whole response for a failure before the headers went out."""
        await send_error(self._send, exc, self._state.request_id)

    def error_event(self, exc: GatewayError) -> bytes:
        """The event for a failure after the headers went out."""
        return protocol.sse_event(ErrorEnvelope(error_body(exc, self._state.request_id)))

    def beat_now(self) -> bool:
        """Write the keepalive event at once (True), or nothing (False): before the headers,
        behind a delta `write_now` could not write, or where the server's writer refuses."""
        write = self._write
        # An empty piece asks the writer whether it would take one now, writing nothing; the
        # event is framed only then, as framing it may move the dialect's state on.
        if write is None or not self.started or self._unsent is not None or not write(b""):
            return False
        write(self.keepalive_event())
        self.last_sent = self._loop.time()
        return True

    async def beat(self) -> None:
        """Send the keepalive event, with the headers first if they have not gone out."""
        if not self.started:
            await self._start()
        await self._comment(self.keepalive_event())

    def keepalive(self, interval: float) -> Heartbeat:
        """A watcher (see `race`) that sends a keepalive whenever nothing else was sent for
        `interval` seconds, until the body ends."""
        beats = self._beats = Heartbeat(self, interval)
        return beats


class Heartbeat:
    """An event stream's keepalive: a timer that writes the sink's keepalive event when
    nothing was sent for `interval` seconds. No task, unless the write has to wait (before
    the headers, or while the client's socket is full); a failed write stops the stream."""

    __slots__ = ("_sink", "_interval", "_loop", "_stop", "_timer", "_task", "_halted")

    def __init__(self, sink: EventStreamSink, interval: float) -> None:
        self._sink = sink
        self._interval = interval
        self._loop = sink._loop
        self._stop: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._halted = False

    def start(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._timer = self._loop.call_at(self._sink.last_sent + self._interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        due = self._sink.last_sent + self._interval
        if self._loop.time() >= due:
            if not self._sink.beat_now():
                self._task = asyncio.ensure_future(self._sink.beat())
                self._task.add_done_callback(self._beaten)
                return
            due = self._sink.last_sent + self._interval
        self._timer = self._loop.call_at(due, self._tick)

    def _beaten(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        if task.exception() is not None:  # kept by the task, as a watcher's failure was
            if self._stop is not None:
                self._stop()
            return
        if not self._halted:
            self._timer = self._loop.call_at(self._sink.last_sent + self._interval, self._tick)

    def halt(self) -> asyncio.Task[None] | None:
        """No keepalive from now on: the body is about to end. Returns the task of one still
        being sent (it waits for the client's socket to drain), if any."""
        self._halted = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return self._task

    async def close(self) -> None:
        self._stop = None
        if self._sink._beats is self:
            self._sink._beats = None  # no cycle left for the collector
        task = self.halt()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            release_cancel(task)


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

    async def _open(self) -> tuple[protocol.ChunkFramer, bytes]:
        """At the first output: the framer for the model that answers (a fallback, maybe),
        and the role chunk that opens the answer."""
        if not self.started:
            await self._start()
        completion_id, created = self._completion
        framer = self._framer = protocol.ChunkFramer(
            completion_id=completion_id, created=created, model=self._state.model
        )
        self._opened = True
        return framer, framer.role()

    async def _opening(self) -> bytes:
        return (await self._open())[1]

    def _frame(self, event: Delta) -> bytes:
        assert self._framer is not None
        return _chunk(self._framer, event)

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        framer = self._framer
        opening = b""
        if framer is None:
            framer, opening = await self._open()
        data = opening + framer.finish(reason)
        if self._usage:
            data += framer.usage(usage)
        await self._last(data + protocol.SSE_DONE)


def _chunk(framer: protocol.ChunkFramer, event: Delta) -> bytes:
    """A delta as its `chat.completion.chunk` event."""
    if isinstance(event, TextDelta):
        return framer.content(event.text)
    if isinstance(event, ReasoningDelta):
        return framer.reasoning(event.text)
    if isinstance(event, RefusalDelta):
        return framer.refusal(event.text)
    return framer.tool_call(event)


class ResumableSSESink(SSESink):
    """Chat Completions for a resumable stream: every event has its sequence number as its
    SSE `id`, so a client (or a browser's EventSource) can resume after the last one it got.

    Each event's bytes (the deltas, the finish with its usage and `[DONE]`, an error) carry the
    `id:` line on their last SSE event, so `Last-Event-ID` moves only once all of them arrived.
    A reader of the journal starts at `seq` and, past the first event, without the role chunk.
    """

    __slots__ = ("seq", "_head")

    def __init__(
        self,
        send: Send,
        completion: tuple[str, int],
        headers: list[tuple[bytes, bytes]],
        include_usage: bool,
        state: StreamState,
        seq: int = 0,
        head: Head | None = None,
    ) -> None:
        super().__init__(send, completion, headers, include_usage, state)
        self.seq = seq
        self._head = head  # a reader's: the model that answered, known once there was output

    async def _open(self) -> tuple[protocol.ChunkFramer, bytes]:
        if self._head is not None:
            self._state.model = self._head.model
        framer, opening = await super()._open()
        return framer, opening if self.seq == 0 else b""  # past event 0 the role went out

    def _seal(self, data: bytes) -> bytes:
        seq = self.seq
        self.seq = seq + 1
        last = data.rfind(b"\n\n", 0, len(data) - 2)
        cut = last + 2 if last >= 0 else 0
        return b"%sid: %d\n%s" % (data[:cut], seq, data[cut:])

    async def done(self, record: Done) -> None:
        await self.finish(record.reason, record.usage)

    async def failed(self, body: ErrorBody) -> None:
        """The error a stream ended with, as its first client got it."""
        if not self.started:
            self.started = self.complete = True
            self.seq += 1
            await send_error_body(self._send, body)
            return
        await self._last(protocol.sse_event(ErrorEnvelope(body)))

    async def interrupted(self, body: ErrorBody) -> None:
        """This reader lost the journal midway: an error event with no `id:`, as it is no
        record of the stream, so a reconnect with `Last-Event-ID` skips nothing."""
        if not self.started:
            await self.failed(body)
            return
        await self._put(protocol.sse_event(ErrorEnvelope(body)))


async def stream_resumable(
    service: ChatService,
    streams: Streams,
    prepared: Prepared,
    tee: Tee,
    receive: Receive,
    sink: EventStreamSink,
    *,
    heartbeat: float,
) -> None:
    """Serve a resumable SSE stream: a disconnect leaves it running into its journal (to be
    resumed, or abandoned after the grace time); only an explicit cancel stops it."""
    state = tee.state
    run = asyncio.ensure_future(streams.run(service, prepared, tee))
    streams.bind(tee, run)
    keepalive = sink.keepalive(heartbeat)
    keepalive.start(_ignore)  # a failed keepalive leaves the stream to its journal
    gone = asyncio.ensure_future(watch_disconnect(receive, None, sink.ended))
    try:
        await asyncio.wait((run, gone), return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            await keepalive.close()
            streams.detach(tee)  # the client went away: the stream goes on, journalled
            if sink.started:
                await asyncio.wait((run,))
            else:  # it never got the stream id (sent with the headers): no one can resume it
                state.cancel("client_disconnected")
    finally:
        gone.cancel()
        if not run.done():
            run.cancel()  # stopped above, or this request was cancelled (the server is stopping)
        await asyncio.gather(run, gone, return_exceptions=True)
        await keepalive.close()
    if not run.cancelled():
        run.result()  # what failed in the stream itself
    if tee.live is not None and not sink.complete:
        await write_or_abort(sink.end(), state, ERROR_WRITE_TIMEOUT)


def _ignore() -> None:
    return None


async def replay_sse(
    follower: Follower,
    sink: ResumableSSESink,
    receive: Receive,
    *,
    heartbeat: float,
    write_timeout: float,
) -> None:
    """Serve a resumed stream: the journal's events after the one asked for, then live ones."""
    state = sink._state
    try:
        await race(
            replay(follower, sink, write_timeout=write_timeout, request_id=state.request_id),
            sink.keepalive(heartbeat),
            Disconnect(sink._send, receive, None, sink.ended),
        )
    except TimeoutError:  # the reader stopped reading
        if state.abort is not None:
            state.abort()
        return
    if not sink.complete:
        await write_or_abort(_close(sink), state, ERROR_WRITE_TIMEOUT)


async def _close(sink: EventStreamSink) -> None:
    if not sink.started:  # nothing came after the event asked for: an empty stream
        await sink._start()
    await sink.end()


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
        Disconnect(sink._send, receive, state, sink.ended),
    )
    if finished and not sink.complete:
        await write_or_abort(sink.end(), state, ERROR_WRITE_TIMEOUT)
