"""The OpenAI Responses routes: `POST /api/responses` and `GET`/`DELETE /api/responses/{id}`
(with `POST /api/responses/{id}/cancel` answered clearly: there are no background responses).

A Responses request runs through the same admission (limits, routing, capability checks, stream
slots) and the one stream service as the other dialects; only the codec differs. With `store`
(the default) the answer is kept in the `ResponseStore` before its last event is sent, so a
client that reads `response.completed` can continue at once on any replica.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Send

from providers.errors import GatewayError, InvalidRequestError
from providers.types import ChatRequest, Message, Usage
from server import protocol
from server.chat import ChatService, Prepared
from server.dialects import responses, responses_items, responses_wire
from server.dialects.responses_wire import Item, ResponseObject
from server.errors import ErrorEnvelope, error_body, spec_for
from server.http import request_id_of, send_error, send_json
from server.limits import Limits
from server.ratelimit import current_principal
from server.response_store import ResponseStore, StoredResponse, owner_of
from server.rest import Collector, DialectEndpoint, collect
from server.settings import ServerSettings
from server.sse import CACHE_HIT_HEADER, SSE_HEADERS, stream_sse
from server.stream_state import StreamState


class Turn:
    """One decoded Responses request: its body, the conversation so far (stored history and
    this input, without instructions), its new id and whose it is."""

    __slots__ = ("body", "conversation", "response_id", "owner")

    def __init__(
        self, body: responses.ResponsesBody, conversation: list[Message], owner: str
    ) -> None:
        self.body = body
        self.conversation = conversation
        self.response_id = responses_wire.new_id("resp")
        self.owner = owner


class Responses(DialectEndpoint[Turn]):
    """`POST /api/responses`: a `response` object, or its SSE events when `stream` is set."""

    def __init__(
        self,
        service: ChatService,
        settings: ServerSettings,
        limits: Limits | None,
        store: ResponseStore,
    ) -> None:
        super().__init__(service, settings, limits)
        self._store = store

    async def send_error(self, send: Send, exc: GatewayError, rid: str) -> None:
        """The error, its `param` named as a Responses request names the field."""
        if exc.param is not None:
            exc.param = responses_param(exc.param)
        await send_error(send, exc, rid)

    async def read(self, raw: bytes) -> tuple[Turn, ChatRequest]:
        body = responses.decode_body(raw)
        given = responses.input_messages(body)
        owner = owner_of(current_principal.get())
        history: list[Message] = []
        if body.previous_response_id is not None:
            record = await self._store.load(
                body.previous_response_id, owner, "previous_response_id"
            )
            history = record.history
        request = responses.to_request(body, history, given)
        if self._limits is not None:
            self._limits.check_body(request)
        return Turn(body, history + given, owner), request

    async def respond(
        self,
        body: Turn,
        prepared: Prepared,
        headers: dict[bytes, bytes],
        rid: str,
        started: float,
        receive: Receive,
        send: Send,
    ) -> None:
        turn = body
        stream = bool(turn.body.stream)
        state = StreamState(rid, started, "sse" if stream else "rest")
        response = responses_wire.skeleton(turn.body, turn.response_id, prepared.model)
        extra = [(b"x-request-id", rid.encode())]

        async def keep(final: ResponseObject, items: list[Item]) -> None:
            await self._keep(turn, final, items)

        if stream:
            sink = responses_wire.ResponsesSink(send, response, SSE_HEADERS + extra, state, keep)
            heartbeat = self._settings.sse_heartbeat
            await stream_sse(self._service, prepared, state, receive, sink, heartbeat=heartbeat)
            return
        collector = Collector()
        if not await collect(self._service, prepared, state, receive, send, collector):
            return
        if collector.failure is not None:
            await send_error(send, collector.failure, rid)
            return
        items = responses_wire.collected_items(collector)
        final = responses_wire.finished(
            response,
            [item.out() for item in items],
            collector.reason or "stop",
            collector.usage or Usage(),
            state.model,
        )
        await keep(final, items)
        if state.cached:
            extra.append(CACHE_HIT_HEADER)
        await send_json(send, 200, responses_wire.encode(final), extra)

    async def _keep(self, turn: Turn, final: ResponseObject, items: list[Item]) -> None:
        """Store the finished response and its conversation (unless `store` is false)."""
        if not turn.body.stored:
            return
        answer = responses_wire.assistant_message(items)
        history = turn.conversation + ([answer] if answer is not None else [])
        record = StoredResponse(
            turn.owner, responses_wire.encode(final), history, len(turn.conversation)
        )
        await self._store.save(turn.response_id, record)


# The typed request's fields that a Responses request names otherwise (for the provider checks
# and the limits, which speak of the typed request).
_PARAMS = {
    "max_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "response_format": "text.format",
    "verbosity": "text.verbosity",
}


def responses_param(param: str) -> str:
    """A typed request's field as the Responses request names it (`messages[..]` is `input`)."""
    if param == "messages" or param.startswith(("messages[", "messages.")):
        return "input"
    head, dot, rest = param.partition(".")
    if head.startswith("tools[") or head == "tool_choice":  # no `function` level here
        rest = rest.removeprefix("function.") if rest != "function" else ""
        dot = "." if rest else ""
    return _PARAMS.get(head, head) + dot + rest


class Deleted(msgspec.Struct, frozen=True):
    id: str
    object: str = "response.deleted"
    deleted: bool = True


_QUERY = frozenset({"include_obfuscation"})


async def retrieve(request: Request) -> Response:
    """`GET /api/responses/{response_id}`: a stored response of the caller's key, or a 404."""
    try:
        for name in request.query_params:
            if name == "stream" and request.query_params[name] in ("false", "False"):
                continue
            if name not in _QUERY:
                raise InvalidRequestError(
                    f"The query parameter '{name}' is not supported here (there are no "
                    "background responses to stream or resume).",
                    param=name,
                )
        record = await _store(request).load(request.path_params["response_id"], _owner())
    except GatewayError as exc:
        return _error(exc, request)
    return Response(record.response, media_type="application/json")


async def delete(request: Request) -> Response:
    """`DELETE /api/responses/{response_id}`: forget a stored response of the caller's key."""
    response_id = request.path_params["response_id"]
    try:
        await _store(request).delete(response_id, _owner())
    except GatewayError as exc:
        return _error(exc, request)
    return Response(protocol.encode(Deleted(response_id)), media_type="application/json")


async def list_input_items(request: Request) -> Response:
    """`GET /api/responses/{response_id}/input_items`: the conversation that led to a stored
    response, as input items, paged as OpenAI pages them."""
    response_id = request.path_params["response_id"]
    try:
        record = await _store(request).load(response_id, _owner())
        items = responses_items.input_items(record.history[: record.inputs], response_id)
        body = protocol.encode(responses_items.page(items, request.query_params))
    except GatewayError as exc:
        return _error(exc, request)
    return Response(body, media_type="application/json")


class _Status(msgspec.Struct):
    status: str = "completed"


async def cancel(request: Request) -> Response:
    """`POST /api/responses/{response_id}/cancel`: only background responses can be cancelled,
    and the gateway runs none; a streamed response is stopped by closing its connection."""
    response_id = request.path_params["response_id"]
    try:
        record = await _store(request).load(response_id, _owner())
        status = msgspec.json.decode(record.response, type=_Status).status
        raise InvalidRequestError(
            f"Only background responses can be cancelled, and the gateway runs none: the "
            f"response '{response_id}' is already {status}. To stop a response while it is "
            "streamed, close its connection; the upstream request is closed with it."
        )
    except GatewayError as exc:
        return _error(exc, request)


def _store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.responses
    return store


def _owner() -> str:
    return owner_of(current_principal.get())


def _error(exc: GatewayError, request: Request) -> Response:
    rid = request_id_of(request.scope)
    return Response(
        protocol.encode(ErrorEnvelope(error_body(exc, rid))),
        status_code=spec_for(exc).status,
        media_type="application/json",
        headers={"x-request-id": rid},
    )
