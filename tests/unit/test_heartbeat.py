"""server.sse.Heartbeat: an idle event stream's keepalive, from a timer, without a task; and
how it stops when the stream's last event ends the body."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from providers.errors import UpstreamProtocolError
from providers.types import TextDelta, Usage
from server.guard import DirectSend
from server.sse import SSE_HEADERS, SSESink
from server.stream_state import StreamState
from server.streaming import race

KEEPALIVE = b": keepalive\n\n"


class _Socket:
    """The server's side of one response: `send` messages and direct writes, recorded. The
    direct writer takes pieces only after the head, and only while `full` is False, as
    `server.guard`'s does."""

    def __init__(self) -> None:
        self.sent: list[Any] = []  # messages through `send`
        self.written: list[bytes] = []  # pieces through the direct writer
        self.writers: list[object] = []  # the task each piece was written from (None: none)
        self.full = False
        self.broken = False

    async def send(self, message: Any) -> None:
        if self.broken:
            raise OSError("the socket broke")
        self.sent.append(message)

    def write(self, data: bytes) -> bool:
        head = any(m["type"] == "http.response.start" for m in self.sent)
        if not head or self.full:
            return False
        if data:
            self.written.append(data)
            self.writers.append(asyncio.current_task())
        return True


def _sink(socket: _Socket) -> SSESink:
    send = DirectSend(socket.send, socket.send, socket.write, None)
    state = StreamState("req-1", 0.0, "sse")
    return SSESink(send, ("chatcmpl-1", 0), SSE_HEADERS, False, state)


async def _until(done: Callable[[], bool]) -> None:
    """Idle (sending nothing) until `done()`; bounded, so a keepalive that never comes fails."""
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("no keepalive within 5 s")


async def test_before_the_headers_the_keepalive_sends_them_first() -> None:
    socket = _Socket()
    sink = _sink(socket)
    assert await race(_until(lambda: len(socket.written) >= 2), sink.keepalive(0.02)) is True
    # The first beat sent the head through `send` (a task's work), then every beat went
    # straight out.
    assert [m["type"] for m in socket.sent] == ["http.response.start"] and sink.started
    assert len(socket.written) >= 2 and set(socket.written) == {KEEPALIVE}
    assert socket.writers[0] is not None and set(socket.writers[1:]) == {None}


async def test_an_idle_open_stream_beats_with_no_task() -> None:
    socket = _Socket()
    sink = _sink(socket)
    await sink._start()
    tasks = len(asyncio.all_tasks())
    seen: list[int] = []

    async def main() -> None:
        while len(socket.written) < 2:
            await asyncio.sleep(0.005)
            seen.append(len(asyncio.all_tasks()))

    assert await race(main(), sink.keepalive(0.02)) is True
    assert len(socket.written) >= 1 and set(socket.written) == {KEEPALIVE}
    assert set(seen) == {tasks + 1}  # only main's own task, ever
    assert set(socket.writers) == {None}  # written from the timer, not from a task
    assert len(socket.sent) == 1  # just the head


async def test_a_stream_that_keeps_sending_gets_no_keepalive() -> None:
    socket = _Socket()
    sink = _sink(socket)
    await sink._start()

    async def main() -> None:  # a piece every 10 ms, for three keepalive intervals
        for _ in range(30):
            await asyncio.sleep(0.01)
            await sink._put(b"data: x\n\n")

    assert await race(main(), sink.keepalive(0.1)) is True
    assert KEEPALIVE not in socket.written


async def test_a_full_socket_sends_the_keepalive_through_send() -> None:
    socket = _Socket()
    sink = _sink(socket)
    await sink._start()
    socket.full = True

    def bodies_sent() -> list[bytes]:
        return [m["body"] for m in socket.sent if m["type"] == "http.response.body"]

    assert await race(_until(lambda: bool(bodies_sent())), sink.keepalive(0.02)) is True
    bodies = bodies_sent()
    assert bodies and set(bodies) == {KEEPALIVE} and not socket.written


async def test_a_keepalive_that_fails_stops_the_stream() -> None:
    socket = _Socket()
    sink = _sink(socket)
    socket.broken = True  # the head cannot go out
    stopped: list[bool] = []

    async def main() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            stopped.append(True)
            raise

    assert await race(main(), sink.keepalive(0.01)) is False
    assert stopped == [True]


def _bodies(socket: _Socket) -> list[tuple[bytes, bool]]:
    """The body messages sent through `send`: (body, more_body)."""
    return [(m["body"], m["more_body"]) for m in socket.sent if m["type"] == "http.response.body"]


async def test_the_finish_ends_the_body_in_the_same_message() -> None:
    socket = _Socket()
    sink = _sink(socket)

    async def main() -> None:
        await sink.delta(TextDelta("hi"))
        await sink.finish("stop", Usage())

    assert await race(main(), sink.keepalive(5.0)) is True
    # The head, the role and first delta (one direct write), then the finish and [DONE] in the
    # message that ends the body: no empty closing message after it.
    assert [m["type"] for m in socket.sent] == ["http.response.start", "http.response.body"]
    [(last, more)] = _bodies(socket)
    assert not more and last.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"stop"' in last
    assert len(socket.written) == 1 and b'"content":"hi"' in socket.written[0]
    assert sink.complete


async def test_an_error_after_the_headers_ends_the_body_and_nothing_follows_the_end() -> None:
    socket = _Socket()
    sink = _sink(socket)
    await sink.delta(TextDelta("hi"))
    await sink.error(UpstreamProtocolError("the upstream broke off"))
    [(last, more)] = _bodies(socket)
    assert not more and b"the upstream broke off" in last and b"[DONE]" not in last
    assert sink.complete
    await sink.error(UpstreamProtocolError("a second failure"))  # e.g. while closing upstream
    assert len(_bodies(socket)) == 1


async def test_no_keepalive_after_the_last_event() -> None:
    socket = _Socket()
    sink = _sink(socket)

    async def main() -> None:
        await sink.finish("stop", Usage())
        await asyncio.sleep(0.1)  # work after the answer (a cache write, say): 5 intervals

    assert await race(main(), sink.keepalive(0.02)) is True
    assert KEEPALIVE not in socket.written
    assert all(KEEPALIVE not in body for body, _ in _bodies(socket))
    assert _bodies(socket)[-1][1] is False


@pytest.mark.parametrize("slow", ["every body", "only the keepalive"])
async def test_a_keepalive_on_its_way_goes_out_before_the_end(slow: str) -> None:
    """A keepalive waiting to be sent when the finish comes goes out first: both wait for a
    full socket (as uvicorn's `send` does), or only the keepalive is slow to reach it, so the
    finish must wait for it, not merely queue behind it."""
    socket = _Socket()
    sink = _sink(socket)
    await sink._start()
    socket.full = True
    drained = asyncio.Event()
    send = socket.send

    async def slow_send(message: Any) -> None:
        if message["type"] == "http.response.body" and (
            slow == "every body" or message["body"] == KEEPALIVE
        ):
            await drained.wait()
        await send(message)

    sink._send = DirectSend(slow_send, slow_send, socket.write, None)
    beats = sink.keepalive(0.01)

    async def main() -> None:
        await _until(lambda: beats._task is not None)  # a keepalive waits in `send`
        ending = asyncio.ensure_future(sink.finish("stop", Usage()))
        await asyncio.sleep(0.05)
        assert not ending.done()  # behind the keepalive
        drained.set()
        await ending

    assert await race(main(), beats) is True
    bodies = _bodies(socket)
    assert [b for b, _ in bodies[:-1]] == [KEEPALIVE] and bodies[0][1] is True, bodies
    assert bodies[-1][0].endswith(b"data: [DONE]\n\n") and bodies[-1][1] is False
