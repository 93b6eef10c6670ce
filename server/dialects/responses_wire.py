"""OpenAI Responses answers: the `response` object and its SSE event stream.

A stream is `response.created` and `response.in_progress` (with the first output, or the first
keepalive), then for each output item in the order the model produced it
`response.output_item.added`, its content (`response.content_part.added`, the
`response.output_text` / `response.refusal` / `response.reasoning_text` deltas and `.done`,
`response.content_part.done`; or `response.function_call_arguments.delta` and `.done`) and
`response.output_item.done`, then `response.completed` (or `response.incomplete` with its
reason). Every event carries a `sequence_number`, from 0. A failure after the headers is an
`error` event followed by `response.failed`; no `response.completed` follows it.

Text and reasoning items are closed when another item starts; function call items stay open
until the end, so late argument fragments of parallel calls still find their item. Deltas are
framed from byte templates made once per content part, as the Chat Completions chunks are.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
from starlette.types import Send

from providers.errors import GatewayError
from providers.types import (
    ContentPart,
    Delta,
    FinishReason,
    FunctionCall,
    Message,
    ReasoningDelta,
    RefusalDelta,
    RefusalPart,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from server.dialects.responses import ResponsesBody, TextConfig, TextFormatParam, assistant
from server.errors import spec_for
from server.rest import Collector
from server.sse import EventStreamSink
from server.stream_state import StreamState

_encode = msgspec.json.Encoder().encode
Status = Literal["in_progress", "completed", "incomplete", "failed"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the response object -------------------------------------------------------------------


class OutputText(msgspec.Struct, kw_only=True, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputRefusal(msgspec.Struct, kw_only=True, tag="refusal", tag_field="type"):
    refusal: str


class ReasoningText(msgspec.Struct, kw_only=True, tag="reasoning_text", tag_field="type"):
    text: str


class MessageOut(msgspec.Struct, kw_only=True, tag="message", tag_field="type"):
    id: str
    status: Status
    content: list[OutputText | OutputRefusal]
    role: str = "assistant"


class FunctionCallOut(msgspec.Struct, kw_only=True, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status


class ReasoningOut(msgspec.Struct, kw_only=True, tag="reasoning", tag_field="type"):
    id: str
    summary: list[Any]
    content: list[ReasoningText]
    status: Status


OutputItem = MessageOut | FunctionCallOut | ReasoningOut


class InputTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int = 0


class UsageOut(msgspec.Struct, frozen=True, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()

    @classmethod
    def of(cls, usage: Usage) -> UsageOut:
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class ErrorOut(msgspec.Struct, frozen=True):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct, frozen=True):
    reason: str


class ReasoningEcho(msgspec.Struct, frozen=True):
    effort: str | None = None
    summary: str | None = None


class ResponseObject(msgspec.Struct, kw_only=True):
    """A `response`, as answered, streamed in the lifecycle events and kept for retrieval."""

    id: str
    created_at: int
    status: Status
    model: str
    output: list[OutputItem]
    object: str = "response"
    completed_at: int | None = None
    error: ErrorOut | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningEcho = ReasoningEcho()
    service_tier: str | None = None
    store: bool = True
    temperature: float | None = None
    text: TextConfig = TextConfig(format=TextFormatParam())
    tool_choice: Any = "auto"
    tools: list[Any] = msgspec.field(default_factory=list)
    top_p: float | None = None
    truncation: str = "disabled"
    usage: UsageOut | None = None
    user: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    background: bool = False
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


_INCOMPLETE: dict[FinishReason, str] = {
    "length": "max_output_tokens",
    "content_filter": "content_filter",
}


def status_of(reason: FinishReason) -> Status:
    return "incomplete" if reason in _INCOMPLETE else "completed"


def skeleton(body: ResponsesBody, response_id: str, model: str) -> ResponseObject:
    """The response as it starts: in progress, no output, the request's settings echoed."""
    return ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        status="in_progress",
        model=model,
        output=[],
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        reasoning=ReasoningEcho(
            effort=body.reasoning.effort if body.reasoning is not None else None,
            summary=body.reasoning.summary if body.reasoning is not None else None,
        ),
        service_tier=body.service_tier,
        store=body.stored,
        temperature=body.temperature,
        text=body.text or TextConfig(format=TextFormatParam()),
        tool_choice=body.tool_choice or "auto",
        tools=list(body.tools or ()),
        top_p=body.top_p,
        user=body.user,
        metadata=dict(body.metadata or {}),
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
    )


def finished(
    response: ResponseObject,
    output: list[OutputItem],
    reason: FinishReason,
    usage: Usage,
    model: str,
) -> ResponseObject:
    """The response at its end: its output, status, usage and the model that answered."""
    status = status_of(reason)
    return msgspec.structs.replace(
        response,
        status=status,
        model=model,
        output=output,
        completed_at=int(time.time()) if status == "completed" else None,
        incomplete_details=IncompleteDetails(_INCOMPLETE[reason])
        if reason in _INCOMPLETE
        else None,
        usage=UsageOut.of(usage),
    )


def failed(response: ResponseObject, output: list[OutputItem], exc: GatewayError) -> ResponseObject:
    return msgspec.structs.replace(
        response, status="failed", output=output, error=ErrorOut(spec_for(exc).code, exc.message)
    )


def encode(response: ResponseObject) -> bytes:
    return _encode(response)


# -- output items as they accumulate -------------------------------------------------------


class Part:
    """One content part of a message or reasoning item, and the template of its deltas."""

    __slots__ = ("kind", "chunks", "head")

    def __init__(self, kind: str, head: bytes) -> None:
        self.kind = kind  # output_text | refusal | reasoning_text
        self.chunks: list[str] = []
        self.head = head

    @property
    def text(self) -> str:
        return "".join(self.chunks)


class Item:
    """One output item being built: a message, a reasoning item or a function call."""

    __slots__ = ("kind", "id", "index", "parts", "call_id", "name", "arguments", "open")

    def __init__(self, kind: str, item_id: str, index: int) -> None:
        self.kind = kind  # message | reasoning | function_call
        self.id = item_id
        self.index = index
        self.parts: list[Part] = []
        self.call_id = ""
        self.name = ""
        self.arguments: list[str] = []
        self.open = True

    def out(self, status: Status = "completed") -> OutputItem:
        if self.kind == "message":
            content: list[OutputText | OutputRefusal] = [
                OutputText(text=p.text)
                if p.kind == "output_text"
                else OutputRefusal(refusal=p.text)
                for p in self.parts
            ]
            return MessageOut(id=self.id, status=status, content=content)
        if self.kind == "reasoning":
            texts = [ReasoningText(text=p.text) for p in self.parts]
            return ReasoningOut(id=self.id, summary=[], content=texts, status=status)
        return FunctionCallOut(
            id=self.id,
            call_id=self.call_id,
            name=self.name,
            arguments="".join(self.arguments),
            status=status,
        )


def assistant_message(items: list[Item]) -> Message | None:
    """The answer as the assistant turn a continuation sends upstream (None when empty)."""
    content: list[ContentPart] = []
    calls: list[ToolCall] = []
    reasoning: list[str] = []
    for item in items:
        if item.kind == "message":
            for part in item.parts:
                if part.kind == "output_text":
                    content.append(TextPart(text=part.text))
                else:
                    content.append(RefusalPart(refusal=part.text))
        elif item.kind == "reasoning":
            reasoning += [p.text for p in item.parts]
        else:
            call = FunctionCall(name=item.name, arguments="".join(item.arguments) or "{}")
            calls.append(ToolCall(id=item.call_id, function=call))
    if not (content or calls or reasoning):
        return None
    return assistant(content, calls, "".join(reasoning) or None)


def collected_items(collector: Collector) -> list[Item]:
    """A collected (non-streamed) answer as output items: reasoning, message, then calls."""
    items: list[Item] = []
    if collector.reasoning:
        item = Item("reasoning", new_id("rs"), len(items))
        part = Part("reasoning_text", b"")
        part.chunks = collector.reasoning
        item.parts.append(part)
        items.append(item)
    if collector.text or collector.refusal:
        item = Item("message", new_id("msg"), len(items))
        for kind, chunks in (("output_text", collector.text), ("refusal", collector.refusal)):
            if chunks:
                part = Part(kind, b"")
                part.chunks = chunks
                item.parts.append(part)
        items.append(item)
    for _, (ids, names, arguments) in sorted(collector.calls.items()):
        item = Item("function_call", new_id("fc"), len(items))
        item.call_id = "".join(ids) or new_id("call")
        item.name = "".join(names)
        item.arguments = arguments
        items.append(item)
    return items


# -- the event stream ----------------------------------------------------------------------


def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = _encode({"type": kind, **fields, "sequence_number": seq})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


_DELTA_KINDS = {
    "output_text": b"response.output_text.delta",
    "refusal": b"response.refusal.delta",
    "reasoning_text": b"response.reasoning_text.delta",
}
_DONE_KINDS = {
    "output_text": ("response.output_text.done", "text"),
    "refusal": ("response.refusal.done", "refusal"),
    "reasoning_text": ("response.reasoning_text.done", "text"),
}
_SEQ = b',"sequence_number":'
_TAIL = b"}\n\n"

Finisher = Callable[[ResponseObject, list[Item]], Awaitable[None]]


class ResponsesSink(EventStreamSink):
    """Writes one stream as Responses SSE events (see the module docstring)."""

    __slots__ = ("_response", "_seq", "_items", "_current", "_calls", "_finisher")

    def __init__(
        self,
        send: Send,
        response: ResponseObject,
        headers: list[tuple[bytes, bytes]],
        state: StreamState,
        finisher: Finisher,
    ) -> None:
        super().__init__(send, headers, state)
        self._response = response
        self._seq = 0
        self._items: list[Item] = []
        self._current: Item | None = None  # the open message or reasoning item
        self._calls: dict[int, Item] = {}  # tool-call index -> its item
        self._finisher = finisher  # stores the final response before its last event

    def _next(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _emit(self, kind: str, fields: dict[str, Any]) -> bytes:
        return _event(kind, self._next(), fields)

    def _lifecycle(self, kind: str, response: ResponseObject) -> bytes:
        seq = self._next()
        data = (
            b'{"type":"' + kind.encode() + b'","response":' + _encode(response) + _SEQ
            + str(seq).encode() + b"}"
        )  # fmt: skip
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _open_events(self) -> bytes:
        self._opened = True
        self._response.model = self._state.model  # the model that answers: a fallback, maybe
        return self._lifecycle("response.created", self._response) + self._lifecycle(
            "response.in_progress", self._response
        )

    def keepalive_event(self) -> bytes:
        if self._opened:
            return super().keepalive_event()
        return self._open_events()

    async def _opening(self) -> bytes:
        if not self.started:
            await self._start()
        return self._open_events()

    def _add_item(self, kind: str, prefix: str) -> tuple[Item, bytes]:
        item = Item(kind, new_id(prefix), len(self._items))
        self._items.append(item)
        added = self._emit(
            "response.output_item.added",
            {"output_index": item.index, "item": item.out("in_progress")},
        )
        return item, added

    def _add_part(self, item: Item, kind: str) -> bytes:
        index = len(item.parts)
        delta_kind = _DELTA_KINDS[kind]
        head = (
            b"event: " + delta_kind + b'\ndata: {"type":"' + delta_kind + b'","item_id":"'
            + item.id.encode() + b'","output_index":' + str(item.index).encode()
            + b',"content_index":' + str(index).encode()
            + (b',"logprobs":[]' if kind == "output_text" else b"") + b',"delta":'
        )  # fmt: skip
        item.parts.append(Part(kind, head))
        empty: dict[str, Any] = {"type": kind, "text": ""}
        if kind == "output_text":
            empty["annotations"] = []
        elif kind == "refusal":
            empty = {"type": "refusal", "refusal": ""}
        return self._emit(
            "response.content_part.added",
            {"item_id": item.id, "output_index": item.index, "content_index": index, "part": empty},
        )

    def _close_part(self, item: Item) -> bytes:
        part = item.parts[-1]
        index = len(item.parts) - 1
        done, field = _DONE_KINDS[part.kind]
        where = {"item_id": item.id, "output_index": item.index, "content_index": index}
        extra: dict[str, Any] = {"logprobs": []} if part.kind == "output_text" else {}
        full: dict[str, Any] = {"type": part.kind, field: part.text}
        if part.kind == "output_text":
            full["annotations"] = []
        return self._emit(done, {**where, **extra, field: part.text}) + self._emit(
            "response.content_part.done", {**where, "part": full}
        )

    def _close_item(self, item: Item) -> bytes:
        item.open = False
        out = b""
        if item.kind == "function_call":
            out += self._emit(
                "response.function_call_arguments.done",
                {
                    "item_id": item.id,
                    "output_index": item.index,
                    "name": item.name,
                    "arguments": "".join(item.arguments),
                },
            )
        elif item.parts:
            out += self._close_part(item)
        return out + self._emit(
            "response.output_item.done", {"output_index": item.index, "item": item.out()}
        )

    def _content(self, kind: str) -> tuple[Part, bytes]:
        """The open part of `kind`, starting its item or part first when needed."""
        item = self._current
        wanted = "reasoning" if kind == "reasoning_text" else "message"
        opening = b""
        if item is None or item.kind != wanted:
            if item is not None:
                opening += self._close_item(item)
            item, added = self._add_item(wanted, "rs" if wanted == "reasoning" else "msg")
            self._current = item
            opening += added
        if not item.parts or item.parts[-1].kind != kind:
            if item.parts:
                opening += self._close_part(item)
            opening += self._add_part(item, kind)
        return item.parts[-1], opening

    def _frame(self, event: Delta) -> bytes:
        if isinstance(event, TextDelta):
            part, more = self._content("output_text")
        elif isinstance(event, ReasoningDelta):
            part, more = self._content("reasoning_text")
        elif isinstance(event, RefusalDelta):
            part, more = self._content("refusal")
        else:
            return self._tool(event)
        part.chunks.append(event.text)
        data = part.head + _encode(event.text) + _SEQ + str(self._next()).encode() + _TAIL
        return more + data if more else data

    def _tool(self, delta: ToolCallDelta) -> bytes:
        item = self._calls.get(delta.index)
        out = b""
        if item is None:
            if self._current is not None:
                out += self._close_item(self._current)
                self._current = None
            item = Item("function_call", new_id("fc"), len(self._items))
            item.call_id = delta.id or new_id("call")
            item.name = delta.name or ""
            self._items.append(item)
            self._calls[delta.index] = item
            out += self._emit(
                "response.output_item.added",
                {"output_index": item.index, "item": item.out("in_progress")},
            )
        if not delta.arguments:
            return out
        item.arguments.append(delta.arguments)
        return out + self._emit(
            "response.function_call_arguments.delta",
            {"item_id": item.id, "output_index": item.index, "delta": delta.arguments},
        )

    def _close_all(self) -> bytes:
        out = b""
        for item in self._items:
            if item.open:
                out += self._close_item(item)
        self._current = None
        return out

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        data = b"" if self._opened else await self._opening()
        data += self._close_all()
        output = [item.out() for item in self._items]
        response = finished(self._response, output, reason, usage, self._state.model)
        await self._finisher(response, self._items)
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        await self._last(data + self._lifecycle(kind, response))

    def error_event(self, exc: GatewayError) -> bytes:
        spec = spec_for(exc)
        error = self._emit("error", {"code": spec.code, "message": exc.message, "param": exc.param})
        output = [item.out("incomplete") for item in self._items]
        return error + self._lifecycle("response.failed", failed(self._response, output, exc))
