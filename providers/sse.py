"""A minimal server-sent-events decoder over raw bytes, for the upstream streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2


class SSEDecoder:
    """Turns a byte stream into `(event, data)` pairs; comments and ids are ignored.

    Works on bytes so that each event's data goes straight to msgspec without a text
    decode; lines may end in LF or CRLF (the upstreams we speak to never use lone CR).
    """

    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        """Add bytes; return the events they complete."""
        if (
            not self._buffer
            and not self._data
            and self._event is None
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk[-3:-2] != b"\r"
        ):
            # The usual case: a read that holds exactly one one-line `data:` event.
            return [(None, chunk[6:-2])]
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        events: list[tuple[bytes | None, bytes]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                    events.append((self._event, data))
                    self._data = []
                self._event = None
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
        return events


def body_chunks(response: httpx2.Response) -> AsyncIterator[bytes]:
    """A streamed body's bytes as they arrive.

    Straight from the transport's stream (which already maps transport errors) when the body
    is not content-encoded: `Response.aiter_bytes()` would add a decoder and a chunker, two
    generator layers on every chunk of every stream, to do nothing.
    """
    for name, value in response.headers.raw:  # not `.get()`, which decodes every header first
        if name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return response.aiter_bytes()
    stream = response.stream
    if isinstance(stream, httpx2.AsyncByteStream):
        return stream.__aiter__()
    return response.aiter_bytes()
