"""Streamed requests an SDK builds once and the adapter sends many times, each with a new body.

Both SDKs' `create` spends more CPU per call than relaying a whole short answer: a parameter
transform, option merging, header building and validation, then httpx2's request and header
objects. The request they send differs from one call to the next only in its JSON body, so the
SDK builds one (URL, auth, its headers, timeouts) when the first is sent, and each request after
that is its head, encoded once (`RequestTemplate`), plus the body. The SDK's own error types
come out as `create` raises them: a timeout, a failed connection, or the exception the SDK makes
of a response whose status is not 2xx.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import anyio
import httpx2

from providers.transport import RequestTemplate, send_template, with_request

# What the SDKs turn into `APIConnectionError` when sending (anyio's for TLS failures httpx2
# leaves unmapped); their timeouts become `APITimeoutError`.
SEND_ERRORS = (httpx2.RequestError, ssl.SSLError, anyio.EndOfStream)


class Prebuilt:
    """One SDK request, built once by `build`, sent with a new body by `send`.

    `status_error` is the SDK client's `_make_status_error_from_response`; `timeout_error` and
    `connection_error` are its `APITimeoutError` and `APIConnectionError`.
    """

    __slots__ = ("_build", "_template", "_status_error", "_timeout_error", "_connection_error")

    def __init__(
        self,
        build: Callable[[], httpx2.Request],
        *,
        status_error: Callable[[httpx2.Response], Exception],
        timeout_error: Callable[..., Exception],
        connection_error: Callable[..., Exception],
    ) -> None:
        self._build = build
        self._template: RequestTemplate | None = None
        self._status_error = status_error
        self._timeout_error = timeout_error
        self._connection_error = connection_error

    def template(self) -> RequestTemplate:
        template = self._template
        if template is None:
            built = self._build()
            template = self._template = RequestTemplate(
                built.url, built.headers.raw, dict(built.extensions)
            )
        return template

    async def send(self, http: httpx2.AsyncClient, body: bytes) -> httpx2.Response:
        """Send the request with `body` and fail as the SDK's `create` would; the response
        (2xx) is left unread."""
        template = self.template()
        try:
            response = await send_template(http, template, body)
        except httpx2.TimeoutException as exc:
            raise self._timeout_error(request=template.request(body)) from exc
        except SEND_ERRORS as exc:
            raise self._connection_error(request=template.request(body)) from exc
        if not response.is_success:
            try:
                await response.aread()
            finally:
                await response.aclose()
            with_request(response, template, body)
            raise self._status_error(response) from None
        return response


def sdk_request(client: Any, path: str, options: Any, raw_header: str) -> httpx2.Request:
    """What `client` (either SDK's) builds for a streamed POST to `path`, without a body.

    `options` is the SDK's `FinalRequestOptions` and `raw_header` its `RAW_RESPONSE_HEADER`:
    `with_streaming_response` sets that header, as here."""
    built: httpx2.Request = client._build_request(
        options.construct(method="post", url=path, headers={raw_header: "stream"})
    )
    return built
