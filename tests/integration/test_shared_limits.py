"""Per-key stream and socket caps shared by two real gateway processes through a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.auth import digest, new_key
from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.support.process import Served, serve_process
from tests.support.redis import RedisServer

KEY = new_key()
AUTH = {"authorization": f"Bearer {KEY}"}


def config(upstream: FakeUpstream, redis: RedisServer, namespace: str) -> str:
    return (
        'demo = false\n[server]\nlog_level = "warning"\n'
        f'[auth]\nkeys = ["{digest(KEY)}"]\n'
        "[limits]\nstreams_per_key = 2\nws_sockets_per_key = 2\nlease_ttl = 1.5\n"
        f'[cache]\nurl = "{redis.url}"\nnamespace = "{namespace}"\ntimeout = 1.0\n'
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nidle_timeout = 60.0\n'
    )


@pytest.fixture
def replicas(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> Iterator[tuple[Served, Served, str]]:
    """Two gateways on one Redis, and a model whose streams send one delta and then hang."""
    name = f"hang-{uuid.uuid4().hex[:8]}"
    upstream.scripts[name] = Script(tokens=5, hang_after=1)
    text = config(upstream, fresh_redis, uuid.uuid4().hex)
    env = {"UPSTREAM_KEY": UPSTREAM_KEY}
    with serve_process(text, env=env) as one, serve_process(text, env=env) as two:
        yield one, two, f"oai/{name}"


@contextlib.asynccontextmanager
async def open_stream(http: httpx2.AsyncClient, url: str, model: str) -> AsyncIterator[int]:
    """A stream held open (its first delta read); yields the status."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with http.stream(
        "POST", url + "/api/chat/completions", json=body, headers=AUTH
    ) as response:
        chunks = response.aiter_raw()
        if response.status_code == 200:
            # The first chunk; the iterator is kept, as closing it would end the stream.
            assert (await anext(chunks)).startswith(b"data: ")
        yield response.status_code


async def status_of_one_more(http: httpx2.AsyncClient, url: str, model: str) -> int:
    async with open_stream(http, url, model) as status:
        return status


async def test_streams_per_key_hold_across_replicas(
    replicas: tuple[Served, Served, str], fresh_redis: RedisServer
) -> None:
    one, two, model = replicas
    async with httpx2.AsyncClient(timeout=10) as http, contextlib.AsyncExitStack() as held:
        for _ in range(2):
            assert await held.enter_async_context(open_stream(http, one.url, model)) == 200
        # The key's two slots are taken on the first replica: the second refuses a third.
        assert await status_of_one_more(http, two.url, model) == 429
        # A dead Redis fails open: each replica counts its own streams only.
        fresh_redis.stop()
        assert await status_of_one_more(http, two.url, model) == 200


async def test_a_dead_replica_gives_its_slots_back_when_its_leases_expire(
    replicas: tuple[Served, Served, str],
) -> None:
    one, two, model = replicas
    async with httpx2.AsyncClient(timeout=10) as http, contextlib.AsyncExitStack() as held:
        for _ in range(2):
            assert await held.enter_async_context(open_stream(http, one.url, model)) == 200
        assert await status_of_one_more(http, two.url, model) == 429
        one.proc.kill()  # no chance to release anything
        one.proc.wait()
        deadline = time.monotonic() + 30  # generous; the leases last 1.5 s
        while (status := await status_of_one_more(http, two.url, model)) == 429:
            assert time.monotonic() < deadline, "the dead replica's slots were never freed"
            await asyncio.sleep(0.2)
        assert status == 200


async def test_sockets_per_key_hold_across_replicas(
    replicas: tuple[Served, Served, str],
) -> None:
    one, two, _ = replicas
    ws = [url.replace("http://", "ws://") + "/api/ws" for url in (one.url, two.url)]
    async with (
        connect(ws[0], additional_headers=AUTH, subprotocols=["tokenrelay.v1"]),  # type: ignore[list-item]
        connect(ws[0], additional_headers=AUTH, subprotocols=["tokenrelay.v1"]),  # type: ignore[list-item]
    ):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws[1], additional_headers=AUTH, subprotocols=["tokenrelay.v1"]):  # type: ignore[list-item]
                pass
        assert refused.value.response.status_code == 429
        assert b"too_many_sockets" in refused.value.response.body
    # Closed on the first replica: the slots are free on the second at once.
    deadline = time.monotonic() + 10
    while True:
        try:
            async with connect(ws[1], additional_headers=AUTH, subprotocols=["tokenrelay.v1"]):  # type: ignore[list-item]
                break
        except InvalidStatus:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
