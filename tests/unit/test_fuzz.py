"""Random and malformed input into the REST and WebSocket decoders, through the real ASGI app.

Property: whatever arrives, the answer is a 4xx (or a 200 for what happens to be valid), a
WebSocket error frame or a policy close, and nothing raises.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers.settings import ProviderSettings
from server.app import create_app
from server.settings import LimitSettings, Settings

APP = create_app(
    Settings(
        providers=[ProviderSettings(name="demo", kind="demo", pace=0.0)],
        limits=LimitSettings(max_json_depth=6, max_chars=2000),
    ),
    {},
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
KEYS = [
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "id",
    "request",
    "stream",
    "max_tokens",
    "temperature",
    "stop",
    "n",
    "tools",
    "name",
    "cache_control",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "demo/echo",
            "user",
            "assistant",
            "tool",
            "chat.start",
            "chat.cancel",
            "ping",
            "text",
            "\ud800",
            "NaN",
            "-1",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)
    ),
    max_leaves=30,
)


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


requests = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["demo/echo", "nope/x", ""]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "tool", 1]), "content": json_values}
            ),
            max_size=3,
        ),
    },
    optional={k: json_values for k in ("stream", "max_tokens", "temperature", "stop", "n", "x")},
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: dumps(v).encode()),
    requests.map(lambda v: dumps(v).encode()),
    requests.map(lambda v: dumps(v).encode("utf-8", "surrogatepass")[:-3]),
    st.tuples(requests.map(dumps), st.binary(max_size=8)).map(lambda t: t[0].encode() + t[1]),
)
frames = st.one_of(
    st.text(max_size=200),
    json_values.map(dumps),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["chat.start", "chat.cancel", "ping", "x"])},
        optional={
            "id": scalars,
            "request": requests | json_values,
            "cache_control": scalars,
            "extra": json_values,
        },
    ).map(dumps),
)


async def post(body: bytes) -> tuple[int, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop() if chunks else await asyncio.Future()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/chat/completions",
        "raw_path": b"/api/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": [(b"content-type", b"application/json")],
    }
    await APP(scope, receive, send)  # type: ignore[arg-type]
    return sent[0]["status"], sent


@given(body=bodies)
@FUZZ
def test_rest_decoder_never_fails(body: bytes) -> None:
    status, sent = asyncio.run(post(body))
    assert status in (200, 400, 404, 413), (status, sent)
    if status != 200:
        assert json.loads(sent[1]["body"])["error"]["status"] == status


async def converse(texts: list[str]) -> list[dict[str, Any]]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    for text in texts:
        inbox.put_nowait({"type": "websocket.receive", "text": text})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if inbox.empty():
            await asyncio.sleep(0.01)  # let started streams write before the peer leaves
            return {"type": "websocket.disconnect", "code": 1000}
        return inbox.get_nowait()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/api/ws",
        "raw_path": b"/api/ws",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": [],
        "subprotocols": ["tokenrelay.v1"],
    }
    await APP(scope, receive, send)  # type: ignore[arg-type]
    return sent


@given(texts=st.lists(frames, min_size=1, max_size=5))
@FUZZ
def test_websocket_decoder_never_fails(texts: list[str]) -> None:
    sent = asyncio.run(converse(texts))
    assert sent[0]["type"] == "websocket.accept"
    for message in sent[1:]:
        if message["type"] == "websocket.close":
            assert message["code"] in (1000, 1008, 1009)
            continue
        frame = json.loads(message["text"])
        assert frame["type"] in (
            "chat.delta",
            "chat.done",
            "chat.error",
            "error",
            "pong",
            "cancel.ignored",
        )
        if frame["type"] == "chat.error":
            assert frame["error"]["status"] < 500, frame
