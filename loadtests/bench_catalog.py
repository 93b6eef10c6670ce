"""What sharing the model catalogue through Redis saves: upstream and classifier work, refresh time.

    .venv/bin/python -m loadtests.bench_catalog [--replicas 4] [--periods 5] [--models 300]

Runs `--replicas` catalogues (as separate gateway processes would have) against one fake
OpenAI-compatible upstream listing `--models` models and a real gRPC classifier, for
`--periods` TTLs, twice: each replica with its own in-memory cache, then all on one
redis-server started for the run (127.0.0.1, a free port). Prints the upstream `/models`
calls and the models sent to the classifier each way, then the median time of one refresh
done from the sources (list upstream, classify over gRPC) and from Redis. Needs redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from providers.registry import Registry
from providers.settings import ProviderSettings
from server.cache import Cache, MemoryCache, RedisCache
from server.catalog import Catalog
from server.classification.service import ClassifierServer, ClassifierServicer
from server.classification.stubs import classifier_pb2 as pb
from tests.fakeupstream import FakeUpstream
from tests.support.redis import running_redis

KEY = "sk-bench-catalog-0123456789"
TTL = 0.25


class CountingServicer(ClassifierServicer):
    def __init__(self) -> None:
        super().__init__()
        self.models_sent = 0

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        self.models_sent += len(request.models)
        return await super().Classify(request, context)


def model_ids(count: int) -> list[str]:
    families = ["gpt-4o", "llama-3.1-{}b-instruct", "qwen2.5-coder-{}b", "mistral-{}b", "o4-mini"]
    return [families[i % len(families)].format(7 + i) + f"-v{i}" for i in range(count)]


def calls(upstream: FakeUpstream) -> int:
    return sum(1 for r in list(upstream.requests) if r.path == "/v1/models")


async def run_periods(
    upstream: FakeUpstream, address: str, caches: list[Cache], periods: int
) -> None:
    provider = ProviderSettings(
        name="up", kind="openai", base_url=upstream.url + "/v1", api_key_env="KEY"
    )
    registries = [Registry.from_settings([provider], {"KEY": KEY}) for _ in caches]
    catalogs = [
        Catalog(r, cache=c, ttl=TTL, classifier_address=address)
        for r, c in zip(registries, caches, strict=True)
    ]
    try:
        for _ in range(periods):
            for catalog in catalogs:  # one after another, as replicas' refreshes spread out
                await catalog.refresh()
            await asyncio.sleep(TTL * 1.2)
    finally:
        for catalog, registry in zip(catalogs, registries, strict=True):
            await catalog.aclose()
            await registry.aclose()


async def refresh_times(
    upstream: FakeUpstream, address: str, cache: Cache, samples: int, *, shared: bool
) -> list[float]:
    """Seconds per refresh: `shared` reads what another replica stored moments before."""
    provider = ProviderSettings(
        name="up", kind="openai", base_url=upstream.url + "/v1", api_key_env="KEY"
    )
    registries = [Registry.from_settings([provider], {"KEY": KEY}) for _ in range(2)]
    maker, timed = (
        Catalog(r, cache=cache, ttl=TTL, classifier_address=address) for r in registries
    )
    seconds: list[float] = []
    try:
        await timed.refresh()  # its own first listing, as every process does once
        for _ in range(samples):
            await asyncio.sleep(TTL * 1.2)
            if shared:
                await maker.refresh()
            started = time.perf_counter()
            await timed.refresh()
            seconds.append(time.perf_counter() - started)
    finally:
        for catalog in (maker, timed):
            await catalog.aclose()
        for registry in registries:
            await registry.aclose()
    return seconds


async def main_async(args: argparse.Namespace) -> None:
    servicer = CountingServicer()
    classifier = ClassifierServer("127.0.0.1", 0, servicer=servicer)
    await classifier.start()
    address = f"127.0.0.1:{classifier.port}"
    try:
        with (
            FakeUpstream(api_key=KEY, models=model_ids(args.models)).running_in_thread() as up,
            running_redis() as redis,
        ):
            rows = []
            for label in ("per process", "shared Redis"):
                before_calls, before_sent = calls(up), servicer.models_sent
                namespace = uuid.uuid4().hex
                caches: list[Cache] = [
                    MemoryCache()
                    if label == "per process"
                    else RedisCache(redis.url, namespace=namespace, timeout=1.0)
                    for _ in range(args.replicas)
                ]
                await run_periods(up, address, caches, args.periods)
                for cache in caches:
                    await cache.aclose()
                rows.append((label, calls(up) - before_calls, servicer.models_sent - before_sent))
            print(f"{args.replicas} replicas, {args.periods} TTL periods, {args.models} models")
            print(f"{'':14}{'/models calls':>15}{'models classified':>20}")
            for label, listed, sent in rows:
                print(f"{label:14}{listed:>15}{sent:>20}")
            print(
                f"saved by sharing: {rows[0][1] / max(rows[1][1], 1):.1f}x upstream calls, "
                f"{rows[0][2] / max(rows[1][2], 1):.1f}x classifications"
            )
            shared_cache = RedisCache(redis.url, namespace=uuid.uuid4().hex, timeout=1.0)
            own = await refresh_times(up, address, MemoryCache(), args.samples, shared=False)
            from_redis = await refresh_times(up, address, shared_cache, args.samples, shared=True)
            await shared_cache.aclose()
            own_ms = statistics.median(own) * 1000
            redis_ms = statistics.median(from_redis) * 1000
            print(f"refresh from the sources (list + classify over gRPC): {own_ms:.2f} ms median")
            print(f"refresh from Redis (another replica's entries):       {redis_ms:.2f} ms median")
            print(f"ratio: {own_ms / redis_ms:.1f}x")
    finally:
        await classifier.stop(grace=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--periods", type=int, default=5)
    parser.add_argument("--models", type=int, default=300)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
