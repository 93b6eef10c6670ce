"""An offline provider: deterministic markdown answers at a steady pace, no key needed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator

from providers.types import (
    ChatRequest,
    Event,
    Finish,
    ReasoningDelta,
    TextDelta,
    Usage,
    estimate_tokens,
)

MODELS = ("echo", "reasoner")
_PIECES = re.compile(r"\s*\S+")


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


class DemoProvider:
    """Streams a markdown answer that quotes the last user message; `reasoner` thinks first."""

    def __init__(self, *, name: str = "demo", pace: float = 0.02) -> None:
        self.name = name
        self._pace = pace

    async def stream(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        question = next((m.text for m in reversed(request.messages) if m.role == "user"), "")
        prompt_tokens = sum(estimate_tokens(m.text) for m in request.messages)
        produced = 0
        limit = request.max_tokens
        if request.model == "reasoner":
            for piece in _PIECES.findall("The user wants a demo answer; I will quote them."):
                await asyncio.sleep(self._pace)
                produced += 1
                yield ReasoningDelta(piece)
        text = ""
        for piece in _PIECES.findall(_answer(question)):
            if limit is not None and produced >= limit:
                yield Finish(
                    reason="length",
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=produced),
                )
                return
            await asyncio.sleep(self._pace)
            text += piece
            stop_at = _stop_index(text, request.stop)
            if stop_at is not None:
                cut = piece[: len(piece) - (len(text) - stop_at)]
                if cut:
                    produced += 1
                    yield TextDelta(cut)
                break
            produced += 1
            yield TextDelta(piece)
        yield Finish(
            reason="stop", usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=produced)
        )

    async def list_models(self) -> list[str]:
        return list(MODELS)

    async def aclose(self) -> None:
        return None


def _stop_index(text: str, stops: list[str] | None) -> int | None:
    if not stops:
        return None
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None
