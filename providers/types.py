"""The vocabulary every transport shares: requests, messages, tools, models and stream events.

Wire dialects decode into these Structs and providers encode from them; nothing else crosses
the provider seam. Inbound Structs refuse unknown fields, so a field no part of the gateway
knows is answered with an error that names it instead of being lost on the way.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "cancelled", "error"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
ToolName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
TokenId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,10}$")]  # a `logit_bias` key
# OpenAI's bounds: 16 pairs, keys of up to 64 characters, values of up to 512.
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]


class _In(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Base of the inbound Structs: frozen, keyword-only, strict about unknown fields."""


class _Part(_In, frozen=True, tag_field="type"):
    """Base of the tagged content parts."""


class TextPart(_Part, frozen=True, tag="text"):
    """A text part of list-of-parts message content."""

    text: str


class ImageURL(_In, frozen=True):
    """An image by http(s) URL or `data:` URL, with OpenAI's detail hint."""

    url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Part, frozen=True, tag="image_url"):
    image_url: ImageURL


class InputAudio(_In, frozen=True):
    data: str  # base64
    format: str


class AudioPart(_Part, frozen=True, tag="input_audio"):
    input_audio: InputAudio


class FileData(_In, frozen=True):
    """A file given inline (`file_data`, a `data:` URL or bare base64) or by an upstream id."""

    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Part, frozen=True, tag="file"):
    file: FileData


class RefusalPart(_Part, frozen=True, tag="refusal"):
    """A refusal in an earlier assistant turn's content."""

    refusal: str


ContentPart = TextPart | ImagePart | AudioPart | FilePart | RefusalPart
# Part types as named on the wire, for capability checks and errors.
PART_KINDS: dict[type, str] = {
    TextPart: "text",
    ImagePart: "image_url",
    AudioPart: "input_audio",
    FilePart: "file",
    RefusalPart: "refusal",
}


class FunctionCall(_In, frozen=True):
    """The function a model called: its name and its arguments as a JSON text."""

    name: str
    arguments: str


class ToolCall(_In, frozen=True, omit_defaults=False):
    """A tool call in an assistant turn (encoded with its `type`, which OpenAI requires)."""

    id: Annotated[str, msgspec.Meta(min_length=1)]
    function: FunctionCall
    type: Literal["function"] = "function"


class AudioRef(_In, frozen=True):
    """An earlier assistant turn's audio answer, by its upstream id."""

    id: str


class Message(_In, frozen=True):
    """One chat message; `developer` is OpenAI's newer name for a system message.

    Assistant turns may hold `tool_calls` (with `content` null); `tool` turns answer one call by
    `tool_call_id`. `reasoning_content` is accepted on assistant turns that clients echo back.
    """

    role: Role
    content: str | list[ContentPart] | None = None
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], msgspec.Meta(min_length=1)] | None = None  # as OpenAI
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    audio: AudioRef | None = None

    @property
    def text(self) -> str:
        """The text of the content, whatever form it came in (other parts left out)."""
        content = self.content
        if isinstance(content, str):
            return content
        if content is None:
            return ""
        return "".join(p.text for p in content if type(p) is TextPart)

    def size(self) -> int:
        """Characters this message carries: text, inline media, refusal and reasoning texts and
        tool-call arguments."""
        content = self.content
        total = len(self.refusal or "") + len(self.reasoning_content or "")
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(_part_size(part) for part in content)
        for call in self.tool_calls or ():
            total += len(call.function.name) + len(call.function.arguments)
        return total


def _part_size(part: ContentPart) -> int:
    match part:
        case TextPart():
            return len(part.text)
        case ImagePart():
            return len(part.image_url.url)
        case AudioPart():
            return len(part.input_audio.data)
        case FilePart():
            return len(part.file.file_data or "")
        case RefusalPart():
            return len(part.refusal)


class FunctionDef(_In, frozen=True):
    """A function the model may call; `parameters` is a JSON schema of an object."""

    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_In, frozen=True):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_In, frozen=True):
    name: ToolName


class NamedToolChoice(_In, frozen=True):
    """`tool_choice` naming the one function the model must call."""

    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class _Format(_In, frozen=True, tag_field="type"):
    """Base of the `response_format` variants."""


class TextFormat(_Format, frozen=True, tag="text"):
    pass


class JsonObjectFormat(_Format, frozen=True, tag="json_object"):
    pass


class JsonSchemaSpec(_In, frozen=True):
    name: ToolName
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(_Format, frozen=True, tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class Prediction(_In, frozen=True):
    """Predicted output (OpenAI's speculative decoding hint)."""

    type: Literal["content"]
    content: str | list[TextPart]


class ApproximateLocation(_In, frozen=True):
    city: str | None = None
    country: str | None = None
    region: str | None = None
    timezone: str | None = None


class UserLocation(_In, frozen=True):
    type: Literal["approximate"]
    approximate: ApproximateLocation


class WebSearchOptions(_In, frozen=True):
    search_context_size: Literal["low", "medium", "high"] | None = None
    user_location: UserLocation | None = None


class PromptCacheOptions(_In, frozen=True):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: str | None = None


class ModerationMode(_In, frozen=True):
    mode: Literal["score", "block"]


class ModerationPolicy(_In, frozen=True):
    input: ModerationMode | None = None
    output: ModerationMode | None = None


class Moderation(_In, frozen=True):
    model: str
    policy: ModerationPolicy | None = None


class Options(_In, frozen=True):
    """Everything a request may set beyond its model, messages, `max_tokens` and `stop`.

    Each field is None unless the client set it. A provider either honours a set field (as it
    is, or mapped onto its own API) or refuses the request naming it; see `Capabilities`.
    """

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1)] | None = None  # Anthropic, vLLM and others
    seed: Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    tools: Annotated[list[Tool], msgspec.Meta(min_length=1, max_length=512)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None
    logit_bias: dict[TokenId, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    service_tier: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    prediction: Prediction | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text"]] | None = None
    web_search_options: WebSearchOptions | None = None
    safety_identifier: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    moderation: Moderation | None = None


OPTION_FIELDS: tuple[str, ...] = Options.__struct_fields__


class ChatRequest(Options, frozen=True, kw_only=True):
    """A chat request as a provider sees it: `model` is the upstream model name."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    stop: list[str] | None = None

    def options(self) -> dict[str, Any]:
        """The options the client set, by field name."""
        return {f: v for f in OPTION_FIELDS if (v := getattr(self, f)) is not None}


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A model a provider can serve, named the way clients name it (`provider/model`)."""

    id: str
    provider: str
    upstream_id: str
    created: int = 0
    display_name: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts for one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TextDelta(msgspec.Struct, frozen=True, tag="text"):
    """A piece of the answer's text."""

    text: str


class ReasoningDelta(msgspec.Struct, frozen=True, tag="reasoning"):
    """A piece of the model's reasoning text, where the upstream sends one."""

    text: str


class RefusalDelta(msgspec.Struct, frozen=True, tag="refusal"):
    """A piece of a refusal the model gave instead of the asked-for structured answer."""

    text: str


class ToolCallDelta(msgspec.Struct, frozen=True, tag="tool_call"):
    """A piece of a tool call: the first piece of call `index` has its `id` and `name`, later
    pieces carry only further fragments of the JSON `arguments`."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Finish(msgspec.Struct, frozen=True, kw_only=True, tag="finish"):
    """The last event of a stream that ended normally; `usage` is None if the upstream gave none.

    `stop_sequence` is the client's stop sequence that ended the answer, when the upstream says
    which (Anthropic's does; OpenAI-kind ones only say "stop").
    """

    reason: FinishReason
    usage: Usage | None = None
    stop_sequence: str | None = None


Delta = TextDelta | ReasoningDelta | RefusalDelta | ToolCallDelta
Event = TextDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | Finish


_WORDS = re.compile(r"\s*\S+")


def estimate_tokens(text: str) -> int:
    """A rough token count (whitespace-separated pieces) for text no upstream counted."""
    return len(_WORDS.findall(text))
