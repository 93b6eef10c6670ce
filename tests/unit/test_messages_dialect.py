"""The Messages codec: request mapping onto the typed request, refusals by name, answer shapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from providers.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestError,
    UpstreamRateLimitError,
    UpstreamUnavailableError,
)
from providers.types import ImagePart, JsonSchemaFormat, Message, NamedToolChoice, TextPart, Usage
from server.dialects import messages, messages_wire
from server.dialects.messages_api import estimate, speaks_messages
from server.errors import AuthenticationError
from server.rest import Collector

HELLO = [{"role": "user", "content": "hi"}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def decode(**fields: Any) -> messages.MessagesBody:
    body = {"model": "oai/x", "max_tokens": 100_000, "messages": HELLO, **fields}
    return messages.decode_messages(msgspec.json.encode(body))


def refused(**fields: Any) -> RequestError:
    with pytest.raises(RequestError) as caught:
        messages.to_request(decode(**fields))
    return caught.value


@pytest.mark.parametrize(
    ("budget", "effort"),
    [
        (1024, "minimal"),
        (2047, "minimal"),
        (2048, "low"),
        (8191, "low"),
        (8192, "medium"),
        (16384, "high"),
        (32767, "high"),
        (32768, "xhigh"),
        (64000, "xhigh"),
    ],
)
def test_thinking_budget_thresholds(budget: int, effort: str) -> None:
    request = messages.to_request(decode(thinking={"type": "enabled", "budget_tokens": budget}))
    assert request.reasoning_effort == effort


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [({"type": "adaptive"}, "medium"), ({"type": "disabled"}, "none")],
)
def test_other_thinking_modes(thinking: dict[str, Any], effort: str) -> None:
    assert messages.to_request(decode(thinking=thinking)).reasoning_effort == effort


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, "thinking.budget_tokens"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 2000},
            "thinking.budget_tokens",
        ),
        ({"thinking": {"type": "adaptive", "display": "omitted"}}, "thinking.display"),
        (
            {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}},
            "output_config.effort",
        ),
        (
            {"tool_choice": {"type": "tool", "name": "nope"}, "tools": []},
            "tool_choice",
        ),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    error = refused(**fields)
    assert error.param is not None and error.param.startswith(param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
        ({"metadata": {"user_id": "u", "org": "o"}}, "metadata.org"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_unknown_or_invalid_fields_are_refused_at_decode(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        decode(**body)
    assert caught.value.param == param


def test_max_tokens_is_required() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        messages.decode_messages(b'{"model": "oai/x", "messages": [{"role":"user","content":"a"}]}')


def test_mapping() -> None:
    body = decode(
        system=[
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "text", "text": "what?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "checking"},
                    {"type": "tool_use", "id": "t1", "name": "look", "input": {"q": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "seen"},
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
        tools=[{"name": "look", "input_schema": {"type": "object"}, "description": "d"}],
        tool_choice={"type": "tool", "name": "look", "disable_parallel_tool_use": True},
        stop_sequences=["X"],
        top_k=5,
        metadata={"user_id": "u1"},
        service_tier="standard_only",
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
    )
    request = messages.to_request(body)
    assert request.model == "oai/x" and request.max_tokens == 100_000 and request.stop == ["X"]
    assert (request.top_k, request.user, request.service_tier) == (5, "u1", "default")
    assert isinstance(request.tool_choice, NamedToolChoice)
    assert request.parallel_tool_calls is False
    assert isinstance(request.response_format, JsonSchemaFormat)
    system, user, assistant, tool, after = request.messages
    assert system == Message(role="system", content=[TextPart(text="A"), TextPart(text="B")])
    assert isinstance(user.content, list) and isinstance(user.content[0], ImagePart)
    assert user.content[0].image_url.url == f"data:image/png;base64,{PNG}"
    assert assistant.reasoning_content == "hmm" and assistant.text == "checking"
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].function.arguments == '{"q":1}'
    assert tool == Message(role="tool", content="seen", tool_call_id="t1")
    assert after.text == "and?"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "tool_result", "tool_use_id": "nope"}], "messages[0].content[0].tool_use_id"),
        (
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/bmp", "data": PNG},
                }
            ],
            "messages[0].content[0].source",
        ),
        (
            [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "!!"},
                }
            ],
            "messages[0].content[0].source",
        ),
        (
            [
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "text/plain", "data": "eA=="},
                }
            ],
            "messages[0].content[0].source.media_type",
        ),
        ([{"type": "thinking", "thinking": "x"}], "messages[0].content[0]"),
        (
            [{"type": "image", "source": {"type": "url", "url": "ftp://x/y.png"}}],
            "messages[0].content[0].source.url",
        ),
    ],
)
def test_bad_user_blocks(content: list[dict[str, Any]], param: str) -> None:
    error = refused(messages=[{"role": "user", "content": content}])
    assert error.param == param


def test_assistant_blocks_refused_by_name() -> None:
    turns = [*HELLO, {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]
    assert refused(messages=turns).param == "messages[1].content[0]"
    turns = [
        *HELLO,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "a",
                    "content": [
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
                    ],
                }
            ],
        },
    ]
    assert refused(messages=turns, tools=[{"name": "f", "input_schema": {}}]).param == (
        "messages[2].content[0].content[0]"
    )


def test_count_tokens_estimate() -> None:
    body = messages.decode_count(
        msgspec.json.encode(
            {
                "model": "oai/x",
                "system": "one two",
                "messages": [{"role": "user", "content": "three four five"}],
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            }
        )
    )
    tools = len(msgspec.json.encode(body.tools))
    assert estimate(messages.conversation(body), body) == 5 + -(-tools // 4)


def test_message_object_orders_blocks() -> None:
    collector = Collector()
    collector.text = ["Hel", "lo"]
    collector.reasoning = ["think"]
    collector.calls = {0: (["t1"], ["f"], ['{"a":', "1}"])}
    collector.reason = "tool_calls"
    collector.usage = Usage(prompt_tokens=3, completion_tokens=4)
    answer = msgspec.to_builtins(messages_wire.message_object(collector, "msg_1", "oai/x"))
    assert answer == {
        "id": "msg_1",
        "model": "oai/x",
        "content": [
            {"type": "thinking", "thinking": "think", "signature": ""},
            {"type": "text", "text": "Hello"},
            {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 3, "output_tokens": 4},
        "stop_sequence": None,
        "type": "message",
        "role": "assistant",
    }


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (InvalidRequestError("x"), "invalid_request_error"),
        (AuthenticationError("x"), "authentication_error"),
        (ModelNotFoundError("x"), "not_found_error"),
        (UpstreamRateLimitError("x"), "rate_limit_error"),
        (UpstreamUnavailableError("x"), "overloaded_error"),
        (GatewayError("x"), "api_error"),
    ],
)
def test_error_types(exc: GatewayError, kind: str) -> None:
    body = msgspec.json.decode(messages_wire.error_json(exc, "r1"))
    assert body == {"type": "error", "error": {"type": kind, "message": "x"}, "request_id": "r1"}


@pytest.mark.parametrize(
    ("path", "speaks"),
    [
        ("/api/v1/messages", True),
        ("/API/V1//messages/", True),
        ("/v1/messages", True),
        ("/api/chat/completions", False),
        ("/api/v1x", False),
    ],
)
def test_which_paths_answer_in_anthropic_shape(path: str, speaks: bool) -> None:
    assert speaks_messages(path) is speaks
