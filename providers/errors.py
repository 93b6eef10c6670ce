"""The gateway's error tree, and the one place each SDK's exceptions are translated into it.

    GatewayError                        anything the gateway reports to a client
    ├── RequestError                    the client's request is at fault
    │   ├── InvalidRequestError         malformed body or field (names the field in `param`)
    │   ├── UnsupportedFeatureError     a valid OpenAI feature the gateway does not serve yet
    │   ├── ModelNotFoundError          no configured provider serves that model id
    │   ├── PayloadTooLargeError        body over the configured limit
    │   └── SlowConsumerError           the client stopped reading a stream for too long
    └── ProviderError                   the upstream failed us
        ├── UpstreamAuthError           the upstream refused the gateway's credentials
        ├── UpstreamRejectedError       the upstream refused the request (e.g. context too long)
        ├── UpstreamModelNotFoundError  the upstream does not know the model
        ├── UpstreamRateLimitError      the upstream is rate limiting us (keeps Retry-After)
        ├── UpstreamTimeoutError        connect, first-token or idle timeout
        ├── UpstreamUnavailableError    connection refused/reset, 5xx, overloaded
        └── UpstreamProtocolError       the upstream broke its wire format or closed a stream early

How each class shows on the wire (HTTP status, error type and code) is one table in
`server/errors.py`; these classes carry only what happened. An upstream that cannot be reached
says why: `cause` is one of `CAUSES` (also in the client's message), and `upstream` is the
host:port that was tried, which goes to the logs only.
"""

from __future__ import annotations

import email.utils
import errno
import math
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from types import ModuleType


class GatewayError(Exception):
    """Base of every error the gateway reports; `message` is safe to show a client."""

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class RequestError(GatewayError):
    """The client's request is at fault."""


class InvalidRequestError(RequestError):
    """Malformed body or field."""


class UnsupportedFeatureError(RequestError):
    """A valid OpenAI feature that the gateway does not serve yet."""


class ModelNotFoundError(RequestError):
    """No configured provider serves that model id."""


class PayloadTooLargeError(RequestError):
    """The request body is over the configured limit."""


class SlowConsumerError(RequestError):
    """The client stopped reading a stream for longer than the write timeout."""


class ProviderError(GatewayError):
    """The upstream failed us; `cause` and `upstream` say why and where, when known."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        cause: str | None = None,
        upstream: str | None = None,
    ) -> None:
        super().__init__(message, param=param, retry_after=retry_after)
        self.cause = cause
        self.upstream = upstream


class UpstreamAuthError(ProviderError):
    """The upstream refused the gateway's credentials."""


class UpstreamRejectedError(ProviderError):
    """The upstream refused the request itself."""


class UpstreamModelNotFoundError(ProviderError):
    """The upstream does not know the model."""


class UpstreamRateLimitError(ProviderError):
    """The upstream is rate limiting the gateway."""


class UpstreamTimeoutError(ProviderError):
    """The upstream did not answer in time."""


class UpstreamUnavailableError(ProviderError):
    """The upstream could not be reached or is failing."""


class UpstreamProtocolError(ProviderError):
    """The upstream broke its wire format or closed a stream early."""


# Upstream messages are shown to clients, so anything that looks like a credential goes.
_CREDENTIAL = re.compile(r"(\bsk-[A-Za-z0-9_\-*.]{3,}|(?i:\bbearer)\s+\S+)")
_MAX_MESSAGE = 500


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove credentials (configured secrets and anything key-shaped) from an upstream text."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _CREDENTIAL.sub("[redacted]", text)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "…"


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return _seconds(float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return _seconds(email.utils.mktime_tz(parsed) - time.time())


def _seconds(value: float) -> float | None:
    """A usable wait: finite and not negative (`nan`, `inf` and `1e400` are not)."""
    return max(value, 0.0) if math.isfinite(value) else None


def _for_status(status: int) -> type[ProviderError]:
    if status in (401, 403):
        return UpstreamAuthError
    if status == 404:
        return UpstreamModelNotFoundError
    if status == 429:
        return UpstreamRateLimitError
    if status in (408, 504):
        return UpstreamTimeoutError
    if 400 <= status < 500:
        return UpstreamRejectedError
    if status in (500, 502, 503, 529) or status >= 500:
        return UpstreamUnavailableError
    return UpstreamProtocolError


_STATUS_WORDS = {
    UpstreamAuthError: "rejected the gateway's credentials",
    UpstreamModelNotFoundError: "does not know this model",
    UpstreamRateLimitError: "is rate limiting requests",
    UpstreamTimeoutError: "timed out",
    UpstreamUnavailableError: "is unavailable",
}


def from_status(
    provider: str,
    status: int,
    detail: str | None,
    headers: Mapping[str, str] | None,
    secrets: Iterable[str] = (),
) -> ProviderError:
    """Translate an upstream HTTP error status into the tree."""
    cls = _for_status(status)
    words = _STATUS_WORDS.get(cls, "refused the request")
    message = f"{provider}: upstream {words} (HTTP {status})"
    # Auth failures say nothing more: the upstream text is about our key, not the client's request.
    if detail and cls is not UpstreamAuthError:
        message += f": {redact(detail, secrets)}"
    retry_after = parse_retry_after(headers) if headers is not None else None
    return cls(message, retry_after=retry_after)


def from_sdk(
    sdk: ModuleType, provider: str, exc: BaseException, secrets: Iterable[str] = ()
) -> ProviderError:
    """Translate an exception of the `openai` or `anthropic` SDK (passed as `sdk`; they share
    their exception names), so this module imports neither."""
    if isinstance(exc, sdk.APIStatusError):
        detail = body_message(exc.body) or exc.message
        return from_status(provider, exc.status_code, detail, exc.response.headers, secrets)
    if isinstance(exc, sdk.APIConnectionError):  # APITimeoutError included
        # Reads have no timeout here (the stream service owns those), so a timeout is a
        # connect, write or pool timeout: the upstream is not reachable, not slow.
        return unreachable(provider, exc)
    return UpstreamProtocolError(f"{provider}: {redact(str(exc), secrets)}")


def from_transport(provider: str, exc: BaseException) -> ProviderError:
    """Translate an httpx2 (both SDKs' HTTP client) failure during a request or mid-stream."""
    import httpx2

    if isinstance(exc, httpx2.ConnectTimeout | httpx2.PoolTimeout | httpx2.ConnectError):
        # Not the model being slow: the upstream could not be reached (or no connection was free).
        return unreachable(provider, exc)
    if isinstance(exc, httpx2.TimeoutException):
        return UpstreamTimeoutError(f"{provider}: upstream timed out ({type(exc).__name__})")
    if isinstance(exc, httpx2.RemoteProtocolError):
        return UpstreamProtocolError(f"{provider}: upstream closed the stream before it finished")
    return unreachable(provider, exc)


# Why an upstream could not be reached, as operators and clients are told.
CAUSES = (
    "connection refused",
    "DNS failure",
    "TLS failure",
    "connect timeout",
    "no free connection",
    "connection reset",
    "network unreachable",
    "connection failed",
)
_UNREACHABLE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)


def unreachable(provider: str, exc: BaseException) -> UpstreamUnavailableError:
    """An upstream that could not be reached, with the cause class found in `exc`'s chain."""
    cause = cause_of(exc)
    return UpstreamUnavailableError(
        f"{provider}: upstream unreachable ({cause})", cause=cause, upstream=_address(exc)
    )


def cause_of(exc: BaseException) -> str:
    """The cause class of a failed connection: the first telling exception in the chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _cause_class(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return "connection failed"


def _cause_class(exc: BaseException) -> str | None:
    name = type(exc).__name__
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "TLS failure"
    if isinstance(exc, socket.gaierror):
        return "DNS failure"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS:
        return "network unreachable"
    if name == "PoolTimeout":
        return "no free connection"
    if name == "ConnectTimeout" or isinstance(exc, TimeoutError):
        return "connect timeout"
    return None


def _address(exc: BaseException) -> str | None:
    """The host:port the failed request was for, from the request the HTTP client attached."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        try:
            url = current.request.url  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # httpx2 raises RuntimeError when none is set
            current = current.__cause__ or current.__context__
            continue
        port = url.port or (443 if url.scheme == "https" else 80)
        host = f"[{url.host}]" if ":" in url.host else url.host
        return f"{host}:{port}"
    return None


# Anthropic's in-band error types, as sent in an `error` stream event.
_ANTHROPIC_INBAND = {
    "overloaded_error": 529,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "invalid_request_error": 400,
    "request_too_large": 413,
}


def from_inband(
    provider: str, kind: str | None, message: str | None, secrets: Iterable[str] = ()
) -> ProviderError:
    """Translate an error event that arrived inside a stream."""
    status = _ANTHROPIC_INBAND.get(kind or "", 500)
    cls = _for_status(status)
    message_out = f"{provider}: upstream failed mid-stream ({kind or 'error'})"
    if cls is not UpstreamAuthError:  # as in from_status: that text is about our key
        message_out += f": {redact(message or 'no detail', secrets)}"
    return cls(message_out)


def body_message(body: object) -> str | None:
    """The human message inside an upstream error body, in either vendor's shape."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message")
            if isinstance(message, str):
                return message
    return None
