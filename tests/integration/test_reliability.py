"""Upstream faults: retries, fallbacks and timeouts, as a client of each transport sees them."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx2
import openai
import pytest
from websockets.asyncio.client import connect

from server.settings import ServerSettings
from tests.conftest import GatewayFactory
from tests.fakeupstream import FakeUpstream
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/api", api_key="-", max_retries=0)


@pytest.mark.parametrize("status", [503, 500, 529, 429])
async def test_retry_then_success(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream, status: int
) -> None:
    name = model(status=status, fail_first=2, tokens=3)
    with make_gateway(retries=2, retry_backoff=0.01) as url:
        async with sdk(url) as client:
            stream = await client.chat.completions.create(
                model=f"oai/{name}",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "tok0 tok1 tok2 "
    assert len(upstream.by_model(name)) == 3


async def test_retries_are_bounded_in_count(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(status=503)
    with make_gateway(retries=2, retry_backoff=0.01) as url:
        async with sdk(url) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(model=f"oai/{name}", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert len(upstream.by_model(name)) == 3


async def test_retry_after_is_honoured(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(status=429, retry_after=0.3, fail_first=1, tokens=1)
    with make_gateway(retries=2, retry_backoff=0.01) as url:
        async with sdk(url) as client:
            await client.chat.completions.create(model=f"oai/{name}", messages=HELLO)  # type: ignore[arg-type]
    first, second = upstream.by_model(name)
    assert second.started_at - first.started_at >= 0.3


async def test_retry_after_beyond_the_budget_is_passed_on(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(status=429, retry_after=30)
    with make_gateway(ServerSettings(retry_budget=2), retries=3) as url:
        async with sdk(url) as client:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(model=f"oai/{name}", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "30"
    assert len(upstream.by_model(name)) == 1  # waiting 30 s would break the budget: no retry


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_refusals_are_not_retried(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream, status: int
) -> None:
    name = model(status=status)
    with make_gateway(retries=2, retry_backoff=0.01) as url:
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                url + "/api/chat/completions", json={"model": f"oai/{name}", "messages": HELLO}
            )
    assert response.status_code in (400, 404, 502)
    assert len(upstream.by_model(name)) == 1


@pytest.mark.parametrize("fault", [{"close_after": 2}, {"error_after": 2}])
async def test_no_retry_once_the_client_has_tokens(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream, fault: dict[str, int]
) -> None:
    name = model(tokens=5, **fault)
    with make_gateway(retries=3, retry_backoff=0.01) as url:
        async with sdk(url) as client:
            stream = await client.chat.completions.create(
                model=f"oai/{name}",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
            )
            seen = []
            with pytest.raises(openai.APIError):
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "tok0 tok1 "
    assert len(upstream.by_model(name)) == 1


async def test_a_stream_cut_before_its_first_token_is_retried(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=3, close_after=0)
    with make_gateway(retries=1, retry_backoff=0.01) as url:
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                url + "/api/chat/completions", json={"model": f"oai/{name}", "messages": HELLO}
            )
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_protocol_error"
    assert len(upstream.by_model(name)) == 2


async def test_fallback_to_another_provider(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    broken = model(status=503)
    backup = model(tokens=2, text=["from ", "backup"])
    fallbacks = {f"oai/{broken}": [f"ant/{backup}"]}
    with make_gateway(fallbacks=fallbacks, retries=1, retry_backoff=0.01) as url:
        async with sdk(url) as client:
            completion = await client.chat.completions.create(
                model=f"oai/{broken}",
                messages=HELLO,  # type: ignore[arg-type]
            )
            stream = await client.chat.completions.create(
                model=f"oai/{broken}",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
            )
            chunks = [c async for c in stream]
        async with connect(
            url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]
        ) as ws:  # type: ignore[list-item]
            ws_client = StreamClient(ws)
            sid = await ws_client.start(f"oai/{broken}")
            done = await ws_client.until_terminal(sid)
    assert completion.choices[0].message.content == "from backup"
    assert completion.model == f"ant/{backup}"  # the response says which model answered
    assert {c.model for c in chunks} == {f"ant/{backup}"}
    assert done["model"] == f"ant/{backup}"
    assert ws_client.text(sid) == "from backup"
    assert len(upstream.by_model(broken)) == 3 * 2  # each request: one try and one retry
    assert len(upstream.by_model(backup)) == 3


async def test_fallbacks_exhausted_report_the_last_failure(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    first, second = model(status=503), model(status=401)
    with make_gateway(fallbacks={f"oai/{first}": [f"oai/{second}"]}, retries=0) as url:
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                url + "/api/chat/completions", json={"model": f"oai/{first}", "messages": HELLO}
            )
    assert response.json()["error"]["code"] == "upstream_auth_failed"
    assert (len(upstream.by_model(first)), len(upstream.by_model(second))) == (1, 1)


async def test_heartbeats_keep_a_silent_upstream_open_until_the_first_token_timeout(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=1, first_token_delay=30)
    with make_gateway(ServerSettings(sse_heartbeat=0.1), first_token_timeout=0.6) as url:
        async with httpx2.AsyncClient() as http:
            response = await http.post(
                url + "/api/chat/completions",
                json={"model": f"oai/{name}", "messages": HELLO, "stream": True},
            )
    lines = response.text.split("\n")
    assert response.status_code == 200  # headers went out with the first heartbeat
    assert lines.count(": keepalive") >= 3
    error = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
    assert error["error"]["code"] == "upstream_timeout"
    assert "data: [DONE]" not in lines
    await upstream.wait_disconnected(upstream.by_model(name)[0])
