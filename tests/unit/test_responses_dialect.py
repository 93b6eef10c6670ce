"""The Responses request codec: input items into typed messages, fields mapped or refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from providers.errors import InvalidRequestError, RequestError
from providers.types import (
    JsonSchemaFormat,
    Message,
    NamedToolChoice,
    RefusalPart,
    TextPart,
)
from server.dialects import responses
from server.dialects.responses_api import responses_param


def decode(**body: Any) -> tuple[responses.ResponsesBody, list[Message]]:
    decoded = responses.decode_body(json.dumps({"model": "demo/echo", **body}).encode())
    return decoded, responses.input_messages(decoded)


def test_a_string_input_with_instructions() -> None:
    body, given = decode(input="hi", instructions="Be brief.", max_output_tokens=20)
    request = responses.to_request(body, [], given)
    assert request.messages == [
        Message(role="system", content="Be brief."),
        Message(role="user", content="hi"),
    ]
    assert request.max_tokens == 20
    assert given == [Message(role="user", content="hi")]  # instructions are not history


def test_one_assistant_turn_from_its_items() -> None:
    _, given = decode(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "content": [
                {"type": "reasoning_text", "text": "think"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": [],
                          "logprobs": []}, {"type": "refusal", "refusal": "no"}]},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f",
             "arguments": "{}", "status": "completed"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ]
    )  # fmt: skip
    assert [m.role for m in given] == ["user", "assistant", "tool"]
    turn = given[1]
    assert turn.content == [TextPart(text="Checking."), RefusalPart(refusal="no")]
    assert turn.reasoning_content == "think"
    assert turn.tool_calls is not None and turn.tool_calls[0].id == "c1"
    assert given[2] == Message(role="tool", content="done", tool_call_id="c1")


def test_formats_tools_and_choice_are_mapped() -> None:
    body, given = decode(
        input="x",
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "W", "schema": {"type": "object"}},
              "verbosity": "low"},
        reasoning={"effort": "low"},
        store=False,
    )  # fmt: skip
    request = responses.to_request(body, [], given)
    assert isinstance(request.response_format, JsonSchemaFormat)
    assert request.response_format.json_schema.name == "W"
    assert isinstance(request.tool_choice, NamedToolChoice)
    assert request.tools is not None and request.tools[0].function.strict is True
    assert request.reasoning_effort == "low" and request.verbosity == "low"
    assert request.store is None and not body.stored  # the gateway's own, not the upstream's


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "nope": 1}, "nope"),
        ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
         "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
         "input[0].content[0].file_id"),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]},
         "input[0].encrypted_content"),
        ({"input": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"input": "x", "max_tool_calls": 2}, "max_tool_calls"),
        ({"input": "x", "prompt": {"id": "p"}}, "prompt"),
        ({}, "input"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        decoded, given = decode(**body)
        responses.to_request(decoded, [], given)
    assert caught.value.param == param


def test_an_unanswered_call_is_refused_as_input() -> None:
    body, given = decode(
        input=[
            {"role": "user", "content": "x"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"role": "user", "content": "y"},
        ]
    )
    with pytest.raises(InvalidRequestError) as caught:
        responses.to_request(body, [], given)
    assert caught.value.param == "input"


@pytest.mark.parametrize(
    ("typed", "named"),
    [
        ("max_tokens", "max_output_tokens"),
        ("reasoning_effort", "reasoning.effort"),
        ("response_format", "text.format"),
        ("messages[2].content[0]", "input"),
        ("tools[1].function.parameters", "tools[1].parameters"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("temperature", "temperature"),
        ("input[0].content", "input[0].content"),
    ],
)
def test_errors_name_fields_as_the_request_does(typed: str, named: str) -> None:
    assert responses_param(typed) == named
