"""The app factory: routes, error handlers and lifespan, wired explicitly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from providers.errors import GatewayError
from providers.registry import Registry
from server import protocol
from server.catalog import Catalog
from server.chat import ChatService
from server.errors import (
    ErrorEnvelope,
    MethodNotAllowedError,
    RouteNotFoundError,
    as_gateway_error,
    error_body,
    spec_for,
)
from server.rest import ChatCompletions, list_models, model_categories, request_id
from server.settings import Settings, load
from server.ui import ui_mount
from server.ws import WebSocketEndpoint


async def healthz(request: Request) -> Response:
    """The process is alive and serving."""
    return JSONResponse({"status": "ok"})


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 405:
        error = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}.")
    else:
        error = RouteNotFoundError(f"No route at {request.url.path}.")
    rid = request_id(dict(request.scope["headers"]))
    body = protocol.encode(ErrorEnvelope(error_body(error, rid)))
    return Response(
        body, status_code=spec_for(error).status, media_type="application/json", headers=exc.headers
    )


def _server_error(request: Request, exc: Exception) -> Response:
    rid = request_id(dict(request.scope["headers"]))
    body = error_body(as_gateway_error(exc, rid), rid)
    return Response(
        protocol.encode(ErrorEnvelope(body)), status_code=500, media_type="application/json"
    )


def create_app(settings: Settings, environ: Mapping[str, str] | None = None) -> Starlette:
    """Build the gateway for `settings`; provider keys come from `environ` (default os.environ)."""
    registry = Registry.from_settings(
        settings.providers, os.environ if environ is None else environ
    )
    service = ChatService(registry, write_timeout=settings.server.slow_consumer_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        catalog = Catalog(
            registry,
            ttl=settings.catalog.ttl,
            retry=settings.catalog.retry,
            classifier_address=settings.classifier.address,
            classifier_deadline=settings.classifier.deadline,
        )
        app.state.catalog = catalog
        try:
            yield
        finally:
            await catalog.aclose()
            await registry.aclose()

    app = Starlette(
        routes=[
            Route(
                "/api/chat/completions", ChatCompletions(service, settings.server), methods=["POST"]
            ),
            Route("/api/models", list_models, methods=["GET"]),
            Route("/api/models/categories", model_categories, methods=["GET"]),
            WebSocketRoute("/api/ws", WebSocketEndpoint(service, settings.websocket)),
            Route("/healthz", healthz, methods=["GET"]),
            ui_mount(),  # the browser UI; last, so every API route wins
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    return app


def app_from_environment() -> Starlette:
    """The factory `tokenrelay serve` gives uvicorn; settings come from the environment."""
    return create_app(load(None, os.environ))
