"""The provider seam: what every upstream adapter offers the stream service."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from providers.types import ChatRequest, Event


class Provider(Protocol):
    """One upstream. `stream()` yields events and ends with exactly one `Finish`, or raises a
    `ProviderError`; closing the iterator early (or cancelling its consumer) closes the
    upstream HTTP response, which is how every cancellation reaches the upstream."""

    name: str

    def check(self, request: ChatRequest) -> None:
        """Refuse, with an `UnsupportedFeatureError` naming the field, what this provider
        cannot honour; called before any upstream call."""
        ...

    def stream(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        """Stream the answer to `request` (its `model` is the upstream model name)."""
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
