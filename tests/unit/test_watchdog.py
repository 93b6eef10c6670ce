"""server.chat.ChatService.run: timeouts, errors as sink events, cleanup and cancellation.

Providers here are tiny in-test classes; timeouts are 50 ms so the waits stay short. Nothing
asserts how long anything took, except that an idle timeout fires before a far-off deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import pytest

from providers.base import Outlet
from providers.errors import (
    GatewayError,
    SlowConsumerError,
    UpstreamProtocolError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from providers.registry import Registry
from providers.settings import ProviderSettings
from providers.types import (
    ChatRequest,
    Delta,
    Event,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    Usage,
)
from server.chat import ChatService, StreamState
from server.errors import ClientGone
from server.protocol import chat_request, decode_body

Script = Callable[["FakeProvider", ChatRequest], AsyncIterator[Event]]
FOREVER = 3600


class FakeProvider:
    """Runs a script as its stream and records that its `finally` ran."""

    def __init__(self, script: Script) -> None:
        self.name = "p"
        self.script = script
        self.started = asyncio.Event()
        self.closed = 0
        self.requests: list[ChatRequest] = []

    def check(self, request: ChatRequest) -> None:
        return None

    async def stream(
        self, request: ChatRequest, outlet: Outlet | None = None
    ) -> AsyncGenerator[Event, None]:
        self.requests.append(request)
        self.started.set()
        try:
            async for event in self.script(self, request):
                yield event
        finally:
            self.closed += 1  # "closes the upstream response"

    async def list_models(self) -> list[str]:
        return ["x"]

    async def aclose(self) -> None:
        return None


class RecordingSink:
    """Records calls; `write_delay` makes every delta write slow, `gone` makes it fail."""

    def __init__(self, *, write_delay: float = 0.0, gone: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.got_delta = asyncio.Event()
        self.write_delay = write_delay
        self.gone = gone

    async def delta(self, event: TextDelta | ReasoningDelta) -> None:
        if self.gone:
            raise ClientGone()
        if self.write_delay:
            await asyncio.sleep(self.write_delay)
        self.calls.append(("delta", event))
        self.got_delta.set()

    def write_now(self, event: Delta) -> bool:
        return False  # every delta goes through `delta`, so its delay and failure apply

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        self.calls.append(("finish", (reason, usage)))

    async def error(self, exc: GatewayError) -> None:
        self.calls.append(("error", exc))


def service_for(
    provider: FakeProvider,
    *,
    first_token_timeout: float = 0.05,
    idle_timeout: float = 0.05,
    write_timeout: float = 30.0,
) -> ChatService:
    settings = ProviderSettings(
        name="p",
        kind="openai",
        base_url="http://127.0.0.1:9",
        first_token_timeout=first_token_timeout,
        idle_timeout=idle_timeout,
    )
    return ChatService(Registry({"p": (provider, settings)}), write_timeout=write_timeout)


async def run(
    script: Script, sink: RecordingSink | None = None, **timeouts: float
) -> tuple[FakeProvider, RecordingSink, StreamState]:
    provider = FakeProvider(script)
    service = service_for(provider, **timeouts)
    prepared = service.prepare(
        chat_request(
            decode_body(b'{"model":"p/x","messages":[{"role":"user","content":"say hi now"}]}')
        )
    )
    sink = sink or RecordingSink()
    state = StreamState("req-123", started_at=0.0, transport="rest")
    await service.run(prepared, sink, state)
    return provider, sink, state


def only_error(sink: RecordingSink) -> GatewayError:
    errors = [arg for name, arg in sink.calls if name == "error"]
    assert len(errors) == 1, sink.calls
    assert sink.calls[-1][0] == "error"
    assert not any(name == "finish" for name, _ in sink.calls)
    exc = errors[0]
    assert isinstance(exc, GatewayError)
    return exc


async def test_normal_stream_finishes_with_usage() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield ReasoningDelta("think")
        yield TextDelta("Hel")
        yield TextDelta("lo")
        yield Finish(reason="stop", usage=Usage(prompt_tokens=3, completion_tokens=2))

    provider, sink, state = await run(script)
    assert sink.calls == [
        ("delta", ReasoningDelta("think")),
        ("delta", TextDelta("Hel")),
        ("delta", TextDelta("lo")),
        ("finish", ("stop", Usage(prompt_tokens=3, completion_tokens=2))),
    ]
    assert provider.closed == 1
    assert provider.requests[0].model == "x"
    assert state.reason == "stop"
    assert state.chunks == 3
    assert state.error is None
    assert state.model == "p/x"
    assert state.provider == "p"
    assert state.first_token_at is not None
    assert state.ended_at is not None


async def test_finish_without_usage_counts_what_was_relayed() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("a")
        yield TextDelta("b")
        yield Finish(reason="length")

    provider, sink, state = await run(script)
    # "say hi now" is 3 estimated prompt tokens; 2 chunks were relayed.
    assert sink.calls[-1] == ("finish", ("length", Usage(prompt_tokens=3, completion_tokens=2)))
    assert state.usage is None
    assert provider.closed == 1


async def test_events_after_finish_are_not_read() -> None:
    after: list[str] = []

    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield Finish(reason="stop", usage=Usage())
        after.append("resumed")
        yield TextDelta("late")

    provider, sink, _ = await run(script)
    assert sink.calls == [("finish", ("stop", Usage()))]
    assert after == []
    assert provider.closed == 1


async def test_no_first_token() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        await asyncio.sleep(FOREVER)
        yield TextDelta("never")

    provider, sink, state = await run(script)
    exc = only_error(sink)
    assert type(exc) is UpstreamTimeoutError
    assert exc.message == "p: no first token within 0.05 s"
    assert sink.calls == [("error", exc)]
    assert provider.closed == 1
    assert state.reason == "error"
    assert state.error is exc
    assert state.first_token_at is None


async def test_stall_after_first_chunk() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("one")
        await asyncio.sleep(FOREVER)
        yield TextDelta("never")

    provider, sink, state = await run(script)
    exc = only_error(sink)
    assert type(exc) is UpstreamTimeoutError
    assert exc.message == "p: no next chunk within 0.05 s"
    assert sink.calls[0] == ("delta", TextDelta("one"))
    assert provider.closed == 1
    assert state.chunks == 1


async def test_idle_timeout_is_not_held_back_by_a_long_first_token_timeout() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("one")
        await asyncio.sleep(FOREVER)
        yield TextDelta("never")

    # The idle limit is 50 ms; the first-token limit is an hour and the write limit 30 s. A stall
    # after the first chunk must be noticed on the idle limit's scale (0.5 s is 10x it), not on
    # the scale of the other limits.
    try:
        async with asyncio.timeout(0.5):
            provider, sink, _ = await run(script, first_token_timeout=FOREVER, idle_timeout=0.05)
    except TimeoutError:
        pytest.fail("a 50 ms idle timeout had not fired after 500 ms")
    exc = only_error(sink)
    assert exc.message == "p: no next chunk within 0.05 s"
    assert provider.closed == 1


async def test_slow_but_steady_stream_is_not_timed_out() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        for i in range(8):
            await asyncio.sleep(0.02)
            yield TextDelta(str(i))
        yield Finish(reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=8))

    # Every gap is well under the 100 ms limits although the whole stream takes longer.
    provider, sink, _ = await run(script, first_token_timeout=0.1, idle_timeout=0.1)
    assert [arg for name, arg in sink.calls if name == "delta"] == [
        TextDelta(str(i)) for i in range(8)
    ]
    assert sink.calls[-1] == ("finish", ("stop", Usage(prompt_tokens=1, completion_tokens=8)))
    assert provider.closed == 1


async def test_client_not_reading_is_a_slow_consumer_error() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("one")
        yield Finish(reason="stop")

    sink = RecordingSink(write_delay=FOREVER)
    provider, sink, state = await run(
        script, sink, first_token_timeout=FOREVER, idle_timeout=FOREVER, write_timeout=0.05
    )
    exc = only_error(sink)
    assert type(exc) is SlowConsumerError
    assert exc.message == "The client did not read the stream for 0.05 s; the stream was ended."
    assert sink.calls == [("error", exc)]
    assert provider.closed == 1
    assert state.error is exc


async def test_slow_writes_do_not_count_against_the_upstream() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        for i in range(2):
            yield TextDelta(str(i))
        yield Finish(reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=2))

    # Each write takes 2x the idle limit; the upstream itself answers at once.
    sink = RecordingSink(write_delay=0.1)
    provider, sink, _ = await run(
        script, sink, first_token_timeout=0.05, idle_timeout=0.05, write_timeout=FOREVER
    )
    assert sink.calls == [
        ("delta", TextDelta("0")),
        ("delta", TextDelta("1")),
        ("finish", ("stop", Usage(prompt_tokens=1, completion_tokens=2))),
    ]
    assert provider.closed == 1


async def test_client_gone_propagates_and_closes_the_upstream() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("one")
        yield Finish(reason="stop")

    provider = FakeProvider(script)
    service = service_for(provider)
    prepared = service.prepare(
        chat_request(decode_body(b'{"model":"p/x","messages":[{"role":"user","content":"hi"}]}'))
    )
    sink = RecordingSink(gone=True)
    state = StreamState("r", 0.0, "rest")
    with pytest.raises(ClientGone):
        await service.run(prepared, sink, state)
    assert provider.closed == 1
    assert sink.calls == []
    assert state.error is None


async def test_provider_error_goes_to_sink() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("partial")
        raise UpstreamRateLimitError("p: upstream is rate limiting requests", retry_after=3.0)

    provider, sink, state = await run(script)
    exc = only_error(sink)
    assert type(exc) is UpstreamRateLimitError
    assert exc.retry_after == 3.0
    assert sink.calls[0] == ("delta", TextDelta("partial"))
    assert provider.closed == 1
    assert state.error is exc


async def test_unexpected_exception_is_hidden_behind_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        raise RuntimeError("secret internal detail")
        yield TextDelta("never")

    provider, sink, _ = await run(script)
    exc = only_error(sink)
    assert type(exc) is GatewayError
    assert "req-123" in exc.message
    assert "secret internal detail" not in exc.message
    assert "RuntimeError" not in exc.message
    assert provider.closed == 1
    assert any("req-123" in record.getMessage() for record in caplog.records)


async def test_provider_raising_its_own_timeout_is_not_a_watchdog_timeout() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("a")
        raise TimeoutError("inner")

    provider, sink, _ = await run(script, first_token_timeout=FOREVER, idle_timeout=FOREVER)
    exc = only_error(sink)
    assert type(exc) is GatewayError
    assert "req-123" in exc.message
    assert provider.closed == 1


async def test_stream_ending_without_finish_is_a_protocol_error() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("a")

    provider, sink, _ = await run(script)
    exc = only_error(sink)
    assert type(exc) is UpstreamProtocolError
    assert exc.message == "p: the stream ended without a finish"
    assert provider.closed == 1


async def test_cancel_propagates_and_closes_the_upstream() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        yield TextDelta("one")
        await asyncio.sleep(FOREVER)
        yield TextDelta("never")

    provider = FakeProvider(script)
    service = service_for(provider, first_token_timeout=FOREVER, idle_timeout=FOREVER)
    prepared = service.prepare(
        chat_request(decode_body(b'{"model":"p/x","messages":[{"role":"user","content":"hi"}]}'))
    )
    sink = RecordingSink()
    state = StreamState("req-9", started_at=0.0, transport="rest")
    task = asyncio.create_task(service.run(prepared, sink, state))
    await provider.started.wait()
    await sink.got_delta.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert provider.closed == 1
    assert sink.calls == [("delta", TextDelta("one"))]
    assert state.error is None
    assert state.ended_at is not None


async def test_cancel_before_first_token() -> None:
    async def script(p: FakeProvider, r: ChatRequest) -> AsyncIterator[Event]:
        await asyncio.sleep(FOREVER)
        yield TextDelta("never")

    provider = FakeProvider(script)
    service = service_for(provider, first_token_timeout=FOREVER, idle_timeout=FOREVER)
    prepared = service.prepare(
        chat_request(decode_body(b'{"model":"p/x","messages":[{"role":"user","content":"hi"}]}'))
    )
    sink = RecordingSink()
    task = asyncio.create_task(service.run(prepared, sink, StreamState("r", 0.0, "rest")))
    await provider.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.closed == 1
    assert sink.calls == []
