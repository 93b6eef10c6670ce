"""Metrics, logs and health of a real gateway process, driven by real clients."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream
from tests.support.process import Served, serve_process
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


def config(upstream: FakeUpstream, log_level: str = "info", **provider: object) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in provider.items())
    return (
        f'demo = false\n[server]\nlog_format = "json"\nlog_level = "{log_level}"\n'
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        f'api_key_env = "UPSTREAM_KEY"\n{extra}'
    )


@pytest.fixture(scope="module")
def served(upstream: FakeUpstream) -> Iterator[Served]:
    with serve_process(
        config(upstream, first_token_timeout=0.5, retries=0), env={"UPSTREAM_KEY": UPSTREAM_KEY}
    ) as process:
        yield process


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = httpx2.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_until(check: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_scripted_session_shows_exactly_in_metrics(
    served: Served, upstream: FakeUpstream, model: Model
) -> None:
    url = served.url
    before = scrape(url)
    api = url + "/api/chat/completions"
    async with httpx2.AsyncClient(timeout=10) as http:
        # SSE: two complete streams, one that the client leaves after its first token, one
        # refused by the upstream before the first token.
        for _ in range(2):
            body = {"model": f"oai/{model(tokens=3)}", "messages": HELLO, "stream": True}
            assert (await http.post(api, json=body)).status_code == 200
        left = model(tokens=5, hang_after=1)
        async with http.stream(
            "POST", api, json={"model": f"oai/{left}", "messages": HELLO, "stream": True}
        ) as response:
            async for chunk in response.aiter_bytes():
                if b"tok0" in chunk:
                    break
        await upstream.wait_disconnected(upstream.by_model(left)[0])
        failed = {"model": f"oai/{model(status=503)}", "messages": HELLO, "stream": True}
        assert (await http.post(api, json=failed)).status_code == 503
        # REST: one complete non-streamed answer.
        body = {"model": f"oai/{model(tokens=2)}", "messages": HELLO}
        assert (await http.post(api, json=body)).status_code == 200
    # WebSocket: one complete, one cancelled after exactly two deltas, one first-token timeout.
    async with connect(url.replace("http", "ws") + "/api/ws", subprotocols=["tokenrelay.v1"]) as ws:  # type: ignore[list-item]
        client = StreamClient(ws)
        done = await client.start(f"oai/{model(tokens=4)}")
        await client.until_terminal(done)
        cancelled_model = model(tokens=9, hang_after=2)
        cancelled = await client.start(f"oai/{cancelled_model}")
        await client.until_deltas(cancelled, 2)
        await client.cancel(cancelled)
        assert (await client.until_terminal(cancelled))["finish_reason"] == "cancelled"
        slow = await client.start(f"oai/{model(tokens=1, first_token_delay=3)}")
        assert (await client.until_terminal(slow))["error"]["code"] == "upstream_timeout"

    def settled() -> bool:
        now = scrape(url)
        return all(
            value(now, "tokenrelay_streams_active", transport=t) == 0 for t in ("rest", "sse", "ws")
        )

    await wait_until(settled)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    streams = "tokenrelay_streams_total"
    expected_streams = {
        ("sse", "completed"): 2,
        ("sse", "client_disconnected"): 1,
        ("sse", "error"): 1,
        ("rest", "completed"): 1,
        ("ws", "completed"): 1,
        ("ws", "cancelled"): 1,
        ("ws", "timeout"): 1,
    }
    for transport in ("rest", "sse", "ws"):
        for outcome in ("completed", "cancelled", "client_disconnected", "error", "timeout"):
            got = delta(streams, transport=transport, provider="oai", outcome=outcome)
            assert got == expected_streams.get((transport, outcome), 0), (transport, outcome)
    chunks = "tokenrelay_stream_chunks_total"
    assert delta(chunks, transport="sse", provider="oai") == 2 * 3 + 1
    assert delta(chunks, transport="rest", provider="oai") == 2
    assert delta(chunks, transport="ws", provider="oai") == 4 + 2
    ttft = "tokenrelay_stream_ttft_seconds_count"
    assert delta(ttft, transport="sse", provider="oai") == 3
    assert delta(ttft, transport="rest", provider="oai") == 1
    assert delta(ttft, transport="ws", provider="oai") == 2
    tokens = "tokenrelay_tokens_total"
    # Completed streams carry the upstream's usage (10 prompt tokens each); streams cut short
    # are estimated ("hello": one word but five characters, so 2 tokens at four characters
    # each, and the deltas relayed); streams that relayed nothing add 0.
    assert delta(tokens, transport="sse", provider="oai", kind="prompt") == 2 * 10 + 2
    assert delta(tokens, transport="sse", provider="oai", kind="completion") == 2 * 3 + 1
    assert delta(tokens, transport="ws", provider="oai", kind="completion") == 4 + 2
    cancel = "tokenrelay_cancel_propagation_seconds_count"
    assert delta(cancel, transport="ws") == 1
    assert delta(cancel, transport="sse") == 1
    errors = "tokenrelay_upstream_errors_total"
    assert delta(errors, provider="oai", code="upstream_unavailable") == 1
    assert delta(errors, provider="oai", code="upstream_timeout") == 1
    requests = "tokenrelay_http_requests_total"
    assert delta(requests, route="/api/chat/completions", method="POST", status="2xx") == 4
    assert delta(requests, route="/api/chat/completions", method="POST", status="5xx") == 1
    frames = "tokenrelay_ws_frames_total"
    assert delta(frames, direction="in", type="chat.start") == 3
    assert delta(frames, direction="in", type="chat.cancel") == 1
    assert delta(frames, direction="out", type="chat.delta") == 6
    assert delta(frames, direction="out", type="chat.done") == 2
    assert delta(frames, direction="out", type="chat.error") == 1
    assert value(after, "tokenrelay_ws_connections_active") == 0


async def test_bogus_model_names_do_not_grow_the_series(served: Served) -> None:
    api = served.url + "/api/chat/completions"
    async with httpx2.AsyncClient(timeout=10) as http:

        async def bogus(i: int) -> None:
            name = f"nope{i}/{uuid.uuid4().hex}" if i % 2 else f"oai-x/{uuid.uuid4().hex}"
            response = await http.post(api, json={"model": name, "messages": HELLO})
            assert response.status_code == 404

        await asyncio.gather(*(bogus(i) for i in range(10)))
        series = len(scrape(served.url))
        for start in range(0, 1000, 50):
            await asyncio.gather(*(bogus(i) for i in range(start, start + 50)))
        assert len(scrape(served.url)) == series


def test_logs_are_lines_with_ids_and_never_secrets(upstream: FakeUpstream, model: Model) -> None:
    wrong_key = "sk-wrong-" + uuid.uuid4().hex
    text = "a very private question " + uuid.uuid4().hex
    with serve_process(config(upstream, "debug"), env={"UPSTREAM_KEY": wrong_key}) as process:
        response = httpx2.post(
            process.url + "/api/chat/completions",
            json={
                "model": f"oai/{model()}",
                "messages": [{"role": "user", "content": text}],
                "stream": True,
            },
            headers={"authorization": "Bearer sk-client-secret-123456", "x-request-id": "trace-77"},
            timeout=10,
        )
        assert response.status_code == 502
        assert wrong_key not in response.text
        httpx2.get(process.url + "/healthz")
    log = process.log
    assert wrong_key not in log
    assert wrong_key[3:] not in log
    assert "sk-client-secret-123456" not in log
    assert text not in log  # content is not logged unless log_content is set
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    streams = [line for line in lines if line.get("message") == "stream"]
    assert [s["request_id"] for s in streams] == ["trace-77"]
    assert streams[0]["outcome"] == "error"
    assert streams[0]["error"] == "upstream_auth_failed"
    requests = [line for line in lines if line.get("message") == "request"]
    assert {(r["route"], r["status"]) for r in requests} >= {
        ("/api/chat/completions", 502),
        ("/healthz", 200),
    }


async def test_readiness_reports_each_part(served: Served) -> None:
    async with httpx2.AsyncClient() as http:
        ready = await http.get(served.url + "/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {
            "providers": {"oai": "ok"},
            "cache": {"memory": "ok"},
            "journal": "memory",
            "classifier": "local",
        },
    }


def test_metrics_are_aggregated_across_workers(upstream: FakeUpstream, model: Model) -> None:
    with serve_process(
        config(upstream), env={"UPSTREAM_KEY": UPSTREAM_KEY}, args=("--workers", "2")
    ) as process:
        name = f"oai/{model(tokens=2)}"
        for _ in range(20):  # new connections, spread over both workers by the kernel
            with httpx2.Client() as http:
                http.post(
                    process.url + "/api/chat/completions", json={"model": name, "messages": HELLO}
                )
        samples = scrape(process.url)
        total = value(
            samples,
            "tokenrelay_streams_total",
            transport="rest",
            provider="oai",
            outcome="completed",
        )
        assert total == 20


async def test_metrics_have_no_created_series(served: Served) -> None:
    async with httpx2.AsyncClient() as http:
        text = (await http.get(served.url + "/metrics")).text
    assert "tokenrelay_streams_total" in text
    assert "_created" not in text
