"""Locust users for the gateway: SSE through the OpenAI-compatible API and WebSocket protocol v1.

Run it with `python -m loadtests.loadtest` (starts the fake upstream and the gateway too), or
by hand: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000`.

Besides the request itself, each transport reports its own entries, so their percentiles land
in the normal statistics, CSV and HTML report:

- ``ttft``: time to the first content delta;
- ``stream``: the whole stream, to its end;
- ``gap``: every gap between consecutive deltas;
- ``cancel``: for the share of users that cancel mid-stream: WebSocket, from ``chat.cancel``
  to the ``chat.done`` that confirms it; SSE, the time to close the connection;
- ``cancel->upstream`` (with ``--fake-control``): from the client's cancel until the fake
  upstream saw its connection closed, one entry per cancel, recorded when the test stops.
  A cancel the upstream never saw is reported as a failure;
- ``refused``: a stream or socket the gateway refused at a cap (429) or at `max_streams`
  (503), one failure each, so refusals are counted apart from other errors (0 expected with
  the default settings).
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
import uuid
from typing import Any

import websocket
from locust import HttpUser, User, between, events, task
from locust.env import Environment

SUBPROTOCOL = "tokenrelay.v1"
_CONTENT = b'"content":"'
_EMPTY = b'"content":""'
# Client cancel times by stream tag (the request's `user` field, which the fake records).
_cancels: dict[str, tuple[str, float]] = {}
REFUSED = frozenset({429, 503})


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("tokenrelay")
    group.add_argument("--model", default="fake/bench", help="model id to request")
    group.add_argument("--sse-weight", type=int, default=1, help="weight of SSE users")
    group.add_argument("--ws-weight", type=int, default=1, help="weight of WebSocket users")
    group.add_argument(
        "--cancel-share", type=float, default=0.2, help="share of streams cancelled mid-stream"
    )
    group.add_argument(
        "--fake-control", default="", help="the fake upstream's control URL, to time cancels"
    )


@events.init.add_listener
def _weights(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None:
        SSEUser.weight = options.sse_weight
        WebSocketUser.weight = options.ws_weight


def _report(env: Environment, kind: str, name: str, seconds: float, error: Any = None) -> None:
    env.events.request.fire(
        request_type=kind,
        name=name,
        response_time=seconds * 1000,
        response_length=0,
        exception=error,
        context={},
    )


def _refused(env: Environment, kind: str, status: int) -> None:
    _report(env, kind, "refused", 0, RuntimeError(f"refused with status {status}"))


class _Timing:
    """Delta arrival times of one stream, reported as ttft, gap and stream entries."""

    def __init__(self, env: Environment, kind: str) -> None:
        self.env, self.kind = env, kind
        self.sent = time.perf_counter()
        self.last: float | None = None
        self.deltas = 0

    def delta(self, count: int = 1) -> None:
        now = time.perf_counter()
        if self.last is None:
            _report(self.env, self.kind, "ttft", now - self.sent)
        else:
            _report(self.env, self.kind, "gap", now - self.last)
        self.last = now
        self.deltas += count

    def end(self, error: Any = None) -> None:
        _report(self.env, self.kind, "stream", time.perf_counter() - self.sent, error)


def _cancel_point(share: float) -> int | None:
    """After how many deltas this stream is cancelled, or None to read it to the end."""
    return random.randint(2, 10) if random.random() < share else None


class SSEUser(HttpUser):
    """A client of `POST /api/chat/completions` with `"stream": true`."""

    wait_time = between(0.05, 0.2)

    @task
    def chat(self) -> None:
        options = self.environment.parsed_options
        tag = uuid.uuid4().hex
        body = {
            "model": options.model if options else "fake/bench",
            "messages": [{"role": "user", "content": "load test"}],
            "stream": True,
            "user": tag,
        }
        cancel_after = _cancel_point(options.cancel_share if options else 0.0)
        timing = _Timing(self.environment, "SSE")
        with self.client.post(
            "/api/chat/completions", json=body, stream=True, name="SSE request", catch_response=True
        ) as response:
            if response.status_code != 200:
                if response.status_code in REFUSED:
                    _refused(self.environment, "SSE", response.status_code)
                response.failure(f"status {response.status_code}")
                timing.end(RuntimeError(f"status {response.status_code}"))
                return
            response.success()
            for data in response.iter_content(chunk_size=None):
                count = data.count(_CONTENT) - data.count(_EMPTY)
                if count:
                    timing.delta(count)
                if cancel_after is not None and timing.deltas >= cancel_after:
                    started = time.perf_counter()
                    _cancels[tag] = ("SSE", time.monotonic())
                    response.raw.close()  # an SSE client cancels by going away
                    _report(self.environment, "SSE", "cancel", time.perf_counter() - started)
                    return
            timing.end(None if data.endswith(b"data: [DONE]\n\n") else RuntimeError("no [DONE]"))


class WebSocketUser(User):
    """One socket per user; streams one chat at a time over protocol v1."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        url = (self.host or "").replace("http://", "ws://").rstrip("/") + "/api/ws"
        started = time.perf_counter()
        try:
            self.ws = websocket.create_connection(url, subprotocols=[SUBPROTOCOL], timeout=60)
        except websocket.WebSocketBadStatusException as exc:
            if exc.status_code in REFUSED:
                _refused(self.environment, "WS", exc.status_code)
            raise
        _report(self.environment, "WS", "connect", time.perf_counter() - started)

    def on_stop(self) -> None:
        self.ws.close()

    @task
    def chat(self) -> None:
        options = self.environment.parsed_options
        tag = uuid.uuid4().hex
        request = {
            "model": options.model if options else "fake/bench",
            "messages": [{"role": "user", "content": "load test"}],
            "user": tag,
        }
        cancel_after = _cancel_point(options.cancel_share if options else 0.0)
        timing = _Timing(self.environment, "WS")
        cancelled: float | None = None
        self.ws.send(json.dumps({"type": "chat.start", "id": tag, "request": request}))
        while True:
            frame = json.loads(self.ws.recv())
            if frame.get("id") != tag:
                continue
            if frame["type"] == "chat.delta":
                timing.delta()
                if cancel_after is not None and cancelled is None and timing.deltas >= cancel_after:
                    cancelled = time.perf_counter()
                    _cancels[tag] = ("WS", time.monotonic())
                    self.ws.send(json.dumps({"type": "chat.cancel", "id": tag}))
            elif frame["type"] == "chat.done":
                if cancelled is not None:
                    _report(self.environment, "WS", "cancel", time.perf_counter() - cancelled)
                else:
                    timing.end()
                return
            else:
                status = frame.get("error", {}).get("status")
                if status in REFUSED:
                    _refused(self.environment, "WS", status)
                timing.end(RuntimeError(frame.get("error", frame)))
                return


@events.test_stop.add_listener
def _cancels_upstream(environment: Environment, **_: Any) -> None:
    """Match each client cancel with the moment the fake upstream saw its connection close."""
    options = environment.parsed_options
    if options is None or not options.fake_control or not _cancels:
        return
    time.sleep(0.5)  # let the last cancels land
    with urllib.request.urlopen(options.fake_control + "/requests", timeout=30) as reply:
        records = {r["user"]: r for r in json.load(reply)}
    for tag, (kind, at) in _cancels.items():
        record = records.get(tag)
        seen = None if record is None else record["disconnected_at"]
        if seen is None:
            _report(environment, kind, "cancel->upstream", 0, RuntimeError("upstream never saw it"))
        else:
            _report(environment, kind, "cancel->upstream", max(seen - at, 0.0))
    _cancels.clear()
