"""Liveness (`/healthz`: the process serves) and readiness (`/readyz`: it should get traffic)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.lifecycle import Lifecycle


async def healthz(request: Request) -> Response:
    """The process is alive and serving."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when not shutting down and at least one provider can serve; parts report their state.

    `status` is `ready`, `degraded` (serving, but a part is impaired) or `unavailable`; the
    HTTP status is 200 unless unavailable (503), so a balancer stops sending traffic only
    when the gateway really cannot serve.
    """
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.draining:
        return JSONResponse({"status": "unavailable", "reason": "shutting down"}, status_code=503)
    snapshot = await request.app.state.catalog.snapshot()
    # ok | stale (its fetch failed; serving the list this process had) | unreachable
    providers: dict[str, Any] = dict(snapshot.states)
    usable = any(state != "unreachable" for state in providers.values())
    degraded = not all(state == "ok" for state in providers.values())
    cache = request.app.state.cache
    cache_state = "ok" if await cache.healthy() else "degraded"  # misses, never failures
    degraded = degraded or cache_state != "ok"
    # Resumable streams' shared journal: "degraded" while writes to Redis fail (streams go on,
    # resumable on their own replica only).
    mirror = request.app.state.streams.mirror
    journal = "memory" if mirror is None else ("ok" if await mirror.healthy() else "degraded")
    degraded = degraded or journal == "degraded"
    classifier = request.app.state.catalog.classifier_status  # local | serving | degraded
    degraded = degraded or classifier == "degraded"
    # Why each provider that is not ok failed last, as its clients are told (no addresses).
    errors = {
        name: message
        for name, message in request.app.state.catalog.last_errors.items()
        if providers.get(name, "ok") != "ok"
    }
    checks: dict[str, Any] = {
        "providers": providers,
        **({"provider_errors": errors} if errors else {}),
        "cache": {cache.backend: cache_state},
        "journal": journal,
        "classifier": classifier,
    }
    status = "unavailable" if not usable else ("degraded" if degraded else "ready")
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if usable else 503)
