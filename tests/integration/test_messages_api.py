"""The Anthropic Messages API at the edge, driven by the real `anthropic` SDK.

Behind the gateway are an OpenAI-kind (`oai`) and an Anthropic-kind (`ant`) provider on the
fake upstream, whose record of each request shows what the translation sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from server.auth import digest, new_key
from server.settings import AuthSettings, CacheSettings, LimitSettings
from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeToolCall, FakeUpstream
from tests.support.gateways import gateway_with

Model = Callable[..., str]
HELLO: Any = [{"role": "user", "content": "hello"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
KINDS = ["oai", "ant"]


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=gateway + "/api", api_key="unused", max_retries=0
    ) as c:
        yield c


@pytest.fixture
def sync_client(gateway: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway + "/api", api_key="unused", max_retries=0) as c:
        yield c


def sent(upstream: FakeUpstream, name: str) -> dict[str, Any]:
    """The body of the one request the upstream got for a scripted model."""
    (req,) = upstream.by_model(name)
    body: dict[str, Any] = req.body
    return body


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of a raw SSE body; comments are left out."""
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n") if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.parametrize("kind", KINDS)
async def test_create_and_its_upstream_request(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    name = model(text=["Hello", " there"], prompt_tokens=7)
    message = await client.messages.create(
        model=f"{kind}/{name}",
        max_tokens=64,
        system="Be brief.",
        messages=HELLO,
        stop_sequences=["END"],
        metadata={"user_id": "user-1"},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == f"{kind}/{name}"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [
        ("text", "Hello there")
    ]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 2

    body = sent(upstream, name)
    if kind == "oai":
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ]
        assert body["stop"] == ["END"] and body["user"] == "user-1"
        assert body.get("max_completion_tokens", body.get("max_tokens")) == 64
    else:
        assert body["system"] == "Be brief."
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]}
        ]
        assert body["stop_sequences"] == ["END"]
        assert body["metadata"] == {"user_id": "user-1"} and body["max_tokens"] == 64


def test_sync_create(sync_client: anthropic.Anthropic, model: Model) -> None:
    name = model(text=["sync ", "works"])
    message = sync_client.messages.create(model=f"oai/{name}", max_tokens=16, messages=HELLO)
    assert message.content[0].type == "text" and message.content[0].text == "sync works"


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_text_and_final_message(
    client: anthropic.AsyncAnthropic, model: Model, kind: str
) -> None:
    name = model(text=["a", "b", "c"], prompt_tokens=5)
    async with client.messages.stream(
        model=f"{kind}/{name}", max_tokens=32, messages=HELLO
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["a", "b", "c"]
    assert final.content[0].type == "text" and final.content[0].text == "abc"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 5 and final.usage.output_tokens == 3


def test_sync_stream_events(sync_client: anthropic.Anthropic, model: Model) -> None:
    name = model(text=["x", "y"], reasoning=["think"])
    with sync_client.messages.stream(model=f"oai/{name}", max_tokens=32, messages=HELLO) as s:
        kinds = [event.type for event in s]
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "thinking" in kinds and "text" in kinds
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].type == "thinking" and final.content[0].thinking == "think"


async def test_raw_event_order(gateway: str, model: Model) -> None:
    name = model(
        text=["Hi"],
        reasoning=["hm"],
        tool_calls=[FakeToolCall("get_weather", ['{"ci', 'ty": "Paris"}'], id="call_1")],
    )
    body = {
        "model": f"oai/{name}",
        "max_tokens": 64,
        "messages": HELLO,
        "tools": [WEATHER],
        "stream": True,
    }
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/v1/messages", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [(name, data["type"]) for name, data in events] == [(n, n) for n, _ in events]
    assert [n for n, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 0, "output_tokens": 0}
    blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert blocks == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
    ]
    deltas = [(d["index"], d["delta"]) for n, d in events if n == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "hm"}),
        (1, {"type": "text_delta", "text": "Hi"}),
        (2, {"type": "input_json_delta", "partial_json": '{"ci'}),
        (2, {"type": "input_json_delta", "partial_json": 'ty": "Paris"}'}),
    ]
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_use_round_trip(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    call = FakeToolCall("get_weather", ['{"city": ', '"Paris"}'], id="toolu_1")
    first = model(text=["Let me check. "], tool_calls=[call])
    async with client.messages.stream(
        model=f"{kind}/{first}",
        max_tokens=64,
        messages=HELLO,
        tools=[WEATHER],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    ) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    tool_use = message.content[-1]
    assert tool_use.type == "tool_use"
    assert (tool_use.id, tool_use.name, tool_use.input) == (
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )
    body = sent(upstream, first)
    if kind == "oai":
        assert body["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": WEATHER["input_schema"],
                },
            }
        ]
        assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    else:
        assert body["tools"] == [WEATHER]
        assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}

    second = model(text=["Sunny."])
    answer = await client.messages.create(
        model=f"{kind}/{second}",
        max_tokens=64,
        messages=[
            *HELLO,
            {"role": "assistant", "content": message.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        tools=[WEATHER],
    )
    assert answer.content[0].type == "text" and answer.content[0].text == "Sunny."
    body = sent(upstream, second)
    if kind == "oai":
        assert body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Let me check. "}],
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "18C, sunny", "tool_call_id": "toolu_1"},
            {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
        ]
    else:
        assert body["messages"][1:] == [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check. "},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ]


async def test_tool_error_result_is_prefixed(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=["ok"])
    await client.messages.create(
        model=f"oai/{name}",
        max_tokens=16,
        messages=[
            *HELLO,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    }
                ],
            },
        ],
        tools=[WEATHER],
    )
    assert sent(upstream, name)["messages"][-1] == {
        "role": "tool",
        "content": "Error: no such city",
        "tool_call_id": "t1",
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_image(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    name = model()
    message = await client.messages.create(
        model=f"{kind}/{name}",
        max_tokens=16,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    assert message.content[0].type == "text" and message.content[0].text.startswith("saw 1 image")
    part = sent(upstream, name)["messages"][0]["content"][0]
    if kind == "oai":
        assert part == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    else:
        assert part == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
        }


async def test_thinking_maps_to_reasoning_effort(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=["ok"])
    await client.messages.create(
        model=f"oai/{name}",
        max_tokens=20000,
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 10000},
    )
    assert sent(upstream, name)["reasoning_effort"] == "medium"
    name = model(text=["ok"])
    await client.messages.create(
        model=f"ant/{name}",
        max_tokens=20000,
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 10000},
    )
    # The Anthropic adapter's budget for that effort: no more than the client asked for.
    assert sent(upstream, name)["thinking"] == {"type": "enabled", "budget_tokens": 8192}


async def test_count_tokens_estimated_for_an_openai_kind_model(
    client: anthropic.AsyncAnthropic, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    count = await client.messages.count_tokens(
        model="oai/gpt-4o-mini",
        system="You are terse.",
        messages=[{"role": "user", "content": "how many words is this"}],
    )
    assert count.input_tokens == 8
    assert len(upstream.requests) == before  # an estimate: nothing was asked upstream
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.count_tokens(model="nope/x", messages=HELLO)


async def test_count_tokens_asks_an_anthropic_upstream(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream
) -> None:
    name = model(prompt_tokens=42)
    count = await client.messages.count_tokens(
        model=f"ant/{name}", system="Be brief.", messages=HELLO, tools=[WEATHER]
    )
    assert count.input_tokens == 42
    (req,) = upstream.by_model(name)
    assert req.path == "/v1/messages/count_tokens"
    assert req.body == {
        "model": name,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "system": "Be brief.",
        "tools": [WEATHER],
    }
    failing = model(status=429)
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.count_tokens(model=f"ant/{failing}", messages=HELLO)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature_typo": 1}, "temperature_typo"),
        ({"container": "c"}, "container"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ],
)
async def test_unknown_fields_are_refused(
    client: anthropic.AsyncAnthropic, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model="demo/echo", max_tokens=8, messages=HELLO, extra_body=extra
        )
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert param in body["error"]["message"]


async def test_missing_max_tokens_and_bad_turns(gateway: str) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            gateway + "/api/v1/messages", json={"model": "demo/echo", "messages": HELLO}
        )
        assert response.status_code == 400
        assert "max_tokens" in response.json()["error"]["message"]
        orphan = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]
        response = await http.post(
            gateway + "/api/v1/messages",
            json={"model": "demo/echo", "max_tokens": 5, "messages": orphan},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0]" in response.json()["error"]["message"]


async def test_sampling_on_an_anthropic_model_is_refused_by_name(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream
) -> None:
    name = model()
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model=f"ant/{name}", max_tokens=8, messages=HELLO, extra_body={"temperature": 0.5}
        )
    assert "'temperature'" in caught.value.message
    assert upstream.by_model(name) == []
    name = model(text=["ok"])
    await client.messages.create(
        model=f"oai/{name}",
        max_tokens=8,
        messages=HELLO,
        extra_body={"temperature": 0.5, "top_p": 0.9},
    )
    body = sent(upstream, name)
    assert (body["temperature"], body["top_p"]) == (0.5, 0.9)


async def test_unknown_model_is_not_found(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        await client.messages.create(model="nope/nothing", max_tokens=8, messages=HELLO)
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_rate_limit(
    client: anthropic.AsyncAnthropic, model: Model, stream: bool
) -> None:
    name = model(status=429, retry_after=3)
    with pytest.raises(anthropic.RateLimitError) as caught:
        if stream:
            async with client.messages.stream(
                model=f"oai/{name}", max_tokens=8, messages=HELLO
            ) as s:
                await s.get_final_message()
        else:
            await client.messages.create(model=f"oai/{name}", max_tokens=8, messages=HELLO)
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert caught.value.response.headers["retry-after"] == "3"


async def test_error_after_start_is_an_error_event(
    client: anthropic.AsyncAnthropic, gateway: str, model: Model
) -> None:
    name = model(tokens=4, error_after=2)
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model=f"oai/{name}", max_tokens=8, messages=HELLO) as s:
            async for _ in s.text_stream:
                pass
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    name = model(tokens=4, error_after=2)
    body = {"model": f"oai/{name}", "max_tokens": 8, "messages": HELLO, "stream": True}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/v1/messages", json=body)
    names = [n for n, _ in sse_events(response.text)]
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names and "message_delta" not in names


async def test_ping_while_the_first_token_is_awaited(make_gateway: Any, model: Model) -> None:
    from server.settings import ServerSettings

    name = model(tokens=1, first_token_delay=0.5)
    with make_gateway(server=ServerSettings(sse_heartbeat=0.1)) as url:
        body = {"model": f"oai/{name}", "max_tokens": 8, "messages": HELLO, "stream": True}
        async with httpx2.AsyncClient() as http:
            response = await http.post(url + "/api/v1/messages", json=body)
    names = [n for n, _ in sse_events(response.text)]
    assert names[0] == "message_start" and names[1] == "ping"
    assert names[-1] == "message_stop" and names.count("message_start") == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_upstream(
    gateway: str, model: Model, upstream: FakeUpstream, stream: bool, kind: str
) -> None:
    name = model(tokens=50, pace=0.05)
    body = {"model": f"{kind}/{name}", "max_tokens": 100, "messages": HELLO, "stream": stream}
    async with httpx2.AsyncClient() as http:
        if stream:
            async with http.stream("POST", gateway + "/api/v1/messages", json=body) as response:
                async for chunk in response.aiter_bytes():
                    if b"text_delta" in chunk:
                        break  # first token seen: hang up
        else:
            with pytest.raises(httpx2.ReadTimeout):
                await http.post(gateway + "/api/v1/messages", json=body, timeout=0.3)
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert recorded.deltas_sent < 50


async def test_unknown_paths_are_404_not_405(gateway: str) -> None:
    async with httpx2.AsyncClient() as http:
        for path in ("/v1/messages", "/api/v1/nothing", "/api/nothing"):
            response = await http.post(gateway + path, json={})
            assert response.status_code == 404, path
        response = await http.post(gateway + "/v1/messages", json={})
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "/api/v1/messages" in body["error"]["message"]


async def test_base_url_without_api_is_not_found(gateway: str) -> None:
    async with anthropic.AsyncAnthropic(base_url=gateway, api_key="k", max_retries=0) as c:
        with pytest.raises(anthropic.NotFoundError):
            await c.messages.create(model="demo/echo", max_tokens=8, messages=HELLO)


KEY = new_key()


@pytest.fixture(scope="module")
def keyed(upstream: FakeUpstream) -> Iterator[str]:
    limits = LimitSettings(requests_per_minute=5)
    with gateway_with(upstream, auth=AuthSettings(keys=[digest(KEY)]), limits=limits) as url:
        yield url


async def test_gateway_keys_as_anthropic_clients_send_them(
    keyed: str, model: Model, upstream: FakeUpstream
) -> None:
    base = keyed + "/api"
    name = model(text=["ok"])
    async with anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=0) as c:
        message = await c.messages.create(model="demo/echo", max_tokens=8, messages=HELLO)
        assert message.content
    async with anthropic.AsyncAnthropic(base_url=base, auth_token=KEY, max_retries=0) as c:
        await c.messages.create(model="demo/echo", max_tokens=8, messages=HELLO)
    async with anthropic.AsyncAnthropic(base_url=base, api_key="wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await c.messages.create(model="demo/echo", max_tokens=8, messages=HELLO)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # This SDK sends its api_key as a bearer token; other Anthropic clients send x-api-key,
    # with version and beta headers that are taken and not forwarded.
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "x-1"}
    async with httpx2.AsyncClient(headers=headers) as http:
        response = await http.post(
            base + "/v1/messages",
            json={"model": f"ant/{name}", "max_tokens": 8, "messages": HELLO},
        )
        assert response.status_code == 200 and response.json()["type"] == "message"
        # The same key works on the OpenAI route too: one decision for every route.
        assert (await http.get(keyed + "/api/models")).status_code == 200
    (req,) = upstream.by_model(name)
    assert "anthropic-beta" not in req.headers
    assert req.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    async with anthropic.AsyncAnthropic(base_url=base, api_key=KEY, max_retries=0) as c:
        with pytest.raises(anthropic.RateLimitError) as limited:
            for _ in range(3):
                await c.messages.create(model="demo/echo", max_tokens=8, messages=HELLO)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


async def test_a_fallback_gets_the_same_typed_request(
    make_gateway: Any, model: Model, upstream: FakeUpstream
) -> None:
    broken = model(status=503)
    backup = model(text=["from ", "backup"])
    fallbacks = {f"oai/{broken}": [f"ant/{backup}"]}
    with make_gateway(fallbacks=fallbacks, retries=0) as url:
        async with anthropic.AsyncAnthropic(
            base_url=url + "/api", api_key="unused", max_retries=0
        ) as c:
            async with c.messages.stream(
                model=f"oai/{broken}",
                max_tokens=64,
                system="Be brief.",
                messages=HELLO,
                tools=[WEATHER],
            ) as stream:
                final = await stream.get_final_message()
    assert final.model == f"ant/{backup}"
    assert final.content[0].type == "text" and final.content[0].text == "from backup"
    assert sent(upstream, broken)["tools"][0]["function"]["name"] == "get_weather"
    body = sent(upstream, backup)
    assert body["system"] == "Be brief." and body["tools"] == [WEATHER]


async def test_stop_sequence_when_the_upstream_names_it(
    client: anthropic.AsyncAnthropic, model: Model
) -> None:
    name = model(text=["one ", "two "], finish_reason="stop_sequence")
    message = await client.messages.create(
        model=f"ant/{name}", max_tokens=16, messages=HELLO, stop_sequences=["END", "STOP"]
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    async with client.messages.stream(
        model=f"ant/{name}", max_tokens=16, messages=HELLO, stop_sequences=["END"]
    ) as stream:
        final = await stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")


async def test_a_cached_answer_replays_in_the_same_shape(
    upstream: FakeUpstream, model: Model
) -> None:
    name = model(text=["cached ", "answer"])
    body = {"model": f"oai/{name}", "max_tokens": 16, "messages": HELLO}
    with gateway_with(upstream, cache=CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient() as http:
            first = await http.post(url + "/api/v1/messages", json=body)
            second = await http.post(url + "/api/v1/messages", json=body)
            streamed = await http.post(url + "/api/v1/messages", json={**body, "stream": True})
    assert "x-tokenrelay-cache" not in first.headers
    assert second.headers["x-tokenrelay-cache"] == "hit"
    assert streamed.headers["x-tokenrelay-cache"] == "hit"
    assert second.json()["content"] == first.json()["content"]
    texts = [
        d["delta"].get("text") for n, d in sse_events(streamed.text) if n == "content_block_delta"
    ]
    assert texts == ["cached ", "answer"]
    assert len(upstream.by_model(name)) == 1


async def test_an_image_by_url(
    client: anthropic.AsyncAnthropic, model: Model, upstream: FakeUpstream
) -> None:
    name = model()
    url = "https://127.0.0.1/cat.png"
    await client.messages.create(
        model=f"ant/{name}",
        max_tokens=16,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image", "source": {"type": "url", "url": url}}],
            }
        ],
    )
    block = sent(upstream, name)["messages"][0]["content"][0]
    assert block == {"type": "image", "source": {"type": "url", "url": url}}


async def test_models_in_anthropic_shape(client: anthropic.AsyncAnthropic, gateway: str) -> None:
    async with httpx2.AsyncClient() as http:
        listing = (await http.get(gateway + "/api/models")).json()
    ids = [m["id"] for m in listing["data"]]
    assert len(ids) > 3
    seen = [model.id async for model in client.models.list(limit=2)]  # pages through all
    assert seen == ids
    page = await client.models.list(limit=2, after_id=ids[0])
    assert [m.id for m in page.data] == ids[1:3] and page.has_more == (len(ids) > 3)
    model = await client.models.retrieve(ids[0])
    assert model.id == ids[0] and model.type == "model"
    with pytest.raises(anthropic.NotFoundError):
        await client.models.retrieve("nope/nothing")
    with pytest.raises(anthropic.BadRequestError):
        await client.models.list(limit=0)
