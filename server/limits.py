"""The `[limits]` on what one request, socket or key may ask for, checked after decoding.

Every limit is answered with a structured error naming what was over it: `LimitExceededError`
(400, `limit_exceeded`) for a request's size, `TooManyStreamsError` / `TooManySocketsError`
(429) for what a key (`*_per_key`) or, without keys, a client address (`*_per_address`, off by
default) may hold open at once. Open streams and sockets are counted per process, and across
replicas through leases in Redis when the cache has a Redis `url`. Before any of them, a stream
takes a slot of the process's own cap (`server.admission`).
"""

from __future__ import annotations

import re
import time

import msgspec

from providers.types import ChatRequest
from server.admission import StreamGate, refused
from server.errors import LimitExceededError, TooManyStreamsError
from server.leases import RedisLeases
from server.protocol import ChatCompletionBody
from server.ratelimit import RateLimiter
from server.settings import LimitSettings

ADDRESS = "ip:"  # how a client address's principal begins (a key's begins with "key:")

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def too_deep(data: bytes, limit: int) -> bool:
    """Whether the JSON in `data` nests arrays and objects more than `limit` deep.

    Only for JSON that decoded (so every string is terminated and the scan is linear); each
    pass over the brackets removes one level, at C speed.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    skeleton = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        skeleton = _INNERMOST.sub(b"", skeleton)
        if not skeleton:
            return False
    return True


class _Slot:
    __slots__ = ("lease",)

    def __init__(self) -> None:
        self.lease = ""  # its lease id in Redis ('' while asking, or when held only here)


class Slots:
    """How many of something each principal holds open, up to a cap: in this process, and
    across replicas when `shared` leases are given (see `server.leases`). A key's cap is `cap`;
    a client address's is `address_cap`, where 0 means none (nothing is counted)."""

    def __init__(
        self,
        cap: int,
        kind: str = "slots",
        shared: RedisLeases | None = None,
        *,
        address_cap: int = 0,
    ) -> None:
        self.cap = cap
        self.address_cap = address_cap
        self._kind = kind
        self._shared = shared
        self._held: dict[str, list[_Slot]] = {}

    def cap_of(self, principal: str) -> int:
        """The principal's cap; 0 when it has none."""
        return self.address_cap if principal.startswith(ADDRESS) else self.cap

    async def acquire(self, principal: str) -> bool:
        cap = self.cap_of(principal)
        if not cap:
            return True
        held = self._held.setdefault(principal, [])
        if len(held) >= cap:
            return False
        slot = _Slot()
        held.append(slot)  # reserved here first, so concurrent acquires count it
        if self._shared is None:
            return True
        try:
            lease = await self._shared.take(self._kind, principal, cap)
        except BaseException:
            self._forget(principal, slot)
            raise
        if lease is None:
            self._forget(principal, slot)
            return False
        slot.lease = lease
        return True

    def release(self, principal: str) -> None:
        held = self._held.get(principal)
        if not held:
            return
        slot = held.pop()
        if not held:
            del self._held[principal]
        if slot.lease and self._shared is not None:
            self._shared.give_back(slot.lease)

    def _forget(self, principal: str, slot: _Slot) -> None:
        held = self._held.get(principal, [])
        if slot in held:
            held.remove(slot)
        if not held:
            self._held.pop(principal, None)


class FrameMeter:
    """Frames per second on one socket, as a token bucket with a one-second burst."""

    __slots__ = ("_rate", "_level", "_at")

    def __init__(self, rate: int) -> None:
        self._rate = float(rate)
        self._level = float(rate)
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._level = min(self._rate, self._level + (now - self._at) * self._rate)
        self._at = now
        if self._level < 1:
            return False
        self._level -= 1
        return True


class Limits:
    """The limits of one gateway: request checks, per-key slots and the rate limiter."""

    def __init__(
        self,
        settings: LimitSettings,
        limiter: RateLimiter,
        leases: RedisLeases | None = None,
        gate: StreamGate | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.leases = leases
        self.gate = gate or StreamGate(0)
        self.streams = Slots(
            settings.streams_per_key,
            "streams",
            leases,
            address_cap=settings.streams_per_address,
        )
        self.sockets = Slots(
            settings.ws_sockets_per_key,
            "sockets",
            leases,
            address_cap=settings.ws_sockets_per_address,
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()
        if self.leases is not None:
            await self.leases.aclose()

    def check_depth(self, data: bytes) -> None:
        if too_deep(data, self.settings.max_json_depth):
            raise LimitExceededError(
                f"The JSON nests deeper than the limit of {self.settings.max_json_depth} levels."
            )

    def check_body(self, body: ChatCompletionBody | ChatRequest) -> None:
        """A decoded request within the message, character and `max_tokens` limits."""
        s = self.settings
        if len(body.messages) > s.max_messages:
            raise LimitExceededError(
                f"{len(body.messages)} messages is over the limit of {s.max_messages}.",
                param="messages",
            )
        chars = sum(m.size() for m in body.messages)
        if chars > s.max_chars:
            raise LimitExceededError(
                f"The messages hold {chars} characters (text, inline media and tool calls), "
                f"over the limit of {s.max_chars}.",
                param="messages",
            )
        for name in ("tools", "response_format", "prediction"):  # all sent with the messages
            value = getattr(body, name)
            if value is None:
                continue
            chars += len(msgspec.json.encode(value))
            if chars > s.max_chars:
                raise LimitExceededError(
                    f"The messages with the tools, response format and prediction hold {chars} "
                    f"characters or more, over the limit of {s.max_chars}.",
                    param=name,
                )
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name, None)  # only Chat Completions has the second
            if value is not None and value > s.max_tokens:
                raise LimitExceededError(
                    f"{name} may be at most {s.max_tokens}.",
                    param=name,
                )

    async def stream_slot(self, principal: str | None) -> None:
        """Take a slot of the process's cap, then one of the principal's concurrent stream
        slots (release both with `end_stream`)."""
        self.gate.enter()
        try:
            if principal is not None and not await self.streams.acquire(principal):
                raise self._too_many_streams(principal)
        except BaseException:
            self.gate.leave()
            raise

    def _too_many_streams(self, principal: str) -> TooManyStreamsError:
        cap = self.streams.cap_of(principal)
        if principal.startswith(ADDRESS):
            refused("streams_per_address")
            return TooManyStreamsError(
                f"This client address already runs {cap} streams; wait for one to end."
            )
        refused("streams_per_key")
        return TooManyStreamsError(f"This key already runs {cap} streams; wait for one to end.")

    def end_stream(self, principal: str | None) -> None:
        if principal is not None:
            self.streams.release(principal)
        self.gate.leave()
