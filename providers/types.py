"""The vocabulary every transport shares: requests, messages, models and stream events."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

Role = Literal["system", "developer", "user", "assistant"]
FinishReason = Literal["stop", "length", "content_filter", "cancelled", "error"]


class TextPart(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="text"):
    """One text part of OpenAI's list-of-parts message content."""

    text: str


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One chat message; `developer` is OpenAI's newer name for a system message."""

    role: Role
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string, whatever form it came in."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A chat request as a provider sees it: `model` is the upstream model name."""

    model: str
    messages: list[Message]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


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


class Finish(msgspec.Struct, frozen=True, kw_only=True, tag="finish"):
    """The last event of a stream that ended normally; `usage` is None if the upstream gave none."""

    reason: FinishReason
    usage: Usage | None = None


Event = TextDelta | ReasoningDelta | Finish


_WORDS = re.compile(r"\s*\S+")


def estimate_tokens(text: str) -> int:
    """A rough token count (whitespace-separated pieces) for text no upstream counted."""
    return len(_WORDS.findall(text))
