"""Deltas written from the upstream connection's read callback (`providers.base.Outlet`).

Both adapters on the lean transport, through the real SDKs against the fake upstream on
loopback: once a consumer opens the outlet, deltas that arrive while the iterator waits go to
it; whatever it refuses, and every failure, still comes out of the iterator, in order. Then
the same through a real gateway, with clients that read slowly (the socket buffer fills, so
the gateway's own writes are refused) and WebSocket clients with and without compression.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest

from providers import errors
from providers.base import Outlet, Provider
from providers.registry import build_provider
from providers.types import ChatRequest, Delta, Event, Finish, Message, TextDelta
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.fakeupstream.formats import FakeToolCall

Model = Callable[..., str]


KINDS = {"openai": 0, "anthropic": 1}  # the index of each adapter's `provider_settings`


@pytest.fixture(
    params=[(kind, transport) for kind in KINDS for transport in ("lean", "httpx")],
    ids=lambda p: "-".join(p),
)
async def any_provider(
    request: pytest.FixtureRequest, upstream: FakeUpstream
) -> AsyncIterator[tuple[Provider, str]]:
    kind, transport = request.param
    built = build_provider(provider_settings(upstream, transport=transport)[KINDS[kind]], ENVIRON)
    yield built, transport
    await built.aclose()


@pytest.fixture(params=list(KINDS))
async def lean(request: pytest.FixtureRequest, upstream: FakeUpstream) -> AsyncIterator[Provider]:
    built = build_provider(provider_settings(upstream)[KINDS[request.param]], ENVIRON)
    yield built
    await built.aclose()


def ask(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message(role="user", content="hi")])


class Recorder:
    """An outlet writer: takes what `accept(n)` allows (n: deltas offered so far) into `seen`."""

    def __init__(self, seen: list[Event], accept: Callable[[int], bool] = lambda n: True) -> None:
        self.seen = seen
        self.accept = accept
        self.offered = 0
        self.taken = 0

    def __call__(self, event: Delta) -> bool:
        self.offered += 1
        if not self.accept(self.offered):
            return False
        self.taken += 1
        self.seen.append(event)
        return True


async def relay(
    provider: Provider, name: str, writer: Callable[[Delta], bool]
) -> tuple[list[Event], Outlet]:
    """Consume a stream as the service does: the outlet opens after the first delta.
    Returns every event in the order it reached the consumer, from either path."""
    outlet = Outlet()
    seen: list[Event] = []
    if isinstance(writer, Recorder):
        writer.seen = seen
    async for event in provider.stream(ask(name), outlet):
        seen.append(event)
        if outlet.write is None:
            outlet.write = writer
    return seen, outlet


async def plain(provider: Provider, name: str) -> list[Event]:
    return [event async for event in provider.stream(ask(name))]


SCRIPTS = {
    "text": {"tokens": 24, "pace": 0.004},
    "reasoning-then-text": {"tokens": 10, "reasoning": ["a ", "b ", "c "], "pace": 0.004},
    "tools": {
        "text": ["let me look. "],
        "tool_calls": [
            FakeToolCall(name="weather", arguments=['{"city"', ': "Oslo"}'], id="call_1"),
            FakeToolCall(name="time", arguments=['{"tz": ', '"UTC"}']),
        ],
        "pace": 0.004,
    },
}


@pytest.mark.parametrize("script", SCRIPTS, ids=list(SCRIPTS))
async def test_pushed_deltas_are_the_stream_itself(
    any_provider: tuple[Provider, str], model: Model, script: str
) -> None:
    """With the outlet open the consumer sees the same events, in the same order, as without;
    on the lean transport most of them arrive through the outlet."""
    provider, transport = any_provider
    fields = SCRIPTS[script]
    without = await plain(provider, model(**fields))
    recorder = Recorder([])
    seen, _ = await relay(provider, model(**fields), recorder)
    if script == "tools":  # ids the upstream left out are made up per stream
        seen = [_without_made_up_id(e) for e in seen]
        without = [_without_made_up_id(e) for e in without]
    assert seen == without
    assert isinstance(seen[-1], Finish) and seen[-1].usage is not None
    if transport == "lean":
        assert recorder.taken >= (len(without) - 1) // 2, "the paced deltas were not pushed"
    else:
        assert recorder.offered == 0  # httpx2's own body: nothing is pushed


def _without_made_up_id(event: Event) -> Event:
    if hasattr(event, "id") and isinstance(event.id, str) and not event.id.startswith("call_1"):
        return type(event)(**{**_fields(event), "id": "made-up"})
    return event


def _fields(event: Event) -> dict[str, object]:
    return {f: getattr(event, f) for f in event.__struct_fields__}


async def test_what_the_outlet_refuses_comes_out_of_the_iterator_in_order(
    lean: Provider, model: Model
) -> None:
    tokens = 30
    recorder = Recorder([], accept=lambda n: n % 3 != 0)  # every third offer refused
    seen, _ = await relay(lean, model(tokens=tokens, pace=0.004), recorder)
    assert seen[:-1] == [TextDelta(f"tok{i} ") for i in range(tokens)]
    assert recorder.offered > recorder.taken > 0


async def test_a_writer_that_fails_fails_the_stream_and_closes_the_upstream(
    lean: Provider, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=40, pace=0.004)

    def broken(event: Delta) -> bool:
        raise RuntimeError("the sink broke")

    with pytest.raises(RuntimeError, match="the sink broke"):
        await relay(lean, name, broken)
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert not recorded.completed


async def test_an_in_band_error_after_pushed_deltas_is_raised_after_them(
    lean: Provider, model: Model
) -> None:
    seen: list[Event] = []
    recorder = Recorder(seen)
    outlet = Outlet()
    with pytest.raises(errors.ProviderError) as caught:
        async for event in lean.stream(ask(model(tokens=8, pace=0.004, error_after=6)), outlet):
            seen.append(event)
            outlet.write = recorder
    assert "mid-stream" in caught.value.message
    assert seen == [TextDelta(f"tok{i} ") for i in range(6)]
    assert recorder.taken > 0


async def test_a_cut_connection_after_pushed_deltas_is_a_protocol_error(
    lean: Provider, model: Model
) -> None:
    seen: list[Event] = []
    outlet = Outlet()
    with pytest.raises(errors.UpstreamProtocolError):
        async for event in lean.stream(ask(model(tokens=8, pace=0.004, close_after=5)), outlet):
            seen.append(event)
            outlet.write = Recorder(seen)
    assert seen == [TextDelta(f"tok{i} ") for i in range(5)]


async def test_closing_the_iterator_stops_the_pushes_and_closes_the_upstream(
    lean: Provider, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=400, pace=0.003)
    seen: list[Event] = []
    recorder = Recorder(seen)
    outlet = Outlet()
    stream = lean.stream(ask(name), outlet)
    seen.append(await anext(stream))
    outlet.write = recorder
    waiting = asyncio.ensure_future(anext(stream))  # parked: what arrives now is pushed
    while recorder.taken < 3:
        await asyncio.sleep(0.005)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert not recorded.completed


async def test_a_kept_alive_connection_carries_no_hook_into_its_next_response(
    lean: Provider, model: Model
) -> None:
    """After a pushed stream, its connection goes back to the pool without the reader's
    hook: the next stream on it, which opens no outlet, gets every delta from its iterator."""
    recorder = Recorder([])
    first, _ = await relay(lean, model(tokens=20, pace=0.003), recorder)
    assert recorder.taken > 0
    taken = recorder.taken
    assert _hooked(lean) == []
    second = await plain(lean, model(tokens=20, pace=0.003))
    assert second[:-1] == [TextDelta(f"tok{i} ") for i in range(20)]
    assert recorder.taken == taken
    transport = lean._http._transport  # type: ignore[attr-defined]
    assert len(transport._open) == 1  # both streams on the one kept-alive connection


def _hooked(provider: Provider) -> list[object]:
    """The provider's upstream connections that still hand their body pieces to a reader."""
    transport = provider._http._transport  # type: ignore[attr-defined]
    pooled = [c for idle in transport._idle.values() for c in idle]
    return [c for c in {*transport._open, *pooled} if c.push is not None]


ROUTES = {
    "chat-completions": "/api/chat/completions",
    "messages": "/api/v1/messages",
    "responses": "/api/responses",
}


def _slow_sse_read(
    url: str, path: str, name: str, pause: float, slow_for: int, extra: bytes = b""
) -> bytes:
    """A streamed request from a client with a small receive buffer that reads slowly for its
    first `slow_for` bytes, then at full speed."""
    host, port = url.removeprefix("http://").split(":")
    fields: dict[str, object] = {"model": f"oai/{name}", "stream": True}
    if path == ROUTES["responses"]:
        fields["input"] = "x"
    else:
        fields["messages"] = [{"role": "user", "content": "x"}]
        fields["max_tokens"] = 4096
    body = json.dumps(fields).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.settimeout(30)
        sock.sendall(
            b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n%s"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body)
        )
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
            if len(received) < slow_for:
                time.sleep(pause)
    return bytes(received)


def _events(raw: bytes) -> list[dict[str, object]]:
    """The JSON `data:` of every SSE event of a chunked HTTP response."""
    return [data for data, _ in _numbered(raw)]


def _numbered(raw: bytes) -> list[tuple[dict[str, object], int | None]]:
    """Every JSON event of a chunked SSE response with its `id:` (None without one)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body, rest = body + rest[:n], rest[n + 2 :]
    return _parsed(body)


def _parsed(body: bytes) -> list[tuple[dict[str, object], int | None]]:
    out: list[tuple[dict[str, object], int | None]] = []
    for event in body.split(b"\n\n"):
        lines = event.split(b"\n")
        data = [line[6:] for line in lines if line.startswith(b"data: {")]
        ids = [int(line[4:]) for line in lines if line.startswith(b"id: ")]
        if data:
            out.append((json.loads(data[0]), ids[0] if ids else None))
    return out


def _text(route: str, events: list[dict[str, object]]) -> str:
    if route == "chat-completions":
        return "".join(
            e["choices"][0]["delta"].get("content") or ""  # type: ignore[index]
            for e in events
            if e.get("choices")
        )
    if route == "messages":
        return "".join(
            e["delta"]["text"]  # type: ignore[index]
            for e in events
            if e.get("type") == "content_block_delta"
        )
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return "".join(str(e["delta"]) for e in events if e.get("type") == "response.output_text.delta")


@pytest.mark.parametrize("route", ROUTES)
async def test_a_client_that_reads_slowly_gets_every_delta_in_order(
    gateway: str, model: Model, route: str
) -> None:
    """Its socket buffer fills, so the gateway's writes from the read callback are refused
    and go through the stream's task (which waits for the client), then resume. The answer
    (8 MB) is more than the kernel buffers on loopback (up to 4 MB sent, unread) hold. Each
    dialect's framing moves on as it frames a delta: what was refused is sent as it was.
    The reader catches up after 6 MB: a Responses stream ends with events that repeat the
    whole answer several times, which a slow reader would not take within the 5 s the end of
    a stream is given."""
    pieces = [f"<{i}:" + "x" * 40_000 + ">" for i in range(200)]
    name = model(text=pieces, pace=0.001)
    raw = await asyncio.to_thread(_slow_sse_read, gateway, ROUTES[route], name, 0.001, 6_000_000)
    assert _text(route, _events(raw)) == "".join(pieces)


async def test_a_resumable_stream_read_slowly_is_journalled_once_and_in_order(
    gateway: str, model: Model
) -> None:
    """Deltas the journal takes from the read callback while the client's socket is full
    reach the client later without being journalled twice: the client's ids run 0, 1, 2, ...
    and a reader of the journal gets the same events for the same ids."""
    pieces = [f"<{i}:" + "x" * 40_000 + ">" for i in range(200)]
    name = model(text=pieces, pace=0.001)
    raw = await asyncio.to_thread(
        _slow_sse_read,
        gateway,
        ROUTES["chat-completions"],
        name,
        0.001,
        6_000_000,
        b"x-tokenrelay-resumable: true\r\n",
    )
    stream_id = raw.split(b"x-tokenrelay-stream-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    events = _numbered(raw)
    assert _text("chat-completions", [e for e, _ in events]) == "".join(pieces)
    # The role chunk and the finish's usage chunk share the id of the event they go with.
    live = [(e, i) for e, i in events if i is not None]
    assert [i for _, i in live] == list(range(len(pieces)))
    after = len(live) - 20  # the journal keeps the newest 4 MiB of a stream
    async with httpx2.AsyncClient(base_url=gateway, timeout=10) as http:
        replay = await http.get(f"/api/chat/completions/{stream_id}/stream?after={after}")
    assert replay.status_code == 200, replay.text
    tail = [(e, i) for e, i in _parsed(replay.content) if i is not None]
    assert tail == live[after + 1 :]
