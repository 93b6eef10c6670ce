"""`[server] max_streams` on a real gateway process: refused at once in every dialect, with a
`Retry-After`; every way a stream ends gives its slot back; one client without keys is not
held to a per-address cap by default."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from websockets.asyncio.client import connect

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.support.process import Served, serve_process
from tests.support.wsclient import StreamClient

SUBPROTOCOL = "tokenrelay.v1"
HELLO = [{"role": "user", "content": "hi"}]


def config(upstream: FakeUpstream, extra: str = "") -> str:
    return (
        f'demo = false\n[server]\nlog_level = "warning"\n{extra}\n'
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nretries = 0\nidle_timeout = 60.0\n'
    )


def scripted(upstream: FakeUpstream, **fields: object) -> str:
    name = f"m-{uuid.uuid4().hex[:10]}"
    upstream.scripts[name] = Script(**fields)  # type: ignore[arg-type]
    return f"oai/{name}"


@pytest.fixture
def capped(upstream: FakeUpstream) -> Iterator[Served]:
    """A gateway process that runs at most 2 streams at once."""
    with serve_process(
        config(upstream, "max_streams = 2"), env={"UPSTREAM_KEY": UPSTREAM_KEY}
    ) as s:
        yield s


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/api/ws"


@contextlib.asynccontextmanager
async def held(http: httpx2.AsyncClient, url: str, model: str) -> AsyncIterator[int]:
    """An SSE stream held open after its first delta; yields its status."""
    body = {"model": model, "messages": HELLO, "stream": True}
    async with http.stream("POST", url + "/api/chat/completions", json=body) as response:
        if response.status_code == 200:
            chunks = response.aiter_raw()
            assert (await anext(chunks)).startswith(b"data: ")
        yield response.status_code


async def hold(
    http: httpx2.AsyncClient, stack: contextlib.AsyncExitStack, url: str, model: str, count: int
) -> list[int]:
    return [await stack.enter_async_context(held(http, url, model)) for _ in range(count)]


async def hold_all(
    http: httpx2.AsyncClient, stack: contextlib.AsyncExitStack, url: str, model: str, slots: int
) -> None:
    """Hold `slots` streams open at once, waiting for slots that are still being freed (a
    stream's slot comes back just after its client saw its end)."""
    async with asyncio.timeout(10):
        while True:
            attempt = contextlib.AsyncExitStack()
            if await hold(http, attempt, url, model, slots) == [200] * slots:
                stack.push_async_exit(attempt)
                return
            await attempt.aclose()
            await asyncio.sleep(0.05)


async def wait_until_free(http: httpx2.AsyncClient, url: str, model: str, slots: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await hold_all(http, stack, url, model, slots)


async def running(client: StreamClient, model: str) -> str:
    """A WebSocket stream started once a slot is free again; returns its id."""
    async with asyncio.timeout(10):
        while True:
            sid = await client.start(model)
            while not client.by_id.get(sid):
                await client.next()
            if client.by_id[sid][0]["type"] == "chat.delta":
                return sid
            assert client.by_id[sid][0]["error"]["code"] == "server_busy"
            await asyncio.sleep(0.05)


def refusals(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('tokenrelay_streams_refused_total{reason="max_streams"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_busy(response: httpx2.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"


async def test_every_dialect_is_refused_at_the_cap_with_retry_after(
    capped: Served, upstream: FakeUpstream
) -> None:
    hang = scripted(upstream, tokens=5, hang_after=1)
    url = capped.url
    async with httpx2.AsyncClient(timeout=10) as http, contextlib.AsyncExitStack() as stack:
        assert await hold(http, stack, url, hang, 2) == [200, 200]
        before = len(upstream.requests)
        chat = {"model": hang, "messages": HELLO}
        for stream in (True, False):
            response = await http.post(
                url + "/api/chat/completions", json={**chat, "stream": stream}
            )
            assert_busy(response)
            error = response.json()["error"]
            assert (error["type"], error["code"], error["retry_after"]) == (
                "server_error",
                "server_busy",
                1.0,
            )
        messages = {"model": hang, "max_tokens": 10, "messages": HELLO, "stream": True}
        response = await http.post(url + "/api/v1/messages", json=messages)
        assert_busy(response)
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "overloaded_error"
        response = await http.post(
            url + "/api/responses", json={"model": hang, "input": "hi", "stream": True}
        )
        assert_busy(response)
        assert response.json()["error"]["code"] == "server_busy"
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            frame = await client.until_terminal(await client.start(hang))
            assert frame["type"] == "chat.error" and frame["seq"] == 0
            error = frame["error"]
            assert (error["code"], error["status"], error["retry_after"]) == (
                "server_busy",
                503,
                1.0,
            )
        # Refused before any upstream work, and counted.
        assert len(upstream.requests) == before
        metrics = (await http.get(url + "/metrics")).text
        assert refusals(metrics) == 5


async def test_every_way_a_stream_ends_gives_its_slot_back(
    capped: Served, upstream: FakeUpstream
) -> None:
    url = capped.url
    hang = scripted(upstream, tokens=5, hang_after=1)
    done = scripted(upstream, tokens=3)
    failing = scripted(upstream, status=500)
    broken = scripted(upstream, tokens=5, error_after=2)
    async with httpx2.AsyncClient(timeout=10) as http:
        for model in (done, failing, broken) * 2:  # completed, failed before and after output
            for stream in (True, False):
                body = {"model": model, "messages": HELLO, "stream": stream}
                await http.post(url + "/api/chat/completions", json=body)
        for _ in range(3):  # SSE clients that hang up mid-stream (each slot is freed soon after)
            await wait_until_free(http, url, hang, 2)
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            for _ in range(3):  # cancelled, and refused at the cap
                first, second = await running(client, hang), await running(client, hang)
                third = await client.start(hang)
                assert (await client.until_terminal(third))["error"]["code"] == "server_busy"
                for sid in (first, second):
                    await client.cancel(sid)
                    assert (await client.until_terminal(sid))["finish_reason"] == "cancelled"
            await client.start(hang)
            await client.start(hang)  # left running when the socket closes
        for _ in range(20):  # sockets that go away right after their starts
            async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
                for i in range(2):
                    start = {"type": "chat.start", "id": f"s{i}", "request": {"model": hang}}
                    start["request"]["messages"] = HELLO  # type: ignore[index]
                    await ws.send(json.dumps(start))
        async with contextlib.AsyncExitStack() as stack:
            await hold_all(http, stack, url, hang, 2)
            assert await hold(http, stack, url, hang, 1) == [503]


async def test_one_client_without_keys_runs_more_than_64_streams_by_default(
    upstream: FakeUpstream,
) -> None:
    hang = scripted(upstream, tokens=5, hang_after=1)
    with serve_process(config(upstream), env={"UPSTREAM_KEY": UPSTREAM_KEY}) as served:
        limits = httpx2.Limits(max_connections=120)
        async with (
            httpx2.AsyncClient(timeout=20, limits=limits) as http,
            contextlib.AsyncExitStack() as stack,
        ):
            statuses = await asyncio.gather(
                *(stack.enter_async_context(held(http, served.url, hang)) for _ in range(100))
            )
            assert statuses == [200] * 100
            # And more sockets than a key may hold (16), each running a stream.
            sockets = [
                StreamClient(
                    await stack.enter_async_context(
                        connect(ws_url(served.url), subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]
                    )
                )
                for _ in range(20)
            ]
            for client in sockets:
                await client.until_deltas(await client.start(hang), 1)
