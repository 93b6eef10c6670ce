"""The `[limits]` on what one request, socket or key may ask for, checked after decoding.

Every limit is answered with a structured error naming what was over it: `LimitExceededError`
(400, `limit_exceeded`) for a request's size, `TooManyStreamsError` / `TooManySocketsError`
(429) for what a key may hold open at once. Counts of open streams and sockets are per process.
"""

from __future__ import annotations

import re
import time

import msgspec

from server.errors import LimitExceededError, TooManySocketsError, TooManyStreamsError
from server.protocol import ChatCompletionBody
from server.ratelimit import RateLimiter
from server.settings import LimitSettings

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


class Slots:
    """How many of something each principal holds open, up to a cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: dict[str, int] = {}

    def acquire(self, principal: str) -> bool:
        held = self._held.get(principal, 0)
        if held >= self.cap:
            return False
        self._held[principal] = held + 1
        return True

    def release(self, principal: str) -> None:
        held = self._held.get(principal, 0) - 1
        if held > 0:
            self._held[principal] = held
        else:
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

    def __init__(self, settings: LimitSettings, limiter: RateLimiter) -> None:
        self.settings = settings
        self.limiter = limiter
        self.streams = Slots(settings.streams_per_key)
        self.sockets = Slots(settings.ws_sockets_per_key)

    def check_depth(self, data: bytes) -> None:
        if too_deep(data, self.settings.max_json_depth):
            raise LimitExceededError(
                f"The JSON nests deeper than the limit of {self.settings.max_json_depth} levels."
            )

    def check_body(self, body: ChatCompletionBody) -> None:
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
            value = getattr(body, name)
            if value is not None and value > s.max_tokens:
                raise LimitExceededError(
                    f"{name} may be at most {s.max_tokens}.",
                    param=name,
                )

    def stream_slot(self, principal: str | None) -> None:
        """Take one of the principal's concurrent stream slots (release with `end_stream`)."""
        if principal is not None and not self.streams.acquire(principal):
            raise TooManyStreamsError(
                f"This key already runs {self.streams.cap} streams; wait for one to end."
            )

    def end_stream(self, principal: str | None) -> None:
        if principal is not None:
            self.streams.release(principal)

    def socket_slot(self, principal: str | None) -> None:
        if principal is not None and not self.sockets.acquire(principal):
            raise TooManySocketsError(
                f"This key already has {self.sockets.cap} WebSockets open; close one first."
            )

    def end_socket(self, principal: str | None) -> None:
        if principal is not None:
            self.sockets.release(principal)
