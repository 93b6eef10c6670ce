"""The process's own protection: a cap on the streams it runs at once (`[server] max_streams`).

Past the cap a stream is refused at once, before any upstream work, with `ServerBusyError`
(503 and a `Retry-After`, or a `chat.error` carrying `retry_after` over a WebSocket). It
bounds the work one process takes on, so the streams it does run keep their latency and their
cancels stay fast instead of queueing behind more work than one core can do. The cap counts
every transport and dialect alike; unlike the per-key caps it is never shared through Redis,
as it protects this process's CPU, not a tenant's share.
"""

from __future__ import annotations

from typing import Literal

from server import metrics
from server.errors import ServerBusyError

# Streams last seconds; a second is soon enough to find a free slot, here or on a replica.
RETRY_AFTER = 1.0

Refusal = Literal["max_streams", "streams_per_key", "streams_per_address"]
_REFUSED = {reason: metrics.STREAMS_REFUSED.labels(reason) for reason in metrics.REFUSALS}


def refused(reason: Refusal) -> None:
    """Count a stream refused by one of the caps."""
    _REFUSED[reason].inc()


class StreamGate:
    """How many streams this process runs, up to `cap` (0: no cap)."""

    __slots__ = ("cap", "open")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0

    def check(self) -> None:
        """Raise `ServerBusyError` at the cap: a refusal before the request is even read."""
        if self.cap and self.open >= self.cap:
            refused("max_streams")
            raise ServerBusyError(
                f"The server is running its maximum of {self.cap} streams; retry shortly.",
                retry_after=RETRY_AFTER,
            )

    def enter(self) -> None:
        """Take a slot (give it back with `leave`), or raise `ServerBusyError` at the cap."""
        self.check()
        self.open += 1

    def leave(self) -> None:
        if self.open > 0:
            self.open -= 1
