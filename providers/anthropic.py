"""Adapter for Anthropic's Messages API: the request is mapped in `anthropic_params`, the SSE
answer is decoded here into our events (text, thinking, tool calls fragment by fragment)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import anthropic
import httpx2
import msgspec
from anthropic._constants import RAW_RESPONSE_HEADER
from anthropic._models import FinalRequestOptions

from providers import errors
from providers.anthropic_params import CAPABILITIES, params
from providers.base import Outlet, PushReader
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
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _StartedMessage(msgspec.Struct):
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _MessageStart(msgspec.Struct):
    message: _StartedMessage


class _Block(msgspec.Struct):
    """A content block or a block delta: only the fields the gateway relays are decoded."""

    type: str = ""
    text: str | None = None
    thinking: str | None = None
    partial_json: str | None = None  # input_json_delta
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use


class _BlockStart(msgspec.Struct):
    content_block: _Block
    index: int = 0


class _BlockDelta(msgspec.Struct):
    delta: _Block
    index: int = 0


class _BlockStop(msgspec.Struct):
    index: int = 0


class _MessageDeltaBody(msgspec.Struct):
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _MessageDelta(msgspec.Struct):
    delta: _MessageDeltaBody = msgspec.field(default_factory=_MessageDeltaBody)
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct):
    type: str | None = None
    message: str | None = None


class _Error(msgspec.Struct):
    error: _ErrorBody = msgspec.field(default_factory=_ErrorBody)


_decode_start = msgspec.json.Decoder(_MessageStart).decode
_decode_block_start = msgspec.json.Decoder(_BlockStart).decode
_decode_block_delta = msgspec.json.Decoder(_BlockDelta).decode
_decode_block_stop = msgspec.json.Decoder(_BlockStop).decode
_decode_message_delta = msgspec.json.Decoder(_MessageDelta).decode
_decode_error = msgspec.json.Decoder(_Error).decode

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


_encode_body = msgspec.json.Encoder().encode


def _prompt_tokens(usage: _Usage) -> int:
    """Anthropic counts cached input apart; a client wants the whole prompt."""
    return (
        (usage.input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )


class AnthropicProvider:
    """Streams messages through `anthropic.AsyncAnthropic`, decoding the SSE body with msgspec.

    Given `http` (the client's own httpx2 client, as `create` builds it), a request is not
    built by the SDK's `create` each time: the SDK builds one once, and each request reuses
    its URL, headers and timeouts with a new JSON body (`providers.prebuilt`).
    """

    def __init__(
        self,
        *,
        name: str,
        client: anthropic.AsyncAnthropic,
        secret: str | None = None,
        default_max_tokens: int = 4096,
        list_timeout: float = 10.0,
        inputs: Iterable[str] | None = None,
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        self.name = name
        self._client = client
        self._http = http
        self._prebuilt = Prebuilt(
            lambda: sdk_request(client, "/v1/messages", FinalRequestOptions, RAW_RESPONSE_HEADER),
            status_error=client._make_status_error_from_response,
            timeout_error=anthropic.APITimeoutError,
            connection_error=anthropic.APIConnectionError,
        )
        self._secrets = (secret,) if secret else ()
        self._default_max_tokens = default_max_tokens
        self._list_timeout = list_timeout
        self.capabilities = CAPABILITIES.restricted(inputs)

    def check(self, request: ChatRequest) -> None:
        """Refuse unsupported options, then anything the mapping itself refuses (a PDF-less
        file part, tool-call arguments that are not JSON, too small a max_tokens, ...)."""
        self.capabilities.check(self.name, request)
        params(request, self._default_max_tokens)

    async def stream(
        self, request: ChatRequest, outlet: Outlet | None = None
    ) -> AsyncGenerator[Event, None]:
        # Every event comes out of the iterator (the `outlet` is not written to yet).
        kwargs = params(request, self._default_max_tokens)
        reader = _Reader(self.name, self._secrets, outlet)
        try:
            # One generator from the upstream's bytes to our events, as in the OpenAI adapter.
            async with self._response(kwargs) as response:
                chunks = body_chunks(response)
                if outlet is not None:
                    reader.hook(chunks)
                async for raw in chunks:
                    for event in reader.read(raw):
                        yield event
                    if reader.failure is not None:
                        raise reader.failure
                    if reader.finish is not None:
                        break  # message_stop: whatever follows is not this answer's
        except anthropic.APIError as exc:
            raise translate(self.name, exc, self._secrets) from exc
        except httpx2.TransportError as exc:
            raise errors.from_transport(self.name, exc) from exc
        if reader.finish is None:
            raise errors.UpstreamProtocolError(
                f"{self.name}: upstream ended the stream without finishing the answer"
            )
        yield reader.finish

    @contextlib.asynccontextmanager
    async def _response(self, kwargs: dict[str, Any]) -> AsyncIterator[httpx2.Response]:
        """The upstream's streamed response, closed on the way out."""
        if self._http is None:
            create = self._client.messages.with_streaming_response.create
            async with create(**kwargs) as sdk_response:
                yield sdk_response.http_response
            return
        response = await self._prebuilt.send(self._http, _encode_body(kwargs))
        try:
            yield response
        finally:
            await response.aclose()

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """Anthropic's own count (`/v1/messages/count_tokens`) of the request's input."""
        kwargs = {
            k: v for k, v in params(request, self._default_max_tokens).items() if k in _COUNTED
        }
        try:
            result = await self._client.messages.count_tokens(**kwargs, timeout=self._list_timeout)
        except anthropic.APIError as exc:
            raise translate(self.name, exc, self._secrets) from exc
        except httpx2.TransportError as exc:
            raise errors.from_transport(self.name, exc) from exc
        return result.input_tokens

    async def list_models(self) -> list[str]:
        try:
            page = await self._client.models.list(timeout=self._list_timeout, limit=1000)
            return [model.id async for model in page]
        except anthropic.APIError as exc:
            raise translate(self.name, exc, self._secrets) from exc

    async def aclose(self) -> None:
        await self._client.close()


class _Reader(PushReader):
    """One upstream stream's decoding: Anthropic's events into our deltas, the usage and stop
    reason noted on the way, `finish` set at `message_stop`. Both the stream's iterator and,
    while the iterator waits for bytes, the upstream connection's read callback (`push`)
    feed it, never both at once."""

    __slots__ = (
        "name",
        "secrets",
        "decoder",
        "prompt_tokens",
        "completion_tokens",
        "reason",
        "stop_sequence",
        "tool_index",
        "no_input",
        "finish",
    )

    def __init__(self, name: str, secrets: tuple[str, ...], outlet: Outlet | None) -> None:
        super().__init__(outlet)
        self.name = name
        self.secrets = secrets
        self.decoder = SSEDecoder()
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.reason: FinishReason | None = None
        self.stop_sequence: str | None = None
        # Anthropic numbers content blocks; a client numbers tool calls from 0.
        self.tool_index: dict[int, int] = {}
        # Tool blocks with no argument fragment yet: a call without input streams none, and
        # its arguments must still read as the JSON object `{}`, as OpenAI's do.
        self.no_input: set[int] = set()
        self.finish: Finish | None = None

    def woken(self) -> bool:
        return self.finish is not None

    def events(self, raw: bytes) -> list[Delta]:
        out: list[Delta] = []
        if self.finish is not None or self.failure is not None:
            return out
        for name, data in self.decoder.feed(raw):
            try:
                if self._event(name, data, out):
                    break
            except msgspec.DecodeError as exc:
                failure = errors.UpstreamProtocolError(
                    f"{self.name}: upstream sent an unreadable event"
                )
                failure.__cause__ = exc
                self.failure = failure
                break
        return out

    def _event(self, name: bytes | None, data: bytes, out: list[Delta]) -> bool:
        """Decode one event into `out`; True when nothing after it belongs to the answer."""
        if name == b"content_block_delta":
            block_delta = _decode_block_delta(data)
            delta = block_delta.delta
            if delta.text:
                out.append(TextDelta(delta.text))
            elif delta.thinking:
                out.append(ReasoningDelta(delta.thinking))
            elif delta.partial_json and block_delta.index in self.tool_index:
                self.no_input.discard(block_delta.index)
                out.append(
                    ToolCallDelta(self.tool_index[block_delta.index], arguments=delta.partial_json)
                )
        elif name == b"content_block_start":
            start = _decode_block_start(data)
            block = start.content_block
            if block.text:
                out.append(TextDelta(block.text))
            elif block.thinking:
                out.append(ReasoningDelta(block.thinking))
            elif block.type == "tool_use":
                index = self.tool_index[start.index] = len(self.tool_index)
                self.no_input.add(start.index)
                out.append(ToolCallDelta(index, id=block.id, name=block.name))
        elif name == b"message_start":
            usage = _decode_start(data).message.usage
            self.prompt_tokens = _prompt_tokens(usage)
            self.completion_tokens = usage.output_tokens
        elif name == b"message_delta":
            message_delta = _decode_message_delta(data)
            if message_delta.delta.stop_reason is not None:
                self.reason = _FINISH.get(message_delta.delta.stop_reason, "stop")
                self.stop_sequence = message_delta.delta.stop_sequence
            if message_delta.usage is not None:
                if message_delta.usage.output_tokens is not None:
                    self.completion_tokens = message_delta.usage.output_tokens
                if message_delta.usage.input_tokens is not None:
                    self.prompt_tokens = _prompt_tokens(message_delta.usage)
        elif name == b"content_block_stop" and self.no_input:
            stopped = _decode_block_stop(data).index
            if stopped in self.no_input:
                self.no_input.discard(stopped)
                out.append(ToolCallDelta(self.tool_index[stopped], arguments="{}"))
        elif name == b"message_stop":
            counted = None
            if self.prompt_tokens is not None or self.completion_tokens is not None:
                counted = Usage(
                    prompt_tokens=self.prompt_tokens or 0,
                    completion_tokens=self.completion_tokens or 0,
                )
            self.finish = Finish(
                reason=self.reason or "stop", usage=counted, stop_sequence=self.stop_sequence
            )
            return True
        elif name == b"error":
            body = _decode_error(data).error
            self.failure = errors.from_inband(self.name, body.type, body.message, self.secrets)
            return True
        # ping, content_block_stop and event types added later carry nothing we relay.
        return False


ANTHROPIC_URL = "https://api.anthropic.com"
# The parameters of a message that `count_tokens` takes too.
_COUNTED = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config"}
)


def translate(
    provider: str, exc: anthropic.APIError, secrets: Iterable[str] = ()
) -> errors.ProviderError:
    """Translate an `anthropic` SDK exception into the gateway's error tree."""
    return errors.from_sdk(anthropic, provider, exc, secrets)


def create(settings: ProviderSettings, key: str) -> AnthropicProvider:
    """An adapter with its own client and connection pool for one `[[providers]]` table."""
    http = http_client(settings)
    client = anthropic.AsyncAnthropic(
        api_key=key or "unused",
        base_url=settings.base_url or ANTHROPIC_URL,
        max_retries=0,
        timeout=http.timeout,
        http_client=http,
    )
    return AnthropicProvider(
        name=settings.name,
        client=client,
        secret=key or None,
        default_max_tokens=settings.default_max_tokens,
        inputs=settings.inputs,
        http=http,
    )
