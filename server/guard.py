"""uvicorn's httptools protocol with the guards uvicorn itself lacks.

- A deadline for request headers. Uvicorn drops idle keep-alive connections, but a client that
  opens a connection and sends its headers slowly, or never, holds it forever (slowloris). Every
  request's headers get `header_timeout` seconds from the connection (or the request's first
  byte) to arrive, then the answer is 408 and the connection is closed.
- A byte cap on the request head (request line and header lines), counted as the bytes arrive
  and before the parser buffers them: past `max_header_bytes`, 431 and close. Without it the
  parser keeps every header byte until the blank line, so a client could make the process hold
  hundreds of megabytes before the ASGI layer ever saw the headers.
- A close-delimited body for HTTP/1.0 clients. uvicorn chunks every response without a
  `content-length`, but HTTP/1.0 has no chunked encoding: such a client would read chunk-size
  lines inside an event stream. The body is written as is and the connection closed at its end.
- `tokenrelay.abort` in the scope's extensions: a callable that drops the connection at once,
  without flushing what is buffered, for a client that has stopped reading.
- `tokenrelay.direct` in the scope's extensions: the server's own `send`, so that a streamed
  body can skip the middleware layers once the response head went through them (see
  `direct_body`; `server.wsguard` gives WebSockets the same), and a plain function that writes
  one piece of a chunked body to the socket at once, with no coroutine and no message dict,
  and says False when it cannot (no head yet, not chunked, the body ended, the client gone,
  or the socket's buffer full, where the caller must go through `send` and wait). A relayed
  chunk is one such call (`direct_write`); `server.wsguard` gives WebSocket text frames the
  same. Over HTTP it also carries a watch for the client leaving (`gone_watch`): a callback
  the protocol calls from `connection_lost`, where a task waiting on `receive` for
  `http.disconnect` would cost a task, an event and two loop turns per request.

Both extensions reach the connection through weak references. The scope is held by the
exchange it describes, so a strong one would make a reference cycle of every request, freed
only by the cycle collector, whose pauses grow with the number of live streams.

Request bodies have their own deadline in `server.http`.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from starlette.types import Message, Send
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

ABORT = "tokenrelay.abort"
DIRECT = "tokenrelay.direct"
Owner = TypeVar("Owner")


def _answer(status: bytes, code: bytes, message: bytes) -> bytes:
    body = (
        b'{"error":{"message":"%s","type":"invalid_request_error","code":"%s","param":null,'
        b'"status":%s}}' % (message, code, status.split()[0])
    )
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % (status, len(body)) + body
    )


_TIMEOUT_RESPONSE = _answer(
    b"408 Request Timeout", b"request_timeout", b"The request headers did not arrive in time."
)


def _too_large_response(limit: int) -> bytes:
    message = b"The request headers are larger than the limit of %d bytes." % limit
    return _answer(b"431 Request Header Fields Too Large", b"headers_too_large", message)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header byte cap, close-delimited
    HTTP/1.0 bodies and an abort extension."""

    # Set once per process from the settings (`configure`); read when a connection is made.
    header_timeout: float = 10.0
    # The default; a connection takes the served app's `[limits] max_header_bytes`.
    max_header_bytes: int = 16 * 1024
    _header_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes of the current request head received so far
    _in_head = True  # between requests or inside a head: bytes are counted
    _done = False  # refused or upgraded: no more bytes go to the parser

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        settings = settings_of(self.app)
        if settings is not None:
            self.max_header_bytes = settings.limits.max_header_bytes
        self.app = _HeadFirst(self.app)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if not self._in_head:
            super().data_received(data)
            return
        room = self.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed only what fits; if the head ends within it, the rest is body (or the next
        # request) and goes on as usual. Otherwise the head is too large.
        self._head_bytes = self.max_header_bytes
        super().data_received(data[:room])
        if self._done or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(_too_large_response(self.max_header_bytes))
        else:
            self.data_received(data[room:])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The ASGI types want a dict per extension; ours is a callable, read by `abort_of`.
        self.scope["extensions"] = {ABORT: WeakCall(self._abort)}  # type: ignore[dict-item]
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:
            # Only attributes are read and written later; the task has not started yet.
            http10 = self.scope["http_version"] == "1.0"
            cycle.__class__ = CloseDelimitedCycle if http10 else GuardedCycle
            writers = WeakWriters(cast(GuardedCycle, cycle), _cycle_writers)
            self.scope["extensions"][DIRECT] = writers  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def handle_websocket_upgrade(self) -> None:
        self._done = True
        super().handle_websocket_upgrade()
        # The WebSocket protocol has the connection now, and this one never hears of it again
        # (no `connection_lost`, where uvicorn lets go of the parser, whose callbacks hold it).
        self.parser = None  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._done = True
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, GuardedCycle) and cycle.disconnected and cycle.gone is not None:
            gone, cycle.gone = cycle.gone, None
            gone()

    def _abort(self) -> None:
        self._done = True
        self.transport.abort()

    def _refuse(self, response: bytes) -> None:
        self._done = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        self._refuse(_TIMEOUT_RESPONSE)


class WeakCall:
    """A bound method called through a weak reference to its object (a no-op once it is gone)."""

    __slots__ = ("_method",)

    def __init__(self, method: Callable[[], None]) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self) -> None:
        method = self._method()
        if method is not None:
            method()


# Called with a callback, calls it once when the client goes away; returns what unwatches.
Watch = Callable[[Callable[[], None]], Callable[[], None]]
# The server's `send`, its synchronous write, and a watch for the client leaving (HTTP only).
Writers = tuple[Send, Callable[[Any], bool], Watch | None]


class WeakWriters(Generic[Owner]):
    """`tokenrelay.direct`: the `Writers` of the object serving the exchange (a request's
    cycle, a WebSocket's protocol), reached through a weak reference; None once it is gone."""

    __slots__ = ("_owner", "_writers")

    def __init__(self, owner: Owner, writers: Callable[[Owner], Writers]) -> None:
        self._owner = weakref.ref(owner)
        self._writers = writers

    def writers(self) -> Writers | None:
        owner = self._owner()
        return None if owner is None else self._writers(owner)


def _cycle_writers(cycle: GuardedCycle) -> Writers:
    return cycle.send, _chunk_writer(cycle), _gone_watch(cycle)  # type: ignore[return-value]


def _gone_watch(cycle: GuardedCycle) -> Watch:
    """Watch `cycle` for its client leaving (the connection lost before the response ended),
    as a task waiting on `receive` for `http.disconnect` would, without the task."""

    def watch(callback: Callable[[], None]) -> Callable[[], None]:
        if cycle.disconnected or cycle.response_complete:
            # As `receive` would answer now; called soon, as a task would have been.
            handle = asyncio.get_running_loop().call_soon(callback)
            return handle.cancel
        cycle.gone = callback
        # What `receive` does before it waits: a paused read would not see the client go.
        cycle.flow.resume_reading()

        def unwatch() -> None:
            if cycle.gone is callback:
                cycle.gone = None

        return unwatch

    return watch


def _chunk_writer(cycle: GuardedCycle) -> Callable[[bytes], bool]:
    """Write a piece of `cycle`'s chunked body now, as its `send` would; False when only
    `send` may (see the module's docstring), so the order and the back-pressure stay its."""
    transport = cycle.transport
    flow = cycle.flow

    def write(data: bytes) -> bool:
        if (
            cycle.chunked_encoding is not True  # no head yet, a length, HTTP/1.0 or HEAD
            or cycle.response_complete
            or cycle.disconnected
            or flow.write_paused
        ):
            return False
        if data:  # an empty chunk would end the body
            head = cycle.head
            if head is None:
                transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:  # the first piece goes out with the response head
                cycle.head = None
                transport.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
        return True

    return write


class GuardedCycle(RequestResponseCycle):
    """uvicorn's exchange, with a callback for the client leaving before the response ended
    (set through `Watch`; the protocol calls it from `connection_lost`), and the response
    head held back for the first piece of the body.

    uvicorn writes the head on its own as soon as the app sends it; a streamed (chunked)
    answer's first piece follows within the same step, so the two make one write (one system
    call, one packet for the client to read), whether that piece goes through the direct
    writer or through `send`. The head never waits longer than the loop's next turn, and goes
    first before anything else. A head with a length goes out at once, as uvicorn writes it.
    """

    gone: Callable[[], None] | None = None
    head: bytes | None = None  # the response head, encoded and not yet written

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused or self.disconnected:  # uvicorn's `send` waits, or drops
            self.send_head()
            await super().send(message)
        elif message["type"] == "http.response.start" and not self.response_started:
            if _has_length(message):
                # A body of known length (a JSON answer) comes whole through `send`: holding
                # the head for it saves a write but costs more than the write does.
                await super().send(message)
                return
            head = (await self._encoded(message)).data
            if self.chunked_encoding is not True:  # HTTP/1.0, HEAD, 204, 304: as uvicorn does
                self.transport.write(head)
            elif head:
                self.head = head
                asyncio.get_running_loop().call_soon(self.send_head)
        elif self.head is not None:  # a body through `send` (an answer that is its finish)
            held = await self._encoded(message)
            head, self.head = self.head, None
            assert head is not None
            self.transport.write(head + held.data)
            if held.closed:
                self.transport.close()
            if held.responded:
                # After the close, as uvicorn does it: the protocol looks at the socket to
                # decide whether to go on with a request pipelined behind this one.
                self.on_response()
        else:
            await super().send(message)

    async def _encoded(self, message: ASGISendEvent) -> _Held:
        """What uvicorn's `send` writes for `message`, whether it then closes and whether the
        response ended, instead of doing it: its state (chunked or not, keep-alive, complete)
        moves on as it would. Only while the socket takes writes, where that `send` runs
        through without waiting."""
        transport, on_response, held = self.transport, self.on_response, _Held()
        self.transport = held  # type: ignore[assignment]
        self.on_response = held.respond
        try:
            await super().send(message)
        finally:
            self.transport = transport
            if self.on_response == held.respond:  # uvicorn may have let go of it meanwhile
                self.on_response = on_response
        return held

    def send_head(self) -> None:
        """Write the held head, unless a piece of the body took it along already."""
        head = self.head
        if head is not None:
            self.head = None
            if not self.disconnected:
                self.transport.write(head)


def _has_length(message: ASGISendEvent) -> bool:
    """Whether a response head says its body's length."""
    for name, _ in message.get("headers", ()):  # type: ignore[attr-defined]
        if len(name) == 14 and name.lower() == b"content-length":
            return True
    return False


class _Held:
    """Stands in for the socket (and the protocol's end-of-response callback) while uvicorn
    encodes a message: keeps what it writes, whether it closed the connection after, and
    whether the response ended."""

    __slots__ = ("data", "closed", "responded")

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.responded = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def respond(self) -> None:
        self.responded = True


class _HeadFirst:
    """The served app, and then a response head its cycle still holds written out, before
    uvicorn closes a connection whose response the app left unfinished (it raised, or
    returned, right after the head): the client gets the status as it did before heads were
    held. `app` is the served app's, for `settings_of`."""

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            cycle = getattr(send, "__self__", None)  # uvicorn passes its cycle's `send`
            if isinstance(cycle, GuardedCycle):
                cycle.send_head()


class CloseDelimitedCycle(GuardedCycle):
    """An HTTP/1.0 exchange: a body of unknown length ends when the connection closes."""

    _close_delimited = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", ())}
            if (
                b"content-length" not in names
                and self.scope["method"] != "HEAD"
                and message["status"] not in (204, 304)
            ):
                # Neither chunked nor a length: uvicorn writes the body as it comes, and the
                # connection (never kept alive for HTTP/1.0) is closed after the last part.
                self._close_delimited = True
                self.chunked_encoding = False
                self.expected_content_length = sys.maxsize
        elif (
            self._close_delimited
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
        ):
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


def settings_of(app: Any) -> Any:
    """The gateway settings of the app uvicorn serves (under its middleware), or None.

    Read when a connection is made, so each server in a process applies its own limits.
    """
    for _ in range(8):
        found = getattr(getattr(app, "state", None), "settings", None)
        if found is not None:
            return found
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


# The abort of the connection being served, set by the auth middleware for each request and
# socket; stream tasks started within inherit it.
current_abort: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "tokenrelay_abort", default=None
)


def abort_of(scope: Any) -> Callable[[], None] | None:
    """The scope's `tokenrelay.abort` (this module's HTTP and WebSocket protocols give one)."""
    found = scope.get("extensions", {}).get(ABORT)
    return found if callable(found) else None


def direct_body(scope: Any, send: Send) -> Send:
    """`send`, except that response bodies and WebSocket data frames go straight to the
    server's own `send`, and its `write` (see `direct_write`) to the socket.

    Every middleware of the app looks only at the response head (status, headers) or the
    WebSocket accept, and passes body messages and frames on as they are, yet each adds an
    async call per message: for a stream, a layer of calls per relayed chunk. The head still
    goes through them all; the server's `send` enforces the order either way.
    """
    extensions = scope.get("extensions") or {}
    direct: WeakWriters[Any] | None = extensions.get(DIRECT)
    found = direct.writers() if direct is not None else None
    if found is None:  # another server (tests, ASGI transports): every message goes the long way
        return send
    raw, write, watch = found
    return DirectSend(send, raw, write, watch)


class DirectSend:
    """The `send` of `direct_body`, with the server's synchronous `write` and its watch for
    the client leaving beside it."""

    __slots__ = ("_send", "_raw", "write", "watch")

    def __init__(
        self, send: Send, raw: Send, write: Callable[[Any], bool] | None, watch: Watch | None
    ) -> None:
        self._send = send
        self._raw = raw
        self.write = write
        self.watch = watch

    async def __call__(self, message: Message) -> None:
        if message["type"] in _DIRECT:
            await self._raw(message)
        else:
            await self._send(message)


_DIRECT = frozenset({"http.response.body", "websocket.send"})


def direct_write(send: Send) -> Callable[[Any], bool] | None:
    """The server's synchronous writer behind `send` (from `direct_body`), if any: a piece of
    a chunked response body (bytes) over HTTP, a text frame (str) over a WebSocket.

    It returns False when the piece must go through `send` instead (and be awaited).
    """
    return send.write if isinstance(send, DirectSend) else None


def gone_watch(send: Send) -> Watch | None:
    """The server's watch for the client leaving, behind `send` (from `direct_body`), if any."""
    return send.watch if isinstance(send, DirectSend) else None


def configure(header_timeout: float) -> None:
    GuardedHttpToolsProtocol.header_timeout = header_timeout
