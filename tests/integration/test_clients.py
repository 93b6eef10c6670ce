"""Third-party clients against the gateway: LangChain and pydantic-ai.

Each library builds its own Chat Completions requests (tools, forced tool choice, strict JSON
schemas, streamed tool calls) and parses the answers with its own code, so these tests show
that what mainstream clients send is accepted and what the gateway answers is understood.
Every request body is recorded on the way out, so the tests also pin what each library sent.
The demo provider answers most of them: `demo/tools` calls the first tool, `demo/echo` answers
text or JSON that fits a schema, and calls a tool when one is forced. The last few go to an
OpenAI-kind upstream (the fake) and check that it received what the library sent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import httpx2
import pydantic
import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic_ai import Agent, BinaryContent, NativeOutput
from pydantic_ai.messages import ThinkingPart
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from tests.fakeupstream import FakeToolCall, FakeUpstream

Model = Callable[..., str]

QUESTION = "What is the weather in Paris?"
# A 1x1 transparent PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


class Forecast(pydantic.BaseModel):
    """A forecast for a city."""

    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int = pydantic.Field(ge=1)
    sunny: bool
    hours: list[float]


class Answer(pydantic.BaseModel):
    answer: str


class Wire:
    """An HTTP client for the libraries that keeps the JSON body of every request it sends."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.http = httpx2.AsyncClient(timeout=10, event_hooks={"request": [self._record]})

    async def _record(self, request: httpx2.Request) -> None:
        self.bodies.append(json.loads(request.content))


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    recorder = Wire()
    async with recorder.http:
        yield recorder


@pytest.fixture
def api(gateway: str) -> str:
    return gateway + "/api"


def chat_openai(api: str, wire: Wire, model: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=api,
        api_key="unused",  # type: ignore[arg-type]
        http_async_client=wire.http,
        max_retries=0,
        **options,
    )


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"], days: int) -> str:
    """The weather in a city for the next few days."""
    return json.dumps({"city": city, "unit": unit, "days": days, "sky": "clear"})


# Streamed structured output: LangChain dumps the SDK's stream events, whose `parsed` field is
# typed `None` but holds the parsed model, and pydantic warns about that; the gateway's answer
# plays no part in it.
PARSED_STREAM_WARNING = pytest.mark.filterwarnings(
    "ignore:Pydantic serializer warnings:UserWarning"
)
WEATHER_ARGS = {"city": "demo", "unit": "celsius", "days": 1}


# LangChain


async def test_langchain_invoke_and_stream_text(api: str, wire: Wire) -> None:
    llm = chat_openai(api, wire, "demo/echo", stream_usage=True)
    reply = await llm.ainvoke(QUESTION)
    chunks = [chunk async for chunk in llm.astream(QUESTION)]
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert f"You wrote: *{QUESTION}*" in reply.content
    assert len(chunks) > 10
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.content == reply.content
    assert streamed.response_metadata["finish_reason"] == "stop"
    assert streamed.usage_metadata is not None and streamed.usage_metadata["output_tokens"] > 10
    invoked, stream = wire.bodies
    assert invoked["stream"] is False
    assert (stream["stream"], stream["stream_options"]) == (True, {"include_usage": True})


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "astream"])
async def test_langchain_bound_tool_is_called(api: str, wire: Wire, streamed: bool) -> None:
    llm = chat_openai(api, wire, "demo/tools").bind_tools([get_weather])
    if streamed:
        chunks = [chunk async for chunk in llm.astream(QUESTION)]
        assert sum(1 for c in chunks if isinstance(c, AIMessageChunk) and c.tool_call_chunks) >= 3
        message: BaseMessage = sum(chunks[1:], chunks[0])
    else:
        message = await llm.ainvoke(QUESTION)
    assert isinstance(message, AIMessage)
    [call] = message.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", WEATHER_ARGS)
    assert call["id"] and call["id"].startswith("call_")
    assert message.response_metadata["finish_reason"] == "tool_calls"
    [sent] = wire.bodies
    [function] = [t["function"] for t in sent["tools"]]
    assert function["name"] == "get_weather"
    assert function["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert "tool_choice" not in sent


async def test_langchain_forced_strict_tool(api: str, wire: Wire) -> None:
    llm = chat_openai(api, wire, "demo/echo").bind_tools(
        [get_weather], tool_choice="any", strict=True
    )
    message = await llm.ainvoke(QUESTION)
    assert isinstance(message, AIMessage)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", WEATHER_ARGS)]
    # "any" is LangChain's word for OpenAI's "required"; demo/echo calls only when forced.
    [sent] = wire.bodies
    assert sent["tool_choice"] == "required"
    [function] = [t["function"] for t in sent["tools"]]
    assert function["strict"] is True
    assert function["parameters"]["additionalProperties"] is False


async def test_langchain_tool_result_round_trip(api: str, wire: Wire) -> None:
    llm = chat_openai(api, wire, "demo/tools").bind_tools([get_weather])
    question = HumanMessage(QUESTION)
    called = await llm.ainvoke([question])
    [call] = called.tool_calls
    result = await get_weather.ainvoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    reply = await llm.ainvoke([question, called, result])
    assert isinstance(reply.content, str) and not reply.tool_calls
    assert "The tool **get_weather** answered" in reply.content
    assert json.dumps({**WEATHER_ARGS, "sky": "clear"}) in reply.content
    # LangChain sends the assistant turn with null content and the result as a `tool` turn.
    assistant, tool_turn = wire.bodies[-1]["messages"][1:]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"][0]["id"] == call["id"]
    assert tool_turn == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": result.content,
    }


async def test_langchain_history_in_content_blocks(api: str, wire: Wire) -> None:
    call = {"name": "get_weather", "args": WEATHER_ARGS, "id": "call_7", "type": "tool_call"}
    history = [
        HumanMessage(QUESTION, name="ada"),
        AIMessage(content=[{"type": "text", "text": "Let me look."}], tool_calls=[call]),
        ToolMessage(content=[{"type": "text", "text": "rain"}], tool_call_id="call_7"),
    ]
    reply = await chat_openai(api, wire, "demo/tools").bind_tools([get_weather]).ainvoke(history)
    assert isinstance(reply.content, str)
    assert "The tool **get_weather** answered:\n\n```\nrain\n```" in reply.content
    # Text parts on assistant and tool turns, as LangChain sends content blocks.
    user, assistant, tool_turn = wire.bodies[0]["messages"]
    assert user == {"role": "user", "content": QUESTION, "name": "ada"}
    assert assistant["content"] == [{"type": "text", "text": "Let me look."}]
    assert tool_turn["content"] == [{"type": "text", "text": "rain"}]


@PARSED_STREAM_WARNING
@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "astream"])
async def test_langchain_structured_output_by_json_schema(
    api: str, wire: Wire, streamed: bool
) -> None:
    llm = chat_openai(api, wire, "demo/echo").with_structured_output(Forecast, method="json_schema")
    if streamed:
        *_, forecast = [part async for part in llm.astream(QUESTION)]
    else:
        forecast = await llm.ainvoke(QUESTION)
    assert forecast == Forecast(city=QUESTION, unit="celsius", days=2, sunny=True, hours=[1.0])
    [sent] = wire.bodies
    spec = sent["response_format"]["json_schema"]
    assert sent["response_format"]["type"] == "json_schema"
    assert (spec["name"], spec["strict"]) == ("Forecast", True)
    assert spec["schema"]["additionalProperties"] is False


@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "astream"])
async def test_langchain_structured_output_by_function_calling(
    api: str, wire: Wire, streamed: bool
) -> None:
    llm = chat_openai(api, wire, "demo/echo").with_structured_output(
        Forecast, method="function_calling"
    )
    if streamed:
        *_, forecast = [part async for part in llm.astream(QUESTION)]
    else:
        forecast = await llm.ainvoke(QUESTION)
    assert forecast == Forecast(city="demo", unit="celsius", days=2, sunny=True, hours=[1.0])
    # demo/echo calls no tool unless forced: LangChain forces it by name, one call at a time.
    [sent] = wire.bodies
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Forecast"}}
    assert sent["parallel_tool_calls"] is False


# pydantic-ai


def agent_model(api: str, wire: Wire, model: str) -> OpenAIChatModel:
    provider = OpenAIProvider(base_url=api, api_key="unused", http_client=wire.http)
    return OpenAIChatModel(model, provider=provider)


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_stream"])
async def test_pydantic_ai_agent_calls_its_tool_then_answers(
    api: str, wire: Wire, streamed: bool
) -> None:
    agent = Agent(agent_model(api, wire, "demo/tools"))
    calls: list[tuple[str, int]] = []

    @agent.tool_plain
    def city_weather(city: str, days: int) -> str:
        """The weather in a city for the next few days."""
        calls.append((city, days))
        return f"clear skies in {city} for {days} day(s)"

    if streamed:
        async with agent.run_stream(QUESTION) as run:
            output = await run.get_output()
    else:
        output = (await agent.run(QUESTION)).output
    assert calls == [("demo", 1)]
    assert "The tool **city_weather** answered" in output
    assert "clear skies in demo for 1 day(s)" in output
    first, second = wire.bodies
    assert first["tool_choice"] == "auto"
    assert first["tools"][0]["function"]["strict"] is True
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool"]
    assert all(body["stream"] is streamed for body in wire.bodies)


async def test_pydantic_ai_tool_output(api: str, wire: Wire) -> None:
    agent = Agent(agent_model(api, wire, "demo/tools"), output_type=Forecast)
    result = await agent.run(QUESTION)
    assert result.output == Forecast(city="demo", unit="celsius", days=2, sunny=True, hours=[1.0])
    # The default output mode: one `final_result` tool the model is required to call.
    [sent] = wire.bodies
    assert [t["function"]["name"] for t in sent["tools"]] == ["final_result"]
    assert sent["tool_choice"] == "required"


async def test_pydantic_ai_tool_then_tool_output(api: str, wire: Wire) -> None:
    agent = Agent(agent_model(api, wire, "demo/tools"), output_type=Forecast)
    calls: list[str] = []

    @agent.tool_plain
    def city_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return "clear"

    result = await agent.run(QUESTION)
    assert calls == ["demo"]
    assert result.output == Forecast(city="demo", unit="celsius", days=2, sunny=True, hours=[1.0])
    # The agent's own tools come first, then `final_result`, and a call is required every turn:
    # after its tool's result the demo model calls the tool not called yet.
    first, second = wire.bodies
    assert [t["function"]["name"] for t in first["tools"]] == ["city_weather", "final_result"]
    assert first["tool_choice"] == second["tool_choice"] == "required"
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": second["messages"][-2]["tool_calls"][0]["id"],
        "content": "clear",
    }


async def test_pydantic_ai_native_output(api: str, wire: Wire) -> None:
    agent = Agent(agent_model(api, wire, "demo/echo"), output_type=NativeOutput(Forecast))
    result = await agent.run(QUESTION)
    assert result.output == Forecast(city=QUESTION, unit="celsius", days=2, sunny=True, hours=[1.0])
    [sent] = wire.bodies
    assert "tools" not in sent
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["strict"] is True


async def test_pydantic_ai_keeps_reasoning_across_turns(api: str, wire: Wire) -> None:
    agent = Agent(agent_model(api, wire, "demo/reasoner"))
    first = await agent.run(QUESTION)
    [thinking] = [p for p in first.all_messages()[-1].parts if isinstance(p, ThinkingPart)]
    assert thinking.content == "The user wants a demo answer; I will quote them."
    second = await agent.run("And in Rome?", message_history=first.all_messages())
    assert "You wrote: *And in Rome?*" in second.output
    # pydantic-ai hands the reasoning back on the assistant turn, where the gateway takes it.
    assistant = wire.bodies[1]["messages"][1]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == thinking.content
    assert assistant["content"] == first.output


async def test_pydantic_ai_image_input(api: str, wire: Wire) -> None:
    agent = Agent(agent_model(api, wire, "demo/echo"))
    result = await agent.run([QUESTION, BinaryContent(data=PNG, media_type="image/png")])
    assert "| images attached | 1 |" in result.output
    [sent] = wire.bodies
    [message] = sent["messages"]
    image = message["content"][1]["image_url"]["url"]
    assert image == "data:image/png;base64," + base64.b64encode(PNG).decode()


# Through an OpenAI-kind upstream (the fake, answering a forecast as JSON text)

PARIS = Forecast(city="Paris", unit="celsius", days=3, sunny=False, hours=[6.5, 7.0])
PARIS_PIECES = [
    '{"city": "Paris", ',
    '"unit": "celsius", "days": 3, ',
    '"sunny": false, "hours": [6.5, 7.0]}',
]


def without_stream_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}


@PARSED_STREAM_WARNING
@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "astream"])
async def test_langchain_json_schema_reaches_the_upstream_as_sent(
    api: str, wire: Wire, model: Model, upstream: FakeUpstream, streamed: bool
) -> None:
    name = model(text=PARIS_PIECES)
    llm = chat_openai(api, wire, f"oai/{name}").with_structured_output(
        Forecast, method="json_schema"
    )
    if streamed:
        *_, forecast = [part async for part in llm.astream(QUESTION)]
    else:
        forecast = await llm.ainvoke(QUESTION)
    assert forecast == PARIS
    [sent] = wire.bodies
    [received] = upstream.by_model(name)
    assert received.stream is True  # the gateway always streams from its upstream
    assert without_stream_fields(received.body) == without_stream_fields(sent)


async def test_pydantic_ai_native_output_reaches_the_upstream_as_sent(
    api: str, wire: Wire, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=PARIS_PIECES)
    agent = Agent(agent_model(api, wire, f"oai/{name}"), output_type=NativeOutput(Forecast))

    @agent.tool_plain
    def city_weather(city: str) -> str:
        """The weather in a city."""
        raise AssertionError("the upstream answered without calling a tool")

    result = await agent.run(QUESTION)
    assert result.output == PARIS
    [sent] = wire.bodies
    [received] = upstream.by_model(name)
    assert without_stream_fields(received.body) == without_stream_fields(sent)
    assert received.body["tools"][0]["function"]["name"] == "city_weather"


@pytest.mark.parametrize("provider", ["oai", "ant"])
@pytest.mark.parametrize("streamed", [False, True], ids=["invoke", "astream"])
async def test_langchain_parallel_tool_calls_from_either_upstream_kind(
    api: str, wire: Wire, model: Model, upstream: FakeUpstream, provider: str, streamed: bool
) -> None:
    calls = [
        FakeToolCall(
            name="get_weather",
            arguments=['{"city": "Pa', 'ris", "unit": "cel', 'sius", "days": 2}'],
        ),
        FakeToolCall(
            name="get_weather", arguments=['{"city": "Lyon", ', '"unit": "celsius", "days": 3}']
        ),
    ]
    name = model(text=[], tool_calls=calls)
    llm = chat_openai(api, wire, f"{provider}/{name}").bind_tools([get_weather])
    if streamed:
        chunks = [chunk async for chunk in llm.astream(QUESTION)]
        message: BaseMessage = sum(chunks[1:], chunks[0])
    else:
        message = await llm.ainvoke(QUESTION)
    assert isinstance(message, AIMessage)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius", "days": 2}),
        ("get_weather", {"city": "Lyon", "unit": "celsius", "days": 3}),
    ]
    assert len({c["id"] for c in message.tool_calls}) == 2
    [recorded] = upstream.by_model(name)
    [sent_tool] = recorded.body["tools"]
    if provider == "ant":  # Anthropic's shape upstream, OpenAI's at the client
        assert sent_tool["name"] == "get_weather"
        assert sent_tool["input_schema"]["properties"]["days"] == {"type": "integer"}
    else:
        assert sent_tool["function"]["name"] == "get_weather"
