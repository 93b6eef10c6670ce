"""A stored conversation as Responses input items, for `GET /api/responses/{id}/input_items`.

The items are the conversation that led to the response (earlier turns included, as a
continued conversation is sent upstream whole; its instructions are not items), rebuilt from
the typed messages kept with it: `message` items (`input_text`, `input_image`, `input_file`;
assistant turns with `output_text` and `refusal`), `reasoning`, `function_call` and
`function_call_output` items. Their ids are made from the response id and the item's place,
so they are the same on every read and serve as the `after` cursor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from providers.errors import InvalidRequestError
from providers.types import ContentPart, FilePart, ImagePart, Message, RefusalPart, TextPart


class ItemPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"


def input_items(messages: list[Message], response_id: str) -> list[dict[str, Any]]:
    """The messages as input items, in conversation order."""
    stem = response_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []

    def add(prefix: str, item: dict[str, Any]) -> None:
        items.append({"id": f"{prefix}_{stem}_{len(items)}", **item, "status": "completed"})

    for message in messages:
        if message.role == "tool":
            answered = message.tool_call_id or ""
            output = {"type": "function_call_output", "call_id": answered, "output": message.text}
            add("fco", output)
        elif message.role != "assistant":
            content = [_input_part(p) for p in _parts(message)]
            add("msg", {"type": "message", "role": message.role, "content": content})
        else:
            if message.reasoning_content:
                text = {"type": "reasoning_text", "text": message.reasoning_content}
                add("rs", {"type": "reasoning", "summary": [], "content": [text]})
            content = [_output_part(p) for p in _parts(message)]
            if content:
                add("msg", {"type": "message", "role": "assistant", "content": content})
            for call in message.tool_calls or ():
                add(
                    "fc",
                    {
                        "type": "function_call",
                        "call_id": call.id,
                        "name": call.function.name,
                        "arguments": call.function.arguments,
                    },
                )
    return items


def _parts(message: Message) -> list[ContentPart]:
    content = message.content
    if content is None or content == "":
        return []
    return [TextPart(text=content)] if isinstance(content, str) else content


def _input_part(part: ContentPart) -> dict[str, Any]:
    match part:
        case ImagePart():
            detail = part.image_url.detail or "auto"
            return {"type": "input_image", "image_url": part.image_url.url, "detail": detail}
        case FilePart():
            file = part.file
            return {
                "type": "input_file",
                **{k: v for k, v in msgspec.structs.asdict(file).items() if v is not None},
            }
        case TextPart():
            return {"type": "input_text", "text": part.text}
        case _:  # no other part comes in through a Responses request
            return {"type": "input_text", "text": ""}


def _output_part(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, RefusalPart):
        return {"type": "refusal", "refusal": part.refusal}
    text = part.text if isinstance(part, TextPart) else ""
    return {"type": "output_text", "text": text, "annotations": []}


_PARAMS = frozenset({"limit", "order", "after", "include"})


def page(items: list[dict[str, Any]], query: Mapping[str, str]) -> ItemPage:
    """One page, as OpenAI pages input items (`limit` 1-100, default 20; `order` default
    `desc`; `after` an item id)."""
    for name in query:
        if name not in _PARAMS:
            raise InvalidRequestError(f"Unknown query parameter '{name}'.", param=name)
    if query.get("include"):
        raise InvalidRequestError(
            "No 'include' values are supported; leave it out.", param="include"
        )
    raw = query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequestError("'limit' must be a whole number from 1 to 100.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("'order' must be 'asc' or 'desc'.", param="order")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError("'after' names no item of this response.", param="after")
        start = ids.index(after) + 1
    chosen = ordered[start : start + int(raw)]
    return ItemPage(
        data=chosen,
        first_id=chosen[0]["id"] if chosen else None,
        last_id=chosen[-1]["id"] if chosen else None,
        has_more=start + len(chosen) < len(ordered),
    )
