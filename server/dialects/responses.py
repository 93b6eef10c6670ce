"""The OpenAI Responses request (`POST /api/responses`), decoded into the typed request.

Every field of a Responses request is typed here and carried onto `ChatRequest`, mapped, or
refused with an `invalid_request_error` naming it; a field the gateway does not know is refused
the same way. Mappings a client may not guess:

- `instructions` becomes a leading `system` message; it is not kept with the conversation, so
  a request continuing one (`previous_response_id`) sends only its own instructions, as
  OpenAI does;
- input items become chat messages: `message` items by their role (`input_text`,
  `input_image`, `input_file` parts; `output_text` and `refusal` in assistant turns),
  `function_call` items the assistant's `tool_calls`, `function_call_output` items `tool`
  messages and `reasoning` items the next assistant turn's `reasoning_content` (its summary
  and reasoning text); the items of one assistant turn (reasoning, message, calls) form one
  assistant message;
- `text.format` becomes the response format, `text.verbosity` the verbosity,
  `reasoning.effort` the reasoning effort, `max_output_tokens` the `max_tokens`;
- `store` and `previous_response_id` are the gateway's own (see `responses_store`), as are
  `stream` and `stream_options`; `annotations` and `logprobs` echoed back on `output_text`
  parts and the `id`, `status` and `phase` of echoed items are accepted and have no effect.
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
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Message,
    Metadata,
    Moderation,
    NamedToolChoice,
    PromptCacheOptions,
    ReasoningEffort,
    RefusalPart,
    ResponseFormat,
    TextFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolName,
)
from server.protocol import decode_json, split_location

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class _In(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the inbound Structs: frozen, keyword-only, strict about unknown fields."""


class _Tagged(_In, frozen=True, tag_field="type"):
    """Base of the variants told apart by their `type`."""


class InputText(_Tagged, frozen=True, tag="input_text"):
    text: str


class InputImage(_Tagged, frozen=True, tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class InputFile(_Tagged, frozen=True, tag="input_file"):
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


class OutputText(_Tagged, frozen=True, tag="output_text"):
    """An earlier answer's text, echoed back; its annotations and logprobs have no effect."""

    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Tagged, frozen=True, tag="refusal"):
    refusal: str


Part = InputText | InputImage | InputFile | OutputText | Refusal


class MessageItem(_In, frozen=True):
    """A `message` item (its `type` may be left out, as in OpenAI's easy input messages)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    type: Literal["message"] | None = None
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_In, frozen=True):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    name: str
    arguments: str
    type: Literal["function_call"]
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(_In, frozen=True):
    call_id: Annotated[str, msgspec.Meta(min_length=1)]
    output: str | list[Part]
    type: Literal["function_call_output"]
    id: str | None = None
    status: ItemStatus | None = None


class SummaryText(_Tagged, frozen=True, tag="summary_text"):
    text: str


class ReasoningText(_Tagged, frozen=True, tag="reasoning_text"):
    text: str


class ReasoningItem(_In, frozen=True):
    summary: list[SummaryText]
    type: Literal["reasoning"]
    id: str | None = None
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: ItemStatus | None = None


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
_ITEMS: dict[str, type[Item]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}


class _ItemType(msgspec.Struct, frozen=True):
    type: str | None = None


class FunctionTool(_Tagged, frozen=True, tag="function"):
    name: ToolName
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class FunctionChoice(_Tagged, frozen=True, tag="function"):
    name: ToolName


class TextFormatParam(_Tagged, frozen=True, tag="text"):
    pass


class JsonObjectParam(_Tagged, frozen=True, tag="json_object"):
    pass


class JsonSchemaParam(_Tagged, frozen=True, tag="json_schema"):
    name: ToolName
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class TextConfig(_In, frozen=True):
    format: TextFormatParam | JsonObjectParam | JsonSchemaParam | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_In, frozen=True):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class StreamOptions(_In, frozen=True):
    include_obfuscation: bool | None = None  # OpenAI's padding; nothing to pad here


class CacheOptions(_In, frozen=True):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: str | None = None


class ResponsesBody(_In, frozen=True):
    """The body of `POST /api/responses`."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    input: str | list[msgspec.Raw] | None = None
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], msgspec.Meta(max_length=512)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    previous_response_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    safety_identifier: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: CacheOptions | None = None
    service_tier: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    moderation: Moderation | None = None
    # Known, and refused when used (see `_refuse`).
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    include: list[str] | None = None
    background: bool | None = None
    max_tool_calls: Annotated[int, msgspec.Meta(ge=1)] | None = None
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None

    @property
    def stored(self) -> bool:
        """Whether the answer is kept for `previous_response_id` and retrieval (default yes)."""
        return self.store is not False


_decode_body = msgspec.json.Decoder(ResponsesBody).decode
_decode_type = msgspec.json.Decoder(_ItemType).decode
_item_decoders = {name: msgspec.json.Decoder(kind).decode for name, kind in _ITEMS.items()}


def decode_body(data: bytes) -> ResponsesBody:
    """Decode a Responses request; errors name the offending field."""
    body = decode_json(_decode_body, data)
    _refuse(body)
    return body


def _refuse(body: ResponsesBody) -> None:
    refused = (
        ("truncation", body.truncation == "auto", "'truncation: auto' is not supported"),
        ("top_logprobs", bool(body.top_logprobs), "logprobs are not supported"),
        ("include", bool(body.include), "no 'include' values are supported; leave it out"),
        ("background", bool(body.background), "background responses are not supported"),
        ("max_tool_calls", body.max_tool_calls is not None, "no built-in tools are offered"),
        ("conversation", body.conversation is not None, "conversations are not supported; "
         "continue one with 'previous_response_id'"),
        ("prompt", body.prompt is not None, "stored prompt templates are not supported"),
        ("context_management", body.context_management is not None,
         "context management is not supported"),
        ("reasoning.summary", _summary(body), "reasoning summaries are not supported; the "
         "reasoning text an upstream sends is relayed as it is"),
        ("stream_options", body.stream_options is not None and not body.stream,
         "'stream_options' needs 'stream: true'"),
    )  # fmt: skip
    for param, used, message in refused:
        if used:
            raise UnsupportedFeatureError(f"{message} ('{param}').", param=param)
    if body.input is None and body.previous_response_id is None:
        raise InvalidRequestError("'input' is required.", param="input")


def _summary(body: ResponsesBody) -> bool:
    reasoning = body.reasoning
    if reasoning is None:
        return False
    return reasoning.summary not in (None, "auto") or reasoning.generate_summary not in (
        None,
        "auto",
    )


def input_messages(body: ResponsesBody) -> list[Message]:
    """The request's input items as chat messages (without instructions or history)."""
    given = body.input
    if given is None:
        return []
    if isinstance(given, str):
        return [Message(role="user", content=given)]
    return _Turns().read(given)


def to_request(body: ResponsesBody, history: list[Message], given: list[Message]) -> ChatRequest:
    """The typed request (its `model` the id the client asked for): the instructions, the
    stored history of `previous_response_id` and this request's input, checked as a whole."""
    messages = list(history) + given
    if body.instructions:
        messages.insert(0, Message(role="system", content=body.instructions))
    if not messages:
        raise InvalidRequestError("'input' holds no items.", param="input")
    try:
        validation.check_messages(messages)
    except InvalidRequestError as exc:  # numbered as chat messages: name the whole field
        raise InvalidRequestError(exc.message, param="input") from exc
    request = ChatRequest(
        model=body.model,
        messages=messages,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        user=body.user,
        tools=_tools(body),
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_format(body),
        reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
        service_tier=body.service_tier,
        metadata=body.metadata,
        verbosity=body.text.verbosity if body.text is not None else None,
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
        prompt_cache_retention=body.prompt_cache_retention,
        prompt_cache_options=_cache_options(body),
        moderation=body.moderation,
    )
    validation.check_tools(request.tools, request.tool_choice, request.parallel_tool_calls)
    return request


def _tools(body: ResponsesBody) -> list[Tool] | None:
    if not body.tools:
        return None
    return [
        Tool(
            type="function",
            function=FunctionDef(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in body.tools
    ]


def _tool_choice(body: ResponsesBody) -> ToolChoice | None:
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        return NamedToolChoice(type="function", function=ToolChoiceFunction(name=choice.name))
    return choice


def _format(body: ResponsesBody) -> ResponseFormat | None:
    fmt = body.text.format if body.text is not None else None
    match fmt:
        case TextFormatParam():
            return TextFormat()
        case JsonObjectParam():
            return JsonObjectFormat()
        case JsonSchemaParam():
            spec = JsonSchemaSpec(
                name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict
            )
            return JsonSchemaFormat(json_schema=spec)
        case _:
            return None


def _cache_options(body: ResponsesBody) -> PromptCacheOptions | None:
    given = body.prompt_cache_options
    return None if given is None else PromptCacheOptions(mode=given.mode, ttl=given.ttl)


class _Turns:
    """Input items into chat messages; the items of one assistant turn become one message."""

    def __init__(self) -> None:
        self.out: list[Message] = []
        self.texts: list[ContentPart] = []
        self.calls: list[ToolCall] = []
        self.reasoning: list[str] = []
        self.ids: set[str] = set()

    def read(self, raw_items: list[msgspec.Raw]) -> list[Message]:
        for i, raw in enumerate(raw_items):
            at = f"input[{i}]"
            item = _item(raw, at)
            match item:
                case MessageItem(role="assistant"):
                    self._assistant(item, at)
                case MessageItem():
                    self._flush()
                    self.out.append(_message(item, at))
                case FunctionCallItem():
                    if item.call_id in self.ids:
                        raise InvalidRequestError(
                            f"The call id '{item.call_id}' is used twice (at '{at}.call_id').",
                            param=f"{at}.call_id",
                        )
                    self.ids.add(item.call_id)
                    call = FunctionCall(name=item.name, arguments=item.arguments)
                    self.calls.append(ToolCall(id=item.call_id, function=call))
                case FunctionCallOutputItem():
                    self._flush()
                    self.out.append(_tool_result(item, at))
                case ReasoningItem():
                    if item.encrypted_content:
                        raise UnsupportedFeatureError(
                            "Encrypted reasoning cannot be relayed (at "
                            f"'{at}.encrypted_content'); leave it out.",
                            param=f"{at}.encrypted_content",
                        )
                    texts = [s.text for s in item.summary] + [c.text for c in item.content or ()]
                    self.reasoning.append("".join(texts))
        self._flush()
        return self.out

    def _assistant(self, item: MessageItem, at: str) -> None:
        content = item.content
        if isinstance(content, str):
            self.texts.append(TextPart(text=content))
            return
        for j, part in enumerate(content):
            match part:
                case OutputText() | InputText():
                    self.texts.append(TextPart(text=part.text))
                case Refusal():
                    self.texts.append(RefusalPart(refusal=part.refusal))
                case _:
                    raise InvalidRequestError(
                        f"An assistant message cannot hold an '{_kind(part)}' part "
                        f"(at '{at}.content[{j}]').",
                        param=f"{at}.content[{j}]",
                    )

    def _flush(self) -> None:
        if not (self.texts or self.calls or self.reasoning):
            return
        self.out.append(assistant(self.texts, self.calls, "".join(self.reasoning) or None))
        self.texts, self.calls, self.reasoning = [], [], []


def assistant(content: list[ContentPart], calls: list[ToolCall], reasoning: str | None) -> Message:
    """One assistant turn; text-only content as one string, as chat clients send it."""
    text: str | list[ContentPart] | None = content
    if content and all(type(p) is TextPart for p in content):
        text = "".join(p.text for p in content if type(p) is TextPart)
    return Message(
        role="assistant",
        content=text or (None if calls else ""),
        tool_calls=calls or None,
        reasoning_content=reasoning,
    )


def _item(raw: msgspec.Raw, at: str) -> Item:
    try:
        kind = _decode_type(raw).type or "message"
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(
            f"Invalid input item at '{at}': expected an object with a 'type'.", param=at
        ) from exc
    decoder = _item_decoders.get(kind)
    if decoder is None:
        raise UnsupportedFeatureError(
            f"Input items of type '{kind}' are not supported (at '{at}.type'); the gateway "
            "takes message, function_call, function_call_output and reasoning items.",
            param=f"{at}.type",
        )
    try:
        item: Item = decoder(raw)
    except msgspec.ValidationError as exc:
        message, param = split_location(str(exc))
        param = f"{at}.{param}" if param else at
        raise InvalidRequestError(
            f"Invalid input item at '{param}': {message}", param=param
        ) from exc
    except RecursionError as exc:
        raise InvalidRequestError(f"The input item at '{at}' nests too deeply.", param=at) from exc
    return item


def _kind(part: Part) -> str:
    return str(type(part).__struct_config__.tag)


def _message(item: MessageItem, at: str) -> Message:
    content = item.content
    if isinstance(content, str):
        return Message(role=item.role, content=content)
    parts: list[ContentPart] = []
    for j, part in enumerate(content):
        param = f"{at}.content[{j}]"
        match part:
            case InputText():
                parts.append(TextPart(text=part.text))
            case InputImage():
                parts.append(_image(part, param))
            case InputFile():
                parts.append(_file(part, param))
            case _:
                raise InvalidRequestError(
                    f"A {item.role} message cannot hold an '{_kind(part)}' part (at '{param}').",
                    param=param,
                )
    return Message(role=item.role, content=parts)


def _image(part: InputImage, param: str) -> ImagePart:
    if part.file_id is not None or part.image_url is None:
        raise UnsupportedFeatureError(
            f"Images are taken by 'image_url' (an http(s) or data URL), not by file id (at "
            f"'{param}').",
            param=f"{param}.file_id" if part.file_id is not None else f"{param}.image_url",
        )
    validation.check_image_url(part.image_url, f"{param}.image_url")
    return ImagePart(image_url=ImageURL(url=part.image_url, detail=part.detail))


def _file(part: InputFile, param: str) -> FilePart:
    if part.file_url is not None:
        raise UnsupportedFeatureError(
            f"Files are taken inline ('file_data') or by 'file_id', not by URL (at '{param}').",
            param=f"{param}.file_url",
        )
    return FilePart(
        file=FileData(file_data=part.file_data, file_id=part.file_id, filename=part.filename)
    )


def _tool_result(item: FunctionCallOutputItem, at: str) -> Message:
    output = item.output
    if isinstance(output, str):
        return Message(role="tool", content=output, tool_call_id=item.call_id)
    texts: list[str] = []
    for j, part in enumerate(output):
        if not isinstance(part, InputText):
            param = f"{at}.output[{j}]"
            raise UnsupportedFeatureError(
                f"Function call outputs can hold only text here (at '{param}').", param=param
            )
        texts.append(part.text)
    return Message(role="tool", content="".join(texts), tool_call_id=item.call_id)
