"""Redis dies mid-stream and comes back (issue 17): the journal fails open, a resume elsewhere
says clearly that it cannot be served, and journalling recovers by itself.
"""

from __future__ import annotations

import asyncio
import time

import httpx2

from tests.fakeupstream import FakeUpstream
from tests.support.process import Served
from tests.support.redis import RedisServer
from tests.support.resumable import (
    TIMEOUT,
    Answer,
    Resumed,
    assert_ends_done,
    cancel,
    chat_body,
    config,
    deltas,
    error_events,
    metric,
    open_resume,
    open_stream,
    replicas,
    report,
    resume,
    scripted,
    send,
    ws_client,
    ws_records,
    ws_start_resumable,
)

K = 5


async def readiness(served: Served) -> str:
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        status: str = (await http.get(served.url + "/readyz")).json()["status"]
        return status


def unavailable(resumed: Resumed) -> None:
    assert resumed.status == 503, (resumed.status, resumed.events[:3])
    error = resumed.error
    assert error is not None and error.get("code") == "journal_unavailable", error
    assert "resum" in error["message"].lower(), error  # says that resuming is not possible


async def full_stream(served: Served, answer: Answer) -> str:
    """Read a resumable stream to its end; check it is whole; return its id."""
    async with open_stream(served.url, chat_body(answer)) as reader:
        assert reader.response.status_code == 200
        await reader.read_to_end()
    assert deltas(reader.events) == answer.records()
    assert_ends_done(reader.events, answer.terminal)
    return reader.stream_id


async def test_redis_killed_mid_stream_then_back(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    with replicas(config(upstream, fresh_redis)) as (one, two):
        answer = scripted(upstream, 60, pace=0.03)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
            fresh_redis.stop()
            killed = time.monotonic()
            await asyncio.wait_for(first.read_to_end(), 30)
        report(f"stream outlived Redis: finished {time.monotonic() - killed:.2f} s after the kill")
        # The client that stayed got everything, as if nothing had happened.
        assert deltas(first.events) == answer.records()
        assert_ends_done(first.events, answer.terminal)

        failures = await metric(one, "tokenrelay_journal_write_failures_total")
        report(f"journal write failures counted on the first replica: {failures:.0f}")
        assert failures > 0
        unavailable(await resume(two.url, first.stream_id, K - 1))
        # Nor can the other replica cancel it: it cannot tell, and says so.
        refused = await cancel(two.url, first.stream_id)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "journal_unavailable", refused.text
        own = await resume(one.url, first.stream_id, K - 1)
        report(f"while Redis is down, a resume on the first replica answers {own.status}")
        assert await readiness(one) == "degraded"
        # New resumable streams are still served while the journal cannot be written.
        during = await full_stream(one, scripted(upstream, 8, pace=0.005))

        fresh_redis.start()
        restarted = time.monotonic()
        deadline = restarted + 30
        answers: list[int] = []
        while True:
            answer = scripted(upstream, 8, pace=0.005)
            stream_id = await full_stream(one, answer)
            resumed = await resume(two.url, stream_id)
            answers.append(resumed.status)
            if resumed.status == 200:
                break
            # Not journalled yet: the first replica's writes are still backing off.
            assert resumed.status in (404, 503), (resumed.status, resumed.error)
            assert time.monotonic() < deadline, "journalling never recovered after Redis came back"
            await asyncio.sleep(0.25)
        report(
            f"Redis back: streams journal again {time.monotonic() - restarted:.2f} s after the "
            f"restart; the other replica answered {answers} to resumes of new streams meanwhile"
        )
        assert deltas(resumed.events) == answer.records()
        assert_ends_done(resumed.events, answer.terminal)

        # And a live stream dropped on one replica resumes on the other again.
        answer = scripted(upstream, 40, pace=0.03)
        async with open_stream(one.url, chat_body(answer)) as again:
            await again.read_deltas(K)
        resumed = await resume(two.url, again.stream_id, again.last_id)
        assert resumed.status == 200, resumed.error
        assert deltas(again.events) + deltas(resumed.events) == answer.records()
        assert_ends_done(resumed.events, answer.terminal)
        # The stream that ran while Redis was down exists: resuming it elsewhere is impossible,
        # and the answer says why (it is not "not found").
        unavailable(await resume(two.url, during))
        deadline = time.monotonic() + 30
        while (status := await readiness(one)) != "ready":
            assert time.monotonic() < deadline, f"readiness stayed {status}"
            await asyncio.sleep(0.25)


async def test_a_frozen_redis_never_leaves_a_silent_gap(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    with replicas(config(upstream, fresh_redis)) as (one, two):
        answer = scripted(upstream, 80, pace=0.03)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
            fresh_redis.pause()  # accepts connections, answers nothing: writes time out
            frozen = time.monotonic()
            reading = asyncio.create_task(first.read_to_end())
            try:
                await asyncio.sleep(2.0)
            finally:
                fresh_redis.resume()
            thawed = time.monotonic()
            await asyncio.wait_for(reading, 30)
        during = [t for t in first.times if frozen <= t <= thawed]
        gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
        report(
            f"Redis frozen 2 s: the client read {len(during)} events meanwhile, the longest pause "
            f"between two of them {1000 * max(gaps, default=0):.1f} ms (upstream pace 30 ms)"
        )
        assert deltas(first.events) == answer.records()
        assert_ends_done(first.events, answer.terminal)
        # The journal may have lost writes: then it says so; it never serves an answer with a hole.
        resumed = await resume(two.url, first.stream_id, K - 1)
        report(f"resume elsewhere after a 2 s Redis freeze mid-stream: {resumed.status}")
        if resumed.status == 200:
            assert deltas(resumed.events) == answer.records(K)
            assert_ends_done(resumed.events, answer.terminal)
        else:
            unavailable(resumed)


async def test_a_reader_cut_off_by_redis_resumes_where_it_really_was(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    with replicas(config(upstream, fresh_redis)) as (one, two):
        answer = scripted(upstream, 80, pace=0.03)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
        async with open_resume(two.url, first.stream_id, first.last_id) as follower:
            assert follower.response.status_code == 200
            await follower.read_deltas(K)  # following the live stream through Redis
            fresh_redis.stop()
            await asyncio.wait_for(follower.read_to_end(), 30)
        cut = follower.events
        assert not any(e.done for e in cut), cut[-3:]
        assert error_events(cut) == cut[-1:], cut[-3:]
        assert cut[-1].json()["error"]["code"] == "journal_unavailable", cut[-1]
        # What a browser's EventSource does next: reconnect with the last id it got, here to
        # the replica that has the stream in memory. Nothing may be skipped.
        resumed = await resume(one.url, first.stream_id, follower.last_id)
        assert resumed.status == 200, resumed.error
        assert deltas(first.events) + deltas(cut) + deltas(resumed.events) == answer.records()
        assert_ends_done(resumed.events, answer.terminal)


async def test_a_ws_reader_cut_off_by_redis_resumes_where_it_really_was(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    with replicas(config(upstream, fresh_redis)) as (one, two):
        answer = scripted(upstream, 80, pace=0.03)
        async with ws_client(one) as a:
            stream_id = (await ws_start_resumable(a, answer, "a1"))["stream_id"]
            await a.until_deltas("a1", K)
        async with ws_client(two) as b:
            await send(
                b.ws, {"type": "chat.resume", "id": "b1", "stream_id": stream_id, "after": K - 1}
            )
            await b.until_deltas("b1", K)
            fresh_redis.stop()
            cut = await b.until_terminal("b1", timeout=20)
        assert (cut["type"], cut["error"]["code"]) == ("chat.error", "journal_unavailable"), cut
        # The last seq this client has, as docs/websocket-protocol.md tells it to resume after.
        last = max(f["seq"] for f in a.by_id["a1"] + b.by_id["b1"] if "seq" in f)
        async with ws_client(one) as c:
            await send(
                c.ws, {"type": "chat.resume", "id": "c1", "stream_id": stream_id, "after": last}
            )
            done = await c.until_terminal("c1", timeout=20)
        got = ws_records(a.by_id["a1"]) + ws_records(b.by_id["b1"]) + ws_records(c.by_id["c1"])
        assert got == answer.records()
        assert (done["type"], done["seq"]) == ("chat.done", answer.terminal), done
