"""The error tree's wire table, redaction, Retry-After and upstream status translation."""

from __future__ import annotations

import email.utils
import errno
import socket
import ssl
import time

import httpx2
import openai
import pytest

from providers import errors as e
from server.errors import (
    TABLE,
    DuplicateStreamError,
    ErrorBody,
    MethodNotAllowedError,
    RouteNotFoundError,
    ServerBusyError,
    Spec,
    TooManyStreamsError,
    as_gateway_error,
    error_body,
    retry_after_header,
    spec_for,
)


@pytest.mark.parametrize(
    ("cls", "status", "type_", "code"),
    [
        (e.GatewayError, 500, "server_error", "internal_error"),
        (e.RequestError, 400, "invalid_request_error", "invalid_request"),
        (e.InvalidRequestError, 400, "invalid_request_error", "invalid_request"),
        (e.UnsupportedFeatureError, 400, "invalid_request_error", "unsupported"),
        (e.ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
        (e.PayloadTooLargeError, 413, "invalid_request_error", "payload_too_large"),
        (e.SlowConsumerError, 408, "invalid_request_error", "slow_consumer"),
        (DuplicateStreamError, 409, "invalid_request_error", "duplicate_id"),
        (TooManyStreamsError, 429, "rate_limit_error", "too_many_streams"),
        (ServerBusyError, 503, "server_error", "server_busy"),
        (RouteNotFoundError, 404, "invalid_request_error", "not_found"),
        (MethodNotAllowedError, 405, "invalid_request_error", "method_not_allowed"),
        (e.ProviderError, 502, "upstream_error", "upstream_error"),
        (e.UpstreamAuthError, 502, "upstream_error", "upstream_auth_failed"),
        (e.UpstreamRejectedError, 400, "invalid_request_error", "upstream_rejected"),
        (e.UpstreamModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
        (e.UpstreamRateLimitError, 429, "rate_limit_error", "upstream_rate_limited"),
        (e.UpstreamTimeoutError, 504, "upstream_error", "upstream_timeout"),
        (e.UpstreamUnavailableError, 503, "upstream_error", "upstream_unavailable"),
        (e.UpstreamProtocolError, 502, "upstream_error", "upstream_protocol_error"),
    ],
)
def test_table_rows(cls: type[e.GatewayError], status: int, type_: str, code: str) -> None:
    assert spec_for(cls("x")) == Spec(status, type_, code)


def test_table_covers_every_error_class() -> None:
    classes = {
        obj for obj in vars(e).values() if isinstance(obj, type) and issubclass(obj, e.GatewayError)
    }
    assert classes <= set(TABLE)


def test_spec_for_walks_the_hierarchy() -> None:
    class SlowDownError(e.UpstreamRateLimitError):
        pass

    class VeryBadError(e.UpstreamTimeoutError, e.InvalidRequestError):
        pass

    class NewRequestError(e.RequestError):
        pass

    class NewGatewayError(e.GatewayError):
        pass

    assert spec_for(SlowDownError("x")) == Spec(429, "rate_limit_error", "upstream_rate_limited")
    assert spec_for(VeryBadError("x")).status == 504
    assert spec_for(NewRequestError("x")) == Spec(400, "invalid_request_error", "invalid_request")
    assert spec_for(NewGatewayError("x")).status == 500


@pytest.mark.parametrize("exc", [ValueError("x"), RuntimeError(), KeyError("k"), TimeoutError()])
def test_spec_for_unknown_exceptions(exc: BaseException) -> None:
    assert spec_for(exc) == Spec(500, "server_error", "internal_error")


def test_error_body() -> None:
    exc = e.UpstreamRateLimitError("slow down", param="model", retry_after=2.5)
    assert error_body(exc, "req-1") == ErrorBody(
        message="slow down",
        type="rate_limit_error",
        code="upstream_rate_limited",
        param="model",
        status=429,
        retry_after=2.5,
        request_id="req-1",
    )


def test_as_gateway_error_passes_gateway_errors_through() -> None:
    exc = e.UpstreamTimeoutError("t")
    assert as_gateway_error(exc, "req-1") is exc


def test_as_gateway_error_hides_other_exceptions() -> None:
    result = as_gateway_error(RuntimeError("database password hunter2"), "req-42")
    assert type(result) is e.GatewayError
    assert "req-42" in result.message
    assert "hunter2" not in result.message
    assert spec_for(result).status == 500


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [
        (None, {}),
        (0, {"retry-after": "0"}),
        (0.0, {"retry-after": "0"}),
        (0.001, {"retry-after": "1"}),
        (0.2, {"retry-after": "1"}),
        (1.0, {"retry-after": "1"}),
        (1.5, {"retry-after": "2"}),
        (59.01, {"retry-after": "60"}),
        (-3.0, {"retry-after": "0"}),
    ],
)
def test_retry_after_header_rounds_up(retry_after: float | None, header: dict[str, str]) -> None:
    assert retry_after_header(e.UpstreamRateLimitError("x", retry_after=retry_after)) == header


# ---- redact ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("key my-configured-secret failed", ["my-configured-secret"], "key [redacted] failed"),
        ("a=s1 b=s2", ["s1", "s2"], "a=[redacted] b=[redacted]"),
        ("nothing here", [""], "nothing here"),
        (
            "Incorrect API key provided: sk-proj-abc123XYZ.",
            [],
            "Incorrect API key provided: [redacted]",
        ),
        ("key sk-ant-api03-abc_DEF-ghi", [], "key [redacted]"),
        ("masked sk-abc***********xyz here", [], "masked [redacted] here"),
        ("Authorization: Bearer abc.def.ghi", [], "Authorization: [redacted]"),
        ("authorization: bearer   tok123 end", [], "authorization: [redacted] end"),
        ("BEARER tok", [], "[redacted]"),
    ],
)
def test_redact_removes_credentials(text: str, secrets: list[str], expected: str) -> None:
    assert e.redact(text, secrets) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The model `gpt-4o-mini` does not exist",
        "model claude-3-5-sonnet-20241022 is overloaded",
        "meta-llama/llama-3-8b-instruct is not available",
        "o1-preview, gpt-4-turbo and mistral-large-latest",
        "sk- alone is too short, and so is sk-ab",
        "context length 128000 exceeded",
    ],
)
def test_redact_keeps_ordinary_text(text: str) -> None:
    assert e.redact(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "This is a task-specific model",
        "model whisk-large-v2 is unavailable",
        "risk-based limits apply",
    ],
)
def test_redact_keeps_words_that_merely_contain_sk_dash(text: str) -> None:
    assert e.redact(text) == text


def test_redact_truncates_long_text() -> None:
    text = "x" * 600
    assert e.redact(text) == "x" * 500 + "…"
    assert e.redact("y" * 500) == "y" * 500


def test_redact_secret_before_truncation() -> None:
    secret = "S" * 40
    text = "a" * 480 + secret
    assert e.redact(text, [secret]) == "a" * 480 + "[redacted]"


# ---- parse_retry_after --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250.5"}, 0.2505),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after-ms": "garbage", "retry-after": "9"}, 9.0),
        ({"retry-after-ms": "-10"}, 0.0),
        ({"retry-after": "7"}, 7.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert e.parse_retry_after(httpx2.Headers(headers)) == expected


def test_parse_retry_after_future_http_date() -> None:
    date = email.utils.formatdate(time.time() + 3600, usegmt=True)
    seconds = e.parse_retry_after(httpx2.Headers({"retry-after": date}))
    assert seconds is not None
    assert 3500 < seconds <= 3601


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-inf", "Infinity"])
def test_non_finite_retry_after_gives_a_usable_header(value: str) -> None:
    """An upstream's nonsense Retry-After must not break the error response."""
    exc = e.from_status("p", 429, None, httpx2.Headers({"retry-after": value}))
    header = retry_after_header(exc)
    assert header == {} or header["retry-after"].isdigit()


# ---- from_status / from_inband ------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, e.UpstreamRejectedError),
        (401, e.UpstreamAuthError),
        (403, e.UpstreamAuthError),
        (404, e.UpstreamModelNotFoundError),
        (408, e.UpstreamTimeoutError),
        (409, e.UpstreamRejectedError),
        (413, e.UpstreamRejectedError),
        (422, e.UpstreamRejectedError),
        (429, e.UpstreamRateLimitError),
        (500, e.UpstreamUnavailableError),
        (502, e.UpstreamUnavailableError),
        (503, e.UpstreamUnavailableError),
        (504, e.UpstreamTimeoutError),
        (529, e.UpstreamUnavailableError),
        (599, e.UpstreamUnavailableError),
        (302, e.UpstreamProtocolError),
    ],
)
def test_from_status_classes(status: int, cls: type[e.ProviderError]) -> None:
    exc = e.from_status("openai", status, None, None)
    assert type(exc) is cls
    assert exc.message.startswith("openai: upstream ")
    assert exc.message.endswith(f"(HTTP {status})")
    assert exc.retry_after is None


@pytest.mark.parametrize("status", [401, 403])
def test_from_status_auth_hides_upstream_text(status: int) -> None:
    exc = e.from_status(
        "openai", status, "Incorrect API key provided: abcd1234efgh", None, secrets=["abcd1234efgh"]
    )
    assert type(exc) is e.UpstreamAuthError
    assert exc.message == f"openai: upstream rejected the gateway's credentials (HTTP {status})"


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (400, "refused the request"),
        (422, "refused the request"),
        (404, "does not know this model"),
        (429, "is rate limiting requests"),
        (408, "timed out"),
        (503, "is unavailable"),
    ],
)
def test_from_status_includes_redacted_detail(status: int, words: str) -> None:
    exc = e.from_status("up", status, "bad thing with key SECRET1 and sk-abcdef", None, ["SECRET1"])
    assert (
        exc.message
        == f"up: upstream {words} (HTTP {status}): bad thing with key [redacted] and [redacted]"
    )


def test_from_status_429_keeps_retry_after() -> None:
    exc = e.from_status("up", 429, "slow", httpx2.Headers({"retry-after": "12"}))
    assert type(exc) is e.UpstreamRateLimitError
    assert exc.retry_after == 12.0
    assert retry_after_header(exc) == {"retry-after": "12"}
    ms = e.from_status("up", 429, None, httpx2.Headers({"retry-after-ms": "2100"}))
    assert ms.retry_after == 2.1
    assert retry_after_header(ms) == {"retry-after": "3"}


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("overloaded_error", e.UpstreamUnavailableError),
        ("rate_limit_error", e.UpstreamRateLimitError),
        ("api_error", e.UpstreamUnavailableError),
        ("timeout_error", e.UpstreamTimeoutError),
        ("authentication_error", e.UpstreamAuthError),
        ("permission_error", e.UpstreamAuthError),
        ("not_found_error", e.UpstreamModelNotFoundError),
        ("invalid_request_error", e.UpstreamRejectedError),
        ("request_too_large", e.UpstreamRejectedError),
        ("something_new", e.UpstreamUnavailableError),
        (None, e.UpstreamUnavailableError),
    ],
)
def test_from_inband(kind: str | None, cls: type[e.ProviderError]) -> None:
    exc = e.from_inband("anthropic", kind, "Overloaded", ["k"])
    assert type(exc) is cls
    shown = kind or "error"
    if cls is e.UpstreamAuthError:  # the upstream's words are about the gateway's key
        assert exc.message == f"anthropic: upstream failed mid-stream ({shown})"
    else:
        assert exc.message == f"anthropic: upstream failed mid-stream ({shown}): Overloaded"


def test_from_inband_redacts_and_defaults_message() -> None:
    exc = e.from_inband("a", "api_error", "leaked SECRETKEY and Bearer xyz", ["SECRETKEY"])
    assert (
        exc.message == "a: upstream failed mid-stream (api_error): leaked [redacted] and [redacted]"
    )
    assert e.from_inband("a", "api_error", None).message.endswith(": no detail")


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (
            _chained(httpx2.ConnectError("x"), ConnectionRefusedError(111, "refused")),
            "connection refused",
        ),
        (_chained(httpx2.ConnectError("x"), socket.gaierror(-2, "unknown")), "DNS failure"),
        (_chained(httpx2.ConnectError("x"), ssl.SSLError(1, "wrong version")), "TLS failure"),
        (httpx2.ConnectTimeout("slow"), "connect timeout"),
        (_chained(httpx2.ConnectError("x"), TimeoutError()), "connect timeout"),
        (httpx2.PoolTimeout("busy"), "no free connection"),
        (
            _chained(httpx2.ConnectError("x"), OSError(errno.ENETUNREACH, "no route")),
            "network unreachable",
        ),
        (_chained(httpx2.ReadError("x"), ConnectionResetError(104, "reset")), "connection reset"),
        (httpx2.ConnectError("x"), "connection failed"),
    ],
)
def test_unreachable_upstreams_name_the_cause(exc: BaseException, cause: str) -> None:
    error = e.from_transport("openai", exc)
    assert isinstance(error, e.UpstreamUnavailableError)
    assert error.cause == cause
    assert error.message == f"openai: upstream unreachable ({cause})"
    assert cause in e.CAUSES


def test_sdk_connection_errors_keep_cause_and_address() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1:8443/v1/chat/completions")
    inner = _chained(httpx2.ConnectError("x"), ConnectionRefusedError(111, "refused"))
    error = e.from_sdk(
        openai, "openai", _chained(openai.APIConnectionError(request=request), inner)
    )
    assert (error.cause, error.upstream) == ("connection refused", "127.0.0.1:8443")
    assert "127.0.0.1" not in error.message
    timeout = _chained(openai.APITimeoutError(request=request), httpx2.ConnectTimeout("slow"))
    assert e.from_sdk(openai, "openai", timeout).cause == "connect timeout"
