"""Adapter for OpenAI and any OpenAI-compatible server (vLLM, Ollama, OpenRouter, ...)."""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import httpx2
import msgspec
import openai
from openai._constants import RAW_RESPONSE_HEADER
from openai._models import FinalRequestOptions

from providers import errors
from providers.base import Outlet, PushReader
from providers.capabilities import EVERYTHING, Capabilities
from providers.prebuilt import Prebuilt, sdk_request
from providers.settings import ProviderSettings
from providers.sse import SSEDecoder, body_chunks
from providers.transport import http_client
from providers.types import (
    ChatRequest,
    Delta,
    Event,
    Finish,
    FinishReason,
    Message,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int | None = None  # some compatible servers leave it out: then the list position
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # vLLM, DeepSeek
    reasoning: str | None = None  # OpenRouter
    refusal: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Error(msgspec.Struct):
    message: str | None = None
    type: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: _Error | str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode_body = msgspec.json.Encoder().encode
_DONE = b"[DONE]"
_to_builtins = msgspec.to_builtins
# What the SDK's `create` takes by name; other options (e.g. `top_k`) go in its `extra_body`.
_SDK_PARAMS = frozenset(inspect.signature(openai.resources.chat.AsyncCompletions.create).parameters)
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
# OpenAI itself has no `top_k`; compatible servers (vLLM, llama.cpp, Ollama, ...) take it.
_OFFICIAL = Capabilities(
    options=EVERYTHING.options - {"top_k"},
    parts=EVERYTHING.parts,
)


class OpenAIProvider:
    """Streams chat completions through `openai.AsyncOpenAI`.

    The SDK builds the request (auth, base URL, its headers) and its errors; the SSE body is
    decoded here with msgspec straight into small Structs, which is several times cheaper
    per chunk than the SDK's pydantic chunk objects and yields only what the gateway uses.

    Given `http` (the client's own httpx2 client, as `create` builds it), a request is not
    built by the SDK's `create` each time, whose parameter transform and option handling cost
    more CPU than relaying a whole short answer: the SDK builds one request once, and each
    request reuses its URL, headers and timeouts with a new JSON body (see `_send`).
    """

    def __init__(
        self,
        *,
        name: str,
        client: openai.AsyncOpenAI,
        secret: str | None = None,
        official: bool = True,
        stream_usage: bool = True,
        list_timeout: float = 10.0,
        inputs: Iterable[str] | None = None,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._client = client
        self._http = http
        self._prebuilt = Prebuilt(
            lambda: sdk_request(
                client, "/chat/completions", FinalRequestOptions, RAW_RESPONSE_HEADER
            ),
            status_error=client._make_status_error_from_response,
            timeout_error=openai.APITimeoutError,
            connection_error=openai.APIConnectionError,
        )
        self._secrets = (secret,) if secret else ()
        self._official = official
        self._stream_usage = stream_usage
        self._list_timeout = list_timeout
        self.capabilities = (_OFFICIAL if official else EVERYTHING).restricted(inputs)

    def check(self, request: ChatRequest) -> None:
        self.capabilities.check(self.name, request)

    async def stream(
        self, request: ChatRequest, outlet: Outlet | None = None
    ) -> AsyncGenerator[Event, None]:
        params = self._params(request)
        reader = _Reader(self.name, self._secrets, outlet)
        try:
            # One generator from the upstream's bytes to our events: each layer of async
            # iteration costs on every relayed chunk.
            async with self._response(params) as response:
                chunks = body_chunks(response)
                if outlet is not None:
                    reader.hook(chunks)
                async for raw in chunks:
                    for event in reader.read(raw):
                        yield event
                    if reader.failure is not None:
                        raise reader.failure
        except openai.APIError as exc:
            raise translate(self.name, exc, self._secrets) from exc
        except httpx2.TransportError as exc:
            raise errors.from_transport(self.name, exc) from exc
        if reader.reason is None and not reader.done:
            raise errors.UpstreamProtocolError(
                f"{self.name}: upstream ended the stream without finishing the answer"
            )
        yield Finish(reason=reader.reason or "stop", usage=reader.usage)

    @contextlib.asynccontextmanager
    async def _response(self, params: dict[str, Any]) -> AsyncIterator[httpx2.Response]:
        """The upstream's streamed response, closed on the way out."""
        if self._http is None:
            async with self._client.chat.completions.with_streaming_response.create(
                **params
            ) as sdk_response:
                yield sdk_response.http_response
            return
        response = await self._send(self._http, params)
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(self, http: httpx2.AsyncClient, params: dict[str, Any]) -> httpx2.Response:
        """Send what `create(**params)` would send and fail as it would: the SDK's own errors
        for a failed send or a status other than 2xx; the response is left unread."""
        extra = params.pop("extra_body", None)
        return await self._prebuilt.send(
            http, _encode_body({**params, **extra} if extra else params)
        )

    def _params(self, request: ChatRequest) -> dict[str, Any]:
        """The request in OpenAI's shape: our Structs mirror it, so each encodes as it is."""
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [self._message(m) for m in request.messages],
            "stream": True,
        }
        if self._stream_usage:
            params["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            # OpenAI itself wants the newer name (o-series models reject `max_tokens`);
            # compatible servers reliably know only the older one.
            key = "max_completion_tokens" if self._official else "max_tokens"
            params[key] = request.max_tokens
        if request.stop is not None:
            params["stop"] = request.stop
        extra: dict[str, Any] = {}
        for field, value in request.options().items():
            (params if field in _SDK_PARAMS else extra)[field] = _to_builtins(value)
        if extra:
            params["extra_body"] = extra  # fields compatible servers take beyond OpenAI's own
        return params

    def _message(self, message: Message) -> dict[str, Any]:
        out: dict[str, Any] = _to_builtins(message)
        if message.content is None:
            out["content"] = None  # explicit, as OpenAI writes it: some servers want the key
        if message.role == "developer" and not self._official:
            out["role"] = "system"
        if message.reasoning_content is not None and self._official:
            # Reasoning a client echoes back from an earlier answer: OpenAI has no input for
            # it (its models keep their own reasoning), compatible servers may take it.
            del out["reasoning_content"]
        return out

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """None: OpenAI-kind APIs have no token-count endpoint."""
        return None

    async def list_models(self) -> list[str]:
        try:
            page = await self._client.models.list(timeout=self._list_timeout)
            return [model.id async for model in page]
        except openai.APIError as exc:
            raise translate(self.name, exc, self._secrets) from exc

    async def aclose(self) -> None:
        await self._client.close()


class _Reader(PushReader):
    """One upstream stream's decoding: its SSE events into our deltas, the finish reason and
    usage noted on the way. Both the stream's iterator and, while the iterator waits for
    bytes, the upstream connection's read callback (`push`) feed it, never both at once."""

    __slots__ = ("name", "secrets", "decoder", "opened", "reason", "usage", "done")

    def __init__(self, name: str, secrets: tuple[str, ...], outlet: Outlet | None) -> None:
        super().__init__(outlet)
        self.name = name
        self.secrets = secrets
        self.decoder = SSEDecoder()
        self.opened: dict[int, str] = {}  # ids of the tool calls whose head (id, name) went out
        self.reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.done = False

    def events(self, raw: bytes) -> list[Delta]:
        """The deltas of the bytes read; a broken or in-band error event sets `failure` and
        ends the list (the deltas before it still count)."""
        out: list[Delta] = []
        for _, data in self.decoder.feed(raw):
            if data == _DONE:
                self.done = True
                continue
            try:
                chunk = _decode_chunk(data)
            except msgspec.DecodeError as exc:
                failure = errors.UpstreamProtocolError(
                    f"{self.name}: upstream sent an unreadable chunk"
                )
                failure.__cause__ = exc
                self.failure = failure
                return out
            if chunk.error is not None:
                self.failure = self._inband(chunk.error)
                return out
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content:
                    out.append(TextDelta(delta.content))
                reasoning = delta.reasoning_content or delta.reasoning
                if reasoning:
                    out.append(ReasoningDelta(reasoning))
                if delta.tool_calls:
                    for position, call in enumerate(delta.tool_calls):
                        out.append(_tool_call(call, position, self.opened))
                if delta.refusal:
                    out.append(RefusalDelta(delta.refusal))
                if choice.finish_reason is not None:
                    self.reason = _FINISH.get(choice.finish_reason, "stop")
            if chunk.usage is not None:
                self.usage = Usage(
                    prompt_tokens=chunk.usage.prompt_tokens,
                    completion_tokens=chunk.usage.completion_tokens,
                )
        return out

    def _inband(self, error: _Error | str) -> errors.ProviderError:
        if isinstance(error, str):
            return errors.from_inband(self.name, None, error, self.secrets)
        return errors.from_inband(self.name, error.type, error.message, self.secrets)


def _tool_call(call: _ToolCall, position: int, opened: dict[int, str]) -> ToolCallDelta:
    """One piece of a call in OpenAI's own shape, whatever the server's habits: the id and
    name once, on the call's first piece (some servers repeat them on every piece, which
    clients would join into one long id; some leave the id out, which clients need)."""
    function = call.function
    name = function.name if function is not None else None
    arguments = (function.arguments or "") if function is not None else ""
    index = call.index
    if index is None:
        index = _unnumbered(call.id, name, position, opened)
    if index in opened:
        return ToolCallDelta(index=index, arguments=arguments)
    call_id = opened[index] = call.id or f"call_{uuid.uuid4().hex[:24]}"
    return ToolCallDelta(index=index, id=call_id, name=name, arguments=arguments)


def _unnumbered(
    call_id: str | None, name: str | None, position: int, opened: dict[int, str]
) -> int:
    """The index of a piece a server sent without one: a known id's call; a piece that opens a
    call (a new id, or a name) the next free index, so calls sent one per chunk stay apart;
    a bare fragment the call opened last, or its place when a chunk holds several."""
    if call_id is not None:
        for index, known in opened.items():
            if known == call_id:
                return index
    if call_id is not None or name is not None:
        return position if position not in opened else len(opened)
    if position == 0 and opened:
        return next(reversed(opened))
    return position


OPENAI_URL = "https://api.openai.com/v1"


def translate(
    provider: str, exc: openai.APIError, secrets: Iterable[str] = ()
) -> errors.ProviderError:
    """Translate an `openai` SDK exception into the gateway's error tree."""
    return errors.from_sdk(openai, provider, exc, secrets)


def create(settings: ProviderSettings, key: str) -> OpenAIProvider:
    """An adapter with its own client and connection pool for one `[[providers]]` table."""
    http = http_client(settings)
    base_url = settings.base_url or OPENAI_URL
    client = openai.AsyncOpenAI(
        api_key=key or "unused",
        base_url=base_url,
        max_retries=0,
        timeout=http.timeout,
        http_client=http,
    )
    return OpenAIProvider(
        name=settings.name,
        client=client,
        secret=key or None,
        official=base_url.rstrip("/") == OPENAI_URL,
        stream_usage=settings.stream_usage,
        inputs=settings.inputs,
        http=http,
    )
