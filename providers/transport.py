"""A lean HTTP/1.1 transport for the SDKs' httpx2 clients, built for long streamed responses.

The SDKs build, sign and send requests and raise their usual errors; only the bytes travel
differently. httpcore reads each chunk through several layers (anyio streams, a timeout scope,
h11 events, exception maps) and scans its whole pool whenever a request starts or ends, which
makes it the gateway's largest cost per relayed chunk. Here a connection is an asyncio
`Protocol` whose httptools parser hands each body chunk straight to the waiting reader, and
idle connections wait on a plain per-origin list, swept by a timer: one idle for
`idle_timeout` (30 s) is closed whether or not another request comes.

Scope: HTTP/1.1 over TCP or TLS, keep-alive, no proxies and no HTTP/2 (set `transport = "httpx"`
on a provider for those). Errors are httpx2's own exception types, so the SDKs and the
gateway's translation treat them as they treat httpcore's.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from typing import cast

import httptools
import httpx2

from providers.settings import ProviderSettings

_IDLE_SECONDS = 30.0  # a kept-alive connection idle this long is closed
_HIGH_WATER = 256 * 1024  # bytes buffered unread before the socket stops being read


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one response at a time."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        # Kept: `asyncio.get_running_loop()` costs a system call (getpid) on every call.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # None once the connection is lost: the parser's callbacks hold this object, a cycle.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: Exception | None = None
        self.keep_alive = False
        self.status = 0
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        # Set by the response's reader: takes a body piece while the reader is waiting for
        # one (returns True once it consumed the piece), so the piece is handled in this
        # callback without waking the reader's task; see `push_to`.
        self.push: Callable[[bytes], bool] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but offer the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.parser is not None  # no data after `connection_lost`
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None
        if not self.complete:
            self._fail(
                httpx2.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
                if self.head.done()
                else httpx2.ReadError("the connection closed before a response")
            )

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read now: httptools no longer answers them once the message is complete, and the
        # parser goes with the connection.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        push = self.push
        if push is not None and not self.chunks:
            waiter = self.waiter
            if waiter is not None and not waiter.done() and push(body):
                return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if not self.head.done():
            self.head.set_result(None)
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # marked retrieved: the reader may be gone already
        self._wake()

    def nudge(self) -> None:
        """Wake the reader with an empty piece: a pushed piece left it something to do."""
        self.chunks.append(b"")
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # used by the body stream
    def take(self) -> bytes | None:
        """The next buffered chunk, or None when none is buffered."""
        if not self.chunks:
            return None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < _HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.error is None
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def prepare(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx2.AsyncByteStream):
    """The response body as it arrives; closing it early closes the connection."""

    def __init__(self, pool: LeanTransport, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        if connection is None:
            raise StopAsyncIteration
        while True:
            chunk = connection.take()
            if chunk is not None:
                return chunk
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                self._release()
                raise StopAsyncIteration
            connection.waiter = connection.loop.create_future()
            try:
                await connection.waiter
            finally:
                connection.waiter = None

    def push_to(self, push: Callable[[bytes], bool] | None) -> _Connection | None:
        """Hand body pieces that arrive while this stream's reader waits to `push` (None
        stops it); returns the connection (for `nudge`), or None once the body is done."""
        connection = self._connection
        if connection is not None:
            connection.push = push
        return connection

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.push = None
            self._pool.release(connection)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.push = None
        if connection.reusable() and not connection.chunks:
            self._pool.release(connection)
        else:
            connection.abort()  # unread body: the upstream must see the client go
            self._pool.release(connection)


class LeanTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 with keep-alive, at most `max_connections` open at once."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float = _IDLE_SECONDS,
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle_timeout = idle_timeout
        # Closes connections left idle (after a burst, say) even when no request comes.
        self._sweeper: asyncio.TimerHandle | None = None
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = collections.defaultdict(list)
        self._open: set[_Connection] = set()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        return await self.exchange(
            _origin(request.url), _request_head(request, body) + body, request
        )

    async def exchange(
        self, origin: tuple[str, str, int], data: bytes, request: httpx2.Request | None
    ) -> httpx2.Response:
        """Send `data` (a whole request: head and body) on a connection to `origin`; the
        response once its head is in, its body streamed. `request` goes on the response."""
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self._connect_timeout)
            except TimeoutError:
                raise httpx2.PoolTimeout("no upstream connection became free in time") from None
        else:
            await self._slots.acquire()  # at once: no deadline (a task and a timer) needed
        connection: _Connection | None = None
        try:
            connection, reused = await self._connection(origin)
            assert connection.transport is not None
            connection.transport.write(data)
            try:
                await connection.head
            except httpx2.ReadError:
                if not reused:
                    raise
                # A kept-alive connection the server had just closed: once more on a new one.
                connection.abort()
                self._open.discard(connection)
                connection, _ = await self._connection(origin, fresh=True)
                assert connection.transport is not None
                connection.transport.write(data)
                await connection.head
        except BaseException:
            if connection is not None:
                connection.abort()
                self._open.discard(connection)
            self._slots.release()
            raise
        return httpx2.Response(
            connection.status,
            headers=connection.headers,
            stream=_Body(self, connection),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def _connection(
        self, origin: tuple[str, str, int], fresh: bool = False
    ) -> tuple[_Connection, bool]:
        idle = self._idle[origin]
        now = time.monotonic()
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._idle_timeout:
                connection.prepare()
                return connection, True
            connection.abort()
            self._open.discard(connection)
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = None
        if scheme == "https":
            context = self._ssl or httpx2.create_ssl_context()
            self._ssl = context
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(origin),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"could not connect to {host}:{port} in time") from None
        except OSError as exc:
            raise httpx2.ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
        self._open.add(protocol)
        return protocol, False

    def release(self, connection: _Connection) -> None:
        """A response is done with its connection: keep it for the next one, or drop it."""
        self._slots.release()
        if connection.reusable():
            connection.idle_since = time.monotonic()
            self._idle[connection.origin].append(connection)
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(
                    self._idle_timeout / 2, self._sweep
                )
        else:
            connection.abort()
            self._open.discard(connection)

    def _sweep(self) -> None:
        """Close every connection idle for `idle_timeout`; look again while any are left."""
        self._sweeper = None
        now = time.monotonic()
        for origin, idle in list(self._idle.items()):
            kept = []
            for connection in idle:
                if connection.closed or now - connection.idle_since >= self._idle_timeout:
                    connection.abort()
                    self._open.discard(connection)
                else:
                    kept.append(connection)
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._idle_timeout / 2, self._sweep
            )

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        self._idle.clear()


def _origin(url: httpx2.URL) -> tuple[str, str, int]:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


class RequestTemplate:
    """One kind of request, made once by an SDK (URL, headers, extensions), sent many times
    with a new JSON body each: on the lean transport its head is encoded once, and the
    `httpx2.Request` an SDK error or a cookie needs is built only then (`request`)."""

    __slots__ = ("url", "headers", "extensions", "origin", "_prefix")

    def __init__(
        self, url: httpx2.URL, headers: list[tuple[bytes, bytes]], extensions: dict[str, object]
    ) -> None:
        self.url = url
        self.headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        self.extensions = extensions
        self.origin = _origin(url)
        prefix = httpx2.Request("POST", url, headers=self.headers, stream=httpx2.ByteStream(b""))
        # The head up to the body's length: what `_request_head` writes for each such request.
        self._prefix = _request_head(prefix, b"", length=False)[:-2] + b"content-length: "

    def request(self, body: bytes) -> httpx2.Request:
        """The request as httpx2 sends it, for the SDK's errors and the cookie jar."""
        return httpx2.Request(
            "POST",
            self.url,
            headers=[*self.headers, (b"content-length", b"%d" % len(body))],
            stream=httpx2.ByteStream(body),
            extensions=dict(self.extensions),
        )

    def data(self, body: bytes) -> bytes:
        """The whole request on the wire, head and body."""
        return b"%s%d\r\n\r\n%s" % (self._prefix, len(body), body)


async def send_template(
    client: httpx2.AsyncClient, template: RequestTemplate, body: bytes
) -> httpx2.Response:
    """`template`'s request with `body`, sent as `send_streamed` sends it. On `client`'s lean
    transport with no cookies to send, the bytes go out as encoded once; the response's
    `request` is then set only where it is read (cookies the upstream sets), else it is
    left to `with_request`."""
    transport = getattr(client, "_transport", None)
    cookies = client.cookies
    if not isinstance(transport, LeanTransport) or client.is_closed or cookies:
        request = template.request(body)
        if cookies:  # set by the upstream before: sent back, as the SDK's requests do
            cookies.set_cookie_header(request)
        return await send_streamed(client, request)
    response = await transport.exchange(template.origin, template.data(body), None)
    if any(name.lower() in _SET_COOKIE for name, _ in response.headers.raw):
        response.request = template.request(body)
        cookies.extract_cookies(response)
    return response


def with_request(
    response: httpx2.Response, template: RequestTemplate, body: bytes
) -> httpx2.Response:
    """`response`, with the request it answers set if `send_template` left it out."""
    try:
        response.request  # noqa: B018 - raises where none is set
    except RuntimeError:
        response.request = template.request(body)
    return response


def _request_head(request: httpx2.Request, body: bytes, *, length: bool = True) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    has_length = False
    for name, value in request.headers.raw:
        lowered = name.lower()
        if lowered in (b"transfer-encoding",):
            continue  # the body is sent whole, with its length
        if lowered == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if length and not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
        lines.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def send_streamed(client: httpx2.AsyncClient, request: httpx2.Request) -> httpx2.Response:
    """`client.send(request, stream=True)`, with fewer layers when `client` is `http_client`'s
    lean one: no redirects, auth or mounts to handle there, so the request goes straight to
    the transport, and the response body is the transport's own stream rather than httpx2's
    wrapper around it (one async generator less per relayed chunk). Cookies the upstream
    sets are kept, as `client.send` keeps them."""
    transport = getattr(client, "_transport", None)
    if not isinstance(transport, LeanTransport) or client.is_closed:
        return await client.send(request, stream=True)
    response = await transport.handle_async_request(request)
    # Looked for here among the raw headers: `extract_cookies` would decode them all first.
    if any(name.lower() in _SET_COOKIE for name, _ in response.headers.raw):
        client.cookies.extract_cookies(response)
    return response


_SET_COOKIE = (b"set-cookie", b"set-cookie2")


def http_client(settings: ProviderSettings) -> httpx2.AsyncClient:
    """The httpx2 client an SDK sends through: the lean transport unless `transport = "httpx"`.

    The stream service enforces first-token and idle timeouts itself, so reads have none here;
    retries are the gateway's decision, so the SDKs are built with `max_retries=0`.
    """
    timeout = httpx2.Timeout(
        connect=settings.connect_timeout, read=None, write=30.0, pool=settings.connect_timeout
    )
    if settings.transport == "httpx":
        limits = httpx2.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=min(settings.max_connections, 100),
        )
        return httpx2.AsyncClient(timeout=timeout, limits=limits, follow_redirects=True)
    transport = LeanTransport(
        max_connections=settings.max_connections, connect_timeout=settings.connect_timeout
    )
    # Proxies from the environment would bypass a custom transport silently: take none.
    return httpx2.AsyncClient(transport=transport, timeout=timeout, trust_env=False)
