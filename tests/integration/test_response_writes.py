"""What a streamed answer costs in socket writes: the response head goes out with the first
piece of the body, and the last event with the end of the body, through a real uvicorn server
whose socket records every write (`server.guard`); and what holding the head must not change."""

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
from tests.support.rawclient import connect, read_all
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


def test_an_answer_of_known_length_is_written_as_uvicorn_writes_it(
    recorded: tuple[str, list[bytes]], model: Model
) -> None:
    """A JSON answer's head is not held: its body comes whole through `send`, and holding the
    head for it would cost more than the write it saves."""
    url, writes = recorded
    name = model(tokens=2)
    body = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{url}/api/chat/completions", json=body)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["finish_reason"] == "stop"
        head, rest = writes
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length" in head
        assert head.endswith(b"\r\n\r\n") and json.loads(rest)["object"] == "chat.completion"
        writes.clear()
        refused = client.post(f"{url}/api/chat/completions", content=b"{not json")
        assert refused.status_code == 400 and refused.json()["error"]["type"]
        head, rest = writes
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and rest.endswith(b"}")


def test_an_empty_streamed_answer_is_one_write(
    recorded: tuple[str, list[bytes]], model: Model
) -> None:
    """No token: the role chunk and the finish are the first and last piece, sent through
    `send` with the body's end, and the held head goes with them."""
    url, writes = recorded
    name = model(tokens=0)
    body = {"model": f"oai/{name}", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10, headers={"connection": "close"}) as client:
        for _ in range(2):  # a new connection each time, closed after the answer
            answer = client.post(f"{url}/api/chat/completions", json={**body, "stream": True})
            assert answer.status_code == 200 and answer.headers["connection"] == "close"
            assert answer.text.endswith("data: [DONE]\n\n")
    assert len(writes) == 2
    for write in writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n") and b'"role":"assistant"' in write
        assert write.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


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


@pytest.mark.parametrize(
    "kind", ["HTTP/1.0 keep-alive, JSON", "HTTP/1.1 close, an empty streamed answer"]
)
def test_a_request_pipelined_behind_a_closing_answer_is_never_run(
    upstream: FakeUpstream, model: Model, kind: str
) -> None:
    """A second request sent right behind one whose answer closes the connection (uvicorn
    answers HTTP/1.0 with `connection: close`; a client may ask for it) must reach neither the
    app nor the upstream: the protocol decides that from the socket's closing when the answer
    ends, also when the answer's head was held for its body."""
    settings = Settings(providers=provider_settings(upstream))
    streamed = "streamed" in kind
    name = model(tokens=0 if streamed else 2)
    body = json.dumps(
        {
            "model": f"oai/{name}",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": streamed,
        }
    ).encode()
    version, connection = (b"1.1", b"close") if streamed else (b"1.0", b"keep-alive")
    request = (
        b"POST /api/chat/completions HTTP/%s\r\nhost: x\r\nconnection: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (version, connection, len(body), body)
    )
    app = create_app(settings, ENVIRON)
    paths: list[str] = []

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            paths.append(scope["path"])
        await app(scope, receive, send)

    with serve_in_thread(counting, options=uvicorn_options(settings)) as url:
        with connect(url) as sock:
            sock.sendall(request + request)
            got = read_all(sock)
    assert got.count(b"HTTP/1.1 200") == 1 and b"connection: close" in got
    assert paths == ["/api/chat/completions"]
    assert len(upstream.by_model(name)) == 1


@pytest.mark.parametrize("path", ["/raise", "/return"])
def test_an_app_that_fails_right_after_the_head_still_sends_the_head(path: str) -> None:
    """A streamed answer's head is held for its body; an app that raises, or returns, right
    after it still gets its status line out before uvicorn closes the connection."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["path"] == "/raise":
            raise RuntimeError("failed after the head")

    options = {"http": GuardedHttpToolsProtocol, "lifespan": "off", "log_level": "critical"}
    with serve_in_thread(app, options=options) as url:
        with connect(url) as sock:
            sock.sendall(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path.encode())
            got = read_all(sock)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in got


def test_a_request_pipelined_behind_a_held_head_and_a_closing_answer_is_never_run() -> None:
    """An app's chunked answer that closes the connection (`connection: close`), its body
    through `send` right after the held head: uvicorn closes after it, and decides from that
    close not to run the request pipelined behind it. The close is replayed after the real
    write, so the end-of-response callback must come after both."""
    paths: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        paths.append(scope["path"])
        headers = [(b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"closing", "more_body": False})

    options = {"http": GuardedHttpToolsProtocol, "lifespan": "off"}
    with serve_in_thread(app, options=options) as url:
        with connect(url) as sock:
            sock.sendall(
                b"GET /first HTTP/1.1\r\nhost: x\r\n\r\nGET /second HTTP/1.1\r\nhost: x\r\n\r\n"
            )
            got = read_all(sock)
        threading.Event().wait(0.2)  # a second request would have reached the app by now
    assert got.count(b"HTTP/1.1 200 OK") == 1 and got.endswith(b"7\r\nclosing\r\n0\r\n\r\n")
    assert paths == ["/first"]
