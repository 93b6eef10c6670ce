"""The Redis journal's expiry against a real redis-server: a stream whose keys expire while a
replica reads it is forgotten (404), never "Redis unavailable" (503).
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio

from providers.types import TextDelta, Usage
from server.journal import Done, Head, Journal
from server.journal_redis import OUTLIVE_MS, RedisJournal, RemoteGone
from tests.support.redis import RedisServer


def head(stream_id: str) -> Head:
    return Head(stream_id=stream_id, owner="key:a", created=1, model="m")


async def test_the_events_outlive_the_head_of_an_ended_stream(redis_server: RedisServer) -> None:
    namespace = f"t{secrets.token_hex(4)}"
    mirror = RedisJournal(redis_server.url, namespace=namespace, ttl=5.0)
    journal = Journal(ttl=5.0, mirror=mirror)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        entry = journal.open(head("s1"))
        entry.append(TextDelta(text="hi"))
        entry.append(
            Done(
                reason="stop",
                usage=Usage(prompt_tokens=1, completion_tokens=1),
                outcome="completed",
                model="m",
            )
        )
        for _ in range(100):  # the flush runs within FLUSH_DELAY
            if await client.hget(f"{namespace}:journal:s1:head", "status") == b"ended":
                break
            await asyncio.sleep(0.02)
        head_ms = await client.pttl(f"{namespace}:journal:s1:head")
        events_ms = await client.pttl(f"{namespace}:journal:s1:events")
        assert 0 < head_ms <= 5000
        # A reader that saw the head (status "ended") always finds the events it points to.
        assert events_ms - head_ms >= OUTLIVE_MS - 100, (head_ms, events_ms)
    finally:
        await client.aclose()
        await mirror.aclose()


async def test_a_stream_that_expires_while_it_is_read_is_gone(redis_server: RedisServer) -> None:
    namespace = f"t{secrets.token_hex(4)}"
    mirror = RedisJournal(redis_server.url, namespace=namespace)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    head_key = f"{namespace}:journal:s2:head"
    try:
        await client.hset(head_key, mapping={"owner": "key:a", "status": "live"})
        reader = mirror.follow("s2", -1, idle_limit=30.0)
        reading = asyncio.ensure_future(reader.__anext__())
        await asyncio.sleep(0.2)  # the reader is blocked in XREAD on the events key
        await client.delete(head_key)  # what expiry does
        with pytest.raises(RemoteGone):
            await asyncio.wait_for(reading, 5.0)
        await reader.aclose()
    finally:
        await client.aclose()
        await mirror.aclose()
