"""Resumable streams on one gateway (the in-memory journal): SSE and WebSocket, drop and
resume, explicit cancel, abandonment after the grace time, ownership and bad resumes.

Across replicas (the Redis journal) see `test_resumable_replicas.py`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets

from server.app import create_app
from server.auth import digest
from server.settings import AuthSettings, Settings, StreamSettings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread

KEY_A, KEY_B = "tr-resume-key-a-0123456789", "tr-resume-key-b-0123456789"
RESUMABLE = {"X-Tokenrelay-Resumable": "true"}
Event = tuple[int | None, str]


def run_gateway(upstream: FakeUpstream, keys: list[str] | None = None, **streams: Any) -> Any:
    settings = Settings(
        providers=provider_settings(upstream),
        streams=StreamSettings(**streams),
        auth=AuthSettings(keys=[digest(k) for k in keys or []]),
    )
    return serve_in_thread(create_app(settings, ENVIRON), options=uvicorn_options(settings))


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    with run_gateway(upstream, resume_grace=1.0) as url:
        yield url


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": f"oai/{model}",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        **extra,
    }


def answer(tokens: int) -> str:
    return "".join(f"tok{i} " for i in range(tokens))


def parse_sse(raw: str) -> list[Event]:
    """(id, data) of each event (id None when it has none); comments are skipped."""
    events: list[Event] = []
    for block in raw.split("\n\n"):
        ident: int | None = None
        data = None
        for line in block.split("\n"):
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            events.append((ident, data))
    return events


def text_of(events: list[Event]) -> str:
    out = []
    for _, data in events:
        if data != "[DONE]":
            for choice in json.loads(data).get("choices", []):
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def ids_of(events: list[Event]) -> list[int]:
    return [i for i, _ in events if i is not None]


class Reader:
    """Reads an SSE response bit by bit: up to a number of events, then the rest."""

    def __init__(self, response: httpx.Response) -> None:
        self._pieces = response.aiter_text()
        self.buffer = ""

    async def until(self, count: int, with_ids: bool = True) -> list[Event]:
        """Events until `count` of them (with an id, unless told otherwise) arrived."""
        async for piece in self._pieces:
            self.buffer += piece
            events = parse_sse(self.buffer.rpartition("\n\n")[0])
            if len(ids_of(events) if with_ids else events) >= count:
                return events
        return parse_sse(self.buffer)

    async def rest(self) -> list[Event]:
        async for piece in self._pieces:
            self.buffer += piece
        return parse_sse(self.buffer)


async def read_until(response: httpx.Response, count: int) -> list[Event]:
    return await Reader(response).until(count)


async def start_and_drop(
    client: httpx.AsyncClient, name: str, count: int
) -> tuple[str, list[Event]]:
    """Start a resumable stream, read `count` events, drop the connection."""
    async with client.stream(
        "POST", "/api/chat/completions", json=chat(name), headers=RESUMABLE
    ) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-tokenrelay-stream-id"]
        events = await read_until(response, count)
    return stream_id, events


async def test_sse_resume_after_a_drop_is_chunk_exact(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=40, pace=0.01)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        stream_id, first = await start_and_drop(client, name, 5)
        assert stream_id.startswith("chatcmpl-") and len(stream_id) == len("chatcmpl-") + 32
        assert all(json.loads(d)["id"] == stream_id for _, d in first)
        last = ids_of(first)[-1]
        resumed = await client.get(
            f"/api/chat/completions/{stream_id}/stream", headers={"Last-Event-ID": str(last)}
        )
    assert resumed.status_code == 200, resumed.text
    assert resumed.headers["x-tokenrelay-stream-id"] == stream_id
    rest = parse_sse(resumed.text)
    assert ids_of(first) + ids_of(rest) == list(range(41))  # 40 deltas and the end
    assert rest[-1][1] == "[DONE]"
    assert text_of(first) + text_of(rest) == answer(40)
    assert all(json.loads(d)["choices"][0]["delta"].get("role") is None for _, d in rest[:-1])
    # The drop did not stop the upstream: it answered to the end.
    (request,) = upstream.by_model(name)
    assert request.disconnected_at is None


async def test_a_plain_stream_still_stops_its_upstream_on_disconnect(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=200, pace=0.02)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        async with client.stream("POST", "/api/chat/completions", json=chat(name)) as response:
            events = await Reader(response).until(3, with_ids=False)
            assert ids_of(events) == []  # no ids on a stream that is not resumable
    (request,) = upstream.by_model(name)
    await upstream.wait_disconnected(request, 5.0)


async def test_resume_from_the_start_and_after_the_end_and_two_readers(
    gateway: str, model: Callable[..., str]
) -> None:
    name = model(tokens=30, pace=0.02)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        stream_id, first = await start_and_drop(client, name, 2)
        url = f"/api/chat/completions/{stream_id}/stream"
        one, two = await asyncio.gather(
            client.get(url, params={"after": "1"}), client.get(url, headers={"Last-Event-ID": "1"})
        )
        assert one.text == two.text
        # Ended: still readable from the start, the role chunk first, ending as it did.
        whole = await client.get(url)
        events = parse_sse(whole.text)
        assert json.loads(events[0][1])["choices"][0]["delta"]["role"] == "assistant"
        assert text_of(events) == answer(30)
        assert ids_of(events) == list(range(31)) and events[-1][1] == "[DONE]"
        # After the last event: nothing more to send.
        empty = await client.get(url, headers={"Last-Event-ID": "30"})
        assert empty.status_code == 200 and parse_sse(empty.text) == []
        beyond = await client.get(url, headers={"Last-Event-ID": "31"})
        assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "after"
        bad = await client.get(url, headers={"Last-Event-ID": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        unknown = await client.get("/api/chat/completions/chatcmpl-" + "0" * 32 + "/stream")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "stream_not_found"


async def test_explicit_cancel_stops_at_once_and_answers_usage(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=500, pace=0.02)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        async with client.stream(
            "POST", "/api/chat/completions", json=chat(name), headers=RESUMABLE
        ) as response:
            stream_id = response.headers["x-tokenrelay-stream-id"]
            reader = Reader(response)
            await reader.until(3)
            stop = await client.post(f"/api/chat/completions/{stream_id}/cancel")
            tail = await reader.rest()
        assert stop.status_code == 200, stop.text
        result = stop.json()
        assert result["id"] == stream_id and result["status"] == "cancelled"
        assert result["finish_reason"] == "cancelled"
        assert result["usage"]["completion_tokens"] >= 3
        (request,) = upstream.by_model(name)
        await upstream.wait_disconnected(request, 2.0)
        # The client that was attached got the end: finish_reason cancelled, then [DONE].
        assert tail[-1][1] == "[DONE]"
        assert json.loads(tail[-2][1])["choices"][0]["finish_reason"] == "cancelled"
        again = await client.post(f"/api/chat/completions/{stream_id}/cancel")
        assert again.json()["status"] == "cancelled"  # it had ended that way already


async def test_a_dropped_stream_nobody_resumes_is_abandoned(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=500, pace=0.02)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        stream_id, _ = await start_and_drop(client, name, 2)
        (request,) = upstream.by_model(name)
        assert request.disconnected_at is None
        await upstream.wait_disconnected(request, 5.0)  # resume_grace is 1 s here
        whole = await client.get(f"/api/chat/completions/{stream_id}/stream")
        events = parse_sse(whole.text)
        assert json.loads(events[-2][1])["choices"][0]["finish_reason"] == "cancelled"
        stopped = await client.post(f"/api/chat/completions/{stream_id}/cancel")
        assert stopped.json()["status"] == "abandoned"


async def test_a_reader_keeps_a_dropped_stream_alive(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=150, pace=0.02)  # 3 s: longer than the 1 s grace
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        stream_id, first = await start_and_drop(client, name, 2)
        resumed = await client.get(
            f"/api/chat/completions/{stream_id}/stream", headers={"Last-Event-ID": "1"}
        )
    assert text_of(first) + text_of(parse_sse(resumed.text)) == answer(150)
    (request,) = upstream.by_model(name)
    assert request.disconnected_at is None


async def test_a_failure_mid_stream_replays_as_the_same_error_event(
    gateway: str, model: Callable[..., str]
) -> None:
    name = model(tokens=20, pace=0.01, error_after=4)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        async with client.stream(
            "POST", "/api/chat/completions", json=chat(name), headers=RESUMABLE
        ) as response:
            stream_id = response.headers["x-tokenrelay-stream-id"]
            original = (await response.aread()).decode()
        replay = await client.get(f"/api/chat/completions/{stream_id}/stream")
    assert parse_sse(replay.text) == parse_sse(original)
    last = parse_sse(original)[-1]
    assert last[0] == 4 and "error" in json.loads(last[1])


async def test_the_header_is_refused_where_it_cannot_apply(
    gateway: str, model: Callable[..., str]
) -> None:
    name = model(tokens=2)
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        plain = await client.post(
            "/api/chat/completions", json=chat(name, stream=False), headers=RESUMABLE
        )
        odd = await client.post(
            "/api/chat/completions", json=chat(name), headers={"X-Tokenrelay-Resumable": "maybe"}
        )
    for response in (plain, odd):
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "X-Tokenrelay-Resumable"


async def test_only_the_key_that_started_a_stream_may_read_or_stop_it(
    upstream: FakeUpstream, model: Callable[..., str]
) -> None:
    name = model(tokens=100, pace=0.02)
    with run_gateway(upstream, keys=[KEY_A, KEY_B]) as url:
        a = {"Authorization": f"Bearer {KEY_A}"}
        b = {"Authorization": f"Bearer {KEY_B}"}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream(
                "POST", "/api/chat/completions", json=chat(name), headers={**RESUMABLE, **a}
            ) as response:
                stream_id = response.headers["x-tokenrelay-stream-id"]
                await read_until(response, 2)
                unknown = "chatcmpl-" + "f" * 32
                for path in (stream_id, unknown):
                    read = await client.get(f"/api/chat/completions/{path}/stream", headers=b)
                    stop = await client.post(f"/api/chat/completions/{path}/cancel", headers=b)
                    assert read.status_code == stop.status_code == 404
                    assert read.json()["error"]["code"] == "stream_not_found"
                    # The same words whether or not it exists, but for the id itself.
                    assert read.json()["error"]["message"].replace(path, "X") == (
                        "No resumable stream 'X' for this client."
                    )
                own = await client.post(f"/api/chat/completions/{stream_id}/cancel", headers=a)
                assert own.json()["status"] == "cancelled"


async def test_journal_bounds_truncate_the_oldest_events(
    upstream: FakeUpstream, model: Callable[..., str]
) -> None:
    name = model(tokens=30, pace=0.005)
    with run_gateway(upstream, journal_max_events=10) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            async with client.stream(
                "POST", "/api/chat/completions", json=chat(name), headers=RESUMABLE
            ) as response:
                stream_id = response.headers["x-tokenrelay-stream-id"]
                await response.aread()
            url_ = f"/api/chat/completions/{stream_id}/stream"
            gone = await client.get(url_)
            assert gone.status_code == 410
            assert gone.json()["error"]["code"] == "journal_truncated"
            recent = await client.get(url_, headers={"Last-Event-ID": "25"})
            assert recent.status_code == 200
            assert text_of(parse_sse(recent.text)) == "tok26 tok27 tok28 tok29 "


async def ws_frames(ws: Any, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        frames.append(frame)
        if until(frame):
            return frames


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/api/ws"


async def test_websocket_resume_on_another_socket(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=40, pace=0.01)
    request = chat(name)
    async with websockets.connect(ws_url(gateway)) as ws:
        await ws.send(
            json.dumps({"type": "chat.start", "id": "a", "request": request, "resumable": True})
        )
        started = json.loads(await ws.recv())
        assert started["type"] == "chat.started" and started["id"] == "a"
        stream_id = started["stream_id"]
        first = await ws_frames(ws, lambda f: f.get("seq") == 4)
    async with websockets.connect(ws_url(gateway)) as ws:
        resume = {"type": "chat.resume", "id": "b", "stream_id": stream_id, "after": 4}
        await ws.send(json.dumps(resume))
        rest = await ws_frames(ws, lambda f: f["type"] in ("chat.done", "chat.error"))
    assert rest[0] == {"type": "chat.started", "id": "b", "stream_id": stream_id, "resumed": True}
    frames = first + rest[1:]
    assert [f["seq"] for f in frames] == list(range(41))
    assert all(f["id"] == "b" for f in rest[1:])
    text = "".join(f.get("text", "") for f in frames if f["type"] == "chat.delta")
    assert text == answer(40)
    assert frames[-1]["type"] == "chat.done" and frames[-1]["finish_reason"] == "stop"
    (upstream_request,) = upstream.by_model(name)
    assert upstream_request.disconnected_at is None


async def test_websocket_cancel_through_a_reader_stops_the_stream(
    gateway: str, model: Callable[..., str], upstream: FakeUpstream
) -> None:
    name = model(tokens=500, pace=0.02)
    async with websockets.connect(ws_url(gateway)) as ws:
        start = {"type": "chat.start", "id": "a", "request": chat(name), "resumable": True}
        await ws.send(json.dumps(start))
        stream_id = json.loads(await ws.recv())["stream_id"]
        await ws_frames(ws, lambda f: f.get("seq") == 1)
    async with websockets.connect(ws_url(gateway)) as ws:
        for frame in (
            {"type": "chat.resume", "id": "r", "stream_id": stream_id, "after": 1},
            {"type": "chat.resume", "id": "x", "stream_id": "chatcmpl-" + "0" * 32},
        ):
            await ws.send(json.dumps(frame))
        frames = await ws_frames(ws, lambda f: f.get("id") == "r" and f.get("seq") == 3)
        await ws.send(json.dumps({"type": "chat.cancel", "id": "r"}))
        frames += await ws_frames(ws, lambda f: f["type"] == "chat.done")
    errors = [f for f in frames if f["type"] == "chat.error"]
    assert errors and errors[0]["id"] == "x" and errors[0]["error"]["code"] == "stream_not_found"
    assert frames[-1]["id"] == "r" and frames[-1]["finish_reason"] == "cancelled"
    (request,) = upstream.by_model(name)
    await upstream.wait_disconnected(request, 2.0)
