"""A small test client for the WebSocket protocol v1 on top of the `websockets` package."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection

Frame = dict[str, Any]


class StreamClient:
    """Sends v1 frames and sorts what comes back by stream id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self.by_id: dict[str, list[Frame]] = defaultdict(list)
        self.other: list[Frame] = []

    async def start(
        self, model: str, text: str = "hello", sid: str | None = None, **body: Any
    ) -> str:
        sid = sid or uuid.uuid4().hex[:8]
        request = {"model": model, "messages": [{"role": "user", "content": text}], **body}
        await self.ws.send(json.dumps({"type": "chat.start", "id": sid, "request": request}))
        return sid

    async def cancel(self, sid: str) -> None:
        await self.ws.send(json.dumps({"type": "chat.cancel", "id": sid}))

    async def next(self, timeout: float = 10) -> Frame:
        frame: Frame = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.frames.append(frame)
        if "id" in frame and frame["type"].startswith("chat."):
            self.by_id[frame["id"]].append(frame)
        else:
            self.other.append(frame)
        return frame

    async def until_terminal(self, sid: str, timeout: float = 10) -> Frame:
        """Read frames until `sid` has its terminal frame; returns it."""
        while True:
            frames = self.by_id.get(sid, [])
            if frames and frames[-1]["type"] in ("chat.done", "chat.error"):
                return frames[-1]
            await self.next(timeout)

    async def until_deltas(self, sid: str, count: int, timeout: float = 10) -> None:
        while sum(f["type"] == "chat.delta" for f in self.by_id.get(sid, [])) < count:
            await self.next(timeout)

    async def next_other(self, timeout: float = 10) -> Frame:
        """The next frame that is not a stream frame (pong, error, cancel.ignored)."""
        seen = len(self.other)
        while len(self.other) == seen:
            await self.next(timeout)
        return self.other[seen]

    def text(self, sid: str) -> str:
        return "".join(f.get("text", "") for f in self.by_id[sid] if f["type"] == "chat.delta")


class RawPeer:
    """A WebSocket peer on a bare TCP stream that reads only when told to (or never).

    The `websockets` client keeps draining the socket into memory even with a tiny
    `max_queue`, so a client that really stops reading needs the sans-I/O protocol.
    """

    def __init__(self, url: str, subprotocol: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self._url = url
        self.protocol = ClientProtocol(
            parse_uri(url),
            subprotocols=[subprotocol],  # type: ignore[list-item]
            max_size=None,
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        request = self.protocol.connect()
        host, port = self._url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.protocol.send_request(request)
        self.writer.write(b"".join(self.protocol.data_to_send()))
        self.protocol.receive_data(await self.reader.readuntil(b"\r\n\r\n"))
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    async def send(self, frame: Frame) -> None:
        from websockets.frames import Frame as WsFrame
        from websockets.frames import Opcode

        assert self.writer is not None
        self.protocol.send_frame(WsFrame(Opcode.TEXT, json.dumps(frame).encode()))
        self.writer.write(b"".join(self.protocol.data_to_send()))
        await self.writer.drain()

    async def read_until(self, wanted: Callable[[Frame], bool], timeout: float = 30) -> Frame:
        """Read (and answer nothing) until a text frame matches `wanted`."""
        from websockets.frames import Frame as WsFrame

        assert self.reader is not None

        async def scan() -> Frame:
            assert self.reader is not None
            while True:
                data = await self.reader.read(1 << 20)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self.protocol.receive_data(data)
                for event in self.protocol.events_received():
                    if isinstance(event, WsFrame) and event.opcode.name == "TEXT":
                        frame: Frame = json.loads(event.data)
                        if wanted(frame):
                            return frame

        return await asyncio.wait_for(scan(), timeout)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
