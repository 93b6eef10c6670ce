"""Who may resume or cancel a stream, and what a resume that cannot be served answers (issue 17):
ownership by gateway key or client address, unknown ids, an `after` beyond the end, the
journal's bounds and expiry, and the opt-in header itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from server.auth import new_key
from tests.fakeupstream import FakeUpstream
from tests.support.process import Served, serve_process
from tests.support.redis import RedisServer
from tests.support.resumable import (
    ENV,
    RESUMABLE,
    TIMEOUT,
    Resumed,
    assert_ends_done,
    cancel,
    chat_body,
    config,
    deltas,
    error_of,
    open_stream,
    replicas,
    report,
    resume,
    resume_status,
    scripted,
    send,
    ws_client,
)

K = 5
KEY, OTHER = new_key(), new_key()


@pytest.fixture(scope="module")
def pair(upstream: FakeUpstream, redis_server: RedisServer) -> Iterator[tuple[Served, Served]]:
    with replicas(config(upstream, redis_server)) as both:
        yield both


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def unknown_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def not_found(error: dict[str, Any] | None, stream_id: str) -> dict[str, Any]:
    """A 404 stream_not_found body, with the id and request id taken out for comparing."""
    assert error is not None and error.get("code") == "stream_not_found", error
    return {
        **error,
        "message": error["message"].replace(stream_id, "<id>"),
        "request_id": None,
    }


async def refused(
    url: str, stream_id: str, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Resume and cancel both answer 404 stream_not_found; returns both errors, normalised."""
    resumed = await resume(url, stream_id, headers=headers)
    cancelled = await cancel(url, stream_id, headers=headers)
    assert (resumed.status, cancelled.status_code) == (404, 404), (resumed, cancelled.text)
    return [not_found(resumed.error, stream_id), not_found(error_of(cancelled), stream_id)]


async def test_another_key_gets_404_for_resume_and_cancel(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    answer = scripted(upstream, 60, pace=0.03)
    with replicas(config(upstream, fresh_redis, keys=(KEY, OTHER))) as (one, two):
        async with open_stream(one.url, chat_body(answer), bearer(KEY)) as first:
            assert first.response.status_code == 200
            await first.read_deltas(K)
        stream_id = first.stream_id
        theirs = await refused(two.url, stream_id, bearer(OTHER))
        # Exactly what an id that never existed gets: no hint that this one does.
        assert theirs == await refused(two.url, unknown_id(), bearer(KEY))
        async with ws_client(two, bearer(OTHER)) as b:
            await send(b.ws, {"type": "chat.resume", "id": "b1", "stream_id": stream_id})
            error = await b.until_terminal("b1")
        assert (error["type"], error["seq"]) == ("chat.error", 0), error
        assert error["error"]["code"] == "stream_not_found", error
        # The owner still gets the whole answer: the other key's cancel did nothing.
        mine = await resume(two.url, stream_id, first.last_id, headers=bearer(KEY))
    assert mine.status == 200, mine.error
    assert deltas(first.events) + deltas(mine.events) == answer.records()
    assert_ends_done(mine.events, answer.terminal)


async def test_without_keys_another_client_address_gets_404(
    upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # Behind a trusted proxy on loopback, the client address is the forwarded one.
    text = config(upstream, redis_server, server='forwarded_allow_ips = ["127.0.0.1"]\n')
    mine, theirs = {"x-forwarded-for": "203.0.113.7"}, {"x-forwarded-for": "203.0.113.8"}
    answer = scripted(upstream, 60, pace=0.03)
    with replicas(text) as (one, two):
        async with open_stream(one.url, chat_body(answer), mine) as first:
            assert first.response.status_code == 200
            await first.read_deltas(K)
        await refused(two.url, first.stream_id, theirs)
        resumed = await resume(two.url, first.stream_id, first.last_id, headers=mine)
    assert resumed.status == 200, resumed.error
    assert deltas(first.events) + deltas(resumed.events) == answer.records()
    assert_ends_done(resumed.events, answer.terminal)


async def test_unknown_ids_are_404(pair: tuple[Served, Served], upstream: FakeUpstream) -> None:
    one, two = pair
    answer = scripted(upstream, 3, pace=0.0)
    async with open_stream(one.url, chat_body(answer), resumable=False) as plain:
        await plain.read_to_end()
        plain_id = plain.events[0].json()["id"]
    # A stream that was not resumable has no journal: it is as unknown as one never started.
    for stream_id in (unknown_id(), "chatcmpl-nope", "x" * 200, plain_id):
        await refused(two.url, stream_id)
    async with ws_client(two) as b:
        await send(b.ws, {"type": "chat.resume", "id": "b1", "stream_id": unknown_id()})
        error = await b.until_terminal("b1")
    assert (error["type"], error["seq"]) == ("chat.error", 0), error
    assert error["error"]["code"] == "stream_not_found", error


async def test_a_resume_that_finds_nothing_does_not_hold_the_socket(
    pair: tuple[Served, Served],
) -> None:
    """A stream not in Redis yet may be one opened on the other replica a moment ago, so a
    resume looks for it once more before giving up; the socket's next frames do not wait."""
    _, two = pair
    async with ws_client(two) as b:
        await send(b.ws, {"type": "chat.resume", "id": "b1", "stream_id": unknown_id()})
        await send(b.ws, {"type": "ping"})
        first = await b.next()
        error = await b.until_terminal("b1")
    assert first["type"] == "pong", first
    assert (error["type"], error["seq"]) == ("chat.error", 0), error
    assert error["error"]["code"] == "stream_not_found", error


def bad_after(resumed: Resumed, param: str = "after") -> None:
    assert resumed.status == 400, (resumed.status, resumed.events[:3])
    error = resumed.error
    assert error is not None and error.get("param") == param, error
    assert error.get("code") == "invalid_request", error


async def test_a_resume_after_the_end_or_not_a_number_is_400(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 8, pace=0.0)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_to_end()
    assert first.last_id == answer.terminal
    bad_after(await resume(two.url, first.stream_id, answer.terminal + 1))
    bad_after(await resume(two.url, first.stream_id, answer.terminal + 50, query=True))
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        target = f"{two.url}/api/chat/completions/{first.stream_id}/stream"
        # A malformed value is refused naming where it came from: the header, or `after`.
        for params, headers, param in (
            ({}, {"last-event-id": "seven"}, "Last-Event-ID"),
            ({}, {"last-event-id": "1.5"}, "Last-Event-ID"),
            ({"after": "seven"}, {}, "after"),
        ):
            response = await http.get(target, params=params, headers=headers)
            found = Resumed(response.status_code, response.headers, [], error_of(response))
            bad_after(found, param)
    async with ws_client(two) as b:
        frame = {"type": "chat.resume", "id": "b1", "stream_id": first.stream_id, "after": 99}
        await send(b.ws, frame)
        error = await b.until_terminal("b1")
    assert (error["type"], error["error"]["code"]) == ("chat.error", "invalid_request"), error
    assert error["error"]["param"] == "after", error


async def test_a_resume_after_the_live_end_is_400_on_every_replica(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, two = pair
    answer = scripted(upstream, 400, pace=0.02)
    async with open_stream(one.url, chat_body(answer)) as first:
        await first.read_deltas(K)
    # Seconds ahead of the live stream: no client can have seen that event.
    ahead = K + 100
    assert answer.upstream_request(upstream).deltas_sent < ahead
    found = {"own": await resume_status(one.url, first.stream_id, ahead)}
    found["other"] = await resume_status(two.url, first.stream_id, ahead)
    await cancel(one.url, first.stream_id)
    for where, (status, error) in found.items():
        assert status == 400, (where, found)
        assert error is not None and error["param"] == "after", (where, error)


@pytest.mark.parametrize(
    ("bound", "value"), [("JOURNAL_MAX_EVENTS", "10"), ("JOURNAL_MAX_BYTES", "4096")]
)
@pytest.mark.parametrize("shared", [True, False], ids=["redis", "memory"])
async def test_the_journal_keeps_only_the_recent_events(
    upstream: FakeUpstream, redis_server: RedisServer, bound: str, value: str, shared: bool
) -> None:
    answer = scripted(upstream, 150, pace=0.002)
    env = {**ENV, f"TOKENRELAY_STREAMS__{bound}": value}
    text = config(upstream, redis_server if shared else None)
    with (
        serve_process(text, env=env) as one,
        serve_process(text, env=env) if shared else contextlib.nullcontext(one) as two,
    ):
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_to_end()
        assert_ends_done(first.events, answer.terminal)
        for after in (None, 0, 40):
            gone = await resume(two.url, first.stream_id, after)
            assert gone.status == 410, (after, gone.status, gone.events[:3])
            assert gone.error is not None and gone.error["code"] == "journal_truncated", gone.error
        recent = await resume(two.url, first.stream_id, answer.terminal - 4)
    assert recent.status == 200, recent.error
    assert deltas(recent.events) == answer.records(answer.terminal - 3)
    assert_ends_done(recent.events, answer.terminal)


async def test_an_ended_stream_is_forgotten_after_the_journal_ttl(
    upstream: FakeUpstream, fresh_redis: RedisServer
) -> None:
    answer = scripted(upstream, 6, pace=0.0)
    ttl = {"TOKENRELAY_STREAMS__JOURNAL_TTL": "2"}
    with replicas(config(upstream, fresh_redis), env=ttl) as (one, two):
        async with open_stream(one.url, chat_body(answer)) as first:
            await first.read_to_end()
        ended = time.monotonic()
        deadline = ended + 30
        while (resumed := await resume(two.url, first.stream_id)).status == 200:
            assert_ends_done(resumed.events, answer.terminal)
            assert time.monotonic() < deadline, "the journal of an ended stream never expired"
            await asyncio.sleep(0.2)
        report(f"journal_ttl 2 s: the ended stream was forgotten {time.monotonic() - ended:.2f} s")
        not_found(resumed.error, first.stream_id)
        assert resumed.status == 404


async def test_the_resumable_header_is_validated(
    pair: tuple[Served, Served], upstream: FakeUpstream
) -> None:
    one, _ = pair
    answer = scripted(upstream, 3, pace=0.0)
    url = one.url + "/api/chat/completions"
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        cases = [
            ({**chat_body(answer), "stream": False}, RESUMABLE),
            (chat_body(answer), {"x-tokenrelay-resumable": "maybe"}),
        ]
        for body, headers in cases:
            response = await http.post(url, json=body, headers=headers)
            error = error_of(response)
            assert response.status_code == 400, response.text
            assert error is not None and error["code"] == "invalid_request", error
            assert error["param"] == "X-Tokenrelay-Resumable", error
