"""The Anthropic Messages routes: `POST /api/v1/messages`, `.../messages/count_tokens`, and
the model list in Anthropic's shape (`GET /api/v1/models`, `GET /api/v1/models/{model_id}`).

Both run through the same admission as the OpenAI route (limits, routing, capability checks,
stream slots), and a Messages stream runs in the one stream service; only the codec differs.
`anthropic-version` and `anthropic-beta` headers are accepted and never forwarded: what the
gateway sends upstream is decided by the typed request alone.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from providers.errors import GatewayError, InvalidRequestError, ModelNotFoundError
from providers.types import ChatRequest, Message, ModelInfo, estimate_tokens
from server.auth import normalise_path
from server.catalog import Catalog
from server.chat import ChatService, Prepared
from server.dialects import messages, messages_wire
from server.errors import ClientGone, spec_for
from server.http import header_map, read_body, request_id_of, send_json
from server.http import send_error as send_json_error
from server.limits import Limits
from server.rest import Collector, DialectEndpoint, collect
from server.settings import ServerSettings
from server.sse import CACHE_HIT_HEADER, SSE_HEADERS, stream_sse
from server.stream_state import StreamState

_PREFIXES = ("/api/v1/", "/v1/")


def speaks_messages(path: str) -> bool:
    """Whether errors at `path` take Anthropic's shape (the Messages API's part of the tree)."""
    normal = normalise_path(path)
    return normal in ("/api/v1", "/v1") or normal.startswith(_PREFIXES)


async def send_http_error(scope: Scope, send: Send, exc: GatewayError, rid: str) -> None:
    """An error response in the shape of the dialect the request's path belongs to."""
    if speaks_messages(scope["path"]):
        await messages_wire.send_error(send, exc, rid)
    else:
        await send_json_error(send, exc, rid)


class Messages(DialectEndpoint[messages.MessagesBody]):
    """`POST /api/v1/messages`: a `message` object, or its SSE events when `stream` is set."""

    def decode(self, raw: bytes) -> tuple[messages.MessagesBody, ChatRequest]:
        body = messages.decode_messages(raw)
        request = messages.to_request(body)
        if self._limits is not None:
            self._limits.check_body(request)
        return body, request

    async def send_error(self, send: Send, exc: GatewayError, rid: str) -> None:
        await messages_wire.send_error(send, exc, rid)

    async def respond(
        self,
        body: messages.MessagesBody,
        prepared: Prepared,
        headers: dict[bytes, bytes],
        rid: str,
        started: float,
        receive: Receive,
        send: Send,
    ) -> None:
        stream = bool(body.stream)
        state = StreamState(rid, started, "sse" if stream else "rest")
        message_id = f"msg_{rid}"
        extra = [(b"x-request-id", rid.encode()), (b"request-id", rid.encode())]
        if stream:
            sink = messages_wire.MessagesSink(send, message_id, SSE_HEADERS + extra, state)
            heartbeat = self._settings.sse_heartbeat
            await stream_sse(self._service, prepared, state, receive, sink, heartbeat=heartbeat)
            return
        collector = Collector()
        if not await collect(self._service, prepared, state, receive, send, collector):
            return
        try:
            if collector.failure is not None:
                raise collector.failure
            answer = messages_wire.message_object(
                collector, message_id, state.model, state.stop_sequence
            )
        except GatewayError as exc:
            await messages_wire.send_error(send, exc, rid)
            return
        if state.cached:
            extra.append(CACHE_HIT_HEADER)
        await send_json(send, 200, _encode(answer), extra)


class TokenCount(msgspec.Struct, frozen=True):
    input_tokens: int


_encode = msgspec.json.Encoder().encode


class CountTokens:
    """`POST /api/v1/messages/count_tokens`: the input tokens of a Messages request.

    The request is decoded, checked and routed as a Messages request is (an unknown model is a
    404, a field its provider cannot honour a 400), and the stream service asks a provider
    that can count (Anthropic's); for the others the gateway estimates: text (the system
    prompt, the turns, tool results and reasoning) one token per whitespace-separated word, as
    the gateway counts when an upstream reports no usage, and JSON (tool call inputs and tool
    definitions) one token per four characters; images and documents are not counted.
    """

    def __init__(
        self, service: ChatService, settings: ServerSettings, limits: Limits | None = None
    ) -> None:
        self._service = service
        self._settings = settings
        self._limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = request_id_of(scope)
        headers = header_map(scope)
        try:
            raw = await read_body(
                receive, headers, self._settings.max_body_bytes, self._settings.body_timeout
            )
            body = messages.decode_count(raw)
            if self._limits is not None:
                self._limits.check_depth(raw)
            request = messages.count_request(body)
            if self._limits is not None:
                self._limits.check_body(request)
            count = await self._service.count_tokens(request)
        except ClientGone:
            return
        except GatewayError as exc:
            await messages_wire.send_error(send, exc, rid)
            return
        if count is None:
            count = estimate(request.messages, body)
        extra = [(b"x-request-id", rid.encode()), (b"request-id", rid.encode())]
        await send_json(send, 200, _encode(TokenCount(count)), extra)


def estimate(conversation: list[Message], body: messages.CountTokensBody) -> int:
    """The estimate described on `CountTokens`."""
    total = 0
    for message in conversation:
        total += estimate_tokens(message.text) + estimate_tokens(message.reasoning_content or "")
        for call in message.tool_calls or ():
            total += _json_tokens(len(call.function.name) + len(call.function.arguments))
    if body.tools:
        total += _json_tokens(len(_encode(body.tools)))
    return total


def _json_tokens(chars: int) -> int:
    return -(-chars // 4)


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A model in Anthropic's model-list shape."""

    id: str
    display_name: str
    created_at: str
    type: str = "model"


class ModelPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelEntry]
    has_more: bool
    first_id: str | None
    last_id: str | None


_PAGE_PARAMS = frozenset({"limit", "after_id", "before_id"})


def _entry(model: ModelInfo) -> ModelEntry:
    created = datetime.datetime.fromtimestamp(model.created, datetime.UTC)
    return ModelEntry(
        id=model.id,
        display_name=model.display_name or model.id,
        created_at=created.isoformat().replace("+00:00", "Z"),
    )


def _page(models: list[ModelInfo], query: Mapping[str, str]) -> ModelPage:
    """One page of the catalogue, as Anthropic pages (`limit` 1-1000, default 20)."""
    for name in query:
        if name not in _PAGE_PARAMS:
            raise InvalidRequestError(f"Unknown query parameter '{name}'.", param=name)
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidRequestError("'limit' must be a whole number from 1 to 1000.", param="limit")
    ids = [m.id for m in models]
    start, end = 0, len(models)
    for name in ("after_id", "before_id"):
        value = query.get(name)
        if value is not None and value not in ids:
            raise InvalidRequestError(f"'{name}' names no listed model.", param=name)
    if "before_id" in query:
        end = ids.index(query["before_id"])
        start = max(end - int(raw), 0)
    elif "after_id" in query:
        start = ids.index(query["after_id"]) + 1
    chosen = models[start : min(start + int(raw), end)]
    more = start > 0 if "before_id" in query else start + len(chosen) < end
    return ModelPage(
        data=[_entry(m) for m in chosen],
        has_more=more,
        first_id=chosen[0].id if chosen else None,
        last_id=chosen[-1].id if chosen else None,
    )


async def list_models(request: Request) -> Response:
    """`GET /api/v1/models`: the catalogue in Anthropic's paged model-list shape."""
    catalog: Catalog = request.app.state.catalog
    snapshot = await catalog.snapshot()
    try:
        body = _encode(_page(snapshot.models, request.query_params))
    except GatewayError as exc:
        return _error(exc, request)
    return Response(body, media_type="application/json")


async def get_model(request: Request) -> Response:
    """`GET /api/v1/models/{model_id}`: one model of the catalogue, or a 404."""
    catalog: Catalog = request.app.state.catalog
    snapshot = await catalog.snapshot()
    wanted = request.path_params["model_id"]
    for model in snapshot.models:
        if model.id == wanted:
            return Response(_encode(_entry(model)), media_type="application/json")
    error = ModelNotFoundError(f"The model '{wanted}' is not served here.", param="model_id")
    return _error(error, request)


def _error(exc: GatewayError, request: Request) -> Response:
    rid = request_id_of(request.scope)
    return Response(
        messages_wire.error_json(exc, rid),
        status_code=spec_for(exc).status,
        media_type="application/json",
    )
