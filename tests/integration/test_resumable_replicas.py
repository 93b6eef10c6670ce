"""Resumable streams across two real gateway processes on one real redis-server (issue 17).

A client reads part of a stream on replica A, drops its connection, and resumes on replica B:
what it pieces together must be the whole answer, chunk-exact, with no gap and no duplicate,
ending exactly as the original would have.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.fakeupstream import FakeUpstream, Script
from tests.fakeupstream.formats import FakeToolCall
from tests.support.process import Served, serve_process
from tests.support.redis import RedisServer
from tests.support.resumable import (
    ENV,
    RESUMABLE,
    STREAM_ID,
    assert_ends_done,
    chat_body,
    config,
    deltas,
    error_events,
    finish_reasons,
    metric,
    open_resume,
    open_stream,
    replicas,
    report,
    resume,
    resume_status,
    scripted,
    send,
    ws_client,
    ws_records,
    ws_start_resumable,
)

K = 5  # deltas read before the client drops
RESUMES = "tokenrelay_stream_resumes_total"


@pytest.fixture(scope="module")
def pair(upstream: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Served, Served]]:
    with replicas(config(upstream, redis_server)) as both:
        yield both


async def wait_completed(upstream: FakeUpstream, name: str, timeout: float = 20) -> None:
    (recorded,) = upstream.by_model(name)
    deadline = time.monotonic() + timeout
    while not recorded.completed:
        assert time.monotonic() < deadline, "the upstream never finished the stream"
        await asyncio.sleep(0.01)


async def test_sse_dropped_on_one_replica_resumes_on_the_other(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 40, pace=0.03)
    async with open_stream(one.url, chat_body(answer)) as first:
        assert first.response.status_code == 200
        stream_id = first.stream_id
        assert STREAM_ID.match(stream_id), stream_id
        await first.read_deltas(K)
        dropped = await first.drop()
    seen = deltas(first.events)
    assert seen == answer.records(0, K), seen
    assert first.last_id == K - 1
    assert {e.json()["id"] for e in first.events if e.data.startswith("{")} == {stream_id}

    resumes = await metric(two, RESUMES, transport="sse", replica="other")
    started = time.monotonic()
    resumed = await resume(two.url, stream_id, first.last_id)
    report(f"sse resume on the other replica: attached {started - dropped:.3f} s after the drop")
    assert resumed.status == 200, resumed.error
    assert resumed.headers["x-tokenrelay-stream-id"] == stream_id
    assert resumed.headers["content-type"].startswith("text/event-stream")
    assert seen + deltas(resumed.events) == answer.records()
    assert_ends_done(resumed.events, answer.terminal)
    assert {e.json()["id"] for e in resumed.events if e.data.startswith("{")} == {stream_id}
    # One upstream request served both readers, and it ran to its end.
    assert answer.upstream_request(upstream).completed
    assert await metric(two, RESUMES, transport="sse", replica="other") == resumes + 1


async def test_ws_dropped_on_one_replica_resumes_on_the_other(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 40, pace=0.03)
    async with ws_client(one) as a:
        started = await ws_start_resumable(a, answer, "a1")
        stream_id = started["stream_id"]
        assert STREAM_ID.match(stream_id), started
        await a.until_deltas("a1", K)
    seen = ws_records(a.by_id["a1"])
    assert seen == answer.records(0, K), seen
    resumes = await metric(two, RESUMES, transport="ws", replica="other")
    async with ws_client(two) as b:
        await send(
            b.ws, {"type": "chat.resume", "id": "b1", "stream_id": stream_id, "after": K - 1}
        )
        done = await b.until_terminal("b1", timeout=20)
    frames = b.by_id["b1"]
    assert frames[0]["type"] == "chat.started", frames[0]
    assert frames[0]["stream_id"] == stream_id and frames[0].get("resumed") is True, frames[0]
    assert seen + ws_records(frames[1:]) == answer.records()
    assert done["type"] == "chat.done", done
    assert (done["finish_reason"], done["seq"]) == ("stop", answer.terminal), done
    assert done["usage"]["completion_tokens"] == len(answer.pieces), done
    assert answer.upstream_request(upstream).completed
    assert await metric(two, RESUMES, transport="ws", replica="other") == resumes + 1


async def test_resume_after_the_stream_ended(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 12, pace=0.02, prompt_tokens=7)
    body = chat_body(answer, stream_options={"include_usage": True})
    async with open_stream(one.url, body) as first:
        await first.read_deltas(K)
    await wait_completed(upstream, answer.name)
    by_header = await resume(two.url, first.stream_id, K - 1)
    by_query = await resume(two.url, first.stream_id, K - 1, query=True)
    from_start = await resume(two.url, first.stream_id)
    for resumed in (by_header, by_query, from_start):
        assert resumed.status == 200, resumed.error
        assert_ends_done(resumed.events, answer.terminal)
    assert deltas(first.events) + deltas(by_header.events) == answer.records()
    assert by_query.events == by_header.events
    # From the start: the role chunk first, then every record, as the original stream sent it.
    assert from_start.events[0].json()["choices"][0]["delta"]["role"] == "assistant"
    assert deltas(from_start.events) == answer.records()
    # The terminal record is replayed whole, the usage chunk included.
    usage = [e.json().get("usage") for e in by_header.events if e.data.startswith("{")]
    usage = [u for u in usage if u]
    assert usage == [{"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}], usage


async def test_several_readers_follow_one_stream(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 60, pace=0.03)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_deltas(K)
    after = first.last_id
    counts = [
        await metric(one, RESUMES, replica="same"),
        await metric(two, RESUMES, replica="other"),
    ]
    readers = await asyncio.gather(
        resume(two.url, first.stream_id, after),
        resume(two.url, first.stream_id, after),
        resume(one.url, first.stream_id, after),
    )
    report(
        "several readers: the upstream had sent "
        f"{answer.upstream_request(upstream).deltas_sent} of 60 deltas when they had all finished"
    )
    for resumed in readers:
        assert resumed.status == 200, resumed.error
        assert deltas(first.events) + deltas(resumed.events) == answer.records()
        assert_ends_done(resumed.events, answer.terminal)
    assert readers[0].events == readers[1].events == readers[2].events
    assert await metric(one, RESUMES, replica="same") == counts[0] + 1
    assert await metric(two, RESUMES, replica="other") == counts[1] + 2


async def test_a_resumed_stream_ends_with_the_originals_error(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 40, pace=0.03, error_after=20)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_deltas(K)
    resumed = await resume(two.url, first.stream_id, K - 1)
    assert resumed.status == 200, resumed.error
    assert deltas(first.events) + deltas(resumed.events) == answer.records(0, 20)
    assert not any(e.done for e in resumed.events), "a failed stream must not end in [DONE]"
    last = resumed.events[-1]
    assert error_events(resumed.events) == [last], resumed.events[-3:]
    assert last.id == 20, last
    # The same error a client reading the original to its end got.
    async with open_stream(one.url, chat_body(answer), resumable=False) as plain:
        original = error_events(await plain.read_to_end())
    assert [e.json()["error"]["code"] for e in original] == [last.json()["error"]["code"]]


async def test_the_openai_sdk_starts_a_stream_another_replica_finishes(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 30, pace=0.03)
    texts: list[str] = []
    stream_id = ""
    async with openai.AsyncOpenAI(base_url=one.url + "/api", api_key="unused", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model=answer.model,
            messages=[{"role": "user", "content": "tell me a story"}],
            stream=True,
            extra_headers=RESUMABLE,
        )
        async for chunk in stream:
            stream_id = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
            if len(texts) == K:
                break
        await stream.close()
    resumed = await resume(two.url, stream_id, len(texts) - 1)
    assert resumed.status == 200, resumed.error
    assert texts + [text for _, text in deltas(resumed.events)] == answer.pieces
    assert_ends_done(resumed.events, answer.terminal)


async def test_without_redis_a_stream_resumes_on_its_own_process(upstream: FakeUpstream) -> None:
    answer = scripted(upstream, 30, pace=0.03)
    with serve_process(config(upstream, None), env=ENV) as alone:
        async with open_stream(alone.url, chat_body(answer)) as first:
            await first.read_deltas(K)
        resumed = await resume(alone.url, first.stream_id, first.last_id)
    assert resumed.status == 200, resumed.error
    assert deltas(first.events) + deltas(resumed.events) == answer.records()
    assert_ends_done(resumed.events, answer.terminal)


async def test_a_replay_from_the_start_is_the_original_stream_byte_for_byte(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    """Reasoning, text, two tool calls and usage: a reader on the other replica following
    from the start gets exactly the events the first client got, ids included."""
    one, two = pair
    name = f"r-{uuid.uuid4().hex[:12]}"
    upstream.scripts[name] = Script(
        reasoning=["Let me ", "think. "],
        text=["Checking ", "both. "],
        tool_calls=[
            FakeToolCall(name="weather", arguments=['{"city": ', '"Paris"}'], id="call_1"),
            FakeToolCall(name="time", arguments=['{"tz": "CET"}'], id="call_2"),
        ],
        pace=0.05,
        prompt_tokens=12,
    )
    body = {
        "model": f"oai/{name}",
        "messages": [{"role": "user", "content": "weather and time in Paris?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in ("weather", "time")
        ],
    }
    async with open_stream(one.url, body) as first:
        await first.read_deltas(1)  # the stream is live and has an id
        original, replayed = await asyncio.gather(
            first.read_to_end(), resume(two.url, first.stream_id)
        )
    assert replayed.status == 200, replayed.error
    assert replayed.events == original
    assert original[-1].done and finish_reasons(original) == ["tool_calls"], original[-3:]


async def test_a_stream_started_over_sse_resumes_over_websocket_and_back(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 40, pace=0.03)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_deltas(K)
    async with ws_client(two) as b:
        frame = {"type": "chat.resume", "id": "b1", "stream_id": first.stream_id, "after": K - 1}
        await send(b.ws, frame)
        await b.until_deltas("b1", K)
    got = deltas(first.events) + ws_records(b.by_id["b1"])
    resumed = await resume(one.url, first.stream_id, got[-1][0])
    assert resumed.status == 200, resumed.error
    assert got + deltas(resumed.events) == answer.records()
    assert_ends_done(resumed.events, answer.terminal)


async def test_a_reader_of_a_crashed_replicas_stream_is_told_so(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """Replica A dies (SIGKILL) mid-stream: B's reader gets what A journalled, then a clear
    error within seconds (not keepalives until the idle limit), and a new resume is refused."""
    with replicas(config(upstream, redis_server)) as (one, two):
        answer = scripted(upstream, 400, pace=0.02)
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_deltas(K)
            stream_id = first.stream_id
        async with open_resume(two.url, stream_id, K - 1) as reader:
            await reader.read_deltas(3)
            one.proc.kill()
            killed = time.monotonic()
            events = await reader.read_to_end()
            waited = time.monotonic() - killed
        errors = error_events(events)
        assert errors and errors[-1].json()["error"]["code"] == "journal_unavailable"
        assert "stopped" in errors[-1].json()["error"]["message"]
        assert not any(e.done for e in events)
        status, error = await resume_status(two.url, stream_id, K - 1)
        assert status == 503 and error is not None and "stopped" in error["message"]
        report(f"reader told of the crash {waited:.2f} s after the kill")
