"""providers.demo.DemoProvider at pace 0: deterministic, bounded, stoppable."""

from __future__ import annotations

import pytest

from providers import demo
from providers.demo import DemoProvider
from providers.types import (
    ChatRequest,
    Event,
    Finish,
    FunctionCall,
    FunctionDef,
    Message,
    ReasoningDelta,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    estimate_tokens,
)

QUESTION = 'What is "two" plus   two?'


def request(
    question: str = QUESTION,
    *,
    model: str = "echo",
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    messages: list[Message] | None = None,
) -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=messages or [Message(role="user", content=question)],
        max_tokens=max_tokens,
        stop=stop,
    )


async def collect(req: ChatRequest) -> list[Event]:
    return [event async for event in DemoProvider(pace=0).stream(req)]


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_same_request_same_output() -> None:
    first = await collect(request())
    second = await collect(request())
    assert first == second
    assert len(first) > 20


async def test_answer_quotes_last_user_message_and_ends_with_one_finish() -> None:
    messages = [
        Message(role="system", content="be brief"),
        Message(role="user", content="the first question"),
        Message(role="assistant", content="an answer"),
        Message(role="user", content=QUESTION),
    ]
    events = await collect(request(messages=messages))
    text = text_of(events)
    assert text.startswith('## tokenrelay demo\n\nYou wrote: *What is "two" plus two?*')
    assert "the first question" not in text
    assert text == demo._answer(QUESTION)
    finishes = [e for e in events if isinstance(e, Finish)]
    assert len(finishes) == 1
    assert events[-1] == Finish(
        reason="stop",
        usage=Usage(
            prompt_tokens=sum(estimate_tokens(m.text) for m in messages),
            completion_tokens=len(events) - 1,
        ),
    )
    assert all(isinstance(e, TextDelta) for e in events[:-1])


async def test_list_of_parts_question_is_quoted() -> None:
    message = Message(role="user", content=[])
    events = await collect(request(messages=[message]))
    assert "You wrote: *(an empty message)*" in text_of(events)


@pytest.mark.parametrize("limit", [1, 5, 17])
async def test_max_tokens_gives_length(limit: int) -> None:
    events = await collect(request(max_tokens=limit))
    assert len(events) == limit + 1
    assert all(isinstance(e, TextDelta) for e in events[:limit])
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.reason == "length"
    assert finish.usage is not None
    assert finish.usage.completion_tokens == limit
    assert finish.usage.prompt_tokens == estimate_tokens(QUESTION)


async def test_max_tokens_counts_reasoning() -> None:
    events = await collect(request(model="reasoner", max_tokens=3))
    assert [type(e) for e in events] == [ReasoningDelta] * 3 + [Finish]
    assert isinstance(events[-1], Finish)
    assert events[-1].reason == "length"


@pytest.mark.parametrize(
    "stop",
    [
        ["demo"],  # inside one piece
        ["You wrote"],  # across pieces, at a piece start
        ["y demo"],  # across pieces, mid-piece on both sides
        ["relay demo\n\nYou"],  # across several pieces
        ["never appears", "streams"],  # the earliest match of several
        ["", "streams"],  # empty stop strings are ignored
    ],
)
async def test_stop_sequence_cuts_text(stop: list[str]) -> None:
    full = demo._answer(QUESTION)
    cut = min(full.index(s) for s in stop if s and s in full)
    events = await collect(request(stop=stop))
    assert text_of(events) == full[:cut]
    assert isinstance(events[-1], Finish)
    assert events[-1].reason == "stop"
    assert events[-1].usage is not None
    assert events[-1].usage.completion_tokens == len(events) - 1
    assert all(e.text for e in events if isinstance(e, TextDelta))


async def test_stop_sequence_that_never_appears() -> None:
    events = await collect(request(stop=["zzz-not-there"]))
    assert text_of(events) == demo._answer(QUESTION)
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.reason == "stop"
    assert finish.usage == Usage(
        prompt_tokens=estimate_tokens(QUESTION), completion_tokens=len(events) - 1
    )


async def test_reasoner_thinks_before_answering() -> None:
    events = await collect(request(model="reasoner"))
    kinds = [type(e) for e in events]
    first_text = kinds.index(TextDelta)
    assert first_text > 0
    assert set(kinds[:first_text]) == {ReasoningDelta}
    assert ReasoningDelta not in kinds[first_text:]
    assert kinds[-1] is Finish
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning == "The user wants a demo answer; I will quote them."
    assert text_of(events) == demo._answer(QUESTION)
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.usage is not None
    assert finish.usage.completion_tokens == len(events) - 1


async def test_closing_early() -> None:
    stream = DemoProvider(pace=0).stream(request())
    first = await anext(stream)
    second = await anext(stream)
    assert (first, second) == (TextDelta("##"), TextDelta(" tokenrelay"))
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_list_models_and_aclose() -> None:
    provider = DemoProvider(name="mydemo", pace=0)
    assert provider.name == "mydemo"
    assert await provider.list_models() == ["echo", "reasoner", "tools"]
    await provider.aclose()


@pytest.mark.parametrize(
    ("text", "count"), [("", 0), ("   ", 0), ("one", 1), ("one two\nthree\t four ", 4)]
)
def test_estimate_tokens(text: str, count: int) -> None:
    assert estimate_tokens(text) == count


def after_calls(*names: str, choice: ToolChoice | None) -> ChatRequest:
    """A `tools` request whose assistant called `names` in turn, the last call just answered."""
    messages = [Message(role="user", content="hi")]
    for i, name in enumerate(names):
        call = ToolCall(id=f"c{i}", function=FunctionCall(name=name, arguments="{}"))
        messages.append(Message(role="assistant", tool_calls=[call]))
        messages.append(Message(role="tool", tool_call_id=f"c{i}", content="ok"))
    tools = [
        Tool(type="function", function=FunctionDef(name=name))
        for name in ("lookup", "search", "final_result")
    ]
    return ChatRequest(model="tools", messages=messages, tools=tools, tool_choice=choice)


@pytest.mark.parametrize(
    ("called", "expected"),
    [
        (["lookup"], "search"),
        (["search"], "lookup"),
        (["lookup", "search"], "final_result"),
        (["lookup", "search", "final_result"], "final_result"),
    ],
)
async def test_required_calls_a_tool_not_called_yet_after_a_result(
    called: list[str], expected: str
) -> None:
    events = await collect(after_calls(*called, choice="required"))
    head = events[0]
    assert isinstance(head, ToolCallDelta) and head.name == expected
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.reason == "tool_calls"


@pytest.mark.parametrize("choice", [None, "auto"])
async def test_a_tool_result_is_answered_in_text_unless_a_call_is_required(
    choice: ToolChoice | None,
) -> None:
    events = await collect(after_calls("lookup", choice=choice))
    assert text_of(events).startswith("The tool **lookup** answered:")
    assert not any(isinstance(e, ToolCallDelta) for e in events)
