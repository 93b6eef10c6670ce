"""The cache: both backends through one contract, and completion caching through real clients."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from providers.types import ChatRequest, Message
from server.app import create_app
from server.cache import Cache, MemoryCache, RedisCache, completion_key
from server.settings import CacheSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.redis import RedisServer
from tests.support.servers import serve_in_thread
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Cache]:
    backend: Cache
    if request.param == "memory":
        backend = MemoryCache()
    else:
        backend = RedisCache(redis_server.url, namespace=f"test-{uuid.uuid4().hex[:8]}")
    yield backend
    await backend.aclose()


# -- the contract every backend keeps --------------------------------------------------------


async def test_get_set_delete(cache: Cache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", b"\x00value\xff", ttl=60)
    assert await cache.get("k") == b"\x00value\xff"
    await cache.set("k", b"second", ttl=60)
    assert await cache.get("k") == b"second"
    await cache.delete("k")
    assert await cache.get("k") is None
    assert await cache.healthy()


async def test_batch_operations_match_single_ones(cache: Cache) -> None:
    assert await cache.get_many([]) == []
    await cache.set_many({}, ttl=60)
    await cache.set_many({"a": b"1", "b": b"\x00two"}, ttl=60)
    await cache.set("c", b"3", ttl=60)
    assert await cache.get_many(["a", "missing", "b", "c"]) == [b"1", None, b"\x00two", b"3"]
    assert await cache.get("b") == b"\x00two"
    await cache.set_many({"short": b"x"}, ttl=0.05)
    await asyncio.sleep(0.2)
    assert await cache.get_many(["short", "a"]) == [None, b"1"]


async def test_entries_expire(cache: Cache) -> None:
    await cache.set("short", b"x", ttl=0.05)
    await cache.set("long", b"y", ttl=60)
    await asyncio.sleep(0.2)
    assert await cache.get("short") is None
    assert await cache.get("long") == b"y"


async def test_namespaces_keep_replicas_apart(redis_server: RedisServer) -> None:
    first, second = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    a = RedisCache(redis_server.url, namespace=first)
    b = RedisCache(redis_server.url, namespace=second)
    a_again = RedisCache(redis_server.url, namespace=first)  # another replica, same namespace
    await a.set("k", b"from a", ttl=60)
    assert await b.get("k") is None
    assert await a_again.get("k") == b"from a"
    for cache in (a, b, a_again):
        await cache.aclose()


async def test_memory_cache_is_bounded_by_entries_and_bytes() -> None:
    by_count = MemoryCache(max_entries=3)
    for i in range(10):
        await by_count.set(f"k{i}", b"v", ttl=60)
    assert [await by_count.get(f"k{i}") for i in range(10)].count(b"v") == 3
    by_size = MemoryCache(max_bytes=1000)
    for i in range(10):
        await by_size.set(f"k{i}", b"x" * 300, ttl=60)
    kept = [await by_size.get(f"k{i}") for i in range(10)]
    assert 1 <= sum(v is not None for v in kept) <= 2
    assert await by_size.get("k9") is not None  # the newest stays
    await by_size.set("huge", b"x" * 5000, ttl=60)  # larger than the whole cache: not stored
    assert await by_size.get("huge") is None


async def test_unreachable_redis_is_a_miss_not_a_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = RedisCache(f"redis://127.0.0.1:{port}/0", timeout=0.1)
    assert await cache.get("k") is None
    await cache.set("k", b"v", ttl=60)  # no exception
    assert await cache.get("k") is None
    await cache.set_many({"k": b"v"}, ttl=60)
    assert await cache.get_many(["k", "j"]) == [None, None]
    assert not await cache.healthy()
    await cache.aclose()


def test_completion_keys_depend_on_exactly_what_changes_the_answer() -> None:
    base = ChatRequest(model="m", messages=[Message(role="user", content="hi")], temperature=0.5)
    same = ChatRequest(
        model="m", messages=[Message(role="user", content="hi")], temperature=0.5, user="someone"
    )
    assert completion_key("p", base) == completion_key("p", same)
    variants = [
        ChatRequest(model="m2", messages=base.messages, temperature=0.5),
        ChatRequest(model="m", messages=[Message(role="user", content="hi!")], temperature=0.5),
        ChatRequest(model="m", messages=base.messages, temperature=0.6),
        ChatRequest(model="m", messages=base.messages, temperature=0.5, max_tokens=5),
        ChatRequest(model="m", messages=base.messages, temperature=0.5, stop=["x"]),
        ChatRequest(model="m", messages=base.messages, temperature=0.5, seed=1),
    ]
    keys = {completion_key("p", v) for v in variants} | {completion_key("q", base)}
    assert completion_key("p", base) not in keys
    assert len(keys) == len(variants) + 1


# -- completion caching through the gateway ----------------------------------------------------


def gateway_settings(upstream: FakeUpstream, cache: CacheSettings) -> Settings:
    return Settings(providers=provider_settings(upstream), cache=cache)


def start_gateway(upstream: FakeUpstream, cache: CacheSettings) -> Any:
    settings = gateway_settings(upstream, cache)
    return serve_in_thread(create_app(settings, ENVIRON), options=uvicorn_options(settings))


async def sse_events(
    http: httpx2.AsyncClient, url: str, body: dict[str, Any], **headers: str
) -> tuple[list[Any], httpx2.Headers]:
    response = await http.post(
        url + "/api/chat/completions", json={**body, "stream": True}, headers=headers
    )
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events], response.headers


def comparable(events: list[Any]) -> list[Any]:
    """SSE events without what differs per response by design (id, created)."""
    return [
        e if e == "[DONE]" else {k: v for k, v in e.items() if k not in ("id", "created")}
        for e in events
    ]


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("provider", ["ant", "oai"])  # "oai": most deltas written on arrival
async def test_sse_replay_is_chunk_for_chunk_the_live_stream(
    upstream: FakeUpstream, model: Model, redis_server: RedisServer, backend: str, provider: str
) -> None:
    url_setting = redis_server.url if backend == "redis" else None
    cache = CacheSettings(url=url_setting, completions=True, namespace=uuid.uuid4().hex)
    name = model(tokens=6, reasoning=["think "], pace=0.005)
    body = {
        "model": f"{provider}/{name}",
        "messages": HELLO,
        "stream_options": {"include_usage": True},
    }
    with start_gateway(upstream, cache) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            live, live_headers = await sse_events(http, url, body)
            replay, replay_headers = await sse_events(http, url, body)
    assert len(upstream.by_model(name)) == 1
    assert "x-tokenrelay-cache" not in live_headers
    assert replay_headers["x-tokenrelay-cache"] == "hit"
    assert comparable(replay) == comparable(live)
    assert len(live) == 1 + 1 + 6 + 1 + 1 + 1  # role, reasoning, 6 deltas, finish, usage, [DONE]


async def test_websocket_replay_matches_and_says_cached(
    upstream: FakeUpstream, model: Model
) -> None:
    name = model(tokens=5)
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with connect(
            url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
        ) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            first = await client.start(f"oai/{name}", sid="first")
            await client.until_terminal(first)
            second = await client.start(f"oai/{name}", sid="second")
            await client.until_terminal(second)
    assert len(upstream.by_model(name)) == 1

    def shape(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in f.items() if k not in ("id", "ttft_ms", "cached")} for f in frames
        ]

    assert shape(client.by_id["second"]) == shape(client.by_id["first"])
    assert client.by_id["first"][-1]["cached"] is False
    assert client.by_id["second"][-1]["cached"] is True


async def test_rest_hit_and_cache_control(upstream: FakeUpstream, model: Model) -> None:
    name = model(tokens=3)
    body = {"model": f"oai/{name}", "messages": HELLO}
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            post = lambda **h: http.post(url + "/api/chat/completions", json=body, headers=h)  # noqa: E731
            first = await post()
            hit = await post()
            assert hit.headers["x-tokenrelay-cache"] == "hit"
            assert hit.json()["choices"] == first.json()["choices"]
            assert len(upstream.by_model(name)) == 1
            skipped = await post(**{"cache-control": "no-cache"})
            assert "x-tokenrelay-cache" not in skipped.headers
            assert len(upstream.by_model(name)) == 2
            too_old = await post(**{"cache-control": "max-age=0"})
            assert "x-tokenrelay-cache" not in too_old.headers
            assert len(upstream.by_model(name)) == 3
            fresh_enough = await post(**{"cache-control": "max-age=3600"})
            assert fresh_enough.headers["x-tokenrelay-cache"] == "hit"
        # no-store: answered, never stored.
        other = model(tokens=2)
        other_body = {"model": f"oai/{other}", "messages": HELLO}
        async with httpx2.AsyncClient(timeout=10) as http:
            for _ in range(2):
                response = await http.post(
                    url + "/api/chat/completions",
                    json=other_body,
                    headers={"cache-control": "no-store"},
                )
                assert "x-tokenrelay-cache" not in response.headers
        assert len(upstream.by_model(other)) == 2


async def test_caching_is_off_by_default(
    gateway: str, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=1)
    async with httpx2.AsyncClient(timeout=10) as http:
        for _ in range(2):
            await http.post(
                gateway + "/api/chat/completions", json={"model": f"oai/{name}", "messages": HELLO}
            )
    assert len(upstream.by_model(name)) == 2


@pytest.mark.parametrize(
    "script",
    [
        {"status": 500},
        {"tokens": 5, "close_after": 2},
        {"tokens": 5, "error_after": 2},
        {"tokens": 3, "finish_reason": "content_filter"},
    ],
)
async def test_failures_are_never_stored(
    upstream: FakeUpstream, model: Model, script: dict[str, Any]
) -> None:
    name = model(**script)
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            for _ in range(2):
                await sse_events(http, url, {"model": f"oai/{name}", "messages": HELLO})
    assert len(upstream.by_model(name)) == 2


async def test_cancelled_streams_are_never_stored(upstream: FakeUpstream, model: Model) -> None:
    name = model(tokens=30, pace=0.02)
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with connect(
            url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
        ) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            sid = await client.start(f"oai/{name}")
            await client.until_deltas(sid, 2)
            await client.cancel(sid)
            assert (await client.until_terminal(sid))["finish_reason"] == "cancelled"
            again = await client.start(f"oai/{name}")
            await client.until_deltas(again, 1)
            await client.cancel(again)
            await client.until_terminal(again)
    assert len(upstream.by_model(name)) == 2


async def test_integers_past_64_bits_in_a_schema_are_cached_and_seeds_past_them_refused(
    upstream: FakeUpstream, model: Model
) -> None:
    name = model(tokens=3)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10**30}}}
    tools = [{"type": "function", "function": {"name": "count", "parameters": schema}}]
    body = {"model": f"oai/{name}", "messages": HELLO, "tools": tools}
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            first = await http.post(url + "/api/chat/completions", json=body)
            second = await http.post(url + "/api/chat/completions", json=body)
            seeded = await http.post(url + "/api/chat/completions", json={**body, "seed": 2**64})
    assert first.status_code == second.status_code == 200
    assert second.headers["x-tokenrelay-cache"] == "hit"
    assert upstream.by_model(name)[0].body["tools"][0]["function"]["parameters"] == schema
    assert len(upstream.by_model(name)) == 1
    assert seeded.status_code == 400
    assert seeded.json()["error"]["param"] == "seed"


async def test_an_answer_the_cache_cannot_hold_is_still_answered(
    upstream: FakeUpstream, model: Model
) -> None:
    name = model(tokens=2, prompt_tokens=2**70)  # past what MessagePack stores
    body = {"model": f"oai/{name}", "messages": HELLO}
    with start_gateway(upstream, CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            plain = await http.post(url + "/api/chat/completions", json=body)
            events, _ = await sse_events(http, url, body)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["prompt_tokens"] == 2**70
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    assert len(upstream.by_model(name)) == 2  # nothing was stored


async def test_two_replicas_share_one_redis(
    upstream: FakeUpstream, model: Model, redis_server: RedisServer
) -> None:
    name = model(tokens=4)
    cache = CacheSettings(url=redis_server.url, completions=True, namespace=uuid.uuid4().hex)
    body = {"model": f"oai/{name}", "messages": HELLO}
    with start_gateway(upstream, cache) as a, start_gateway(upstream, cache) as b:
        async with httpx2.AsyncClient(timeout=10) as http:
            from_a = await http.post(a + "/api/chat/completions", json=body)
            from_b = await http.post(b + "/api/chat/completions", json=body)
    assert from_b.headers["x-tokenrelay-cache"] == "hit"
    assert from_b.json()["choices"] == from_a.json()["choices"]
    assert len(upstream.by_model(name)) == 1


def asker(http: httpx2.AsyncClient, url: str) -> Callable[[str], Awaitable[httpx2.Response]]:
    """`ask(model)`: one non-streamed chat request that must succeed."""

    async def ask(name: str) -> httpx2.Response:
        body = {"model": f"oai/{name}", "messages": HELLO}
        response = await http.post(url + "/api/chat/completions", json=body)
        assert response.status_code == 200
        return response

    return ask


async def test_redis_dying_and_coming_back(
    upstream: FakeUpstream, model: Model, fresh_redis: RedisServer
) -> None:
    cache = CacheSettings(url=fresh_redis.url, completions=True, timeout=0.1)
    before, during, after = model(tokens=2), model(tokens=2), model(tokens=2)
    with start_gateway(upstream, cache) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            ask = asker(http, url)

            await ask(before)
            assert (await ask(before)).headers.get("x-tokenrelay-cache") == "hit"
            fresh_redis.stop()
            for _ in range(3):  # Redis is gone: every request still succeeds, from the upstream
                assert "x-tokenrelay-cache" not in (await ask(during)).headers
            ready = (await http.get(url + "/readyz")).json()
            assert ready["status"] == "degraded"
            assert ready["checks"]["cache"] == {"redis": "degraded"}
            fresh_redis.start()  # empty, same port: no restart of the gateway
            async with asyncio.timeout(15):
                while "x-tokenrelay-cache" not in (await ask(after)).headers:
                    await asyncio.sleep(0.1)
    assert len(upstream.by_model(during)) == 3


async def cache_samples(http: httpx2.AsyncClient, url: str) -> dict[tuple[str, str], float]:
    """Redis operations for completions, by (operation, result), from /metrics."""
    text = (await http.get(url + "/metrics")).text
    return {
        (s.labels["operation"], s.labels["result"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tokenrelay_cache_operations_total"
        and (s.labels["backend"], s.labels["use"]) == ("redis", "completions")
    }


async def test_a_frozen_redis_is_a_miss_within_the_timeout(
    upstream: FakeUpstream, model: Model, fresh_redis: RedisServer
) -> None:
    """Redis accepts connections but never answers (SIGSTOP): requests go to the upstream."""
    cache = CacheSettings(url=fresh_redis.url, completions=True, timeout=0.1)
    hot, cold = model(tokens=2), model(tokens=2)
    with start_gateway(upstream, cache) as url:
        async with httpx2.AsyncClient(timeout=10) as http:
            ask = asker(http, url)

            await ask(hot)
            assert (await ask(hot)).headers.get("x-tokenrelay-cache") == "hit"
            before = await cache_samples(http, url)
            fresh_redis.pause()
            try:
                async with asyncio.timeout(5):  # a guard against a hang, not a measurement
                    frozen = [await ask(hot), await ask(cold), await ask(cold)]
                after = await cache_samples(http, url)
            finally:
                fresh_redis.resume()
            assert all("x-tokenrelay-cache" not in r.headers for r in frozen)
            errors = after.get(("get", "error"), 0) - before.get(("get", "error"), 0)
            assert errors == 3  # every lookup while frozen is counted: a timeout or a skip
            async with asyncio.timeout(15):  # thawed: the hits come back, no restart
                while (await ask(hot)).headers.get("x-tokenrelay-cache") != "hit":
                    await asyncio.sleep(0.1)
    assert len(upstream.by_model(cold)) == 2  # both asked the upstream: nothing was stored


async def test_a_failing_redis_is_logged_once_not_per_operation(
    fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(fresh_redis.url, timeout=0.1)
    try:
        await cache.set("k", b"v", ttl=60)
        fresh_redis.stop()
        with caplog.at_level(logging.INFO, logger="tokenrelay.cache"):
            async with asyncio.timeout(5):
                for _ in range(40):  # 0.8 s: several real attempts between the back-offs
                    assert await cache.get("k") is None
                    await asyncio.sleep(0.02)
            failing = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(failing) == 1
            fresh_redis.start()
            async with asyncio.timeout(15):
                while await cache.get("k") is None:
                    await cache.set("k", b"again", ttl=60)
                    await asyncio.sleep(0.05)
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            "cache backend answering again"
        ]
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await cache.aclose()


@pytest.mark.parametrize("scope", ["key", "global"])
async def test_cached_answers_stay_with_their_key_unless_shared(
    upstream: FakeUpstream, model: Model, scope: Literal["key", "global"]
) -> None:
    from server.auth import digest, new_key
    from server.settings import AuthSettings
    from tests.support.gateways import gateway_with

    alice, bob = new_key(), new_key()
    name = model(tokens=3)
    body = {"model": f"oai/{name}", "messages": HELLO}
    auth = AuthSettings(keys=[digest(alice), digest(bob)])
    cache = CacheSettings(completions=True, scope=scope)
    with gateway_with(upstream, auth=auth, cache=cache) as url:
        async with httpx2.AsyncClient(base_url=url, timeout=10) as http:

            async def ask(key: str) -> str | None:
                headers = {"authorization": f"Bearer {key}"}
                response = await http.post("/api/chat/completions", json=body, headers=headers)
                assert response.status_code == 200
                return response.headers.get("x-tokenrelay-cache")

            assert await ask(alice) is None
            assert await ask(alice) == "hit"
            assert await ask(bob) == ("hit" if scope == "global" else None)
    assert len(upstream.by_model(name)) == (1 if scope == "global" else 2)
