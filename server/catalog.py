"""The model catalogue: every provider's models, fetched once per TTL, classified, kept as one
snapshot from which `/api/models` and `/api/models/categories` are served.

Refresh policy (stale-while-revalidate): the first request waits for the first fetch; after
that a request never waits. A request that finds the snapshot expired starts one background
refresh (single-flight: however many requests arrive, each provider is asked once per refresh)
and is answered from the snapshot it found, as pre-encoded bytes. A provider whose fetch fails
keeps its last good list; one that never answered is named in `unavailable`. Either failure,
like a degraded classifier, makes the snapshot expire after `retry` rather than `ttl`.

The classifier is handed the fetched list: nothing asks an upstream for models to classify
them. Without a classifier address the rules run in-process ("local"); with one, the gRPC
service is called, and when it cannot answer the last good remote classification ("stale") or
the in-process rules ("fallback") are used instead, and `classifier_status` says "degraded".
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from providers.registry import Registry
from providers.types import ModelInfo
from server import protocol
from server.classification import ClassifierUnavailableError, rules
from server.classification.rules import ModelClass, ModelRef

if TYPE_CHECKING:
    from server.classification.client import RemoteClassifier

log = logging.getLogger("tokenrelay.catalog")

Source = Literal["classifier", "local", "fallback", "stale"]
ClassifierStatus = Literal["local", "serving", "degraded"]


class Category(msgspec.Struct, frozen=True, kw_only=True):
    """One group of the model picker."""

    id: str
    label: str
    models: list[str]


class Categories(msgspec.Struct, frozen=True, kw_only=True):
    """The body of `GET /api/models/categories`."""

    object: str
    source: Source
    degraded: bool
    unavailable: list[str]
    categories: list[Category]
    models: list[ModelClass]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of the catalogue, with both response bodies encoded once."""

    models: list[ModelInfo]
    unavailable: list[str]
    classes: list[ModelClass]
    source: Source
    models_body: bytes
    categories_body: bytes
    models_expire: float  # loop time after which the model lists are fetched again
    classes_expire: float  # loop time after which a degraded classification is retried

    @property
    def expires(self) -> float:
        return min(self.models_expire, self.classes_expire)


class Catalog:
    """The gateway's model catalogue; see the module docstring for the refresh policy."""

    def __init__(
        self,
        registry: Registry,
        *,
        ttl: float = 300.0,
        retry: float = 15.0,
        classifier_address: str | None = None,
        classifier_deadline: float = 2.0,
    ) -> None:
        self._registry = registry
        self._ttl = ttl
        self._retry = retry
        self._address = classifier_address
        self._deadline = classifier_deadline
        self._remote: RemoteClassifier | None = None
        self._remote_known: dict[ModelRef, ModelClass] = {}
        self._lists: dict[str, list[str]] = {}
        self._snapshot: Snapshot | None = None
        self._task: asyncio.Task[Snapshot] | None = None
        # With an address, "degraded" until the service has answered once.
        self.classifier_status: ClassifierStatus = "degraded" if classifier_address else "local"
        self.classifier_calls: Counter[str] = Counter()
        self.classifier_latency: float | None = None

    async def snapshot(self) -> Snapshot:
        """The current snapshot; waits only when there is none yet."""
        current = self._snapshot
        if current is None:
            return await self.refresh()
        if asyncio.get_running_loop().time() >= current.expires:
            self._start_refresh()
        return current

    async def refresh(self) -> Snapshot:
        """Refresh now, or join the refresh in flight; a cancelled waiter does not cancel it."""
        return await asyncio.shield(self._start_refresh())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.aclose()

    def observe(self, outcome: str, seconds: float) -> None:
        """Every classifier call ends here: the one place to hook call metrics in."""
        self.classifier_calls[outcome] += 1
        self.classifier_latency = seconds
        log.debug("classifier call: %s in %.3f s", outcome, seconds)

    def _start_refresh(self) -> asyncio.Task[Snapshot]:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh())
            self._task.add_done_callback(self._refreshed)
        return self._task

    def _refreshed(self, task: asyncio.Task[Snapshot]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("model catalogue refresh failed", exc_info=task.exception())

    async def _refresh(self) -> Snapshot:
        now = asyncio.get_running_loop().time()
        old = self._snapshot
        if old is None or now >= old.models_expire:
            models, unavailable, failed = await self._fetch_all()
            models_expire = now + (self._retry if failed else self._ttl)
        else:
            models, unavailable, models_expire = old.models, old.unavailable, old.models_expire
        # Classified on every refresh: one call per TTL keeps `classifier_status` current.
        classes, source = await self._classify(models)
        degraded = source in ("fallback", "stale")
        classes_expire = now + self._retry if degraded else math.inf
        snapshot = Snapshot(
            models=models,
            unavailable=unavailable,
            classes=classes,
            source=source,
            models_body=_models_body(models, unavailable),
            categories_body=_categories_body(classes, source, unavailable),
            models_expire=models_expire,
            classes_expire=classes_expire,
        )
        self._snapshot = snapshot
        return snapshot

    async def _fetch_all(self) -> tuple[list[ModelInfo], list[str], bool]:
        """Every provider asked once, concurrently: (models, unavailable, any fetch failed)."""
        names = self._registry.names
        found = await asyncio.gather(*(self._fetch(name) for name in names))
        models: list[ModelInfo] = []
        unavailable: list[str] = []
        for name, listed in zip(names, found, strict=True):
            if listed is None:
                listed = self._lists.get(name)
            else:
                self._lists[name] = listed
            if listed is None:
                unavailable.append(name)
            else:
                models.extend(self._entries(name, listed))
        return models, unavailable, any(listed is None for listed in found)

    async def _fetch(self, name: str) -> list[str] | None:
        provider, _ = self._registry.get(name)
        try:
            return await provider.list_models()
        except Exception as exc:  # a provider that cannot be listed must not hide the others
            log.warning("could not list the models of %s: %s", name, exc)
            return None

    def _entries(self, name: str, listed: list[str]) -> list[ModelInfo]:
        """The listed models the allow-list admits, sorted, then the aliases of listed ones."""
        _, settings = self._registry.get(name)
        allowed = settings.allowed()
        upstream = set(listed)
        kept = sorted(m for m in upstream if allowed is None or m in allowed)
        entries = [ModelInfo(id=f"{name}/{m}", provider=name, upstream_id=m) for m in kept]
        for alias, target in sorted(settings.aliases.items()):
            if target in upstream:
                entries.append(ModelInfo(id=f"{name}/{alias}", provider=name, upstream_id=target))
        return entries

    async def _classify(self, models: list[ModelInfo]) -> tuple[list[ModelClass], Source]:
        refs = [
            ModelRef(
                id=m.id, provider=m.provider, upstream_id=m.upstream_id, display_name=m.display_name
            )
            for m in models
        ]
        if self._address is None:
            return rules.classify(refs), "local"
        try:
            classes = await self._remote_classifier().classify(refs)
        except ClassifierUnavailableError as exc:
            self.classifier_status = "degraded"
            log.warning("classifier at %s did not answer (%s)", self._address, exc.outcome)
            known = [self._remote_known.get(ref) for ref in refs]
            if all(c is not None for c in known):
                return [c for c in known if c is not None], "stale"
            return rules.classify(refs), "fallback"
        self.classifier_status = "serving"
        self._remote_known = dict(zip(refs, classes, strict=True))
        return classes, "classifier"

    def _remote_classifier(self) -> RemoteClassifier:
        if self._remote is None:
            # Imported here: a gateway without a classifier address never loads grpc.
            from server.classification.client import RemoteClassifier

            assert self._address is not None
            self._remote = RemoteClassifier(
                self._address, deadline=self._deadline, observe=self.observe
            )
        return self._remote


def _models_body(models: list[ModelInfo], unavailable: list[str]) -> bytes:
    cards = [
        protocol.ModelCard(id=m.id, object="model", created=m.created, owned_by=m.provider)
        for m in models
    ]
    return protocol.encode(protocol.ModelList(object="list", data=cards, unavailable=unavailable))


def _categories_body(classes: list[ModelClass], source: Source, unavailable: list[str]) -> bytes:
    body = Categories(
        object="model.categories",
        source=source,
        degraded=source in ("fallback", "stale"),
        unavailable=unavailable,
        categories=[
            Category(id=c, label=label, models=ids) for c, label, ids in rules.group(classes)
        ],
        models=classes,
    )
    return protocol.encode(body)
