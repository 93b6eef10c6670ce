"""The model catalogue: every provider's models, fetched once per TTL, classified, kept as one
snapshot from which `/api/models` and `/api/models/categories` are served.

Refresh policy (stale-while-revalidate): the first request waits for the first fetch; after
that a request never waits. A request that finds the snapshot expired starts one background
refresh (single-flight: however many requests arrive, each provider is asked once per refresh)
and is answered from the snapshot it found, as pre-encoded bytes. A provider whose fetch fails
keeps its last good list; one with no list anywhere is named in `unavailable`. Either failure,
like a degraded classifier, makes the snapshot expire after `retry` rather than `ttl`.

Shared through the cache: each provider's raw model list, and each model's classification by
the classifier service, are kept in a `Cache` (the gateway's Redis when it has one, else an
in-memory cache of the catalogue's own) twice (`Shelf`): a "fresh" entry
that the cache itself expires after `ttl`, and a "last good" one kept for `keep_stale`. A
refresh takes the fresh entries any replica made and asks the upstream (or the classifier)
only for the rest, so replicas on one Redis ask about once per TTL between them; when a source
fails, the newest last-good entry any replica made is used. Freshness is the cache's expiry:
the wall-clock stamp of an entry only picks the newer of two last-good copies, so clocks of
different hosts never decide what is fresh. A snapshot lives a TTL from when it was made
(plus a small random delay, so replicas that started together do not all refresh at the same
instant): a list may be served up to about two TTLs after its fetch, one in the cache and one
in the snapshot. Requests read the in-process snapshot; only a refresh talks to the cache.

Each process lists every provider itself once, on its first refresh, whatever the cache
holds; from then on it takes fresh lists from the cache. So each provider's state, for
readiness, speaks of this process: "ok" (listed by it, or fresh from the cache after it has
listed the provider itself), "stale" (its fetch failed; it serves the last good list) or
"unreachable" (its fetch failed and it never listed the provider: a list another replica made
is still served, but does not make the provider usable here).

The classifier is handed the fetched list: nothing asks an upstream for models to classify
them. Without a classifier address the rules run in-process ("local"; pure and fast, so not
cached); with one, the gRPC service is asked about the models no replica has classified within
`ttl` (with nothing to ask, its health is still checked, so every process knows its own path
to the service), and when it cannot answer the last good remote classification ("stale") or,
for models it never classified, the in-process rules ("fallback") are used instead, and
`classifier_status` says "degraded". When only the health check fails (every classification
was fresh in the cache), the body still says "classifier", which its data is, while
`classifier_status` and readiness say "degraded" and the check is repeated after `retry`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import msgspec

from providers.errors import GatewayError, ProviderError
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
ProviderState = Literal["ok", "stale", "unreachable"]
T = TypeVar("T")


class Stamped(msgspec.Struct, Generic[T], frozen=True, array_like=True):
    """A value as kept in the cache, with the wall-clock time of the refresh that made it."""

    value: T
    at: float


_encode = msgspec.msgpack.Encoder().encode


def _newest(*found: Stamped[T] | None) -> Stamped[T] | None:
    present = [f for f in found if f is not None]
    return max(present, key=lambda f: f.at) if present else None


def _digest(material: object) -> str:
    return hashlib.sha256(_encode(material)).hexdigest()


# In every key: replicas of a version that stores these entries differently never share them.
_SCHEMA = _digest(msgspec.json.schema(Stamped[ModelClass]))[:8]


class Shelf(Generic[T]):
    """Entries under `catalog:<schema>:<name>` kept twice: `fresh` (the cache drops it after
    `ttl`) and `last` (kept for `keep`, the last good answer); every cache failure is a miss."""

    def __init__(self, cache: Cache, kind: type[T], *, ttl: float, keep: float) -> None:
        self._cache = cache
        self._decoder = msgspec.msgpack.Decoder(Stamped[kind])  # type: ignore[valid-type]
        self._ttl = ttl
        self._keep = keep

    async def fresh(self, names: Sequence[str]) -> list[Stamped[T] | None]:
        return self._decode(
            await self._cache.get_many([f"catalog:{_SCHEMA}:{n}:fresh" for n in names])
        )

    async def last(self, names: Sequence[str]) -> list[Stamped[T] | None]:
        return self._decode(
            await self._cache.get_many([f"catalog:{_SCHEMA}:{n}:last" for n in names])
        )

    async def put(self, made: Mapping[str, Stamped[T]]) -> None:
        encoded = {name: _encode(entry) for name, entry in made.items()}
        fresh = {f"catalog:{_SCHEMA}:{n}:fresh": raw for n, raw in encoded.items()}
        last = {f"catalog:{_SCHEMA}:{n}:last": raw for n, raw in encoded.items()}
        await self._cache.set_many(fresh, self._ttl)
        await self._cache.set_many(last, self._keep)

    def _decode(self, found: list[bytes | None]) -> list[Stamped[T] | None]:
        """Entries; one that cannot be read (another schema, damage) is a miss: made again."""
        entries: list[Stamped[T] | None] = []
        for raw in found:
            try:
                entries.append(None if raw is None else self._decoder.decode(raw))
            except msgspec.DecodeError:
                entries.append(None)
        return entries


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
    states: dict[str, ProviderState]
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
        shared: Cache = cache if cache is not None else MemoryCache(use="catalog")
        keep = max(keep_stale, ttl)
        self._list_shelf = Shelf(shared, list[str], ttl=ttl, keep=keep)
        self._class_shelf = Shelf(shared, ModelClass, ttl=ttl, keep=keep)
        self._ttl = ttl
        self._retry = retry
        self._address = classifier_address
        self._deadline = classifier_deadline
        self._remote: RemoteClassifier | None = None
        # The last good answers this process saw: the fallback when the cache cannot answer.
        self._remote_known: dict[ModelRef, Stamped[ModelClass]] = {}
        self._lists: dict[str, Stamped[list[str]]] = {}
        self._listed: set[str] = set()  # providers this process has listed itself
        # Why each provider's latest list failed, as a client may be told (no addresses).
        self.last_errors: dict[str, str] = {}
        self._list_names = {name: self._list_name(name) for name in registry.names}
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
            models, states, fresh_for = await self._load_all(started)
            models_expire = now + fresh_for
        else:
            models, states, models_expire = old.models, old.states, old.models_expire
        unavailable = [name for name in self._registry.names if name not in self._lists]
        # Looked at on every refresh: reused while fresh, asked again once a TTL has passed.
        classes, source = await self._classify(models, started)
        degraded = source in ("fallback", "stale") or self.classifier_status == "degraded"
        classes_expire = now + self._retry if degraded else math.inf
        snapshot = Snapshot(
            models=models,
            unavailable=unavailable,
            states=states,
            classes=classes,
            source=source,
            models_body=_models_body(models, unavailable),
            categories_body=_categories_body(classes, source, unavailable),
            models_expire=models_expire,
            classes_expire=classes_expire,
        )
        self._snapshot = snapshot
        return snapshot

    async def _load_all(
        self, started: float
    ) -> tuple[list[ModelInfo], dict[str, ProviderState], float]:
        """Every provider's list, concurrently: (models, states, seconds until the next)."""
        names = self._registry.names
        found = await asyncio.gather(*(self._load(name, started) for name in names))
        models: list[ModelInfo] = []
        states: dict[str, ProviderState] = {}
        for name, (listed, state) in zip(names, found, strict=True):
            states[name] = state
            if listed is not None:
                models.extend(self._entries(name, listed.value))
        if any(state != "ok" for state in states.values()):
            return models, states, self._retry
        # A TTL from now, whoever made the lists (no clocks of other hosts are read), and a
        # random delay on top: of replicas that started together, the first to expire lists
        # for the others instead of all listing at once.
        return models, states, self._ttl + random.uniform(0.0, min(self._ttl / 10, 30.0))

    async def _load(
        self, name: str, started: float
    ) -> tuple[Stamped[list[str]] | None, ProviderState]:
        """One provider's list: fresh from the cache, else from the upstream; when that fails,
        the newest last good list any replica (or, the cache failing, this process) had.

        Until this process has listed a provider itself it always asks the upstream: readiness
        then speaks of this process's own path (its key, its network), not of another replica's.
        """
        key = self._list_names[name]
        if name in self._listed:
            [fresh] = await self._list_shelf.fresh([key])
            if fresh is not None:
                self._lists[name] = fresh
                return fresh, "ok"
        listed = await self._fetch(name)
        if listed is not None:
            made = self._lists[name] = Stamped(listed, started)
            self._listed.add(name)
            await self._list_shelf.put({key: made})
            return made, "ok"
        [last] = await self._list_shelf.last([key])
        kept = _newest(last, self._lists.get(name))  # clocks of two hosts: only to pick one
        if kept is not None:
            self._lists[name] = kept
        return kept, "stale" if name in self._listed else "unreachable"

    async def _fetch(self, name: str) -> list[str] | None:
        provider, _ = self._registry.get(name)
        try:
            listed = await provider.list_models()
        except Exception as exc:  # a provider that cannot be listed must not hide the others
            message = exc.message if isinstance(exc, GatewayError) else type(exc).__name__
            self.last_errors[name] = message
            fields: dict[str, str | None] = {"provider": name, "error": message}
            if not isinstance(exc, GatewayError):
                fields["error"] = repr(exc)  # for the operator only
            if isinstance(exc, ProviderError) and exc.cause is not None:
                fields.update(upstream=exc.upstream, cause=exc.cause)
            log.warning("could not list models", extra={"fields": fields})
            return None
        self.last_errors.pop(name, None)
        return listed

    def _list_name(self, name: str) -> str:
        """Named by the provider and what decides its list: kind, upstream, which credential."""
        _, settings = self._registry.get(name)
        decides = (settings.kind, settings.base_url, self._registry.credential_id(name))
        return f"models:{name}:{_digest(decides)[:16]}"

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
        names = [f"class:{_digest((self._address, ref))}" for ref in refs]
        known = await self._class_shelf.fresh(names)
        wanted = [i for i, k in enumerate(known) if k is None]
        try:
            # With nothing wanted this only checks the service's health: the status stays true.
            answered = await self._remote_classifier().classify([refs[i] for i in wanted])
        except ClassifierUnavailableError as exc:
            self.classifier_status = "degraded"
            log.warning("classifier at %s did not answer (%s)", self._address, exc.outcome)
            last = await self._class_shelf.last([names[i] for i in wanted])
            for i, found in zip(wanted, last, strict=True):
                known[i] = _newest(found, self._remote_known.get(refs[i]))
            return self._without_classifier(refs, known, stale=bool(wanted))
        made: dict[str, Stamped[ModelClass]] = {}
        for i, answer in zip(wanted, answered, strict=True):
            known[i] = made[names[i]] = Stamped(answer, started)
        await self._class_shelf.put(made)
        self.classifier_status = "serving"
        return self._without_classifier(refs, known, stale=False)

    def _without_classifier(
        self, refs: list[ModelRef], known: list[Stamped[ModelClass] | None], *, stale: bool
    ) -> tuple[list[ModelClass], Source]:
        """The service's answers ("classifier", or "stale" when some are its last good ones),
        and the in-process rules for models it never classified ("fallback")."""
        self._remote_known = {ref: k for ref, k in zip(refs, known, strict=True) if k is not None}
        missing = [ref for ref, k in zip(refs, known, strict=True) if k is None]
        if not missing:
            return [k.value for k in known if k is not None], "stale" if stale else "classifier"
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
