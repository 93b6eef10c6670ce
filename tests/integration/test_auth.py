"""Gateway keys and origins: every route, every spelling of its path, every header variant."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx2
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.auth import digest, new_key
from server.settings import AuthSettings
from tests.fakeupstream import FakeUpstream
from tests.support.gateways import gateway_with

KEY = new_key()
OTHER = new_key()  # a second configured key
REVOKED = new_key()  # was valid once: its digest is no longer configured
SUBPROTOCOL = "tokenrelay.v1"
CHAT = b'{"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    auth = AuthSettings(keys=[digest(KEY), digest(OTHER)], origins=["https://chat.example.com"])
    with gateway_with(upstream, auth=auth) as url:
        yield url


def variants(path: str) -> list[str]:
    """Spellings of `path` that a router or a proxy might treat as the same route."""
    tail = path[1:]
    return [
        path,
        "/" + path,
        "//" + tail.replace("/", "//"),
        path.upper(),
        path.title(),
        path + "/",
        path + "//",
        "/" + tail.replace("/", "%2F"),
        "/" + tail.replace("/", "%2f"),
        "/" + tail.replace("/", "%252F"),
        path.replace("a", "%61"),
        "/./" + tail,
        "/healthz/../" + tail,
        "/healthz/%2E%2E/" + tail,
        path + "?x=1",
        path + "#frag",
        path + ";x",
    ]


async def raw(
    url: str, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the request target exactly as given; status and raw response."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(response.split(b" ", 2)[1]), response


ROUTES = [
    ("GET", "/api/models"),
    ("POST", "/api/chat/completions"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/ws"),
    ("GET", "/metrics"),
    ("GET", "/api/no-such-route"),
    ("POST", "/api/v1/messages"),
    ("POST", "/api/v1/messages/count_tokens"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "credentials",
    [
        [],
        [("Authorization", f"Bearer {REVOKED}")],
        [("Authorization", "Bearer ")],
        [("Authorization", KEY)],
        [("Authorization", f"Basic {base64.b64encode(KEY.encode()).decode()}")],
        [("Authorization", f"Token {KEY}")],
        [("Authorization", f"Bearer {KEY} extra")],
        [("Authorization", f"Bearer {KEY}x")],
        [("X-Api-Key", REVOKED)],
        [("X-Api-Key", KEY), ("Authorization", f"Bearer {OTHER}")],
        [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {REVOKED}")],
        [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {OTHER}")],
        [("Authorization", f"Bearer {REVOKED}"), ("Authorization", f"Bearer {KEY}")],
    ],
    ids=lambda c: "+".join(k + ":" + v.split(" ")[0][:6] for k, v in c) or "none",
)
async def test_every_route_and_spelling_refuses_a_bad_key(
    gateway: str, method: str, path: str, credentials: list[tuple[str, str]]
) -> None:
    for target in variants(path):
        status, response = await raw(gateway, method, target, credentials, CHAT)
        assert status == 401, (target, response[:300])
        # The Messages API answers in Anthropic's error shape.
        assert (
            b'"code":"invalid_api_key"' in response or b'"type":"authentication_error"' in response
        )
        assert KEY.encode() not in response and REVOKED.encode() not in response


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {KEY}",
        f"bearer {KEY}",
        f"BEARER {KEY}",
        f"Bearer   {KEY}",
        f"Bearer {OTHER}",
        "x-api-key",  # as Anthropic's clients send it
    ],
)
async def test_a_valid_key_is_let_in(gateway: str, header: str) -> None:
    name, value = ("x-api-key", KEY) if header == "x-api-key" else ("Authorization", header)
    async with httpx2.AsyncClient(base_url=gateway, headers={name: value}) as http:
        assert (await http.get("/api/models")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/api/openapi.json")).status_code == 200
        answer = await http.post("/api/chat/completions", content=CHAT)
        assert answer.status_code == 200, answer.text


async def test_health_stays_public(gateway: str) -> None:
    async with httpx2.AsyncClient(base_url=gateway) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_the_sdk_key_is_the_gateway_key(gateway: str) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key=KEY, max_retries=0) as ok:
        assert (await ok.models.list()).data
    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key=REVOKED, max_retries=0) as no:
        with pytest.raises(openai.AuthenticationError):
            await no.models.list()


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://") + "/api/ws"


def auth_protocol(key: str) -> str:
    return "tokenrelay.auth." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


async def ws_status(url: str, **options: object) -> int:
    """The handshake's HTTP status (101 when the socket opened)."""
    try:
        async with connect(ws_url(url), open_timeout=10, **options) as ws:  # type: ignore[arg-type]
            await ws.send('{"type":"ping"}')
            assert await asyncio.wait_for(ws.recv(), 10) == '{"type":"pong"}'
            return 101
    except InvalidStatus as exc:
        assert KEY.encode() not in exc.response.body
        return exc.response.status_code


async def test_websocket_with_a_bearer_header(gateway: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    assert await ws_status(gateway, additional_headers=headers) == 101
    assert (
        await ws_status(gateway, additional_headers={"Authorization": f"Bearer {REVOKED}"}) == 401
    )
    assert await ws_status(gateway) == 401


async def test_browser_websocket_key_in_a_subprotocol(gateway: str) -> None:
    offered = [SUBPROTOCOL, auth_protocol(KEY)]
    async with connect(ws_url(gateway), subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == SUBPROTOCOL  # the key is never echoed back
        assert ws.response is not None
        assert KEY not in str(ws.response.headers)
    for bad in (REVOKED, "", "not base64 !"):
        entry = auth_protocol(bad) if bad != "not base64 !" else "tokenrelay.auth.***"
        status = await ws_status(gateway, subprotocols=[SUBPROTOCOL, entry])
        assert status == 401
    # Two different keys at once are refused, whichever is valid.
    both = [SUBPROTOCOL, auth_protocol(KEY), auth_protocol(REVOKED)]
    assert await ws_status(gateway, subprotocols=both) == 401
    header = {"Authorization": f"Bearer {REVOKED}"}
    assert (
        await ws_status(
            gateway, subprotocols=[SUBPROTOCOL, auth_protocol(KEY)], additional_headers=header
        )
        == 401
    )


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://chat.example.com", 101),  # listed
        ("https://evil.example.com", 403),
        ("https://chat.example.com.evil.test", 403),
        ("http://chat.example.com", 403),  # scheme differs
        ("https://chat.example.com:444", 403),
        ("null", 403),
        ("SELF", 101),  # the server's own origin
        ("SELF-REBOUND", 403),  # DNS rebinding: same-origin by name, but not our address
    ],
)
async def test_websocket_origin_allow_list(gateway: str, origin: str, status: int) -> None:
    netloc = urlsplit(gateway).netloc
    headers = {"Authorization": f"Bearer {KEY}"}
    if origin == "SELF":
        origin = f"http://{netloc}"
    elif origin == "SELF-REBOUND":
        origin = f"http://rebound.test:{urlsplit(gateway).port}"
        headers["Host"] = f"rebound.test:{urlsplit(gateway).port}"
    assert await ws_status(gateway, origin=origin, additional_headers=headers) == status


async def test_foreign_origin_is_refused_before_the_key_is_checked(gateway: str) -> None:
    options = {
        "origin": "https://evil.example.com",
        "subprotocols": [SUBPROTOCOL, auth_protocol(KEY)],
    }
    assert await ws_status(gateway, **options) == 403


async def test_open_gateway_refuses_cross_site_requests(upstream: FakeUpstream) -> None:
    """Without keys, a page elsewhere must not be able to spend credit with a simple POST."""
    with gateway_with(upstream) as url:
        netloc = urlsplit(url).netloc
        foreign = [("Origin", "https://evil.example.com")]
        status, _ = await raw(url, "POST", "/api/chat/completions", foreign, CHAT)
        assert status == 403
        own = [("Origin", f"http://{netloc}")]
        assert (await raw(url, "POST", "/api/chat/completions", own, CHAT))[0] == 200
        assert (await raw(url, "POST", "/api/chat/completions", [], CHAT))[0] == 200
        assert await ws_status(url, origin="https://evil.example.com") == 403
        assert await ws_status(url, origin=f"http://{netloc}") == 101


async def test_no_permissive_cors(gateway: str) -> None:
    preflight = [
        ("Origin", "https://chat.example.com"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "authorization"),
    ]
    _, response = await raw(gateway, "OPTIONS", "/api/chat/completions", preflight)
    assert b"access-control-allow" not in response.lower()
    headers = [("Authorization", f"Bearer {KEY}"), ("Origin", "https://evil.example.com")]
    _, response = await raw(gateway, "GET", "/api/models", headers)
    assert b"access-control-allow" not in response.lower()


@pytest.mark.parametrize(("host", "status"), [("localhost", 101), ("rebound.test", 403)])
async def test_dns_rebinding_is_not_same_origin(gateway: str, host: str, status: int) -> None:
    port = urlsplit(gateway).port
    upgrade = [
        ("Host", f"{host}:{port}"),
        ("Origin", f"http://{host}:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", f"{SUBPROTOCOL}, {auth_protocol(KEY)}"),
    ]
    parts = urlsplit(gateway)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        request = "GET /api/ws HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in upgrade)
        writer.write((request + "\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert int(head.split(b" ", 2)[1]) == status
    assert KEY.encode() not in head


async def test_security_headers_on_every_response(gateway: str) -> None:
    async with httpx2.AsyncClient(base_url=gateway) as http:
        for response in (await http.get("/healthz"), await http.get("/api/models")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
