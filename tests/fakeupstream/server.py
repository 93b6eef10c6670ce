"""A scriptable fake OpenAI/Anthropic upstream: a minimal HTTP/1.1 server on raw asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, cast

import msgspec

from tests.fakeupstream import formats
from tests.fakeupstream.formats import AnthropicStream, OpenAIStream, Plan, sse_chunk

log = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024
_TERMINATOR = b"0\r\n\r\n"
_decode = msgspec.json.Decoder().decode


@dataclass
class Script:
    """How the fake answers one model's requests (shared, read-only).

    Delta slots are numbered 0..n-1 for the n deltas (reasoning first, then content) and n for the
    finish; close_after/error_after/hang_after = k act at slot k, when delta k would have been sent.
    Non-streamed requests wait as long as the stream would have taken to reach that slot, then answer
    (close: abort the connection; error: a 500 in the vendor's shape; hang: never answer).
    """

    tokens: int = 8
    text: list[str] | None = None
    reasoning: list[str] = field(default_factory=list)
    pace: float = 0.0
    first_token_delay: float = 0.0
    headers_delay: float = 0.0
    status: int = 200
    error_message: str = "scripted failure"
    retry_after: float | None = None
    close_after: int | None = None
    error_after: int | None = None
    hang_after: int | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 10


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
    status: int = 0
    query: str = ""
    connection: int = 0


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Overloaded" if status == 529 else "Unknown"
    return b"HTTP/1.1 %d %b\r\n" % (status, reason.encode())


def _retry_after(value: float) -> bytes:
    return (
        str(int(value)).encode()
        if float(value).is_integer()
        else repr(float(value)).encode()
    )


def check_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(f"fake upstream only listens on loopback addresses, not {host!r}")


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and runs one response task at a time."""

    def __init__(self, server: FakeUpstream, number: int) -> None:
        self.server = server
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.current: RecordedRequest | None = None
        self.closed = False
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so this is a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.server._conns.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.task is None and not self.closed:
            self._next_request()

    def eof_received(self) -> bool | None:
        self._client_gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_gone()
        self.server._conns.discard(self)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    # -- lifecycle --

    def _client_gone(self) -> None:
        """The peer closed or reset the connection: record it and stop generating at once."""
        if self.closed:
            return
        self.closed = True
        req = self.current
        if req is not None and not req.completed:
            req.disconnected_at = time.monotonic()
        self._teardown()

    def close_by_server(self, *, graceful: bool = False) -> None:
        """Close the connection from our side (not a client disconnect).

        graceful flushes what was already written before the FIN; it is used from inside the
        response task, which therefore is not cancelled. Otherwise the task is cancelled and the
        transport aborted (stop()).
        """
        if self.closed:
            return
        self.closed = True
        if graceful:
            assert self.transport is not None
            self.transport.close()
        else:
            self._teardown()

    def _teardown(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        """Wait for the transport's write buffer to fall below its high-water mark."""
        if self.paused and not self.closed:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            # A failed send closes the transport before connection_lost runs; count it as the disconnect.
            self._client_gone()
            raise asyncio.CancelledError
        self.transport.write(data)

    # -- request parsing --

    def _next_request(self) -> None:
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
                headers[name] = (
                    f"{headers[name]}, {value}" if name in headers else value
                )
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
        keep_alive = (
            version == "HTTP/1.1"
            and "close" not in headers.get("connection", "").lower()
        )
        path, _, query = target.partition("?")
        self.server._dispatch(self, method, path, query, headers, raw, keep_alive)

    def _reject(self, status: int, message: str) -> None:
        body = formats.openai_error(status, message)
        assert self.transport is not None
        self.transport.write(
            _status_line(status)
            + b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
            + body
        )
        self.close_by_server(graceful=True)

    def start_task(self, req: RecordedRequest, coro: Any) -> None:
        self.current = req
        task = asyncio.get_running_loop().create_task(coro)
        self.task = task
        self.server._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.server._tasks.discard(task)
        if self.task is task:
            self.task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fake upstream handler failed", exc_info=exc)
            self.close_by_server()
        if self.buf and not self.closed:
            self._next_request()


class FakeUpstream:
    """A scriptable fake OpenAI/Anthropic server on 127.0.0.1 that records every request."""

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
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._request_ids = 0
        self._connection_ids = 0

    @property
    def url(self) -> str:
        """Base URL (the SDKs' base_url is this plus ``/v1``)."""
        if self._server is None:
            raise RuntimeError("FakeUpstream is not running")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FakeUpstream is already running")
        loop = asyncio.get_running_loop()
        # A large backlog lets benchmarks open thousands of connections at once without SYN drops.
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
        for conn in list(self._conns):
            conn.close_by_server()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        # abort() defers connection_lost to the next loop iterations; wait so every socket is released.
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

    async def wait_disconnected(
        self, req: RecordedRequest, timeout: float = 5.0
    ) -> float:
        """Poll until the server has recorded the client's disconnect; return its monotonic time."""
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

    # -- request handling --

    def _dispatch(
        self,
        conn: _Connection,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        raw: bytes,
        keep_alive: bool,
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
        if path == "/v1/messages" or (
            path != "/v1/chat/completions" and "anthropic-version" in headers
        ):
            api = "anthropic"
        else:
            api = "openai"
        req = RecordedRequest(
            method=method,
            path=path,
            headers=headers,
            body=body,
            model=model if isinstance(model, str) else None,
            api=api,
            stream=is_dict and body.get("stream") is True,
            started_at=time.monotonic(),
            query=query,
            connection=conn.number,
        )
        self.requests.append(req)
        self._request_ids += 1
        conn.start_task(
            req, self._respond(conn, req, self._request_ids, keep_alive, bad_json)
        )

    async def _respond(
        self,
        conn: _Connection,
        req: RecordedRequest,
        rid: int,
        keep_alive: bool,
        bad_json: bool,
    ) -> None:
        end = b"" if keep_alive else b"connection: close\r\n"
        anthropic = req.api == "anthropic"
        route = (req.method, req.path)
        if route not in {
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/messages"),
            ("GET", "/v1/models"),
        }:
            self._send_error(
                conn, req, 404, f"unknown route {req.method} {req.path}", None, end
            )
        elif self.api_key is not None and not self._authorized(req, anthropic):
            self._send_error(conn, req, 401, "invalid api key", None, end)
        elif req.path == "/v1/models":
            self._send_models(conn, req, anthropic, end)
        elif bad_json or not isinstance(req.body, dict):
            self._send_error(
                conn, req, 400, "request body is not a JSON object", None, end
            )
        else:
            script = (
                self.scripts.get(req.model, self.default)
                if req.model is not None
                else self.default
            )
            if script.headers_delay > 0:
                await asyncio.sleep(script.headers_delay)
            if script.status != 200:
                self._send_error(
                    conn,
                    req,
                    script.status,
                    script.error_message,
                    script.retry_after,
                    end,
                )
            elif req.stream:
                await self._stream(conn, req, rid, script, end)
            else:
                await self._complete(conn, req, rid, script, end)
        if not keep_alive and req.completed:
            conn.close_by_server(graceful=True)

    def _authorized(self, req: RecordedRequest, anthropic: bool) -> bool:
        if anthropic:
            return req.headers.get("x-api-key") == self.api_key
        return req.headers.get("authorization") == f"Bearer {self.api_key}"

    def _send_json(
        self,
        conn: _Connection,
        req: RecordedRequest,
        status: int,
        body: bytes,
        extra: bytes,
    ) -> None:
        head = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        conn.write(_status_line(status) + head + extra + b"\r\n" + body)
        req.status = status
        req.completed = True

    def _send_error(
        self,
        conn: _Connection,
        req: RecordedRequest,
        status: int,
        message: str,
        retry_after: float | None,
        end: bytes,
    ) -> None:
        body = (
            formats.anthropic_error(status, message)
            if req.api == "anthropic"
            else formats.openai_error(status, message)
        )
        extra = (
            end
            if retry_after is None
            else b"retry-after: " + _retry_after(retry_after) + b"\r\n" + end
        )
        self._send_json(conn, req, status, body, extra)

    def _send_models(
        self, conn: _Connection, req: RecordedRequest, anthropic: bool, end: bytes
    ) -> None:
        if anthropic:
            body = formats.anthropic_models(
                self.models or list(formats.DEFAULT_ANTHROPIC_MODELS)
            )
        else:
            body = formats.openai_models(
                self.models or list(formats.DEFAULT_OPENAI_MODELS)
            )
        self._send_json(conn, req, 200, body, end)

    @staticmethod
    def _plan(req: RecordedRequest, script: Script) -> Plan:
        content = (
            script.text
            if script.text is not None
            else formats.default_pieces(script.tokens)
        )
        finish = script.finish_reason
        body = req.body
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if (
            isinstance(limit, int)
            and not isinstance(limit, bool)
            and limit < len(content)
        ):
            content = content[: max(limit, 0)]
            finish = "length"
        return Plan(script.reasoning, content, finish, script.prompt_tokens)

    @staticmethod
    def _event_slot(script: Script, n: int) -> tuple[int, str]:
        """The first scripted interruption as (slot, kind), or (n, "finish") when none comes first."""
        best_slot, best_kind = n, "finish"
        for slot, kind in (
            (script.close_after, "close"),
            (script.error_after, "error"),
            (script.hang_after, "hang"),
        ):
            if slot is None or slot < 0:
                continue
            if slot < best_slot or (slot == best_slot and best_kind == "finish"):
                best_slot, best_kind = slot, kind
        return best_slot, best_kind

    async def _stream(
        self,
        conn: _Connection,
        req: RecordedRequest,
        rid: int,
        script: Script,
        end: bytes,
    ) -> None:
        plan = self._plan(req, script)
        model = req.model or ""
        enc: OpenAIStream | AnthropicStream
        if req.api == "anthropic":
            enc = AnthropicStream(rid, model, plan)
            head = b"request-id: req_fake_%d\r\n" % rid
        else:
            options = req.body.get("stream_options")
            include_usage = (
                isinstance(options, dict) and options.get("include_usage") is True
            )
            enc = OpenAIStream(rid, model, int(time.time()), plan, include_usage)
            head = b"x-request-id: req_fake_%d\r\n" % rid
        opening = enc.opening()
        conn.write(
            _status_line(200)
            + b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
            + b"transfer-encoding: chunked\r\n"
            + head
            + end
            + b"\r\n"
            + (sse_chunk(opening) if opening else b"")
        )
        req.status = 200
        n = plan.deltas
        stop_slot, kind = self._event_slot(script, n)
        pace = script.pace
        # Deadlines are absolute so pacing does not drift under load.
        first = time.monotonic() + script.first_token_delay
        monotonic = time.monotonic
        for i in range(stop_slot):
            delay = first + i * pace - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if conn.paused:
                await conn.drain()
            conn.write(sse_chunk(enc.delta(i)))
            req.deltas_sent += 1
            req.delta_times.append(monotonic())
        if stop_slot < n or n == 0:
            delay = first + stop_slot * pace - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if kind == "close":
            # Graceful close flushes the deltas already written, so the client sees exactly stop_slot
            # of them and then a chunked body cut short (no terminating chunk, no [DONE]).
            conn.close_by_server(graceful=True)
        elif kind == "hang":
            await asyncio.get_running_loop().create_future()
        else:
            payload = (
                enc.error(script.error_message) if kind == "error" else enc.finish()
            )
            conn.write(sse_chunk(payload) + _TERMINATOR)
            req.completed = True

    async def _complete(
        self,
        conn: _Connection,
        req: RecordedRequest,
        rid: int,
        script: Script,
        end: bytes,
    ) -> None:
        plan = self._plan(req, script)
        n = plan.deltas
        stop_slot, kind = self._event_slot(script, n)
        # Answer when the equivalent stream would have reached its last delta or its interruption.
        delay = (
            script.first_token_delay
            + max(stop_slot - (1 if kind == "finish" and n else 0), 0) * script.pace
        )
        if delay > 0:
            await asyncio.sleep(delay)
        model = req.model or ""
        if kind == "close":
            conn.close_by_server(graceful=True)
        elif kind == "hang":
            await asyncio.get_running_loop().create_future()
        elif kind == "error":
            self._send_error(conn, req, 500, script.error_message, None, end)
        elif req.api == "anthropic":
            self._send_json(
                conn, req, 200, formats.anthropic_message(rid, model, plan), end
            )
        else:
            self._send_json(
                conn,
                req,
                200,
                formats.openai_completion(rid, model, int(time.time()), plan),
                end,
            )
