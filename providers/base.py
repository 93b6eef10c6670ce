"""The provider seam: what every upstream adapter offers the stream service."""

from __future__ import annotations

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
