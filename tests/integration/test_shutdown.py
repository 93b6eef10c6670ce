"""Graceful shutdown of a real gateway process under load: SIGTERM with 50 open streams."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

import httpx2
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream
from tests.support.process import serve_process
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]
GRACE = 1.5


def config(upstream: FakeUpstream) -> str:
    return (
        f"demo = false\n[server]\nshutdown_grace = {GRACE}\n"
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nretries = 0\n'
    )


async def sse_stream(http: httpx2.AsyncClient, url: str, model: str) -> str:
    """'complete' or the error code the stream ended with."""
    body = {"model": f"oai/{model}", "messages": HELLO, "stream": True}
    async with http.stream("POST", url + "/api/chat/completions", json=body) as response:
        assert response.status_code == 200
        last = ""
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                last = line[6:]
    if last == "[DONE]":
        return "complete"
    return str(json.loads(last)["error"]["code"])


async def ws_streams(
    url: str, models: list[str], started: asyncio.Event
) -> tuple[list[str], int | None]:
    """Each stream's 'complete' or error code, and the socket's close code."""
    async with connect(url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        sids = [await client.start(f"oai/{m}") for m in models]
        for sid in sids:
            await client.until_deltas(sid, 1)
        started.set()
        results = []
        for sid in sids:
            end = await client.until_terminal(sid, timeout=GRACE + 10)
            results.append("complete" if end["type"] == "chat.done" else end["error"]["code"])
        try:
            await asyncio.wait_for(ws.recv(), GRACE + 10)
        except ConnectionClosed:
            pass
        return results, ws.close_code


async def test_sigterm_with_fifty_open_streams(upstream: FakeUpstream, model: Model) -> None:
    # Half finish within the grace period, half would run for a minute.
    short = [model(tokens=10, pace=0.05) for _ in range(25)]
    long = [model(tokens=1200, pace=0.05) for _ in range(25)]
    with serve_process(config(upstream), env={"UPSTREAM_KEY": UPSTREAM_KEY}) as served:
        url = served.url
        async with httpx2.AsyncClient(timeout=GRACE + 15) as http, httpx2.AsyncClient() as probe:
            # A kept-alive connection opened now still reaches the gateway once it stops
            # accepting new ones.
            assert (await probe.get(url + "/readyz")).status_code == 200
            sse_models = short[:13] + long[:12]
            ws_models = short[13:] + long[12:]  # 25 over 4 sockets (8 streams each at most)
            groups = [ws_models[i : i + 7] for i in range(0, 25, 7)]
            events = [asyncio.Event() for _ in groups]
            sse_tasks = [asyncio.create_task(sse_stream(http, url, m)) for m in sse_models]
            ws_tasks = [
                asyncio.create_task(ws_streams(url, g, e))
                for g, e in zip(groups, events, strict=True)
            ]
            for event in events:
                await asyncio.wait_for(event.wait(), 10)
            async with asyncio.timeout(10):
                while sum(len(upstream.by_model(m)) for m in sse_models) < len(sse_models):
                    await asyncio.sleep(0.01)
            sent_at = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await probe.get(url + "/readyz")
            assert ready.status_code == 503
            assert ready.json()["status"] == "unavailable"
            sse_results = await asyncio.gather(*sse_tasks)
            ws_results = await asyncio.gather(*ws_tasks)
        exit_code = await asyncio.to_thread(served.proc.wait, GRACE + 10)
        exited_after = time.monotonic() - sent_at
    outcomes = dict(zip(sse_models, sse_results, strict=True))
    for (results, _), group in zip(ws_results, groups, strict=True):
        outcomes.update(zip(group, results, strict=True))
    assert {outcomes[m] for m in short} == {"complete"}
    assert {outcomes[m] for m in long} == {"server_shutting_down"}
    assert {code for _, code in ws_results} == {1012}
    # uvicorn re-raises the signal once its own shutdown is done, so a supervisor sees SIGTERM.
    assert exit_code in (0, -signal.SIGTERM)
    assert exited_after < GRACE + 6
    for name in long:  # every upstream of an ended stream was closed
        await upstream.wait_disconnected(upstream.by_model(name)[0])
