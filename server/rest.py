"""The OpenAI-compatible REST API: chat completions (JSON or SSE) and the model list."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from providers.errors import GatewayError
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
from server.limits import Limits
from server.ratelimit import current_principal
from server.settings import ServerSettings
from server.sse import CACHE_HIT_HEADER, SSE_HEADERS, SSESink, stream_sse
from server.stream_state import StreamState
from server.streaming import race, watch_disconnect

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        send = direct_body(scope, send)
        headers = header_map(scope)
        rid = request_id_of(scope)
        try:
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
    """`POST /api/chat/completions`: one code path for JSON and SSE."""

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
        if stream:
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
        if not await collect(self._service, prepared, state, receive, collector):
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


async def collect(
    service: ChatService,
    prepared: Prepared,
    state: StreamState,
    receive: Receive,
    collector: Collector,
) -> bool:
    """Run the stream into `collector`; False when the client went away (which cancels it)."""
    return await race(service.run(prepared, collector, state), watch_disconnect(receive, state))


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
