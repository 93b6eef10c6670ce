"""Who may use the gateway: gateway keys, browser origins, and the one decision on every request.

Keys are configured only as SHA-256 hex digests (`[auth] keys`); `tokenrelay create-key` makes
one. `Gatekeeper` is a pure ASGI middleware that decides, before any route sees a request:

- header size (431) on every request;
- which paths are protected, on a normalised spelling of the path (case, repeated or encoded
  slashes, dot segments, trailing slash), so that no variant of a path is treated differently
  from the route it reaches: everything under `/api`, `/metrics`, and every WebSocket;
- the key: `Authorization: Bearer <key>` or `x-api-key: <key>` (as Anthropic's clients send
  it) for HTTP and WebSockets, or, for browsers (which cannot set headers on a WebSocket), a
  `tokenrelay.auth.<base64url key>` entry among the offered subprotocols; that entry is
  removed from the scope before the endpoint sees it and is never echoed back. Several
  different credentials on one request are refused;
- the `Origin` of every WebSocket handshake, and of HTTP requests when no keys are configured
  (so a page elsewhere cannot spend an open gateway's credit through a simple cross-site POST);
- requests per minute and the tokens-per-minute balance of the key (or, without keys, of the
  client address), and the WebSockets it holds open (`[limits] ws_sockets_per_key`, or
  `ws_sockets_per_address`, off by default).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from providers.errors import GatewayError
from server import protocol
from server.errors import (
    AuthenticationError,
    ErrorEnvelope,
    ForbiddenOriginError,
    HeadersTooLargeError,
    RateLimitedError,
    TooManySocketsError,
    error_body,
    retry_after_header,
    spec_for,
)
from server.guard import abort_of, current_abort
from server.http import request_id_of
from server.http import send_error as send_json_error
from server.limits import ADDRESS, Slots
from server.ratelimit import RateLimiter, current_principal

# Writes an HTTP error response in the shape the request's API dialect uses.
ErrorSender = Callable[[Scope, Send, GatewayError, str], Awaitable[None]]

KEY_PREFIX = "trk-"
AUTH_SUBPROTOCOL = "tokenrelay.auth."
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
OFFERED = "subprotocols_offered"  # in the scope's state: the handshake offered any at all
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([^\s]+) *$")


def digest(key: str) -> str:
    """The SHA-256 hex digest of a key: what `[auth] keys` lists."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh gateway key (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def normalise_path(path: str) -> str:
    """One spelling per path: decoded, lower-case, single slashes, no dot segments or end slash."""
    for _ in range(3):  # undo double encoding, too
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = posixpath.normpath("/" + path.replace("\\", "/").lower())
    return "/" + path.lstrip("/")


def is_protected(scope: Scope) -> bool:
    if scope["type"] == "websocket":
        return True
    path = normalise_path(scope["path"])
    return path not in PUBLIC_PATHS and (path == "/api" or path.startswith(("/api/", "/metrics")))


def subprotocol_key(offered: Iterable[str]) -> list[str]:
    """The keys offered as `tokenrelay.auth.<base64url>` subprotocols (undecodable ones as '')."""
    keys = []
    for entry in offered:
        if entry.startswith(AUTH_SUBPROTOCOL):
            encoded = entry[len(AUTH_SUBPROTOCOL) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                keys.append(raw.decode())
            except (binascii.Error, UnicodeDecodeError, ValueError):
                keys.append("")
    return keys


def bearer_keys(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Every `Authorization` header's bearer key ('' for one that is not a bearer key), and
    every `x-api-key` header's value (as Anthropic's clients send a key)."""
    keys = []
    for name, value in headers:
        if name == b"authorization":
            match = _BEARER.match(value.decode("latin-1"))
            keys.append(match.group(1) if match else "")
        elif name == b"x-api-key":
            keys.append(value.decode("latin-1").strip())
    return keys


class KeyRing:
    """The configured key digests; a key's id is the start of its digest (safe to log)."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = frozenset(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, key: str) -> str | None:
        """The key's id, or None when it is not configured."""
        found = digest(key)
        # The set lookup compares digests, not keys: timing reveals nothing about a key.
        return found[:16] if found in self._digests else None


def origin_allowed(scope: Scope, origin: str, allowed: frozenset[str]) -> bool:
    """An exact match with `[auth] origins`, or the server's own origin when it is addressed
    by its loopback name or its own address (so DNS rebinding does not make a page same-origin)."""
    if origin in allowed:
        return True
    url = urlsplit(origin)
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    if url.scheme not in ("http", "https") or not url.hostname or url.netloc != host:
        return False
    own = scope.get("server") or ("", 0)
    return url.hostname in _LOOPBACK_NAMES or url.hostname == str(own[0]).strip("[]")


class Gatekeeper:
    """ASGI middleware: header size, authentication, origin and rate admission (see module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        origins: Iterable[str],
        limiter: RateLimiter,
        max_header_bytes: int,
        sockets: Slots | None = None,
        send_http_error: ErrorSender | None = None,
    ) -> None:
        self.app = app
        self._send_http_error = send_http_error or _send_error
        self._keys = keys
        self._origins = frozenset(origins)
        self._limiter = limiter
        self._max_header_bytes = max_header_bytes
        self._sockets = sockets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            scope = await self._admit(scope)
        except GatewayError as exc:
            await self._deny(scope, receive, send, exc)
            return
        principal: str | None = scope.get("state", {}).get("principal")
        sockets = self._sockets if scope["type"] == "websocket" and principal else None
        if sockets is not None and principal is not None and not await sockets.acquire(principal):
            whose = "client address" if principal.startswith(ADDRESS) else "key"
            error = TooManySocketsError(
                f"This {whose} already has {sockets.cap_of(principal)} WebSockets open; "
                "close one first."
            )
            await self._deny(scope, receive, send, error)
            return
        token = current_principal.set(principal)
        abort = current_abort.set(abort_of(scope))
        try:
            await self.app(scope, receive, send)
        finally:
            current_abort.reset(abort)
            current_principal.reset(token)
            if sockets is not None and principal is not None:
                sockets.release(principal)

    async def _admit(self, scope: Scope) -> Scope:
        """The scope to pass on (auth subprotocols removed), or a `GatewayError`."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if sum(len(k) + len(v) + 4 for k, v in headers) > self._max_header_bytes:
            raise HeadersTooLargeError(
                f"The request headers are larger than the limit of {self._max_header_bytes} bytes."
            )
        if not is_protected(scope):
            return scope
        offered: list[str] = list(scope.get("subprotocols") or ())
        presented = bearer_keys(headers) + subprotocol_key(offered)
        if scope["type"] == "websocket" or not self._keys.enabled:
            origin = dict(headers).get(b"origin")
            if origin is not None and not origin_allowed(
                scope, origin.decode("latin-1"), self._origins
            ):
                raise ForbiddenOriginError("This origin may not use the gateway.")
        if scope["type"] == "websocket":
            rest = [p for p in offered if not p.startswith(AUTH_SUBPROTOCOL)]
            scope = {**scope, "subprotocols": rest}
            scope.setdefault("state", {})[OFFERED] = bool(offered)
        principal = self._principal(scope, presented)
        scope.setdefault("state", {})["principal"] = principal
        if self._limiter.enabled:
            wait = await self._limiter.admit(principal)
            if wait > 0:
                raise RateLimitedError(
                    "Too many requests or tokens for this key; retry later.", retry_after=wait
                )
        return scope

    def _principal(self, scope: Scope, presented: list[str]) -> str:
        if not self._keys.enabled:
            client = scope.get("client")
            return f"{ADDRESS}{client[0] if client else 'unknown'}"
        if not presented:
            raise AuthenticationError(
                "A gateway key is required: send 'Authorization: Bearer <key>' or "
                "'x-api-key: <key>'."
            )
        if len(set(presented)) != 1:
            raise AuthenticationError("The request carries more than one credential.")
        key_id = self._keys.identify(presented[0]) if presented[0] else None
        if key_id is None:
            raise AuthenticationError("The gateway key is not valid.")
        return f"key:{key_id}"

    async def _deny(self, scope: Scope, receive: Receive, send: Send, exc: GatewayError) -> None:
        if scope["type"] == "http":
            if isinstance(exc, AuthenticationError):
                send = _challenging(send)
            await self._send_http_error(scope, send, exc, request_id_of(scope))
            return
        await _deny_handshake(scope, receive, send, exc)


def _challenging(send: Send) -> Send:
    """RFC 9110: a 401 names the scheme it wants, whatever dialect the error body speaks."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", ()), (b"www-authenticate", b"Bearer")]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _deny_handshake(scope: Scope, receive: Receive, send: Send, exc: GatewayError) -> None:
    rid = request_id_of(scope)
    # RFC 9110: a 401 names the scheme it wants.
    challenge = [(b"www-authenticate", b"Bearer")] if isinstance(exc, AuthenticationError) else []
    # A WebSocket handshake is refused before it is accepted: with the error as an HTTP
    # response where the server supports that, else a plain 403.
    await receive()  # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = protocol.encode(ErrorEnvelope(error_body(exc, rid)))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", rid.encode()),
        *((k.encode(), v.encode()) for k, v in retry_after_header(exc).items()),
        *challenge,
    ]
    await send(
        {
            "type": "websocket.http.response.start",
            "status": spec_for(exc).status,
            "headers": headers,
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


async def _send_error(scope: Scope, send: Send, exc: GatewayError, rid: str) -> None:
    await send_json_error(send, exc, rid)
