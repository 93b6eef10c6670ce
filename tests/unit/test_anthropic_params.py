"""The mapping of typed requests onto Anthropic's Messages API, edge by edge."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from providers.anthropic_params import params
from providers.errors import InvalidRequestError, UnsupportedFeatureError
from providers.types import ChatRequest, JsonSchemaFormat, Message

_decode = msgspec.json.Decoder(list[Message]).decode


def request(messages: list[dict[str, Any]], **options: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=_decode(msgspec.json.encode(messages)), **options)


def turns(messages: list[dict[str, Any]]) -> Any:
    return params(request(messages), 100)["messages"]


def test_neighbouring_turns_of_one_role_are_merged() -> None:
    assert turns(
        [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "c"},
        ]
    ) == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
    ]


def test_refusals_are_sent_as_text_and_empty_results_without_content() -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert turns(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
            {"role": "user", "content": "please"},
            {"role": "assistant", "content": None, "refusal": "still no", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "t1", "content": ""},
        ]
    )[1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
        {"role": "user", "content": [{"type": "text", "text": "please"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "still no"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]},
    ]


def test_tool_arguments_must_be_a_json_object() -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    with pytest.raises(InvalidRequestError) as caught:
        turns([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}])
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


def test_strict_tools_and_schemas_are_carried() -> None:
    tool = {"type": "function", "function": {"name": "f", "strict": True}}
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
    typed = msgspec.convert(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "q"}],
            "tools": [tool],
            "response_format": response_format,
        },
        ChatRequest,
    )
    out = params(typed, 100)
    assert out["tools"] == [
        {"name": "f", "input_schema": {"type": "object", "properties": {}}, "strict": True}
    ]
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


def test_a_schema_is_needed_for_json_output() -> None:
    typed = msgspec.convert(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "q"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "out"}},
        },
        ChatRequest,
    )
    with pytest.raises(InvalidRequestError) as caught:
        params(typed, 100)
    assert caught.value.param == "response_format.json_schema.schema"


def test_max_tokens_must_leave_room_beyond_the_thinking_budget() -> None:
    hello = [{"role": "user", "content": "q"}]
    with pytest.raises(InvalidRequestError) as caught:
        params(request(hello, reasoning_effort="medium", max_tokens=8192), 100)
    assert caught.value.param == "reasoning_effort"
    assert params(request(hello, reasoning_effort="medium", max_tokens=8193), 100)["max_tokens"]
    assert params(request(hello, reasoning_effort="max"), 100)["max_tokens"] == 100 + 32768


def test_user_and_metadata_must_agree() -> None:
    hello = [{"role": "user", "content": "q"}]
    same = params(request(hello, user="u", metadata={"user_id": "u"}), 100)
    assert same["metadata"] == {"user_id": "u"}
    with pytest.raises(InvalidRequestError) as caught:
        params(request(hello, user="u", metadata={"user_id": "v"}), 100)
    assert caught.value.param == "metadata"
    with pytest.raises(UnsupportedFeatureError):
        params(request(hello, metadata={"user_id": "u", "team": "t"}), 100)


def test_text_parts_of_system_and_tool_messages_are_not_run_together() -> None:
    call = {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    parts = [{"type": "text", "text": "Sunny."}, {"type": "text", "text": "21 C"}]
    sent = params(
        request(
            [
                {"role": "system", "content": parts},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "t1", "content": parts},
            ]
        ),
        100,
    )
    assert sent["system"] == "Sunny.\n\n21 C"
    assert sent["messages"][-1]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "t1",
            "content": [
                {"type": "text", "text": "Sunny."},
                {"type": "text", "text": "21 C"},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("own", "expected"),
    [
        (None, "A city's weather."),
        ("A city's weather.", "A city's weather."),
        ("In Celsius.", "A city's weather.\n\nIn Celsius."),
    ],
)
def test_the_format_description_becomes_the_schema_description(
    own: str | None, expected: str
) -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    if own is not None:
        schema["description"] = own
    spec = {"name": "weather", "description": "A city's weather.", "schema": schema}
    response_format = msgspec.convert(
        {"type": "json_schema", "json_schema": spec}, JsonSchemaFormat
    )
    sent = params(request([{"role": "user", "content": "q"}], response_format=response_format), 100)
    assert sent["output_config"]["format"]["schema"] == {**schema, "description": expected}
