"""How each error in the tree shows on the wire: one table, one JSON shape for every transport.

REST answers `{"error": {"message", "type", "code", "param"}}` with the table's status; an SSE
stream that already started sends the same object as an error event; a WebSocket sends it in a
`chat.error` frame. Lookup walks the class hierarchy, so a new subclass inherits its parent's row.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import msgspec

from providers import errors as e

log = logging.getLogger("tokenrelay.errors")


class ClientGone(Exception):
    """The client went away while its request was read or its stream written."""


class DuplicateStreamError(e.RequestError):
    """A WebSocket `chat.start` reused the id of a stream still running on that socket."""


class TooManyStreamsError(e.RequestError):
    """A WebSocket already runs as many streams as it may."""


class ServerShuttingDownError(e.GatewayError):
    """The server is shutting down; the request should go to another replica."""


class ServerBusyError(e.GatewayError):
    """The process already runs `[server] max_streams` streams; retry after `retry_after`."""


class RequestTimeoutError(e.RequestError):
    """The request body did not arrive in time."""


class RouteNotFoundError(e.RequestError):
    """No route at that path."""


class MethodNotAllowedError(e.RequestError):
    """The route exists but not for that method."""


class AuthenticationError(e.RequestError):
    """No gateway key, or one that is not configured."""


class ForbiddenOriginError(e.RequestError):
    """A browser request or WebSocket handshake from an origin that is not allowed."""


class LimitExceededError(e.RequestError):
    """A request over one of the `[limits]` (names the field in `param`)."""


class HeadersTooLargeError(e.RequestError):
    """The request's headers are larger than allowed."""


class RateLimitedError(e.RequestError):
    """The key (or client address) is over its requests or tokens per minute."""


class TooManySocketsError(e.RequestError):
    """The key (or client address) already has as many WebSockets open as it may."""


class ResponseNotFoundError(e.RequestError):
    """No stored response of that id (unknown, expired, deleted, or another key's)."""


class StoreUnavailableError(e.GatewayError):
    """The response store cannot be read now."""


class StreamNotFoundError(e.RequestError):
    """No resumable stream of that id that this client may read (unknown, expired, another's)."""


class JournalTruncatedError(e.RequestError):
    """The events a resume asked for were dropped by the journal's bounds."""


class JournalUnavailableError(e.GatewayError):
    """The stream's journal cannot be read (Redis down, or its copy there is incomplete)."""


class Spec(NamedTuple):
    """An error class's wire identity."""

    status: int
    type: str
    code: str


TABLE: dict[type[BaseException], Spec] = {
    e.GatewayError: Spec(500, "server_error", "internal_error"),
    e.RequestError: Spec(400, "invalid_request_error", "invalid_request"),
    e.InvalidRequestError: Spec(400, "invalid_request_error", "invalid_request"),
    e.UnsupportedFeatureError: Spec(400, "invalid_request_error", "unsupported"),
    e.ModelNotFoundError: Spec(404, "invalid_request_error", "model_not_found"),
    e.PayloadTooLargeError: Spec(413, "invalid_request_error", "payload_too_large"),
    e.SlowConsumerError: Spec(408, "invalid_request_error", "slow_consumer"),
    DuplicateStreamError: Spec(409, "invalid_request_error", "duplicate_id"),
    TooManyStreamsError: Spec(429, "rate_limit_error", "too_many_streams"),
    ServerShuttingDownError: Spec(503, "server_error", "server_shutting_down"),
    ServerBusyError: Spec(503, "server_error", "server_busy"),
    RequestTimeoutError: Spec(408, "invalid_request_error", "request_timeout"),
    RouteNotFoundError: Spec(404, "invalid_request_error", "not_found"),
    MethodNotAllowedError: Spec(405, "invalid_request_error", "method_not_allowed"),
    AuthenticationError: Spec(401, "authentication_error", "invalid_api_key"),
    ForbiddenOriginError: Spec(403, "permission_error", "forbidden_origin"),
    LimitExceededError: Spec(400, "invalid_request_error", "limit_exceeded"),
    HeadersTooLargeError: Spec(431, "invalid_request_error", "headers_too_large"),
    RateLimitedError: Spec(429, "rate_limit_error", "rate_limited"),
    TooManySocketsError: Spec(429, "rate_limit_error", "too_many_sockets"),
    ResponseNotFoundError: Spec(404, "invalid_request_error", "not_found"),
    StoreUnavailableError: Spec(503, "server_error", "store_unavailable"),
    StreamNotFoundError: Spec(404, "invalid_request_error", "stream_not_found"),
    JournalTruncatedError: Spec(410, "invalid_request_error", "journal_truncated"),
    JournalUnavailableError: Spec(503, "server_error", "journal_unavailable"),
    e.ProviderError: Spec(502, "upstream_error", "upstream_error"),
    e.UpstreamAuthError: Spec(502, "upstream_error", "upstream_auth_failed"),
    e.UpstreamRejectedError: Spec(400, "invalid_request_error", "upstream_rejected"),
    e.UpstreamModelNotFoundError: Spec(404, "invalid_request_error", "model_not_found"),
    e.UpstreamRateLimitError: Spec(429, "rate_limit_error", "upstream_rate_limited"),
    e.UpstreamTimeoutError: Spec(504, "upstream_error", "upstream_timeout"),
    e.UpstreamUnavailableError: Spec(503, "upstream_error", "upstream_unavailable"),
    e.UpstreamProtocolError: Spec(502, "upstream_error", "upstream_protocol_error"),
}


def spec_for(exc: BaseException) -> Spec:
    """The nearest row for the exception's class (unknown exceptions are internal errors)."""
    for cls in type(exc).__mro__:
        spec = TABLE.get(cls)
        if spec is not None:
            return spec
    return TABLE[e.GatewayError]


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The error object every transport sends."""

    message: str
    type: str
    code: str
    param: str | None = None
    status: int
    retry_after: float | None = None
    request_id: str | None = None


class ErrorEnvelope(msgspec.Struct, frozen=True):
    """OpenAI's error response: `{"error": {...}}`."""

    error: ErrorBody


def as_gateway_error(exc: BaseException, request_id: str) -> e.GatewayError:
    """Pass gateway errors through; log any other exception once and hide its details."""
    if isinstance(exc, e.GatewayError):
        return exc
    log.error("unexpected error in request %s", request_id, exc_info=exc)
    return e.GatewayError(f"Internal error; quote request id {request_id} when reporting it.")


def forget_tracebacks(exc: BaseException) -> None:
    """Drop the tracebacks of a handled error and of the errors it was raised from.

    A traceback holds the frames it passed through, and those frames hold what refers to the
    error again (the stream's state records it, a retry loop keeps the last failure), so each
    failed stream would otherwise be a reference cycle left to the cycle collector, with its
    connections' objects in it. Call it once the error has been logged and answered.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        pending += (error.__cause__, error.__context__)


def error_body(exc: e.GatewayError, request_id: str | None = None) -> ErrorBody:
    spec = spec_for(exc)
    return ErrorBody(
        message=exc.message,
        type=spec.type,
        code=spec.code,
        param=exc.param,
        status=spec.status,
        retry_after=exc.retry_after,
        request_id=request_id,
    )


def retry_after_header(exc: e.GatewayError) -> dict[str, str]:
    """`Retry-After` in whole seconds, rounded up, when the error carries one."""
    if exc.retry_after is None:
        return {}
    return {"retry-after": retry_after_seconds(exc.retry_after)}


def retry_after_seconds(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up."""
    return str(max(int(-(-seconds // 1)), 0))
