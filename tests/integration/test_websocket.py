"""The WebSocket endpoint through a real `websockets` client against real servers on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.settings import ServerSettings, WebSocketSettings
from tests.conftest import GatewayFactory
from tests.fakeupstream import FakeUpstream, RecordedRequest
from tests.support.wsclient import Frame, RawPeer, StreamClient

Model = Callable[..., str]
SUBPROTOCOL = "tokenrelay.v1"


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/api/ws"


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[StreamClient]:
    async with connect(ws_url(gateway), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == SUBPROTOCOL
        yield StreamClient(ws)


def assert_well_formed(frames: list[dict[str, object]]) -> None:
    """seq runs 0, 1, 2, … and exactly one terminal frame comes last."""
    assert [f["seq"] for f in frames] == list(range(len(frames)))
    terminal = [f for f in frames if f["type"] in ("chat.done", "chat.error")]
    assert terminal == [frames[-1]]


async def test_one_stream_end_to_end(client: StreamClient, model: Model) -> None:
    sid = await client.start(f"oai/{model(tokens=4, prompt_tokens=7)}")
    done = await client.until_terminal(sid)
    frames = client.by_id[sid]
    assert_well_formed(frames)
    assert client.text(sid) == "tok0 tok1 tok2 tok3 "
    assert done["type"] == "chat.done"
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert isinstance(done["ttft_ms"], float) and done["ttft_ms"] > 0
    assert done["model"].startswith("oai/")


async def test_reasoning_frames(client: StreamClient, model: Model) -> None:
    sid = await client.start(f"ant/{model(tokens=1, reasoning=['why '])}")
    await client.until_terminal(sid)
    deltas = [f for f in client.by_id[sid] if f["type"] == "chat.delta"]
    assert deltas[0] == {"type": "chat.delta", "id": sid, "seq": 0, "reasoning": "why "}
    assert deltas[1]["text"] == "tok0 "


async def test_three_concurrent_streams_interleave(client: StreamClient, model: Model) -> None:
    names = [model(tokens=15, pace=0.01, text=[f"{n}{i} " for i in range(15)]) for n in "abc"]
    sids = [await client.start(f"oai/{name}") for name in names]
    for sid in sids:
        await client.until_terminal(sid)
    order = [f["id"] for f in client.frames]
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches > 6  # frames of the three streams really were interleaved
    for sid, letter in zip(sids, "abc", strict=True):
        assert_well_formed(client.by_id[sid])
        assert client.text(sid) == "".join(f"{letter}{i} " for i in range(15))


async def test_cancel_closes_the_upstream_and_leaves_the_rest(
    client: StreamClient, model: Model, upstream: FakeUpstream
) -> None:
    victim_model = model(tokens=200, pace=0.01)
    victim = await client.start(f"oai/{victim_model}", text="one two three")
    other = await client.start(f"ant/{model(tokens=30, pace=0.01)}")
    await client.until_deltas(victim, 3)
    await client.cancel(victim)
    done = await client.until_terminal(victim)
    (recorded,) = upstream.by_model(victim_model)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert done["finish_reason"] == "cancelled"
    relayed = sum(f["type"] == "chat.delta" for f in client.by_id[victim])
    assert done["usage"]["completion_tokens"] == relayed
    # Estimated, as the upstream sends usage only at the end: 13 characters at 4 a token.
    assert done["usage"]["prompt_tokens"] == 4
    assert recorded.deltas_sent < 200
    other_done = await client.until_terminal(other)
    assert other_done["finish_reason"] == "stop"
    assert client.text(other) == "".join(f"tok{i} " for i in range(30))
    # Nothing more for the cancelled id, and the socket runs a new stream.
    again = await client.start(f"oai/{model(tokens=2)}")
    await client.until_terminal(again)
    assert_well_formed(client.by_id[victim])
    assert client.text(again) == "tok0 tok1 "


async def test_cancel_unknown_or_finished_is_harmless(client: StreamClient, model: Model) -> None:
    await client.cancel("never-started")
    assert await client.next_other() == {
        "type": "cancel.ignored",
        "id": "never-started",
        "reason": "unknown_or_finished",
    }
    sid = await client.start(f"oai/{model(tokens=1)}")
    await client.until_terminal(sid)
    await client.cancel(sid)
    assert (await client.next_other())["type"] == "cancel.ignored"
    assert_well_formed(client.by_id[sid])


async def test_socket_dropped_mid_stream_closes_every_upstream(
    gateway: str, model: Model, upstream: FakeUpstream
) -> None:
    names = [model(tokens=100, pace=0.02) for _ in range(3)] + [model(tokens=5, hang_after=1)]
    async with connect(ws_url(gateway), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        sids = [await client.start(f"oai/{name}") for name in names]
        for sid in sids:
            await client.until_deltas(sid, 1)
        ws.transport.abort()  # no closing handshake: the peer just vanishes
    for name in names:
        (recorded,) = upstream.by_model(name)
        await upstream.wait_disconnected(recorded, timeout=5)


async def test_ping_pong(client: StreamClient) -> None:
    await client.ws.send('{"type": "ping"}')
    assert await client.next_other() == {"type": "pong"}


@pytest.mark.parametrize(
    ("status", "code", "http_status"),
    [
        (429, "upstream_rate_limited", 429),
        (503, "upstream_unavailable", 503),
        (401, "upstream_auth_failed", 502),
    ],
)
async def test_failure_before_the_first_token(
    client: StreamClient, model: Model, status: int, code: str, http_status: int
) -> None:
    sid = await client.start(f"oai/{model(status=status, retry_after=2)}")
    error = await client.until_terminal(sid)
    assert error["type"] == "chat.error"
    assert error["seq"] == 0
    assert error["error"]["code"] == code
    assert error["error"]["status"] == http_status
    if status == 429:
        assert error["error"]["retry_after"] == 2


@pytest.mark.parametrize("fault", [{"close_after": 2}, {"error_after": 2}])
async def test_failure_after_the_first_token(
    client: StreamClient, model: Model, fault: dict[str, int]
) -> None:
    sid = await client.start(f"ant/{model(tokens=5, **fault)}")
    error = await client.until_terminal(sid)
    assert error["type"] == "chat.error"
    assert client.text(sid) == "tok0 tok1 "
    assert error["error"]["type"] == "upstream_error"
    assert_well_formed(client.by_id[sid])


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "bad_json"),
        ('{"type": "chat.launch", "id": "x"}', "unknown_type"),
        ('{"id": "x"}', "unknown_type"),
        ('{"type": "chat.cancel"}', "invalid_frame"),
        ('{"type": "chat.cancel", "id": 5}', "invalid_frame"),
        ('{"type": "chat.cancel", "id": "x", "extra": 1}', "invalid_frame"),
        (
            '{"type": "chat.start", "request": {"model": "demo/echo", "messages": []}}',
            "invalid_frame",
        ),
        ("[1, 2]", "invalid_frame"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_usable(
    client: StreamClient, model: Model, raw: str, code: str
) -> None:
    await client.ws.send(raw)
    error = await client.next_other()
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    sid = await client.start(f"oai/{model(tokens=1)}")
    assert (await client.until_terminal(sid))["type"] == "chat.done"


async def test_binary_frames_are_refused(client: StreamClient) -> None:
    await client.ws.send(b'{"type": "ping"}')
    assert (await client.next_other())["code"] == "binary_frame"
    await client.ws.send('{"type": "ping"}')
    assert await client.next_other() == {"type": "pong"}


@pytest.mark.parametrize(
    ("request_body", "code", "param"),
    [
        (
            {
                "model": "demo/echo",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 5,
            },
            "invalid_request",
            "temperature",
        ),
        (
            {"model": "demo/echo", "messages": [{"role": "wizard", "content": "x"}]},
            "invalid_request",
            "messages[0].role",
        ),
        (
            {"model": "demo/missing", "messages": [{"role": "user", "content": "x"}]},
            "model_not_found",
            "model",
        ),
        (
            {"model": "demo/echo", "messages": [{"role": "user", "content": "x"}], "n": 3},
            "unsupported",
            "n",
        ),
    ],
)
async def test_bad_request_fails_only_that_stream(
    client: StreamClient, request_body: dict[str, object], code: str, param: str
) -> None:
    await client.ws.send(json.dumps({"type": "chat.start", "id": "s1", "request": request_body}))
    error = await client.until_terminal("s1")
    assert error["type"] == "chat.error"
    assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    sid = await client.start("demo/echo")
    assert (await client.until_terminal(sid))["finish_reason"] == "stop"


async def test_duplicate_id_is_refused_without_disturbing_the_stream(
    client: StreamClient, model: Model
) -> None:
    sid = await client.start(f"oai/{model(tokens=10, pace=0.02)}", sid="dup")
    await client.until_deltas(sid, 1)
    await client.start(f"oai/{model(tokens=1)}", sid="dup")
    rejected = await client.next()
    while rejected["type"] != "chat.error":
        rejected = await client.next()
    assert rejected["error"]["code"] == "duplicate_id"
    client.by_id["dup"].remove(rejected)
    done = await client.until_terminal("dup")
    assert done["finish_reason"] == "stop"
    assert client.text("dup") == "".join(f"tok{i} " for i in range(10))


async def test_stream_cap_per_socket(make_gateway: GatewayFactory, model: Model) -> None:
    with make_gateway(websocket=WebSocketSettings(max_streams=2)) as url:
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            first = await client.start(f"oai/{model(tokens=10, pace=0.02)}")
            second = await client.start(f"oai/{model(tokens=10, pace=0.02)}")
            third = await client.start(f"oai/{model(tokens=1)}")
            refused = await client.until_terminal(third)
            assert refused["error"]["code"] == "too_many_streams"
            assert refused["error"]["status"] == 429
            for sid in (first, second):
                assert (await client.until_terminal(sid))["finish_reason"] == "stop"
            fourth = await client.start(f"oai/{model(tokens=1)}")
            assert (await client.until_terminal(fourth))["finish_reason"] == "stop"


async def test_oversize_frame_closes_with_1009(make_gateway: GatewayFactory) -> None:
    with make_gateway(websocket=WebSocketSettings(max_frame_bytes=4096)) as url:
        async with connect(ws_url(url), subprotocols=[SUBPROTOCOL], max_size=None) as ws:  # type: ignore[list-item]
            await ws.send(json.dumps({"type": "ping", "pad": "x" * 5000}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1009


async def test_wrong_subprotocol_is_refused(gateway: str) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(ws_url(gateway), subprotocols=["other.v9"]):  # type: ignore[list-item]
            pass


async def wait_request(upstream: FakeUpstream, name: str) -> RecordedRequest:
    while not upstream.by_model(name):
        await asyncio.sleep(0.01)
    return upstream.by_model(name)[0]


def start_frame(model: str) -> dict[str, object]:
    messages = [{"role": "user", "content": "x"}]
    return {"type": "chat.start", "id": "s", "request": {"model": model, "messages": messages}}


async def test_slow_consumer_is_ended_and_its_upstream_closed(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(text=["x" * 16384] * 4000, pace=0.002)  # 64 MiB over 8 s
    with make_gateway(ServerSettings(slow_consumer_timeout=0.3)) as url:
        peer = RawPeer(ws_url(url), SUBPROTOCOL)
        await peer.open()
        try:
            await peer.send(start_frame(f"oai/{name}"))
            recorded = await wait_request(upstream, name)
            await upstream.wait_disconnected(recorded, timeout=10)  # while the peer reads nothing
            error = await peer.read_until(lambda f: f["type"] != "chat.delta")
        finally:
            peer.abort()
    assert error["type"] == "chat.error"
    assert error["error"]["code"] == "slow_consumer"
    assert recorded.deltas_sent < 4000


async def test_unresponsive_peer_is_dropped_and_its_streams_cancelled(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=5, hang_after=1)
    settings = WebSocketSettings(ping_interval=0.2, ping_timeout=0.2)
    with make_gateway(websocket=settings) as url:
        peer = RawPeer(ws_url(url), SUBPROTOCOL)  # never reads, so never answers a ping
        await peer.open()
        try:
            await peer.send(start_frame(f"oai/{name}"))
            recorded = await wait_request(upstream, name)
            await upstream.wait_disconnected(recorded, timeout=5)
        finally:
            peer.abort()


async def test_rest_and_websocket_share_error_mapping(gateway: str, client: StreamClient) -> None:
    await client.start("nope/x", sid="e")
    ws_error = (await client.until_terminal("e"))["error"]
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            gateway + "/api/chat/completions",
            json={"model": "nope/x", "messages": [{"role": "user", "content": "hello"}]},
        )
    rest_error = response.json()["error"]
    for key in ("type", "code", "status", "message", "param"):
        assert ws_error[key] == rest_error[key]


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_frames_of_every_length_arrive_whole(
    gateway: str, model: Model, compression: str | None
) -> None:
    """Frames around each length-header size (125/126 bytes, 65,535/65,536 bytes) and text
    beyond ASCII, without compression (frames written by the gateway itself) and with it."""
    pieces = ["é" * n for n in range(30, 90)]  # frame lengths across 126 (2 bytes per é)
    pieces += ["🦜", "x"]
    pieces += ["y" * n for n in range(65_400, 65_560, 9)]  # across 65,536
    pieces += ["z" * 70_000, "end"]
    client, sid, done = await stream_once(gateway, model(text=pieces), compression)
    assert done["type"] == "chat.done"
    assert_well_formed(client.by_id[sid])
    assert client.text(sid) == "".join(pieces)


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_paced_deltas_arrive_once_and_in_order(
    gateway: str, model: Model, compression: str | None
) -> None:
    """Paced deltas, which the gateway writes from the upstream's read callback when it can
    (without compression) and from the stream's task otherwise (with it, the callback's
    write is refused each time): every one once, in order, under consecutive `seq`."""
    client, sid, done = await stream_once(gateway, model(tokens=40, pace=0.003), compression)
    assert done["type"] == "chat.done"
    assert_well_formed(client.by_id[sid])
    assert client.text(sid) == "".join(f"tok{i} " for i in range(40))
    assert done["usage"]["completion_tokens"] == 40


async def stream_once(
    gateway: str, name: str, compression: str | None
) -> tuple[StreamClient, str, Frame]:
    """One stream of `oai/<name>` on a socket of its own, with or without compression."""
    async with connect(
        ws_url(gateway),
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=compression,
        max_size=2**20,
    ) as ws:
        assert (compression is None) == (not ws.response.headers.get("sec-websocket-extensions"))
        client = StreamClient(ws)
        sid = await client.start(f"oai/{name}")
        done = await client.until_terminal(sid)
    return client, sid, done
