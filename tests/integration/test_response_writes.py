"""What a streamed answer costs in socket writes: the response head goes out with the first
piece of the body, and the last event with the end of the body, through a real uvicorn server
whose socket records every write (`server.guard`)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from server.app import create_app
from server.guard import GuardedHttpToolsProtocol, direct_body, direct_write
from server.settings import Settings, uvicorn_options
from tests.conftest import ENVIRON, provider_settings
from tests.fakeupstream import FakeUpstream
from tests.support.servers import serve_in_thread

Model = Callable[..., str]


class _Recording:
    """A connection's transport that records each write, and passes everything on."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _recording_protocol(writes: list[bytes]) -> type[GuardedHttpToolsProtocol]:
    class Recorded(GuardedHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_Recording(transport, writes))  # type: ignore[arg-type]

    return Recorded


@pytest.fixture
def recorded(upstream: FakeUpstream) -> Iterator[tuple[str, list[bytes]]]:
    """The gateway, and every write to its clients' sockets."""
    writes: list[bytes] = []
    settings = Settings(providers=provider_settings(upstream))
    options = uvicorn_options(settings) | {"http": _recording_protocol(writes)}
    with serve_in_thread(create_app(settings, ENVIRON), options=options) as url:
        yield url, writes


def test_a_streamed_answer_is_one_write_per_event_with_the_head_and_end_taken_along(
    recorded: tuple[str, list[bytes]], model: Model
) -> None:
    url, writes = recorded
    name = model(tokens=4)
    body = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{url}/api/chat/completions", json={**body, "stream": True})
    assert answer.status_code == 200
    events = [line for line in answer.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    first = writes[0]
    # The head, then the role chunk and the first token, in the first chunk of the body.
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in first
    head, _, rest = first.partition(b"\r\n\r\n")
    assert b'"role":"assistant"' in rest and b'"content":' in rest
    # The finish, [DONE] and the body's end together, last.
    assert writes[-1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert b'"finish_reason":"stop"' in writes[-1]
    # Nothing on its own: no bare head, no empty closing chunk.
    assert not any(w.endswith(b"\r\n\r\n") and w.startswith(b"HTTP/") for w in writes)
    assert b"0\r\n\r\n" not in writes[:-1]
    # One write per token (4), with the role chunk in the first and the finish in the last.
    assert len(writes) == 5, [w[:60] for w in writes]


def test_a_json_answer_is_one_write(recorded: tuple[str, list[bytes]], model: Model) -> None:
    url, writes = recorded
    name = model(tokens=2)
    body = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{url}/api/chat/completions", json=body)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["finish_reason"] == "stop"
        [write] = writes
        head, _, rest = write.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length" in head
        assert json.loads(rest)["object"] == "chat.completion"
        # An error answer too, and the connection is kept for the next request.
        writes.clear()
        refused = client.post(f"{url}/api/chat/completions", content=b"{not json")
        assert refused.status_code == 400 and refused.json()["error"]["type"]
        [write] = writes
        assert write.startswith(b"HTTP/1.1 400 Bad Request\r\n") and write.endswith(b"}")


def test_a_connection_closed_after_the_answer_gets_the_whole_answer_first(
    recorded: tuple[str, list[bytes]], model: Model
) -> None:
    """`connection: close` from the client: uvicorn closes after the answer; the one write
    carrying head and body goes out before the close."""
    url, writes = recorded
    name = model(tokens=2)
    body = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10, headers={"connection": "close"}) as client:
        for _ in range(2):
            answer = client.post(f"{url}/api/chat/completions", json=body)
            assert answer.status_code == 200 and answer.headers["connection"] == "close"
            assert answer.json()["choices"][0]["message"]["content"]
    assert len(writes) == 2


def test_a_head_whose_body_comes_later_is_not_held_back() -> None:
    """An app that sends its head and then waits: the client gets the head at once (within a
    turn of the loop), not with the body."""
    writes: list[bytes] = []
    head_read = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        send = direct_body(scope, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, head_read.wait, 5.0)  # the client has it
        write = direct_write(send)
        assert write is not None and write(b"late body")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    options = {"http": _recording_protocol(writes), "lifespan": "off"}
    with serve_in_thread(app, options=options) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(65536)  # times out (and fails) if the head were held
            assert got.startswith(b"HTTP/1.1 200 OK\r\n")
            head_read.set()
            while not got.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
    assert got.endswith(b"9\r\nlate body\r\n0\r\n\r\n")
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n")
    assert writes[1:] == [b"9\r\nlate body\r\n", b"0\r\n\r\n"]
