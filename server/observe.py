"""Recording what happened: per-stream metrics and log lines, and per-request HTTP ones.

`StreamObserver` is called by the stream service when a stream starts and ends, whatever the
transport; `RequestObserver` is a pure ASGI middleware (no buffering, nothing per chunk beyond
passing messages on) that gives every HTTP request an id, a metric and a log line.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from providers.errors import ProviderError
from server import metrics
from server.errors import spec_for
from server.http import request_id_of
from server.webheaders import add_security_headers

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from server.stream_state import StreamState

stream_log = logging.getLogger("tokenrelay.stream")
request_log = logging.getLogger("tokenrelay.request")

_ACTIVE = {t: metrics.STREAMS_ACTIVE.labels(t) for t in metrics.TRANSPORTS}
_CANCEL = {t: metrics.CANCEL_PROPAGATION.labels(t) for t in metrics.TRANSPORTS}


class StreamObserver:
    """Metrics and one log line per stream, recorded once at its end."""

    def __init__(self, *, log_content: bool = False) -> None:
        self._log_content = log_content

    def started(self, state: StreamState) -> None:
        _ACTIVE[state.transport].inc()

    def upstream_failed(self, provider: str, exc: ProviderError) -> None:
        """Every failed upstream attempt, including ones a retry or a fallback then saved."""
        metrics.UPSTREAM_ERRORS.labels(provider, spec_for(exc).code).inc()

    def ended(self, state: StreamState) -> None:
        transport, provider, outcome = state.transport, state.provider, state.outcome
        _ACTIVE[transport].dec()
        ended_at = state.ended_at or state.started_at
        duration = ended_at - state.started_at
        metrics.child(metrics.STREAMS, transport, provider, outcome).inc()
        metrics.child(metrics.STREAM_DURATION, transport, provider, outcome).observe(duration)
        ttft = state.ttft
        if ttft is not None:
            metrics.child(metrics.STREAM_TTFT, transport, provider).observe(ttft)
        if state.chunks:
            metrics.child(metrics.CHUNKS, transport, provider).inc(state.chunks)
        usage = state.usage_so_far()
        if outcome == "completed" or state.chunks:  # a stream that relayed nothing used nothing
            metrics.child(metrics.TOKENS, transport, provider, "prompt").inc(usage.prompt_tokens)
            metrics.child(metrics.TOKENS, transport, provider, "completion").inc(
                usage.completion_tokens
            )
        if state.cancelled_at is not None and outcome in ("cancelled", "client_disconnected"):
            _CANCEL[transport].observe(max(ended_at - state.cancelled_at, 0.0))
        code = None if state.error is None else spec_for(state.error).code
        fields: dict[str, Any] = {
            "request_id": state.request_id,
            "transport": transport,
            "provider": provider,
            "model": state.model,
            "outcome": outcome,
            "error": code,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
            "duration_ms": round(duration * 1000, 3),
            "chunks": state.chunks,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        }
        if isinstance(state.error, ProviderError) and state.error.cause is not None:
            fields.update(upstream=state.error.upstream, cause=state.error.cause)
        stream_log.info("stream", extra={"fields": fields})
        if self._log_content and stream_log.isEnabledFor(logging.DEBUG):
            stream_log.debug(
                "stream content",
                extra={"fields": {"request_id": state.request_id, "messages": state.messages()}},
            )


class RequestObserver:
    """ASGI middleware: a request id and the security headers on every HTTP response, a
    metric and a log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id_of(scope)
        rid_header = (b"x-request-id", rid.encode())
        status = 500  # unless a response starts

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers.append(rid_header)
                add_security_headers(headers)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            duration = time.perf_counter() - started
            route = metrics.route_label(scope["path"])
            method = scope["method"] if scope["method"] in _METHODS else "other"
            metrics.child(metrics.HTTP_REQUESTS, route, method, metrics.status_label(status)).inc()
            metrics.child(metrics.HTTP_DURATION, route, method).observe(duration)
            fields = {
                "request_id": rid,
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(duration * 1000, 3),
            }
            request_log.info("request", extra={"fields": fields})


_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
