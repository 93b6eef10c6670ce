"""Tools, structured output, images and thinking through an Anthropic provider, end to end.

The `openai` SDK talks to the gateway; the gateway talks Anthropic's Messages API to the fake
upstream, whose record of each request shows what the mapping sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pydantic
import pytest

from tests.conftest import GatewayFactory
from tests.fakeupstream import FakeToolCall, FakeUpstream

Model = Callable[..., str]
HELLO: Any = [{"role": "user", "content": "hello"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PDF = "JVBERi0xLjQKJcfsj6IKJSVFT0YK"
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK_TOOL: Any = {"type": "function", "function": {"name": "get_time"}}
# Two calls whose argument texts are cut mid-token, as a model streams them.
TWO_CALLS = [
    FakeToolCall("get_weather", ['{"ci', 'ty": "Pa', 'ris"}'], id="toolu_a"),
    FakeToolCall("get_time", ["{", '"tz": "Europe/Par', 'is"}'], id="toolu_b"),
]


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key="unused", max_retries=0) as c:
        yield c


def sent(upstream: FakeUpstream, name: str) -> dict[str, Any]:
    """The body of the one request the upstream got for a scripted model."""
    (req,) = upstream.by_model(name)
    assert req.api == "anthropic" and req.path == "/v1/messages"
    body: dict[str, Any] = req.body
    return body


async def test_streamed_parallel_tool_calls(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=["Checking. "], tool_calls=TWO_CALLS)
    stream = await client.chat.completions.create(
        model=f"ant/{name}",
        messages=HELLO,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        stream=True,
    )
    text = ""
    calls: dict[int, dict[str, Any]] = {}
    finishes = []
    async for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            assert call.function is not None
            if call.index not in calls:
                # The first piece of each call names it.
                assert call.id is not None and call.function.name is not None
                calls[call.index] = {"id": call.id, "name": call.function.name, "args": []}
            else:
                assert call.id is None and call.function.name is None
            calls[call.index]["args"].append(call.function.arguments or "")
        if choice.finish_reason is not None:
            finishes.append(choice.finish_reason)
    assert text == "Checking. "
    assert finishes == ["tool_calls"]
    assert calls == {
        0: {"id": "toolu_a", "name": "get_weather", "args": ["", '{"ci', 'ty": "Pa', 'ris"}']},
        1: {"id": "toolu_b", "name": "get_time", "args": ["", "{", '"tz": "Europe/Par', 'is"}']},
    }

    body = sent(upstream, name)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
            "description": "Weather in a city",
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body


async def test_non_streamed_tool_calls(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tool_calls=TWO_CALLS)
    completion = await client.chat.completions.create(
        model=f"ant/{name}", messages=HELLO, tools=[WEATHER_TOOL, CLOCK_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert [
        (c.id, c.type, c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in choice.message.tool_calls
    ] == [
        ("toolu_a", "function", "get_weather", '{"city": "Paris"}'),
        ("toolu_b", "function", "get_time", '{"tz": "Europe/Paris"}'),
    ]


async def test_a_call_without_input_has_the_arguments_of_an_empty_object(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    name = model(tool_calls=[FakeToolCall("get_time", [], id="toolu_t"), TWO_CALLS[0]])
    stream = await client.chat.completions.create(
        model=f"ant/{name}", messages=HELLO, tools=[WEATHER_TOOL, CLOCK_TOOL], stream=True
    )
    arguments: dict[int, str] = {}
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.function is not None
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert arguments == {0: "{}", 1: '{"city": "Paris"}'}
    completion = await client.chat.completions.create(
        model=f"ant/{name}", messages=HELLO, tools=[WEATHER_TOOL, CLOCK_TOOL]
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.arguments for c in calls] == ["{}", '{"city": "Paris"}']  # type: ignore[union-attr]


async def test_tool_result_continuation(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=["It is sunny."])
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "sunny, 21 C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": [{"type": "text", "text": "14:00"}]},
        {"role": "user", "content": "Thanks!"},
    ]
    completion = await client.chat.completions.create(
        model=f"ant/{name}",
        messages=messages,
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    assert completion.choices[0].message.content == "It is sunny."
    assert completion.choices[0].finish_reason == "stop"

    body = sent(upstream, name)
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather and time in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny, 21 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": [{"type": "text", "text": "14:00"}],
                },
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    assert [t["name"] for t in body["tools"]] == ["get_weather", "get_time"]
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
async def test_tool_choice_mapping(
    client: openai.AsyncOpenAI,
    model: Model,
    upstream: FakeUpstream,
    choice: str | None,
    parallel: bool | None,
    expected: dict[str, Any] | None,
) -> None:
    name = model(tokens=1)
    extra: Any = {}
    if choice is not None:
        extra["tool_choice"] = choice
    if parallel is not None:
        extra["parallel_tool_calls"] = parallel
    await client.chat.completions.create(
        model=f"ant/{name}", messages=HELLO, tools=[WEATHER_TOOL], **extra
    )
    assert sent(upstream, name).get("tool_choice") == expected


class Weather(pydantic.BaseModel):
    city: str
    temp_c: int


async def test_parse_with_pydantic_schema(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=['{"city": "Pa', 'ris", "temp_c": 21}'])
    completion = await client.chat.completions.parse(
        model=f"ant/{name}", messages=HELLO, response_format=Weather
    )
    assert completion.choices[0].message.parsed == Weather(city="Paris", temp_c=21)

    body = sent(upstream, name)
    assert body["output_config"] == {
        "format": {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "title": "Weather",
                "properties": {
                    "city": {"type": "string", "title": "City"},
                    "temp_c": {"type": "integer", "title": "Temp C"},
                },
                "required": ["city", "temp_c"],
                "additionalProperties": False,
            },
        }
    }


async def test_a_format_description_reaches_anthropic_in_the_schema(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=['{"city": "Paris"}'])
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    spec = {"name": "place", "description": "The city the user asks about.", "schema": schema}
    await client.chat.completions.create(
        model=f"ant/{name}",
        messages=HELLO,
        response_format={"type": "json_schema", "json_schema": spec},  # type: ignore[typeddict-item]
    )
    sent_schema = sent(upstream, name)["output_config"]["format"]["schema"]
    assert sent_schema == {**schema, "description": "The city the user asks about."}


async def test_images_and_pdf_become_blocks(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model()
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://127.0.0.1/cat.jpg", "detail": "auto"},
                },
                {
                    "type": "file",
                    "file": {
                        "file_data": f"data:application/pdf;base64,{PDF}",
                        "filename": "spec.pdf",
                    },
                },
            ],
        }
    ]
    completion = await client.chat.completions.create(model=f"ant/{name}", messages=messages)
    assert completion.choices[0].message.content == "saw 2 image(s) "

    (turn,) = sent(upstream, name)["messages"]
    assert turn == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare these."},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": PNG},
            },
            {"type": "image", "source": {"type": "url", "url": "https://127.0.0.1/cat.jpg"}},
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                "title": "spec.pdf",
            },
        ],
    }


@pytest.mark.parametrize(
    ("effort", "max_tokens", "thinking", "sent_max"),
    [
        ("high", None, {"type": "enabled", "budget_tokens": 16384}, 4096 + 16384),
        ("minimal", 3000, {"type": "enabled", "budget_tokens": 1024}, 3000),
        ("none", None, {"type": "disabled"}, 4096),
    ],
)
async def test_reasoning_effort_sets_a_thinking_budget(
    client: openai.AsyncOpenAI,
    model: Model,
    upstream: FakeUpstream,
    effort: Any,
    max_tokens: int | None,
    thinking: dict[str, Any],
    sent_max: int,
) -> None:
    name = model(reasoning=["Let me think. "], tokens=2)
    extra: Any = {} if max_tokens is None else {"max_completion_tokens": max_tokens}
    stream = await client.chat.completions.create(
        model=f"ant/{name}", messages=HELLO, reasoning_effort=effort, stream=True, **extra
    )
    reasoning = ""
    async for chunk in stream:
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
    assert reasoning == "Let me think. "

    body = sent(upstream, name)
    assert body["thinking"] == thinking
    assert body["max_tokens"] == sent_max


REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"temperature": 0.5}, "temperature"),
    ({"top_p": 0.9}, "top_p"),
    ({"extra_body": {"top_k": 40}}, "top_k"),
    ({"seed": 7}, "seed"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"store": True}, "store"),
    ({"verbosity": "low"}, "verbosity"),
    ({"prompt_cache_key": "k"}, "prompt_cache_key"),
    ({"safety_identifier": "u1"}, "safety_identifier"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"metadata": {"team": "a"}}, "metadata"),
    ({"reasoning_effort": "low", "max_completion_tokens": 2048}, "reasoning_effort"),
    (
        {"reasoning_effort": "low", "tools": [WEATHER_TOOL], "tool_choice": "required"},
        "tool_choice",
    ),
]


@pytest.mark.parametrize(("extra", "param"), REFUSED, ids=[p for _, p in REFUSED])
async def test_refused_options_name_the_field(
    client: openai.AsyncOpenAI,
    model: Model,
    upstream: FakeUpstream,
    extra: dict[str, Any],
    param: str,
) -> None:
    name = model()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=f"ant/{name}", messages=HELLO, **extra)
    assert refused.value.param == param
    assert upstream.by_model(name) == []


def _user(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]


BAD_MESSAGES: list[tuple[Any, str]] = [
    (
        _user({"type": "input_audio", "input_audio": {"data": PDF, "format": "wav"}}),
        "messages[0].content[1]",
    ),
    (_user({"type": "file", "file": {"file_id": "file-123"}}), "messages[0].content[1]"),
    (
        _user({"type": "file", "file": {"file_data": f"data:text/plain;base64,{PDF}"}}),
        "messages[0].content[1]",
    ),
    (
        _user({"type": "image_url", "image_url": {"url": "https://e.com/a.png", "detail": "low"}}),
        "messages[0].content[1].image_url.detail",
    ),
    ([{"role": "user", "content": "hi", "name": "ann"}], "messages[0].name"),
    (
        _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}),
        "messages[0].content[1].image_url.url",
    ),
    (
        _user({"type": "file", "file": {"file_data": "data:application/pdf;base64,@@@@"}}),
        "messages[0].content[1].file.file_data",
    ),
    ([{"role": "system", "content": "Be brief.", "name": "ops"}, *HELLO], "messages[0].name"),
    # Anthropic refuses empty turns and a conversation of system messages only.
    ([{"role": "user", "content": ""}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": ""}]}], "messages[0].content"),
    ([{"role": "system", "content": "Be brief."}], "messages"),
    (
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Par'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "?"},
        ],
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "f", "arguments": "[" * 50_000 + "]" * 50_000},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "?"},
        ],
        "messages[1].tool_calls[0].function.arguments",
    ),
]


@pytest.mark.parametrize(("messages", "param"), BAD_MESSAGES, ids=[p for _, p in BAD_MESSAGES])
async def test_unmappable_messages_name_the_part(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, messages: Any, param: str
) -> None:
    name = model()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model=f"ant/{name}", messages=messages)
    assert refused.value.param == param
    assert upstream.by_model(name) == []


async def test_stop_user_and_service_tier_are_mapped(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=1)
    await client.chat.completions.create(
        model=f"ant/{name}",
        messages=HELLO,
        stop=["END"],
        metadata={"user_id": "u-42"},
        user="u-42",
        service_tier="default",
        modalities=["text"],
    )
    body = sent(upstream, name)
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u-42"}
    assert body["service_tier"] == "standard_only"


def test_operator_can_turn_media_off(
    make_gateway: GatewayFactory, upstream: FakeUpstream, model: Model
) -> None:
    name = model()
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    with (
        make_gateway(inputs=["file"]) as url,
        openai.OpenAI(base_url=url + "/api", api_key="unused", max_retries=0) as sync_client,
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            sync_client.chat.completions.create(model=f"ant/{name}", messages=_user(image))
    assert refused.value.param == "messages[0].content[1]"
    assert upstream.by_model(name) == []
