"""The cache: one small async interface, an in-memory backend by default and Redis for replicas.

Values are bytes (callers encode with msgspec MessagePack); keys are namespaced and versioned.
Every failure is a miss: a cache that is down, slow or broken never fails a request. The Redis
backend stops asking for a short, growing while after an error (so a dead Redis costs nothing
per request) and tries again by itself, so it recovers without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec
from cachetools import TLRUCache

from providers.types import ChatRequest
from server import metrics

log = logging.getLogger("tokenrelay.cache")
KEY_VERSION = 2


class Cache(Protocol):
    """What the gateway needs of a cache backend."""

    backend: str
    use: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None: ...

    async def healthy(self) -> bool: ...

    async def aclose(self) -> None: ...


class _Counted(Protocol):
    backend: str
    use: str


def _count(cache: _Counted, operation: str, result: str, amount: int = 1) -> None:
    metrics.CACHE_OPERATIONS.labels(cache.backend, cache.use, operation, result).inc(amount)


class MemoryCache:
    """cachetools, bounded by entry count and by approximate bytes, with a TTL per entry."""

    backend = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        use: str = "completions",
    ) -> None:
        self.use = use  # what the entries are for: a label of the operation metrics
        self._max_entries = max_entries
        self._entries: TLRUCache[str, tuple[float, bytes]] = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _key, value, now: now + value[0],
            getsizeof=lambda value: len(value[1]) + 100,  # the key and the entry's own overhead
        )

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        _count(self, "get", "miss" if entry is None else "hit")
        return None if entry is None else entry[1]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if len(value) + 100 > self._entries.maxsize or ttl <= 0:
            return
        while len(self._entries) >= self._max_entries and key not in self._entries:
            self._entries.popitem()
        self._entries[key] = (ttl, value)
        _count(self, "set", "stored")

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        for key, value in items.items():
            await self.set(key, value, ttl)

    async def healthy(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._entries.clear()


class RedisCache:
    """`redis.asyncio` with short timeouts, fail-open, and a back-off after errors."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "tokenrelay",
        timeout: float = 0.1,
        max_connections: int = 64,
        use: str = "completions",
    ) -> None:
        import redis.asyncio

        self.use = use  # what the entries are for: a label of the operation metrics

        self._prefix = f"{namespace}:v{KEY_VERSION}:"
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
            retry_on_timeout=False,
        )
        self._down_until = 0.0
        self._backoff = 0.0
        self._errors_since_log = 0
        self._last_log = 0.0

    def _available(self, operation: str) -> bool:
        if time.monotonic() < self._down_until:
            _count(self, operation, "error")
            return False
        return True

    def _failed(self, operation: str, exc: BaseException) -> None:
        _count(self, operation, "error")
        self._backoff = min(self._backoff * 2 or 0.25, 5.0)
        self._down_until = time.monotonic() + self._backoff
        self._errors_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= 30.0:  # one line per 30 s at most, with a count
            log.warning(
                "cache backend failing; treating as misses",
                extra={
                    "fields": {
                        "backend": self.backend,
                        "errors": self._errors_since_log,
                        "error": type(exc).__name__,
                    }
                },
            )
            self._last_log = now
            self._errors_since_log = 0

    def _succeeded(self) -> None:
        if self._backoff:
            log.info("cache backend answering again", extra={"fields": {"backend": self.backend}})
        self._backoff = 0.0

    async def get(self, key: str) -> bytes | None:
        if not self._available("get"):
            return None
        try:
            found = await self._client.get(self._prefix + key)
        except Exception as exc:  # any failure of the backend is a miss
            self._failed("get", exc)
            return None
        self._succeeded()
        value = found if isinstance(found, bytes) else None
        _count(self, "get", "miss" if value is None else "hit")
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0 or not self._available("set"):
            return
        try:
            await self._client.set(self._prefix + key, value, px=max(int(ttl * 1000), 1))
        except Exception as exc:
            self._failed("set", exc)
            return
        self._succeeded()
        _count(self, "set", "stored")

    async def delete(self, key: str) -> None:
        if not self._available("delete"):
            return
        try:
            await self._client.delete(self._prefix + key)
        except Exception as exc:
            self._failed("delete", exc)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """One MGET; a failure is a miss for every key."""
        if not keys:
            return []
        if not self._available("get"):
            return [None] * len(keys)
        try:
            found = await self._client.mget([self._prefix + key for key in keys])
        except Exception as exc:
            self._failed("get", exc)
            return [None] * len(keys)
        self._succeeded()
        values = [value if isinstance(value, bytes) else None for value in found]
        hits = sum(value is not None for value in values)
        _count(self, "get", "hit", hits)
        _count(self, "get", "miss", len(values) - hits)
        return values

    async def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        """One pipelined round trip (not a transaction: each entry stands alone)."""
        if not items or ttl <= 0 or not self._available("set"):
            return
        px = max(int(ttl * 1000), 1)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(self._prefix + key, value, px=px)
                await pipe.execute()
        except Exception as exc:
            self._failed("set", exc)
            return
        self._succeeded()
        _count(self, "set", "stored", len(items))

    async def healthy(self) -> bool:
        try:
            alive = bool(await self._client.ping())
        except Exception:
            return False
        if alive:
            self._down_until = 0.0  # it answers: no reason to keep skipping it
        return alive

    async def aclose(self) -> None:
        await self._client.aclose()


def completion_key(provider: str, request: ChatRequest, tenant: str | None = None) -> str:
    """SHA-256 over a canonical JSON encoding of everything that may change the answer.

    msgspec encodes the Structs in field order and leaves unset fields out, so equal requests
    give equal bytes (JSON rather than MessagePack, which has no integers past 64 bits and would
    fail on one in a client's JSON schema): messages with their image and tool parts, tools,
    tool choice, response format and every sampling option. Fields that only label or bill a
    request (`user`, `metadata`, `safety_identifier`, `store`, `prompt_cache_key`) are left out.
    `tenant` (the gateway key, with `[cache] scope = "key"`) keeps each key's answers to itself.
    """
    if (
        request.user is not None
        or request.metadata is not None
        or request.safety_identifier is not None
        or request.store is not None
        or request.prompt_cache_key is not None
    ):
        request = msgspec.structs.replace(
            request,
            user=None,
            metadata=None,
            safety_identifier=None,
            store=None,
            prompt_cache_key=None,
        )
    material: tuple[Any, ...] = (KEY_VERSION, provider, request)
    if tenant is not None:
        material = (*material, tenant)
    return "chat:" + hashlib.sha256(_encode(material)).hexdigest()


_encode = msgspec.json.Encoder().encode


class CachePolicy(msgspec.Struct, frozen=True):
    """What one request allows: read a cached answer, store its own, and the oldest it accepts."""

    read: bool = True
    store: bool = True
    max_age: float | None = None

    @classmethod
    def parse(cls, value: str | None) -> CachePolicy:
        """From a `Cache-Control` value: `no-cache`, `no-store`, `max-age=N` (others ignored)."""
        if not value:
            return _DEFAULT_POLICY
        read, store, max_age = True, True, None
        for part in value.lower().split(","):
            name, _, arg = part.strip().partition("=")
            if name == "no-cache":
                read = False
            elif name == "no-store":
                store = False
            elif name == "max-age":
                try:
                    max_age = max(float(arg.strip().strip('"')), 0.0)
                except ValueError:
                    continue
        return cls(read=read, store=store, max_age=max_age)


_DEFAULT_POLICY = CachePolicy()
