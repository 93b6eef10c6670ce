"""Hostile clients against a gateway process: the figures behind the hardening tests.

    python -m loadtests.bench_hostile [--tree DIR] [--size 32] [--frames 1000000]

- memory: RSS growth of the gateway while 4 connections each offer `--size` MB of header lines
  that never end, and how much of it the gateway accepted before it stopped reading;
- flood: /healthz latency (p50 and max of 10) while one WebSocket sends a message in `--frames`
  one-byte continuation frames, and while one sends as many pings, against no flood;
- stalled readers: 10 SSE streams (and then 10 WebSocket streams) whose clients never read, on a
  key allowed 10 streams: seconds until an 11th stream is admitted (gives up after 60 s).

`--tree` runs the gateway from another checkout (e.g. an older commit unpacked with
`git archive`), so the same attacks can be measured before and after a change. Only loopback
addresses are used; every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
import uuid

import httpx2

from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.support.process import Served, serve_process
from tests.support.rawclient import (
    CONT,
    PING,
    TEXT,
    endless_headers,
    rss_kib,
    ws_frame,
    ws_open,
)

MiB = 1024 * 1024


def memory(served: Served, size_mb: int) -> dict[str, float]:
    before = rss_kib(served.proc.pid)
    block = (b"x-pad: " + b"a" * 1017 + b"\r\n") * 64
    attempts = [endless_headers(served.url, size_mb * MiB, block) for _ in range(4)]
    time.sleep(0.5)
    during = rss_kib(served.proc.pid)  # all four still connected
    for sock, _ in attempts:
        sock.close()
    time.sleep(0.5)
    return {
        "rss_before_mib": before / 1024,
        "rss_growth_mib": (during - before) / 1024,
        "rss_growth_after_close_mib": (rss_kib(served.proc.pid) - before) / 1024,
        "max_accepted_mib": max(sent for _, sent in attempts) / MiB,
    }


def healthz_latencies(url: str, count: int = 10) -> list[float]:
    times = []
    with httpx2.Client(timeout=120) as http:
        for _ in range(count):
            began = time.monotonic()
            http.get(url + "/healthz")
            times.append((time.monotonic() - began) * 1000)
    return times


def flood(served: Served, payload: bytes) -> dict[str, float]:
    with ws_open(served.url) as sock:
        sender = threading.Thread(target=_send_quietly, args=(sock, payload), daemon=True)
        sender.start()
        times = healthz_latencies(served.url)
        sender.join(timeout=120)
    return {"p50_ms": statistics.median(times), "max_ms": max(times)}


def _send_quietly(sock: socket.socket, payload: bytes) -> None:
    try:
        sock.sendall(payload)
    except OSError:
        pass


def stalled(served: Served, model: str, over: str) -> float | None:
    """Seconds from 10 stalled streams opening until an 11th is admitted (None: not in 60 s)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    sockets = []
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    try:
        for i in range(10):
            if over == "sse":
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((host, int(port)))
                sock.sendall(
                    b"POST /api/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                    % len(body)
                    + body
                )
            else:
                sock = ws_open(served.url)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                start = {"type": "chat.start", "id": f"s{i}", "request": json.loads(body)}
                sock.sendall(ws_frame(TEXT, json.dumps(start).encode()))
            sockets.append(sock)
        began = time.monotonic()
        probe = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        with httpx2.Client(timeout=30) as http:
            while time.monotonic() - began < 60:
                with http.stream("POST", served.url + "/api/chat/completions", json=probe) as r:
                    if r.status_code != 429:
                        return time.monotonic() - began
                time.sleep(0.25)
        return None
    finally:
        for sock in sockets:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench_hostile")
    parser.add_argument("--tree", help="run the gateway from this checkout (default: this one)")
    parser.add_argument("--size", type=int, default=32, help="MB of headers per connection")
    parser.add_argument("--frames", type=int, default=1_000_000, help="frames in each flood")
    args = parser.parse_args()
    if args.tree:
        os.chdir(args.tree)  # `python -m server` imports the tree it runs in
    with FakeUpstream(api_key=UPSTREAM_KEY).running_in_thread() as upstream:
        name = f"big-{uuid.uuid4().hex[:8]}"
        upstream.scripts[name] = Script(text=["x" * 2000] * 5000)
        config = (
            '[server]\nslow_consumer_timeout = 1.0\nlog_level = "error"\n'
            "[limits]\nstreams_per_address = 10\n"
            f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
            'api_key_env = "UPSTREAM_KEY"\n'
        )
        with serve_process(config, env={"UPSTREAM_KEY": UPSTREAM_KEY}) as served:
            print(f"gateway from {os.getcwd()}")
            print("memory:", json.dumps(memory(served, args.size)))
            quiet = healthz_latencies(served.url)
            print(
                "healthz, no flood:",
                json.dumps({"p50_ms": statistics.median(quiet), "max_ms": max(quiet)}),
            )
            frames = args.frames
            split = ws_frame(TEXT, b"{", fin=False) + ws_frame(CONT, b" ", fin=False) * frames
            print(f"healthz, {frames:,} continuation frames:", json.dumps(flood(served, split)))
            pings = ws_frame(PING, b"p") * frames
            print(f"healthz, {frames:,} pings:", json.dumps(flood(served, pings)))
            for over in ("sse", "ws"):
                released = stalled(served, f"oai/{name}", over)
                shown = "not within 60 s" if released is None else f"{released:.1f} s"
                print(f"10 stalled {over} readers: an 11th stream admitted after {shown}")


if __name__ == "__main__":
    main()
