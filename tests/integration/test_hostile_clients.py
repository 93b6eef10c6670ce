"""Hostile clients against a real gateway process: oversized heads, HTTP/1.0, floods, stalls."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.process import Served, serve_process

HEAD_CAP = 16 * 1024  # the default [limits] max_header_bytes


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve_process('[server]\nlog_level = "warning"\n') as process:
        yield process


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


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
    """Four connections each try to send 32 MB of header lines that never end."""
    before = rss_kib(served.proc.pid)
    line = b"x-pad: " + b"a" * 1017 + b"\r\n"  # 1 KiB
    block = line * 64
    sent_per_connection = []
    answers = []
    for _ in range(4):
        sent = 0
        with connect(served.url, timeout=5) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
                while sent < 32 * 1024 * 1024:
                    sock.sendall(block)
                    sent += len(block)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            answers.append(read_all(sock) if sent < 32 * 1024 * 1024 else b"")
        sent_per_connection.append(sent)
    grown_mib = (rss_kib(served.proc.pid) - before) / 1024
    # The gateway stopped reading near the cap: what got through is what the socket buffers
    # held when it closed, far from the 32 MB offered.
    assert max(sent_per_connection) < 8 * 1024 * 1024, sent_per_connection
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
