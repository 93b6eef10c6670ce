"""Tool calling, structured output and images through the real `openai` SDK and a WebSocket.

The demo provider answers tool requests with no key, so these run the whole path (decode,
checks, stream service, each transport's encoding); the OpenAI-kind adapter is checked by
what the fake upstream received.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from websockets.asyncio.client import connect

from server.settings import CacheSettings
from tests.conftest import GatewayFactory
from tests.fakeupstream import FakeToolCall, FakeUpstream
from tests.integration.test_cache import comparable, sse_events, start_gateway
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
# A 1x1 transparent PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()
IMAGE_PART = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key="unused", max_retries=0) as c:
        yield c


def tool_turn(call_id: str = "call_1", result: str = '{"temp": 21}') -> list[dict[str, Any]]:
    """A conversation in which the assistant called get_weather and the tool answered."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    return [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]


async def test_non_streamed_tool_call(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="demo/tools",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert arguments == {"city": "demo", "unit": "celsius", "days": 2}


async def test_streamed_tool_call_arrives_in_fragments(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="demo/tools",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[TIME, WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert len(calls) >= 3  # the head, then the arguments in several pieces
    head, *rest = calls
    assert (head.index, head.type, head.function.name) == (0, "function", "get_weather")  # type: ignore[union-attr]
    assert head.id and head.function.arguments == ""  # type: ignore[union-attr]
    assert all(d.id is None and d.function.name is None for d in rest)  # type: ignore[union-attr]
    joined = "".join(d.function.arguments or "" for d in rest)  # type: ignore[union-attr]
    assert json.loads(joined)["city"] == "demo"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_stream_helper_assembles_the_call(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.stream(
        model="demo/tools",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["unit"] == "celsius"  # type: ignore[union-attr]


async def test_tool_result_continues_the_conversation(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="demo/tools",
        messages=tool_turn(result='{"temp": 21, "sky": "clear"}'),  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert "**get_weather** answered" in (choice.message.content or "")
    assert '{"temp": 21, "sky": "clear"}' in (choice.message.content or "")


async def test_tool_choice_none_answers_text(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="demo/tools",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None


class Forecast(pydantic.BaseModel):
    city: str
    days: int
    sunny: bool
    hours: list[float]


async def test_parse_structured_output(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model="demo/echo",
        messages=HELLO,  # type: ignore[arg-type]
        response_format=Forecast,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert parsed.days == 1 and parsed.sunny is True


async def test_json_object_answer(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="demo/echo",
        messages=HELLO,  # type: ignore[arg-type]
        response_format={"type": "json_object"},
    )
    assert json.loads(completion.choices[0].message.content or "") == {
        "answer": "What is the weather in Paris?"
    }


FANNED = {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/n"} for i in range(8)}}


@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#/$defs/n", "$defs": {"n": FANNED}},  # 8 ** 8 values if followed in full
        {"allOf": [{"$ref": 5}]},
        {"allOf": [{"$ref": "#/x"}], "x": [1]},
    ],
)
async def test_demo_answers_hostile_schemas_without_failing(
    client: openai.AsyncOpenAI, schema: dict[str, Any]
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    tool["function"]["parameters"] = {"type": "object", "properties": {"x": schema}}
    called = await client.chat.completions.create(
        model="demo/tools",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[tool],  # type: ignore[list-item]
    )
    calls = called.choices[0].message.tool_calls or []
    assert len(calls[0].function.arguments) < 50_000  # type: ignore[union-attr]
    answered = await client.chat.completions.create(
        model="demo/echo",
        messages=HELLO,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert len(answered.choices[0].message.content or "") < 50_000


NULLS = {
    field: None
    for field in (
        "temperature top_p n stop max_tokens max_completion_tokens presence_penalty "
        "frequency_penalty logit_bias user tools tool_choice parallel_tool_calls seed "
        "response_format service_tier metadata store prediction reasoning_effort verbosity "
        "modalities web_search_options audio functions function_call logprobs top_logprobs "
        "safety_identifier prompt_cache_key prompt_cache_retention"
    ).split()
}


async def test_null_in_every_optional_field_is_as_good_as_leaving_it_out(gateway: str) -> None:
    body = {
        "model": "demo/echo",
        "messages": [{"role": "user", "content": "hi", "name": None, "tool_call_id": None}],
        "stream": True,
        "stream_options": {"include_usage": None, "include_obfuscation": None},
        **NULLS,
        "logprobs": False,  # as pydantic-ai sends it
    }
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(gateway + "/api/chat/completions", json=body)
    assert response.status_code == 200, response.text
    events = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in events[-2]  # include_usage null is false


async def test_image_message(client: openai.AsyncOpenAI) -> None:
    content = [{"type": "text", "text": "What is in this picture?"}, IMAGE_PART]
    completion = await client.chat.completions.create(
        model="demo/echo",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    assert "| images attached | 1 |" in (completion.choices[0].message.content or "")


async def test_every_option_reaches_an_openai_kind_upstream(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=2)
    options: dict[str, Any] = {
        "tools": [WEATHER],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "f", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "low",
        "logit_bias": {"50256": -100},
        "service_tier": "flex",
        "metadata": {"team": "a"},
        "store": True,
        "prediction": {"type": "content", "content": "Paris"},
        "verbosity": "low",
        "modalities": ["text"],
        "user": "u-1",
        "seed": 7,
        "safety_identifier": "s-1",
        "prompt_cache_key": "k-1",
        "web_search_options": {"search_context_size": "low"},
    }
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, IMAGE_PART], "name": "ada"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]
    await client.chat.completions.create(
        model=f"oai/{name}",
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=50,
        stop=["END"],
        extra_body={"top_k": 40},  # not in the SDK's signature; compatible servers take it
        **options,
    )
    [recorded] = upstream.by_model(name)
    sent = recorded.body
    for field, value in options.items():
        assert sent[field] == value, field
    # A compatible server gets `developer` as `system`; everything else as the client sent it.
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, *messages[1:]]
    assert sent["max_tokens"] == 50  # a compatible server gets the older name
    assert sent["stop"] == ["END"]
    assert sent["top_k"] == 40


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (
            [*HELLO, {"role": "tool", "tool_call_id": "nope", "content": "x"}],
            {},
            "messages[1].tool_call_id",
        ),
        (tool_turn()[:2] + [{"role": "tool", "content": "x"}], {}, "messages[2].tool_call_id"),
        # Each call is answered right after the assistant turn that made it, and only once.
        (tool_turn()[:2], {}, "messages[1].tool_calls[0]"),
        (tool_turn()[:2] + HELLO, {}, "messages[1].tool_calls[0]"),
        (tool_turn()[:2] + HELLO + tool_turn()[2:], {}, "messages[1].tool_calls[0]"),
        (tool_turn() + tool_turn()[2:], {}, "messages[3].tool_call_id"),
        (tool_turn() + HELLO + tool_turn()[2:], {}, "messages[4].tool_call_id"),
        ([{"role": "assistant", "content": None}], {}, "messages[0].content"),
        ([{"role": "user", "content": None}], {}, "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
                    ],
                }
            ],
            {},
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "system", "content": [IMAGE_PART]}],
            {},
            "messages[0].content[0]",
        ),
        (HELLO, {"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        (
            HELLO,
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ]
            },
            "tools[0].function.parameters",
        ),
        (HELLO, {"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (HELLO, {"tool_choice": "auto"}, "tool_choice"),
        (
            HELLO,
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        (HELLO, {"functions": [{"name": "f"}]}, "functions"),
        (HELLO, {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        # Empty lists OpenAI refuses: leave the field out instead.
        (HELLO, {"tools": []}, "tools"),
        (
            [*HELLO, {"role": "assistant", "content": "x", "tool_calls": []}],
            {},
            "messages[1].tool_calls",
        ),
        # OpenAI's bounds, kept before the request reaches an upstream that would refuse it.
        (HELLO, {"logit_bias": {"hello": 5}}, "logit_bias"),
        (HELLO, {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        (HELLO, {"metadata": {"k" * 65: "v"}}, "metadata"),
        (HELLO, {"max_tokens": 5, "max_completion_tokens": 9}, "max_tokens"),
        (HELLO, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
async def test_bad_tool_and_image_input_is_a_400_naming_the_field(
    gateway: str,
    model: Model,
    upstream: FakeUpstream,
    messages: list[dict[str, Any]],
    extra: dict[str, Any],
    param: str,
) -> None:
    name = model(tokens=1)
    body = {"model": f"oai/{name}", "messages": messages, **extra}
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(gateway + "/api/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert upstream.by_model(name) == []


async def test_media_a_provider_does_not_take_is_refused_by_name(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=1)
    audio = {"type": "input_audio", "input_audio": {"data": PNG, "format": "wav"}}
    cases = [
        ("demo/echo", [{"type": "text", "text": "hi"}, audio], "messages[0].content[1]"),
        (f"oai/{name}", [IMAGE_PART], "messages[0].content[0]"),  # `inputs = []` below
    ]
    with make_gateway(inputs=[]) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            for model_id, content, param in cases:
                body = {"model": model_id, "messages": [{"role": "user", "content": content}]}
                response = await http.post(url + "/api/chat/completions", json=body)
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert (error["code"], error["param"]) == ("unsupported", param)
    assert upstream.by_model(name) == []


async def test_websocket_tool_call_frames(gateway: str) -> None:
    async with connect(
        gateway.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
    ) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        sid = await client.start("demo/tools", tools=[WEATHER])
        done = await client.until_terminal(sid)
    deltas = [f for f in client.by_id[sid] if f["type"] == "chat.delta"]
    assert all(set(f) == {"type", "id", "seq", "tool_calls"} for f in deltas)
    [head] = deltas[0]["tool_calls"]
    assert head["index"] == 0 and head["type"] == "function" and head["id"]
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(f["tool_calls"][0]["function"]["arguments"] for f in deltas[1:])
    assert json.loads(arguments)["days"] == 2
    assert [f["seq"] for f in client.by_id[sid]] == list(range(len(client.by_id[sid])))
    assert done["type"] == "chat.done" and done["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"hello": 5}}, "logit_bias"),
        ({"messages": tool_turn()[:2]}, "messages[1].tool_calls[0]"),
        ({"tools": []}, "tools"),
    ],
)
async def test_websocket_start_names_the_bad_field(
    gateway: str, extra: dict[str, Any], param: str
) -> None:
    async with connect(
        gateway.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
    ) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        sid = await client.start("demo/tools", **extra)
        frame = await client.until_terminal(sid)
    assert frame["type"] == "chat.error"
    assert (frame["error"]["status"], frame["error"]["param"]) == (400, param)


async def test_cache_replays_a_tool_call_stream_chunk_exact(upstream: FakeUpstream) -> None:
    body = {"model": "demo/tools", "messages": HELLO, "tools": [WEATHER]}
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            live, live_headers = await sse_events(http, url, body)
            replay, replay_headers = await sse_events(http, url, body)
            _, other_headers = await sse_events(http, url, {**body, "tools": [TIME]})
    assert "x-tokenrelay-cache" not in live_headers
    assert replay_headers["x-tokenrelay-cache"] == "hit"
    assert comparable(replay) == comparable(live)
    assert sum("tool_calls" in e["choices"][0]["delta"] for e in live[:-1]) >= 3
    assert "x-tokenrelay-cache" not in other_headers  # tools are part of the key


@pytest.mark.parametrize(
    "variant",
    [
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": "required"},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE_PART]}]},
    ],
)
async def test_cache_keys_on_tools_formats_and_images(
    upstream: FakeUpstream, model: Model, variant: dict[str, Any]
) -> None:
    name = model(tokens=2)
    base = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            for body in (base, {**base, **variant}, {**base, **variant}):
                assert (
                    await http.post(url + "/api/chat/completions", json=body)
                ).status_code == 200
    assert len(upstream.by_model(name)) == 2  # the variant missed once, then hit


PARALLEL = [
    FakeToolCall(name="get_weather", arguments=['{"ci', 'ty": "Pa', 'ris"}'], id="call_a"),
    FakeToolCall(name="get_time", arguments=['{"tz": "Europe/', 'Paris"}'], id="call_b"),
]


async def test_openai_kind_streamed_parallel_tool_calls_are_relayed_piece_by_piece(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    name = model(text=["Let me check. "], tool_calls=PARALLEL)
    stream = await client.chat.completions.create(
        model=f"oai/{name}",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    pieces = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    # One chunk per upstream piece: a head per call, then each fragment as it came.
    assert [(d.index, d.id, d.function.arguments) for d in pieces] == [  # type: ignore[union-attr]
        (0, "call_a", ""),
        (0, None, '{"ci'),
        (0, None, 'ty": "Pa'),
        (0, None, 'ris"}'),
        (1, "call_b", ""),
        (1, None, '{"tz": "Europe/'),
        (1, None, 'Paris"}'),
    ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me check. "
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_openai_kind_non_streamed_tool_calls(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    name = model(text=[], tool_calls=PARALLEL)
    completion = await client.chat.completions.create(
        model=f"oai/{name}",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER, TIME],  # type: ignore[list-item]
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    calls = [
        (c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []
    ]  # type: ignore[union-attr]
    assert calls == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_time", {"tz": "Europe/Paris"}),
    ]


async def test_openai_kind_parse_against_a_json_answer(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=['{"city": "Paris", ', '"days": 3, "sunny": false, ', '"hours": [1.5]}'])
    completion = await client.chat.completions.parse(
        model=f"oai/{name}",
        messages=HELLO,  # type: ignore[arg-type]
        response_format=Forecast,
    )
    assert completion.choices[0].message.parsed == Forecast(
        city="Paris", days=3, sunny=False, hours=[1.5]
    )
    [recorded] = upstream.by_model(name)
    sent = recorded.body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Forecast"
    assert sent["json_schema"]["strict"] is True
    assert set(sent["json_schema"]["schema"]["properties"]) == {"city", "days", "sunny", "hours"}


async def test_openai_kind_image_reaches_the_upstream(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    name = model()
    url_part = {
        "type": "image_url",
        "image_url": {"url": "https://127.0.0.1/cat.png", "detail": "low"},
    }
    content = [{"type": "text", "text": "Compare"}, IMAGE_PART, url_part]
    completion = await client.chat.completions.create(
        model=f"oai/{name}",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    assert "saw 2 image(s)" in (completion.choices[0].message.content or "")
    [recorded] = upstream.by_model(name)
    assert recorded.body["messages"][0]["content"] == content
