"""The nginx configuration of docs/deploy.md, run for real in front of two gateway processes.

SSE arrives through it unbuffered, WebSockets upgrade, both replicas get traffic, and a stream
that stays silent longer than nginx's read timeout survives because the gateway's heartbeats
(SSE comments, WebSocket pings) come more often. The read timeout is shortened for the test
and the heartbeats shortened further; nothing here measures time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx2
import pytest
from websockets.asyncio.client import connect

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream
from tests.support.nginx import documented_config, running_nginx, substitute
from tests.support.process import Served, free_port, serve_process
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]
READ_TIMEOUT = 2  # nginx's proxy_read_timeout in the test, seconds
HEARTBEAT = 0.25  # the gateways' sse_heartbeat and WebSocket ping_interval, well below it


@dataclass
class Deployment:
    url: str
    replicas: list[Served]
    nginx_log: list[str]


def gateway_config(upstream: FakeUpstream) -> str:
    return (
        f'[server]\nlog_format = "json"\nsse_heartbeat = {HEARTBEAT}\n'
        f"[websocket]\nping_interval = {HEARTBEAT}\nping_timeout = 10\n"
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nretries = 0\nfirst_token_timeout = 60\n'
    )


@pytest.fixture(scope="module")
def deployment(upstream: FakeUpstream) -> Iterator[Deployment]:
    with ExitStack() as stack:
        replicas = [
            stack.enter_context(
                serve_process(gateway_config(upstream), env={"UPSTREAM_KEY": UPSTREAM_KEY})
            )
            for _ in range(2)
        ]
        port = free_port()
        config = documented_config()
        for documented, served in zip(
            ("server 127.0.0.1:8001;", "server 127.0.0.1:8002;"), replicas, strict=True
        ):
            address = served.url.removeprefix("http://")
            config = substitute(config, documented, f"server {address};")
        config = substitute(config, "listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
        config = substitute(
            config, "proxy_read_timeout 300s;", f"proxy_read_timeout {READ_TIMEOUT}s;"
        )
        log = stack.enter_context(running_nginx(config, port))
        yield Deployment(f"http://127.0.0.1:{port}", replicas, log)


def test_both_replicas_get_requests(deployment: Deployment) -> None:
    with httpx2.Client(timeout=30) as http:
        for _ in range(6):
            assert http.get(deployment.url + "/api/models").status_code == 200
    for served in deployment.replicas:
        assert '"route": "/api/models"' in served.log or '"route":"/api/models"' in served.log


def test_sse_arrives_unbuffered(deployment: Deployment, model: Model) -> None:
    """Tokens reach the client while the upstream still holds the stream open: a buffering
    proxy would keep them until the stream ended, which here it never does."""
    body = {"model": f"oai/{model(tokens=5, hang_after=2)}", "messages": HELLO, "stream": True}
    seen = ""
    with (
        httpx2.Client(timeout=30) as http,
        http.stream("POST", deployment.url + "/api/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for text in response.iter_text():
            seen += text
            if "tok1" in seen:
                break
    assert "tok0" in seen
    assert "[DONE]" not in seen


def test_websocket_upgrades(deployment: Deployment, model: Model) -> None:
    import asyncio

    async def run() -> None:
        url = deployment.url.replace("http://", "ws://") + "/api/ws"
        # As a browser on the page nginx serves would: its own origin.
        async with connect(
            url,
            subprotocols=["tokenrelay.v1"],
            origin=deployment.url,  # type: ignore[list-item,arg-type]
        ) as ws:
            assert ws.subprotocol == "tokenrelay.v1"
            client = StreamClient(ws)
            sid = await client.start(f"oai/{model(tokens=3)}")
            done = await client.until_terminal(sid, timeout=30)
            assert done["type"] == "chat.done"
            text = "".join(
                f.get("text", "") for f in client.by_id[sid] if f["type"] == "chat.delta"
            )
            assert text == "tok0 tok1 tok2 "

    asyncio.run(run())


def test_sse_stream_outlives_the_read_timeout(deployment: Deployment, model: Model) -> None:
    """The first token comes after more than nginx's read timeout; heartbeats keep it open."""
    name = model(tokens=3, first_token_delay=READ_TIMEOUT * 2)
    body = {"model": f"oai/{name}", "messages": HELLO, "stream": True}
    with httpx2.Client(timeout=30) as http:
        response = http.post(deployment.url + "/api/chat/completions", json=body)
    assert response.status_code == 200
    assert response.text.startswith(":")  # heartbeat comments while the model was silent
    data = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c["choices"])
    assert text == "tok0 tok1 tok2 "
    assert response.text.rstrip().endswith("data: [DONE]")


def test_websocket_stream_outlives_the_read_timeout(deployment: Deployment, model: Model) -> None:
    import asyncio

    async def run() -> None:
        url = deployment.url.replace("http://", "ws://") + "/api/ws"
        async with connect(url, subprotocols=["tokenrelay.v1"]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            sid = await client.start(f"oai/{model(tokens=2, first_token_delay=READ_TIMEOUT * 2)}")
            done = await client.until_terminal(sid, timeout=30)
            assert done["type"] == "chat.done", done

    asyncio.run(run())
