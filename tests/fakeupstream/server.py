"""A scriptable fake OpenAI/Anthropic upstream: a minimal HTTP/1.1 server on raw asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast

import msgspec

from tests.fakeupstream import formats
from tests.fakeupstream.formats import AnthropicStream, FakeToolCall, OpenAIStream, Plan, sse_chunk

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024
_TERMINATOR = b"0\r\n\r\n"
_ROUTES = {
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
}
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
)
_decode = msgspec.json.Decoder().decode


@dataclass
class Script:
    """How the fake answers one model's requests (shared, read-only).

    Slots 0..n-1 are the n deltas (reasoning first, then content, then one per tool-call argument
    fragment, or one for a call without fragments) and slot n is the finish;
    close_after/error_after/hang_after = k act at slot k, when delta k would have been sent.
    A non-streamed request is answered when the stream would have reached its last delta or its
    interruption: close aborts without a response, error sends a 500 in the vendor's shape and
    hang never answers.

    With tool_calls the answer is the scripted text (none by default), then the calls, and the
    finish reason is "tool_calls". Without text, a request with images is answered
    "saw N image(s) ", so a test can tell its images arrived.
    """

    tokens: int = 8
    text: list[str] | None = None
    reasoning: list[str] = field(default_factory=list)
    pace: float = 0.0
    first_token_delay: float = 0.0
    headers_delay: float = 0.0
    status: int = 200
    fail_first: int | None = None  # with a status: only this model's first N requests fail
    error_message: str = "scripted failure"
    retry_after: float | None = None
    close_after: int | None = None
    error_after: int | None = None
    hang_after: int | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 10
    tool_calls: list[FakeToolCall] | None = None
    set_cookie: str | None = None  # a `set-cookie` header on streamed answers


@dataclass
class RecordedRequest:
    """One request as the fake saw it, and how far its response got."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    model: str | None
    api: str
    stream: bool
    started_at: float
    deltas_sent: int = 0
    delta_times: list[float] = field(default_factory=list)
    completed: bool = False
    disconnected_at: float | None = None
    status: int = 0  # response status once headers were written
    query: str = ""  # raw query string, without the "?"
    connection: int = 0  # 1-based number of the TCP connection that carried it


def check_loopback(host: str) -> str:
    """Return the address to bind, refusing anything that is not loopback."""
    if host == "localhost":
        return "127.0.0.1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return host
    raise ValueError(f"the fake upstream only listens on loopback, not {host!r}")


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Overloaded" if status == 529 else "Unknown"
    return b"HTTP/1.1 %d %b\r\n" % (status, reason.encode())


def _retry_after(value: float) -> bytes:
    return str(int(value) if float(value).is_integer() else float(value)).encode()


class _Ticker:
    """Runs callbacks at loop times, with one timer per millisecond shared by every stream.

    Thousands of paced streams then cost one heap entry per millisecond instead of one timer,
    future and task wake-up per delta.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, list[Callable[[], None]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def at(self, when: float, callback: Callable[[], None]) -> None:
        key = math.ceil(when * 1000)
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [callback]
            self._timers[key] = self._loop.call_at(key / 1000, self._fire, key)
        else:
            bucket.append(callback)

    def _fire(self, key: int) -> None:
        del self._timers[key]
        for callback in self._buckets.pop(key):
            try:
                callback()
            except Exception:
                log.exception("fake upstream callback failed")

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._buckets.clear()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and serves them one at a time (keep-alive)."""

    def __init__(self, server: FakeUpstream, number: int) -> None:
        self.server = server
        self.number = number
        self.transport: asyncio.Transport
        self.buf = bytearray()
        self.busy = False
        self.keep_alive = True
        self.current: RecordedRequest | None = None
        self.closed = False
        self.paused = False
        self.on_resume: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence a cast and not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.server._conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy and not self.closed:
            self.next_request()

    def eof_received(self) -> bool | None:
        self.client_gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_gone()
        self.on_resume = None
        self.server._conns.discard(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callback is not None and not self.closed:
            callback()

    def client_gone(self) -> None:
        """The peer closed or reset the connection: record it; pending callbacks see `closed`."""
        if self.closed:
            return
        self.closed = True
        req = self.current
        if req is not None and not req.completed:
            req.disconnected_at = time.monotonic()
        self.transport.abort()

    def close_by_server(self, *, graceful: bool) -> None:
        """Close from our side, which is not a client disconnect; graceful flushes writes first."""
        if self.closed:
            return
        self.closed = True
        if graceful:
            self.transport.close()
        else:
            self.transport.abort()

    def writable(self) -> bool:
        """False once the connection is gone, which means: stop producing."""
        if self.closed:
            return False
        if self.transport.is_closing():
            # A failed send closes the transport before connection_lost runs.
            self.client_gone()
            return False
        return True

    def write(self, data: bytes) -> bool:
        if not self.writable():
            return False
        self.transport.write(data)
        return True

    def write_last(self, req: RecordedRequest, data: bytes) -> None:
        """Write the end of a response and serve the next request, if any."""
        if not self.writable():
            return
        # Marked before the write: a client in another thread may see the bytes before we return.
        req.completed = True
        self.transport.write(data)
        self.response_done()

    def response_done(self) -> None:
        self.busy = False
        self.current = None
        if not self.keep_alive:
            self.close_by_server(graceful=True)
        elif self.buf:
            # Deferred so a pipelining client cannot make the parser recurse.
            asyncio.get_running_loop().call_soon(self.next_request)

    def next_request(self) -> None:
        if self.busy or self.closed:
            return
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._reject(431, "request head too large")
            return
        try:
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(line)
                name = name.strip().lower()
                value = value.strip()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._reject(400, "malformed request")
            return
        if "transfer-encoding" in headers:
            self._reject(501, "chunked request bodies are not supported")
            return
        total = end + 4 + length
        if len(buf) < total:
            return
        raw = bytes(buf[end + 4 : total])
        del buf[:total]
        self.keep_alive = (
            version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        )
        self.busy = True
        path, _, query = target.partition("?")
        self.server._dispatch(self, method, path, query, headers, raw)

    def _reject(self, status: int, message: str) -> None:
        body = formats.openai_error(status, message)
        head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.write(_status_line(status) + head % len(body) + body)
        self.close_by_server(graceful=True)


class _Stream:
    """Drives one SSE response from ticker callbacks: deltas, then the finish or an interruption."""

    __slots__ = (
        "conn",
        "enc",
        "first",
        "kind",
        "last",
        "loop",
        "message",
        "next",
        "pace",
        "req",
        "stop_slot",
        "ticker",
    )

    def __init__(
        self,
        conn: _Connection,
        req: RecordedRequest,
        enc: OpenAIStream | AnthropicStream,
        script: Script,
        n: int,
        ticker: _Ticker,
    ) -> None:
        self.conn = conn
        self.req = req
        self.enc = enc
        self.ticker = ticker
        self.loop = asyncio.get_running_loop()
        self.stop_slot, self.kind = _event_slot(script, n)
        self.message = script.error_message
        self.pace = script.pace
        # Deadlines are absolute (first + slot * pace) so pacing does not drift under load;
        # the finish slot n follows the last delta at once.
        self.first = self.loop.time() + script.first_token_delay
        self.last = max(n - 1, 0)
        self.next = 0

    def start(self) -> None:
        if self.first > self.loop.time():
            self.ticker.at(self.first, self.step)
        else:
            self.step()

    def step(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        req, enc, now = self.req, self.enc, self.loop.time
        i = self.next
        while i < self.stop_slot:
            if conn.paused:
                conn.on_resume = self.step
                return
            if not conn.writable():
                return
            # Recorded before the write, for clients reading it from another thread.
            req.deltas_sent += 1
            req.delta_times.append(time.monotonic())
            conn.transport.write(sse_chunk(enc.delta(i)))
            i += 1
            self.next = i
            when = self.first + min(i, self.last) * self.pace
            if when > now():
                self.ticker.at(when, self.step)
                return
        if self.kind == "close":
            # Graceful close delivers the deltas already written, then a chunked body cut short.
            conn.close_by_server(graceful=True)
        elif self.kind != "hang":
            payload = enc.error(self.message) if self.kind == "error" else enc.finish()
            conn.write_last(req, sse_chunk(payload) + _TERMINATOR)


def _event_slot(script: Script, n: int) -> tuple[int, str]:
    """The first scripted interruption as (slot, kind), or (n, "finish") when none comes first."""
    best_slot, best_kind = n, "finish"
    for slot, kind in (
        (script.close_after, "close"),
        (script.error_after, "error"),
        (script.hang_after, "hang"),
    ):
        if (
            slot is not None
            and 0 <= slot
            and (slot < best_slot or (slot == best_slot and best_kind == "finish"))
        ):
            best_slot, best_kind = slot, kind
    return best_slot, best_kind


class FakeUpstream:
    """A scriptable fake OpenAI/Anthropic server on loopback that records every request."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        models: list[str] | None = None,
        default: Script | None = None,
    ) -> None:
        self.host = check_loopback(host)
        self.port = port
        self.api_key = api_key
        self.models = models
        self.default = default if default is not None else Script()
        self.scripts: dict[str, Script] = {}
        self.requests: list[RecordedRequest] = []
        self._server: asyncio.Server | None = None
        self._ticker: _Ticker | None = None
        self._conns: set[_Connection] = set()
        self._request_ids = 0
        self._connection_ids = 0

    @property
    def url(self) -> str:
        """Base URL; the SDKs' base_url is this plus ``/v1``."""
        if self._server is None:
            raise RuntimeError("FakeUpstream is not running")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeUpstream is already running")
        loop = asyncio.get_running_loop()
        self._ticker = _Ticker(loop)
        # A large backlog lets benchmarks open thousands of connections at once.
        self._server = await loop.create_server(
            self._new_connection, self.host, self.port, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _new_connection(self) -> _Connection:
        self._connection_ids += 1
        return _Connection(self, self._connection_ids)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._ticker is not None:
            self._ticker.close()
        for conn in list(self._conns):
            conn.close_by_server(graceful=False)
        await server.wait_closed()
        # abort() runs connection_lost on a later loop iteration; wait so every socket is released.
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[FakeUpstream]:
        """Serve from a private event loop in a daemon thread for the duration of the block."""
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=10)
            yield self
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()

    # The timeout parameter is part of the fixture's documented API.
    async def wait_disconnected(self, req: RecordedRequest, timeout: float = 5.0) -> float:
        """Poll until the client's disconnect was recorded; return its time.monotonic() value."""
        deadline = time.monotonic() + timeout
        while req.disconnected_at is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"no disconnect recorded for {req.method} {req.path} within {timeout}s"
                )
            await asyncio.sleep(0.001)
        return req.disconnected_at

    def by_model(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def _dispatch(
        self,
        conn: _Connection,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
    ) -> None:
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = _decode(raw)
            except msgspec.DecodeError:
                bad_json = True
        is_dict = isinstance(body, dict)
        model = body.get("model") if is_dict else None
        anthropic = path.startswith("/v1/messages") or (
            path != "/v1/chat/completions" and "anthropic-version" in headers
        )
        req = RecordedRequest(
            method=method,
            path=path,
            headers=headers,
            body=body,
            model=model if isinstance(model, str) else None,
            api="anthropic" if anthropic else "openai",
            stream=is_dict and body.get("stream") is True,
            started_at=time.monotonic(),
            query=query,
            connection=conn.number,
        )
        self.requests.append(req)
        conn.current = req
        self._request_ids += 1
        if (method, path) not in _ROUTES:
            self._send_error(conn, req, 404, f"unknown route {method} {path}")
        elif self.api_key is not None and not self._authorized(headers, anthropic):
            self._send_error(conn, req, 401, "invalid api key")
        elif path == "/v1/models":
            if anthropic:
                listing = formats.anthropic_models(
                    self.models or list(formats.DEFAULT_ANTHROPIC_MODELS)
                )
            else:
                listing = formats.openai_models(self.models or list(formats.DEFAULT_OPENAI_MODELS))
            self._send_json(conn, req, 200, listing)
        elif bad_json or not is_dict:
            self._send_error(conn, req, 400, "request body is not a JSON object")
        else:
            script = (
                self.scripts.get(req.model, self.default) if req.model is not None else self.default
            )
            if path == "/v1/messages/count_tokens":  # the script's prompt_tokens is the count
                count = msgspec.json.encode({"input_tokens": script.prompt_tokens})
                self._send_json(conn, req, script.status, count)
                return
            respond = functools.partial(self._respond, conn, req, self._request_ids, script)
            if script.headers_delay > 0:
                self._later(script.headers_delay, respond)
            else:
                respond()

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        assert self._ticker is not None
        self._ticker.at(asyncio.get_running_loop().time() + delay, callback)

    def _authorized(self, headers: dict[str, str], anthropic: bool) -> bool:
        bearer = headers.get("authorization") == f"Bearer {self.api_key}"
        # The anthropic SDK (2.x) sends its api_key as a bearer token; raw clients use x-api-key.
        return bearer or (anthropic and headers.get("x-api-key") == self.api_key)

    def _send_json(
        self, conn: _Connection, req: RecordedRequest, status: int, body: bytes, extra: bytes = b""
    ) -> None:
        head = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        if not conn.keep_alive:
            extra += b"connection: close\r\n"
        req.status = status
        conn.write_last(req, _status_line(status) + head + extra + b"\r\n" + body)

    def _send_error(
        self,
        conn: _Connection,
        req: RecordedRequest,
        status: int,
        message: str,
        retry_after: float | None = None,
    ) -> None:
        if req.api == "anthropic":
            body = formats.anthropic_error(status, message)
        else:
            body = formats.openai_error(status, message)
        extra = (
            b"" if retry_after is None else b"retry-after: " + _retry_after(retry_after) + b"\r\n"
        )
        self._send_json(conn, req, status, body, extra)

    def _respond(self, conn: _Connection, req: RecordedRequest, rid: int, script: Script) -> None:
        if conn.closed:
            return
        if script.status != 200 and (
            script.fail_first is None or len(self.by_model(req.model or "")) <= script.fail_first
        ):
            self._send_error(conn, req, script.status, script.error_message, script.retry_after)
            return
        plan = _plan(req.body, script)
        model = req.model or ""
        if not req.stream:
            stop_slot, kind = _event_slot(script, plan.deltas)
            # Answer when the equivalent stream would have sent its last delta or its interruption.
            slots = stop_slot - 1 if kind == "finish" and stop_slot > 0 else stop_slot
            reply = functools.partial(self._reply, conn, req, rid, plan, kind, script.error_message)
            delay = script.first_token_delay + slots * script.pace
            if delay > 0:
                self._later(delay, reply)
            else:
                reply()
            return
        enc: OpenAIStream | AnthropicStream
        if req.api == "anthropic":
            enc = AnthropicStream(rid, model, plan)
            head = b"request-id: req_fake_%d\r\n" % rid
        else:
            options = req.body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            enc = OpenAIStream(rid, model, int(time.time()), plan, include_usage)
            head = b"x-request-id: req_fake_%d\r\n" % rid
        if not conn.keep_alive:
            head += b"connection: close\r\n"
        if script.set_cookie is not None:
            head += b"set-cookie: %s\r\n" % script.set_cookie.encode()
        opening = enc.opening()
        req.status = 200
        if conn.write(_SSE_HEAD + head + b"\r\n" + (sse_chunk(opening) if opening else b"")):
            assert self._ticker is not None
            _Stream(conn, req, enc, script, plan.deltas, self._ticker).start()

    def _reply(
        self, conn: _Connection, req: RecordedRequest, rid: int, plan: Plan, kind: str, message: str
    ) -> None:
        if conn.closed or kind == "hang":
            return
        model = req.model or ""
        if kind == "close":
            conn.close_by_server(graceful=True)
        elif kind == "error":
            self._send_error(conn, req, 500, message)
        elif req.api == "anthropic":
            self._send_json(conn, req, 200, formats.anthropic_message(rid, model, plan))
        else:
            self._send_json(
                conn, req, 200, formats.openai_completion(rid, model, int(time.time()), plan)
            )


def _plan(body: dict[str, Any], script: Script) -> Plan:
    tools = script.tool_calls or []
    if script.text is not None:
        content = script.text
    elif images := _count_images(body):
        content = [f"saw {images} image(s) "]
    elif script.tool_calls is not None:
        content = []
    else:
        content = formats.default_pieces(script.tokens)
    finish = "tool_calls" if tools else script.finish_reason
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < len(content):
        content = content[: max(limit, 0)]
        finish = "length"
        tools = []
    # Scripted "stop_sequence": the request's first stop sequence ended the answer.
    stops = body.get("stop_sequences") or [None]
    return Plan(
        script.reasoning,
        content,
        finish,
        script.prompt_tokens,
        tools,
        formats.tool_plan(tools),
        stops[0] if finish == "stop_sequence" else None,
    )


def _count_images(body: dict[str, Any]) -> int:
    """Image parts in the messages: OpenAI ``image_url`` parts or Anthropic ``image`` blocks."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                    count += 1
    return count
