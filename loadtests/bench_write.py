"""In-process costs of the relay's smallest steps, in microseconds of CPU per call.

    python -m loadtests.bench_write [--tree DIR] [--rounds N]

- `race`: one `server.streaming.race` of a producer that yields three times with two watcher
  tasks (what every SSE and non-streamed request ran once, before their watchers became
  callbacks; a server other than `tokenrelay serve` still runs the disconnect watch as one);
- `sse write`: one SSE event written by `EventStreamSink._body` through `direct_body` to a real
  uvicorn `RequestResponseCycle` whose transport drops the bytes (the per-chunk Python between
  a framed event and the socket, without the system call);
- `ws frame`: one text frame made by websockets' sans-I/O protocol (uvicorn's path) and by the
  gateway's own framing (`MeteredWebSocketProtocol.write_text`), payload of a typical delta.

`--tree DIR` imports `server` from another checkout (an older commit, say) to compare; a step
that checkout lacks is skipped. Process CPU time, best of `--rounds` rounds; nothing here is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

DATA = (
    b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n'
)
TEXT = '{"type":"chat.delta","id":"a1","seq":12,"text":"tok "}'


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


async def _timed(step: Callable[[], Awaitable[None]], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            await step()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


def _timed_sync(step: Callable[[], Any], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(calls):
            step()
        best = min(best, (time.process_time() - started) / calls * 1e6)
    return best


async def _race(rounds: int) -> float:
    from server import streaming

    race = streaming.race
    # Watchers are `Watcher` objects now (a coroutine in a task is a `TaskWatcher`); older
    # checkouts took the coroutines themselves.
    wrap: Callable[[Any], Any] = getattr(streaming, "TaskWatcher", lambda coro: coro)
    never = asyncio.Event()

    async def producer() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def watcher() -> None:
        await never.wait()

    async def step() -> None:
        await race(producer(), wrap(watcher()), wrap(watcher()))

    return await _timed(step, 20_000, rounds)


async def _sse_write(rounds: int) -> float:
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    import server.guard as guard
    from server.sse import EventStreamSink

    transport = _NullTransport()
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "http_version": "1.1",
        "extensions": {},
    }
    # The server's own exchange where the tree has one (it holds the head for the body).
    cycle_class = getattr(guard, "GuardedCycle", RequestResponseCycle)
    cycle = cycle_class(
        scope=scope,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("bench"),
        access_logger=logging.getLogger("bench"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    if hasattr(guard, "DIRECT"):  # the server's send and writer, behind a weak reference
        scope["extensions"][guard.DIRECT] = guard.WeakWriters(cycle, guard._cycle_writers)
    else:  # older trees: both in the scope as they are
        scope["extensions"][guard.SEND] = cycle.send
        chunk_writer = getattr(guard, "_chunk_writer", None)
        if chunk_writer is not None:
            scope["extensions"][guard.WRITE] = chunk_writer(cycle)

    async def middleware(message: Any) -> None:  # one layer, as the app has several
        await cycle.send(message)

    send = guard.direct_body(scope, middleware)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    sink = EventStreamSink(send, [], None)  # type: ignore[arg-type]

    async def step() -> None:
        await sink._body(DATA)

    return await _timed(step, 200_000, rounds)


def _ws_frames(rounds: int) -> dict[str, float]:
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    conn = ServerProtocol()
    conn.state = State.OPEN

    def protocol() -> None:
        conn.send_text(TEXT.encode())
        b"".join(conn.data_to_send())

    figures = {"ws frame, websockets' protocol": _timed_sync(protocol, 200_000, rounds)}
    try:
        from server.wsguard import _HEADS  # type: ignore[attr-defined]
    except ImportError:
        return figures

    def own() -> None:
        data = TEXT.encode()
        _HEADS[len(data)] + data

    figures["ws frame, own framing"] = _timed_sync(own, 200_000, rounds)
    return figures


async def _run(rounds: int) -> dict[str, float]:
    figures = {"race": await _race(rounds), "sse write": await _sse_write(rounds)}
    figures.update(_ws_frames(rounds))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", help="import the gateway from this checkout")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    import uvloop

    figures = uvloop.run(_run(args.rounds))
    where = args.tree or "this checkout"
    for name, value in figures.items():
        print(f"{name:34} {value:7.2f} us   ({where})")


if __name__ == "__main__":
    main()
