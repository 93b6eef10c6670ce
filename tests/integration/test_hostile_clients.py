"""Hostile clients against a real gateway process: oversized heads, HTTP/1.0, floods, stalls."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx2
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.support.process import Served, serve_process
from tests.support.rawclient import (
    CONT,
    PING,
    TEXT,
    close_code,
    connect,
    endless_headers,
    read_all,
    rss_kib,
    ws_frame,
    ws_open,
)

HEAD_CAP = 16 * 1024  # the default [limits] max_header_bytes


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve_process('[server]\nlog_level = "warning"\n') as process:
        yield process


def test_a_head_just_over_the_cap_is_431_and_closed(served: Served) -> None:
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * HEAD_CAP + b"\r\n\r\n"
    with connect(served.url) as sock:
        sock.sendall(head)
        answer = read_all(sock)  # returns only when the gateway closes the connection
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"


def test_a_long_request_line_is_431(served: Served) -> None:
    with connect(served.url) as sock:
        sock.sendall(b"GET /healthz?" + b"q" * (HEAD_CAP + 10) + b" HTTP/1.1\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 431")


def test_a_head_within_the_cap_with_a_large_body_in_the_same_write_is_served(
    served: Served,
) -> None:
    body = b"x" * (HEAD_CAP * 4)
    request = (
        b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
    )
    with connect(served.url) as sock:
        sock.sendall(request)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]  # read whole, then refused as JSON


def test_endless_headers_are_cut_off_with_memory_flat(served: Served) -> None:
    """Four connections at once each try to send 32 MB of header lines that never end."""
    before = rss_kib(served.proc.pid)
    block = (b"x-pad: " + b"a" * 1017 + b"\r\n") * 64  # 64 lines of 1 KiB
    offered = 32 * 1024 * 1024
    attempts = [endless_headers(served.url, offered, block) for _ in range(4)]
    try:
        grown_mib = (rss_kib(served.proc.pid) - before) / 1024  # all four still connected
        answers = [read_all(sock) if sent < offered else b"" for sock, sent in attempts]
    finally:
        for sock, _ in attempts:
            sock.close()
    sent = [sent for _, sent in attempts]
    # The gateway stopped reading near the cap: what got through is what the socket buffers
    # held when it closed, far from the 32 MB offered.
    assert max(sent) < 8 * 1024 * 1024, sent
    assert grown_mib < 24, f"the gateway grew by {grown_mib:.0f} MiB"
    assert all(a == b"" or a.startswith(b"HTTP/1.1 431") for a in answers)
    assert served.proc.poll() is None


def test_http_1_0_streams_are_close_delimited_not_chunked(served: Served) -> None:
    body = json.dumps(
        {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    request = (
        b"POST /api/chat/completions HTTP/1.0\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )
    with connect(served.url) as sock:
        sock.sendall(request)
        answer = read_all(sock)  # the end of the body is the connection closing
    head, _, payload = answer.partition(b"\r\n\r\n")
    headers = head.lower().split(b"\r\n")
    assert headers[0].split()[1] == b"200", head
    assert not any(h.startswith(b"transfer-encoding") for h in headers), head
    assert not any(h.startswith(b"content-length") for h in headers), head
    events = [e for e in payload.split(b"\n\n") if e]
    assert events, payload
    assert all(e.startswith((b"data: ", b":")) for e in events), payload[:300]
    assert events[-1] == b"data: [DONE]"


def test_http_1_0_fixed_length_answers_keep_their_length(served: Served) -> None:
    with connect(served.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = read_all(sock)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(payload) in head.lower()
    assert b"transfer-encoding" not in head.lower()


def flood_while_measuring(served: Served, payload: bytes) -> tuple[int | None, list[float]]:
    """Send `payload` on one socket while timing /healthz from another client."""
    latencies: list[float] = []
    with ws_open(served.url) as sock:

        def flood() -> None:
            try:
                sock.sendall(payload)
            except OSError:
                pass  # the gateway closed the socket mid-flood, as it should

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        with httpx2.Client(timeout=30) as http:
            for _ in range(10):
                began = time.monotonic()
                assert http.get(served.url + "/healthz").status_code == 200
                latencies.append(time.monotonic() - began)
        flooder.join(timeout=30)
        code = close_code(sock)
    return code, latencies


def test_a_message_in_a_million_continuation_frames_is_cut_off(served: Served) -> None:
    payload = ws_frame(TEXT, b"{", fin=False) + ws_frame(CONT, b" ", fin=False) * 1_000_000
    code, latencies = flood_while_measuring(served, payload)
    assert code == 1008
    # Loose: the other client was answered throughout (unmetered, this flood stalls the
    # gateway for seconds; metered, /healthz answers in milliseconds).
    assert max(latencies) < 2.0, latencies


def test_a_ping_flood_is_cut_off(served: Served) -> None:
    code, latencies = flood_while_measuring(served, ws_frame(PING, b"p") * 1_000_000)
    assert code == 1008
    assert max(latencies) < 2.0, latencies


def test_a_message_in_more_fragments_than_allowed_is_refused(served: Served) -> None:
    with ws_open(served.url) as sock:
        sock.sendall(
            ws_frame(TEXT, b"{", fin=False)
            + ws_frame(CONT, b" ", fin=False) * 16
            + ws_frame(CONT, b"}")
        )
        assert close_code(sock) == 1008


def test_a_message_in_a_few_fragments_is_fine(served: Served) -> None:
    with ws_open(served.url) as sock:
        sock.sendall(
            ws_frame(TEXT, b'{"type"', fin=False)
            + ws_frame(CONT, b':"pi', fin=False)
            + ws_frame(CONT, b'ng"}')
        )
        answer = sock.recv(4096)
        assert b'"pong"' in answer, answer


def test_invalid_utf8_closes_1007_and_logs_one_line(served: Served) -> None:
    with ws_open(served.url) as sock:
        sock.sendall(ws_frame(TEXT, b'{"type": "\xff\xfe"}'))
        assert close_code(sock) == 1007
    deadline = time.monotonic() + 10
    while "not UTF-8" not in served.log and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in served.log.splitlines() if "UTF-8" in line]
    assert lines and all(" WARNING " in line for line in lines), served.log
    assert "Traceback" not in served.log and " ERROR " not in served.log


# Clients that never read: their streams must end and give their key's slots back.
BIG = {"text": ["x" * 2000] * 5000}  # 10 MB of answer, more than every socket buffer holds


@pytest.fixture
def stalled(upstream: FakeUpstream) -> Iterator[tuple[Served, str]]:
    """A gateway allowing 3 streams per client, cutting off a client that reads nothing for 1 s."""
    name = f"big-{uuid.uuid4().hex[:8]}"
    upstream.scripts[name] = Script(**BIG)  # type: ignore[arg-type]
    config = (
        'demo = false\n[server]\nslow_consumer_timeout = 1.0\nlog_level = "warning"\n'
        "[limits]\nstreams_per_address = 3\n"
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\n'
    )
    with serve_process(config, env={"UPSTREAM_KEY": UPSTREAM_KEY}) as process:
        yield process, f"oai/{name}"


def never_reading(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def chat_body(model: str) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()


def wait_for_a_free_slot(url: str, model: str) -> float:
    """Seconds until a new stream is admitted (fails after a generous 60 s)."""
    began = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    with httpx2.Client(timeout=30) as http:
        while time.monotonic() - began < 60:
            with http.stream("POST", url + "/api/chat/completions", json=body) as response:
                if response.status_code != 429:
                    assert response.status_code == 200
                    return time.monotonic() - began
                assert b"too_many_streams" in response.read()
            time.sleep(0.25)
    raise AssertionError("the stalled clients' stream slots were never released")


def test_sse_clients_that_never_read_lose_their_streams_and_slots(
    stalled: tuple[Served, str],
) -> None:
    served, model = stalled
    body = chat_body(model)
    sockets = []
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    for _ in range(3):
        sock = never_reading(socket.socket())
        sock.connect((host, int(port)))
        sock.sendall(
            b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        sockets.append(sock)
    try:
        released = wait_for_a_free_slot(served.url, model)
    finally:
        for sock in sockets:
            sock.close()
    print(f"slots released after {released:.1f} s")
    assert released < 60


def test_websocket_clients_that_never_read_lose_their_streams_and_slots(
    stalled: tuple[Served, str],
) -> None:
    served, model = stalled
    start = {"type": "chat.start", "id": "s", "request": json.loads(chat_body(model))}
    sockets = []
    try:
        for _ in range(3):
            sock = ws_open(served.url)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(ws_frame(TEXT, json.dumps(start).encode()))
            sockets.append(sock)
        released = wait_for_a_free_slot(served.url, model)
    finally:
        for sock in sockets:
            sock.close()
    print(f"slots released after {released:.1f} s")
    assert released < 60


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_is_believed_only_from_listed_proxies(trusted: bool) -> None:
    config = "[limits]\nrequests_per_minute = 2\n"
    if trusted:
        config += '[server]\nforwarded_allow_ips = ["127.0.0.1"]\n'
    with serve_process(config) as process, httpx2.Client(timeout=10) as http:
        statuses = [
            http.get(
                process.url + "/api/models", headers={"x-forwarded-for": f"198.51.100.{i}"}
            ).status_code
            for i in range(4)
        ]
    # Untrusted, the header is ignored: one client, over its limit from the third request. From
    # a listed proxy, each forwarded address has a bucket of its own.
    assert statuses == ([200] * 4 if trusted else [200, 200, 429, 429])


# The smaller findings.
def ws_frames(sock: socket.socket, until: bytes, limit: float = 10.0) -> bytes:
    """Raw bytes from the socket until `until` appears in them (or the time limit)."""
    data = b""
    deadline = time.monotonic() + limit
    sock.settimeout(0.5)
    while until not in data and time.monotonic() < deadline:
        try:
            data += sock.recv(65536)
        except TimeoutError:
            pass
    return data


def test_a_second_cancel_while_cancelling_is_answered(served: Served) -> None:
    start = {
        "type": "chat.start",
        "id": "s",
        "request": {"model": "demo/echo", "messages": [{"role": "user", "content": "a b " * 400}]},
    }
    cancel = ws_frame(TEXT, b'{"type": "chat.cancel", "id": "s"}')
    with ws_open(served.url) as sock:
        sock.sendall(ws_frame(TEXT, json.dumps(start).encode()))
        assert b'"chat.delta"' in ws_frames(sock, b'"chat.delta"')
        sock.sendall(cancel + cancel)
        data = ws_frames(sock, b'"cancel.ignored"')
        data += ws_frames(sock, b'"finish_reason":"cancelled"')
    assert b'"cancel.ignored"' in data and b'"finish_reason":"cancelled"' in data
    assert data.count(b'"chat.done"') == 1


@pytest.mark.parametrize(
    "request_text",
    [
        '{"model": "demo/echo", "messages": [], "temperature": NaN}',
        '{"model": "demo/echo", "messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"model": "demo/echo", "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
)
def test_a_broken_request_in_a_start_fails_that_stream_as_rest_would(
    served: Served, request_text: str
) -> None:
    frame = '{"type": "chat.start", "id": "s1", "request": ' + request_text + "}"
    with ws_open(served.url) as sock:
        sock.sendall(ws_frame(TEXT, frame.encode()))
        data = ws_frames(sock, b"}}")
    answer = json.loads(data[data.index(b"{") :])
    assert answer["type"] == "chat.error" and answer["id"] == "s1", answer
    assert answer["error"]["code"] == "invalid_request"
    # REST says the same of the same request.
    rest = httpx2.post(
        served.url + "/api/chat/completions",
        content=request_text.encode(),
        headers={"content-type": "application/json"},
    )
    assert rest.status_code == 400 and rest.json()["error"]["code"] == "invalid_request"


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Served, str]]:
    from server.auth import digest, new_key

    key = new_key()
    with serve_process(f'[server]\nlog_level = "warning"\n[auth]\nkeys = ["{digest(key)}"]\n') as p:
        yield p, key


def test_a_401_names_the_bearer_scheme(keyed: tuple[Served, str]) -> None:
    served, _ = keyed
    response = httpx2.get(served.url + "/api/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_handshake_offering_only_the_auth_subprotocol_is_refused(
    keyed: tuple[Served, str],
) -> None:
    served, key = keyed
    auth = "tokenrelay.auth." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    with connect(served.url) as sock:
        sock.sendall(
            b"GET /api/ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: %s\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-protocol: %s\r\n\r\n"
            % (base64.b64encode(os.urandom(16)), auth.encode())
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 403"), answer
