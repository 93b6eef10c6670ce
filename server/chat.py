"""The one stream service every transport uses: routing, timeouts, usage, errors as events.

A transport hands `run()` a `Sink` (how to write deltas, the finish and an error on its wire)
and a `StreamState` it can read afterwards. The service drives the provider's iterator inside
`contextlib.aclosing`, so every way a stream ends (finish, error, timeout, the consuming task
being cancelled by a client's cancel or disconnect) closes the upstream response. A cancel is
never swallowed: `CancelledError` propagates to the transport that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Protocol

import msgspec

from providers.errors import (
    GatewayError,
    SlowConsumerError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from providers.registry import Registry, Route
from providers.types import (
    ChatRequest,
    Event,
    Finish,
    FinishReason,
    ReasoningDelta,
    TextDelta,
    Usage,
    estimate_tokens,
)
from server.cache import Cache, CachePolicy, completion_key
from server.errors import ClientGone, as_gateway_error
from server.metrics import Outcome, Transport
from server.observe import StreamObserver
from server.protocol import ChatCompletionBody

log = logging.getLogger("tokenrelay.chat")


class Sink(Protocol):
    """How one transport writes a stream's events to its client."""

    async def delta(self, event: TextDelta | ReasoningDelta) -> None: ...

    async def finish(self, reason: FinishReason, usage: Usage) -> None: ...

    async def error(self, exc: GatewayError) -> None: ...


class StreamState:
    """What happened in one stream so far; the transport may read it after a cancel.

    Times are `time.monotonic()` (uvloop's loop clock moves in whole milliseconds, too coarse
    for time to first token and cancel propagation).
    """

    __slots__ = (
        "request_id",
        "transport",
        "cached",
        "cancel_cause",
        "cancelled_at",
        "outcome",
        "model",
        "provider",
        "started_at",
        "first_token_at",
        "ended_at",
        "chunks",
        "reason",
        "usage",
        "error",
        "_request",
    )

    def __init__(self, request_id: str, started_at: float, transport: Transport) -> None:
        self.request_id = request_id
        self.transport: Transport = transport
        self.started_at = started_at
        # Set by the transport just before it cancels the stream's task.
        self.cancel_cause: Outcome | None = None
        self.cancelled_at: float | None = None
        self.outcome: Outcome = "client_disconnected"
        self.cached = False  # served from the completion cache
        self.model = ""
        self.provider = ""
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.chunks = 0
        self.reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.error: GatewayError | None = None
        self._request: ChatRequest | None = None

    def cancel(self, cause: Outcome) -> None:
        """Note why and when the transport is about to cancel this stream."""
        if self.cancel_cause is None:
            self.cancel_cause = cause
            self.cancelled_at = time.monotonic()

    @property
    def ttft(self) -> float | None:
        """Seconds from the request's arrival to the first token written to the client."""
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    def messages(self) -> list[dict[str, str]]:
        """The request's messages as role and text (only ever logged when explicitly enabled)."""
        if self._request is None:
            return []
        return [{"role": m.role, "content": m.text} for m in self._request.messages]

    def usage_so_far(self) -> Usage:
        """The upstream's usage when it sent one, else a count of what was relayed."""
        if self.usage is not None:
            return self.usage
        prompt = 0
        if self._request is not None:
            prompt = sum(estimate_tokens(m.text) for m in self._request.messages)
        return Usage(prompt_tokens=prompt, completion_tokens=self.chunks)


class Prepared:
    """A validated request with its route and cache policy, ready to run."""

    __slots__ = ("body", "route", "request", "cache_policy")

    def __init__(
        self,
        body: ChatCompletionBody,
        route: Route,
        request: ChatRequest,
        cache_policy: CachePolicy,
    ) -> None:
        self.body = body
        self.route = route
        self.request = request
        self.cache_policy = cache_policy


class CachedAnswer(msgspec.Struct, frozen=True, array_like=True):
    """A complete answer as stored: its events in order, so a replay streams like the original."""

    created: float
    events: list[TextDelta | ReasoningDelta]
    reason: FinishReason
    usage: Usage | None


_encode_answer = msgspec.msgpack.Encoder().encode
_decode_answer = msgspec.msgpack.Decoder(CachedAnswer).decode
# Answers worth serving again: complete ones (a length cut is what the request asked for).
_STORABLE: frozenset[FinishReason] = frozenset({"stop", "length"})


async def _replay(answer: CachedAnswer) -> AsyncGenerator[Event, None]:
    for event in answer.events:
        yield event
    yield Finish(reason=answer.reason, usage=answer.usage)


class _Watchdog:
    """First-token, idle and slow-client timeouts without per-chunk timer churn.

    The stream notes which side it is waiting on (the upstream, or its client while a write
    is blocked) and since when; a timer checks lazily and, once a limit has passed, expires
    the enclosing `asyncio.timeout`, which cancels the stream's task and surfaces as
    `TimeoutError` from exactly that scope. Time spent writing to a slow client therefore
    never counts against the upstream, and the reverse.
    """

    __slots__ = ("_scope", "_loop", "_handle", "upstream_limit", "write_limit", "writing", "since")

    def __init__(self, scope: asyncio.Timeout, upstream_limit: float, write_limit: float) -> None:
        self._scope = scope
        self._loop = asyncio.get_running_loop()
        self.upstream_limit = upstream_limit
        self.write_limit = write_limit
        self.writing = False
        self.since = self._loop.time()
        self._handle = self._loop.call_at(
            self.since + min(upstream_limit, write_limit) / 4, self._check
        )

    def _check(self) -> None:
        due = self.since + (self.write_limit if self.writing else self.upstream_limit)
        now = self._loop.time()
        if now >= due:
            self._scope.reschedule(now)
        else:
            # The side being waited on can change before `due`; looking again at least every
            # quarter of the shorter limit bounds how late a timeout is noticed.
            step = min(self.upstream_limit, self.write_limit) / 4
            self._handle = self._loop.call_at(min(due, now + step), self._check)

    def first_token(self, idle_limit: float) -> None:
        """Switch from the first-token limit to the idle limit, and look again soon enough."""
        self.upstream_limit = idle_limit
        self._handle.cancel()
        step = min(idle_limit, self.write_limit) / 4
        self._handle = self._loop.call_at(self._loop.time() + step, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class ChatService:
    """Resolves models and runs streams; shared by REST, SSE and WebSocket."""

    def __init__(
        self,
        registry: Registry,
        *,
        write_timeout: float = 30.0,
        observer: StreamObserver | None = None,
        cache: Cache | None = None,
        cache_ttl: float = 3600.0,
    ) -> None:
        self.registry = registry
        self._write_timeout = write_timeout
        self._observer = observer or StreamObserver()
        self._cache = cache  # completions are cached only when a cache is given
        self._cache_ttl = cache_ttl

    def prepare(self, body: ChatCompletionBody, cache_control: str | None = None) -> Prepared:
        """Validate the body and route it; raises a `RequestError` before any upstream call."""
        unsupported = body.unsupported()
        if unsupported is not None:
            raise unsupported
        route = self.registry.resolve(body.model)
        policy = CachePolicy.parse(cache_control)
        return Prepared(body, route, body.to_request(route.model), policy)

    async def _cached(self, prepared: Prepared, key: str) -> CachedAnswer | None:
        assert self._cache is not None
        raw = await self._cache.get(key)
        if raw is None:
            return None
        try:
            answer = _decode_answer(raw)
        except msgspec.DecodeError:
            await self._cache.delete(key)  # written by an incompatible version: drop it
            return None
        max_age = prepared.cache_policy.max_age
        if max_age is not None and time.time() - answer.created > max_age:
            return None
        return answer

    async def _store(
        self, prepared: Prepared, key: str, events: list[TextDelta | ReasoningDelta], finish: Finish
    ) -> None:
        assert self._cache is not None
        ttl = self._cache_ttl
        if prepared.cache_policy.max_age is not None:
            ttl = min(ttl, prepared.cache_policy.max_age)
        answer = CachedAnswer(time.time(), events, finish.reason, finish.usage)
        await self._cache.set(key, _encode_answer(answer), ttl)

    async def run(self, prepared: Prepared, sink: Sink, state: StreamState) -> None:
        """Relay one stream to `sink`. Failures go to `sink.error`; a cancel propagates."""
        route = prepared.route
        state.model = prepared.body.model
        state.provider = route.settings.name
        state._request = prepared.request
        loop = asyncio.get_running_loop()
        watchdog: _Watchdog | None = None
        self._observer.started(state)
        policy = prepared.cache_policy
        key: str | None = None
        recording: list[TextDelta | ReasoningDelta] | None = None
        events: AsyncGenerator[Event, None] | None = None
        if self._cache is not None:
            key = completion_key(route.settings.name, prepared.request)
            if policy.read:
                answer = await self._cached(prepared, key)
                if answer is not None:
                    state.cached = True
                    events = _replay(answer)
            if events is None and policy.store:
                recording = []
        if events is None:
            events = route.provider.stream(prepared.request)
        try:
            async with asyncio.timeout(None) as scope, contextlib.aclosing(events):
                watchdog = _Watchdog(scope, route.settings.first_token_timeout, self._write_timeout)
                async for event in events:
                    watchdog.writing = True
                    watchdog.since = loop.time()
                    if isinstance(event, Finish):
                        state.reason = event.reason
                        state.usage = event.usage
                        await sink.finish(event.reason, state.usage_so_far())
                        state.outcome = "completed"
                        if recording is not None and key is not None and event.reason in _STORABLE:
                            await self._store(prepared, key, recording, event)
                        break
                    if recording is not None:
                        recording.append(event)
                    await sink.delta(event)
                    state.chunks += 1
                    if state.first_token_at is None:
                        state.first_token_at = time.monotonic()
                        watchdog.first_token(route.settings.idle_timeout)
                    watchdog.writing = False
                    watchdog.since = loop.time()
                else:
                    raise UpstreamProtocolError(
                        f"{route.settings.name}: the stream ended without a finish"
                    )
        except TimeoutError as exc:
            if watchdog is None or not scope.expired():
                await self._fail(sink, state, as_gateway_error(exc, state.request_id))
                return
            await self._fail(sink, state, self._timeout_error(watchdog, state))
            log.debug("stream %s timed out", state.request_id, exc_info=exc)
        except asyncio.CancelledError:
            state.outcome = state.cancel_cause or "client_disconnected"
            raise
        except ClientGone:
            state.outcome = "client_disconnected"
            raise  # nobody to tell; the upstream is already closed
        except GatewayError as exc:
            await self._fail(sink, state, exc)
        except Exception as exc:
            await self._fail(sink, state, as_gateway_error(exc, state.request_id))
        finally:
            if watchdog is not None:
                watchdog.cancel()
            state.ended_at = time.monotonic()  # the upstream response is closed by now
            self._observer.ended(state)

    @staticmethod
    def _timeout_error(watchdog: _Watchdog, state: StreamState) -> GatewayError:
        if watchdog.writing:
            return SlowConsumerError(
                f"The client did not read the stream for {watchdog.write_limit:g} s; "
                "the stream was ended."
            )
        waited = "first token" if state.first_token_at is None else "next chunk"
        return UpstreamTimeoutError(
            f"{state.provider}: no {waited} within {watchdog.upstream_limit:g} s"
        )

    @staticmethod
    async def _fail(sink: Sink, state: StreamState, exc: GatewayError) -> None:
        state.reason = "error"
        state.error = exc
        state.outcome = "timeout" if isinstance(exc, UpstreamTimeoutError) else "error"
        await sink.error(exc)
