"""Anthropic Messages answers: the `message` object, the SSE event stream and the error shape.

A stream is `message_start`, then for each content block (thinking, text, tool use, in the
order the model produced them) `content_block_start`, its `content_block_delta`s and
`content_block_stop`, then `message_delta` (stop reason and usage) and `message_stop`; `ping`
events keep it alive while the first token is awaited. A failure after the headers is an
`event: error` and no `message_stop` follows. Deltas are framed from byte templates made once
per block, as the Chat Completions chunks are.

Stop reason `stop_sequence` (with the sequence) when the upstream said which stop sequence ended
the answer, as Anthropic's does; an OpenAI-kind upstream only says it stopped: `end_turn`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.types import Send

from providers.errors import GatewayError, UpstreamProtocolError
from providers.types import (
    Delta,
    FinishReason,
    ReasoningDelta,
    ToolCallDelta,
    Usage,
)
from server.errors import retry_after_header, spec_for
from server.http import send_json
from server.rest import Collector
from server.sse import EventStreamSink
from server.stream_state import StreamState

_encode = msgspec.json.Encoder().encode
_decode_input = msgspec.json.Decoder(dict).decode

STOP_REASONS: dict[FinishReason, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "cancelled": "end_turn",
    "error": "end_turn",
}

# Anthropic's error types by HTTP status; others are `invalid_request_error` below 500 and
# `api_error` from 500.
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    message: str


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""

    error: ErrorDetail
    type: str = "error"
    request_id: str | None = None


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_json(exc: GatewayError, request_id: str | None) -> bytes:
    detail = ErrorDetail(type=error_type(spec_for(exc).status), message=exc.message)
    return _encode(ErrorResponse(error=detail, request_id=request_id))


async def send_error(send: Send, exc: GatewayError, request_id: str) -> None:
    """A complete error response in Anthropic's shape, with the status and Retry-After."""
    extra = [(b"x-request-id", request_id.encode()), (b"request-id", request_id.encode())]
    extra += [(k.encode(), v.encode()) for k, v in retry_after_header(exc).items()]
    await send_json(send, spec_for(exc).status, error_json(exc, request_id), extra)


class MessageUsage(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int


class TextContent(msgspec.Struct, frozen=True, kw_only=True, tag="text", tag_field="type"):
    text: str


class ThinkingContent(msgspec.Struct, frozen=True, kw_only=True, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""


class ToolUseContent(msgspec.Struct, frozen=True, kw_only=True, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]


class MessageObject(msgspec.Struct, frozen=True, kw_only=True):
    """A complete (non-streamed) answer."""

    id: str
    model: str
    content: list[TextContent | ThinkingContent | ToolUseContent]
    stop_reason: str
    usage: MessageUsage
    stop_sequence: str | None = None
    type: str = "message"
    role: str = "assistant"


def stop_reason(reason: FinishReason, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence is not None else STOP_REASONS[reason]


def message_object(
    collector: Collector, message_id: str, model: str, stop_sequence: str | None = None
) -> MessageObject:
    """The collected answer as a `message`: thinking, then text, then the tool calls."""
    content: list[TextContent | ThinkingContent | ToolUseContent] = []
    if collector.reasoning:
        content.append(ThinkingContent(thinking="".join(collector.reasoning)))
    text = "".join(collector.text) + "".join(collector.refusal)
    if text:
        content.append(TextContent(text=text))
    for index, (ids, names, arguments) in sorted(collector.calls.items()):
        call_id = "".join(ids) or f"toolu_{message_id}_{index}"
        content.append(
            ToolUseContent(id=call_id, name="".join(names), input=_tool_input("".join(arguments)))
        )
    usage = collector.usage or Usage()
    return MessageObject(
        id=message_id,
        model=model,
        content=content,
        stop_reason=stop_reason(collector.reason or "stop", stop_sequence),
        stop_sequence=stop_sequence,
        usage=MessageUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
    )


def _tool_input(arguments: str) -> dict[str, Any]:
    if not arguments:
        return {}
    try:
        value: dict[str, Any] = _decode_input(arguments)
    except msgspec.DecodeError as exc:
        raise UpstreamProtocolError(
            "The model's tool call arguments are not a JSON object; they cannot be a tool_use "
            "input."
        ) from exc
    return value


def sse(name: bytes, data: bytes) -> bytes:
    """One named SSE event."""
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


PING = sse(b"ping", b'{"type":"ping"}')
MESSAGE_STOP = sse(b"message_stop", b'{"type":"message_stop"}')
_TEXT, _THINKING, _TOOL = 1, 2, 3
_BLOCK_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_DELTA_TYPES = {
    _TEXT: b',"delta":{"type":"text_delta","text":',
    _THINKING: b',"delta":{"type":"thinking_delta","thinking":',
    _TOOL: b',"delta":{"type":"input_json_delta","partial_json":',
}
_DELTA_TAIL = b"}}\n\n"
_TEXT_BLOCK = b'{"type":"text","text":""}'
_THINKING_BLOCK = b'{"type":"thinking","thinking":"","signature":""}'


class MessagesSink(EventStreamSink):
    """Writes one stream as Messages SSE events.

    One block is open at a time, as Anthropic streams them: a delta of another kind (or another
    tool call) stops it and starts the next. Should an upstream interleave the fragments of
    parallel tool calls, a late fragment still names its own call's block by `index`.
    """

    __slots__ = ("_id", "_kind", "_head", "_index", "_blocks", "_tools")

    def __init__(
        self, send: Send, message_id: str, headers: list[tuple[bytes, bytes]], state: StreamState
    ) -> None:
        super().__init__(send, headers, state)
        self._id = message_id
        self._kind = 0  # the kind of the block open now (0: none)
        self._head = b""  # the delta template of the block open now
        self._index = -1  # the index of the block open now
        self._blocks = 0  # blocks started so far
        self._tools: dict[int, int] = {}  # tool-call index -> its block's index

    def _message_start(self) -> bytes:
        self._opened = True
        start = (
            b'{"type":"message_start","message":{"id":'
            + _encode(self._id)
            + b',"type":"message","role":"assistant","model":'
            + _encode(self._state.model)
            + b',"content":[],"stop_reason":null,"stop_sequence":null,'
            b'"usage":{"input_tokens":0,"output_tokens":0}}}'
        )
        return sse(b"message_start", start)

    async def _opening(self) -> bytes:
        """Headers (unless a ping sent them) and `message_start`, before the first output."""
        if not self.started:
            await self._start()
        return self._message_start()

    def keepalive_event(self) -> bytes:
        # A ping follows message_start, as Anthropic's do.
        return PING if self._opened else self._message_start() + PING

    def _switch(self, kind: int, block: bytes) -> bytes:
        """Stop the open block and start a new one of `kind`; returns those events."""
        out = self._stop_current()
        index = self._blocks
        self._blocks += 1
        self._kind, self._index = kind, index
        self._head = _BLOCK_DELTA + str(index).encode() + _DELTA_TYPES[kind]
        start = (
            b'{"type":"content_block_start","index":'
            + str(index).encode()
            + b',"content_block":'
            + block
            + b"}"
        )
        return out + sse(b"content_block_start", start)

    def _stop_current(self) -> bytes:
        if self._kind == 0:
            return b""
        self._kind = 0
        return _block_stop(self._index)

    def _frame(self, event: Delta) -> bytes:
        if isinstance(event, ToolCallDelta):
            opening, data = self._tool(event, b"")
        else:
            kind, block = (
                (_THINKING, _THINKING_BLOCK)
                if isinstance(event, ReasoningDelta)
                else (_TEXT, _TEXT_BLOCK)  # a refusal is text in this dialect
            )
            opening = b"" if self._kind == kind else self._switch(kind, block)
            data = self._head + _encode(event.text) + _DELTA_TAIL
        return opening + data if opening else data

    def _tool(self, delta: ToolCallDelta, opening: bytes) -> tuple[bytes, bytes]:
        block = self._tools.get(delta.index)
        if block is None:
            call_id = delta.id or f"toolu_{self._id}_{delta.index}"
            start = (
                b'{"type":"tool_use","id":'
                + _encode(call_id)
                + b',"name":'
                + _encode(delta.name or "")
                + b',"input":{}}'
            )
            opening += self._switch(_TOOL, start)
            block = self._tools[delta.index] = self._index
        if not delta.arguments:
            return opening, b""
        head = (
            self._head
            if block == self._index
            else _BLOCK_DELTA + str(block).encode() + _DELTA_TYPES[_TOOL]
        )
        return opening, head + _encode(delta.arguments) + _DELTA_TAIL

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        data = b"" if self._opened else await self._opening()
        data += self._stop_current()
        stop = self._state.stop_sequence
        delta = (
            b'{"type":"message_delta","delta":{"stop_reason":'
            + _encode(stop_reason(reason, stop))
            + b',"stop_sequence":'
            + _encode(stop)
            + b'},"usage":'
            + _encode(
                MessageUsage(
                    input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens
                )
            )
            + b"}"
        )
        await self._last(data + sse(b"message_delta", delta) + MESSAGE_STOP)

    async def error_response(self, exc: GatewayError) -> None:
        await send_error(self._send, exc, self._state.request_id)

    def error_event(self, exc: GatewayError) -> bytes:
        return sse(b"error", error_json(exc, self._state.request_id))


def _block_stop(index: int) -> bytes:
    return sse(
        b"content_block_stop",
        b'{"type":"content_block_stop","index":' + str(index).encode() + b"}",
    )
