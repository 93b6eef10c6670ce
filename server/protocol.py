"""Wire types: the OpenAI-compatible request and response bodies and the SSE chunk framing.

Decoders and encoders are built once here. Stream chunks are framed from byte templates made
once per stream, so relaying a delta costs one JSON string encode and two concatenations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec

from providers import validation
from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import (
    OPTION_FIELDS,
    ChatRequest,
    FinishReason,
    Message,
    Options,
    ToolCallDelta,
    Usage,
)

T = TypeVar("T")
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None  # null, as clients may send it, is false
    include_obfuscation: bool | None = None  # OpenAI's padding; nothing to pad here


class ChatCompletionBody(Options, frozen=True, kw_only=True):
    """The body of `POST /api/chat/completions` (and of a WebSocket `chat.start`).

    Every documented Chat Completions field is typed here (most of them in `Options`, shared
    with the provider-facing `ChatRequest`). A field the gateway does not know is refused with
    an error naming it, as OpenAI does, so nothing a client sets is dropped on the way; the
    few known features the gateway cannot relay are refused by `check`.
    """

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    # Known, and refused when used (see `check`).
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None

    def check(self) -> None:
        """Refuse what cannot be relayed, and a conversation or tool set that cannot be valid."""
        refused = (
            ("n", self.n not in (None, 1), "n > 1 (several choices) is not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            (
                "functions",
                bool(self.functions),
                "the legacy 'functions' parameter is not supported; send 'tools' instead",
            ),
            (
                "function_call",
                self.function_call not in (None, "none"),
                "the legacy 'function_call' parameter is not supported; send 'tool_choice'",
            ),
            ("audio", self.audio is not None, "audio output is not supported"),
        )
        for param, used, message in refused:
            if used:
                raise UnsupportedFeatureError(message, param=param)
        if self.max_tokens not in (None, self.max_completion_tokens) and (
            self.max_completion_tokens is not None
        ):
            raise InvalidRequestError(
                "'max_tokens' and 'max_completion_tokens' are both set, to different values; "
                "set one of them.",
                param="max_tokens",
            )
        validation.check_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        validation.check_messages(self.messages)

    def to_request(self, upstream_model: str) -> ChatRequest:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return ChatRequest(
            model=upstream_model,
            messages=self.messages,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            stop=stop or None,
            **{f: v for f in OPTION_FIELDS if (v := getattr(self, f)) is not None},
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


def chat_request(body: ChatCompletionBody) -> ChatRequest:
    """The checked body as the typed request, its `model` the id the client asked for."""
    body.check()
    return body.to_request(body.model)


_decode_body = msgspec.json.Decoder(ChatCompletionBody).decode


def decode_body(data: bytes) -> ChatCompletionBody:
    """Decode and validate a request body; errors name the offending field."""
    return decode_json(_decode_body, data)


def decode_json(decoder: Callable[[bytes], T], data: bytes) -> T:
    """Decode one dialect's request body; every failure is a 400 naming the field it can."""
    if not data.strip():
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return decoder(data)
    except msgspec.ValidationError as exc:
        message, param = _split_location(str(exc))
        where = f" at '{param}'" if param else ""
        raise InvalidRequestError(f"Invalid request body{where}: {message}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:  # a string that is not UTF-8
        raise InvalidRequestError("The request body is not valid UTF-8.") from exc
    except RecursionError as exc:  # nesting deeper than the decoder follows
        raise InvalidRequestError("The request body nests too deeply.") from exc


_UNKNOWN = "Object contains unknown field `"


_MISSING = re.compile(r"^Object missing required field `([^`]+)`$")


def _split_location(text: str) -> tuple[str, str | None]:
    """msgspec says "Expected `int`, got `str` - at `$.messages[0].role`"; split it.

    An unknown field is named in the path, so that `param` points at the field itself.
    """
    message, sep, location = text.partition(" - at `$")
    if not sep:  # a dict key: "... - at `key` in `$.logit_bias`" names the dict
        message, sep, location = text.partition(" - at `key` in `$")
        message = f"{message} (for a key)" if sep else message
    param = location.rstrip("`").lstrip(".") if sep else None
    missing = _MISSING.match(message)
    if missing:
        field = missing.group(1)
        param = f"{param}.{field}" if param else field
        return "required field missing", param
    if message.startswith(_UNKNOWN):
        field = message[len(_UNKNOWN) :].rstrip("`")
        param = f"{param}.{field}" if param else field
        return (
            f"unknown field '{field}'; it is refused rather than ignored, "
            "as no part of the gateway would carry it"
        ), param
    return message.replace("`", "'"), param or None


split_location = _split_location  # shared with the other dialects


class FunctionCallBody(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class ToolCallBody(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    type: str
    function: FunctionCallBody


class ResponseMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`content` is null (not omitted) when the answer is only tool calls, as OpenAI's is."""

    role: str
    content: str | None
    refusal: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallBody] | None = None


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class UsageBody(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> UsageBody:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A complete (non-streamed) answer."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: UsageBody


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    object: str
    data: list[ModelCard]
    unavailable: list[str] = msgspec.field(default_factory=list)


encode = msgspec.json.Encoder().encode
_encode_str = msgspec.json.Encoder().encode


class ChunkFramer:
    """Frames one stream's `chat.completion.chunk` SSE events from templates made once."""

    __slots__ = ("_head", "_first", "_delta", "_reasoning", "_refusal", "_tools", "_tail")

    def __init__(self, *, completion_id: str, created: int, model: str) -> None:
        head = (
            b'{"id":'
            + _encode_str(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + _encode_str(model)
            + b',"choices":'
        )
        self._head = b"data: " + head
        self._first = self._head + b'[{"index":0,"delta":{"role":"assistant","content":'
        self._delta = self._head + b'[{"index":0,"delta":{"content":'
        self._reasoning = self._head + b'[{"index":0,"delta":{"reasoning_content":'
        self._refusal = self._head + b'[{"index":0,"delta":{"refusal":'
        self._tools = self._head + b'[{"index":0,"delta":{"tool_calls":'
        self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        """The opening chunk: the assistant role with empty content."""
        return self._first + b'""' + self._tail

    def content(self, text: str) -> bytes:
        return self._delta + _encode_str(text) + self._tail

    def reasoning(self, text: str) -> bytes:
        return self._reasoning + _encode_str(text) + self._tail

    def refusal(self, text: str) -> bytes:
        return self._refusal + _encode_str(text) + self._tail

    def tool_call(self, delta: ToolCallDelta) -> bytes:
        return self._tools + tool_call_json(delta) + self._tail

    def finish(self, reason: FinishReason) -> bytes:
        return (
            self._head
            + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + _encode_str(reason)
            + b"}]}\n\n"
        )

    def usage(self, usage: Usage) -> bytes:
        return self._head + b'[],"usage":' + encode(UsageBody.of(usage)) + b"}\n\n"


def tool_call_json(delta: ToolCallDelta) -> bytes:
    """A tool-call delta in OpenAI's streamed shape: a one-element `tool_calls` list.

    The first piece of a call carries its id, type and name; later ones only their index and
    the next fragment of the arguments, as OpenAI streams them.
    """
    head = b'[{"index":' + str(delta.index).encode()
    if delta.id is not None:
        head += b',"id":' + _encode_str(delta.id) + b',"type":"function"'
    head += b',"function":{'
    if delta.name is not None:
        head += b'"name":' + _encode_str(delta.name) + b","
    return head + b'"arguments":' + _encode_str(delta.arguments) + b"}}]"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEARTBEAT = b": keepalive\n\n"


def sse_event(body: msgspec.Struct) -> bytes:
    return b"data: " + encode(body) + b"\n\n"


# WebSocket protocol v1 (docs/websocket-protocol.md). Frames are JSON text; the client's are
# a tagged union on `type` and, unlike REST bodies, refuse unknown fields.
SUBPROTOCOL = "tokenrelay.v1"
StreamId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class ChatStart(
    msgspec.Struct, frozen=True, kw_only=True, tag="chat.start", forbid_unknown_fields=True
):
    id: StreamId
    request: ChatCompletionBody
    cache_control: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    resumable: bool = False  # a dropped socket leaves it running, to be resumed


class ChatResume(
    msgspec.Struct, frozen=True, kw_only=True, tag="chat.resume", forbid_unknown_fields=True
):
    """Follow a resumable stream (started on any socket or replica) from after `after`."""

    id: StreamId
    stream_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    after: Annotated[int, msgspec.Meta(ge=-1, le=1 << 53)] = -1


class ChatCancel(
    msgspec.Struct, frozen=True, kw_only=True, tag="chat.cancel", forbid_unknown_fields=True
):
    id: StreamId


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping", forbid_unknown_fields=True):
    pass


ClientFrame = ChatStart | ChatResume | ChatCancel | Ping
_decode_client_frame = msgspec.json.Decoder(ClientFrame).decode


def decode_client_frame(data: str | bytes) -> ClientFrame:
    """Decode a client frame; anything that is not a valid frame raises a msgspec error."""
    try:
        frame: ClientFrame = _decode_client_frame(data)
    except RecursionError as exc:  # nesting deeper than the decoder follows
        raise msgspec.DecodeError("The frame nests too deeply.") from exc
    return frame


class _Envelope(msgspec.Struct):
    """Just enough of a frame to answer a broken one: its type and stream id, if readable."""

    type: Any = None
    id: Any = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode


def frame_envelope(data: str) -> tuple[bool, str | None, str | None]:
    """Whether a frame that failed validation is a JSON object, and its `type` and `id`."""
    try:
        envelope = _decode_envelope(data)
    except (msgspec.DecodeError, RecursionError):
        return False, None, None
    kind = envelope.type if isinstance(envelope.type, str) else None
    sid = envelope.id if isinstance(envelope.id, str) and 0 < len(envelope.id) <= 128 else None
    return True, kind, sid


def frame_problem(exc: msgspec.ValidationError) -> tuple[str, str | None]:
    """Split a validation error into its message and the JSON path it names (without `$.`)."""
    return _split_location(str(exc))


class ChatDone(msgspec.Struct, frozen=True, kw_only=True, tag="chat.done"):
    id: str
    seq: int
    finish_reason: str
    usage: UsageBody
    ttft_ms: float | None
    model: str
    cached: bool


class ChatErrorFrame(msgspec.Struct, frozen=True, kw_only=True, tag="chat.error"):
    id: str
    seq: int
    error: Any  # server.errors.ErrorBody


class ProtocolErrorFrame(msgspec.Struct, frozen=True, kw_only=True, tag="error"):
    code: str
    message: str
    id: str | None = None


class ChatStarted(msgspec.Struct, frozen=True, kw_only=True, tag="chat.started"):
    """A resumable stream's id, before any other frame of it."""

    id: str
    stream_id: str
    resumed: bool = False


class StreamCancellation(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to `POST /api/chat/completions/{id}/cancel`."""

    id: str
    object: str = "chat.completion.cancellation"
    # "cancelled" (by this call or earlier), "completed", "abandoned", "failed", or
    # "cancelling" (it did not end within a few seconds of the cancel)
    status: str
    finish_reason: str | None = None
    usage: UsageBody | None = None
    error: Any = None  # server.errors.ErrorBody, when the stream had failed


class CancelIgnored(msgspec.Struct, frozen=True, kw_only=True, tag="cancel.ignored"):
    id: str
    reason: str


PONG = '{"type":"pong"}'


class DeltaFramer:
    """Frames one stream's `chat.delta` frames from a template made once."""

    __slots__ = ("_head",)

    def __init__(self, stream_id: str) -> None:
        self._head = b'{"type":"chat.delta","id":' + _encode_str(stream_id) + b',"seq":'

    def text(self, seq: int, text: str) -> str:
        return (self._head + str(seq).encode() + b',"text":' + _encode_str(text) + b"}").decode()

    def reasoning(self, seq: int, text: str) -> str:
        return (
            self._head + str(seq).encode() + b',"reasoning":' + _encode_str(text) + b"}"
        ).decode()

    def refusal(self, seq: int, text: str) -> str:
        return (self._head + str(seq).encode() + b',"refusal":' + _encode_str(text) + b"}").decode()

    def tool_call(self, seq: int, delta: ToolCallDelta) -> str:
        return (
            self._head + str(seq).encode() + b',"tool_calls":' + tool_call_json(delta) + b"}"
        ).decode()


def encode_text(frame: msgspec.Struct) -> str:
    return encode(frame).decode()
