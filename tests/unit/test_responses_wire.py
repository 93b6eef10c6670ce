"""The Responses event stream: item order, sequence numbers and the stored answer."""

from __future__ import annotations

import json
from typing import Any

from providers.errors import UpstreamUnavailableError
from providers.types import Message, TextDelta, ToolCallDelta, Usage
from server.dialects import responses
from server.dialects.responses_wire import (
    Item,
    ResponseObject,
    ResponsesSink,
    assistant_message,
    skeleton,
)
from server.stream_state import StreamState


class Recorder:
    """An ASGI `send` that keeps the body."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = b""

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.body += message.get("body", b"")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for chunk in self.body.decode().strip().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            out.append(data)
        return out


class Kept(list[tuple[ResponseObject, list[Item]]]):
    """What the sink stored."""


def sink_for(send: Recorder, kept: Kept) -> ResponsesSink:
    body = responses.decode_body(b'{"model": "demo/echo", "input": "hi"}')
    state = StreamState("rid", 0.0, "sse")
    state.model = "demo/echo"

    async def keep(response: ResponseObject, items: list[Item]) -> None:
        kept.append((response, items))

    return ResponsesSink(send, skeleton(body, "resp_1", "demo/echo"), [], state, keep)


async def test_interleaved_parallel_calls_find_their_items() -> None:
    send, kept = Recorder(), Kept()
    sink = sink_for(send, kept)
    await sink.delta(TextDelta("Checking"))
    await sink.delta(ToolCallDelta(0, id="a", name="f", arguments='{"x":'))
    await sink.delta(ToolCallDelta(1, id="b", name="g", arguments='{"y":'))
    await sink.delta(ToolCallDelta(0, arguments="1}"))
    await sink.delta(ToolCallDelta(1, arguments="2}"))
    await sink.finish("tool_calls", Usage(prompt_tokens=3, completion_tokens=4))
    events = send.events()
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    args = [
        (e["output_index"], e["delta"]) for e in events if e["type"].endswith("arguments.delta")
    ]
    assert args == [(1, '{"x":'), (2, '{"y":'), (1, "1}"), (2, "2}")]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in done] == [0, 1, 2]
    final = events[-1]
    assert final["type"] == "response.completed"
    assert [i["arguments"] for i in final["response"]["output"][1:]] == ['{"x":1}', '{"y":2}']
    ((stored, items),) = kept
    assert stored.status == "completed" and stored.usage is not None
    turn = assistant_message(items)
    assert isinstance(turn, Message) and turn.content == "Checking"
    assert turn.tool_calls is not None and [c.id for c in turn.tool_calls] == ["a", "b"]


async def test_an_error_after_the_start_is_not_a_completion() -> None:
    send, kept = Recorder(), Kept()
    sink = sink_for(send, kept)
    await sink.delta(TextDelta("part"))
    await sink.error(UpstreamUnavailableError("gone"))
    kinds = [e["type"] for e in send.events()]
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds
    assert kept == []


async def test_an_error_before_any_output_is_a_json_response() -> None:
    send, kept = Recorder(), Kept()
    sink = sink_for(send, kept)
    await sink.error(UpstreamUnavailableError("gone"))
    assert send.status == 503
    assert json.loads(send.body)["error"]["message"] == "gone"
