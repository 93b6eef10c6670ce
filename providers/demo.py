"""An offline provider: deterministic markdown answers at a steady pace, no key needed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from providers.types import (
    ChatRequest,
    Event,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    Usage,
    estimate_tokens,
)

MODELS = ("echo", "reasoner")
_PIECES = re.compile(r"\s*\S+|\s+")  # the last alternative keeps trailing space
_REASONING = "The user wants a demo answer; I will quote them."


def _answer(question: str) -> str:
    quoted = " ".join(question.split())[:200] or "(an empty message)"
    words = len(question.split())
    return (
        "## tokenrelay demo\n\n"
        f"You wrote: *{quoted}*\n\n"
        "This answer comes from the offline **demo** provider, so it works with no API key. "
        "It streams at a steady pace, one word at a time, to show the gateway relaying tokens.\n\n"
        "| what | value |\n|---|---|\n"
        f"| words in your message | {words} |\n"
        f"| characters | {len(question)} |\n\n"
        "Things to try:\n\n"
        "1. Press **Stop** while this streams: the stream ends at once.\n"
        "2. Ask a longer question and watch the pace stay steady.\n"
        "3. Configure a real provider to talk to an actual model.\n\n"
        "```python\nfrom openai import OpenAI\n\n"
        'client = OpenAI(base_url="http://127.0.0.1:8000/api", api_key="unused")\n'
        'reply = client.chat.completions.create(model="demo/echo", messages=[...])\n```\n'
    )


def _before_stop(text: str, stops: list[str] | None) -> str:
    """The text up to the first stop sequence, as an upstream with `stop` would return it."""
    found = [i for i in (text.find(s) for s in stops or () if s) if i >= 0]
    return text[: min(found)] if found else text


class DemoProvider:
    """Streams a markdown answer that quotes the last user message; `reasoner` thinks first.

    Every piece, reasoning or text, counts as one completion token against `max_tokens`.
    """

    def __init__(self, *, name: str = "demo", pace: float = 0.02) -> None:
        self.name = name
        self._pace = pace

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        question = next((m.text for m in reversed(request.messages) if m.role == "user"), "")
        prompt_tokens = sum(estimate_tokens(m.text) for m in request.messages)
        reasoning = _PIECES.findall(_REASONING) if request.model == "reasoner" else []
        text = _PIECES.findall(_before_stop(_answer(question), request.stop))
        pieces: list[Event] = [ReasoningDelta(p) for p in reasoning]
        pieces += [TextDelta(p) for p in text]
        reason: FinishReason = "stop"
        if request.max_tokens is not None and len(pieces) > request.max_tokens:
            pieces, reason = pieces[: request.max_tokens], "length"
        for piece in pieces:
            await asyncio.sleep(self._pace)
            yield piece
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces))
        yield Finish(reason=reason, usage=usage)

    async def list_models(self) -> list[str]:
        return list(MODELS)

    async def aclose(self) -> None:
        return None
