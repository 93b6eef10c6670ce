"""Both adapters through the real SDKs against the fake upstream on loopback."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import msgspec
import pytest

from providers import errors
from providers.anthropic import AnthropicProvider
from providers.base import Provider
from providers.openai import OpenAIProvider
from providers.registry import build_provider
from providers.settings import ProviderSettings
from providers.transport import LeanTransport, send_streamed
from providers.types import ChatRequest, Event, Finish, Message, ReasoningDelta, TextDelta
from server import protocol
from tests.conftest import ENVIRON, UPSTREAM_KEY, provider_settings
from tests.fakeupstream import FakeUpstream, formats

Model = Callable[..., str]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(
    params=[("openai", "lean"), ("anthropic", "lean"), ("openai", "httpx"), ("anthropic", "httpx")],
    ids=lambda p: "-".join(p),
)
async def provider(
    request: pytest.FixtureRequest, upstream: FakeUpstream
) -> AsyncIterator[Provider]:
    kind, transport = request.param
    settings = provider_settings(upstream, transport=transport)[0 if kind == "openai" else 1]
    built = build_provider(settings, ENVIRON)
    yield built
    await built.aclose()


def ask(model: str, text: str = "hello", **fields: object) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message(role="user", content=text)], **fields)  # type: ignore[arg-type]


async def collect(provider: Provider, request: ChatRequest) -> list[Event]:
    return [event async for event in provider.stream(request)]


async def test_stream_relays_text_and_usage(provider: Provider, model: Model) -> None:
    events = await collect(provider, ask(model(tokens=5, prompt_tokens=12)))
    assert events[:-1] == [TextDelta(f"tok{i} ") for i in range(5)]
    finish = events[-1]
    assert isinstance(finish, Finish)
    assert finish.reason == "stop"
    assert finish.usage is not None
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (12, 5)


async def test_reasoning_comes_before_text(provider: Provider, model: Model) -> None:
    events = await collect(provider, ask(model(tokens=2, reasoning=["think ", "more "])))
    assert events[:4] == [
        ReasoningDelta("think "),
        ReasoningDelta("more "),
        TextDelta("tok0 "),
        TextDelta("tok1 "),
    ]


@pytest.mark.parametrize("reason", ["stop", "length", "content_filter"])
async def test_stop_reasons_are_mapped(provider: Provider, model: Model, reason: str) -> None:
    events = await collect(provider, ask(model(tokens=1, finish_reason=reason)))
    assert events[-1] == Finish(reason=reason, usage=events[-1].usage)  # type: ignore[arg-type, union-attr]


async def test_max_tokens_reaches_the_upstream(
    provider: Provider, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=10)
    events = await collect(provider, ask(name, max_tokens=3))
    assert len([e for e in events if isinstance(e, TextDelta)]) == 3
    assert events[-1].reason == "length"  # type: ignore[union-attr]
    (recorded,) = upstream.by_model(name)
    assert recorded.body["max_tokens"] == 3  # a compatible server gets the classic name


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, errors.UpstreamRejectedError),
        (401, errors.UpstreamAuthError),
        (403, errors.UpstreamAuthError),
        (404, errors.UpstreamModelNotFoundError),
        (429, errors.UpstreamRateLimitError),
        (500, errors.UpstreamUnavailableError),
        (503, errors.UpstreamUnavailableError),
    ],
)
async def test_error_statuses_are_translated(
    provider: Provider, model: Model, status: int, expected: type[Exception]
) -> None:
    name = model(status=status, error_message=f"upstream says {UPSTREAM_KEY}", retry_after=7)
    with pytest.raises(expected) as caught:
        await collect(provider, ask(name))
    error = caught.value
    assert isinstance(error, errors.ProviderError)
    assert UPSTREAM_KEY not in error.message
    assert f"HTTP {status}" in error.message
    if status == 429:
        assert error.retry_after == 7


async def test_connection_closed_mid_stream_is_a_protocol_error(
    provider: Provider, model: Model
) -> None:
    seen: list[Event] = []
    with pytest.raises(errors.UpstreamProtocolError):
        async for event in provider.stream(ask(model(tokens=5, close_after=2))):
            seen.append(event)
    assert seen == [TextDelta("tok0 "), TextDelta("tok1 ")]


async def test_in_band_error_raises_after_the_deltas_before_it(
    provider: Provider, model: Model
) -> None:
    seen: list[Event] = []
    with pytest.raises(errors.ProviderError) as caught:
        async for event in provider.stream(ask(model(tokens=5, error_after=2))):
            seen.append(event)
    assert len(seen) == 2
    assert "mid-stream" in caught.value.message


async def test_closing_the_iterator_closes_the_upstream(
    provider: Provider, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=5, hang_after=1)
    stream = provider.stream(ask(name))
    assert await anext(stream) == TextDelta("tok0 ")
    await stream.aclose()
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert not recorded.completed


async def test_list_models(provider: Provider) -> None:
    listed = await provider.list_models()
    expected = (
        formats.DEFAULT_OPENAI_MODELS
        if provider.name == "oai"
        else formats.DEFAULT_ANTHROPIC_MODELS
    )
    assert sorted(listed) == sorted(expected)


async def test_openai_request_mapping(upstream: FakeUpstream, model: Model) -> None:
    provider = build_provider(provider_settings(upstream)[0], ENVIRON)
    name = model(tokens=1)
    request = ChatRequest(
        model=name,
        messages=[
            Message(role="developer", content="be brief"),
            Message(role="user", content="hi", name="ann"),
        ],
        temperature=0.5,
        stop=["END"],
        seed=7,
        user="u1",
    )
    await collect(provider, request)
    await provider.aclose()
    (recorded,) = upstream.by_model(name)
    body = recorded.body
    assert recorded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},  # compatible servers may not know `developer`
        {"role": "user", "content": "hi", "name": "ann"},
    ]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["stop"], body["seed"], body["user"]) == (
        0.5,
        ["END"],
        7,
        "u1",
    )


async def test_anthropic_request_mapping(upstream: FakeUpstream, model: Model) -> None:
    provider = build_provider(provider_settings(upstream)[1], ENVIRON)
    name = model(tokens=1)
    request = ChatRequest(
        model=name,
        messages=[
            Message(role="system", content="be brief"),
            Message(role="user", content="hi"),
            Message(role="assistant", content="hello"),
            Message(role="user", content="again"),
        ],
        stop=["END"],
        user="u1",
    )
    await collect(provider, request)
    await provider.aclose()
    (recorded,) = upstream.by_model(name)
    body = recorded.body
    # SDK 2.x sends the key as a bearer token rather than `x-api-key`.
    assert recorded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert body["system"] == "be brief"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["max_tokens"] == 4096  # Anthropic requires one; the provider's default
    assert body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u1"}


async def test_wrong_key_is_an_auth_error_without_the_key(
    upstream: FakeUpstream, model: Model
) -> None:
    settings = provider_settings(upstream)[0]
    provider = build_provider(settings, {"FAKE_OPENAI_KEY": "sk-wrong-key-abcdef"})
    with pytest.raises(errors.UpstreamAuthError) as caught:
        await collect(provider, ask(model()))
    await provider.aclose()
    assert "sk-wrong" not in caught.value.message


async def test_unreachable_upstream_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ProviderSettings(
        name="gone", kind="openai", base_url=f"http://127.0.0.1:{port}/v1", connect_timeout=2
    )
    provider = build_provider(settings, {})
    with pytest.raises(errors.UpstreamUnavailableError):
        await collect(provider, ask("anything"))
    await provider.aclose()


async def test_connections_are_kept_alive_and_reused(upstream: FakeUpstream, model: Model) -> None:
    provider = build_provider(provider_settings(upstream)[0], ENVIRON)
    names = [model(tokens=2) for _ in range(3)]
    for name in names:
        await collect(provider, ask(name))
    await provider.aclose()
    connections = {upstream.by_model(name)[0].connection for name in names}
    assert len(connections) == 1


async def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    # A fake of this test's own, on this loop: closing its connections must not cross threads.
    async with FakeUpstream(api_key=UPSTREAM_KEY) as upstream:
        provider = build_provider(provider_settings(upstream)[0], ENVIRON)
        await collect(provider, ask("first"))
        for connection in list(upstream._conns):  # the server drops its idle connections
            connection.close_by_server(graceful=True)
        events = await collect(provider, ask("second"))
        await provider.aclose()
        first, second = upstream.by_model("first")[0], upstream.by_model("second")[0]
    assert events[:2] == [TextDelta("tok0 "), TextDelta("tok1 ")]
    assert second.connection != first.connection


async def test_idle_upstream_connections_expire_without_another_request(fake: FakeUpstream) -> None:
    """After a burst, the lean transport's idle connections close on a timer."""
    import asyncio
    import time

    import httpx2

    from providers.transport import LeanTransport

    transport = LeanTransport(idle_timeout=0.5)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    async with httpx2.AsyncClient(transport=transport, timeout=10) as client:

        async def one() -> None:
            url = fake.url + "/v1/chat/completions"
            async with client.stream("POST", url, json=body, headers=headers) as response:
                assert response.status_code == 200
                async for _ in response.aiter_bytes():
                    pass

        await asyncio.gather(*(one() for _ in range(20)))
        assert len(fake._conns) == 20  # kept alive after the burst
        deadline = time.monotonic() + 10
        while fake._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not fake._conns, "idle upstream connections stayed open"


TOOL_ROUND_TRIP = [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "42"},
]
RICH_BODY = {
    "model": "placeholder",
    "messages": [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this? é ✓"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        *TOOL_ROUND_TRIP,
    ],
    "max_tokens": 3,
    "stop": ["END"],
    "temperature": 0.5,
    "top_k": 4,
    "seed": 7,
    "user": "u1",
    "logit_bias": {"50256": -100},
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "f",
                "description": "d",
                "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
            },
        }
    ],
    "tool_choice": "auto",
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True},
    },
}


async def _sent_three_ways(
    upstream: FakeUpstream,
    model: Model,
    prebuilt: Provider,
    through_sdk: Provider,
    fields: dict[str, Any],
) -> list[tuple[dict[str, str], Any]]:
    """The headers (but the length) and JSON body (but the model) the upstream got for the
    same request sent prebuilt, through the SDK, then prebuilt again; closes `prebuilt`."""
    seen = []
    for provider in (prebuilt, through_sdk, prebuilt):
        name = model(tokens=1)
        body = protocol.decode_body(msgspec.json.encode({**fields, "model": name}))
        await collect(provider, protocol.chat_request(body))
        (recorded,) = upstream.by_model(name)
        headers = {k: v for k, v in recorded.headers.items() if k != "content-length"}
        seen.append((headers, {**recorded.body, "model": None}))
    await prebuilt.aclose()
    return seen


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_prebuilt_request_is_what_the_sdk_sends(
    upstream: FakeUpstream, model: Model, transport: str
) -> None:
    """The adapter sends a request the SDK built once with a new body each time: the upstream
    must see exactly what the SDK's own `create` sends (headers and JSON body)."""
    settings = provider_settings(upstream, transport=transport)[0]
    prebuilt = build_provider(settings, ENVIRON)
    assert isinstance(prebuilt, OpenAIProvider)
    through_sdk = OpenAIProvider(  # no `http`: every request through the SDK's `create`
        name=settings.name, client=prebuilt._client, secret=UPSTREAM_KEY, official=False
    )
    seen = await _sent_three_ways(upstream, model, prebuilt, through_sdk, RICH_BODY)
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][1]["top_k"] == 4  # beyond OpenAI's own parameters, still at the top level


# What an Anthropic upstream takes: text, an image, a tool round trip, a schema, thinking.
ANTHROPIC_BODY = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        *TOOL_ROUND_TRIP,
    ],
    "max_tokens": 4096,
    "stop": ["END"],
    "user": "u1",
    "reasoning_effort": "low",
    "tools": RICH_BODY["tools"],
    "tool_choice": "auto",
    "response_format": RICH_BODY["response_format"],
}


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_prebuilt_anthropic_request_is_what_the_sdk_sends(
    upstream: FakeUpstream, model: Model, transport: str
) -> None:
    """As for OpenAI: the request built once and sent with each body is what the SDK's own
    `messages.create` sends, headers and JSON body."""
    settings = provider_settings(upstream, transport=transport)[1]
    prebuilt = build_provider(settings, ENVIRON)
    assert isinstance(prebuilt, AnthropicProvider)
    through_sdk = AnthropicProvider(  # no `http`: every request through the SDK's `create`
        name=settings.name, client=prebuilt._client, secret=UPSTREAM_KEY
    )
    seen = await _sent_three_ways(upstream, model, prebuilt, through_sdk, ANTHROPIC_BODY)
    assert seen[0] == seen[1] == seen[2]
    sent = seen[0][1]
    assert sent["system"] == "be brief" and sent["thinking"]["type"] == "enabled"
    assert sent["messages"][0]["content"][1]["source"]["data"] == PNG
    assert sent["tools"][0]["name"] == "f" and "output_config" in sent


@pytest.mark.parametrize("transport", ["lean", "httpx"])
async def test_cookies_the_upstream_sets_are_sent_back(
    upstream: FakeUpstream, model: Model, transport: str
) -> None:
    """As the SDK's own requests do (its httpx2 client keeps a cookie jar): a session cookie
    a load balancer sets pins the next requests to its backend."""
    provider = build_provider(provider_settings(upstream, transport=transport)[0], ENVIRON)
    first, second = model(tokens=1, set_cookie="backend=b7; Path=/"), model(tokens=1)
    try:
        await collect(provider, ask(first))
        await collect(provider, ask(second))
    finally:
        await provider.aclose()
    (before,) = upstream.by_model(first)
    (after,) = upstream.by_model(second)
    assert "cookie" not in before.headers
    assert after.headers.get("cookie") == "backend=b7"


async def test_lean_pool_waits_for_a_free_connection_then_gives_up(
    upstream: FakeUpstream, model: Model
) -> None:
    name = model(tokens=5, hang_after=1)
    transport = LeanTransport(max_connections=1, connect_timeout=0.3)
    async with httpx2.AsyncClient(transport=transport) as http:
        url = upstream.url + "/v1/chat/completions"
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"authorization": f"Bearer {UPSTREAM_KEY}"}
        first = await send_streamed(
            http, http.build_request("POST", url, json=body, headers=headers)
        )
        with pytest.raises(httpx2.PoolTimeout):
            await send_streamed(http, http.build_request("POST", url, json=body, headers=headers))
        await first.aclose()  # the slot comes free: the next request gets it at once
        second = await send_streamed(
            http, http.build_request("POST", url, json=body, headers=headers)
        )
        assert second.status_code == 200
        await second.aclose()
