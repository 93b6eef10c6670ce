"""The app factory: routes, error handlers and lifespan, wired explicitly."""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
from collections.abc import AsyncIterator, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from providers.errors import GatewayError
from providers.registry import Registry
from server import guard, protocol
from server.address import PublicAddress
from server.admission import StreamGate
from server.auth import Gatekeeper, KeyRing
from server.cache import Cache, MemoryCache, RedisCache
from server.catalog import Catalog
from server.chat import ChatService
from server.dialects import messages_api, messages_wire, responses_api
from server.dialects.messages_api import CountTokens, Messages, send_http_error, speaks_messages
from server.errors import (
    ErrorEnvelope,
    MethodNotAllowedError,
    RouteNotFoundError,
    as_gateway_error,
    error_body,
    spec_for,
)
from server.health import healthz, readyz
from server.http import request_id_of
from server.journal import Journal
from server.journal_redis import RedisJournal
from server.leases import RedisLeases
from server.lifecycle import Lifecycle
from server.limits import Limits
from server.metrics import exposition, watch_gc
from server.observe import RequestObserver
from server.openapi import openapi_endpoint
from server.ratelimit import Buckets, ChargingObserver, MemoryBuckets, RateLimiter, RedisBuckets
from server.response_store import ResponseStore
from server.rest import ChatCompletions, ResumeStream, StopStream, list_models, model_categories
from server.resume import Streams
from server.settings import CacheSettings, Settings, load
from server.ui import ui_mount
from server.ws import WebSocketEndpoint


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    path = request.url.path
    if exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {path}.")
    else:
        error = RouteNotFoundError(f"No route at {path}.{_hint(path)}")
    rid = request_id_of(request.scope)
    if speaks_messages(path):
        body = messages_wire.error_json(error, rid)
    else:
        body = protocol.encode(ErrorEnvelope(error_body(error, rid)))
    return Response(
        body, status_code=spec_for(error).status, media_type="application/json", headers=exc.headers
    )


def _hint(path: str) -> str:
    """Where a client whose base URL left out `/api` should point it."""
    if path == "/v1" or path.startswith("/v1/"):
        return f" The API is under /api: did you mean /api{path}? Set the base URL to <host>/api."
    return ""


def _server_error(request: Request, exc: Exception) -> Response:
    rid = request_id_of(request.scope)
    body = error_body(as_gateway_error(exc, rid), rid)
    return Response(
        protocol.encode(ErrorEnvelope(body)), status_code=500, media_type="application/json"
    )


def build_cache(settings: CacheSettings, use: str = "completions") -> Cache:
    """Redis when `url` is set, else the bounded in-memory cache; `use` labels its metrics."""
    if settings.url:
        return RedisCache(
            settings.url, namespace=settings.namespace, timeout=settings.timeout, use=use
        )
    return MemoryCache(max_entries=settings.max_entries, max_bytes=settings.max_bytes, use=use)


def build_response_store(settings: Settings) -> ResponseStore:
    """Stored Responses API answers: in the cache's Redis when it has one, else in memory."""
    cache = (
        build_cache(settings.cache, "responses")
        if settings.cache.url
        else MemoryCache(
            max_entries=settings.responses.max_entries,
            max_bytes=settings.responses.max_bytes,
            use="responses",
        )
    )
    return ResponseStore(cache, settings.responses.ttl)


def build_limits(settings: Settings) -> Limits:
    """Limits with rate buckets and slot leases in the cache's Redis when it has one, else in
    memory."""
    buckets: Buckets = MemoryBuckets()
    leases: RedisLeases | None = None
    if settings.cache.url:
        buckets = RedisBuckets(
            settings.cache.url, namespace=settings.cache.namespace, timeout=settings.cache.timeout
        )
        leases = RedisLeases(
            settings.cache.url,
            namespace=settings.cache.namespace,
            timeout=settings.cache.timeout,
            ttl=settings.limits.lease_ttl,
        )
    limits = settings.limits
    limiter = RateLimiter(buckets, limits.requests_per_minute, limits.tokens_per_minute)
    return Limits(limits, limiter, leases, StreamGate(settings.server.max_streams))


def build_streams(settings: Settings) -> Streams:
    """Resumable streams, journalled in memory and, with `[cache] url`, mirrored into Redis."""
    replica = uuid.uuid4().hex[:12]
    streams = settings.streams
    mirror = None
    if settings.cache.url:
        mirror = RedisJournal(
            settings.cache.url,
            namespace=settings.cache.namespace,
            timeout=settings.cache.timeout,
            ttl=streams.journal_ttl,
            replica=replica,
        )
    journal = Journal(
        ttl=streams.journal_ttl,
        max_events=streams.journal_max_events,
        max_bytes=streams.journal_max_bytes,
        memory_bytes=streams.memory_bytes,
        mirror=mirror,
    )
    return Streams(journal, resume_grace=streams.resume_grace, replica=replica)


def create_app(settings: Settings, environ: Mapping[str, str] | None = None) -> Starlette:
    """Build the gateway for `settings`; provider keys come from `environ` (default os.environ)."""
    registry = Registry.from_settings(
        settings.providers, os.environ if environ is None else environ
    )
    cache = build_cache(settings.cache)
    lifecycle = Lifecycle(grace=settings.server.shutdown_grace)
    limits = build_limits(settings)
    store = build_response_store(settings)
    observer = ChargingObserver(limits.limiter, log_content=settings.server.log_content)
    service = ChatService(
        registry,
        write_timeout=settings.server.slow_consumer_timeout,
        observer=observer,
        cache=cache if settings.cache.completions else None,
        cache_ttl=settings.cache.ttl,
        cache_scope=settings.cache.scope,
        fallbacks=settings.fallbacks,
        retry_budget=settings.server.retry_budget,
        lifecycle=lifecycle,
    )
    streams = build_streams(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Shared only through Redis (a client of its own, so its operations are told apart in
        # the metrics); in memory the catalogue keeps its own entries, apart from completions.
        catalog_cache = build_cache(settings.cache, "catalog") if settings.cache.url else None
        catalog = Catalog(
            registry,
            cache=catalog_cache,
            ttl=settings.catalog.ttl,
            retry=settings.catalog.retry,
            keep_stale=settings.catalog.keep_stale,
            classifier_address=settings.classifier.address,
            classifier_deadline=settings.classifier.deadline,
        )
        app.state.catalog = catalog
        lifecycle.install_signal_handler()
        streams.start()
        try:
            yield
        finally:
            lifecycle.draining = True
            await streams.aclose()
            await catalog.aclose()
            await registry.aclose()
            await cache.aclose()
            if catalog_cache is not None:
                await catalog_cache.aclose()
            await observer.aclose()
            await limits.aclose()
            await store.aclose()

    app = Starlette(
        routes=[
            Route(
                "/api/chat/completions",
                ChatCompletions(service, settings.server, limits, streams),
                methods=["POST"],
            ),
            Route(
                "/api/chat/completions/{stream_id}/stream",
                ResumeStream(streams, settings.server),
                methods=["GET"],
            ),
            Route(
                "/api/chat/completions/{stream_id}/cancel",
                StopStream(streams),
                methods=["POST"],
            ),
            Route("/api/v1/messages", Messages(service, settings.server, limits), methods=["POST"]),
            Route(
                "/api/v1/messages/count_tokens",
                CountTokens(service, settings.server, limits),
                methods=["POST"],
            ),
            Route(
                "/api/responses",
                responses_api.Responses(service, settings.server, limits, store),
                methods=["POST"],
            ),
            Route("/api/responses/{response_id}", responses_api.retrieve, methods=["GET"]),
            Route("/api/responses/{response_id}", responses_api.delete, methods=["DELETE"]),
            Route("/api/responses/{response_id}/cancel", responses_api.cancel, methods=["POST"]),
            Route(
                "/api/responses/{response_id}/input_items",
                responses_api.list_input_items,
                methods=["GET"],
            ),
            Route("/api/v1/models", messages_api.list_models, methods=["GET"]),
            Route("/api/v1/models/{model_id:path}", messages_api.get_model, methods=["GET"]),
            Route("/api/models", list_models, methods=["GET"]),
            Route("/api/models/categories", model_categories, methods=["GET"]),
            Route("/api/openapi.json", openapi_endpoint, methods=["GET"]),
            WebSocketRoute(
                "/api/ws", WebSocketEndpoint(service, settings.websocket, limits, streams)
            ),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            ui_mount(),  # the browser UI; last, so every API route wins
        ],
        middleware=[
            Middleware(RequestObserver),
            Middleware(PublicAddress),
            Middleware(
                Gatekeeper,
                keys=KeyRing(settings.auth.keys),
                origins=settings.auth.origins,
                limiter=limits.limiter,
                max_header_bytes=settings.limits.max_header_bytes,
                sockets=limits.sockets,
                send_http_error=send_http_error,
            ),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.lifecycle = lifecycle
    app.state.cache = cache
    app.state.responses = store
    app.state.streams = streams
    return app


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


def app_from_environment() -> Starlette:
    """The factory `tokenrelay serve` gives uvicorn; settings come from the environment."""
    settings = load(None, os.environ)
    guard.configure(settings.server.header_timeout)
    app = create_app(settings)
    tune_gc()
    watch_gc()
    return app


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a server process.

    Each relayed chunk allocates a few short-lived objects and frees them by reference
    counting; the cycle collector's default (a young collection every 700 allocations) then
    runs several times per stream for little. Everything made while starting (modules,
    settings, the app) is moved out of the collector's sight, as it lives as long as the
    process.
    """
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])


_GC_YOUNG = 20_000  # allocations between young collections (CPython's default: 700)
