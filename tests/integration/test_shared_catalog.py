"""The catalogue kept in the cache: replicas share model lists and classifications.

"Replicas" here are separate `Catalog`s, each with its own registry and its own cache client, as
separate processes would have; with Redis they share a real redis-server, with the in-memory
backend one `MemoryCache` (what the workers of one process would see). The end-to-end test runs
two whole gateways on one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx2
import pytest
from prometheus_client import REGISTRY

from providers.registry import Registry
from providers.settings import ProviderSettings
from server.app import create_app
from server.cache import Cache, MemoryCache, RedisCache
from server.catalog import Catalog
from server.classification.service import ClassifierServer, ClassifierServicer
from server.classification.stubs import classifier_pb2 as pb
from server.settings import CacheSettings, ClassifierSettings, Settings, uvicorn_options
from tests.conftest import ENVIRON, UPSTREAM_KEY, model_calls, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.redis import RedisServer
from tests.support.servers import serve_in_thread

GUARD = 10.0


class CountingServicer(ClassifierServicer):
    """The real classifier, recording which model ids each call asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[str]] = []
        self.address = ""

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        self.asked.append([m.id for m in request.models])
        return await super().Classify(request, context)


@pytest.fixture
async def servicer() -> AsyncIterator[CountingServicer]:
    """A running classifier's servicer; `remote(servicer)` gives a catalogue's options for it."""
    counting = CountingServicer()
    server = ClassifierServer("127.0.0.1", 0, servicer=counting)
    await server.start()
    counting.address = f"127.0.0.1:{server.port}"
    try:
        yield counting
    finally:
        await server.stop(grace=None)


def remote(servicer: CountingServicer) -> dict[str, Any]:
    return {"classifier_address": servicer.address}


CacheFactory = Callable[[], Cache]


@pytest.fixture(params=["memory", "redis"])
def shared_cache(request: pytest.FixtureRequest) -> CacheFactory:
    """Makes each replica's cache client; all of one test's clients see the same entries."""
    if request.param == "memory":
        one = MemoryCache()
        return lambda: one
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    namespace = f"catalog-{uuid.uuid4().hex[:8]}"
    # A generous timeout: a slow answer under load would be a miss and an extra upstream call.
    return lambda: RedisCache(redis_server.url, namespace=namespace, timeout=1.0)


class Replicas:
    """Builds catalogues the way separate gateways would, and closes all of them."""

    def __init__(self, caches: CacheFactory) -> None:
        self._caches = caches
        self._open: list[tuple[Catalog, Registry, Cache]] = []

    def start(
        self,
        providers: list[ProviderSettings],
        environ: dict[str, str] = ENVIRON,
        **options: Any,
    ) -> Catalog:
        registry = Registry.from_settings(providers, environ)
        cache = self._caches()
        catalog = Catalog(registry, cache=cache, **options)
        self._open.append((catalog, registry, cache))
        return catalog

    async def aclose(self) -> None:
        for catalog, registry, cache in self._open:
            await catalog.aclose()
            await registry.aclose()
            await cache.aclose()


@pytest.fixture
async def replicas(shared_cache: CacheFactory) -> AsyncIterator[Replicas]:
    made = Replicas(shared_cache)
    try:
        yield made
    finally:
        await made.aclose()


async def test_once_a_ttl_has_passed_one_replica_lists_for_all(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    started = [replicas.start(provider_settings(fake), ttl=0.5) for _ in range(3)]
    first = [await replica.snapshot() for replica in started]
    assert model_calls(fake) == 6  # each lists oai and ant itself once: its own path, checked
    fake.models = ["gpt-4o-mini", "gpt-5"]
    await asyncio.sleep(0.6)
    again = [await replica.refresh() for replica in started]
    assert model_calls(fake) == 8  # the first to refresh listed both; the others took its lists
    for snapshot in again:
        assert [m.id for m in snapshot.models if m.provider == "oai"] == [
            "oai/gpt-4o-mini",
            "oai/gpt-5",
        ]
        assert snapshot.models_body == again[0].models_body
        assert snapshot.categories_body == again[0].categories_body
        assert snapshot.states == {"oai": "ok", "ant": "ok", "demo": "ok"}
    assert first[1].models == first[0].models


async def test_each_replica_applies_its_own_allow_list_to_the_shared_list(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    wide = replicas.start(provider_settings(fake)[:1], ttl=0.2)
    narrow_settings = provider_settings(fake, models=["o4-mini"], aliases={"fast": "gpt-4o-mini"})
    narrow = replicas.start(narrow_settings[:1], ttl=0.2)
    await wide.snapshot()
    await narrow.snapshot()
    await asyncio.sleep(0.3)
    await wide.refresh()
    snapshot = await narrow.refresh()
    assert model_calls(fake) == 3  # narrow took wide's list of everything
    assert [m.id for m in snapshot.models] == ["oai/o4-mini", "oai/fast"]


async def test_a_replica_that_cannot_reach_the_upstream_uses_the_last_shared_list(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    early = replicas.start(provider_settings(fake)[:1], ttl=0.05, retry=0.01)
    first = await early.snapshot()
    fake.api_key = "sk-rotated-somewhere-else"  # every call is now refused with a 401
    try:
        await asyncio.sleep(0.1)
        # A replica started now has never listed anything itself: only the cache has the list.
        late = await replicas.start(provider_settings(fake)[:1], ttl=60, retry=0.01).snapshot()
        refreshed_by = asyncio.get_running_loop().time() + 0.01
        after = await early.refresh()
    finally:
        fake.api_key = UPSTREAM_KEY
    assert model_calls(fake) == 3  # both did try
    assert (late.unavailable, late.models) == ([], first.models)  # listed, as all replicas do
    assert late.states == {"oai": "unreachable"}  # but it never reached the upstream itself
    assert late.models_expire <= refreshed_by  # tried again after `retry`, not after a TTL
    assert (after.models, after.states) == (first.models, {"oai": "stale"})


async def test_a_gateway_that_never_reached_its_upstream_is_not_ready(
    fake: FakeUpstream, redis_server: RedisServer
) -> None:
    settings = Settings(
        providers=provider_settings(fake)[:1],
        cache=CacheSettings(url=redis_server.url, namespace=uuid.uuid4().hex, timeout=1.0),
    )
    registry = Registry.from_settings(settings.providers, ENVIRON)
    shared = RedisCache(redis_server.url, namespace=settings.cache.namespace, timeout=1.0)
    other = Catalog(registry, cache=shared)
    try:
        await other.snapshot()  # another replica has listed the upstream and shared the list
    finally:
        await other.aclose()
        await registry.aclose()
        await shared.aclose()
    fake.api_key = "sk-rotated-somewhere-else"  # from now on this upstream refuses the key
    try:
        with serve_in_thread(
            create_app(settings, ENVIRON), options=uvicorn_options(settings)
        ) as url:
            async with httpx2.AsyncClient(timeout=GUARD) as http:
                ready = await http.get(url + "/readyz")
                listed = await http.get(url + "/api/models")
    finally:
        fake.api_key = UPSTREAM_KEY
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "checks": {
            "providers": {"oai": "unreachable"},
            # Why, as a client is told: this replica's own key is refused.
            "provider_errors": {
                "oai": "oai: upstream rejected the gateway's credentials (HTTP 401)"
            },
            "cache": {"redis": "ok"},
            "journal": "ok",
            "classifier": "local",
        },
    }
    assert [m["id"] for m in listed.json()["data"]][:1] == ["oai/gpt-4.1"]  # the shared list
    assert model_calls(fake) == 2


async def test_lists_are_shared_only_between_the_same_credentials(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    a = replicas.start(provider_settings(fake)[:1], ttl=0.3)
    b = replicas.start(provider_settings(fake)[:1], ttl=0.3)
    wrong = {"FAKE_OPENAI_KEY": "sk-another-key"}
    other_key = replicas.start(provider_settings(fake)[:1], wrong, ttl=0.3, retry=0.1)
    for replica in (a, b, other_key):
        await replica.snapshot()
    assert model_calls(fake) == 3
    await asyncio.sleep(0.4)
    await a.refresh()
    await b.refresh()  # a's list
    assert model_calls(fake) == 4
    refused = await other_key.refresh()  # asks with its own key, is refused: nothing of a's
    assert model_calls(fake) == 5
    assert (refused.unavailable, refused.states) == (["oai"], {"oai": "unreachable"})


async def test_a_classification_made_by_one_replica_serves_the_others(
    fake: FakeUpstream,
    replicas: Replicas,
    servicer: CountingServicer,
) -> None:
    a = replicas.start(provider_settings(fake), **remote(servicer))
    first = await a.snapshot()
    assert (first.source, a.classifier_status) == ("classifier", "serving")
    assert len(servicer.asked) == 1
    assert sorted(servicer.asked[0]) == sorted(m.id for m in first.models)
    b = replicas.start(provider_settings(fake), **remote(servicer))
    second = await b.snapshot()
    assert len(servicer.asked) == 1  # b classified nothing
    assert b.classifier_calls == {"ok": 1}  # it only checked the service's health
    assert (second.source, b.classifier_status) == ("classifier", "serving")
    assert second.categories_body == first.categories_body


async def test_a_replica_cut_off_from_the_classifier_uses_fresh_shared_answers(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    server = ClassifierServer("127.0.0.1", 0)
    await server.start()
    options = {"classifier_address": f"127.0.0.1:{server.port}", "classifier_deadline": 0.3}
    try:
        first = await replicas.start(provider_settings(fake), **options).snapshot()
    finally:
        await server.stop(grace=None)
    cut_off = replicas.start(provider_settings(fake), retry=5.0, **options)
    async with asyncio.timeout(GUARD):
        snapshot = await cut_off.snapshot()
        checked_again_by = asyncio.get_running_loop().time() + 5.0
    # The data is the service's own and fresh; this process's path to it is what is degraded.
    assert (snapshot.source, snapshot.classes) == ("classifier", first.classes)
    assert b'"degraded":false' in snapshot.categories_body
    assert cut_off.classifier_status == "degraded"
    assert cut_off.classifier_calls == {"deadline_exceeded": 1}
    assert snapshot.classes_expire <= checked_again_by  # the check is repeated after `retry`


async def test_only_models_no_replica_has_classified_are_sent(
    fake: FakeUpstream,
    replicas: Replicas,
    servicer: CountingServicer,
) -> None:
    narrow = provider_settings(fake, models=["gpt-4o-mini", "o4-mini"])[:1]
    await replicas.start(narrow, **remote(servicer)).snapshot()
    wider = provider_settings(fake, models=["gpt-4o-mini", "o4-mini", "gpt-4.1"])[:1]
    snapshot = await replicas.start(wider, **remote(servicer)).snapshot()
    assert servicer.asked == [["oai/gpt-4o-mini", "oai/o4-mini"], ["oai/gpt-4.1"]]
    assert snapshot.source == "classifier"
    assert [c.id for c in snapshot.classes] == ["oai/gpt-4.1", "oai/gpt-4o-mini", "oai/o4-mini"]


async def test_a_classifier_that_is_down_leaves_the_shared_last_good_answer(
    fake: FakeUpstream, replicas: Replicas
) -> None:
    server = ClassifierServer("127.0.0.1", 0)
    await server.start()
    options = {
        "classifier_address": f"127.0.0.1:{server.port}",
        "classifier_deadline": 0.3,
        "ttl": 0.05,
    }
    try:
        first = await replicas.start(provider_settings(fake), **options).snapshot()
    finally:
        await server.stop(grace=None)
    await asyncio.sleep(0.1)
    late = replicas.start(provider_settings(fake), **options)  # never saw the service answer
    async with asyncio.timeout(GUARD):
        stale = await late.snapshot()
    assert (stale.source, late.classifier_status) == ("stale", "degraded")
    assert stale.classes == first.classes
    assert late.classifier_calls["ok"] == 0
    # A model the service never classified is given the in-process rules' answer.
    wider = provider_settings(fake, aliases={"newest": "gpt-4.1"})
    async with asyncio.timeout(GUARD):
        mixed = await replicas.start(wider, **options).snapshot()
    assert mixed.source == "fallback"
    assert {c.id for c in mixed.classes} == {c.id for c in first.classes} | {"oai/newest"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_with_no_models_the_classifier_is_still_checked(fake: FakeUpstream) -> None:
    nothing = provider_settings(fake, models=["not-listed-upstream"])[:1]
    registry = Registry.from_settings(nothing, ENVIRON)
    catalog = Catalog(
        registry, classifier_address=f"127.0.0.1:{closed_port()}", classifier_deadline=0.3
    )
    try:
        async with asyncio.timeout(GUARD):
            snapshot = await catalog.snapshot()
    finally:
        await catalog.aclose()
        await registry.aclose()
    assert snapshot.models == snapshot.classes == []
    assert snapshot.source == "classifier"  # nothing to classify: only the status can say it
    assert catalog.classifier_status == "degraded"
    assert catalog.classifier_calls == {"deadline_exceeded": 1}


async def test_without_redis_the_catalogue_is_still_served(fake: FakeUpstream) -> None:
    registry = Registry.from_settings(provider_settings(fake), ENVIRON)
    cache = RedisCache(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.1)
    catalog = Catalog(registry, cache=cache)
    try:
        async with asyncio.timeout(GUARD):
            snapshot = await catalog.snapshot()
    finally:
        await catalog.aclose()
        await registry.aclose()
        await cache.aclose()
    assert snapshot.unavailable == []
    assert {m.provider for m in snapshot.models} == {"oai", "ant", "demo"}
    assert model_calls(fake) == 2


async def test_redis_dying_and_coming_back_mid_run(
    fake: FakeUpstream, fresh_redis: RedisServer
) -> None:
    made = Replicas(lambda: RedisCache(fresh_redis.url, timeout=0.1))
    try:
        a = made.start(provider_settings(fake)[:1], ttl=0.05, retry=0.05)
        b = made.start(provider_settings(fake)[:1], ttl=0.05, retry=0.05)
        first = await a.snapshot()
        fresh_redis.stop()
        await asyncio.sleep(0.1)
        async with asyncio.timeout(GUARD):
            during = [await a.refresh(), await b.refresh()]  # each asks the upstream itself
        assert all(s.models == first.models and s.unavailable == [] for s in during)
        assert model_calls(fake) == 3
        fresh_redis.start()  # empty, same port; neither catalogue is restarted
        async with asyncio.timeout(GUARD):
            while True:  # until a's client has found Redis again and stored its fetch
                await asyncio.sleep(0.1)
                before = model_calls(fake)
                await a.refresh()
                await b.refresh()
                if model_calls(fake) == before + 1:  # b found a's list in Redis
                    break
    finally:
        await made.aclose()


class RecordingCache:
    """A cache that notes every key written through it, to damage those entries later."""

    def __init__(self, inner: Cache) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.use = inner.use
        self.written: set[str] = set()

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.written.add(key)
        await self.inner.set(key, value, ttl)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.inner.get_many(keys)

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        self.written.update(items)
        await self.inner.set_many(items, ttl)

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_unreadable_entries_are_made_again(
    fake: FakeUpstream,
    shared_cache: CacheFactory,
    servicer: CountingServicer,
) -> None:
    recording = RecordingCache(shared_cache())
    made = Replicas(lambda: recording)
    try:
        a = made.start(provider_settings(fake)[:1], ttl=0.2, **remote(servicer))
        b = made.start(provider_settings(fake)[:1], ttl=0.2, **remote(servicer))
        first = await a.snapshot()
        await b.snapshot()
        assert (model_calls(fake), len(servicer.asked)) == (2, 1)
        assert recording.written
        for key in recording.written:  # as another version, or damage, would leave them
            await recording.inner.set(key, b"\xc1 not msgpack", ttl=60)
        await asyncio.sleep(0.3)
        again = await a.refresh()
        assert (model_calls(fake), len(servicer.asked)) == (3, 2)  # made again, not failed
        assert (again.models, again.classes) == (first.models, first.classes)
        await b.refresh()
        assert (model_calls(fake), len(servicer.asked)) == (3, 2)  # and readable once more
    finally:
        await made.aclose()


def catalog_hits() -> float:
    labels = {"backend": "redis", "use": "catalog", "operation": "get", "result": "hit"}
    return REGISTRY.get_sample_value("tokenrelay_cache_operations_total", labels) or 0.0


def test_two_gateways_on_one_redis_classify_once(
    fake: FakeUpstream, redis_server: RedisServer
) -> None:
    async def run() -> None:
        servicer = CountingServicer()
        server = ClassifierServer("127.0.0.1", 0, servicer=servicer)
        await server.start()
        try:
            settings = Settings(
                providers=provider_settings(fake),
                cache=CacheSettings(url=redis_server.url, namespace=uuid.uuid4().hex),
                classifier=ClassifierSettings(address=f"127.0.0.1:{server.port}"),
            )
            bodies: list[tuple[bytes, bytes]] = []
            hits_before = catalog_hits()
            with contextlib.ExitStack() as stack:
                urls = [
                    stack.enter_context(
                        serve_in_thread(
                            create_app(settings, ENVIRON), options=uvicorn_options(settings)
                        )
                    )
                    for _ in range(2)
                ]
                async with httpx2.AsyncClient(timeout=GUARD) as http:
                    for url in urls:
                        listed = await http.get(url + "/api/models")
                        grouped = await http.get(url + "/api/models/categories")
                        assert listed.status_code == grouped.status_code == 200
                        bodies.append((listed.content, grouped.content))
            assert bodies[0] == bodies[1]
            assert len(servicer.asked) == 1  # the second gateway classified nothing itself
            # Its classifications came from Redis, counted apart from completions.
            assert catalog_hits() - hits_before >= len(json.loads(bodies[1][1])["models"])
            assert model_calls(fake) == 4  # each gateway lists each upstream once at start
        finally:
            await server.stop(grace=None)

    asyncio.run(run())
