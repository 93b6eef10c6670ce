"""The fake upstream, exercised through the real openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.fakeupstream import FakeToolCall, FakeUpstream, RecordedRequest, Script
from tests.fakeupstream.__main__ import _Control

pytestmark = pytest.mark.filterwarnings("error")

ROOT = Path(__file__).resolve().parents[2]
OAI_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
ANT_MESSAGES: list[MessageParam] = [{"role": "user", "content": "hi"}]


def oai(up: FakeUpstream, key: str = "sk-test", timeout: float = 5.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=up.url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def ant(
    up: FakeUpstream, key: str = "sk-ant-test", timeout: float = 5.0
) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=up.url, api_key=key, max_retries=0, timeout=timeout)


def only(up: FakeUpstream, model: str) -> RecordedRequest:
    (req,) = up.by_model(model)
    return req


# -- streaming and non-streaming bodies --


@pytest.mark.asyncio
async def test_openai_stream_with_reasoning_and_usage() -> None:
    async with FakeUpstream() as up, oai(up) as client:
        up.scripts["m"] = Script(tokens=3, reasoning=["hmm ", "ok"], prompt_tokens=7)
        stream = await client.chat.completions.create(
            model="m", messages=OAI_MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]

        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert all(d.role is None for d in deltas[1:])
        reasoning = [getattr(d, "reasoning_content", None) for d in deltas]
        assert reasoning[:2] == ["hmm ", "ok"]
        assert "".join(d.content or "" for d in deltas) == "tok0 tok1 tok2 "
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish == [None] * 5 + ["stop"]
        usage = chunks[-1].usage
        assert chunks[-1].choices == [] and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 5, 12)
        assert {c.id for c in chunks} == {"chatcmpl-fake-1"}

        req = only(up, "m")
        assert (req.api, req.method, req.path, req.stream) == (
            "openai",
            "POST",
            "/v1/chat/completions",
            True,
        )
        assert req.headers["authorization"] == "Bearer sk-test"
        assert req.body["messages"] == [{"role": "user", "content": "hi"}]
        assert req.completed and req.deltas_sent == 5 and len(req.delta_times) == 5
        assert req.disconnected_at is None


@pytest.mark.asyncio
async def test_openai_stream_without_usage_and_max_tokens() -> None:
    async with FakeUpstream(default=Script(text=["a", "b", "c", "d"])) as up, oai(up) as client:
        stream = await client.chat.completions.create(
            model="x", messages=OAI_MESSAGES, stream=True, max_completion_tokens=2
        )
        chunks = [chunk async for chunk in stream]
        assert all(c.usage is None and c.choices for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ab"
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.asyncio
async def test_openai_non_stream() -> None:
    async with FakeUpstream() as up, oai(up) as client:
        up.scripts["r"] = Script(tokens=2, reasoning=["think"], finish_reason="content_filter")
        done = await client.chat.completions.create(model="r", messages=OAI_MESSAGES)
        choice = done.choices[0]
        assert choice.message.content == "tok0 tok1 "
        assert getattr(choice.message, "reasoning_content", None) == "think"
        assert choice.finish_reason == "content_filter"
        assert done.usage is not None and done.usage.completion_tokens == 3
        assert done.usage.total_tokens == 13

        short = await client.chat.completions.create(model="q", messages=OAI_MESSAGES, max_tokens=3)
        assert short.choices[0].message.content == "tok0 tok1 tok2 "
        assert short.choices[0].finish_reason == "length"
        assert [r.stream for r in up.requests] == [False, False]


@pytest.mark.asyncio
async def test_anthropic_stream_with_thinking() -> None:
    async with FakeUpstream() as up, ant(up) as client:
        up.scripts["c"] = Script(tokens=3, reasoning=["let me ", "see"], prompt_tokens=4)
        stream = await client.messages.create(
            model="c", max_tokens=100, messages=ANT_MESSAGES, stream=True
        )
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        assert kinds == (
            ["message_start", "content_block_start"]
            + ["content_block_delta"] * 3  # two thinking deltas and the signature
            + ["content_block_stop", "content_block_start"]
            + ["content_block_delta"] * 3
            + ["content_block_stop", "message_delta", "message_stop"]
        )

        async with client.messages.stream(model="c", max_tokens=100, messages=ANT_MESSAGES) as s:
            text = "".join([piece async for piece in s.text_stream])
            message = await s.get_final_message()
        assert text == "tok0 tok1 tok2 "
        thinking, body = message.content
        assert thinking.type == "thinking" and thinking.thinking == "let me see"
        assert body.type == "text" and body.text == "tok0 tok1 tok2 "
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 5)

        first, second = up.by_model("c")
        assert first.api == "anthropic" and first.path == "/v1/messages" and first.stream
        assert first.headers["authorization"] == "Bearer sk-ant-test"
        assert "anthropic-version" in first.headers
        assert first.completed and second.completed and first.deltas_sent == 5


@pytest.mark.asyncio
async def test_anthropic_non_stream_and_max_tokens() -> None:
    async with FakeUpstream() as up, ant(up) as client:
        message = await client.messages.create(model="k", max_tokens=100, messages=ANT_MESSAGES)
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].type == "text"
        assert message.content[0].text == "".join(f"tok{i} " for i in range(8))
        assert message.stop_reason == "end_turn" and message.usage.output_tokens == 8

        cut = await client.messages.create(model="k", max_tokens=2, messages=ANT_MESSAGES)
        assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2

        up.scripts["k"] = Script(tokens=2, finish_reason="length")
        stream = await client.messages.create(
            model="k", max_tokens=100, messages=ANT_MESSAGES, stream=True
        )
        stops = [e.delta.stop_reason async for e in stream if e.type == "message_delta"]
        assert stops == ["max_tokens"]


# -- error responses --


@pytest.mark.asyncio
async def test_openai_error_statuses() -> None:
    async with FakeUpstream() as up, oai(up) as client:
        up.scripts["limited"] = Script(status=429, retry_after=2, error_message="slow down")
        up.scripts["broken"] = Script(status=503, retry_after=1.5)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(
                model="limited", messages=OAI_MESSAGES, stream=True
            )
        assert limited.value.status_code == 429
        assert limited.value.response.headers["retry-after"] == "2"
        assert limited.value.body == {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        with pytest.raises(openai.InternalServerError) as broken:
            await client.chat.completions.create(model="broken", messages=OAI_MESSAGES)
        assert broken.value.response.headers["retry-after"] == "1.5"
        assert only(up, "broken").status == 503

    async with FakeUpstream(api_key="right") as up, oai(up, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="m", messages=OAI_MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()


@pytest.mark.asyncio
async def test_anthropic_error_statuses() -> None:
    async with FakeUpstream() as up, ant(up) as client:
        up.scripts["busy"] = Script(status=529, retry_after=3)
        up.scripts["limited"] = Script(status=429, retry_after=0.5)
        up.scripts["bad"] = Script(status=400, error_message="nope")
        with pytest.raises(anthropic.OverloadedError) as busy:
            await client.messages.create(
                model="busy", max_tokens=10, messages=ANT_MESSAGES, stream=True
            )
        assert busy.value.response.headers["retry-after"] == "3"
        assert busy.value.body == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "scripted failure"},
        }
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="limited", max_tokens=10, messages=ANT_MESSAGES)
        assert limited.value.response.headers["retry-after"] == "0.5"
        with pytest.raises(anthropic.BadRequestError, match="nope"):
            await client.messages.create(model="bad", max_tokens=10, messages=ANT_MESSAGES)

    async with FakeUpstream(api_key="right") as up, ant(up, key="wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await client.messages.create(model="m", max_tokens=10, messages=ANT_MESSAGES)
        assert denied.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid api key"},
        }
    async with FakeUpstream(api_key="right") as up, ant(up, key="right") as client:
        assert (await client.messages.create(model="m", max_tokens=10, messages=ANT_MESSAGES)).id


@pytest.mark.asyncio
async def test_api_key_forms() -> None:
    async with FakeUpstream(api_key="right") as up, httpx2.AsyncClient(base_url=up.url) as http:
        body = {"model": "m", "max_tokens": 5, "messages": []}
        assert (
            await http.post("/v1/messages", json=body, headers={"x-api-key": "right"})
        ).is_success
        bearer = {"authorization": "Bearer right"}
        assert (await http.post("/v1/messages", json=body, headers=bearer)).is_success
        assert (await http.post("/v1/chat/completions", json=body, headers=bearer)).is_success
        # x-api-key is Anthropic's header only.
        wrong = await http.post("/v1/chat/completions", json=body, headers={"x-api-key": "right"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.asyncio
async def test_raw_http_unknown_path_and_malformed_json() -> None:
    async with FakeUpstream() as up, httpx2.AsyncClient(base_url=up.url) as http:
        missing = await http.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "invalid_request_error"
        missing_ant = await http.post("/v1/nothing", headers={"anthropic-version": "2023-06-01"})
        assert missing_ant.status_code == 404
        assert missing_ant.json()["error"]["type"] == "not_found_error"
        bad = await http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["message"]
        bad_ant = await http.post("/v1/messages", content=b"[1, 2]")
        assert bad_ant.status_code == 400 and bad_ant.json()["type"] == "error"
        ok = await http.post("/v1/chat/completions?x=1", json={"model": "m", "stream": True})
        assert ok.headers["content-type"].startswith("text/event-stream")
        assert ok.headers["transfer-encoding"] == "chunked"
        assert ok.text.endswith("data: [DONE]\n\n")
        assert up.requests[-1].query == "x=1"
        assert [r.status for r in up.requests] == [404, 404, 400, 400, 200]
        assert [r.body for r in up.requests[2:4]] == [None, [1, 2]]
        # Every request above travelled over the one keep-alive connection.
        assert {r.connection for r in up.requests} == {1}


# -- scripted interruptions --


@pytest.mark.asyncio
async def test_close_after_makes_both_sdks_raise() -> None:
    async with FakeUpstream(default=Script(tokens=10, close_after=3)) as up:
        async with oai(up) as client:
            stream = await client.chat.completions.create(
                model="o", messages=OAI_MESSAGES, stream=True
            )
            seen: list[str] = []
            with pytest.raises(openai.APIConnectionError) as cut:
                async for chunk in stream:
                    seen.append(chunk.choices[0].delta.content or "")
            assert seen == ["tok0 ", "tok1 ", "tok2 "]
            assert isinstance(cut.value.__cause__, httpx2.RemoteProtocolError)

        async with ant(up) as aclient:
            astream = await aclient.messages.create(
                model="a", max_tokens=100, messages=ANT_MESSAGES, stream=True
            )
            texts: list[str] = []
            # The anthropic SDK lets the transport error through unwrapped.
            with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
                async for event in astream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        texts.append(event.delta.text)
            assert texts == ["tok0 ", "tok1 ", "tok2 "]

        for req in up.requests:
            assert req.deltas_sent == 3 and not req.completed
            # The server closed it: that is not a client disconnect.
            assert req.disconnected_at is None


@pytest.mark.asyncio
async def test_in_band_error_raises_in_both_sdks() -> None:
    async with FakeUpstream(default=Script(tokens=10, error_after=2, error_message="boom")) as up:
        async with oai(up) as client:
            stream = await client.chat.completions.create(
                model="o", messages=OAI_MESSAGES, stream=True
            )
            got = 0
            with pytest.raises(openai.APIError, match="boom") as failed:
                async for _ in stream:
                    got += 1
            assert got == 2 and not isinstance(failed.value, openai.APIStatusError)
            assert failed.value.body == {
                "message": "boom",
                "type": "server_error",
                "code": "internal_error",
            }

        async with ant(up) as aclient:
            astream = await aclient.messages.create(
                model="a", max_tokens=100, messages=ANT_MESSAGES, stream=True
            )
            with pytest.raises(anthropic.APIStatusError, match="overloaded_error") as afailed:
                async for _ in astream:
                    pass
            # The HTTP status was 200, so the SDK picks its generic status-error class.
            assert afailed.value.status_code == 200
            assert afailed.value.body == {
                "type": "error",
                "error": {"type": "overloaded_error", "message": "boom"},
            }
        assert [(r.deltas_sent, r.completed) for r in up.requests] == [(2, True), (2, True)]

        # Non-streamed, the same script becomes a 500.
        async with oai(up) as client:
            with pytest.raises(openai.InternalServerError, match="boom"):
                await client.chat.completions.create(model="o", messages=OAI_MESSAGES)


@pytest.mark.asyncio
async def test_disconnect_recorded_when_client_closes_stream_early() -> None:
    async with FakeUpstream(default=Script(tokens=500, pace=0.005)) as up:
        async with oai(up) as client:
            stream = await client.chat.completions.create(
                model="o", messages=OAI_MESSAGES, stream=True
            )
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    break
            await stream.close()
            req = only(up, "o")
            gone = await up.wait_disconnected(req, timeout=2)
            sent = req.deltas_sent
            await asyncio.sleep(0.03)
            # Generation stopped when the disconnect was seen: 500 deltas would take 2.5 s.
            assert req.deltas_sent == sent < 500 and not req.completed
            assert max(req.delta_times) <= gone

        async with ant(up) as aclient:
            async with aclient.messages.stream(
                model="a", max_tokens=1000, messages=ANT_MESSAGES
            ) as s:
                async for piece in s.text_stream:
                    assert piece == "tok0 "
                    break
            areq = only(up, "a")
            gone = await up.wait_disconnected(areq, timeout=2)
            sent = areq.deltas_sent
            await asyncio.sleep(0.03)
            assert areq.deltas_sent == sent < 500 and not areq.completed
            assert max(areq.delta_times) <= gone


@pytest.mark.asyncio
async def test_disconnect_during_first_token_delay() -> None:
    async with (
        FakeUpstream(default=Script(first_token_delay=30)) as up,
        oai(up, timeout=0.2) as client,
    ):
        stream = await client.chat.completions.create(model="o", messages=OAI_MESSAGES, stream=True)
        with pytest.raises(openai.APITimeoutError):
            async for _ in stream:
                pass
        req = only(up, "o")
        assert await up.wait_disconnected(req, timeout=2) - req.started_at < 1
        assert req.deltas_sent == 0 and req.status == 200


@pytest.mark.asyncio
async def test_disconnect_during_headers_delay() -> None:
    async with FakeUpstream(default=Script(headers_delay=30)) as up, ant(up, timeout=0.2) as client:
        with pytest.raises(anthropic.APITimeoutError):
            await client.messages.create(model="a", max_tokens=5, messages=ANT_MESSAGES)
        req = only(up, "a")
        await up.wait_disconnected(req, timeout=2)
        assert req.status == 0 and not req.completed


@pytest.mark.asyncio
async def test_hang_after_then_client_timeout() -> None:
    async with (
        FakeUpstream(default=Script(tokens=10, hang_after=2)) as up,
        oai(up, timeout=0.3) as client,
    ):
        stream = await client.chat.completions.create(model="o", messages=OAI_MESSAGES, stream=True)
        got = 0
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            async for _ in stream:
                got += 1
        assert got == 2 and time.monotonic() - started >= 0.25
        req = only(up, "o")
        await up.wait_disconnected(req, timeout=2)
        assert req.deltas_sent == 2 and not req.completed


@pytest.mark.asyncio
async def test_pacing_and_delays_are_recorded() -> None:
    script = Script(tokens=4, pace=0.03, first_token_delay=0.05, headers_delay=0.04)
    async with FakeUpstream(default=script) as up, httpx2.AsyncClient(base_url=up.url) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", json={"model": "p", "stream": True}
        ) as r:
            headers_at = time.monotonic()
            assert r.status_code == 200
            body = b"".join([part async for part in r.aiter_bytes()])
        assert body.count(b"data: ") == 6
        req = only(up, "p")
        assert headers_at - req.started_at >= 0.035
        assert req.delta_times[0] - req.started_at >= 0.085
        gaps = [b - a for a, b in zip(req.delta_times, req.delta_times[1:], strict=False)]
        assert all(0.02 <= g < 0.2 for g in gaps), gaps


# -- models, keep-alive, lifecycle --


@pytest.mark.asyncio
async def test_models_list_in_both_formats() -> None:
    async with FakeUpstream() as up, oai(up) as client, ant(up) as aclient:
        oai_ids = [m.id async for m in await client.models.list()]
        ant_page = await aclient.models.list()
        assert oai_ids and all(i.startswith(("gpt", "o")) for i in oai_ids)
        assert ant_page.data and all(m.id.startswith("claude") for m in ant_page.data)
        assert ant_page.data[0].type == "model" and ant_page.data[0].display_name
        assert [r.api for r in up.requests] == ["openai", "anthropic"]

    async with FakeUpstream(models=["a", "b"]) as up, oai(up) as client, ant(up) as aclient:
        assert [m.id async for m in await client.models.list()] == ["a", "b"]
        page = await aclient.models.list()
        assert [m.id for m in page.data] == ["a", "b"]
        assert (page.first_id, page.last_id, page.has_more) == ("a", "b", False)


@pytest.mark.asyncio
async def test_keep_alive_reuses_one_connection() -> None:
    async with FakeUpstream(default=Script(tokens=2)) as up:
        async with oai(up) as client:
            stream = await client.chat.completions.create(
                model="o", messages=OAI_MESSAGES, stream=True
            )
            _ = [c async for c in stream]
            await client.chat.completions.create(model="o", messages=OAI_MESSAGES)
        async with ant(up) as aclient:
            await aclient.messages.create(model="a", max_tokens=5, messages=ANT_MESSAGES)
            astream = await aclient.messages.create(
                model="a", max_tokens=5, messages=ANT_MESSAGES, stream=True
            )
            _ = [e async for e in astream]
        oai_conns = {r.connection for r in up.by_model("o")}
        ant_conns = {r.connection for r in up.by_model("a")}
        assert len(oai_conns) == 1 and len(ant_conns) == 1 and oai_conns != ant_conns


@pytest.mark.asyncio
async def test_stop_closes_open_connections() -> None:
    up = FakeUpstream(default=Script(tokens=5, hang_after=1))
    await up.start()
    url = up.url
    async with httpx2.AsyncClient(base_url=url) as http:
        async with http.stream("POST", "/v1/messages", json={"model": "h", "stream": True}) as r:
            parts = r.aiter_bytes()
            assert b"message_start" in await anext(parts)
            await up.stop()
            with pytest.raises(httpx2.RemoteProtocolError):
                async for _ in parts:
                    pass
        with pytest.raises(httpx2.ConnectError):
            await http.get(url + "/v1/models")
    # Stopped by the server, so no client disconnect is recorded.
    assert only(up, "h").disconnected_at is None


def test_running_in_thread_with_sync_sdk() -> None:
    fake = FakeUpstream(default=Script(tokens=3))
    with fake.running_in_thread() as up:
        with openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0) as client:
            stream = client.chat.completions.create(model="t", messages=OAI_MESSAGES, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == "tok0 tok1 tok2 "
        assert only(up, "t").completed
    with pytest.raises(RuntimeError):
        _ = fake.url


def test_refuses_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeUpstream(host="0.0.0.0")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fakeupstream", "--host", "10.1.2.3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "loopback" in proc.stderr


@pytest.mark.asyncio
async def test_command_line_process() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakeupstream",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tokens",
        "3",
        "--pace",
        "0",
        "--first-token-delay",
        "0",
        "--models",
        "a,b",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("\n")
        url = line.split()[-1]
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as client:
            assert [m.id async for m in await client.models.list()] == ["a", "b"]
            done = await client.chat.completions.create(model="a", messages=OAI_MESSAGES)
            assert done.choices[0].message.content == "tok0 tok1 tok2 "
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stdout.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- tool calls and images --

WEATHER = [
    FakeToolCall("get_weather", ['{"ci', 'ty": "Par', 'is"}']),
    FakeToolCall("get_time", ['{"tz":', ' "CET"}'], id="call_custom"),
]


def sse_data(text: str) -> list[Any]:
    """The JSON payloads of an OpenAI event stream, without the final [DONE]."""
    lines = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def sse_events(text: str) -> list[tuple[str, Any]]:
    """(event name, JSON data) of an Anthropic event stream."""
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


@pytest.mark.asyncio
async def test_openai_tool_calls_wire_shape() -> None:
    async with FakeUpstream() as up, httpx2.AsyncClient(base_url=up.url) as http:
        up.scripts["t"] = Script(text=["one "], tool_calls=WEATHER)
        body = {"model": "t", "stream": True, "messages": OAI_MESSAGES}
        chunks = sse_data((await http.post("/v1/chat/completions", json=body)).text)
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas == [
            {"role": "assistant", "content": "one "},
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]},
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_custom",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            },
            {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz":'}}]},
            {"tool_calls": [{"index": 1, "function": {"arguments": ' "CET"}'}}]},
            {},
        ]
        assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "tool_calls"]
        # One slot per fragment: the text piece and five fragments.
        assert up.requests[-1].deltas_sent == 6

        plain = await http.post("/v1/chat/completions", json={**body, "stream": False})
        (choice,) = plain.json()["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "one "
        assert choice["message"]["tool_calls"] == [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_custom",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ]


@pytest.mark.asyncio
async def test_openai_sdk_reads_tool_calls() -> None:
    async with FakeUpstream() as up, oai(up) as client:
        up.scripts["t"] = Script(tool_calls=WEATHER)
        stream = await client.chat.completions.create(model="t", messages=OAI_MESSAGES, stream=True)
        calls: dict[int, dict[str, str]] = {}
        finish = []
        async for chunk in stream:
            choice = chunk.choices[0]
            finish.append(choice.finish_reason)
            assert choice.delta.content is None
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                seen["id"] += call.id or ""
                assert call.function is not None
                seen["name"] += call.function.name or ""
                seen["arguments"] += call.function.arguments or ""
        assert calls == {
            0: {"id": "call_0", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            1: {"id": "call_custom", "name": "get_time", "arguments": '{"tz": "CET"}'},
        }
        assert finish[-1] == "tool_calls"

        done = await client.chat.completions.create(model="t", messages=OAI_MESSAGES)
        message = done.choices[0].message
        assert message.content is None and done.choices[0].finish_reason == "tool_calls"
        assert message.tool_calls is not None
        assert [(c.id, c.type) for c in message.tool_calls] == [
            ("call_0", "function"),
            ("call_custom", "function"),
        ]


@pytest.mark.asyncio
async def test_anthropic_tool_calls_wire_shape() -> None:
    async with FakeUpstream() as up, httpx2.AsyncClient(base_url=up.url) as http:
        up.scripts["t"] = Script(reasoning=["hm"], text=["one "], tool_calls=WEATHER)
        body = {"model": "t", "max_tokens": 100, "stream": True, "messages": ANT_MESSAGES}
        events = sse_events((await http.post("/v1/messages", json=body)).text)
        blocks = [
            (name, data.get("index"), data.get("content_block") or data.get("delta"))
            for name, data in events
            if name.startswith("content_block")
        ]
        assert blocks[4:] == [
            ("content_block_start", 1, {"type": "text", "text": ""}),
            ("content_block_delta", 1, {"type": "text_delta", "text": "one "}),
            ("content_block_stop", 1, None),
            (
                "content_block_start",
                2,
                {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {}},
            ),
            ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": '{"ci'}),
            ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": 'ty": "Par'}),
            ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": 'is"}'}),
            ("content_block_stop", 2, None),
            (
                "content_block_start",
                3,
                {"type": "tool_use", "id": "call_custom", "name": "get_time", "input": {}},
            ),
            ("content_block_delta", 3, {"type": "input_json_delta", "partial_json": '{"tz":'}),
            ("content_block_delta", 3, {"type": "input_json_delta", "partial_json": ' "CET"}'}),
            ("content_block_stop", 3, None),
        ]
        assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
        assert events[-2][1]["usage"] == {"output_tokens": 7}

        plain = (await http.post("/v1/messages", json={**body, "stream": False})).json()
        assert plain["stop_reason"] == "tool_use"
        assert [b["type"] for b in plain["content"]] == ["thinking", "text", "tool_use", "tool_use"]
        assert plain["content"][2:] == [
            {
                "type": "tool_use",
                "id": "toolu_0",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {"type": "tool_use", "id": "call_custom", "name": "get_time", "input": {"tz": "CET"}},
        ]


@pytest.mark.asyncio
async def test_anthropic_sdk_reads_tool_calls() -> None:
    async with FakeUpstream() as up, ant(up) as client:
        up.scripts["t"] = Script(tool_calls=WEATHER)
        async with client.messages.stream(model="t", max_tokens=100, messages=ANT_MESSAGES) as s:
            fragments = [
                e.delta.partial_json
                async for e in s
                if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
            ]
            message = await s.get_final_message()
        assert fragments == ['{"ci', 'ty": "Par', 'is"}', '{"tz":', ' "CET"}']
        assert message.stop_reason == "tool_use"
        uses = [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
        assert uses == [
            ("toolu_0", "get_weather", {"city": "Paris"}),
            ("call_custom", "get_time", {"tz": "CET"}),
        ]
        assert [b.type for b in message.content] == ["tool_use", "tool_use"]

        up.scripts["r"] = Script(reasoning=["hm"], tool_calls=WEATHER[:1])
        async with client.messages.stream(model="r", max_tokens=100, messages=ANT_MESSAGES) as s:
            thought = await s.get_final_message()
        assert [b.type for b in thought.content] == ["thinking", "tool_use"]

        plain = await client.messages.create(model="t", max_tokens=100, messages=ANT_MESSAGES)
        assert [(b.type, getattr(b, "input", None)) for b in plain.content] == [
            ("tool_use", {"city": "Paris"}),
            ("tool_use", {"tz": "CET"}),
        ]


@pytest.mark.asyncio
async def test_tool_fragments_are_slots_for_interruptions() -> None:
    async with FakeUpstream() as up, oai(up) as client, ant(up) as aclient:
        up.scripts["cut"] = Script(tool_calls=WEATHER, close_after=2)
        stream = await client.chat.completions.create(
            model="cut", messages=OAI_MESSAGES, stream=True
        )
        arguments: list[str] = []
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                for call in chunk.choices[0].delta.tool_calls or []:
                    assert call.function is not None
                    arguments.append(call.function.arguments or "")
        assert arguments == ["", '{"ci', 'ty": "Par']
        assert up.requests[-1].deltas_sent == 2

        up.scripts["err"] = Script(tool_calls=WEATHER, error_after=4)
        astream = await aclient.messages.create(
            model="err", max_tokens=100, messages=ANT_MESSAGES, stream=True
        )
        with pytest.raises(anthropic.APIStatusError):
            async for _ in astream:
                pass
        assert up.requests[-1].deltas_sent == 4


@pytest.mark.asyncio
async def test_images_are_counted_in_the_answer() -> None:
    async with FakeUpstream() as up, oai(up) as client, ant(up) as aclient:
        url = "data:image/png;base64,iVBORw0KGgo="
        done = await client.chat.completions.create(
            model="v",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "image_url", "image_url": {"url": "https://127.0.0.1/a.png"}},
                    ],
                }
            ],
        )
        assert done.choices[0].message.content == "saw 2 image(s) "

        source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
        message = await aclient.messages.create(
            model="v",
            max_tokens=100,
            messages=[{"role": "user", "content": [{"type": "image", "source": source}]}],
        )
        assert message.content[0].type == "text"
        assert message.content[0].text == "saw 1 image(s) "

        up.scripts["said"] = Script(text=["fixed"])
        fixed = await aclient.messages.create(
            model="said",
            max_tokens=100,
            messages=[{"role": "user", "content": [{"type": "image", "source": source}]}],
        )
        assert fixed.content[0].type == "text" and fixed.content[0].text == "fixed"


def test_control_route_scripts_tool_calls() -> None:
    up = FakeUpstream()
    body = {"tool_calls": [{"name": "f", "arguments": ['{"a"', ": 1}"]}], "text": ["x"]}
    assert _Control(up).route("PUT", "/scripts/t", json.dumps(body).encode()) == (200, b"{}")
    assert up.scripts["t"].tool_calls == [FakeToolCall("f", ['{"a"', ": 1}"])]
    assert up.scripts["t"].text == ["x"]
