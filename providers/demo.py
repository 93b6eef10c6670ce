"""An offline provider: deterministic markdown answers at a steady pace, no key needed.

`echo` quotes the last user message (and counts attached images), `reasoner` thinks first,
and `tools` calls the first tool it is given with arguments built from the tool's schema,
then answers from the tool's result. Every model honours `tool_choice` (`required` or a named
function makes it call; after a tool result `required` calls a tool not called yet) and
`response_format` (it answers JSON that fits the schema).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import AsyncGenerator, Iterable

from providers.base import Outlet
from providers.capabilities import EVERYTHING, Capabilities
from providers.samples import sample
from providers.types import (
    ChatRequest,
    Delta,
    Event,
    Finish,
    FinishReason,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    ReasoningDelta,
    TextDelta,
    Tool,
    ToolCallDelta,
    Usage,
    estimate_tokens,
)

MODELS = ("echo", "reasoner", "tools")
# Where the client reached the gateway, for the example in the answer; the server sets it for
# each request (the provider layer knows no web framework).
GATEWAY_URL = contextvars.ContextVar("gateway_url", default="http://127.0.0.1:8000")
_PIECES = re.compile(r"\s*\S+|\s+")  # the last alternative keeps trailing space
_REASONING = "The user wants a demo answer; I will quote them."
# Sampling options change nothing in a deterministic answer, so every option is accepted;
# images are acknowledged, audio and files are not read.
_DEMO = Capabilities(options=EVERYTHING.options, parts=frozenset({"image_url"}))


def _answer(question: str, images: int = 0) -> str:
    quoted = " ".join(question.split())[:200] or "(an empty message)"
    words = len(question.split())
    attached = f"| images attached | {images} |\n" if images else ""
    return (
        "## tokenrelay demo\n\n"
        f"You wrote: *{quoted}*\n\n"
        "This answer comes from the offline **demo** provider, so it works with no API key. "
        "It streams at a steady pace, one word at a time, to show the gateway relaying tokens.\n\n"
        "| what | value |\n|---|---|\n"
        f"| words in your message | {words} |\n"
        f"| characters | {len(question)} |\n"
        f"{attached}\n"
        "Things to try:\n\n"
        "1. Press **Stop** while this streams: the stream ends at once.\n"
        "2. Ask a longer question and watch the pace stay steady.\n"
        "3. Configure a real provider to talk to an actual model.\n\n"
        "```python\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{GATEWAY_URL.get()}/api", api_key="unused")\n'
        'reply = client.chat.completions.create(model="demo/echo", messages=[...])\n```\n'
    )


def _tool_answer(name: str, result: str) -> str:
    shown = result if len(result) <= 500 else result[:500] + "…"
    return (
        f"The tool **{name}** answered:\n\n```\n{shown}\n```\n\n"
        "A real model would now use that result; the demo provider only shows it back.\n"
    )


def _before_stop(text: str, stops: list[str] | None) -> str:
    """The text up to the first stop sequence, as an upstream with `stop` would return it."""
    found = [i for i in (text.find(s) for s in stops or () if s) if i >= 0]
    return text[: min(found)] if found else text


def _tool_to_call(request: ChatRequest) -> Tool | None:
    """The tool this turn calls, if any: never with `none`, after a tool result only if required.

    `required` promises a call on every turn. After a tool result it calls the first tool not
    called yet (else the last), so a client that lists its own tools before a final-answer tool
    (pydantic-ai's `final_result`) gets that answer next.
    """
    tools, choice = request.tools, request.tool_choice
    if not tools or choice == "none":
        return None
    if request.messages[-1].role == "tool":
        if choice != "required":
            return None
        called = {c.function.name for m in request.messages for c in m.tool_calls or ()}
        return next((t for t in tools if t.function.name not in called), tools[-1])
    if isinstance(choice, NamedToolChoice):
        return next(t for t in tools if t.function.name == choice.function.name)
    if choice == "required" or request.model == "tools":
        return tools[0]
    return None


def _call_pieces(tool: Tool, turn: int) -> list[Delta]:
    """One call: its id and name first, then the JSON arguments in a few fragments."""
    arguments = json.dumps(sample(tool.function.parameters or {"type": "object"}))
    step = max(1, len(arguments) // 3)
    head: list[Delta] = [ToolCallDelta(index=0, id=f"call_demo_{turn}", name=tool.function.name)]
    return head + [
        ToolCallDelta(index=0, arguments=arguments[i : i + step])
        for i in range(0, len(arguments), step)
    ]


def _called_name(messages: list[Message], call_id: str | None) -> str:
    for message in messages:
        for call in message.tool_calls or ():
            if call.id == call_id:
                return call.function.name
    return "tool"


def _text(request: ChatRequest, question: str, images: int) -> str:
    last = request.messages[-1]
    if last.role == "tool":
        return _tool_answer(_called_name(request.messages, last.tool_call_id), last.text)
    quoted = " ".join(question.split())[:200]
    match request.response_format:
        case JsonSchemaFormat(json_schema=spec):
            return json.dumps(sample(spec.schema or {"type": "object"}, quoted or "demo"))
        case JsonObjectFormat():
            return json.dumps({"answer": quoted})
        case _:
            return _answer(question, images)


class DemoProvider:
    """Streams deterministic answers; every piece counts as one token against `max_tokens`."""

    def __init__(
        self, *, name: str = "demo", pace: float = 0.02, inputs: Iterable[str] | None = None
    ) -> None:
        self.name = name
        self._pace = pace
        self.capabilities = _DEMO.restricted(inputs)

    def check(self, request: ChatRequest) -> None:
        self.capabilities.check(self.name, request)

    def _pieces(self, request: ChatRequest) -> list[Delta]:
        tool = _tool_to_call(request)
        if tool is not None:
            return _call_pieces(tool, len(request.messages))
        user = next((m for m in reversed(request.messages) if m.role == "user"), None)
        question = user.text if user is not None else ""
        images = 0
        if user is not None and isinstance(user.content, list):
            images = sum(1 for part in user.content if isinstance(part, ImagePart))
        reasoning = _PIECES.findall(_REASONING) if request.model == "reasoner" else []
        text = _PIECES.findall(_before_stop(_text(request, question, images), request.stop))
        pieces: list[Delta] = [ReasoningDelta(p) for p in reasoning]
        return pieces + [TextDelta(p) for p in text]

    async def stream(
        self, request: ChatRequest, outlet: Outlet | None = None
    ) -> AsyncGenerator[Event, None]:
        # Paced by a sleep per piece, so every piece wakes this task anyway: no `outlet`.
        prompt_tokens = sum(estimate_tokens(m.text) for m in request.messages)
        pieces = self._pieces(request)
        reason: FinishReason = "stop"
        if pieces and isinstance(pieces[0], ToolCallDelta):
            reason = "tool_calls"
        if request.max_tokens is not None and len(pieces) > request.max_tokens:
            pieces, reason = pieces[: request.max_tokens], "length"
        for piece in pieces:
            await asyncio.sleep(self._pace)
            yield piece
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=len(pieces))
        yield Finish(reason=reason, usage=usage)

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """None: The demo has no count of its own."""
        return None

    async def list_models(self) -> list[str]:
        return list(MODELS)

    async def aclose(self) -> None:
        return None
