"""The typed request in the shape of Anthropic's Messages API, refusing what has no mapping.

Every field a client can set is carried, mapped onto Anthropic's own (tools and tool choice,
tool calls and results, images and PDFs, JSON schema output, reasoning effort as a thinking
budget) or refused with an error naming it: options in `CAPABILITIES`, the rest in `params`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from providers.capabilities import Capabilities
from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import (
    ChatRequest,
    FilePart,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    RefusalPart,
    TextPart,
    Tool,
    ToolChoice,
)
from providers.validation import split_data_url

# No temperature, top_p or top_k: the Messages API version the SDK speaks (2026-10-21) takes no
# sampling parameters at all, and the SDK has no argument for them.
CAPABILITIES = Capabilities(
    options=frozenset(
        {
            "user",
            "metadata",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
            "reasoning_effort",
            "service_tier",
            "modalities",  # only ["text"] can be asked for, which is all Anthropic answers
        }
    ),
    parts=frozenset({"image_url", "file"}),
)

# Extended thinking budgets: Anthropic takes at least 1024 tokens, counted within max_tokens.
THINKING_BUDGETS: dict[str, int] = {
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
    "max": 32768,
}
_SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}
_EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
_decode_json = msgspec.json.Decoder().decode


def params(request: ChatRequest, default_max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `messages.create`; raises a `RequestError` naming a field."""
    system = "\n\n".join(
        text
        for m in request.messages
        if m.role in ("system", "developer")
        for text in _texts(m)  # each part apart, not run together
    )
    out: dict[str, Any] = {
        "model": request.model,
        "messages": _turns(request.messages),
        "max_tokens": _max_tokens(request, default_max_tokens),
        "stream": True,
    }
    if system:
        out["system"] = system
    if request.stop:
        out["stop_sequences"] = request.stop
    user_id = _user_id(request)
    if user_id is not None:
        out["metadata"] = {"user_id": user_id}
    if request.tools:
        out["tools"] = [_tool(tool) for tool in request.tools]
    choice = _tool_choice(request.tool_choice, request.parallel_tool_calls)
    if choice is not None:
        out["tool_choice"] = choice
    _check_forced_tool(request)
    output_format = _output_format(request)
    if output_format is not None:
        out["output_config"] = {"format": output_format}
    effort = request.reasoning_effort
    if effort is not None:
        budget = THINKING_BUDGETS.get(effort)
        out["thinking"] = (
            {"type": "disabled"} if budget is None else {"type": "enabled", "budget_tokens": budget}
        )
    if request.service_tier is not None:
        out["service_tier"] = _service_tier(request.service_tier)
    return out


def _max_tokens(request: ChatRequest, default: int) -> int:
    """Anthropic requires max_tokens and counts thinking within it, so room is made for both."""
    budget = THINKING_BUDGETS.get(request.reasoning_effort or "none", 0)
    if request.max_tokens is None:
        return default + budget
    if budget and request.max_tokens <= budget:
        raise InvalidRequestError(
            f"'reasoning_effort' '{request.reasoning_effort}' is a thinking budget of {budget} "
            f"tokens, which must be less than 'max_tokens' ({request.max_tokens}); raise "
            "'max_tokens' or lower the effort.",
            param="reasoning_effort",
        )
    return request.max_tokens


def _user_id(request: ChatRequest) -> str | None:
    metadata = request.metadata
    if metadata is None:
        return request.user
    if set(metadata) != {"user_id"}:
        raise UnsupportedFeatureError(
            "Anthropic takes only a 'user_id' key in 'metadata'; leave the other keys out.",
            param="metadata",
        )
    user_id = metadata["user_id"]
    if request.user is not None and request.user != user_id:
        raise InvalidRequestError(
            "'user' and 'metadata.user_id' both name the user, differently; set only one.",
            param="metadata",
        )
    return user_id


def _tool(tool: Tool) -> dict[str, Any]:
    function = tool.function
    out: dict[str, Any] = {
        "name": function.name,
        "input_schema": function.parameters if function.parameters is not None else _EMPTY_SCHEMA,
    }
    if function.description is not None:
        out["description"] = function.description
    if function.strict is not None:
        out["strict"] = function.strict
    return out


def _tool_choice(choice: ToolChoice | None, parallel: bool | None) -> dict[str, Any] | None:
    out: dict[str, Any]
    match choice:
        case None:
            if parallel is not False:
                return None
            out = {"type": "auto"}
        case "auto":
            out = {"type": "auto"}
        case "required":
            out = {"type": "any"}
        case "none":
            # No tool is called at all, so parallel_tool_calls has nothing to limit.
            return {"type": "none"}
        case NamedToolChoice():
            out = {"type": "tool", "name": choice.function.name}
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def _check_forced_tool(request: ChatRequest) -> None:
    """Anthropic cannot think and be forced to call a tool in one turn; say so before asking."""
    forced = request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)
    if forced and request.reasoning_effort not in (None, "none"):
        raise InvalidRequestError(
            "Anthropic models cannot think ('reasoning_effort') while forced to call a tool; "
            "use 'tool_choice' 'auto', or 'reasoning_effort' 'none'.",
            param="tool_choice",
        )


def _output_format(request: ChatRequest) -> dict[str, Any] | None:
    match request.response_format:
        case JsonSchemaFormat(json_schema=spec):
            if spec.schema is None:
                raise InvalidRequestError(
                    "Anthropic needs the JSON schema itself in 'response_format.json_schema'.",
                    param="response_format.json_schema.schema",
                )
            return {"type": "json_schema", "schema": _described(spec.schema, spec.description)}
        case JsonObjectFormat():
            # Anthropic's JSON outputs require a schema whose objects forbid extra properties,
            # so "any JSON object" cannot be asked for.
            raise UnsupportedFeatureError(
                "Anthropic has no JSON mode without a schema; send 'response_format' of type "
                "'json_schema' with the schema of the object wanted.",
                param="response_format",
            )
        case _:
            return None


def _described(schema: dict[str, Any], description: str | None) -> dict[str, Any]:
    """The schema with the format's `description` (model-facing; Anthropic's format has no
    field for it) as its own root description, before any the schema already has."""
    if not description:
        return schema
    own = schema.get("description")
    if isinstance(own, str) and own and own != description:
        description = f"{description}\n\n{own}"
    return {**schema, "description": description}


def _service_tier(tier: str) -> str:
    mapped = _SERVICE_TIERS.get(tier)
    if mapped is None:
        raise UnsupportedFeatureError(
            f"Anthropic has no service tier '{tier}'; use 'auto' or 'default'.",
            param="service_tier",
        )
    return mapped


def _turns(messages: list[Message]) -> list[dict[str, Any]]:
    """User and assistant turns; Anthropic wants them alternating, so neighbours of one role
    (tool results and the user message after them, say) are merged into one turn."""
    turns: list[dict[str, Any]] = []
    empty = "messages"
    for i, message in enumerate(messages):
        role = message.role
        at = f"messages[{i}]"
        for name in ("name", "audio"):  # system messages too: they are merged into `system`
            if getattr(message, name) is not None:
                raise UnsupportedFeatureError(
                    f"Anthropic messages have no '{name}' (at '{at}.{name}'); leave it out.",
                    param=f"{at}.{name}",
                )
        if role in ("system", "developer"):
            continue
        if role == "tool":
            blocks = [_tool_result(message)]
            role = "user"
        elif role == "assistant":
            blocks = _assistant_blocks(message, at)
        else:
            blocks = _user_blocks(message, at)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            _check_filled(turns, empty)
            empty = f"{at}.content"  # where the turn begins, named if it ends up empty
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise UnsupportedFeatureError(
            "Anthropic needs a user or assistant message besides the system ones.",
            param="messages",
        )
    _check_filled(turns, empty)
    return turns


def _check_filled(turns: list[dict[str, Any]], param: str) -> None:
    """Anthropic refuses a turn with no content (an empty text is left out of it)."""
    if turns and not turns[-1]["content"]:
        raise UnsupportedFeatureError(
            f"Anthropic takes no turn without content (at '{param}'); give the message some "
            "text or leave it out.",
            param=param,
        )


def _text(text: str) -> list[dict[str, Any]]:
    # Anthropic refuses empty text blocks; an empty text carries nothing.
    return [{"type": "text", "text": text}] if text else []


def _texts(message: Message) -> list[str]:
    """The texts of a message that holds only text: its content, or each of its parts."""
    content = message.content
    if isinstance(content, str):
        return [content] if content else []
    return [part.text for part in content or () if isinstance(part, TextPart) and part.text]


def _tool_result(message: Message) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    texts = _texts(message)
    if isinstance(message.content, list) and texts:
        block["content"] = [{"type": "text", "text": text} for text in texts]  # parts kept apart
    elif texts:
        block["content"] = texts[0]
    return block


def _assistant_blocks(message: Message, at: str) -> list[dict[str, Any]]:
    # reasoning_content echoed back is left out: Anthropic takes back only its own signed
    # thinking blocks, which a Chat Completions client does not have.
    blocks: list[dict[str, Any]] = []
    content = message.content
    if isinstance(content, str):
        blocks += _text(content)
    elif content is not None:
        for j, part in enumerate(content):
            match part:
                case TextPart():
                    blocks += _text(part.text)
                case RefusalPart():
                    blocks += _text(part.refusal)
                case _:
                    param = f"{at}.content[{j}]"
                    raise InvalidRequestError(
                        f"An assistant message holds only text and refusals (at '{param}').",
                        param=param,
                    )
    if message.refusal is not None:
        blocks += _text(message.refusal)
    for j, call in enumerate(message.tool_calls or ()):
        param = f"{at}.tool_calls[{j}].function.arguments"
        try:
            arguments = _decode_json(call.function.arguments) if call.function.arguments else {}
        except msgspec.DecodeError as exc:
            raise InvalidRequestError(
                f"The arguments at '{param}' are not valid JSON.", param=param
            ) from exc
        except RecursionError as exc:  # nesting deeper than the decoder follows
            raise InvalidRequestError(
                f"The arguments at '{param}' nest too deeply.", param=param
            ) from exc
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                f"The arguments at '{param}' must be a JSON object.", param=param
            )
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments}
        )
    return blocks


def _user_blocks(message: Message, at: str) -> list[dict[str, Any]]:
    content = message.content
    if isinstance(content, str):
        return _text(content)
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content or ()):
        param = f"{at}.content[{j}]"
        match part:
            case TextPart():
                blocks += _text(part.text)
            case ImagePart():
                blocks.append(_image(part, param))
            case FilePart():
                blocks.append(_document(part, param))
            case _:
                kind = type(part).__name__
                raise UnsupportedFeatureError(
                    f"Anthropic takes no {kind} content part (at '{param}').", param=param
                )
    return blocks


def _image(part: ImagePart, param: str) -> dict[str, Any]:
    image = part.image_url
    if image.detail not in (None, "auto"):
        raise UnsupportedFeatureError(
            f"Anthropic has no image detail setting; leave out 'detail' (at "
            f"'{param}.image_url.detail') or set it to 'auto'.",
            param=f"{param}.image_url.detail",
        )
    # The request passed `check_messages`, which decoded the data once already.
    split = split_data_url(image.url, f"{param}.image_url.url", checked=True)
    if split is None:
        return {"type": "image", "source": {"type": "url", "url": image.url}}
    media_type, data = split
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": data},
    }


def _document(part: FilePart, param: str) -> dict[str, Any]:
    file = part.file
    split = (
        split_data_url(file.file_data, f"{param}.file.file_data", checked=True)
        if file.file_data is not None
        else None
    )
    if split is None or split[0] != "application/pdf" or file.file_id is not None:
        raise UnsupportedFeatureError(
            f"Anthropic takes files only as PDF data URLs ('data:application/pdf;base64,...' "
            f"in 'file_data'), not file ids or other types (at '{param}').",
            param=param,
        )
    block: dict[str, Any] = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": split[1]},
    }
    if file.filename is not None:
        block["title"] = file.filename
    return block
