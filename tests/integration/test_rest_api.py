"""The OpenAI-compatible REST + SSE API through the official `openai` SDK as a client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx2
import openai
import pytest

from server.settings import ServerSettings
from tests.conftest import UPSTREAM_KEY, GatewayFactory
from tests.fakeupstream import FakeUpstream

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("provider", ["oai", "ant"])
async def test_non_streamed_completion(
    client: openai.AsyncOpenAI, model: Model, provider: str
) -> None:
    completion = await client.chat.completions.create(
        model=f"{provider}/{model(tokens=4, prompt_tokens=9)}",
        messages=HELLO,  # type: ignore[arg-type]
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (9, 4)
    assert completion.usage.total_tokens == 13


@pytest.mark.parametrize("provider", ["oai", "ant"])
async def test_streamed_completion_with_usage(
    client: openai.AsyncOpenAI, model: Model, provider: str
) -> None:
    name = f"{provider}/{model(tokens=3, prompt_tokens=5)}"
    stream = await client.chat.completions.create(
        model=name,
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {name}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 3)


async def test_stream_without_usage_option_has_no_usage_chunk(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    stream = await client.chat.completions.create(
        model=f"oai/{model(tokens=2)}",
        messages=HELLO,
        stream=True,  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_reasoning_is_relayed(client: openai.AsyncOpenAI, model: Model) -> None:
    completion = await client.chat.completions.create(
        model=f"ant/{model(tokens=1, reasoning=['hmm '])}",
        messages=HELLO,  # type: ignore[arg-type]
    )
    message = completion.choices[0].message
    assert message.content == "tok0 "
    assert message.model_extra is not None and message.model_extra["reasoning_content"] == "hmm "


async def test_demo_provider_end_to_end(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "What is a gateway?"}]
    stream = await client.chat.completions.create(
        model="demo/echo",
        messages=messages,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert "What is a gateway?" in text
    assert text.startswith("## tokenrelay demo")
    again = await client.chat.completions.create(model="demo/echo", messages=messages)  # type: ignore[arg-type]
    assert again.choices[0].message.content == text  # deterministic


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert {"demo/echo", "demo/reasoner", "oai/gpt-4o-mini", "ant/claude-sonnet-4-5"} <= set(ids)


@pytest.mark.parametrize(
    ("body", "error", "param"),
    [
        ({"model": "nope/x"}, openai.NotFoundError, "model"),
        ({"model": "demo/missing"}, openai.NotFoundError, "model"),
        ({"temperature": 3}, openai.BadRequestError, "temperature"),
        (
            {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
            openai.BadRequestError,
            "tools[0].function.name",
        ),
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        (
            {"messages": [{"role": "wizard", "content": "x"}]},
            openai.BadRequestError,
            "messages[0].role",
        ),
    ],
)
async def test_request_errors_map_to_sdk_classes(
    client: openai.AsyncOpenAI, body: dict[str, object], error: type[Exception], param: str
) -> None:
    request = {"model": "demo/echo", "messages": HELLO, **body}
    with pytest.raises(error) as caught:
        await client.chat.completions.create(**request)  # type: ignore[call-overload]
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.body["param"] == param  # type: ignore[index]
    assert caught.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "error", "code", "gateway_status"),
    [
        (401, openai.InternalServerError, "upstream_auth_failed", 502),
        (429, openai.RateLimitError, "upstream_rate_limited", 429),
        (503, openai.InternalServerError, "upstream_unavailable", 503),
        (500, openai.InternalServerError, "upstream_unavailable", 503),
        (400, openai.BadRequestError, "upstream_rejected", 400),
        (404, openai.NotFoundError, "model_not_found", 404),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_errors_before_the_first_token(
    client: openai.AsyncOpenAI,
    model: Model,
    status: int,
    error: type[Exception],
    code: str,
    gateway_status: int,
    stream: bool,
) -> None:
    name = model(status=status, retry_after=3, error_message=f"bad key {UPSTREAM_KEY}")
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model=f"oai/{name}", messages=HELLO, stream=stream)  # type: ignore[call-overload]
    exc = caught.value
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == gateway_status
    assert exc.body["code"] == code  # type: ignore[index]
    assert UPSTREAM_KEY not in exc.response.text
    assert exc.response.headers["x-request-id"]
    if status == 429:
        assert exc.response.headers["retry-after"] == "3"


@pytest.mark.parametrize("fault", [{"close_after": 2}, {"error_after": 2}])
async def test_failure_after_the_first_token_is_an_error_event(
    client: openai.AsyncOpenAI, model: Model, fault: dict[str, int]
) -> None:
    stream = await client.chat.completions.create(
        model=f"oai/{model(tokens=5, **fault)}",
        messages=HELLO,
        stream=True,  # type: ignore[arg-type]
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "tok0 tok1 "
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "upstream_error"


async def test_failure_after_the_first_token_has_no_done_marker(gateway: str, model: Model) -> None:
    body = {"model": f"oai/{model(tokens=5, close_after=2)}", "messages": HELLO, "stream": True}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/chat/completions", json=body)
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert response.status_code == 200
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "upstream_protocol_error"
    assert all('finish_reason":"stop' not in e for e in events)


async def test_sse_headers_disable_buffering(gateway: str, model: Model) -> None:
    body = {"model": f"oai/{model(tokens=1)}", "messages": HELLO, "stream": True}
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            gateway + "/api/chat/completions",
            json=body,
            headers={"accept-encoding": "gzip", "x-request-id": "trace-123"},
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in response.headers
    assert response.headers["x-request-id"] == "trace-123"
    assert response.text.rstrip().endswith("data: [DONE]")


async def test_accept_header_selects_streaming(gateway: str, model: Model) -> None:
    body = {"model": f"oai/{model(tokens=2)}", "messages": HELLO}
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            gateway + "/api/chat/completions", json=body, headers={"accept": "text/event-stream"}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_upstream(
    gateway: str, model: Model, upstream: FakeUpstream, stream: bool
) -> None:
    name = model(tokens=50, pace=0.05)
    body = {"model": f"oai/{name}", "messages": HELLO, "stream": stream}
    async with httpx2.AsyncClient() as http:
        if stream:
            async with http.stream(
                "POST", gateway + "/api/chat/completions", json=body
            ) as response:
                async for _ in response.aiter_bytes():
                    break  # first token seen: hang up
        else:
            with pytest.raises(httpx2.ReadTimeout):
                await http.post(gateway + "/api/chat/completions", json=body, timeout=0.3)
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert recorded.deltas_sent < 50


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_url", "http://127.0.0.1:1/steal"),
        ("api_base", "http://127.0.0.1:1/steal"),
        ("api_key", "sk-client-supplied"),
        ("extra_headers", {"x-evil": "1"}),
        ("extra_body", {"evil": True}),
        ("some_future_field", 1),
    ],
)
async def test_unknown_fields_are_refused_by_name_and_never_forwarded(
    gateway: str, model: Model, upstream: FakeUpstream, field: str, value: object
) -> None:
    name = model(tokens=1)
    body = {"model": f"oai/{name}", "messages": HELLO, field: value}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", field)
    assert f"unknown field '{field}'" in error["message"]
    assert "sk-client" not in response.text
    assert upstream.by_model(name) == []


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b"", 400, "invalid_request"),
        (b"[1, 2]", 400, "invalid_request"),
        (
            b'{"model": "demo/echo", "messages": [{"role": "user", "content": NaN}]}',
            400,
            "invalid_request",
        ),
    ],
)
async def test_malformed_bodies(gateway: str, content: bytes, status: int, code: str) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            gateway + "/api/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


async def test_oversized_body_is_413(make_gateway: GatewayFactory) -> None:
    with make_gateway(ServerSettings(max_body_bytes=1000)) as url:
        big = {"model": "demo/echo", "messages": [{"role": "user", "content": "x" * 2000}]}
        async with openai.AsyncOpenAI(base_url=url + "/api", api_key="-", max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(**big)  # type: ignore[call-overload]
        assert caught.value.status_code == 413
        assert caught.value.body["code"] == "payload_too_large"  # type: ignore[index]

        # Sent in pieces without a declared length, it is refused just the same.
        async def pieces() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b" " * 100

        async with httpx2.AsyncClient() as http:
            response = await http.post(url + "/api/chat/completions", content=pieces())
        assert response.status_code == 413


async def test_unknown_route_and_method_are_json_errors(gateway: str) -> None:
    async with httpx2.AsyncClient() as http:
        missing = await http.get(gateway + "/api/nothing")
        wrong = await http.get(gateway + "/api/chat/completions")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")


async def test_healthz(gateway: str) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.get(gateway + "/healthz")
    assert response.json() == {"status": "ok"}


async def test_heartbeats_while_waiting_for_the_first_token(
    make_gateway: GatewayFactory, model: Model
) -> None:
    name = model(tokens=2, first_token_delay=0.5)
    with make_gateway(ServerSettings(sse_heartbeat=0.1)) as url:
        body = {"model": f"oai/{name}", "messages": HELLO, "stream": True}
        async with httpx2.AsyncClient() as http:
            response = await http.post(url + "/api/chat/completions", json=body)
    lines = response.text.split("\n")
    first_data = next(
        i for i, line in enumerate(lines) if line.startswith("data: {") and "tok0" in line
    )
    assert lines[:first_data].count(": keepalive") >= 2
    assert response.text.rstrip().endswith("data: [DONE]")


async def test_first_token_timeout_before_headers_is_504(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=2, first_token_delay=5)
    with make_gateway(first_token_timeout=0.3) as url:
        async with openai.AsyncOpenAI(base_url=url + "/api", api_key="-", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(
                    model=f"oai/{name}", messages=HELLO, stream=True
                )  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert "first token" in caught.value.body["message"]  # type: ignore[index]
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)


async def test_idle_timeout_mid_stream_is_an_error_event(
    make_gateway: GatewayFactory, model: Model, upstream: FakeUpstream
) -> None:
    name = model(tokens=5, hang_after=2)
    with make_gateway(idle_timeout=0.3) as url:
        async with openai.AsyncOpenAI(base_url=url + "/api", api_key="-", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=f"oai/{name}",
                messages=HELLO,
                stream=True,  # type: ignore[arg-type]
            )
            with pytest.raises(openai.APIError) as caught:
                async for _ in stream:
                    pass
    assert caught.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert "next chunk" in caught.value.message
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)


async def test_many_concurrent_streams(client: openai.AsyncOpenAI, model: Model) -> None:
    name = f"oai/{model(tokens=20, pace=0.005)}"

    async def one() -> str:
        stream = await client.chat.completions.create(model=name, messages=HELLO, stream=True)  # type: ignore[arg-type]
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    results = await asyncio.gather(*(one() for _ in range(50)))
    assert set(results) == {"".join(f"tok{i} " for i in range(20))}


async def test_demo_example_names_the_address_in_use(gateway: str) -> None:
    """The demo answer's client example points at the gateway as it was reached, not :8000."""
    body = {"model": "demo/echo", "messages": HELLO}
    async with httpx2.AsyncClient(timeout=30) as http:
        answer = (await http.post(gateway + "/api/chat/completions", json=body)).json()
        text = answer["choices"][0]["message"]["content"]
        assert f'base_url="{gateway}/api"' in text
        assert ":8000" not in gateway  # a free port, so the default could not pass by chance
        named = await http.post(
            gateway + "/api/chat/completions", json=body, headers={"host": "chat.example.com"}
        )
        text = named.json()["choices"][0]["message"]["content"]
        assert 'base_url="http://chat.example.com/api"' in text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": "demo/echo"}, "messages"),
        ({"model": "demo/echo", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ],
)
async def test_a_missing_required_field_is_named(
    gateway: str, body: dict[str, object], param: str
) -> None:
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(gateway + "/api/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert f"'{param}'" in error["message"]
