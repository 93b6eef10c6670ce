"""Wire types: the OpenAI-compatible request and response bodies and the SSE chunk framing.

Decoders and encoders are built once here. Stream chunks are framed from byte templates made
once per stream, so relaying a delta costs one JSON string encode and two concatenations.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import ChatRequest, FinishReason, Message, Usage

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ChatCompletionBody(msgspec.Struct, frozen=True, kw_only=True):
    """The body of `POST /api/chat/completions` (and of a WebSocket `chat.start`).

    Unknown fields are tolerated as OpenAI clients send many; none of them is forwarded.
    Features that would change the answer's shape and are not served yet are named here so
    that they are refused with a clear error instead of being dropped.
    """

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | None = None
    seed: int | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    # Refused when used (see `unsupported`).
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None

    def unsupported(self) -> UnsupportedFeatureError | None:
        """The first feature in the body that the gateway does not serve yet, if any."""
        checks = (
            ("n", self.n not in (None, 1), "n > 1 (several choices) is not supported yet"),
            ("tools", bool(self.tools), "tools (function calling) are not supported yet"),
            (
                "tool_choice",
                self.tool_choice not in (None, "none"),
                "tool_choice is not supported yet",
            ),
            (
                "functions",
                bool(self.functions),
                "functions (function calling) are not supported yet",
            ),
            (
                "function_call",
                self.function_call not in (None, "none"),
                "function_call is not supported yet",
            ),
            (
                "logprobs",
                bool(self.logprobs) or bool(self.top_logprobs),
                "logprobs are not supported yet",
            ),
            (
                "response_format",
                (self.response_format or {}).get("type", "text") != "text",
                "response_format other than text is not supported yet",
            ),
            ("audio", self.audio is not None, "audio output is not supported yet"),
            (
                "modalities",
                any(m != "text" for m in self.modalities or ()),
                "only the text modality is supported",
            ),
        )
        for param, used, message in checks:
            if used:
                return UnsupportedFeatureError(message, param=param)
        return None

    def to_request(self, upstream_model: str) -> ChatRequest:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return ChatRequest(
            model=upstream_model,
            messages=self.messages,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            stop=stop or None,
            seed=self.seed,
            user=self.user,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_decode_body = msgspec.json.Decoder(ChatCompletionBody).decode


def decode_body(data: bytes) -> ChatCompletionBody:
    """Decode and validate a request body; errors name the offending field."""
    if not data.strip():
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        return _decode_body(data)
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


def _split_location(text: str) -> tuple[str, str | None]:
    """msgspec says "Expected `int`, got `str` - at `$.messages[0].role`"; split it."""
    message, sep, location = text.partition(" - at `$")
    param = location.rstrip("`").lstrip(".") if sep else None
    return message.replace("`", "'"), param or None


class ResponseMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str
    content: str
    reasoning_content: str | None = None


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

    __slots__ = ("_head", "_first", "_delta", "_reasoning", "_tail")

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
        self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def role(self) -> bytes:
        """The opening chunk: the assistant role with empty content."""
        return self._first + b'""' + self._tail

    def content(self, text: str) -> bytes:
        return self._delta + _encode_str(text) + self._tail

    def reasoning(self, text: str) -> bytes:
        return self._reasoning + _encode_str(text) + self._tail

    def finish(self, reason: FinishReason) -> bytes:
        return (
            self._head
            + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + _encode_str(reason)
            + b"}]}\n\n"
        )

    def usage(self, usage: Usage) -> bytes:
        return self._head + b'[],"usage":' + encode(UsageBody.of(usage)) + b"}\n\n"


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


class ChatCancel(
    msgspec.Struct, frozen=True, kw_only=True, tag="chat.cancel", forbid_unknown_fields=True
):
    id: StreamId


class Ping(msgspec.Struct, frozen=True, kw_only=True, tag="ping", forbid_unknown_fields=True):
    pass


ClientFrame = ChatStart | ChatCancel | Ping
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


def encode_text(frame: msgspec.Struct) -> str:
    return encode(frame).decode()
