"""No key of any kind in any log line, error body, stream frame or metric, at debug level."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable

import httpx2
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.auth import digest, new_key
from tests.fakeupstream import FakeUpstream
from tests.support.process import serve_process
from tests.support.wsclient import StreamClient

Model = Callable[..., str]
HELLO = [{"role": "user", "content": "hello"}]


def auth_protocol(key: str) -> str:
    return "tokenrelay.auth." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def test_no_key_leaks_anywhere(upstream: FakeUpstream, model: Model) -> None:
    gateway_key, stranger_key = new_key(), new_key()
    upstream_key = "sk-wrong-" + uuid.uuid4().hex  # the upstream answers 401 to it
    config = (
        'demo = false\n[server]\nlog_format = "json"\nlog_level = "debug"\n'
        f'[auth]\nkeys = ["{digest(gateway_key)}"]\n'
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\n'
    )
    seen: list[str] = []
    with serve_process(config, env={"UPSTREAM_KEY": upstream_key}) as process:
        api = process.url + "/api/chat/completions"
        body = {"model": f"oai/{model()}", "messages": HELLO}
        for key in (gateway_key, stranger_key):
            for stream in (False, True):
                response = httpx2.post(
                    api, json={**body, "stream": stream}, headers={"authorization": f"Bearer {key}"}
                )
                assert response.status_code == (502 if key == gateway_key else 401)
                seen.append(response.text + str(response.headers))
        metrics = httpx2.get(
            process.url + "/metrics", headers={"authorization": f"Bearer {gateway_key}"}
        )
        assert metrics.status_code == 200
        seen.append(metrics.text)

        async def sockets() -> None:
            url = process.url.replace("http://", "ws://") + "/api/ws"
            offered = ["tokenrelay.v1", auth_protocol(gateway_key)]
            async with connect(url, subprotocols=offered) as ws:  # type: ignore[arg-type]
                client = StreamClient(ws)
                sid = await client.start(body["model"])
                assert (await client.until_terminal(sid))["type"] == "chat.error"
                seen.append(
                    json.dumps(client.frames) + str(ws.response.headers if ws.response else "")
                )
            try:
                async with connect(
                    url, subprotocols=["tokenrelay.v1", auth_protocol(stranger_key)]
                ):  # type: ignore[list-item]
                    raise AssertionError("a stranger's key opened a socket")
            except InvalidStatus as exc:
                seen.append(exc.response.body.decode() + str(exc.response.headers))

        asyncio.run(sockets())
    seen.append(process.log)
    everything = "\n".join(seen)
    assert "upstream_auth_failed" in everything  # the failure itself is reported
    for secret in (gateway_key, stranger_key, upstream_key):
        for form in (
            secret,
            secret[4:],
            auth_protocol(secret),
            base64.b64encode(secret.encode()).decode(),
        ):
            assert form not in everything
    assert digest(gateway_key) not in everything
    assert (
        "tokenrelay.auth.[redacted]" in process.log
    )  # uvicorn did print the handshake  # only a short key id is ever logged


def test_keys_in_unsupported_places_are_redacted_from_the_log() -> None:
    """Query strings at info level; odd headers, bare subprotocols and spellings at debug."""
    gateway_key = new_key()
    upstream_shaped = "sk-ant-api03-" + uuid.uuid4().hex + uuid.uuid4().hex
    keys = f'[auth]\nkeys = ["{digest(gateway_key)}"]\n'
    for level in ("info", "debug"):
        with serve_process(f'[server]\nlog_level = "{level}"\n' + keys) as process:
            ws = process.url.replace("http://", "ws://") + "/api/ws"

            async def handshakes(url: str = ws) -> None:
                attempts: list[tuple[str, dict[str, str], list[str]]] = [
                    (f"?token={gateway_key}", {}, ["tokenrelay.v1"]),
                    (f"?api_key={upstream_shaped}", {}, ["tokenrelay.v1"]),
                    ("", {"x-auth-token": gateway_key}, ["tokenrelay.v1"]),
                    ("", {"x-custom": upstream_shaped}, ["tokenrelay.v1"]),
                    ("", {}, ["tokenrelay.v1", gateway_key]),
                    ("", {"authorization": f"BEARER {gateway_key}"}, ["tokenrelay.v1"]),
                    ("", {"authorization": f"Token {gateway_key}"}, ["tokenrelay.v1"]),
                ]
                for query, headers, offered in attempts:
                    try:
                        async with connect(
                            url + query,
                            additional_headers=headers,
                            subprotocols=offered,  # type: ignore[arg-type]
                        ):
                            pass
                    except InvalidStatus:
                        pass

            asyncio.run(handshakes())
            httpx2.get(process.url + f"/api/models?key={gateway_key}")
            deadline = time.monotonic() + 10
            while process.log.count("WebSocket") < 7 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "/api/ws?token=[redacted]" in process.log  # the handshake line was written
        for secret in (gateway_key, upstream_shaped, gateway_key[4:], upstream_shaped[7:]):
            assert secret not in process.log, level
