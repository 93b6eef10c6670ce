"""Small ASGI helpers shared by the HTTP endpoints: bounded body reading and JSON responses."""

from __future__ import annotations

import asyncio
import re
import uuid

from starlette.types import Receive, Scope, Send

from providers.errors import GatewayError, PayloadTooLargeError
from server import protocol
from server.errors import (
    ClientGone,
    ErrorBody,
    ErrorEnvelope,
    RequestTimeoutError,
    error_body,
    retry_after_seconds,
)


async def read_body(
    receive: Receive, headers: dict[bytes, bytes], limit: int, within: float = 30.0
) -> bytes:
    """The whole request body: `PayloadTooLargeError` as soon as it exceeds `limit`, and
    `RequestTimeoutError` when it has not all arrived `within` seconds after the headers."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    try:
        async with asyncio.timeout(within):
            return await _read(receive, limit)
    except TimeoutError:
        raise RequestTimeoutError(
            f"The request body did not arrive within {within:g} s of its headers."
        ) from None


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes.")


async def send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send,
    exc: GatewayError,
    request_id: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A complete OpenAI-style JSON error response with the error's status and Retry-After."""
    await send_error_body(send, error_body(exc, request_id), headers)


async def send_error_body(
    send: Send, body: ErrorBody, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """The same from the error object itself (as a journal keeps it)."""
    extra = [(b"x-request-id", (body.request_id or "").encode()), *(headers or ())]
    if body.retry_after is not None:
        extra.append((b"retry-after", retry_after_seconds(body.retry_after).encode()))
    await send_json(send, body.status, protocol.encode(ErrorEnvelope(body)), extra)


_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._\-]{1,64}$")


def request_id_of(scope: Scope) -> str:
    """The request's id: the client's `x-request-id` when it is a sane token, else a new one.

    Kept in the scope's state so the middleware, the endpoint and the logs all use the same.
    """
    state = scope.setdefault("state", {})
    rid: str | None = state.get("request_id")
    if rid is None:
        given = dict(scope.get("headers", ())).get(b"x-request-id")
        rid = given.decode() if given is not None and _REQUEST_ID.match(given) else uuid.uuid4().hex
        state["request_id"] = rid
    return rid


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (the last one wins)."""
    return dict(scope["headers"])
