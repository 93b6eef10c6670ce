"""The provider seam: what every upstream adapter offers the stream service."""

from __future__ import annotations

import collections
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from providers.types import ChatRequest, Delta, Event


class Outlet:
    """A way for deltas to reach the client without waking the task that runs the stream.

    The stream service sets `write` once the stream's first delta went out (the response head
    with it) and clears it when the attempt ends. While the stream's iterator is waiting for
    upstream bytes, a provider may decode what its connection reads and hand each delta to
    `write` right there, in the read callback: True means the delta reached the client's
    socket and was counted; False means nothing was written, and that delta and every later
    one must come out of the iterator as usual (the client's buffer is full, say). Order is
    the provider's to keep: nothing may go to `write` while the iterator holds events it has
    not yielded yet. Providers that never write to it are correct, only slower.
    """

    __slots__ = ("write",)

    def __init__(self) -> None:
        self.write: Callable[[Delta], bool] | None = None


class PushReader:
    """Decodes an upstream's body into deltas: in the stream's iterator (`events`), or, while
    the iterator waits, in the connection's read callback (`push`), which hands them to the
    outlet. Adapters subclass it with their `events`.

    The iterator yields `pending` (what a push decoded but the outlet refused) before anything
    it decodes itself, and raises `failure` (a broken or in-band error event, or a fault of
    the writer) after what came before it; `nudge` wakes it when a push leaves either.
    """

    __slots__ = ("outlet", "nudge", "pending", "failure")

    def __init__(self, outlet: Outlet | None) -> None:
        self.outlet = outlet
        self.nudge: Callable[[], None] = _nothing
        self.pending: collections.deque[Delta] = collections.deque()
        self.failure: Exception | None = None

    def events(self, raw: bytes) -> list[Delta]:
        """The deltas of the bytes read; a failure sets `failure` and ends the list (the
        deltas before it still count)."""
        raise NotImplementedError

    def hook(self, chunks: object) -> None:
        """Have the connection under `chunks` (from `body_chunks`) push what it reads while
        the iterator waits; nothing for a body that is not the lean transport's own. Closing
        the response (on every way out) takes the hook off again."""
        push_to = getattr(chunks, "push_to", None)  # `providers.transport`'s bodies have it
        connection = push_to(self.push) if push_to is not None else None
        if connection is not None:
            self.nudge = connection.nudge

    def read(self, raw: bytes) -> list[Delta]:
        """For the iterator: what a push left (first), then the deltas of `raw`. It raises
        `failure`, when set, once it yielded these."""
        if not self.pending:
            return self.events(raw)
        out = list(self.pending)
        self.pending.clear()
        out += self.events(raw)
        return out

    def push(self, raw: bytes) -> bool:
        """Body bytes read while the iterator waits: their deltas go straight to the outlet.
        False (not taken, the iterator gets the bytes) while the outlet is closed; what the
        outlet refuses, and a failure, wake the iterator."""
        outlet = self.outlet
        write = outlet.write if outlet is not None else None
        if write is None or self.pending or self.failure is not None:
            return False
        try:
            events = self.events(raw)
            for index, event in enumerate(events):
                if not write(event):
                    self.pending.extend(events[index:])
                    break
        except Exception as exc:  # a fault of the writer: the stream fails, as it would
            self.failure = exc
        if self.pending or self.failure is not None or self.woken():
            self.nudge()
        return True

    def woken(self) -> bool:
        """Whether what a push just read needs the iterator all the same (the answer ended)."""
        return False


def _nothing() -> None:
    return None


class Provider(Protocol):
    """One upstream. `stream()` yields events and ends with exactly one `Finish`, or raises a
    `ProviderError`; closing the iterator early (or cancelling its consumer) closes the
    upstream HTTP response, which is how every cancellation reaches the upstream."""

    name: str

    def check(self, request: ChatRequest) -> None:
        """Refuse, with an `UnsupportedFeatureError` naming the field, what this provider
        cannot honour; called before any upstream call."""
        ...

    def stream(
        self, request: ChatRequest, outlet: Outlet | None = None
    ) -> AsyncGenerator[Event, None]:
        """Stream the answer to `request` (its `model` is the upstream model name); plain
        deltas may go to `outlet` instead (see `Outlet`)."""
        ...

    async def count_tokens(self, request: ChatRequest) -> int | None:
        """The upstream's count of the request's input tokens, or None when it offers none."""
        ...

    async def list_models(self) -> list[str]:
        """The upstream model names this provider can serve."""
        ...

    async def aclose(self) -> None:
        """Release connection pools."""
        ...
