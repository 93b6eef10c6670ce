"""Token buckets for requests and tokens per minute, per key (or client address).

A bucket holds up to `capacity` and refills at `capacity / 60` per second. A request takes one
from its requests bucket and is refused while its tokens bucket is empty or negative; a
stream's tokens are only known at its end, so they are charged then and may drive the bucket
below zero, which refuses new requests until it has refilled. Buckets live in memory, or in
Redis (one Lua script per operation, atomic, on Redis's clock) when the cache has a Redis `url`,
so replicas share them. Like the cache, a Redis that fails is skipped: requests are allowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from cachetools import TTLCache

from server.observe import StreamObserver

if TYPE_CHECKING:
    from server.stream_state import StreamState

log = logging.getLogger("tokenrelay.ratelimit")

# Whom the request or socket being served belongs to ("key:<id>" or "ip:<address>"), set by
# the auth middleware; stream tasks started within it inherit it.
current_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenrelay_principal", default=None
)


class Buckets(Protocol):
    """Where bucket levels are kept."""

    async def take(self, name: str, capacity: float, cost: float, *, strict: bool) -> float:
        """Remove `cost` and return 0, or when `strict` and short, remove nothing and return
        the seconds until `cost` would be there. Non-strict takes may go below zero."""
        ...

    async def wait(self, name: str, capacity: float) -> float:
        """Seconds until the bucket is above zero (0 when it is)."""
        ...

    async def aclose(self) -> None: ...


class MemoryBuckets:
    """Buckets in this process (bounded: idle ones are forgotten, which refills them)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._levels: TTLCache[str, tuple[float, float]] = TTLCache(max_entries, ttl=120.0)

    def _level(self, name: str, capacity: float, now: float) -> float:
        level, at = self._levels.get(name, (capacity, now))
        return min(capacity, level + (now - at) * capacity / 60.0)

    async def take(self, name: str, capacity: float, cost: float, *, strict: bool) -> float:
        now = time.monotonic()
        level = self._level(name, capacity, now)
        if strict and level < cost:
            return (cost - level) * 60.0 / capacity
        self._levels[name] = (level - cost, now)
        return 0.0

    async def wait(self, name: str, capacity: float) -> float:
        level = self._level(name, capacity, time.monotonic())
        return 0.0 if level > 0 else (-level + 1) * 60.0 / capacity

    async def aclose(self) -> None:
        pass


# KEYS[1]: the bucket; ARGV: capacity, cost, mode (take | charge | wait). Returns the wait
# in seconds as a string (Lua numbers would be truncated to integers on the way out).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local rate = capacity / 60
local saved = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(saved[1]) or capacity
local at = tonumber(saved[2]) or now
level = math.min(capacity, level + math.max(now - at, 0) * rate)
local wait = 0
if ARGV[3] == 'wait' then
  if level <= 0 then wait = (1 - level) / rate end
  return tostring(wait)
elseif ARGV[3] == 'take' and level < cost then
  return tostring((cost - level) / rate)
end
level = level - cost
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((capacity - level) / rate) + 60)
return tostring(wait)
"""


class RedisBuckets:
    """Buckets shared by every replica using the same Redis; fail-open with a back-off."""

    def __init__(self, url: str, *, namespace: str = "tokenrelay", timeout: float = 0.1) -> None:
        import redis.asyncio

        self._prefix = f"{namespace}:ratelimit:"
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._script = self._client.register_script(_SCRIPT)
        self._down_until = 0.0
        self._last_log = 0.0

    async def _run(self, name: str, capacity: float, cost: float, mode: str) -> float:
        if time.monotonic() < self._down_until:
            return 0.0
        try:
            result = await self._script(keys=[self._prefix + name], args=[capacity, cost, mode])
        except Exception as exc:  # any Redis fault: allow, as a cache miss would
            self._down_until = time.monotonic() + 1.0
            if time.monotonic() - self._last_log >= 30.0:
                self._last_log = time.monotonic()
                log.warning(
                    "rate-limit backend failing; allowing requests",
                    extra={"fields": {"error": type(exc).__name__}},
                )
            return 0.0
        return float(result)

    async def take(self, name: str, capacity: float, cost: float, *, strict: bool) -> float:
        return await self._run(name, capacity, cost, "take" if strict else "charge")

    async def wait(self, name: str, capacity: float) -> float:
        return await self._run(name, capacity, 0, "wait")

    async def aclose(self) -> None:
        await self._client.aclose()


class RateLimiter:
    """Requests and tokens per minute for one principal (a key id or a client address)."""

    def __init__(self, buckets: Buckets, requests_per_minute: int, tokens_per_minute: int) -> None:
        self._buckets = buckets
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute

    @property
    def enabled(self) -> bool:
        return bool(self._rpm or self._tpm)

    @property
    def counts_tokens(self) -> bool:
        return bool(self._tpm)

    async def admit(self, principal: str) -> float:
        """Take one request; the seconds to wait before retrying, or 0 when admitted."""
        if self._tpm:
            wait = await self._buckets.wait(f"tok:{principal}", self._tpm)
            if wait > 0:
                return wait
        if self._rpm:
            return await self._buckets.take(f"req:{principal}", self._rpm, 1, strict=True)
        return 0.0

    async def charge(self, principal: str, tokens: int) -> None:
        """Charge a finished stream's tokens (the bucket may go below zero)."""
        if self._tpm and tokens > 0:
            await self._buckets.take(f"tok:{principal}", self._tpm, tokens, strict=False)

    async def aclose(self) -> None:
        await self._buckets.aclose()


class ChargingObserver(StreamObserver):
    """The stream observer that also charges each stream's tokens to its principal."""

    def __init__(self, limiter: RateLimiter, *, log_content: bool = False) -> None:
        super().__init__(log_content=log_content)
        self._limiter = limiter
        self._charges: set[asyncio.Task[None]] = set()

    def ended(self, state: StreamState) -> None:
        super().ended(state)
        principal = current_principal.get()
        if (
            not self._limiter.counts_tokens
            or principal is None
            or state.cached
            or not (state.outcome == "completed" or state.chunks)
        ):
            return
        tokens = state.usage_so_far().total_tokens
        task = asyncio.get_running_loop().create_task(self._limiter.charge(principal, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def aclose(self) -> None:
        """Wait for charges still in flight."""
        await asyncio.gather(*self._charges, return_exceptions=True)
