"""The `[limits]` and rate limits, each pushed past its edge: a structured error, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import httpx2
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.settings import LimitSettings
from tests.fakeupstream import FakeUpstream
from tests.support.gateways import gateway_with
from tests.support.redis import RedisServer
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
SUBPROTOCOL = "tokenrelay.v1"
HELLO = [{"role": "user", "content": "hello"}]
LIMITS = LimitSettings(
    max_messages=4, max_chars=100, max_tokens=50, max_json_depth=8, max_header_bytes=4096
)


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/api/ws"


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    with gateway_with(upstream, limits=LIMITS) as url:
        yield url


@pytest.fixture
async def http(gateway: str) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=gateway, timeout=10) as client:
        yield client


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def schema_format(inner: object) -> dict[str, object]:
    """A json_schema response format: the body, it and its schema are 4 levels already."""
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": {"x": inner}}}


OVER = [
    ({"messages": HELLO * 5}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 101}]}]},
        "messages",
    ),
    ({"max_tokens": 51}, "max_tokens"),
    ({"max_completion_tokens": 51}, "max_completion_tokens"),
    # Inline images and tool-call arguments count as characters too.
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "see"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + "A" * 80},
                        },
                    ],
                }
            ]
        },
        "messages",
    ),
    (
        {
            "messages": [
                *HELLO,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "1" * 96},
                        }
                    ],
                },
            ]
        },
        "messages",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "description": "d" * 90}}]},
        "tools",
    ),
    # So do texts an assistant turn echoes back, a response format's schema and a prediction.
    (
        {"messages": [*HELLO, {"role": "assistant", "content": "", "reasoning_content": "r" * 96}]},
        "messages",
    ),
    ({"messages": [*HELLO, {"role": "assistant", "refusal": "r" * 96}]}, "messages"),
    ({"response_format": schema_format("s" * 90)}, "response_format"),
    ({"prediction": {"type": "content", "content": "p" * 90}}, "prediction"),
    # A schema nested past the limit, in a response format or in a tool's parameters.
    ({"response_format": schema_format(nested(5))}, None),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"x": nested(4)}}}
            ]
        },
        None,
    ),
]


@pytest.mark.parametrize(("extra", "param"), OVER)
async def test_request_limits_over_rest(
    http: httpx2.AsyncClient, extra: dict[str, object], param: str | None
) -> None:
    body = {"model": "demo/echo", "messages": HELLO, **extra}
    response = await http.post("/api/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("limit_exceeded", param)


async def test_limits_are_inclusive(http: httpx2.AsyncClient) -> None:
    body = {
        "model": "demo/echo",
        "messages": HELLO * 4,
        "max_tokens": 50,
        "response_format": schema_format(nested(4)),
    }
    assert (await http.post("/api/chat/completions", json=body)).status_code == 200


@pytest.mark.parametrize(("extra", "param"), OVER)
async def test_request_limits_over_websocket(
    gateway: str, extra: dict[str, object], param: str | None
) -> None:
    async with connect(ws_url(gateway), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        request = {"model": "demo/echo", "messages": HELLO, **extra}
        await ws.send(json.dumps({"type": "chat.start", "id": "s", "request": request}))
        frame = await client.next()
        if param is None:  # too deep to trust the frame at all: a protocol error
            assert frame["type"] == "error" and frame["code"] == "limit_exceeded"
        else:
            assert frame["type"] == "chat.error"
            assert (frame["error"]["code"], frame["error"]["param"]) == ("limit_exceeded", param)
        await client.start("demo/echo")  # the socket is still usable
        assert (await client.next())["type"] == "chat.delta"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model": "demo/echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
        (b'{"model": "demo/\xc3", "messages": []}', 400),
        (rb'{"model": "demo/echo", "messages": [{"role": "user", "content": "a\ud800b"}]}', 400),
        (rb'{"model": "demo/echo", "messages": [{"role": "user", "content": "\udc00"}]}', 400),
        (b'{"model": "demo/echo", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        (b'{"model": "demo/echo", "tools": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        (
            b'{"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            400,
        ),
        (
            b'{"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
            400,
        ),
        (b'{"model": "demo/echo", "messages": [{"role": "tool", "content": "hi"}]}', 400),
    ],
)
async def test_hostile_bodies_are_400s(http: httpx2.AsyncClient, body: bytes, status: int) -> None:
    response = await http.post(
        "/api/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_deep_frames_do_not_break_the_socket(gateway: str) -> None:
    async with connect(ws_url(gateway), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        for deep in (
            "[" * 5000 + "]" * 5000,
            '{"type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}",
        ):
            await ws.send(deep)
            assert (await client.next())["type"] == "error"
        await ws.send('{"type": "ping"}')
        assert (await client.next())["type"] == "pong"


async def test_oversized_headers_are_431(gateway: str) -> None:
    big = {"x-padding": "x" * 5000}
    async with httpx2.AsyncClient(base_url=gateway) as http:
        response = await http.get("/api/models", headers=big)
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(gateway), additional_headers=big):
            pass
    assert refused.value.response.status_code == 431


async def test_frames_per_second(upstream: FakeUpstream) -> None:
    with gateway_with(upstream, limits=LimitSettings(ws_frames_per_second=5)) as url:
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(500):
                    await ws.send('{"type": "ping"}')
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_streams_and_sockets_per_address(upstream: FakeUpstream, model: Model) -> None:
    limits = LimitSettings(streams_per_address=2, ws_sockets_per_address=2)
    slow = f"oai/{model(tokens=500, pace=0.02)}"
    with gateway_with(upstream, limits=limits) as url:
        async with (
            connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as one,  # type: ignore[list-item]
            connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as two,  # type: ignore[list-item]
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(ws_url(url)):
                    pass
            assert refused.value.response.status_code == 429
            assert b"too_many_sockets" in refused.value.response.body
            a, b = StreamClient(one), StreamClient(two)
            first = await a.start(slow)
            await b.start(slow)
            await a.until_deltas(first, 1)
            third = await a.start(slow)
            assert (await a.until_terminal(third))["error"]["code"] == "too_many_streams"
            async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
                body = {"model": "demo/echo", "messages": HELLO}
                response = await http.post("/api/chat/completions", json=body)
                assert response.status_code == 429
                assert response.json()["error"]["code"] == "too_many_streams"
                await a.cancel(first)
                await a.until_terminal(first)
                assert (await http.post("/api/chat/completions", json=body)).status_code == 200
        # Both sockets closed: their slots are free again.
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as again:  # type: ignore[list-item]
            assert again.subprotocol == SUBPROTOCOL


async def exhaust(http: httpx2.AsyncClient, path: str = "/api/models") -> httpx2.Response:
    for _ in range(1000):
        response = await http.get(path)
        if response.status_code == 429:
            return response
        assert response.status_code == 200
    raise AssertionError("never rate limited")


async def test_requests_per_minute_exhaust_and_recover(upstream: FakeUpstream) -> None:
    with gateway_with(upstream, limits=LimitSettings(requests_per_minute=120)) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
            refused = await exhaust(http)
            error = refused.json()["error"]
            assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
            wait = int(refused.headers["retry-after"])
            assert wait >= 1
            await asyncio.sleep(wait)
            assert (await http.get("/api/models")).status_code == 200
            assert (await http.get("/healthz")).status_code == 200  # never limited


async def test_websocket_starts_count_as_requests(upstream: FakeUpstream) -> None:
    with gateway_with(upstream, limits=LimitSettings(requests_per_minute=3)) as url:
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)  # the upgrade took one request
            for expected in ("chat.done", "chat.done", "chat.error"):
                sid = await client.start("demo/echo")
                assert (await client.until_terminal(sid))["type"] == expected
            error = client.by_id[sid][-1]["error"]
            assert error["code"] == "rate_limited" and error["retry_after"] > 0


async def test_tokens_per_minute_are_charged_at_the_end(
    upstream: FakeUpstream, model: Model
) -> None:
    with gateway_with(upstream, limits=LimitSettings(tokens_per_minute=600)) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
            big = {"model": f"oai/{model(tokens=3, prompt_tokens=1000)}", "messages": HELLO}
            assert (await http.post("/api/chat/completions", json=big)).status_code == 200
            # The charge lands as the stream ends; from then on the key is over its budget.
            async with asyncio.timeout(10):
                while (response := await http.get("/api/models")).status_code != 429:
                    await asyncio.sleep(0.01)
            assert int(response.headers["retry-after"]) >= 30  # 404 tokens owed at 10 per second


async def test_replicas_share_rate_limits_through_redis(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    from server.settings import CacheSettings

    limits = LimitSettings(requests_per_minute=4)
    cache = CacheSettings(url=fresh_redis.url, timeout=1.0)
    with (
        gateway_with(upstream, limits=limits, cache=cache) as one,
        gateway_with(upstream, limits=limits, cache=cache) as two,
    ):
        async with httpx2.AsyncClient(timeout=10) as http:
            statuses = [(await http.get(url + "/api/models")).status_code for url in (one, two) * 3]
            assert statuses == [200, 200, 200, 200, 429, 429]
            fresh_redis.stop()  # a dead Redis lets requests through, as a dead cache would
            assert (await http.get(one + "/api/models")).status_code == 200


async def test_a_stream_cut_off_early_is_charged_by_its_characters(
    upstream: FakeUpstream, model: Model
) -> None:
    """400,000 characters without a space: one word, but at least 100,000 tokens."""
    slow = f"oai/{model(tokens=50, pace=0.05, prompt_tokens=1)}"
    prompt = [{"role": "user", "content": "x" * 400_000}]
    with gateway_with(upstream, limits=LimitSettings(tokens_per_minute=60_000)) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:
            body = {"model": slow, "messages": prompt, "stream": True}
            async with http.stream("POST", "/api/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # the first chunk, then hang up long before the usage chunk
            async with asyncio.timeout(10):
                while (refused := await http.get("/api/models")).status_code != 429:
                    await asyncio.sleep(0.01)
            # At least 100,000 tokens owed at 1,000 per second: refused for over 40 s.
            assert int(refused.headers["retry-after"]) >= 40
