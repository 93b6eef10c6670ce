"""The model catalogue: every provider's models, fetched once per TTL and served from a snapshot."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from providers.errors import GatewayError
from providers.registry import Registry
from providers.types import ModelInfo

log = logging.getLogger("tokenrelay.catalog")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """All models the gateway can serve now, and the providers that could not be listed."""

    models: list[ModelInfo]
    unavailable: list[str] = field(default_factory=list)


class Catalog:
    """Lists each provider's models: its allow-list when configured, else its upstream's list.

    An upstream list is fetched at most once per `ttl` however many requests ask at once (one
    lock per provider); a failed refresh keeps the last good list, and a provider that has
    never answered is reported as unavailable without hiding the others.
    """

    def __init__(self, registry: Registry, *, ttl: float = 300.0, retry: float = 10.0) -> None:
        self._registry = registry
        self._ttl = ttl
        self._retry = retry
        self._lists: dict[str, tuple[float, list[str]]] = {}
        self._failed: dict[str, float] = {}
        self._locks = {name: asyncio.Lock() for name in registry.names}

    async def snapshot(self) -> Snapshot:
        names = self._registry.names
        results = await asyncio.gather(*(self._models_of(name) for name in names))
        models: list[ModelInfo] = []
        unavailable: list[str] = []
        for name, found in zip(names, results, strict=True):
            if found is None:
                unavailable.append(name)
            else:
                models.extend(found)
        return Snapshot(models=models, unavailable=unavailable)

    async def _models_of(self, name: str) -> list[ModelInfo] | None:
        provider, settings = self._registry.get(name)
        upstream_ids: list[str] | None
        allowed = settings.allowed()
        if allowed is not None:
            upstream_ids = sorted(allowed)
        else:
            upstream_ids = await self._fetch(name)
            if upstream_ids is None:
                return None
        ids = [*upstream_ids, *sorted(settings.aliases)]
        return [
            ModelInfo(
                id=f"{name}/{model}", provider=name, upstream_id=settings.aliases.get(model, model)
            )
            for model in ids
        ]

    async def _fetch(self, name: str) -> list[str] | None:
        loop = asyncio.get_running_loop()
        cached = self._lists.get(name)
        if cached is not None and loop.time() - cached[0] < self._ttl:
            return cached[1]
        async with self._locks[name]:
            cached = self._lists.get(name)
            if cached is not None and loop.time() - cached[0] < self._ttl:
                return cached[1]
            # Callers that queued behind a failed fetch do not each try again.
            if loop.time() - self._failed.get(name, -self._retry) < self._retry:
                return cached[1] if cached is not None else None
            provider, _ = self._registry.get(name)
            try:
                listed = sorted(await provider.list_models())
            except GatewayError as exc:
                log.warning("could not list models of %s: %s", name, exc.message)
                self._failed[name] = loop.time()
                return cached[1] if cached is not None else None
            self._lists[name] = (loop.time(), listed)
            return listed
