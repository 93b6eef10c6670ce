"""uvicorn's sans-I/O websockets protocol with every frame metered.

The app sees whole messages only, so a budget it keeps cannot see what costs the event loop
most: a message split into thousands of one-byte continuation frames, or a flood of pings (each
answered with a pong). Here every frame a client sends (data, continuation, ping, pong) takes
one from the socket's `ws_frames_per_second` budget (a token bucket with a one-second burst),
and a message may have at most `max_fragments` frames; past either, the socket is closed with
1008 and the rest of what was received is discarded unparsed. A text message that is not
UTF-8 closes the socket with 1007 and is logged as the client's error, on one line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from server.guard import ABORT, DIRECT, WeakCall, WeakWriters, Writers, settings_of
from server.limits import FrameMeter

log = logging.getLogger("tokenrelay.ws")
LINGER = 2.0  # seconds a failed socket keeps reading (and dropping) before it is reset


# A final, unmasked text frame's header, by payload size, for payloads under 126 bytes.
_HEADS = [bytes((0x81, size)) for size in range(126)]


class FrameLimitError(Exception):
    """A client sent frames faster, or a message in more pieces, than allowed."""


class MeteredServerProtocol(ServerProtocol):
    """websockets' server protocol, counting every frame before it is handled."""

    def __init__(self, frames_per_second: int, max_fragments: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._meter = FrameMeter(frames_per_second)
        self._max_fragments = max_fragments
        self._fragments = 0

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is not Opcode.CLOSE:
            problem = self._problem(frame)
            if problem is not None:
                # Stops the parser: what is left of this read and every later one is discarded.
                self.fail(1008, problem)
                self.parser_exc = FrameLimitError(problem)
                return
        super().recv_frame(frame)

    def _problem(self, frame: Frame) -> str | None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            self._fragments = 0 if frame.fin else 1
        elif frame.opcode is Opcode.CONT:
            self._fragments += 1
            if self._fragments > self._max_fragments:
                return "too many fragments in one message"
            if frame.fin:
                self._fragments = 0
        if not self._meter.allow():
            return "too many frames per second"
        return None


class MeteredWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with metered frames and one-line UTF-8 errors."""

    # Defaults; a connection takes the served app's `[limits] ws_frames_per_second` and
    # `[websocket] max_fragments`.
    frames_per_second: int = 50
    max_fragments: int = 16

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = settings_of(self.app)
        if settings is not None:
            self.frames_per_second = settings.limits.ws_frames_per_second
            self.max_fragments = settings.websocket.max_fragments
        self.conn = MeteredServerProtocol(
            self.frames_per_second,
            self.max_fragments,
            extensions=self.conn.available_extensions,
            max_size=config.ws_max_size,
            logger=logging.getLogger("uvicorn.error"),
        )

    _linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._linger is None:
            super().data_received(data)
        # else: the socket failed; what the client still sends is dropped without parsing.

    def handle_parser_exception(self) -> None:
        """Fail the socket: the close frame goes out, then a lingering close.

        Closing at once, while the client is still sending, makes the kernel answer with a
        reset, and a client may then never read the close frame and its code. So the write
        side is shut and what still arrives is dropped unparsed, for at most `LINGER` seconds.
        """
        assert self.conn.close_sent is not None
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.stop_keepalive()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = self.loop.call_later(LINGER, self.transport.abort)
        # uvicorn closes the transport when the app returns unless a close timer is pending;
        # that close would come while the client is still sending, i.e. as a reset.
        self.close_timer = self._linger

    async def send(self, message: ASGISendEvent) -> None:
        if self._linger is not None:
            # Failed here: the app's writes go nowhere, and its own close is already done.
            if message["type"] == "websocket.close":
                return
            raise ClientDisconnected()
        await super().send(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()  # it is the close timer, too
        super().connection_lost(exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # The ASGI types want a dict per extension; ours are objects (see `server.guard`).
            extensions = self.scope["extensions"]
            extensions[ABORT] = WeakCall(self._abort)  # type: ignore[assignment]
            extensions[DIRECT] = WeakWriters(self, _socket_writers)  # type: ignore[assignment]

    def _abort(self) -> None:
        self.transport.abort()

    def write_text(self, text: str) -> bool:
        """Write one text message as a single frame, now; False when it must go through `send`
        (a compressed socket, a full buffer, a closing or failed socket), which waits or
        raises as it should. A server's frames are unmasked, so a frame is a header and the
        payload: the same bytes the sans-I/O protocol would make, without a trip through it.
        """
        if (
            self.conn.extensions  # per-message deflate: the protocol compresses
            or self.disconnected
            or self.close_sent
            or self._linger is not None
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.conn.expect_continuation_frame
        ):
            return False
        data = text.encode()
        size = len(data)
        if size < 126:
            head = _HEADS[size]
        elif size < 65536:
            head = b"\x81\x7e" + size.to_bytes(2, "big")
        else:
            head = b"\x81\x7f" + size.to_bytes(8, "big")
        self.transport.write(head + data)
        return True

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
                log.warning(
                    "websocket closed: a text message is not UTF-8",
                    extra={"fields": {"client": client, "close_code": 1007}},
                )
                self.conn.fail(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()


def _socket_writers(protocol: MeteredWebSocketProtocol) -> Writers:
    return protocol.send, protocol.write_text, None  # type: ignore[return-value]
