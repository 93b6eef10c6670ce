"""Responses API conversation state: each stored response with the conversation that led to it.

A stored response keeps the `response` object as answered (for `GET /api/responses/{id}`), the
gateway key it belongs to, and the whole conversation up to and including its answer (without
`instructions`, which are not carried over), so that `previous_response_id` continues it with a
single read whichever replica serves the next turn. Entries live in the cache backend: a bounded
in-memory cache in one process, Redis when `[cache] url` is set, each for `[responses] ttl`.

The cache fails open, which for this state means: a response that cannot be written is still
answered (a later turn naming it gets a 404, or a 503 while the store is down), and a
`previous_response_id` that cannot be read is an error naming it, never a silent fresh start.
"""

from __future__ import annotations

import msgspec

from providers.types import Message
from server.cache import Cache
from server.errors import ResponseNotFoundError, StoreUnavailableError


class StoredResponse(msgspec.Struct, frozen=True, array_like=True):
    owner: str  # the gateway key's principal, "" when the gateway has no keys
    response: bytes  # the response object as JSON
    history: list[Message]  # the conversation through this response's answer
    inputs: int = 0  # how many of those messages were its input (the rest is its answer)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(StoredResponse).decode


def owner_of(principal: str | None) -> str:
    """Whose a response is: the gateway key that created it; one namespace without keys."""
    return principal if principal is not None and principal.startswith("key:") else ""


class ResponseStore:
    """Stored responses by id in a `Cache`, each readable only by its owner."""

    def __init__(self, cache: Cache, ttl: float) -> None:
        self.cache = cache
        self._ttl = ttl

    @staticmethod
    def _key(response_id: str) -> str:
        return "response:" + response_id

    async def save(self, response_id: str, record: StoredResponse) -> None:
        await self.cache.set(self._key(response_id), _encode(record), self._ttl)

    async def load(self, response_id: str, owner: str, param: str | None = None) -> StoredResponse:
        """The owner's stored response; `ResponseNotFoundError` (404) when there is none (or it
        is another key's), `StoreUnavailableError` (503) when the store cannot be read."""
        key = self._key(response_id)
        raw = await self.cache.get(key)
        if raw is None:  # a miss, or a backend that failed or is being skipped after a failure
            if not await self.cache.healthy():
                raise StoreUnavailableError(
                    f"The response store cannot be read now, so the response '{response_id}' "
                    "cannot be found; retry later.",
                    param=param,
                )
            raw = await self.cache.get(key)
        record: StoredResponse | None = None
        if raw is not None:
            try:
                record = _decode(raw)
            except msgspec.DecodeError:
                record = None  # written by an incompatible version: as good as gone
        if record is None or record.owner != owner:
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise ResponseNotFoundError(f"{what} with id '{response_id}' not found.", param=param)
        return record

    async def delete(self, response_id: str, owner: str) -> None:
        await self.load(response_id, owner)
        await self.cache.delete(self._key(response_id))

    async def aclose(self) -> None:
        await self.cache.aclose()
