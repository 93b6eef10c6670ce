"""The WebSocket endpoint (protocol v1): many streams per socket, each cancellable on its own.

Each `chat.start` runs the shared stream service in a task of its own. `chat.cancel` cancels
that task, which closes its upstream response at once (the same mechanism an SSE disconnect
uses), and the stream then ends with `chat.done` / `cancelled`. The socket closing cancels
every task it owns. Frames of different streams interleave; each stream's frames carry `seq`
0, 1, 2, … and exactly one terminal frame (`chat.done` or `chat.error`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

import msgspec
from starlette.types import Receive, Scope, Send

from providers.errors import GatewayError, InvalidRequestError
from providers.types import Delta, FinishReason, ReasoningDelta, RefusalDelta, TextDelta, Usage
from server import metrics, protocol
from server.auth import OFFERED
from server.chat import ERROR_WRITE_TIMEOUT, ChatService, Prepared, write_or_abort
from server.errors import (
    ClientGone,
    DuplicateStreamError,
    ErrorBody,
    LimitExceededError,
    RateLimitedError,
    TooManyStreamsError,
    error_body,
)
from server.guard import current_abort, direct_body, direct_write
from server.journal import Done
from server.limits import FrameMeter, Limits
from server.ratelimit import current_principal
from server.resume import Streams, Tee, new_stream_id, replay
from server.settings import WebSocketSettings
from server.stream_state import StreamState
from server.streaming import release_cancel

log = logging.getLogger("tokenrelay.ws")
_FRAMES_IN = {kind: metrics.WS_FRAMES.labels("in", kind) for kind in metrics.FRAME_TYPES}
_FRAMES_OUT = {kind: metrics.WS_FRAMES.labels("out", kind) for kind in metrics.FRAME_TYPES}


class _Socket:
    """Sends text frames; a send to a socket that is gone raises `ClientGone`."""

    __slots__ = ("_send", "_write", "closed")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._write = direct_write(send)  # the socket write for a frame, where there is one
        self.closed = False

    async def frame(self, kind: str, data: str) -> None:
        """Send a non-delta frame, counted by type (deltas are counted in bulk per stream)."""
        _FRAMES_OUT[kind].inc()
        await self.text(data)

    async def text(self, data: str) -> None:
        if self.closed:
            raise ClientGone
        write = self._write
        if write is not None and write(data):
            return
        try:
            await self._send({"type": "websocket.send", "text": data})
        except OSError as exc:  # uvicorn's ClientDisconnected
            self.closed = True
            raise ClientGone from exc

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            except OSError:
                pass


class WSSink:
    """Writes one stream's frames; guarantees a single terminal frame."""

    __slots__ = ("_socket", "_framer", "_id", "_state", "seq", "ended")

    def __init__(self, socket: _Socket, stream_id: str, state: StreamState, seq: int = 0) -> None:
        self._socket = socket
        self._framer = protocol.DeltaFramer(stream_id)
        self._id = stream_id
        self._state = state
        self.seq = seq  # a resumed reader starts where it asked to
        self.ended = False

    async def delta(self, event: Delta) -> None:
        seq = self.seq
        self.seq = seq + 1
        await self._socket.text(_frame(self._framer, seq, event))

    def write_now(self, event: Delta) -> bool:
        socket = self._socket
        write = socket._write
        if write is None or socket.closed:
            return False
        seq = self.seq
        if not write(_frame(self._framer, seq, event)):
            return False
        self.seq = seq + 1
        return True

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        ttft = self._state.ttft
        frame = protocol.ChatDone(
            id=self._id,
            seq=self._terminal_seq(),
            finish_reason=reason,
            usage=protocol.UsageBody.of(usage),
            ttft_ms=None if ttft is None else round(ttft * 1000, 3),
            model=self._state.model,  # the model that answered: a fallback, maybe
            cached=self._state.cached,
        )
        await self._socket.frame("chat.done", protocol.encode_text(frame))

    async def cancelled(self) -> None:
        await self.finish("cancelled", self._state.usage_so_far())

    async def done(self, record: Done) -> None:
        """A journalled stream's end, as its first client got it."""
        frame = protocol.ChatDone(
            id=self._id,
            seq=self._terminal_seq(),
            finish_reason=record.reason,
            usage=protocol.UsageBody.of(record.usage),
            ttft_ms=record.ttft_ms,
            model=record.model,
            cached=record.cached,
        )
        await self._socket.frame("chat.done", protocol.encode_text(frame))

    async def failed(self, body: ErrorBody) -> None:
        frame = protocol.ChatErrorFrame(id=self._id, seq=self._terminal_seq(), error=body)
        await self._socket.frame("chat.error", protocol.encode_text(frame))

    async def interrupted(self, body: ErrorBody) -> None:
        """A reader cut off midway: a `chat.error` that is no record of the stream, so it takes
        no sequence number of its own but repeats the last one this reader got (`after` when
        none): resuming after the highest `seq` received then skips nothing."""
        assert not self.ended, "a stream has one terminal frame"
        self.ended = True
        frame = protocol.ChatErrorFrame(id=self._id, seq=self.seq - 1, error=body)
        await self._socket.frame("chat.error", protocol.encode_text(frame))

    async def error(self, exc: GatewayError) -> None:
        await self.failed(error_body(exc, self._state.request_id))

    def _terminal_seq(self) -> int:
        assert not self.ended, "a stream has one terminal frame"
        self.ended = True
        seq = self.seq
        self.seq = seq + 1
        return seq


def _frame(framer: protocol.DeltaFramer, seq: int, event: Delta) -> str:
    """A delta as its `chat.delta` frame."""
    if isinstance(event, TextDelta):
        return framer.text(seq, event.text)
    if isinstance(event, ReasoningDelta):
        return framer.reasoning(seq, event.text)
    if isinstance(event, RefusalDelta):
        return framer.refusal(seq, event.text)
    return framer.tool_call(seq, event)


class _Stream:
    """A stream this socket runs (`tee` set when resumable), or follows (`target` set: the id
    of the resumable stream it reads)."""

    __slots__ = ("task", "sink", "state", "tee", "target")

    def __init__(
        self,
        task: asyncio.Task[None],
        sink: WSSink,
        state: StreamState,
        tee: Tee | None = None,
        target: str | None = None,
    ) -> None:
        self.task = task
        self.sink = sink
        self.state = state
        self.tee = tee
        self.target = target


class Connection:
    """One accepted socket: reads frames, runs streams, cancels them."""

    def __init__(
        self,
        service: ChatService,
        socket: _Socket,
        settings: WebSocketSettings,
        limits: Limits | None = None,
        streams: Streams | None = None,
    ) -> None:
        self._service = service
        self._streams_service = streams
        self._write_timeout = service.write_timeout
        self._chores: set[asyncio.Task[object]] = set()
        self._socket = socket
        self._abort = current_abort.get()  # drops the connection of a client that stopped reading
        self._settings = settings
        self._streams: dict[str, _Stream] = {}
        self._limits = limits
        self._meter = FrameMeter(limits.settings.ws_frames_per_second) if limits else None
        self._principal = current_principal.get()

    async def serve(self, receive: Receive) -> None:
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if self._meter is not None and not self._meter.allow():
                    await self._socket.close(1008, "too many frames per second")
                    return
                text = message.get("text")
                if text is None:
                    _FRAMES_IN["invalid"].inc()
                    await self._protocol_error("binary_frame", "Frames must be JSON text.")
                elif len(text) * 4 > self._settings.max_frame_bytes and (
                    len(text.encode()) > self._settings.max_frame_bytes
                ):
                    await self._socket.close(1009, "frame too large")
                    return
                else:
                    await self._handle(text)
        except ClientGone:
            return
        finally:
            self._socket.closed = True
            await self._cancel_all()

    async def _handle(self, text: str) -> None:
        received_at = time.monotonic()
        try:
            frame = protocol.decode_client_frame(text)
            if self._limits is not None:
                self._limits.check_depth(text.encode())
        except LimitExceededError as exc:
            _FRAMES_IN["invalid"].inc()
            await self._protocol_error("limit_exceeded", exc.message)
            return
        except msgspec.ValidationError as exc:
            await self._invalid_frame(text, exc)
            return
        except msgspec.DecodeError:
            _FRAMES_IN["invalid"].inc()
            stream_id, problem = _broken_start(text)
            if stream_id is not None:
                # As over REST: the request is refused with `invalid_request`.
                await self._reject(stream_id, InvalidRequestError(problem))
            else:
                await self._protocol_error("bad_json", "The frame is not valid JSON.")
            return
        match frame:
            case protocol.ChatStart():
                _FRAMES_IN["chat.start"].inc()
                await self._start(frame, received_at)
            case protocol.ChatResume():
                _FRAMES_IN["chat.resume"].inc()
                await self._resume(frame)
            case protocol.ChatCancel():
                _FRAMES_IN["chat.cancel"].inc()
                await self._cancel(frame.id)
            case protocol.Ping():
                _FRAMES_IN["ping"].inc()
                await self._reply("pong", protocol.PONG)

    async def _invalid_frame(self, text: str, exc: msgspec.ValidationError) -> None:
        _FRAMES_IN["invalid"].inc()
        message, path = protocol.frame_problem(exc)
        is_object, kind, stream_id = protocol.frame_envelope(text)
        if stream_id is None and kind in ("chat.start", None):
            # The envelope decoder gave up (too deep, say): a start is still failed by its id.
            stream_id, _ = _broken_start(text)
            kind = "chat.start" if stream_id is not None else kind
        if kind == "chat.start" and stream_id is not None and (path or "").startswith("request"):
            # A bad request inside a well-formed start fails that stream, as it would over REST.
            param = path[len("request.") :] if path and path.startswith("request.") else None
            where = f" at '{param}'" if param else ""
            error = InvalidRequestError(f"Invalid request{where}: {message}", param=param)
            await self._reject(stream_id, error)
        elif is_object and (path == "type" or kind not in _CLIENT_FRAMES):
            await self._protocol_error("unknown_type", f"Unknown frame type: {message}", stream_id)
        else:
            where = f" at '{path}'" if path else ""
            await self._protocol_error(
                "invalid_frame", f"Invalid frame{where}: {message}", stream_id
            )

    async def _room_for(self, stream_id: str) -> bool:
        """Whether this socket can take one more stream under that id (else it is refused)."""
        error: GatewayError | None = None
        if stream_id in self._streams:
            error = DuplicateStreamError(
                f"A stream with id '{stream_id}' is still running on this socket.", param="id"
            )
        elif len(self._streams) >= self._settings.max_streams:
            error = TooManyStreamsError(
                f"This socket already runs {self._settings.max_streams} streams; "
                "wait for one to end or cancel one."
            )
        if error is not None:
            await self._reject(stream_id, error)
        return error is None

    async def _start(self, frame: protocol.ChatStart, received_at: float) -> None:
        if not await self._room_for(frame.id):
            return
        try:
            if self._limits is not None:
                self._limits.gate.check()  # at the cap, refused before any other work
                self._limits.check_body(frame.request)
            prepared = self._service.prepare(
                protocol.chat_request(frame.request), frame.cache_control
            )
            await self._admit()
        except GatewayError as exc:
            await self._reject(frame.id, exc)
            return
        state = StreamState(uuid.uuid4().hex, received_at, "ws")
        sink = WSSink(self._socket, frame.id, state)
        tee: Tee | None = None
        if frame.resumable and self._streams_service is not None:
            stream_id = new_stream_id()
            started = protocol.ChatStarted(id=frame.id, stream_id=stream_id)
            try:
                await self._reply("chat.started", protocol.encode_text(started))
            except BaseException:  # the client gone, or this loop cancelled
                if self._limits is not None:
                    self._limits.end_stream(self._principal)  # the slots `_admit` took
                raise
            state.model = prepared.model
            tee = self._streams_service.open(
                stream_id,
                self._principal or "",
                int(time.time()),
                frame.request.include_usage,
                state,
                sink,
            )
        task = asyncio.create_task(self._run(frame.id, prepared, sink, state, tee))
        task.add_done_callback(release_cancel)
        if self._limits is not None:
            # A done callback runs even for a task cancelled before its first step (the socket
            # closing right after the start), where `_run`'s `finally` never would.
            limits, principal = self._limits, self._principal
            task.add_done_callback(lambda _: limits.end_stream(principal))
        if tee is not None and self._streams_service is not None:
            self._streams_service.bind(tee, task)
        self._streams[frame.id] = _Stream(task, sink, state, tee)

    async def _admit(self) -> None:
        """The key's rate limits, then a slot of the process's and of the key's concurrent
        streams (both given back when the stream's task is done)."""
        if self._limits is None:
            return
        if self._principal is not None:
            wait = await self._limits.limiter.admit(self._principal)
            if wait > 0:
                raise RateLimitedError(
                    "Too many requests or tokens for this key; retry later.", retry_after=wait
                )
        await self._limits.stream_slot(self._principal)

    async def _run(
        self,
        stream_id: str,
        prepared: Prepared,
        sink: WSSink,
        state: StreamState,
        tee: Tee | None = None,
    ) -> None:
        try:
            if tee is not None and self._streams_service is not None:
                await self._streams_service.run(self._service, prepared, tee)
            else:
                await self._service.run(prepared, sink, state)
        except asyncio.CancelledError:
            stream = self._streams.get(stream_id)
            if stream is not None and state.cancel_cause == "cancelled" and not sink.ended:
                try:
                    await write_or_abort(sink.cancelled(), state, ERROR_WRITE_TIMEOUT)
                except ClientGone:
                    pass
            raise
        except ClientGone:
            pass
        finally:
            self._streams.pop(stream_id, None)
            _FRAMES_OUT["chat.delta"].inc(state.chunks)

    async def _resume(self, frame: protocol.ChatResume) -> None:
        """Follow a resumable stream on this socket under the client's new id. The lookup runs
        in the reader's own task, not in this loop: on another replica a stream not yet in
        Redis is looked for once more a moment later, and the socket's other frames (a cancel,
        a ping) must not wait for that."""
        if not await self._room_for(frame.id):
            return
        streams = self._streams_service
        if streams is None:
            await self._reject(frame.id, InvalidRequestError("Resuming is not offered here."))
            return
        state = StreamState(uuid.uuid4().hex, time.monotonic(), "ws")
        sink = WSSink(self._socket, frame.id, state, seq=frame.after + 1)
        task = asyncio.create_task(self._follow(frame, streams, sink))
        task.add_done_callback(release_cancel)
        self._streams[frame.id] = _Stream(task, sink, state, target=frame.stream_id)

    async def _follow(self, frame: protocol.ChatResume, streams: Streams, sink: WSSink) -> None:
        client_id = frame.id
        try:
            try:
                follower = await streams.follow(
                    frame.stream_id, self._principal or "", frame.after, "ws"
                )
            except GatewayError as exc:
                await self._reject(client_id, exc)
                return
            started = protocol.ChatStarted(id=client_id, stream_id=frame.stream_id, resumed=True)
            await self._reply("chat.started", protocol.encode_text(started))
            await replay(
                follower,
                sink,
                write_timeout=self._write_timeout,
                request_id=sink._state.request_id,
            )
        except TimeoutError:  # the client stopped reading: drop it, as for its own streams
            if self._abort is not None:
                self._abort()
        except ClientGone:
            pass
        finally:
            self._streams.pop(client_id, None)

    async def _cancel(self, stream_id: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.target is not None and not stream.sink.ended:
            # A reader's cancel stops the stream it follows; the reader then relays its end.
            if self._streams_service is not None:
                chore = asyncio.create_task(
                    self._streams_service.cancel(stream.target, self._principal or "")
                )
                self._chores.add(chore)
                chore.add_done_callback(_forget(self._chores))
            return
        if stream is None or stream.sink.ended or stream.state.cancel_cause is not None:
            # Unknown, finished, or already being cancelled: every cancel gets an answer.
            reason = "unknown_or_finished" if stream is None or stream.sink.ended else "cancelling"
            frame = protocol.CancelIgnored(id=stream_id, reason=reason)
            await self._reply("cancel.ignored", protocol.encode_text(frame))
            return
        stream.state.cancel("cancelled")
        stream.task.cancel()

    async def _reject(self, stream_id: str, error: GatewayError) -> None:
        """A start that never ran: its one terminal frame is this `chat.error` (seq 0)."""
        frame = protocol.ChatErrorFrame(id=stream_id, seq=0, error=error_body(error))
        await self._reply("chat.error", protocol.encode_text(frame))

    async def _protocol_error(self, code: str, message: str, stream_id: str | None = None) -> None:
        frame = protocol.ProtocolErrorFrame(code=code, message=message, id=stream_id)
        await self._reply("error", protocol.encode_text(frame))

    async def _reply(self, kind: str, data: str) -> None:
        """A frame the reading loop writes. A client that does not read it in time is dropped:
        otherwise the loop, the socket and its slots would wait on that client for good."""
        try:
            async with asyncio.timeout(ERROR_WRITE_TIMEOUT):
                await self._socket.frame(kind, data)
        except TimeoutError:
            if self._abort is not None:
                self._abort()
            raise ClientGone from None

    async def _cancel_all(self) -> None:
        tasks = []
        for stream in list(self._streams.values()):
            if stream.tee is not None and self._streams_service is not None:
                # A dropped socket is not a cancel: the stream goes on into its journal.
                self._streams_service.detach(stream.tee)
                continue
            stream.state.cancel("client_disconnected")
            stream.task.cancel()
            tasks.append(stream.task)
        await asyncio.gather(*tasks, return_exceptions=True)


_CLIENT_FRAMES = ("chat.start", "chat.resume", "chat.cancel", "ping")


def _forget(chores: set[asyncio.Task[object]]) -> Any:
    def done(task: asyncio.Task[object]) -> None:
        chores.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("cancel from a reader failed: %s", task.exception())

    return done


_START = re.compile(r'^\s*\{\s*"type"\s*:\s*"chat\.start"\s*,\s*"id"\s*:\s*"([^"\\]{1,128})"')


def _broken_start(data: str) -> tuple[str | None, str]:
    """For a frame that is not valid JSON: the stream id when it is still recognisably a
    `chat.start` (its request holds the fault: a NaN, a lone surrogate, nesting too deep), and
    the problem as REST words it for the same body."""
    try:
        loose = json.loads(data)  # the standard library reads NaN and lone surrogates
    except RecursionError:
        found = _START.match(data)
        return (found.group(1) if found else None), "The request nests too deeply."
    except ValueError:
        return None, ""
    if isinstance(loose, dict) and loose.get("type") == "chat.start":
        stream_id = loose.get("id")
        if isinstance(stream_id, str) and 0 < len(stream_id) <= 128:
            return stream_id, "The request is not valid JSON (NaN, Infinity or a lone surrogate)."
    return None, ""


class WebSocketEndpoint:
    """`GET /api/ws` as a plain ASGI app."""

    def __init__(
        self,
        service: ChatService,
        settings: WebSocketSettings,
        limits: Limits | None = None,
        streams: Streams | None = None,
    ) -> None:
        self._service = service
        self._settings = settings
        self._limits = limits
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        offered = scope.get("subprotocols") or []
        # The auth middleware removes the auth entry; what was offered before counts.
        if (offered or scope.get("state", {}).get(OFFERED)) and protocol.SUBPROTOCOL not in offered:
            await send({"type": "websocket.close", "code": 1002})  # refused before the handshake
            return
        await send(
            {"type": "websocket.accept", "subprotocol": protocol.SUBPROTOCOL if offered else None}
        )
        socket = _Socket(direct_body(scope, send))
        metrics.WS_CONNECTIONS.inc()
        try:
            connection = Connection(
                self._service, socket, self._settings, self._limits, self._streams
            )
            await connection.serve(receive)
            await socket.close(1000)
        finally:
            metrics.WS_CONNECTIONS.dec()
