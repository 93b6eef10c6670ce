"""The Redis journal against a real redis-server: a stream whose keys expire while a replica
reads it is forgotten (404), never "Redis unavailable" (503); one opened on another replica a
moment ago, not yet in Redis, is found all the same.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio

from providers.types import TextDelta, Usage
from server.errors import StreamNotFoundError
from server.journal import Done, Entry, Head, Journal
from server.journal_redis import OUTLIVE_MS, RedisJournal, RemoteGone
from server.resume import Streams
from tests.support.redis import RedisServer


def head(stream_id: str) -> Head:
    return Head(stream_id=stream_id, owner="key:a", created=1, model="m")


def write_answer(entry: Entry) -> None:
    """A one-token answer that completed."""
    entry.append(TextDelta(text="hi"))
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    entry.append(Done(reason="stop", usage=usage, outcome="completed", model="m"))


async def test_the_events_outlive_the_head_of_an_ended_stream(redis_server: RedisServer) -> None:
    namespace = f"t{secrets.token_hex(4)}"
    mirror = RedisJournal(redis_server.url, namespace=namespace, ttl=5.0)
    journal = Journal(ttl=5.0, mirror=mirror)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        entry = journal.open(head("s1"))
        write_answer(entry)
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


async def test_closing_stops_a_heartbeat_whose_cancel_was_swallowed(
    redis_server: RedisServer,
) -> None:
    """redis-py can swallow a cancel that lands inside a command and return normally; the
    replica's background loops must still end when the journal closes, or shutdown hangs."""
    mirror = RedisJournal(redis_server.url, namespace=f"t{secrets.token_hex(4)}")
    real_set = mirror._client.set
    in_set = asyncio.Event()

    async def swallowing_set(*args: object, **kwargs: object) -> object:
        in_set.set()
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            pass  # as the client does now and then: the command completes anyway
        return await real_set(*args, **kwargs)  # type: ignore[arg-type]

    mirror._client.set = swallowing_set  # type: ignore[method-assign]
    mirror.listen(lambda kind, stream_id: None)
    await asyncio.wait_for(in_set.wait(), 5)
    closing = asyncio.ensure_future(mirror.aclose())
    done, _ = await asyncio.wait([closing], timeout=5)  # a wait that does not cancel it
    beat = mirror._beat
    assert beat is not None
    if not done:  # the loop went on: stop it for good, then fail
        beat.cancel()
        await asyncio.gather(closing, return_exceptions=True)
    assert done, "closing the journal waited for a heartbeat that never stops"
    assert beat.done()


@pytest.mark.parametrize("call", ["cancel", "follow"])
async def test_a_stream_just_opened_on_another_replica_is_found_there(
    redis_server: RedisServer, call: str
) -> None:
    """Its client has the id as soon as its first event is out, but its replica writes to
    Redis only every few milliseconds: a cancel or a resume that reaches another replica
    before that finds the stream, it is not told there is none."""
    namespace = f"t{secrets.token_hex(4)}"
    here = Journal(ttl=5.0, mirror=RedisJournal(redis_server.url, namespace=namespace))
    there = Streams(Journal(ttl=5.0, mirror=RedisJournal(redis_server.url, namespace=namespace)))
    try:
        entry = here.open(head("s3"))
        write_answer(entry)
        # At once: the first replica's flush is still FLUSH_DELAY away.
        if call == "cancel":
            stopped, last = await asyncio.wait_for(there.cancel("s3", "key:a"), 10)
            assert not stopped  # it had ended by itself
            assert isinstance(last, Done) and last.outcome == "completed", last
        else:
            follower = await asyncio.wait_for(there.follow("s3", "key:a", -1, "sse"), 10)
            records = [record async for _, record in follower.records]
            assert records[0] == TextDelta(text="hi"), records
            assert isinstance(records[-1], Done), records
        # Another client's id, or one no replica has, is still unknown.
        with pytest.raises(StreamNotFoundError):
            await asyncio.wait_for(there.cancel("s3", "key:b"), 10)
        with pytest.raises(StreamNotFoundError):
            await asyncio.wait_for(there.cancel("s-none", "key:a"), 10)
    finally:
        await there.aclose()
        assert here.mirror is not None
        await here.mirror.aclose()


async def test_a_running_stream_just_opened_on_another_replica_is_followed_there(
    redis_server: RedisServer,
) -> None:
    """The same for a stream still running: the reader on the other replica gets what was
    written so far, then the rest as its replica writes it."""
    namespace = f"t{secrets.token_hex(4)}"
    here = Journal(ttl=5.0, mirror=RedisJournal(redis_server.url, namespace=namespace))
    there = Streams(Journal(ttl=5.0, mirror=RedisJournal(redis_server.url, namespace=namespace)))
    try:
        entry = here.open(head("s4"))
        entry.append(TextDelta(text="hi"))
        follower = await asyncio.wait_for(there.follow("s4", "key:a", -1, "sse"), 10)
        records = follower.records
        assert await asyncio.wait_for(anext(records), 10) == (0, TextDelta(text="hi"))
        usage = Usage(prompt_tokens=1, completion_tokens=1)
        entry.append(Done(reason="stop", usage=usage, outcome="completed", model="m"))
        seq, last = await asyncio.wait_for(anext(records), 10)
        assert seq == 1 and isinstance(last, Done), last
        await records.aclose()
    finally:
        await there.aclose()
        assert here.mirror is not None
        await here.mirror.aclose()
