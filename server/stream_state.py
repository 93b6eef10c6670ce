"""What one stream has done so far, shared by the stream service and everything that watches it.

The stream service writes it, the transport that started the stream reads it (after a cancel,
too), and the lifecycle, the observers and the rate limiter keep or record it. It has a module
of its own so that none of them needs to import the service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from providers.errors import GatewayError
from providers.types import ChatRequest, FinishReason, Usage, estimate_tokens
from server.guard import current_abort
from server.metrics import Outcome, Transport


class Deadline(Protocol):
    """The timer of the upstream attempt in progress, which an interrupt ends at once."""

    def expire(self) -> None: ...


class StreamState:
    """What happened in one stream so far; the transport may read it after a cancel.

    Times are `time.monotonic()` (uvloop's loop clock moves in whole milliseconds, too coarse
    for time to first token and cancel propagation).
    """

    __slots__ = (
        "request_id",
        "transport",
        "cached",
        "watchdog",
        "draining",
        "_wakeup",
        "cancel_cause",
        "cancelled_at",
        "outcome",
        "model",
        "provider",
        "started_at",
        "first_token_at",
        "ended_at",
        "chunks",
        "reason",
        "stop_sequence",
        "usage",
        "error",
        "abort",
        "_request",
    )

    def __init__(self, request_id: str, started_at: float, transport: Transport) -> None:
        self.request_id = request_id
        self.transport: Transport = transport
        self.started_at = started_at
        # Set by the transport just before it cancels the stream's task.
        self.cancel_cause: Outcome | None = None
        self.cancelled_at: float | None = None
        self.outcome: Outcome = "client_disconnected"
        self.cached = False  # served from the completion cache
        self.watchdog: Deadline | None = None  # of the upstream attempt in progress
        self.draining = False  # the server is shutting down: end now, no more retries
        self._wakeup: asyncio.Event | None = None
        self.model = ""
        self.provider = ""
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.chunks = 0
        self.reason: FinishReason | None = None
        self.stop_sequence: str | None = None  # which of the client's ended the answer, if known
        self.usage: Usage | None = None
        self.error: GatewayError | None = None
        # Drops the client's connection at once (None under a server that offers no abort).
        self.abort: Callable[[], None] | None = current_abort.get()
        self._request: ChatRequest | None = None

    def interrupt(self) -> None:
        """End the stream now with a shutdown error (from the upstream wait, a write or a pause)."""
        self.draining = True
        if self.watchdog is not None:
            self.watchdog.expire()
        if self._wakeup is not None:
            self._wakeup.set()

    async def pause(self, seconds: float) -> None:
        """Sleep before a retry, unless interrupted."""
        self._wakeup = asyncio.Event()
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._wakeup = None

    def cancel(self, cause: Outcome) -> None:
        """Note why and when the transport is about to cancel this stream."""
        if self.cancel_cause is None:
            self.cancel_cause = cause
            self.cancelled_at = time.monotonic()

    @property
    def ttft(self) -> float | None:
        """Seconds from the request's arrival to the first token written to the client."""
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    def messages(self) -> list[dict[str, str]]:
        """The request's messages as role and text (only ever logged when explicitly enabled)."""
        if self._request is None:
            return []
        return [{"role": m.role, "content": m.text} for m in self._request.messages]

    def usage_so_far(self) -> Usage:
        """The upstream's usage when it sent one, else an estimate of what was sent and relayed.

        The prompt is charged at no less than one token per four characters of its messages
        (text, inline media, tool calls), so text without spaces cannot pass for one word and
        a client cannot dodge `tokens_per_minute` by disconnecting before the usage arrives.
        """
        if self.usage is not None:
            return self.usage
        prompt = 0
        if self._request is not None:
            prompt = sum(
                max(estimate_tokens(m.text), -(-m.size() // 4)) for m in self._request.messages
            )
        return Usage(prompt_tokens=prompt, completion_tokens=self.chunks)
