"""Wire-format encoders for the fake upstream: OpenAI chat completions and Anthropic messages."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode

# Constant fragments are built once; streaming only concatenates them with per-piece JSON.
DONE = b"data: [DONE]\n\n"
_OPENAI_CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-fake-%d","object":"chat.completion.chunk","created":%d,"model":%b'
)
_ANTHROPIC_DELTA_HEAD = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":'
)
FAKE_SIGNATURE = "fake-signature"

DEFAULT_OPENAI_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4.1", "o4-mini")
DEFAULT_ANTHROPIC_MODELS: tuple[str, ...] = (
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-opus-4-1",
)

_ANTHROPIC_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
}

_OPENAI_ERROR_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}

_ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

# Default content pieces ("tok0 ", "tok1 ", ...) and their JSON forms are shared by every request.
_tok_pieces: list[str] = []
_tok_json: list[bytes] = []
_tok_lock = threading.Lock()


def default_pieces(count: int) -> list[str]:
    """Return the default content pieces ``tok0 `` ... ``tok{count-1} ``."""
    if count > len(_tok_pieces):
        # Servers on other threads' loops may grow the cache at the same time.
        with _tok_lock:
            for i in range(len(_tok_pieces), count):
                piece = f"tok{i} "
                _tok_json.append(_encode(piece))
                _tok_pieces.append(piece)
    return _tok_pieces[:count]


def _piece_json(piece: str, index: int) -> bytes:
    if index < len(_tok_json) and _tok_pieces[index] is piece:
        return _tok_json[index]
    return _encode(piece)


@dataclass(frozen=True, slots=True)
class FakeToolCall:
    """One scripted tool call; ``arguments`` is its JSON text cut into the fragments to stream."""

    name: str
    arguments: list[str]
    id: str | None = None


@dataclass(slots=True)
class Plan:
    """What one response will contain, resolved from a Script and the request body."""

    reasoning: list[str]
    content: list[str]
    finish_reason: str
    prompt_tokens: int
    tools: list[FakeToolCall] = field(default_factory=list)
    # (call, fragment) per tool slot; a call without fragments still takes one slot.
    tool_slots: list[tuple[int, int]] = field(default_factory=list)
    stop_sequence: str | None = None  # Anthropic's: which stop sequence ended the answer

    @property
    def deltas(self) -> int:
        """Number of streamed deltas (reasoning, content, then tool-call fragments)."""
        return len(self.reasoning) + len(self.content) + len(self.tool_slots)


def tool_plan(calls: list[FakeToolCall]) -> list[tuple[int, int]]:
    """The (call, fragment) slots of some tool calls, in streaming order."""
    return [(k, f) for k, call in enumerate(calls) for f in range(max(len(call.arguments), 1))]


def openai_tool_id(calls: list[FakeToolCall], k: int) -> str:
    return calls[k].id or f"call_{k}"


def anthropic_tool_id(calls: list[FakeToolCall], k: int) -> str:
    return calls[k].id or f"toolu_{k}"


def _tool_input(call: FakeToolCall) -> Any:
    text = "".join(call.arguments)
    return msgspec.json.decode(text) if text else {}


def anthropic_stop_reason(finish_reason: str) -> str:
    """Map an OpenAI finish_reason onto Anthropic's stop_reason vocabulary."""
    return _ANTHROPIC_STOP_REASONS.get(finish_reason, finish_reason)


def sse_chunk(payload: bytes) -> bytes:
    """Frame one payload as an HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class OpenAIStream:
    """Builds the SSE payloads of one streamed chat completion."""

    __slots__ = ("_head", "_include_usage", "_n_reasoning", "_n_text", "_plan", "_prefix")

    def __init__(
        self, request_id: int, model: str, created: int, plan: Plan, include_usage: bool
    ) -> None:
        self._plan = plan
        self._include_usage = include_usage
        self._head = _OPENAI_CHUNK_HEAD % (request_id, created, _encode(model))
        self._prefix = self._head + b',"choices":[{"index":0,"delta":{'
        self._n_reasoning = len(plan.reasoning)
        self._n_text = self._n_reasoning + len(plan.content)

    def opening(self) -> bytes:
        """Bytes sent right after the headers (none for OpenAI)."""
        return b""

    def delta(self, i: int) -> bytes:
        """SSE payload of delta ``i`` (reasoning pieces first, then content, then tool calls)."""
        plan = self._plan
        role = b'"role":"assistant",' if i == 0 else b""
        if i < self._n_reasoning:
            field = b'"reasoning_content":' + _encode(plan.reasoning[i])
        elif i < self._n_text:
            j = i - self._n_reasoning
            field = b'"content":' + _piece_json(plan.content[j], j)
        else:
            return self._tool_delta(i - self._n_text, role)
        return self._prefix + role + field + b'},"finish_reason":null}]}\n\n'

    def _tool_delta(self, slot: int, role: bytes) -> bytes:
        """A call's first slot announces its id and name; each fragment is one more chunk."""
        calls = self._plan.tools
        k, f = self._plan.tool_slots[slot]
        call = calls[k]
        out = b""
        if f == 0:
            head = {
                "index": k,
                "id": openai_tool_id(calls, k),
                "type": "function",
                "function": {"name": call.name, "arguments": ""},
            }
            out = self._tool_chunk(role, head)
        if f < len(call.arguments):
            out += self._tool_chunk(b"", {"index": k, "function": {"arguments": call.arguments[f]}})
        return out

    def _tool_chunk(self, role: bytes, call: dict[str, Any]) -> bytes:
        return (
            self._prefix
            + role
            + b'"tool_calls":['
            + _encode(call)
            + b']},"finish_reason":null}]}\n\n'
        )

    def finish(self) -> bytes:
        """SSE payloads after the last delta: finish chunk, optional usage chunk and [DONE]."""
        plan = self._plan
        out = self._prefix + b'},"finish_reason":' + _encode(plan.finish_reason) + b"}]}\n\n"
        if self._include_usage:
            usage = _encode(_openai_usage(plan))
            out += self._head + b',"choices":[],"usage":' + usage + b"}\n\n"
        return out + DONE

    def error(self, message: str) -> bytes:
        """In-band error event."""
        body = {
            "error": {
                "message": message,
                "type": "server_error",
                "code": "internal_error",
            }
        }
        return b"data: " + _encode(body) + b"\n\n"


def _event(name: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + _encode(data) + b"\n\n"


_PING = _event(b"ping", {"type": "ping"})
_MESSAGE_STOP = _event(b"message_stop", {"type": "message_stop"})
_THINKING_START = _event(
    b"content_block_start",
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
)
_THINKING_END = _event(
    b"content_block_delta",
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": FAKE_SIGNATURE},
    },
) + _event(b"content_block_stop", {"type": "content_block_stop", "index": 0})


def _text_start(index: int) -> bytes:
    return _event(
        b"content_block_start",
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
    )


def _delta_prefix(index: int) -> bytes:
    return _ANTHROPIC_DELTA_HEAD % index


def _block_stop(index: int) -> bytes:
    return _event(b"content_block_stop", {"type": "content_block_stop", "index": index})


def _tool_start(index: int, tool_id: str, name: str) -> bytes:
    return _event(
        b"content_block_start",
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}},
        },
    )


class AnthropicStream:
    """Builds the SSE payloads of one streamed Anthropic message."""

    __slots__ = (
        "_message_id",
        "_model",
        "_n_reasoning",
        "_n_text",
        "_plan",
        "_text_index",
        "_text_prefix",
        "_tool_index",
    )

    def __init__(self, request_id: int, model: str, plan: Plan) -> None:
        self._plan = plan
        self._message_id = f"msg_fake_{request_id}"
        self._model = model
        self._n_reasoning = len(plan.reasoning)
        self._text_index = 1 if plan.reasoning else 0
        self._text_prefix = _delta_prefix(self._text_index) + b'"text_delta","text":'
        self._n_text = self._n_reasoning + len(plan.content)
        # Tool-use blocks follow the text block, which is left out when there is no text.
        self._tool_index = self._text_index + (1 if plan.content else 0)

    def opening(self) -> bytes:
        """message_start and ping, sent together with the headers."""
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._plan.prompt_tokens, "output_tokens": 1},
        }
        return _event(b"message_start", {"type": "message_start", "message": message}) + _PING

    def delta(self, i: int) -> bytes:
        """SSE payload of delta ``i``, including any content-block boundaries that precede it."""
        n_reasoning = self._n_reasoning
        if i < n_reasoning:
            out = _THINKING_START if i == 0 else b""
            return (
                out
                + _delta_prefix(0)
                + b'"thinking_delta","thinking":'
                + _encode(self._plan.reasoning[i])
                + b"}}\n\n"
            )
        if i >= self._n_text:
            return self._tool_delta(i - self._n_text)
        j = i - n_reasoning
        out = b""
        if j == 0:
            if n_reasoning:
                out = _THINKING_END
            out += _text_start(self._text_index)
        return out + self._text_prefix + _piece_json(self._plan.content[j], j) + b"}}\n\n"

    def _tool_delta(self, slot: int) -> bytes:
        """A call's first slot closes the block before it and opens its tool_use block."""
        plan = self._plan
        k, f = plan.tool_slots[slot]
        call = plan.tools[k]
        index = self._tool_index + k
        out = b""
        if f == 0:
            if k:
                out = _block_stop(index - 1)
            elif plan.content:
                out = _block_stop(self._text_index)
            elif plan.reasoning:
                out = _THINKING_END
            out += _tool_start(index, anthropic_tool_id(plan.tools, k), call.name)
        if f < len(call.arguments):
            out += (
                _delta_prefix(index)
                + b'"input_json_delta","partial_json":'
                + _encode(call.arguments[f])
                + b"}}\n\n"
            )
        return out

    def finish(self) -> bytes:
        """Closes the open blocks, then message_delta and message_stop."""
        plan = self._plan
        out = b""
        if plan.tools:
            out = _block_stop(self._tool_index + len(plan.tools) - 1)
        else:
            if not plan.content:
                if plan.reasoning:
                    out = _THINKING_END
                out += _text_start(self._text_index)
            out += _block_stop(self._text_index)
        out += _event(
            b"message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": anthropic_stop_reason(plan.finish_reason),
                    "stop_sequence": plan.stop_sequence,
                },
                "usage": {"output_tokens": plan.deltas},
            },
        )
        return out + _MESSAGE_STOP

    def error(self, message: str) -> bytes:
        """In-band error event."""
        return _event(
            b"error",
            {
                "type": "error",
                "error": {"type": "overloaded_error", "message": message},
            },
        )


def _openai_usage(plan: Plan) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.deltas,
        "total_tokens": plan.prompt_tokens + plan.deltas,
    }


def openai_completion(request_id: int, model: str, created: int, plan: Plan) -> bytes:
    """Non-streamed ``chat.completion`` body."""
    text = "".join(plan.content)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if plan.reasoning:
        message["reasoning_content"] = "".join(plan.reasoning)
    if plan.tools:
        message["content"] = text or None
        message["tool_calls"] = [
            {
                "id": openai_tool_id(plan.tools, k),
                "type": "function",
                "function": {"name": call.name, "arguments": "".join(call.arguments)},
            }
            for k, call in enumerate(plan.tools)
        ]
    return _encode(
        {
            "id": f"chatcmpl-fake-{request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": plan.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _openai_usage(plan),
        }
    )


def anthropic_message(request_id: int, model: str, plan: Plan) -> bytes:
    """Non-streamed Anthropic Message body."""
    content: list[dict[str, Any]] = []
    if plan.reasoning:
        content.append(
            {
                "type": "thinking",
                "thinking": "".join(plan.reasoning),
                "signature": FAKE_SIGNATURE,
            }
        )
    if plan.content or not plan.tools:
        content.append({"type": "text", "text": "".join(plan.content)})
    content.extend(
        {
            "type": "tool_use",
            "id": anthropic_tool_id(plan.tools, k),
            "name": call.name,
            "input": _tool_input(call),
        }
        for k, call in enumerate(plan.tools)
    )
    return _encode(
        {
            "id": f"msg_fake_{request_id}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": anthropic_stop_reason(plan.finish_reason),
            "stop_sequence": plan.stop_sequence,
            "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.deltas},
        }
    )


def openai_error(status: int, message: str) -> bytes:
    """OpenAI-shaped error body for an HTTP status."""
    err_type, code = _OPENAI_ERROR_TYPES.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return _encode({"error": {"message": message, "type": err_type, "param": None, "code": code}})


def anthropic_error(status: int, message: str) -> bytes:
    """Anthropic-shaped error body for an HTTP status."""
    err_type = _ANTHROPIC_ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return _encode({"type": "error", "error": {"type": err_type, "message": message}})


def openai_models(models: list[str]) -> bytes:
    """OpenAI ``GET /v1/models`` body."""
    return _encode(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in models
            ],
        }
    )


def anthropic_models(models: list[str]) -> bytes:
    """Anthropic ``GET /v1/models`` body."""
    data = [
        {
            "type": "model",
            "id": m,
            "display_name": m,
            "created_at": "2025-01-01T00:00:00Z",
        }
        for m in models
    ]
    return _encode(
        {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    )
