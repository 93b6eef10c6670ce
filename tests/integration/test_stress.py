"""Resources under stress: slow and idle clients, overload, and no leaks after many streams."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator

import httpx2
import pytest
import uvicorn
from websockets.asyncio.client import connect

from server.app import create_app
from server.guard import GuardedHttpToolsProtocol
from server.settings import LimitSettings, ServerSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


class QuickGuard(GuardedHttpToolsProtocol):
    header_timeout = 0.3


@pytest.fixture
def guarded(upstream: FakeUpstream) -> Iterator[str]:
    settings = Settings(
        server=ServerSettings(body_timeout=0.3, max_connections=6),
        providers=provider_settings(upstream),
    )
    options = uvicorn_options(settings) | {"http": QuickGuard}
    with serve_in_thread(create_app(settings, ENVIRON), options=options) as url:
        yield url


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_are_cut_off_and_others_still_served(guarded: str) -> None:
    with raw(guarded) as slow, raw(guarded) as idle:
        slow.sendall(b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and no more
        # Meanwhile an ordinary request is served at once.
        assert httpx2.get(guarded + "/healthz").status_code == 200
        for sock in (slow, idle):
            answer = read_all(sock)  # returns when the gateway closes the connection
            assert answer.startswith(b"HTTP/1.1 408")
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_a_stalled_body_is_408(guarded: str) -> None:
    with raw(guarded) as sock:
        sock.sendall(
            b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"model":'
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"request_timeout"' in answer


async def test_overload_is_answered_503_at_once(guarded: str, model: Model) -> None:
    name = model(tokens=5, hang_after=1)
    body = {"model": f"oai/{name}", "messages": HELLO, "stream": True}
    async with httpx2.AsyncClient(timeout=10, limits=httpx2.Limits(max_connections=20)) as http:
        holding = []
        for _ in range(6):  # fill the gateway's connection budget with streams that never end
            stream = http.stream("POST", guarded + "/api/chat/completions", json=body)
            response = await stream.__aenter__()
            holding.append((stream, response))
        async with httpx2.AsyncClient(timeout=5) as other:
            refused = await other.get(guarded + "/healthz")
        assert refused.status_code == 503
        for stream, _ in holding:
            await stream.__aexit__(None, None, None)
        async with asyncio.timeout(10):  # and once they are gone, it serves again
            while (await http.get(guarded + "/healthz")).status_code != 200:
                await asyncio.sleep(0.05)


async def test_no_leaks_after_thousands_of_mixed_streams(
    upstream: FakeUpstream, model: Model
) -> None:
    # The load comes from one address as fast as it can: lift the per-socket frame rate.
    settings = Settings(
        providers=provider_settings(upstream), limits=LimitSettings(ws_frames_per_second=100_000)
    )
    app = create_app(settings, ENVIRON)
    servers: list[uvicorn.Server] = []
    complete, hanging, failing, cut = (
        model(tokens=3),
        model(tokens=5, hang_after=1),
        model(status=500),
        model(tokens=4, close_after=1),
    )
    with serve_in_thread(app, options=uvicorn_options(settings), servers=servers) as url:
        (server,) = servers
        lifecycle = app.state.lifecycle
        connections_before = len(upstream._conns)

        async def socket_load(rounds: int) -> None:
            async with connect(
                url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
            ) as ws:  # type: ignore[list-item]
                client = StreamClient(ws)
                for _ in range(rounds):
                    sids = [
                        await client.start(f"oai/{complete}"),
                        await client.start(f"oai/{failing}"),
                        await client.start(f"oai/{cut}"),
                        await client.start(f"oai/{hanging}"),
                    ]
                    await client.until_deltas(sids[3], 1)
                    await client.cancel(sids[3])
                    for sid in sids:
                        await client.until_terminal(sid)

        async def sse_load(rounds: int) -> None:
            async with httpx2.AsyncClient(timeout=10) as http:
                for i in range(rounds):
                    name = (complete, failing, cut)[i % 3]
                    await http.post(
                        url + "/api/chat/completions",
                        json={"model": f"oai/{name}", "messages": HELLO, "stream": True},
                    )
                    if i % 10 == 0:  # and some clients that leave mid-stream
                        async with http.stream(
                            "POST",
                            url + "/api/chat/completions",
                            json={"model": f"oai/{hanging}", "messages": HELLO, "stream": True},
                        ) as response:
                            async for _ in response.aiter_bytes():
                                break

        await asyncio.gather(*(socket_load(100) for _ in range(4)), sse_load(300))
        # 4 × 100 × 4 socket streams + 300 SSE + 30 abandoned: 1,930 streams.
        async with asyncio.timeout(10):
            while lifecycle.streams or server.server_state.tasks:
                await asyncio.sleep(0.02)
        assert len(lifecycle.streams) == 0
        assert len(server.server_state.tasks) == 0
        # After the checks above: the scrape is a request too, with a task of its own.
        metrics = httpx2.get(url + "/metrics").text
        assert all(
            line.endswith(" 0.0")
            for line in metrics.splitlines()
            if line.startswith("tokenrelay_streams_active{")
        )
        # Upstream connections: only the pool's idle keep-alive ones remain (at most 100).
        async with asyncio.timeout(10):
            while len(upstream._conns) > connections_before + 100:
                await asyncio.sleep(0.05)
        hung = upstream.by_model(hanging)
        assert len(hung) == 430
        for request in hung:  # every abandoned or cancelled stream's upstream was closed
            assert request.disconnected_at is not None
