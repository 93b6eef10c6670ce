"""The Anthropic Messages request (`POST /api/v1/messages`), decoded into the typed request.

Every field the Messages API documents for a plain chat turn is typed here and either mapped
onto `ChatRequest` or refused with an `invalid_request_error` naming it; a field the gateway
does not know is refused the same way, so nothing a client sets is lost on the way. Mappings
a client may not guess:

- `tool_result` blocks become `tool` messages, in order, before the rest of their user turn;
  `is_error: true` prefixes the result's text with `Error: ` (neither OpenAI-kind APIs nor the
  typed request have a flag for it);
- `thinking` blocks of earlier assistant turns become `reasoning_content`; their `signature`
  is accepted and not forwarded (it is only meaningful to the upstream that signed it, and the
  gateway's own answers carry none); `redacted_thinking` blocks are refused;
- `thinking: {type: enabled, budget_tokens: B}` becomes a reasoning effort: below 2048
  `minimal`, below 8192 `low`, below 16384 `medium`, below 32768 `high`, else `xhigh` (the
  inverse of the Anthropic adapter's budgets, so a Claude model gets at most the budget asked
  for); `adaptive` is `medium`, `disabled` is `none`;
- `cache_control` on blocks, tools and the system prompt is accepted and has no effect: the
  gateway sets no cache breakpoints upstream (OpenAI-kind upstreams cache prompts on their own).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from providers import validation
from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import (
    ChatRequest,
    ContentPart,
    FileData,
    FilePart,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Message,
    NamedToolChoice,
    ReasoningEffort,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolName,
)
from server.protocol import decode_json


class _In(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the inbound Structs: frozen, keyword-only, strict about unknown fields."""


class _Tagged(_In, frozen=True, tag_field="type"):
    """Base of the variants told apart by their `type`."""


class CacheControl(_In, frozen=True):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Tagged, frozen=True, tag="text"):
    text: str
    cache_control: CacheControl | None = None


class Base64Source(_Tagged, frozen=True, tag="base64"):
    media_type: str
    data: Annotated[str, msgspec.Meta(min_length=1)]


class URLSource(_Tagged, frozen=True, tag="url"):
    url: Annotated[str, msgspec.Meta(min_length=1)]


class ImageBlock(_Tagged, frozen=True, tag="image"):
    source: Base64Source | URLSource
    cache_control: CacheControl | None = None


class DocumentBlock(_Tagged, frozen=True, tag="document"):
    """A PDF given inline; `title` becomes its file name."""

    source: Base64Source
    title: str | None = None
    cache_control: CacheControl | None = None


class ToolUseBlock(_Tagged, frozen=True, tag="tool_use"):
    id: Annotated[str, msgspec.Meta(min_length=1)]
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Tagged, frozen=True, tag="tool_result"):
    tool_use_id: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(_Tagged, frozen=True, tag="thinking"):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Tagged, frozen=True, tag="redacted_thinking"):
    data: str


Block = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
)


class MessageParam(_In, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolParam(_In, frozen=True):
    """A client tool; Anthropic's server tools (web search and the like) are not offered."""

    name: ToolName
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: CacheControl | None = None


class ChoiceAuto(_Tagged, frozen=True, tag="auto"):
    disable_parallel_tool_use: bool | None = None


class ChoiceAny(_Tagged, frozen=True, tag="any"):
    disable_parallel_tool_use: bool | None = None


class ChoiceTool(_Tagged, frozen=True, tag="tool"):
    name: ToolName
    disable_parallel_tool_use: bool | None = None


class ChoiceNone(_Tagged, frozen=True, tag="none"):
    pass


class ThinkingEnabled(_Tagged, frozen=True, tag="enabled"):
    budget_tokens: int
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(_Tagged, frozen=True, tag="adaptive"):
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(_Tagged, frozen=True, tag="disabled"):
    pass


class OutputFormat(_Tagged, frozen=True, tag="json_schema"):
    schema: dict[str, Any]


class OutputConfig(_In, frozen=True):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(_In, frozen=True):
    user_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class _Conversation(_In, frozen=True):
    """What a Messages request and a token count share."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    messages: Annotated[list[MessageParam], msgspec.Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolParam], msgspec.Meta(max_length=512)] | None = None
    tool_choice: ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone | None = None
    thinking: ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None


class MessagesBody(_Conversation, frozen=True, kw_only=True):
    """The body of `POST /api/v1/messages`."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None


class CountTokensBody(_Conversation, frozen=True, kw_only=True):
    """The body of `POST /api/v1/messages/count_tokens`."""


_decode_messages = msgspec.json.Decoder(MessagesBody).decode
_decode_count = msgspec.json.Decoder(CountTokensBody).decode
_encode = msgspec.json.Encoder().encode


def decode_messages(data: bytes) -> MessagesBody:
    """Decode a Messages request; errors name the offending field."""
    return decode_json(_decode_messages, data)


def decode_count(data: bytes) -> CountTokensBody:
    return decode_json(_decode_count, data)


# The least budget for each effort: the inverse of the Anthropic adapter's budgets.
_EFFORT_FLOORS: tuple[tuple[int, ReasoningEffort], ...] = (
    (32768, "xhigh"),
    (16384, "high"),
    (8192, "medium"),
    (2048, "low"),
    (1024, "minimal"),
)
_TIERS = {"auto": "auto", "standard_only": "default"}


def to_request(body: MessagesBody) -> ChatRequest:
    """The typed request (its `model` the id the client asked for); raises a `RequestError`."""
    effort = _effort(body)
    if (
        isinstance(body.thinking, ThinkingEnabled)
        and body.thinking.budget_tokens >= body.max_tokens
    ):
        raise InvalidRequestError(
            "'thinking.budget_tokens' must be less than 'max_tokens'.",
            param="thinking.budget_tokens",
        )
    request = ChatRequest(
        model=body.model,
        messages=conversation(body),
        max_tokens=body.max_tokens,
        stop=body.stop_sequences or None,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        user=body.metadata.user_id if body.metadata is not None else None,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=_parallel(body),
        response_format=_format(body),
        reasoning_effort=effort,
        service_tier=_TIERS[body.service_tier] if body.service_tier is not None else None,
    )
    validation.check_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
    return request


def count_request(body: CountTokensBody) -> ChatRequest:
    """The typed request whose input a token count measures."""
    request = ChatRequest(
        model=body.model,
        messages=conversation(body),
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=_parallel(body),
        response_format=_format(body),
        reasoning_effort=_effort(body),
    )
    validation.check_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
    return request


def conversation(body: _Conversation) -> list[Message]:
    """The system prompt and the turns as typed messages, checked as the OpenAI route checks."""
    messages: list[Message] = []
    system = body.system
    if isinstance(system, str):
        if system:
            messages.append(Message(role="system", content=system))
    elif system:
        messages.append(Message(role="system", content=[TextPart(text=b.text) for b in system]))
    calls: set[str] = set()
    for i, turn in enumerate(body.messages):
        at = f"messages[{i}].content"
        if isinstance(turn.content, str):
            messages.append(Message(role=turn.role, content=turn.content))
        elif turn.role == "user":
            messages += _user_turn(turn.content, at, calls)
        else:
            messages.append(_assistant_turn(turn.content, at, calls))
    try:
        validation.check_messages(messages)
    except InvalidRequestError as exc:  # numbered as typed messages: name the whole field
        raise InvalidRequestError(exc.message, param="messages") from exc
    return messages


def _user_turn(blocks: list[Block], at: str, calls: set[str]) -> list[Message]:
    """Tool results as `tool` messages, in order; the other blocks as user messages."""
    out: list[Message] = []
    parts: list[ContentPart] = []
    for j, block in enumerate(blocks):
        param = f"{at}[{j}]"
        match block:
            case ToolResultBlock():
                if parts:
                    out.append(Message(role="user", content=parts))
                    parts = []
                if block.tool_use_id not in calls:
                    raise InvalidRequestError(
                        f"The tool_result at '{param}' answers '{block.tool_use_id}', which no "
                        "earlier tool_use block called.",
                        param=f"{param}.tool_use_id",
                    )
                out.append(_tool_result(block, param))
            case TextBlock():
                parts.append(TextPart(text=block.text))
            case ImageBlock():
                parts.append(_image(block, param))
            case DocumentBlock():
                parts.append(_document(block, param))
            case _:
                raise InvalidRequestError(
                    f"A user turn cannot hold a '{_kind(block)}' block (at '{param}').",
                    param=param,
                )
    if parts:
        out.append(Message(role="user", content=parts))
    return out


def _assistant_turn(blocks: list[Block], at: str, calls_so_far: set[str]) -> Message:
    texts: list[ContentPart] = []
    calls: list[ToolCall] = []
    thinking: list[str] = []
    for j, block in enumerate(blocks):
        param = f"{at}[{j}]"
        match block:
            case TextBlock():
                texts.append(TextPart(text=block.text))
            case ToolUseBlock():
                if block.id in calls_so_far:
                    raise InvalidRequestError(
                        f"Tool use id '{block.id}' is used twice (at '{param}.id').",
                        param=f"{param}.id",
                    )
                calls_so_far.add(block.id)
                arguments = _encode(block.input).decode()
                call = FunctionCall(name=block.name, arguments=arguments)
                calls.append(ToolCall(id=block.id, function=call))
            case ThinkingBlock():
                thinking.append(block.thinking)
            case RedactedThinkingBlock():
                raise UnsupportedFeatureError(
                    f"'redacted_thinking' blocks cannot be relayed (at '{param}'); leave them out.",
                    param=param,
                )
            case _:
                raise InvalidRequestError(
                    f"An assistant turn cannot hold a '{_kind(block)}' block (at '{param}').",
                    param=param,
                )
    return Message(
        role="assistant",
        content=texts or (None if calls else ""),
        tool_calls=calls or None,
        reasoning_content="".join(thinking) if thinking else None,
    )


def _kind(block: Block) -> str:
    return str(type(block).__struct_config__.tag)


def _tool_result(block: ToolResultBlock, param: str) -> Message:
    content = block.content
    if isinstance(content, list):
        texts = []
        for k, item in enumerate(content):
            if not isinstance(item, TextBlock):
                inner = f"{param}.content[{k}]"
                raise UnsupportedFeatureError(
                    f"Tool results can hold only text here (at '{inner}'): the typed request "
                    "has no images in tool results.",
                    param=inner,
                )
            texts.append(item.text)
        text = "".join(texts)
    else:
        text = content or ""
    if block.is_error:
        text = f"Error: {text}"
    return Message(role="tool", content=text, tool_call_id=block.tool_use_id)


def _image(block: ImageBlock, param: str) -> ImagePart:
    source = block.source
    if isinstance(source, URLSource):
        validation.check_image_url(source.url, f"{param}.source.url")
        return ImagePart(image_url=ImageURL(url=source.url))
    url = f"data:{source.media_type};base64,{source.data}"
    validation.check_image_url(url, f"{param}.source")
    return ImagePart(image_url=ImageURL(url=url))


def _document(block: DocumentBlock, param: str) -> FilePart:
    source = block.source
    if source.media_type != "application/pdf":
        raise UnsupportedFeatureError(
            f"Documents are taken only as base64 PDFs (at '{param}.source.media_type').",
            param=f"{param}.source.media_type",
        )
    url = f"data:application/pdf;base64,{source.data}"
    validation.split_data_url(url, f"{param}.source.data")
    return FilePart(file=FileData(file_data=url, filename=block.title))


def _tools(body: _Conversation) -> list[Tool] | None:
    if not body.tools:
        return None
    return [
        Tool(
            type="function",
            function=FunctionDef(
                name=t.name,
                description=t.description,
                parameters=t.input_schema,
                strict=t.strict,
            ),
        )
        for t in body.tools
    ]


def _tool_choice(body: _Conversation) -> ToolChoice | None:
    match body.tool_choice:
        case ChoiceAuto():
            return "auto"
        case ChoiceAny():
            return "required"
        case ChoiceTool(name=name):
            return NamedToolChoice(type="function", function=ToolChoiceFunction(name=name))
        case ChoiceNone():
            return "none"
        case _:
            return None


def _parallel(body: _Conversation) -> bool | None:
    """`disable_parallel_tool_use: true` is `parallel_tool_calls: false`; false is the default."""
    choice = body.tool_choice
    if choice is None or isinstance(choice, ChoiceNone):
        return None
    return False if choice.disable_parallel_tool_use else None


def _format(body: _Conversation) -> JsonSchemaFormat | None:
    config = body.output_config
    if config is None or config.format is None:
        return None
    spec = JsonSchemaSpec(name="output", schema=config.format.schema, strict=True)
    return JsonSchemaFormat(json_schema=spec)


def _effort(body: _Conversation) -> ReasoningEffort | None:
    """One reasoning effort from `thinking` and `output_config.effort`; they must agree."""
    thinking: ReasoningEffort | None = None
    match body.thinking:
        case ThinkingEnabled(budget_tokens=budget, display=display):
            if budget < 1024:
                raise InvalidRequestError(
                    "'thinking.budget_tokens' must be at least 1024.",
                    param="thinking.budget_tokens",
                )
            _check_display(display)
            thinking = next(effort for floor, effort in _EFFORT_FLOORS if budget >= floor)
        case ThinkingAdaptive(display=display):
            _check_display(display)
            thinking = "medium"
        case ThinkingDisabled():
            thinking = "none"
    asked = body.output_config.effort if body.output_config is not None else None
    if asked is not None and thinking is not None and asked != thinking:
        raise InvalidRequestError(
            f"'output_config.effort' '{asked}' and 'thinking' (effort '{thinking}') disagree; "
            "set one of them.",
            param="output_config.effort",
        )
    return asked or thinking


def _check_display(display: str | None) -> None:
    if display == "omitted":
        raise UnsupportedFeatureError(
            "'thinking.display' 'omitted' is not supported: the gateway relays thinking as "
            "text or not at all; leave 'display' out.",
            param="thinking.display",
        )
