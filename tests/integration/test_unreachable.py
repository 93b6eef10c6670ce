"""An upstream that cannot be reached says why: in the log line, to the client and in /readyz."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import httpx2
import pytest

from tests.support.process import free_port, serve_process

HELLO = [{"role": "user", "content": "hello"}]


def refused(ports: dict[str, str]) -> tuple[str, str]:
    port = free_port()  # bound once and released: nothing listens there
    return f"http://127.0.0.1:{port}/v1", f"127.0.0.1:{port}"


def unknown_host(ports: dict[str, str]) -> tuple[str, str]:
    # A name the resolver library refuses itself (a label may not start with '-'), so the
    # lookup fails on this machine without a query going to any name server.
    return "http://-tokenrelay-upstream-.invalid:8080/v1", "-tokenrelay-upstream-.invalid:8080"


@contextlib.contextmanager
def plain_http_server() -> Iterator[str]:
    """A plain-HTTP server on loopback that answers anything, a TLS hello too, with a 400."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture(scope="module")
def plain_port() -> Iterator[str]:
    with plain_http_server() as address:
        yield address


@pytest.fixture(scope="module")
def full_backlog() -> Iterator[str]:
    """A loopback port whose accept queue is full: a new connection is never answered."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    held = socket.create_connection(listener.getsockname())  # fills the queue; never accepted
    try:
        yield address
    finally:
        held.close()
        listener.close()


def tls_to_plain_port(ports: dict[str, str]) -> tuple[str, str]:
    return f"https://{ports['plain']}/v1", ports["plain"]


def never_accepted(ports: dict[str, str]) -> tuple[str, str]:
    return f"http://{ports['full']}/v1", ports["full"]


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        (refused, "connection refused"),
        (unknown_host, "DNS failure"),
        (tls_to_plain_port, "TLS failure"),
        (never_accepted, "connect timeout"),
    ],
)
@pytest.mark.parametrize("transport", ["lean", "httpx"])
def test_unreachable_upstream_says_why(
    plain_port: str,
    full_backlog: str,
    where: Callable[[dict[str, str]], tuple[str, str]],
    cause: str,
    transport: str,
) -> None:
    base_url, address = where({"plain": plain_port, "full": full_backlog})
    config = (
        'demo = false\n[server]\nlog_format = "json"\n'
        f'[[providers]]\nname = "openai"\nkind = "openai"\nbase_url = "{base_url}"\n'
        f'retries = 1\nretry_backoff = 0.01\nconnect_timeout = 0.5\ntransport = "{transport}"\n'
    )
    with serve_process(config) as process:
        for stream in (False, True):
            response = httpx2.post(
                process.url + "/api/chat/completions",
                json={"model": "openai/gpt-x", "messages": HELLO, "stream": stream},
                timeout=30,
            )
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "upstream_unavailable"
            assert error["message"] == f"openai: upstream unreachable ({cause})"
            assert address not in response.text
        ready = httpx2.get(process.url + "/readyz", timeout=30)
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["providers"] == {"openai": "unreachable"}
        assert checks["provider_errors"] == {"openai": f"openai: upstream unreachable ({cause})"}
        assert address not in ready.text
    lines = [json.loads(line) for line in process.log.splitlines() if line.startswith("{")]
    streams = [line for line in lines if line.get("message") == "stream"]
    assert len(streams) == 2
    for line in streams:
        assert (line["provider"], line["upstream"], line["cause"]) == ("openai", address, cause)
    retries = [line for line in lines if line.get("message") == "retrying upstream"]
    assert len(retries) == 2
    for line in retries:
        assert (line["error"], line["upstream"], line["cause"]) == (
            "upstream_unavailable",
            address,
            cause,
        )
    [listing] = [line for line in lines if line.get("message") == "could not list models"]
    assert (listing["provider"], listing["upstream"], listing["cause"]) == (
        "openai",
        address,
        cause,
    )
    assert listing["error"] == f"openai: upstream unreachable ({cause})"  # said once, not twice
