"""Requests leave no reference cycles behind in the gateway.

What reference counting cannot free waits for the cycle collector, whose pauses stop the
whole event loop for as long as it takes to walk every object made since the last one (and,
under load, that is every live stream's). So each kind of exchange, ended in each way, must
leave nothing of the gateway's for it: the test runs a few of one kind through a real server
with the collector off, then collects, keeping what it finds, and names the gateway's objects
among them with the chain that keeps one alive.
"""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import connect

from server.app import create_app
from server.settings import Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread
from tests.support.wsclient import StreamClient

HELLO = [{"role": "user", "content": "hello"}]
ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "server"), str(ROOT / "providers"))
MODULES = ("server.", "providers.", "uvicorn.", "starlette.")


class Served:
    def __init__(self, url: str, app: Starlette, server: uvicorn.Server, model: Any) -> None:
        self.url = url
        self.app = app
        self.server = server
        self.model = model

    async def idle(self) -> None:
        """Until no stream and no request task is left (the upstream's hung ones included)."""
        async with asyncio.timeout(10):
            while self.app.state.lifecycle.streams or self.server.server_state.tasks:
                await asyncio.sleep(0.01)


@pytest.fixture
def served(upstream: FakeUpstream, model: Callable[..., str]) -> Iterator[Served]:
    settings = Settings(providers=provider_settings(upstream))
    app = create_app(settings, ENVIRON)
    servers: list[uvicorn.Server] = []
    with serve_in_thread(app, options=uvicorn_options(settings), servers=servers) as url:
        yield Served(url, app, servers[0], model)


async def _post(
    served: Served, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    async with httpx2.AsyncClient(timeout=10) as http:
        await http.post(served.url + path, json=body, headers=headers)


def _chat(
    script: dict[str, Any],
    stream: bool = True,
    provider: str = "oai",
    headers: dict[str, str] | None = None,
) -> Callable[[Served], Awaitable[None]]:
    async def run(served: Served) -> None:
        body = {"model": f"{provider}/{served.model(**script)}", "messages": HELLO}
        await _post(served, "/api/chat/completions", body | {"stream": stream}, headers)

    return run


def _client_leaves(headers: dict[str, str] | None = None) -> Callable[[Served], Awaitable[None]]:
    async def run(served: Served) -> None:
        name = served.model(tokens=10, pace=0.02)
        body = {"model": f"oai/{name}", "messages": HELLO, "stream": True}
        async with (
            httpx2.AsyncClient(timeout=10) as http,
            http.stream(
                "POST", served.url + "/api/chat/completions", json=body, headers=headers
            ) as response,
        ):
            async for _ in response.aiter_bytes():
                break

    return run


async def _messages(served: Served) -> None:
    body = {"model": f"oai/{served.model(tokens=3)}", "max_tokens": 16, "messages": HELLO}
    await _post(served, "/api/v1/messages", body | {"stream": True})


async def _responses(served: Served) -> None:
    body = {"model": f"oai/{served.model(tokens=3)}", "input": "hello", "stream": True}
    await _post(served, "/api/responses", body)


async def _unknown_model(served: Served) -> None:
    await _post(served, "/api/chat/completions", {"model": "nope/none", "messages": HELLO})


def _socket(cancel: bool) -> Callable[[Served], Awaitable[None]]:
    async def run(served: Served) -> None:
        name = served.model(tokens=10, pace=0.02) if cancel else served.model(tokens=3)
        url = served.url.replace("http", "ws") + "/api/ws"
        async with connect(url, subprotocols=["tokenrelay.v1"]) as ws:  # type: ignore[list-item]
            client = StreamClient(ws)
            sid = await client.start(f"oai/{name}")
            if cancel:
                await client.until_deltas(sid, 1)
                await client.cancel(sid)
            await client.until_terminal(sid)

    return run


RESUMABLE = {"X-Tokenrelay-Resumable": "true"}
KINDS: dict[str, Callable[[Served], Awaitable[None]]] = {
    "streamed": _chat({"tokens": 3}),
    "not streamed": _chat({"tokens": 3}, stream=False),
    "upstream 500": _chat({"status": 500}),
    "upstream 500, not streamed": _chat({"status": 500}, stream=False),
    "upstream cut mid-stream": _chat({"tokens": 4, "close_after": 1}),
    "client leaves mid-stream": _client_leaves(),
    "anthropic upstream": _chat({"tokens": 3}, provider="ant"),
    "anthropic upstream 500": _chat({"status": 500}, provider="ant"),
    "resumable": _chat({"tokens": 3}, headers=RESUMABLE),
    "resumable, client drops": _client_leaves(RESUMABLE),
    "unknown model": _unknown_model,
    "messages": _messages,
    "responses": _responses,
    "websocket": _socket(cancel=False),
    "websocket cancel": _socket(cancel=True),
}


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("kind", list(KINDS))
async def test_an_exchange_leaves_no_cycle(served: Served, kind: str, collector_off: None) -> None:
    await KINDS[kind](served)  # the first of a kind may fill caches made once
    await served.idle()
    gc.collect()
    for _ in range(3):
        await KINDS[kind](served)
    await served.idle()
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = [o for o in gc.garbage if _ours(o)]
    assert not found, _explain(found, gc.garbage)


def _ours(obj: object) -> bool:
    if type(obj).__name__ == "frame":
        return obj.f_code.co_filename.startswith(OURS)  # type: ignore[attr-defined]
    return type(obj).__module__.startswith(MODULES)


def _explain(found: list[object], garbage: list[object]) -> str:
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in found)
    cycle = next(filter(None, (_cycle(o, garbage) for o in found)), "none found")
    return f"left for the cycle collector: {dict(kinds.most_common(12))}; a cycle: {cycle}"


def _cycle(start: object, garbage: list[object]) -> str | None:
    """The shortest chain of references from `start` back to itself, among `garbage`."""
    inside = {id(o) for o in garbage}
    came_from: dict[int, object] = {}
    queue = collections.deque([start])
    seen = {id(start)}
    while queue:
        obj = queue.popleft()
        for ref in gc.get_referents(obj):
            if ref is start:
                chain = [obj]
                while id(chain[-1]) in came_from:
                    chain.append(came_from[id(chain[-1])])
                return " -> ".join(_label(o) for o in reversed(chain)) + " -> (back)"
            if id(ref) in inside and id(ref) not in seen:
                seen.add(id(ref))
                came_from[id(ref)] = obj
                queue.append(ref)
    return None


def _label(obj: object) -> str:
    if type(obj).__name__ == "frame":
        return f"frame {obj.f_code.co_qualname}"  # type: ignore[attr-defined]
    return type(obj).__qualname__
