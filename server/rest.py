"""The OpenAI-compatible REST API: chat completions (JSON or SSE) and the model list."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from providers.errors import GatewayError, InvalidRequestError
from providers.types import (
    ChatRequest,
    Delta,
    FinishReason,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    Usage,
)
from server import protocol
from server.catalog import Catalog
from server.chat import ChatService, Prepared
from server.errors import ClientGone
from server.guard import direct_body
from server.http import header_map, read_body, request_id_of, send_error, send_json
from server.journal import Done, Failed
from server.limits import Limits
from server.ratelimit import current_principal
from server.resume import RESUMABLE_HEADER, STREAM_ID_HEADER, Streams, new_stream_id
from server.settings import ServerSettings
from server.sse import (
    CACHE_HIT_HEADER,
    SSE_HEADERS,
    ResumableSSESink,
    SSESink,
    replay_sse,
    stream_resumable,
    stream_sse,
)
from server.stream_state import StreamState
from server.streaming import Disconnect, race

BodyT = TypeVar("BodyT")


class DialectEndpoint(Generic[BodyT]):
    """One dialect's POST route as a plain ASGI app: read and decode the body into the typed
    request, admit it (limits, route, stream slot), then answer in the dialect's shape.

    A dialect subclasses it with `decode` (wire body and typed request, or a `RequestError`
    naming the field; or `read` when that needs a lookup), `respond` and, when its errors look
    different, `send_error`.
    """

    def __init__(
        self, service: ChatService, settings: ServerSettings, limits: Limits | None = None
    ) -> None:
        self._service = service
        self._settings = settings
        self._limits = limits

    def decode(self, raw: bytes) -> tuple[BodyT, ChatRequest]:
        raise NotImplementedError

    async def read(self, raw: bytes) -> tuple[BodyT, ChatRequest]:
        """Decode the body; a dialect that must look something up first overrides this."""
        return self.decode(raw)

    async def respond(
        self,
        body: BodyT,
        prepared: Prepared,
        headers: dict[bytes, bytes],
        rid: str,
        started: float,
        receive: Receive,
        send: Send,
    ) -> None:
        raise NotImplementedError

    async def send_error(self, send: Send, exc: GatewayError, rid: str) -> None:
        await send_error(send, exc, rid)

    resumable = False  # whether the dialect offers resumable streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        send = direct_body(scope, send)
        headers = header_map(scope)
        rid = request_id_of(scope)
        try:
            if self._limits is not None:
                self._limits.gate.check()  # at the cap, refused before the body is read
            if not self.resumable and headers.get(RESUMABLE_HEADER, b"").strip().lower() in (
                b"true",
                b"1",
            ):
                raise InvalidRequestError(
                    "Resumable streams are offered on /api/chat/completions and the WebSocket "
                    '(chat.start with "resumable": true), not on this route.',
                    param="X-Tokenrelay-Resumable",
                )
            raw = await read_body(
                receive, headers, self._settings.max_body_bytes, self._settings.body_timeout
            )
            body, request = await self.read(raw)
            if self._limits is not None:
                self._limits.check_depth(raw)
            cache_control = headers.get(b"cache-control")
            prepared = self._service.prepare(
                request, cache_control.decode("latin-1") if cache_control else None
            )
        except ClientGone:
            return
        except GatewayError as exc:
            await self.send_error(send, exc, rid)
            return
        principal = current_principal.get() if self._limits is not None else None
        try:
            if self._limits is not None:
                await self._limits.stream_slot(principal)
        except GatewayError as exc:
            await self.send_error(send, exc, rid)
            return
        try:
            await self.respond(body, prepared, headers, rid, started, receive, send)
        finally:
            if self._limits is not None:
                self._limits.end_stream(principal)


class ChatCompletions(DialectEndpoint[protocol.ChatCompletionBody]):
    """`POST /api/chat/completions`: one code path for JSON and SSE; resumable SSE streams
    (`X-Tokenrelay-Resumable: true`) through the journal."""

    def __init__(
        self,
        service: ChatService,
        settings: ServerSettings,
        limits: Limits | None = None,
        streams: Streams | None = None,
    ) -> None:
        super().__init__(service, settings, limits)
        self._streams = streams

    resumable = True

    def decode(self, raw: bytes) -> tuple[protocol.ChatCompletionBody, ChatRequest]:
        body = protocol.decode_body(raw)
        if self._limits is not None:
            self._limits.check_body(body)
        return body, protocol.chat_request(body)

    async def respond(
        self,
        body: protocol.ChatCompletionBody,
        prepared: Prepared,
        headers: dict[bytes, bytes],
        rid: str,
        started: float,
        receive: Receive,
        send: Send,
    ) -> None:
        stream = body.stream or b"text/event-stream" in headers.get(b"accept", b"")
        state = StreamState(rid, started, "sse" if stream else "rest")
        created = int(time.time())
        completion_id = f"chatcmpl-{rid}"
        extra = [(b"x-request-id", rid.encode())]
        try:
            resumable = _resumable(headers.get(RESUMABLE_HEADER), stream)
        except GatewayError as exc:
            await send_error(send, exc, rid)
            return
        if resumable and self._streams is not None:
            stream_id = new_stream_id()
            extra.append((STREAM_ID_HEADER, stream_id.encode()))
            sink: SSESink = ResumableSSESink(
                send, (stream_id, created), SSE_HEADERS + extra, body.include_usage, state
            )
            state.model = prepared.model
            owner = current_principal.get() or ""
            tee = self._streams.open(stream_id, owner, created, body.include_usage, state, sink)
            await stream_resumable(
                self._service,
                self._streams,
                prepared,
                tee,
                receive,
                sink,
                heartbeat=self._settings.sse_heartbeat,
            )
        elif stream:
            sink = SSESink(
                send, (completion_id, created), SSE_HEADERS + extra, body.include_usage, state
            )
            heartbeat = self._settings.sse_heartbeat
            await stream_sse(self._service, prepared, state, receive, sink, heartbeat=heartbeat)
        else:
            await self._complete(prepared, state, receive, send, completion_id, created, extra)

    async def _complete(
        self,
        prepared: Prepared,
        state: StreamState,
        receive: Receive,
        send: Send,
        completion_id: str,
        created: int,
        extra: list[tuple[bytes, bytes]],
    ) -> None:
        """Collect the same event stream into one `chat.completion`; a disconnect cancels it."""
        collector = Collector()
        if not await collect(self._service, prepared, state, receive, send, collector):
            return
        if collector.failure is not None:
            await send_error(send, collector.failure, state.request_id)
            return
        message = collector.message()
        completion = protocol.ChatCompletion(
            id=completion_id,
            object="chat.completion",
            created=created,
            model=state.model,  # the model that answered: a fallback, maybe
            choices=[
                protocol.Choice(index=0, message=message, finish_reason=collector.reason or "stop")
            ],
            usage=protocol.UsageBody.of(collector.usage or Usage()),
        )
        if state.cached:
            extra = [*extra, CACHE_HIT_HEADER]
        await send_json(send, 200, protocol.encode(completion), extra)


def _resumable(value: bytes | None, stream: bool) -> bool:
    """The `X-Tokenrelay-Resumable` header: true or false, and only on a streamed request."""
    if value is None:
        return False
    flag = value.strip().lower()
    if flag not in (b"true", b"false", b"1", b"0"):
        raise InvalidRequestError(
            "X-Tokenrelay-Resumable must be 'true' or 'false'.", param="X-Tokenrelay-Resumable"
        )
    if flag in (b"true", b"1") and not stream:
        raise InvalidRequestError(
            'X-Tokenrelay-Resumable applies to streamed requests ("stream": true); '
            "a non-streamed request has nothing to resume.",
            param="X-Tokenrelay-Resumable",
        )
    return flag in (b"true", b"1")


class ResumeStream:
    """`GET /api/chat/completions/{stream_id}/stream`: a resumable stream read again from after
    `Last-Event-ID` (or `?after=`), then followed live to its end."""

    def __init__(self, streams: Streams, settings: ServerSettings) -> None:
        self._streams = streams
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id_of(scope)
        stream_id: str = scope["path_params"]["stream_id"]
        headers = header_map(scope)
        try:
            after = _after(headers.get(b"last-event-id"), scope.get("query_string", b""))
            follower = await self._streams.follow(
                stream_id, current_principal.get() or "", after, "sse"
            )
        except GatewayError as exc:
            await send_error(send, exc, rid)
            return
        head = follower.head
        state = StreamState(rid, time.monotonic(), "sse")
        state.model = head.model
        extra = [(b"x-request-id", rid.encode()), (STREAM_ID_HEADER, stream_id.encode())]
        sink = ResumableSSESink(
            send,
            (stream_id, head.created),
            SSE_HEADERS + extra,
            head.include_usage,
            state,
            seq=after + 1,
            head=head,
        )
        await replay_sse(
            follower,
            sink,
            receive,
            heartbeat=self._settings.sse_heartbeat,
            write_timeout=self._settings.slow_consumer_timeout,
        )


def _after(last_event_id: bytes | None, query: bytes) -> int:
    """The sequence number after which to resume: `Last-Event-ID`, else `?after=`, else -1."""
    param, raw = "Last-Event-ID", last_event_id
    if raw is None:
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name == b"after":
                param, raw = "after", value
    if raw is None or raw.strip() == b"":
        return -1
    try:
        after = int(raw.strip())
    except ValueError:
        after = -2
    if after < -1 or after > 1 << 53:
        raise InvalidRequestError(
            f"{param} must be the sequence number of an event (an integer from -1).", param=param
        )
    return after


class StopStream:
    """`POST /api/chat/completions/{stream_id}/cancel`: stop a resumable stream at once, on
    whichever replica runs it; answers how it ended and the usage so far."""

    def __init__(self, streams: Streams) -> None:
        self._streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id_of(scope)
        stream_id: str = scope["path_params"]["stream_id"]
        try:
            stopped, last = await self._streams.cancel(stream_id, current_principal.get() or "")
        except GatewayError as exc:
            await send_error(send, exc, rid)
            return
        answer = protocol.StreamCancellation(id=stream_id, status="cancelling")
        if isinstance(last, Done):
            answer = protocol.StreamCancellation(
                id=stream_id,
                status="cancelled" if stopped else last.outcome,
                finish_reason=last.reason,
                usage=protocol.UsageBody.of(last.usage),
            )
        elif isinstance(last, Failed):
            answer = protocol.StreamCancellation(
                id=stream_id, status="failed", finish_reason="error", error=last.error
            )
        extra = [(b"x-request-id", rid.encode())]
        await send_json(send, 200, protocol.encode(answer), extra)


async def collect(
    service: ChatService,
    prepared: Prepared,
    state: StreamState,
    receive: Receive,
    send: Send,
    collector: Collector,
) -> bool:
    """Run the stream into `collector`; False when the client went away (which cancels it)."""
    gone = Disconnect(send, receive, state)
    return await race(service.run(prepared, collector, state), gone)


class Collector:
    """A sink that gathers a whole answer for a non-streamed response."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        # Tool calls by index: id, name and the fragments of the arguments.
        self.calls: dict[int, tuple[list[str], list[str], list[str]]] = {}
        self.reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.failure: GatewayError | None = None

    async def delta(self, event: Delta) -> None:
        self.write_now(event)

    def write_now(self, event: Delta) -> bool:
        """Gathered at once: nothing waits for a client until the answer is whole."""
        if isinstance(event, TextDelta):
            self.text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, RefusalDelta):
            self.refusal.append(event.text)
        else:
            ids, names, arguments = self.calls.setdefault(event.index, ([], [], []))
            if event.id is not None:
                ids.append(event.id)
            if event.name is not None:
                names.append(event.name)
            arguments.append(event.arguments)
        return True

    def message(self) -> protocol.ResponseMessage:
        """The assistant message: content is null when the answer is only tool calls."""
        calls = [
            protocol.ToolCallBody(
                id="".join(ids),
                type="function",
                function=protocol.FunctionCallBody(name="".join(names), arguments="".join(args)),
            )
            for _, (ids, names, args) in sorted(self.calls.items())
        ]
        text = "".join(self.text)
        return protocol.ResponseMessage(
            role="assistant",
            content=text if text or not (calls or self.refusal) else None,
            refusal="".join(self.refusal) or None,
            reasoning_content="".join(self.reasoning) or None,
            tool_calls=calls or None,
        )

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        self.reason = reason
        self.usage = usage

    async def error(self, exc: GatewayError) -> None:
        self.failure = exc


async def list_models(request: Request) -> Response:
    """`GET /api/models` in OpenAI's list format; `unavailable` names providers not listed."""
    catalog: Catalog = request.app.state.catalog
    snapshot = await catalog.snapshot()
    return Response(snapshot.models_body, media_type="application/json")


async def model_categories(request: Request) -> Response:
    """`GET /api/models/categories`: the same models grouped by category, with attributes."""
    catalog: Catalog = request.app.state.catalog
    snapshot = await catalog.snapshot()
    return Response(snapshot.categories_body, media_type="application/json")
