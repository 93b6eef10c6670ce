"""server.protocol: request decoding and validation, and the SSE chunk framing."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import ChatRequest, Message, TextPart, Usage
from server.protocol import (
    SSE_DONE,
    SSE_HEARTBEAT,
    ChatCompletionBody,
    ChunkFramer,
    UsageBody,
    decode_body,
    sse_event,
)

USER = {"role": "user", "content": "hi"}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "demo/echo", "messages": [USER], **fields}).encode()


def test_valid_minimal_body() -> None:
    parsed = decode_body(b'{"model":"demo/echo","messages":[{"role":"user","content":"hi"}]}')
    assert parsed.model == "demo/echo"
    assert parsed.messages == [Message(role="user", content="hi")]
    assert not parsed.stream
    assert parsed.temperature is None
    assert parsed.include_usage is False
    parsed.check()


def test_list_of_parts_content() -> None:
    parsed = decode_body(
        body(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello "},
                        {"type": "text", "text": "you"},
                    ],
                },
            ]
        )
    )
    assert parsed.messages[1].content == [TextPart(text="hello "), TextPart(text="you")]
    assert parsed.messages[1].text == "hello you"
    assert parsed.messages[0].text == "be brief"


def test_all_fields_in_range_decode() -> None:
    parsed = decode_body(
        body(
            stream=True,
            stream_options={"include_usage": True},
            temperature=2,
            top_p=0,
            max_tokens=1,
            stop=["a", "b", "c", "d"],
            seed=-7,
            user="u1",
            presence_penalty=-2,
            frequency_penalty=2,
            messages=[{"role": "developer", "content": "x", "name": "n"}, USER],
        )
    )
    assert parsed.stream is True
    assert parsed.include_usage is True
    assert parsed.temperature == 2.0
    assert parsed.top_p == 0.0
    assert parsed.stop == ["a", "b", "c", "d"]
    assert parsed.messages[0] == Message(role="developer", content="x", name="n")


@pytest.mark.parametrize("data", [b"", b"   ", b"\n\t "])
def test_empty_body(data: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(data)
    assert info.value.param is None
    assert info.value.message == "The request body is empty; expected a JSON object."


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b"not json",
        b'{"model":"demo/echo"',
        b'{"model":"m",}',
        b'{"model":"demo/echo","messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
        b'{"model":"demo/echo","messages":[{"role":"user","content":"hi"}],"temperature":Infinity}',
        b'{"model":"demo/echo","messages":[{"role":"user","content":"hi"}],"top_p":-Infinity}',
    ],
)
def test_invalid_json(data: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(data)
    assert info.value.param is None
    assert info.value.message.startswith("The request body is not valid JSON: ")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"user": "u" * 257}, "user"),
        ({"model": ""}, "model"),
        ({"model": "m" * 257}, "model"),
        ({"model": 5}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [USER, {"role": "function", "content": "x"}]}, "messages[1].role"),
        ({"messages": [USER, {"role": "user", "content": 5}]}, "messages[1].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, "messages[0].colour"),
        ({"base_url": "http://127.0.0.1:1"}, "base_url"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {}}, "response_format.type"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.name",
        ),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities[1]"),
    ],
)
def test_bad_fields_name_the_param(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(body(**fields))
    assert info.value.param == param
    assert info.value.message.startswith(f"Invalid request body at '{param}': ")
    assert "`" not in info.value.message


@pytest.mark.parametrize(
    ("field", "literal"),
    [("temperature", b"1e999"), ("presence_penalty", b"-1e999"), ("top_p", b"1e400")],
)
def test_out_of_range_number_literals(field: str, literal: bytes) -> None:
    data = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"%s":%s}' % (
        field.encode(),
        literal,
    )
    with pytest.raises(InvalidRequestError) as info:
        decode_body(data)
    assert info.value.param == field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"messages":[{"role":"user","content":"hi"}]}', "model"),
        (b'{"model":"m"}', "messages"),
        (b'{"model":"m","messages":[{"content":"hi"}]}', "messages[0].role"),
        (
            b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{}]}',
            "tools[0].type",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"hi"}],'
            b'"tools":[{"type":"function","function":{}}]}',
            "tools[0].function.name",
        ),
        (
            b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{},'
            b'"response_format":{"type":"json_schema"}}',
            "response_format.json_schema",
        ),
    ],
)
def test_missing_required_fields_are_named(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(body)
    assert info.value.param == param
    assert info.value.message == f"Invalid request body at '{param}': required field missing"


def test_non_object_body() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(b"[1, 2]")
    assert info.value.message == "Invalid request body: Expected 'object', got 'array'"
    assert info.value.param is None


@pytest.mark.parametrize("name", ["base_url", "api_key", "extra_headers", "extra_body", "colour"])
def test_unknown_fields_are_refused_by_name(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(body(**{name: "sk-client-supplied-key"}))
    assert info.value.param == name
    assert f"unknown field '{name}'" in info.value.message
    assert "sk-client" not in info.value.message
    fields = {f.name for f in msgspec.structs.fields(ChatRequest)}
    assert fields.isdisjoint({"base_url", "api_key", "extra_headers", "extra_body"})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        # The first unsupported feature in the check order wins.
        ({"logprobs": True, "n": 3}, "n"),
    ],
)
def test_unsupported_features(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UnsupportedFeatureError) as info:
        decode_body(body(**fields)).check()
    assert info.value.param == param
    assert "not supported" in info.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1},
        {"n": None},
        {"logprobs": False},
        {"top_logprobs": 0},
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        {"modalities": ["text"]},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
        {"reasoning_effort": "low", "verbosity": "high", "service_tier": "flex", "store": True},
        {"metadata": {"a": "1"}, "logit_bias": {"50256": -100}, "seed": 3, "top_k": 40},
    ],
)
def test_supported_variants(fields: dict[str, Any]) -> None:
    decode_body(body(**fields)).check()


@pytest.mark.parametrize(
    ("fields", "max_tokens", "stop"),
    [
        ({}, None, None),
        ({"max_tokens": 10}, 10, None),
        ({"max_completion_tokens": 20}, 20, None),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 20, None),
        ({"stop": "END"}, None, ["END"]),
        ({"stop": ["a", "b"]}, None, ["a", "b"]),
        ({"stop": []}, None, None),
        ({"stop": None}, None, None),
    ],
)
def test_to_request_mapping(
    fields: dict[str, Any], max_tokens: int | None, stop: list[str] | None
) -> None:
    request = decode_body(body(**fields)).to_request("gpt-4o-mini")
    assert request.max_tokens == max_tokens
    assert request.stop == stop


def test_to_request_copies_sampling_fields() -> None:
    parsed = decode_body(
        body(
            model="openai/fast",
            temperature=0.5,
            top_p=0.9,
            seed=42,
            user="alice",
            presence_penalty=0.1,
            frequency_penalty=-0.2,
        )
    )
    assert parsed.to_request("gpt-4o-mini") == ChatRequest(
        model="gpt-4o-mini",
        messages=[Message(role="user", content="hi")],
        temperature=0.5,
        top_p=0.9,
        seed=42,
        user="alice",
        presence_penalty=0.1,
        frequency_penalty=-0.2,
    )


# ---- ChunkFramer ---------------------------------------------------------------------------


def framer(model: str = "demo/echo") -> ChunkFramer:
    return ChunkFramer(completion_id="chatcmpl-abc", created=1700000000, model=model)


def parse_frame(frame: bytes) -> dict[str, Any]:
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    # One SSE event: no raw line break anywhere but the terminator.
    assert frame.count(b"\n") == 2
    assert b"\r" not in frame
    decoded: dict[str, Any] = json.loads(frame[len(b"data: ") : -2])
    return decoded


def check_head(chunk: dict[str, Any], model: str = "demo/echo") -> None:
    assert chunk["id"] == "chatcmpl-abc"
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["created"] == 1700000000
    assert chunk["model"] == model


def test_role_chunk() -> None:
    chunk = parse_frame(framer().role())
    check_head(chunk)
    assert chunk["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]


TRICKY = [
    "plain",
    "",
    'say "hi" and \\ backslash',
    "line one\nline two\r\nthree\rfour",
    "\n\n",
    "data: not an event\n\n",
    "unicode: héllo — 日本語 🎉 \u2028\u2029",
    "</script><script>alert(1)</script>",
    "tab\tand nul\x00 and bell\x07",
    " leading and trailing ",
]


@pytest.mark.parametrize("text", TRICKY)
def test_content_chunk_round_trips(text: str) -> None:
    chunk = parse_frame(framer().content(text))
    check_head(chunk)
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    ]


@pytest.mark.parametrize("text", TRICKY)
def test_reasoning_chunk_round_trips(text: str) -> None:
    chunk = parse_frame(framer().reasoning(text))
    check_head(chunk)
    assert chunk["choices"] == [
        {"index": 0, "delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None}
    ]


@pytest.mark.parametrize("reason", ["stop", "length", "content_filter", "cancelled", "error"])
def test_finish_chunk(reason: Any) -> None:
    chunk = parse_frame(framer().finish(reason))
    check_head(chunk)
    assert chunk["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
    ]


@pytest.mark.parametrize(("prompt", "completion"), [(0, 0), (12, 30), (1, 100000)])
def test_usage_chunk(prompt: int, completion: int) -> None:
    chunk = parse_frame(framer().usage(Usage(prompt_tokens=prompt, completion_tokens=completion)))
    check_head(chunk)
    assert chunk["choices"] == []
    assert chunk["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@pytest.mark.parametrize("model", ['we"ird/mo\\del', "日本/モデル", "a/</script>", "x\ny"])
def test_header_fields_are_json_encoded(model: str) -> None:
    f = ChunkFramer(completion_id='id"1\n', created=5, model=model)
    for frame in (f.role(), f.content("x"), f.reasoning("y"), f.finish("stop")):
        chunk = parse_frame(frame)
        assert chunk["model"] == model
        assert chunk["id"] == 'id"1\n'
        assert chunk["created"] == 5


def test_constants_and_sse_event() -> None:
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert SSE_HEARTBEAT.startswith(b":")
    assert SSE_HEARTBEAT.endswith(b"\n\n")
    event = sse_event(UsageBody.of(Usage(prompt_tokens=2, completion_tokens=3)))
    assert parse_frame(event) == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_chat_completion_body_is_frozen() -> None:
    parsed = decode_body(body())
    assert isinstance(parsed, ChatCompletionBody)
    with pytest.raises(AttributeError):
        parsed.model = "other"  # type: ignore[misc]
