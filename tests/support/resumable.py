"""Resumable streams under test: gateway processes sharing a Redis, SSE events with their ids.

The tests read what the spec of issue 17 promises: a resumable SSE stream numbers its records
(`id: <seq>` on the last event of each record: the delta chunk, or `[DONE]` / the error event
of the terminal record); a resume replays every record after `Last-Event-ID` and follows the
live stream to its end. Every read here is bounded; times are reported, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
from websockets.asyncio.client import ClientConnection, connect

from server.auth import digest
from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.fakeupstream.server import RecordedRequest
from tests.support.process import Served, serve_process
from tests.support.redis import RedisServer
from tests.support.wsclient import Frame, StreamClient

STREAM_ID = re.compile(r"^chatcmpl-[0-9a-f]{32}$")
RESUMABLE = {"x-tokenrelay-resumable": "true"}
ENV = {"UPSTREAM_KEY": UPSTREAM_KEY}
TIMEOUT = httpx2.Timeout(20.0)  # any single read; whole reads are bounded by the callers
SUBPROTOCOL = "tokenrelay.v1"


def config(
    upstream: FakeUpstream,
    redis: RedisServer | None,
    *,
    keys: tuple[str, ...] = (),
    server: str = "",
) -> str:
    """TOML for a gateway on the fake upstream, with Redis (its own namespace) when given."""
    text = f'demo = false\n[server]\nlog_level = "warning"\n{server}'
    if keys:
        text += "[auth]\nkeys = [" + ", ".join(f'"{digest(k)}"' for k in keys) + "]\n"
    if redis is not None:
        text += f'[cache]\nurl = "{redis.url}"\nnamespace = "{uuid.uuid4().hex}"\ntimeout = 1.0\n'
    return text + (
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nidle_timeout = 60.0\nretries = 0\n'
    )


@contextlib.contextmanager
def replicas(text: str, env: Mapping[str, str] | None = None) -> Iterator[tuple[Served, Served]]:
    """Two gateway processes with the same settings (environment: `TOKENRELAY_STREAMS__…`)."""
    full = {**ENV, **(env or {})}
    with serve_process(text, env=full) as one, serve_process(text, env=full) as two:
        yield one, two


@dataclass(frozen=True)
class Answer:
    """A scripted upstream model (`oai/…`) and the pieces its streams send, one per delta."""

    model: str
    name: str
    pieces: list[str]

    def records(self, start: int = 0, end: int | None = None) -> list[tuple[int, str]]:
        """The (seq, text) of the delta records start..end-1, as every reader must see them."""
        stop = len(self.pieces) if end is None else end
        return [(i, self.pieces[i]) for i in range(start, stop)]

    @property
    def terminal(self) -> int:
        """The seq of the terminal record of a stream that runs to its finish."""
        return len(self.pieces)

    def upstream_request(self, upstream: FakeUpstream) -> RecordedRequest:
        (recorded,) = upstream.by_model(self.name)
        return recorded


def scripted(upstream: FakeUpstream, count: int, pace: float, **fields: Any) -> Answer:
    """A fresh model answering `count` distinct pieces, `pace` seconds apart."""
    name = f"r-{uuid.uuid4().hex[:12]}"
    pieces = [f"{name[2:6]}-{i:03d} " for i in range(count)]
    upstream.scripts[name] = Script(text=pieces, pace=pace, **fields)
    return Answer(f"oai/{name}", name, pieces)


def chat_body(answer: Answer, **extra: Any) -> dict[str, Any]:
    return {
        "model": answer.model,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "stream": True,
        **extra,
    }


@dataclass(frozen=True)
class Event:
    """One SSE event: its data lines joined, and its `id:` (None when it has none)."""

    data: str
    id: int | None

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> Any:
        return json.loads(self.data)


def delta_text(event: Event) -> str | None:
    """The content of a chunk event (None for the role chunk's absent content and non-chunks)."""
    if event.done or not event.data.startswith("{"):
        return None
    choices = event.json().get("choices") or []
    return choices[0].get("delta", {}).get("content") if choices else None


def deltas(events: list[Event]) -> list[tuple[int | None, str]]:
    """(seq, text) of every event carrying content, in order: what a client pieces together."""
    return [(e.id, text) for e in events if (text := delta_text(e))]


def finish_reasons(events: list[Event]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for e in events
        if not e.done and e.data.startswith("{")
        for c in [e.json()]
        if c.get("choices") and c["choices"][0].get("finish_reason")
    ]


def error_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e.data.startswith('{"error"')]


async def sse_events(response: httpx2.Response) -> AsyncIterator[Event]:
    """Parse `response` into events; comments (keepalives) are skipped."""
    data: list[str] = []
    event_id: int | None = None
    seen_id = False
    async for line in response.aiter_lines():
        if not line:
            if data or seen_id:
                yield Event("\n".join(data), event_id)
            data, event_id, seen_id = [], None, False
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "id":
                event_id, seen_id = int(value), True
    if data or seen_id:
        yield Event("\n".join(data), event_id)


@dataclass
class Reader:
    """An SSE response being read by a client of its own, so `drop()` really closes its socket."""

    http: httpx2.AsyncClient
    response: httpx2.Response
    events: list[Event] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each event was read
    ended: bool = False
    dropped_at: float | None = None

    def __post_init__(self) -> None:
        self._iter = sse_events(self.response)

    @property
    def stream_id(self) -> str:
        return self.response.headers.get("x-tokenrelay-stream-id", "")

    @property
    def last_id(self) -> int | None:
        ids = [e.id for e in self.events if e.id is not None]
        return ids[-1] if ids else None

    async def next(self) -> Event | None:
        try:
            event = await anext(self._iter)
        except StopAsyncIteration:
            self.ended = True
            return None
        self.events.append(event)
        self.times.append(time.monotonic())
        return event

    async def read_deltas(self, count: int) -> None:
        """Read until `count` numbered deltas have come (fails if the stream ends first)."""
        while sum(1 for seq, _ in deltas(self.events) if seq is not None) < count:
            assert await self.next() is not None, f"ended early: {self.events}"

    async def read_to_end(self) -> list[Event]:
        while await self.next() is not None:
            pass
        return self.events

    async def drop(self) -> float:
        """Close the connection (the client vanishes); returns the time it did."""
        if self.dropped_at is None:
            self.dropped_at = time.monotonic()
            await self._iter.aclose()
            await self.response.aclose()
            await self.http.aclose()
        return self.dropped_at


@contextlib.asynccontextmanager
async def open_stream(
    url: str,
    body: dict[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    resumable: bool = True,
) -> AsyncIterator[Reader]:
    """POST a streamed chat completion; yields a Reader (status not checked) and drops it after."""
    sent = {**(RESUMABLE if resumable else {}), **(headers or {})}
    async with _reading("POST", url + "/api/chat/completions", sent, body) as reader:
        yield reader


@contextlib.asynccontextmanager
async def open_resume(
    url: str, stream_id: str, after: int | None = None, headers: Mapping[str, str] | None = None
) -> AsyncIterator[Reader]:
    """A resume read step by step (see `resume` for one read to the end)."""
    target, sent = resume_request(url, stream_id, after, False, headers)
    async with _reading("GET", target, sent, None) as reader:
        yield reader


@contextlib.asynccontextmanager
async def _reading(
    method: str, target: str, headers: dict[str, str], body: dict[str, Any] | None
) -> AsyncIterator[Reader]:
    http = httpx2.AsyncClient(timeout=TIMEOUT)
    try:
        request = http.build_request(method, target, json=body, headers=headers)
        response = await http.send(request, stream=True)
        reader = Reader(http, response)
        try:
            yield reader
        finally:
            await reader.drop()
    finally:
        await http.aclose()


@dataclass
class Resumed:
    """The answer to a resume: status and headers, then the events (200) or the error (else)."""

    status: int
    headers: httpx2.Headers
    events: list[Event]
    error: dict[str, Any] | None


def resume_request(
    url: str, stream_id: str, after: int | None, query: bool, headers: Mapping[str, str] | None
) -> tuple[str, dict[str, str]]:
    target = f"{url}/api/chat/completions/{stream_id}/stream"
    sent = dict(headers or {})
    if after is not None:
        if query:
            target += f"?after={after}"
        else:
            sent["last-event-id"] = str(after)
    return target, sent


async def resume(
    url: str,
    stream_id: str,
    after: int | None = None,
    *,
    query: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Resumed:
    """GET the stream's events after `after` (Last-Event-ID, or ?after= with `query`) to its end."""
    target, sent = resume_request(url, stream_id, after, query, headers)
    async with (
        httpx2.AsyncClient(timeout=TIMEOUT) as http,
        http.stream("GET", target, headers=sent) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            return Resumed(response.status_code, response.headers, [], error_of(response))
        events = [event async for event in sse_events(response)]
        return Resumed(200, response.headers, events, None)


async def resume_status(
    url: str, stream_id: str, after: int | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any] | None]:
    """The status (and error) a resume answers with, without reading a stream's body."""
    target, sent = resume_request(url, stream_id, after, False, headers)
    async with (
        httpx2.AsyncClient(timeout=TIMEOUT) as http,
        http.stream("GET", target, headers=sent) as response,
    ):
        if response.status_code == 200:
            return 200, None
        await response.aread()
        return response.status_code, error_of(response)


async def cancel(
    url: str,
    stream_id: str,
    headers: Mapping[str, str] | None = None,
    *,
    http: httpx2.AsyncClient | None = None,
) -> httpx2.Response:
    """POST …/cancel; pass a client made beforehand when timing it (making one costs ~50 ms)."""
    target = f"{url}/api/chat/completions/{stream_id}/cancel"
    if http is not None:
        return await http.post(target, headers=dict(headers or {}))
    async with httpx2.AsyncClient(timeout=TIMEOUT) as own:
        return await own.post(target, headers=dict(headers or {}))


def error_of(response: httpx2.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def assert_ends_done(events: list[Event], terminal: int, reason: str = "stop") -> None:
    """The stream ended as a completed one does: finish `reason`, then `[DONE]` with its seq."""
    assert events, "no events at all"
    assert events[-1].done, f"the last event is not [DONE]: {events[-3:]}"
    assert events[-1].id == terminal, f"[DONE] carries id {events[-1].id}, not {terminal}"
    assert finish_reasons(events) == [reason], finish_reasons(events)
    assert not error_events(events), error_events(events)


def ws_url(served: Served) -> str:
    return served.url.replace("http://", "ws://") + "/api/ws"


@contextlib.asynccontextmanager
async def ws_client(
    served: Served, headers: Mapping[str, str] | None = None
) -> AsyncIterator[StreamClient]:
    async with connect(
        ws_url(served),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        additional_headers=dict(headers or {}),
        open_timeout=10,
        close_timeout=5,
    ) as ws:
        yield StreamClient(ws)


async def ws_start_resumable(client: StreamClient, answer: Answer, sid: str = "a1") -> Frame:
    """Send a resumable chat.start; returns its chat.started frame."""
    request = {"model": answer.model, "messages": [{"role": "user", "content": "tell me"}]}
    await send(client.ws, {"type": "chat.start", "id": sid, "request": request, "resumable": True})
    frame = await client.next()
    assert frame["type"] == "chat.started" and frame["id"] == sid, frame
    return frame


async def send(ws: ClientConnection, frame: Frame) -> None:
    await ws.send(json.dumps(frame))


def ws_records(frames: list[Frame]) -> list[tuple[int, str]]:
    return [(f["seq"], f["text"]) for f in frames if f["type"] == "chat.delta"]


async def metric(served: Served, name: str, **labels: str) -> float:
    """The sum of a metric's samples on one replica with these labels (0 when it has none)."""
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        text = (await http.get(served.url + "/metrics")).text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            if all(label in line for label in wanted):
                total += float(line.rsplit(" ", 1)[1])
    return total


def report(message: str) -> None:
    """A figure worth reading in the test log (run with -s or -rP); never an assertion."""
    print(f"[timing] {message}")
