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
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Literal, Protocol

import msgspec

from providers.base import Outlet
from providers.errors import (
    GatewayError,
    ProviderError,
    SlowConsumerError,
    UpstreamProtocolError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from providers.registry import Registry, Route
from providers.settings import ProviderSettings
from providers.types import (
    ChatRequest,
    Delta,
    Event,
    Finish,
    FinishReason,
    Usage,
)
from server.cache import Cache, CachePolicy, completion_key
from server.errors import (
    ClientGone,
    ServerShuttingDownError,
    as_gateway_error,
    forget_tracebacks,
    spec_for,
)
from server.lifecycle import Lifecycle
from server.observe import StreamObserver
from server.ratelimit import current_principal
from server.stream_state import StreamState

log = logging.getLogger("tokenrelay.chat")


class Sink(Protocol):
    """How one transport writes a stream's events to its client.

    `write_now` is the synchronous fast path for a delta: write it at once and return True,
    or write nothing and return False (then `delta` follows for the same event). The service
    calls it only after the stream's first delta went through `delta`, possibly from the
    upstream connection's read callback (see `providers.base.Outlet`), so it must not wait.
    """

    async def delta(self, event: Delta) -> None: ...

    def write_now(self, event: Delta) -> bool: ...

    async def finish(self, reason: FinishReason, usage: Usage) -> None: ...

    async def error(self, exc: GatewayError) -> None: ...


class Prepared:
    """A validated request with its route and cache policy, ready to run.

    `request` is the typed request whatever dialect it came in, its `model` already the
    upstream's name; `model` is the id the client asked for.
    """

    __slots__ = ("model", "route", "request", "cache_policy", "routes")

    def __init__(
        self,
        model: str,
        route: Route,
        request: ChatRequest,
        cache_policy: CachePolicy,
        fallbacks: list[tuple[str, Route]] | None = None,
    ) -> None:
        self.model = model
        self.route = route
        self.request = request
        self.cache_policy = cache_policy
        # The model asked for, then its fallbacks: (the id clients use, where it goes).
        self.routes: list[tuple[str, Route]] = [(model, route), *(fallbacks or ())]


class CachedAnswer(msgspec.Struct, frozen=True, array_like=True):
    """A complete answer as stored: its events in order, so a replay streams like the original."""

    created: float
    events: list[Delta]
    reason: FinishReason
    usage: Usage | None
    stop_sequence: str | None = None  # last, so entries written before it still decode


_encode_answer = msgspec.msgpack.Encoder().encode
_decode_answer = msgspec.msgpack.Decoder(CachedAnswer).decode
# Answers worth serving again: complete ones (a length cut is what the request asked for).
_STORABLE: frozenset[FinishReason] = frozenset({"stop", "length", "tool_calls"})


async def _replay(answer: CachedAnswer) -> AsyncGenerator[Event, None]:
    for event in answer.events:
        yield event
    yield Finish(reason=answer.reason, usage=answer.usage, stop_sequence=answer.stop_sequence)


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

    def expire(self) -> None:
        """Time out now, whichever side is being waited on."""
        self._scope.reschedule(self._loop.time())

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
        cache_scope: Literal["key", "global"] = "key",
        fallbacks: Mapping[str, list[str]] | None = None,
        retry_budget: float = 30.0,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.registry = registry
        self.lifecycle = lifecycle or Lifecycle()
        self._fallbacks = dict(fallbacks or {})
        self._retry_budget = retry_budget
        self.write_timeout = write_timeout
        self._observer = observer or StreamObserver()
        self._cache = cache  # completions are cached only when a cache is given
        self._cache_ttl = cache_ttl
        self._cache_scope = cache_scope  # "key": answers are kept apart per gateway key

    def prepare(self, request: ChatRequest, cache_control: str | None = None) -> Prepared:
        """Route a decoded, validated request whose `model` is the id the client asked for.

        Raises a `RequestError` before any upstream call: an unknown model, or a field the
        model's provider cannot honour.
        """
        if self.lifecycle.draining:
            raise ServerShuttingDownError(
                "The server is shutting down and takes no new streams; retry on another replica."
            )
        model = request.model
        route = self.registry.resolve(model)
        request = msgspec.structs.replace(request, model=route.model)
        route.provider.check(request)
        policy = CachePolicy.parse(cache_control)
        return Prepared(model, route, request, policy, self._fallbacks_for(model, request))

    def _fallbacks_for(self, model: str, request: ChatRequest) -> list[tuple[str, Route]]:
        """The model's fallbacks that can honour this request (the others are passed over)."""
        routes = []
        for fallback in self._fallbacks.get(model, ()):
            route = self.registry.resolve(fallback)
            try:
                route.provider.check(msgspec.structs.replace(request, model=route.model))
            except GatewayError as exc:
                log.debug("fallback %s passed over: %s", fallback, exc.message)
                continue
            routes.append((fallback, route))
        return routes

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The upstream's count of a request's input tokens (`model` is the id the client
        asked for), or None when its provider offers none; raises as `prepare` does, or a
        `ProviderError`."""
        route = self.registry.resolve(request.model)
        request = msgspec.structs.replace(request, model=route.model)
        route.provider.check(request)
        return await route.provider.count_tokens(request)

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
        self, prepared: Prepared, key: str, events: list[Delta], finish: Finish
    ) -> None:
        assert self._cache is not None
        ttl = self._cache_ttl
        if prepared.cache_policy.max_age is not None:
            ttl = min(ttl, prepared.cache_policy.max_age)
        answer = CachedAnswer(
            time.time(), events, finish.reason, finish.usage, finish.stop_sequence
        )
        try:
            value = _encode_answer(answer)
        except (OverflowError, msgspec.EncodeError) as exc:
            # An answer MessagePack cannot hold (an upstream's token count past 64 bits) is not
            # stored: a cache fault is a miss, never a failure of an answer already sent.
            log.warning("answer not cached: %s", exc)
            return
        await self._cache.set(key, value, ttl)

    async def run(self, prepared: Prepared, sink: Sink, state: StreamState) -> None:
        """Relay one stream to `sink`. Failures go to `sink.error`; a cancel propagates.

        Until the first token reaches the client, a failed upstream is retried (connection
        errors, 429, 5xx: jittered exponential backoff, `Retry-After` honoured) and then the
        model's fallbacks are tried in order, all within the retry budget. After it, a failure
        ends the stream with an error event: a half-sent answer is never restarted.
        """
        state.model = prepared.model
        state.provider = prepared.route.settings.name
        state._request = prepared.request
        self._observer.started(state)
        self.lifecycle.add(state)
        try:
            await self._run(prepared, sink, state)
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
            state.ended_at = time.monotonic()  # every upstream response is closed by now
            self.lifecycle.remove(state)
            self._observer.ended(state)
            if state.error is not None:
                forget_tracebacks(state.error)

    async def _run(self, prepared: Prepared, sink: Sink, state: StreamState) -> None:
        key: str | None = None
        if self._cache is not None:
            tenant = None if self._cache_scope == "global" else current_principal.get() or ""
            key = completion_key(prepared.route.settings.name, prepared.request, tenant)
            if prepared.cache_policy.read:
                answer = await self._cached(prepared, key)
                if answer is not None:
                    state.cached = True
                    await self._relay(prepared, _replay(answer), prepared.route, sink, state)
                    return
            if not prepared.cache_policy.store:
                key = None
        deadline = time.monotonic() + self._retry_budget
        failure: ProviderError | None = None
        for public_id, route in prepared.routes:
            primary = route is prepared.route
            request = (
                prepared.request
                if primary
                else msgspec.structs.replace(prepared.request, model=route.model)
            )
            state.model, state.provider = public_id, route.settings.name
            for attempt in range(route.settings.retries + 1):
                if state.draining:
                    raise _shutting_down()
                outlet = Outlet()
                events = route.provider.stream(request, outlet)
                try:
                    await self._relay(
                        prepared, events, route, sink, state, key if primary else None, outlet
                    )
                    return
                except ProviderError as exc:
                    self._observer.upstream_failed(route.settings.name, exc)
                    if state.chunks or state.draining:
                        raise  # the client has part of an answer, or the server is stopping
                    failure = exc
                    delay = _retry_delay(exc, attempt, route.settings)
                    if delay is None or time.monotonic() + delay > deadline:
                        break
                    log.info(
                        "retrying upstream",
                        extra={"fields": _retry_fields(state, exc, attempt, delay)},
                    )
                    await state.pause(delay)
            if time.monotonic() >= deadline:
                break
        assert failure is not None
        raise failure

    async def _relay(
        self,
        prepared: Prepared,
        events: AsyncGenerator[Event, None],
        route: Route,
        sink: Sink,
        state: StreamState,
        key: str | None = None,
        outlet: Outlet | None = None,
    ) -> None:
        """One upstream attempt: relay its events until the finish, or raise what failed.

        Once the first delta is out, `outlet` (when given) lets the provider write later
        deltas from its read callback; they are counted, recorded for the cache and reset
        the idle timer there, as they are here."""
        loop = asyncio.get_running_loop()
        recording: list[Delta] | None = [] if key is not None else None
        watchdog: _Watchdog | None = None
        try:
            async with asyncio.timeout(None) as scope, contextlib.aclosing(events):
                watchdog = _Watchdog(scope, route.settings.first_token_timeout, self.write_timeout)
                state.watchdog = watchdog
                async for event in events:
                    watchdog.writing = True
                    watchdog.since = loop.time()
                    if isinstance(event, Finish):
                        state.reason = event.reason
                        state.stop_sequence = event.stop_sequence
                        state.usage = event.usage
                        await sink.finish(event.reason, state.usage_so_far())
                        state.outcome = "completed"
                        if recording is not None and key is not None and event.reason in _STORABLE:
                            await self._store(prepared, key, recording, event)
                        return
                    if recording is not None:
                        recording.append(event)
                    await sink.delta(event)
                    state.chunks += 1
                    if state.first_token_at is None:
                        state.first_token_at = time.monotonic()
                        watchdog.first_token(route.settings.idle_timeout)
                        if outlet is not None:
                            outlet.write = _direct(sink, state, watchdog, loop, recording)
                    watchdog.writing = False
                    watchdog.since = loop.time()
                raise UpstreamProtocolError(
                    f"{route.settings.name}: the stream ended without a finish"
                )
        except TimeoutError as exc:
            if watchdog is None or not scope.expired():
                raise
            raise self._timeout_error(watchdog, state) from exc
        finally:
            if outlet is not None:
                outlet.write = None
            state.watchdog = None
            if watchdog is not None:
                watchdog.cancel()

    @staticmethod
    def _timeout_error(watchdog: _Watchdog, state: StreamState) -> GatewayError:
        if state.draining:
            return _shutting_down()
        if watchdog.writing:
            return SlowConsumerError(
                f"The client did not read the stream for {watchdog.write_limit:g} s; "
                "the stream was ended."
            )
        waited = "first token" if state.first_token_at is None else "next chunk"
        return UpstreamTimeoutError(
            f"{state.provider}: no {waited} within {watchdog.upstream_limit:g} s"
        )

    async def _fail(self, sink: Sink, state: StreamState, exc: GatewayError) -> None:
        state.reason = "error"
        state.error = exc
        state.outcome = "timeout" if isinstance(exc, UpstreamTimeoutError) else "error"
        await write_or_abort(sink.error(exc), state, self.write_timeout)


def _direct(
    sink: Sink,
    state: StreamState,
    watchdog: _Watchdog,
    loop: asyncio.AbstractEventLoop,
    recording: list[Delta] | None,
) -> Callable[[Delta], bool]:
    """The outlet's writer for one attempt: the sink's `write_now`, with what `_relay` does
    for each delta it writes (record it for the cache, count it, restart the idle timer)."""
    write_now = sink.write_now

    def direct(event: Delta) -> bool:
        if not write_now(event):
            return False
        if recording is not None:
            recording.append(event)
        state.chunks += 1
        watchdog.since = loop.time()
        return True

    return direct


ERROR_WRITE_TIMEOUT = 5.0


async def write_or_abort(write: Awaitable[None], state: StreamState, write_timeout: float) -> None:
    """Write a stream's last words within a short deadline, else drop the connection.

    A client that stopped reading would otherwise hold the write, the task, the connection
    and the key's stream slot for as long as it likes.
    """
    try:
        async with asyncio.timeout(min(ERROR_WRITE_TIMEOUT, write_timeout)):
            await write
    except TimeoutError:
        if state.abort is not None:
            state.abort()
        log.info(
            "client dropped: it did not read the end of its stream",
            extra={"fields": {"request_id": state.request_id}},
        )


def _shutting_down() -> ServerShuttingDownError:
    return ServerShuttingDownError(
        "The server is shutting down; the stream was ended. Retry on another replica."
    )


_RETRYABLE = (UpstreamUnavailableError, UpstreamRateLimitError, UpstreamProtocolError)


def _retry_delay(exc: ProviderError, attempt: int, settings: ProviderSettings) -> float | None:
    """Seconds to wait before trying the same upstream again, or None not to.

    Connection failures, 5xx, 429 and streams cut before the first token are retried;
    refusals (auth, bad request, unknown model) and first-token timeouts are not. The upstream's
    `Retry-After` wins over the backoff, which doubles per attempt with "equal jitter".
    """
    if not isinstance(exc, _RETRYABLE) or attempt >= settings.retries:
        return None
    if exc.retry_after is not None:
        return exc.retry_after
    ceiling = min(settings.retry_backoff * 2**attempt, settings.retry_max_delay)
    return random.uniform(ceiling / 2, ceiling)


def _retry_fields(
    state: StreamState, exc: ProviderError, attempt: int, delay: float
) -> dict[str, object]:
    return {
        "request_id": state.request_id,
        "provider": state.provider,
        "attempt": attempt + 1,
        "delay_ms": round(delay * 1000, 1),
        "error": spec_for(exc).code,
        # Why an unreachable upstream failed, and which host:port (logs only, never clients).
        **({"upstream": exc.upstream, "cause": exc.cause} if exc.cause is not None else {}),
    }
