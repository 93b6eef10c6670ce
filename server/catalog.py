"""The model catalogue: every provider's models, fetched once per TTL, classified, kept as one
snapshot from which `/api/models` and `/api/models/categories` are served.

Refresh policy (stale-while-revalidate): the first request waits for the first fetch; after
that a request never waits. A request that finds the snapshot expired starts one background
refresh (single-flight: however many requests arrive, each provider is asked once per refresh)
and is answered from the snapshot it found, as pre-encoded bytes. A provider whose fetch fails
keeps its last good list; one that never answered is named in `unavailable`. Either failure,
like a degraded classifier, makes the snapshot expire after `retry` rather than `ttl`.

Shared through the cache: each provider's raw model list, and each model's classification by
the classifier service, are kept in the gateway's `Cache` stamped with the wall-clock time they
were made. A refresh first looks there and only asks the upstream (or the classifier) when no
replica has done so within `ttl`, so replicas on one Redis ask once per TTL between them. The
entries outlive `ttl` (`keep_stale`): when a source fails, the newest entry any replica made is
the "last good" answer. Each snapshot expires with a small random delay past its entries, so
replicas do not all refresh at the same instant. Requests never touch the cache: they read the
in-process snapshot.

The classifier is handed the fetched list: nothing asks an upstream for models to classify
them. Without a classifier address the rules run in-process ("local"; pure and fast, so not
cached); with one, the gRPC service is asked about the models no replica has classified within
`ttl`, and when it cannot answer the last good remote classification ("stale") or, for models
it never classified, the in-process rules ("fallback") are used instead, and
`classifier_status` says "degraded".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import msgspec

from providers.registry import Registry
from providers.types import ModelInfo
from server import metrics, protocol
from server.cache import Cache, MemoryCache
from server.classification import ClassifierUnavailableError, rules
from server.classification.rules import ModelClass, ModelRef

if TYPE_CHECKING:
    from server.classification.client import RemoteClassifier

log = logging.getLogger("tokenrelay.catalog")

Source = Literal["classifier", "local", "fallback", "stale"]
ClassifierStatus = Literal["local", "serving", "degraded"]
T = TypeVar("T")


class Stamped(msgspec.Struct, Generic[T], frozen=True, array_like=True):
    """A value as kept in the cache, with the wall-clock time of the refresh that made it."""

    value: T
    at: float


_encode = msgspec.msgpack.Encoder().encode
_LIST = msgspec.msgpack.Decoder(Stamped[list[str]])
_CLASS = msgspec.msgpack.Decoder(Stamped[ModelClass])


def _decode(decoder: msgspec.msgpack.Decoder[Stamped[T]], raw: bytes | None) -> Stamped[T] | None:
    """An entry, or None when there is none or it cannot be read (then it is made again)."""
    if raw is None:
        return None
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError:
        return None


def _newest(*found: Stamped[T] | None) -> Stamped[T] | None:
    present = [f for f in found if f is not None]
    return max(present, key=lambda f: f.at) if present else None


def _digest(material: object) -> str:
    return hashlib.sha256(_encode(material)).hexdigest()


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
        cache: Cache | None = None,
        ttl: float = 300.0,
        retry: float = 15.0,
        keep_stale: float = 86_400.0,
        classifier_address: str | None = None,
        classifier_deadline: float = 2.0,
    ) -> None:
        self._registry = registry
        self._cache: Cache = cache if cache is not None else MemoryCache(max_entries=10_000)
        self._ttl = ttl
        self._retry = retry
        self._keep = max(keep_stale, ttl)
        self._address = classifier_address
        self._deadline = classifier_deadline
        self._remote: RemoteClassifier | None = None
        # The last good answers this process saw: the fallback when the cache cannot answer.
        self._remote_known: dict[ModelRef, Stamped[ModelClass]] = {}
        self._lists: dict[str, Stamped[list[str]]] = {}
        self._list_keys = {name: self._list_key(name) for name in registry.names}
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
        metrics.CLASSIFIER_CALLS.labels("Classify", outcome).inc()
        metrics.CLASSIFIER_LATENCY.labels("Classify").observe(seconds)
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
        now, started = asyncio.get_running_loop().time(), time.time()
        old = self._snapshot
        if old is None or now >= old.models_expire:
            models, unavailable, fresh_for = await self._load_all(started)
            models_expire = now + fresh_for
        else:
            models, unavailable, models_expire = old.models, old.unavailable, old.models_expire
        # Looked at on every refresh: reused while fresh, asked again once a TTL has passed.
        classes, source = await self._classify(models, started)
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

    async def _load_all(self, started: float) -> tuple[list[ModelInfo], list[str], float]:
        """Every provider's list, concurrently: (models, unavailable, seconds until stale)."""
        names = self._registry.names
        found = await asyncio.gather(*(self._load(name, started) for name in names))
        models: list[ModelInfo] = []
        unavailable: list[str] = []
        fresh_for = self._ttl
        failed = False
        for name, (listed, fresh) in zip(names, found, strict=True):
            if listed is None:
                unavailable.append(name)
            else:
                models.extend(self._entries(name, listed.value))
            if not fresh:
                failed = True
            elif listed is not None:
                fresh_for = min(fresh_for, self._ttl - max(started - listed.at, 0.0))
        if failed:
            return models, unavailable, self._retry
        # Spread the replicas' refreshes: the first to expire fetches, the others find its list.
        return models, unavailable, fresh_for + random.uniform(0.0, min(self._ttl / 10, 30.0))

    async def _load(self, name: str, started: float) -> tuple[Stamped[list[str]] | None, bool]:
        """One provider's list and whether it is fresh: from the cache while a replica fetched
        it within `ttl`, else from the upstream; when that fails, the newest list known."""
        key = self._list_keys[name]
        shared = _decode(_LIST, await self._cache.get(key))
        if shared is not None and started - shared.at < self._ttl:
            self._lists[name] = shared
            return shared, True
        listed = await self._fetch(name)
        if listed is None:
            return _newest(shared, self._lists.get(name)), False
        stamped = Stamped(listed, started)
        self._lists[name] = stamped
        await self._cache.set(key, _encode(stamped), self._keep)
        return stamped, True

    async def _fetch(self, name: str) -> list[str] | None:
        provider, _ = self._registry.get(name)
        try:
            return await provider.list_models()
        except Exception as exc:  # a provider that cannot be listed must not hide the others
            log.warning("could not list the models of %s: %s", name, exc)
            return None

    def _list_key(self, name: str) -> str:
        """Named by the provider and what decides its list (kind and upstream), not its key."""
        _, settings = self._registry.get(name)
        return f"catalog:models:{name}:{_digest((settings.kind, settings.base_url))[:16]}"

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

    async def _classify(
        self, models: list[ModelInfo], started: float
    ) -> tuple[list[ModelClass], Source]:
        refs = [
            ModelRef(
                id=m.id, provider=m.provider, upstream_id=m.upstream_id, display_name=m.display_name
            )
            for m in models
        ]
        if self._address is None:
            return rules.classify(refs), "local"
        keys = [f"catalog:class:{_digest((self._address, ref))}" for ref in refs]
        shared = await self._cache.get_many(keys)
        known = [
            _newest(_decode(_CLASS, raw), self._remote_known.get(ref))
            for ref, raw in zip(refs, shared, strict=True)
        ]
        wanted = [i for i, k in enumerate(known) if k is None or started - k.at >= self._ttl]
        if wanted:
            try:
                answered = await self._remote_classifier().classify([refs[i] for i in wanted])
            except ClassifierUnavailableError as exc:
                self.classifier_status = "degraded"
                log.warning("classifier at %s did not answer (%s)", self._address, exc.outcome)
                return self._without_classifier(refs, known)
            made: dict[str, bytes] = {}
            for i, answer in zip(wanted, answered, strict=True):
                known[i] = stamped = Stamped(answer, started)
                made[keys[i]] = _encode(stamped)
            await self._cache.set_many(made, self._keep)
        # Every class is now the service's own, made within `ttl` by this or another replica.
        self.classifier_status = "serving"
        self._remote_known = {ref: k for ref, k in zip(refs, known, strict=True) if k is not None}
        return [k.value for k in known if k is not None], "classifier"

    def _without_classifier(
        self, refs: list[ModelRef], known: list[Stamped[ModelClass] | None]
    ) -> tuple[list[ModelClass], Source]:
        """The service's last answers ("stale"), and the rules for models it never classified."""
        self._remote_known = {ref: k for ref, k in zip(refs, known, strict=True) if k is not None}
        missing = [ref for ref, k in zip(refs, known, strict=True) if k is None]
        if not missing:
            return [k.value for k in known if k is not None], "stale"
        guessed = iter(rules.classify(missing))
        return [next(guessed) if k is None else k.value for k in known], "fallback"

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
