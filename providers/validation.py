"""Checks of a decoded request that its types alone cannot express; each error names its field.

They run before any upstream call, so a conversation that cannot be valid (a tool result that
answers no call, a call left unanswered, a malformed data URL, a tool choice naming no tool)
costs no upstream request and is answered with a 400 that says where the problem is.
"""

from __future__ import annotations

import binascii
import re

from providers.errors import InvalidRequestError
from providers.types import (
    PART_KINDS,
    AudioPart,
    ContentPart,
    FilePart,
    ImagePart,
    Message,
    NamedToolChoice,
    RefusalPart,
    TextPart,
    Tool,
    ToolChoice,
)

# data:<media type>[;param=value]*;base64,<data>
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[\w.+-]+=[^;,]*)*);base64,", re.ASCII)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

# Which content parts each role may carry (OpenAI's rules).
_PARTS: dict[str, tuple[type, ...]] = {
    "system": (TextPart,),
    "developer": (TextPart,),
    "user": (TextPart, ImagePart, AudioPart, FilePart),
    "assistant": (TextPart, RefusalPart),
    "tool": (TextPart,),
}


def split_data_url(url: str, param: str, *, checked: bool = False) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:` URL, None for another URL; refuses a bad one.

    `checked`: the URL passed `check_messages` already, so its data (megabytes, maybe, and
    decoded at a few milliseconds per megabyte) is not decoded again.
    """
    if not url.startswith("data:"):
        return None
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequestError(
            f"Malformed data URL at '{param}': expected 'data:<media type>;base64,<data>'.",
            param=param,
        )
    data = url[match.end() :]
    if not checked:
        try:
            binascii.a2b_base64(data, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(
                f"Malformed data URL at '{param}': the data is not valid base64.", param=param
            ) from exc
    return match.group(1).lower(), data


def check_image_url(url: str, param: str) -> None:
    """An image is an http(s) URL or a base64 `data:` URL of a common image type."""
    split = split_data_url(url, param)
    if split is not None:
        if split[0] not in IMAGE_TYPES:
            raise InvalidRequestError(
                f"Unsupported image type '{split[0]}' at '{param}'; "
                f"use one of {', '.join(sorted(IMAGE_TYPES))}.",
                param=param,
            )
        return
    if not url.startswith(("https://", "http://")):
        raise InvalidRequestError(
            f"The image at '{param}' must be an http(s) URL or a base64 data URL.", param=param
        )


def _check_part(part: ContentPart, role: str, param: str) -> None:
    if not isinstance(part, _PARTS[role]):
        raise InvalidRequestError(
            f"A {role} message cannot hold an '{PART_KINDS[type(part)]}' content part "
            f"(at '{param}').",
            param=param,
        )
    match part:
        case ImagePart():
            check_image_url(part.image_url.url, f"{param}.image_url.url")
        case FilePart():
            file = part.file
            if file.file_data is None and file.file_id is None:
                raise InvalidRequestError(
                    f"A file part needs 'file_data' or 'file_id' (at '{param}.file').",
                    param=f"{param}.file",
                )
            if file.file_data is not None:
                split_data_url(file.file_data, f"{param}.file.file_data")
        case _:
            pass


def _check_message(message: Message, index: int, calls: set[str]) -> None:
    at = f"messages[{index}]"
    role = message.role
    if message.tool_calls is not None and role != "assistant":
        raise InvalidRequestError(
            f"Only assistant messages may hold 'tool_calls' (at '{at}.tool_calls').",
            param=f"{at}.tool_calls",
        )
    if message.tool_call_id is not None and role != "tool":
        raise InvalidRequestError(
            f"Only tool messages may hold 'tool_call_id' (at '{at}.tool_call_id').",
            param=f"{at}.tool_call_id",
        )
    for name in ("refusal", "reasoning_content", "audio"):
        if getattr(message, name) is not None and role != "assistant":
            raise InvalidRequestError(
                f"Only assistant messages may hold '{name}' (at '{at}.{name}').",
                param=f"{at}.{name}",
            )
    if message.content is None:
        if role != "assistant" or not (message.tool_calls or message.refusal or message.audio):
            raise InvalidRequestError(
                f"A {role} message needs 'content' (at '{at}.content').", param=f"{at}.content"
            )
    elif not isinstance(message.content, str):
        for j, part in enumerate(message.content):
            _check_part(part, role, f"{at}.content[{j}]")
    for j, call in enumerate(message.tool_calls or ()):
        if call.id in calls:
            raise InvalidRequestError(
                f"Tool call id '{call.id}' is used twice (at '{at}.tool_calls[{j}].id').",
                param=f"{at}.tool_calls[{j}].id",
            )
        calls.add(call.id)
    if role == "tool" and message.tool_call_id is None:
        raise InvalidRequestError(
            f"A tool message needs 'tool_call_id' (at '{at}.tool_call_id').",
            param=f"{at}.tool_call_id",
        )


def _answer(message: Message, index: int, calls: set[str], waiting: dict[str, str]) -> None:
    """A tool message answers a call of the assistant turn right before it, once."""
    call_id = message.tool_call_id
    if call_id in waiting:
        del waiting[call_id]
        return
    if call_id not in calls:
        problem = "which no earlier assistant message called"
    else:
        problem = "which is answered already or was not called by the assistant turn before it"
    raise InvalidRequestError(
        f"The tool message at 'messages[{index}]' answers '{call_id}', {problem}.",
        param=f"messages[{index}].tool_call_id",
    )


def _unanswered(waiting: dict[str, str]) -> InvalidRequestError:
    call_id, param = next(iter(waiting.items()))
    return InvalidRequestError(
        f"Tool call '{call_id}' (at '{param}') has no answer: an assistant message with "
        "'tool_calls' must be followed by a tool message answering each call.",
        param=param,
    )


def check_messages(messages: list[Message]) -> None:
    """Roles hold only what they may, tool calls are answered right after the assistant turn
    that made them (each once, as OpenAI and Anthropic require), URLs are sound."""
    calls: set[str] = set()
    waiting: dict[str, str] = {}  # calls of the last assistant turn not answered yet
    for index, message in enumerate(messages):
        _check_message(message, index, calls)
        if message.role == "tool":
            _answer(message, index, calls, waiting)
            continue
        if waiting:
            raise _unanswered(waiting)
        for j, call in enumerate(message.tool_calls or ()):
            waiting[call.id] = f"messages[{index}].tool_calls[{j}]"
    if waiting:
        raise _unanswered(waiting)


def check_tools(tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None) -> None:
    """Tool names are unique, parameters are object schemas, a named choice names a tool."""
    names: set[str] = set()
    for i, tool in enumerate(tools or ()):
        function = tool.function
        if function.name in names:
            raise InvalidRequestError(
                f"Two tools are named '{function.name}' (at 'tools[{i}].function.name').",
                param=f"tools[{i}].function.name",
            )
        names.add(function.name)
        parameters = function.parameters
        if parameters is not None and parameters.get("type", "object") != "object":
            raise InvalidRequestError(
                f"The parameters of tool '{function.name}' must be a JSON schema of an object "
                f"(at 'tools[{i}].function.parameters').",
                param=f"tools[{i}].function.parameters",
            )
    if not tools:
        if choice is not None:
            raise InvalidRequestError(
                "'tool_choice' is only allowed when 'tools' are given.", param="tool_choice"
            )
        if parallel is not None:
            raise InvalidRequestError(
                "'parallel_tool_calls' is only allowed when 'tools' are given.",
                param="parallel_tool_calls",
            )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f"'tool_choice' names '{choice.function.name}', which is not among the tools.",
            param="tool_choice.function.name",
        )
