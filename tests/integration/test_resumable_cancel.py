"""Stop means stop, a drop means "hold on": cancels across replicas, the resume grace, and plain
streams that still stop their upstream on disconnect (issue 17).

The fake upstream records when the gateway closed its connection; the tests wait for that
(bounded) and report how long it took, without asserting a figure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx2
import openai
import pytest

from tests.fakeupstream import FakeUpstream
from tests.support.process import Served
from tests.support.redis import RedisServer
from tests.support.resumable import (
    TIMEOUT,
    assert_ends_done,
    cancel,
    chat_body,
    config,
    deltas,
    metric,
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
LONG = 400  # deltas of a stream that runs for ~8 s unless stopped


@pytest.fixture(scope="module")
def pair(upstream: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Served, Served]]:
    with replicas(config(upstream, redis_server)) as both:
        yield both


def check_cancellation(body: dict[str, object], stream_id: str, relayed: int) -> None:
    """The answer of a cancel call that stopped the stream, with the usage of what was relayed."""
    assert body["id"] == stream_id, body
    assert body["object"] == "chat.completion.cancellation", body
    assert (body["status"], body["finish_reason"]) == ("cancelled", "cancelled"), body
    usage = body["usage"]
    assert isinstance(usage, dict), body
    assert usage["completion_tokens"] == relayed, (usage, relayed)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage


async def test_a_cancel_on_the_other_replica_stops_the_upstream_at_once(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, LONG, pace=0.02)
    async with (
        httpx2.AsyncClient(timeout=TIMEOUT) as http,
        open_stream(one.url, chat_body(answer)) as first,
    ):
        await first.read_deltas(K)
        called = time.monotonic()
        response = await cancel(two.url, first.stream_id, http=http)
        answered = time.monotonic()
        recorded = answer.upstream_request(upstream)
        gone = await upstream.wait_disconnected(recorded, timeout=10)
        events = await asyncio.wait_for(first.read_to_end(), 20)
    report(
        f"cross-replica cancel (SSE, reader attached): upstream closed {1000 * (gone - called):.1f}"
        f" ms after the cancel call began; the call took {1000 * (answered - called):.1f} ms"
    )
    assert response.status_code == 200, response.text
    relayed = len(deltas(events))
    assert deltas(events) == answer.records(0, relayed)
    check_cancellation(response.json(), first.stream_id, relayed)
    assert recorded.deltas_sent < LONG
    # The reader on the first replica sees a normal end: finish_reason "cancelled", then [DONE].
    assert_ends_done(events, relayed, reason="cancelled")


async def test_a_dropped_stream_cancelled_elsewhere_ends_cancelled_for_a_resume(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, LONG, pace=0.02)
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
        called = time.monotonic()
        response = await cancel(two.url, first.stream_id, http=http)
    recorded = answer.upstream_request(upstream)
    gone = await upstream.wait_disconnected(recorded, timeout=10)
    report(
        f"cross-replica cancel (SSE, reader dropped): upstream closed "
        f"{1000 * (gone - called):.1f} ms after the cancel call began"
    )
    assert response.status_code == 200, response.text
    resumed = await resume(two.url, first.stream_id, K - 1)
    assert resumed.status == 200, resumed.error
    records = deltas(first.events) + deltas(resumed.events)
    assert records == answer.records(0, len(records))
    check_cancellation(response.json(), first.stream_id, len(records))
    assert_ends_done(resumed.events, len(records), reason="cancelled")
    # A second cancel finds the stream over and says how it ended.
    again = await cancel(one.url, first.stream_id)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "cancelled", again.json()


@pytest.mark.parametrize(("ending", "status"), [("finish", "completed"), ("error", "failed")])
async def test_a_cancel_after_the_end_reports_how_it_ended(
    pair: tuple[Served, Served], upstream: FakeUpstream, ending: str, status: str
) -> None:
    one, two = pair
    fields = {"error_after": 3} if ending == "error" else {}
    answer = scripted(upstream, 6, pace=0.0, prompt_tokens=9, **fields)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_to_end()
    response = await cancel(two.url, first.stream_id)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["status"]) == (first.stream_id, status), body
    if ending == "finish":
        assert body["finish_reason"] == "stop", body
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}


async def test_a_ws_cancel_of_a_resumed_stream_stops_the_upstream_on_the_other_replica(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, LONG, pace=0.02)
    async with ws_client(one) as a:
        stream_id = (await ws_start_resumable(a, answer, "a1"))["stream_id"]
        await a.until_deltas("a1", K)
    async with ws_client(two) as b:
        await send(b.ws, {"type": "chat.resume", "id": "b1", "stream_id": stream_id})
        await b.until_deltas("b1", K + 2)
        called = time.monotonic()
        await b.cancel("b1")
        recorded = answer.upstream_request(upstream)
        gone = await upstream.wait_disconnected(recorded, timeout=10)
        done = await b.until_terminal("b1", timeout=10)
    report(
        f"cross-replica cancel (WS chat.cancel on a resumed stream): upstream closed "
        f"{1000 * (gone - called):.1f} ms after the frame was sent"
    )
    assert done["type"] == "chat.done" and done["finish_reason"] == "cancelled", done
    records = ws_records(b.by_id["b1"])
    assert records == answer.records(0, len(records))  # from the start: `after` was left out
    assert done["seq"] == len(records) and done["usage"]["completion_tokens"] == len(records)
    assert recorded.deltas_sent < LONG


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_dropped_stream_nobody_resumes_is_abandoned_after_the_grace(
    upstream: FakeUpstream, fresh_redis: RedisServer, transport: str
) -> None:
    answer = scripted(upstream, LONG * 2, pace=0.02)
    grace = {"TOKENRELAY_STREAMS__RESUME_GRACE": "1"}
    with replicas(config(upstream, fresh_redis), env=grace) as (one, two):
        before = await metric(one, "tokenrelay_streams_abandoned_total")
        if transport == "sse":
            async with open_stream(one.url, chat_body(answer)) as first:
                await first.read_deltas(K)
                stream_id = first.stream_id
            dropped = time.monotonic()
        else:
            async with ws_client(one) as a:
                stream_id = (await ws_start_resumable(a, answer, "a1"))["stream_id"]
                await a.until_deltas("a1", K)
            dropped = time.monotonic()
        recorded = answer.upstream_request(upstream)
        gone = await upstream.wait_disconnected(recorded, timeout=20)
        report(
            f"resume grace 1 s ({transport}): upstream closed {gone - dropped:.3f} s after the "
            f"client dropped; it had sent {recorded.deltas_sent} deltas ({K} read)"
        )
        response = await cancel(two.url, stream_id)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "abandoned", response.json()
        after = await metric(one, "tokenrelay_streams_abandoned_total")
        assert after == before + 1, (before, after)
        # Read again, it ends as a stopped stream: the records relayed, then "cancelled".
        resumed = await resume(two.url, stream_id, K - 1)
        assert resumed.status == 200, resumed.error
        records = answer.records(0, K) + deltas(resumed.events)
        assert records == answer.records(0, len(records))
        assert_ends_done(resumed.events, len(records), reason="cancelled")


async def test_a_reader_on_the_other_replica_holds_the_stream_past_the_grace(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    grace = {"TOKENRELAY_STREAMS__RESUME_GRACE": "1"}
    with replicas(config(upstream, fresh_redis), env=grace) as (one, two):
        # Read on the other replica for ~3 s, three times the grace: the stream must go on.
        answer = scripted(upstream, 100, pace=0.03)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
        resumed = await resume(two.url, first.stream_id, first.last_id)
        assert resumed.status == 200, resumed.error
        assert deltas(first.events) + deltas(resumed.events) == answer.records()
        assert_ends_done(resumed.events, answer.terminal)
        # That reader leaving too starts the grace again: then the upstream is closed.
        answer = scripted(upstream, LONG, pace=0.02)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
        target = f"{two.url}/api/chat/completions/{first.stream_id}/stream"
        async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
            async with http.stream("GET", target, headers={"last-event-id": str(K - 1)}) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    break
            left = time.monotonic()
        recorded = answer.upstream_request(upstream)
        gone = await upstream.wait_disconnected(recorded, timeout=20)
        report(f"grace 1 s after the last remote reader left: upstream closed {gone - left:.3f} s")
        response = await cancel(two.url, first.stream_id)
        assert response.json()["status"] == "abandoned", response.json()


@pytest.mark.parametrize("header", [None, "false"])
async def test_a_plain_sse_stream_still_stops_its_upstream_on_disconnect(
    pair: tuple[Served, Served], upstream: FakeUpstream, header: str | None
) -> None:
    one, _ = pair
    answer = scripted(upstream, LONG, pace=0.02)
    extra = {} if header is None else {"x-tokenrelay-resumable": header}
    seen = 0
    async with openai.AsyncOpenAI(base_url=one.url + "/api", api_key="unused", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model=answer.model,
            messages=[{"role": "user", "content": "tell me a story"}],
            stream=True,
            extra_headers=extra,
        )
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == K:
                break
        dropped = time.monotonic()
        await stream.close()  # what breaking out of the loop in a `with` block does
    recorded = answer.upstream_request(upstream)
    gone = await upstream.wait_disconnected(recorded, timeout=5)
    report(f"plain SSE stream (header {header}): upstream closed {1000 * (gone - dropped):.1f} ms")
    assert recorded.deltas_sent < LONG


async def test_a_plain_ws_stream_still_stops_its_upstream_when_the_socket_closes(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, _ = pair
    answer = scripted(upstream, LONG, pace=0.02)
    async with ws_client(one) as a:
        sid = await a.start(answer.model)
        await a.until_deltas(sid, K)
        assert a.by_id[sid][0]["type"] == "chat.delta", "a plain stream gets no chat.started"
        dropped = time.monotonic()
        await a.ws.close()
    recorded = answer.upstream_request(upstream)
    gone = await upstream.wait_disconnected(recorded, timeout=5)
    report(f"plain WS stream: upstream closed {1000 * (gone - dropped):.1f} ms after the close")
    assert recorded.deltas_sent < LONG


async def test_a_stream_cancelled_elsewhere_before_its_first_token(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 10, pace=0.01, first_token_delay=30.0)
    async with ws_client(one) as a:
        stream_id = (await ws_start_resumable(a, answer, "a1"))["stream_id"]
    deadline = time.monotonic() + 10
    while not upstream.by_model(answer.name):  # the upstream request is under way
        assert time.monotonic() < deadline, "the stream never reached the upstream"
        await asyncio.sleep(0.01)
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        called = time.monotonic()
        response = await cancel(two.url, stream_id, http=http)
    recorded = answer.upstream_request(upstream)
    gone = await upstream.wait_disconnected(recorded, timeout=10)
    report(
        f"cancel elsewhere before the first token: upstream closed {1000 * (gone - called):.1f} ms"
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["finish_reason"]) == ("cancelled", "cancelled"), body
    assert body["usage"]["completion_tokens"] == 0, body
    resumed = await resume(two.url, stream_id)
    assert resumed.status == 200, resumed.error
    assert deltas(resumed.events) == []
    assert_ends_done(resumed.events, 0, reason="cancelled")
