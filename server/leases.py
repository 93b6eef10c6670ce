"""Per-key caps shared by replicas: each open stream or socket holds a lease in Redis.

A key's leases are one sorted set (`<namespace>:leases:<kind>:<principal>`) whose members
are lease ids scored by their expiry on Redis's clock. Taking a lease drops the expired ones
and adds one only below the cap, in one Lua script (atomic). Every replica renews the leases it
holds every third of `ttl`, so a replica that dies (crash, kill -9, lost network) stops
renewing and its leases expire within `ttl`: a key never loses its slots to a dead replica.
Like the cache and the rate buckets, a Redis that fails is skipped: the lease is granted and
only the replica's own count applies until Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

log = logging.getLogger("tokenrelay.limits")

# KEYS[1]: the key's set; ARGV: cap, ttl in ms, lease id. 1 when taken, 0 when at the cap.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# KEYS: sets; ARGV: ttl in ms, then one lease id per key. Only leases still there are renewed
# (XX), so one released in the meantime is not brought back.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""


class RedisLeases:
    """Leases in Redis, renewed in the background while held; fail-open with a back-off."""

    def __init__(
        self, url: str, *, namespace: str = "tokenrelay", timeout: float = 0.1, ttl: float = 30.0
    ) -> None:
        import redis.asyncio

        self._prefix = f"{namespace}:leases:"
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._take = self._client.register_script(_TAKE)
        self._renew = self._client.register_script(_RENEW)
        self.ttl = ttl
        self._held: dict[str, str] = {}  # lease id -> its set
        self._renewer: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._last_log = 0.0

    async def take(self, kind: str, principal: str, cap: int) -> str | None:
        """A new lease id when the key is below `cap` across replicas, else None. When Redis
        fails the lease is granted as '' (held only locally)."""
        if time.monotonic() < self._down_until:
            return ""
        name = f"{self._prefix}{kind}:{principal}"
        lease = uuid.uuid4().hex
        try:
            taken = await self._take(keys=[name], args=[cap, int(self.ttl * 1000), lease])
        except Exception as exc:  # any Redis fault: allow, as a cache miss would
            self._failed(exc)
            return ""
        if not int(taken):
            return None
        self._held[lease] = name
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return lease

    def give_back(self, lease: str) -> None:
        """Release a lease (in the background: a release never waits on Redis)."""
        name = self._held.pop(lease, None)
        if name is None:
            return
        task = asyncio.get_running_loop().create_task(self._remove(name, lease))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _remove(self, name: str, lease: str) -> None:
        try:
            await self._client.zrem(name, lease)
        except Exception as exc:  # it expires on its own
            self._failed(exc)

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.ttl / 3)
            held = list(self._held.items())
            if not held:
                break
            try:
                await self._renew(
                    keys=[name for _, name in held],
                    args=[int(self.ttl * 1000), *(lease for lease, _ in held)],
                )
            except Exception as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + 1.0
        if time.monotonic() - self._last_log >= 30.0:
            self._last_log = time.monotonic()
            log.warning(
                "slot lease backend failing; counting this replica's slots only",
                extra={"fields": {"error": type(exc).__name__}},
            )

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        for lease in list(self._held):
            self.give_back(lease)
        await asyncio.gather(*self._releases, return_exceptions=True)
        await self._client.aclose()
