"""Lean load-generator clients: raw HTTP/1.1 SSE over asyncio, and the WebSocket protocol v1.

The SSE client parses only what it measures (status, chunked framing, content deltas), so the
same code drives the fake upstream directly and the gateway, and its own CPU cost stays small
next to what it measures. Times are `time.monotonic()`, comparable with the fake's records.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import msgspec
from websockets.asyncio.client import ClientConnection, connect

_CONTENT = b'"content":"'
_EMPTY = b'"content":""'
# Anthropic Messages events: one text delta each (an empty one never comes).
_TEXT_DELTA = b'"text_delta"'
_OUTPUT_DELTA = b"event: response.output_text.delta"
_encode = msgspec.json.Encoder().encode
SUBPROTOCOL = "tokenrelay.v1"
REFUSED = frozenset({429, 503})  # what the gateway answers at a cap or at `max_streams`


class Result:
    """One stream as the client saw it."""

    __slots__ = (
        "tag",
        "sent_at",
        "first_at",
        "arrivals",
        "chunks",
        "status",
        "done",
        "cancelled_at",
        "acked_at",
        "error",
    )

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.sent_at = 0.0
        self.first_at: float | None = None
        self.arrivals: list[float] = []
        self.chunks = 0
        self.status = 0
        self.done = False
        self.cancelled_at: float | None = None
        self.acked_at: float | None = None
        self.error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at

    @property
    def refused(self) -> bool:
        """Refused before it started: a cap (429) or a busy server (503), over either transport."""
        return self.status in REFUSED

    @property
    def duration(self) -> float | None:
        return self.arrivals[-1] - self.sent_at if self.arrivals else None

    def gaps(self) -> list[float]:
        a = self.arrivals
        return [a[i] - a[i - 1] for i in range(1, len(a))]

    def note(self, count: int) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.arrivals.append(now)
        self.chunks += count


def body(model: str, tag: str, *, stream: bool = True) -> bytes:
    """A chat request; `user` carries the tag the fake upstream records, to match streams."""
    return _encode(
        {
            "model": model,
            "messages": [{"role": "user", "content": "benchmark"}],
            "stream": stream,
            "user": tag,
        }
    )


def messages_body(model: str, tag: str, *, stream: bool = True) -> bytes:
    """The same request in Anthropic's Messages format (the tag becomes `user` upstream)."""
    return _encode(
        {
            "model": model,
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": "benchmark"}],
            "stream": stream,
            "metadata": {"user_id": tag},
        }
    )


def responses_body(model: str, tag: str, *, stream: bool = True) -> bytes:
    """The same request in OpenAI's Responses format (the tag becomes `user` upstream)."""
    return _encode({"model": model, "input": "benchmark", "stream": stream, "user": tag})


_BODIES = {"chat": body, "messages": messages_body, "responses": responses_body}
_DELTAS = {"messages": _TEXT_DELTA, "responses": _OUTPUT_DELTA}


class _HTTP(asyncio.Protocol):
    """One keep-alive connection; one response at a time, decoded incrementally."""

    def __init__(self, dialect: str = "chat") -> None:
        self.transport: asyncio.Transport | None = None
        self.dialect = dialect
        self.lost = False
        self._buf = bytearray()
        self._state = "idle"
        self._left = 0
        self._result: Result | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._cancel_after: int | None = None
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._result is not None and not self._result.done and self._result.error is None:
            if self._result.cancelled_at is None:
                self._result.error = "connection lost"
        self._finish()

    def begin(
        self, request: bytes, result: Result, cancel_after: int | None
    ) -> asyncio.Future[None]:
        assert self.transport is not None
        self._result = result
        self._cancel_after = cancel_after
        self._state = "head"
        self._buf.clear()
        self._waiter = asyncio.get_running_loop().create_future()
        result.sent_at = time.monotonic()
        self.transport.write(request)
        return self._waiter

    def _finish(self) -> None:
        self._state = "idle"
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._state == "idle":
            return
        buf = self._buf
        buf += data
        if self._state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            assert self._result is not None
            self._result.status = int(head[9:12])
            if b"transfer-encoding: chunked" in head:
                self._state = "size"
            else:
                at = head.find(b"content-length:")
                self._left = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                self._state = "fixed"
        if self._state == "fixed":
            if len(buf) >= self._left:
                self._payload(bytes(buf[: self._left]))
                self._end()
            return
        self._chunked(buf)

    def _chunked(self, buf: bytearray) -> None:
        pos = 0
        while self._state != "idle":
            if self._state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(bytes(buf[pos:end]).split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self._state = "trailer"
                else:
                    self._left, self._state = size, "data"
            elif self._state == "data":
                take = min(self._left, len(buf) - pos)
                if take <= 0:
                    break
                self._payload(bytes(buf[pos : pos + take]))
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = "crlf"
            elif self._state == "crlf":
                if len(buf) - pos < 2:
                    break
                pos += 2
                self._state = "size"
            else:  # trailer: the empty line after the last chunk
                if len(buf) - pos < 2:
                    break
                pos += 2
                self._end()
                return
        del buf[:pos]

    def _payload(self, data: bytes) -> None:
        result = self._result
        assert result is not None
        delta = _DELTAS.get(self.dialect)
        if delta is not None:
            count = data.count(delta)
        else:
            count = data.count(_CONTENT) - data.count(_EMPTY)
        if count > 0 and result.cancelled_at is None:
            result.note(count)
            if self._cancel_after is not None and result.chunks >= self._cancel_after:
                # An SSE client cancels by going away.
                result.cancelled_at = time.monotonic()
                assert self.transport is not None
                self.transport.close()

    def _end(self) -> None:
        assert self._result is not None
        self._result.done = self._result.status == 200
        if self._result.status != 200:
            self._result.error = f"status {self._result.status}"
        self._finish()


class SSEClient:
    """Requests on one keep-alive connection, reconnecting when the server closed it."""

    def __init__(
        self, host: str, port: int, path: str, *, dialect: str = "chat", headers: str = ""
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.dialect = dialect  # "chat" (Chat Completions), "messages" or "responses"
        self.headers = headers  # extra header lines, each ending in CRLF
        self._proto: _HTTP | None = None

    @classmethod
    def for_url(cls, url: str, path: str, *, dialect: str = "chat", headers: str = "") -> SSEClient:
        host, port = url.removeprefix("http://").split(":")
        return cls(host, int(port), path, dialect=dialect, headers=headers)

    async def _connection(self) -> _HTTP:
        if self._proto is None or self._proto.lost or self._proto.transport is None:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(
                lambda: _HTTP(self.dialect), self.host, self.port
            )
            self._proto = proto
        return self._proto

    async def chat(
        self, model: str, *, stream: bool = True, cancel_after: int | None = None, tag: str = ""
    ) -> Result:
        """One chat completion; with `cancel_after`, disconnect after that many deltas."""
        result = Result(tag or uuid.uuid4().hex)
        payload = _BODIES[self.dialect](model, result.tag, stream=stream)
        request = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}\r\n{self.headers}"
            f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        try:
            proto = await self._connection()
            await proto.begin(request, result, cancel_after)
        except OSError as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        if not stream and result.done:
            result.chunks = 1
        if cancel_after is not None or result.error is not None:
            self.close()
        return result

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


class _ErrorStatus(msgspec.Struct):
    status: int = 0


class _Frame(msgspec.Struct):
    type: str
    id: str | None = None
    finish_reason: str | None = None
    error: _ErrorStatus | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode
_DELTA = '{"type":"chat.delta"'


class WSClient:
    """One socket carrying several streams (protocol v1), dispatched by stream id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._streams: dict[str, tuple[Result, asyncio.Future[None], int | None]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> WSClient:
        ws = await connect(
            url.replace("http://", "ws://") + "/api/ws",
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,
            ping_interval=None,
            max_queue=None,
        )
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, str)
                frame = _decode_frame(message)
                entry = self._streams.get(frame.id or "")
                if entry is None:
                    continue
                result, waiter, cancel_after = entry
                if message.startswith(_DELTA):
                    if result.cancelled_at is None:
                        result.note(1)
                        if cancel_after is not None and result.chunks >= cancel_after:
                            result.cancelled_at = time.monotonic()
                            await self.ws.send(f'{{"type":"chat.cancel","id":"{frame.id}"}}')
                    continue
                if frame.type == "chat.done":
                    result.status = 200
                    result.done = frame.finish_reason != "cancelled"
                    if result.cancelled_at is not None:
                        result.acked_at = time.monotonic()
                else:
                    result.error = message[:200]
                    result.status = frame.error.status if frame.error is not None else 0
                del self._streams[frame.id or ""]
                if not waiter.done():
                    waiter.set_result(None)
        except Exception as exc:  # the socket died: fail what is in flight
            for result, waiter, _ in self._streams.values():
                result.error = f"socket: {exc!r}"
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            for result, waiter, _ in self._streams.values():
                result.error = result.error or "socket closed"
                if not waiter.done():
                    waiter.set_result(None)

    async def chat(self, model: str, *, cancel_after: int | None = None, tag: str = "") -> Result:
        result = Result(tag or uuid.uuid4().hex)
        request = msgspec.json.decode(body(model, result.tag))
        waiter = asyncio.get_running_loop().create_future()
        self._streams[result.tag] = (result, waiter, cancel_after)
        result.sent_at = time.monotonic()
        start = {"type": "chat.start", "id": result.tag, "request": request}
        await self.ws.send(_encode(start).decode())
        await waiter
        return result

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


Factory = Callable[[], SSEClient]
