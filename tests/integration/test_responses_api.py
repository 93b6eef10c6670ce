"""The OpenAI Responses API at the edge, driven by the real `openai` SDK.

Behind the gateway are an OpenAI-kind (`oai`) and an Anthropic-kind (`ant`) provider on the
fake upstream, whose record of each request shows what the translation sent, and the demo.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import openai
import pydantic
import pytest

from server.auth import digest, new_key
from server.settings import AuthSettings, CacheSettings, ServerSettings
from tests.fakeupstream import FakeToolCall, FakeUpstream
from tests.support.gateways import gateway_with

Model = Callable[..., str]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "strict": None,
}
KINDS = ["oai", "ant"]


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway + "/api", api_key="unused", max_retries=0) as c:
        yield c


def sent(upstream: FakeUpstream, name: str) -> dict[str, Any]:
    """The body of the one request the upstream got for a scripted model."""
    (req,) = upstream.by_model(name)
    body: dict[str, Any] = req.body
    return body


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of a raw SSE body; comments are left out."""
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.split("\n") if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.parametrize("kind", KINDS)
async def test_create_and_its_upstream_request(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    name = model(text=["Hello", " there"], prompt_tokens=7)
    response = await client.responses.create(
        model=f"{kind}/{name}",
        input="hello",
        instructions="Be brief.",
        max_output_tokens=64,
        metadata={"topic": "greeting"} if kind == "oai" else None,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.model == f"{kind}/{name}"
    assert response.output_text == "Hello there"
    assert [item.type for item in response.output] == ["message"]
    assert response.usage is not None
    assert response.usage.input_tokens == 7 and response.usage.output_tokens == 2
    assert response.instructions == "Be brief." and response.max_output_tokens == 64

    body = sent(upstream, name)
    if kind == "oai":
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ]
        assert body.get("max_completion_tokens", body.get("max_tokens")) == 64
        assert body["metadata"] == {"topic": "greeting"}
        assert response.metadata == {"topic": "greeting"}
    else:
        assert body["system"] == "Be brief."
        assert body["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": "hello"}]}
        ]
        assert body["max_tokens"] == 64


async def test_demo_provider(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="demo/echo", input="Hello demo")
    assert response.status == "completed" and response.output_text


@pytest.mark.parametrize("kind", KINDS)
async def test_raw_event_sequence(gateway: str, model: Model, kind: str) -> None:
    name = model(
        text=["Hi", "!"],
        reasoning=["hm"],
        tool_calls=[FakeToolCall("get_weather", ['{"ci', 'ty": "Paris"}'], id="call_1")],
    )
    body = {"model": f"{kind}/{name}", "input": "hello", "tools": [WEATHER], "stream": True}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/responses", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert [n for n, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    final = events[-1][1]["response"]
    assert final["id"] == created["id"] and final["status"] == "completed"
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    assert final["output"][1]["content"][0]["text"] == "Hi!"
    call = final["output"][2]
    assert call["call_id"] == "call_1" and call["name"] == "get_weather"
    assert call["arguments"] == '{"city": "Paris"}'
    text_done = next(d for n, d in events if n == "response.output_text.done")
    assert text_done["text"] == "Hi!" and text_done["output_index"] == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_helper(client: openai.AsyncOpenAI, model: Model, kind: str) -> None:
    name = model(text=["a", "b", "c"], prompt_tokens=5)
    async with client.responses.stream(model=f"{kind}/{name}", input="hello") as stream:
        deltas = [
            event.delta async for event in stream if event.type == "response.output_text.delta"
        ]
        final = await stream.get_final_response()
    assert deltas == ["a", "b", "c"]
    assert final.output_text == "abc" and final.status == "completed"
    assert final.usage is not None and final.usage.input_tokens == 5


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_round_trip_with_previous_response_id(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    call = FakeToolCall("get_weather", ['{"city": ', '"Paris"}'], id="call_7")
    first = model(tool_calls=[call])
    response = await client.responses.create(
        model=f"{kind}/{first}", input="Weather in Paris?", tools=[WEATHER]
    )
    (item,) = response.output
    assert item.type == "function_call"
    assert item.call_id == "call_7" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris"}

    second = model(text=["Sunny."])
    answer = await client.responses.create(
        model=f"{kind}/{second}",
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": "call_7", "output": "sunny, 21C"}],
        tools=[WEATHER],
    )
    assert answer.output_text == "Sunny." and answer.previous_response_id == response.id
    body = sent(upstream, second)
    if kind == "oai":
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "tool"]
        assert body["messages"][1]["tool_calls"][0]["id"] == "call_7"
        assert body["messages"][2] == {
            "role": "tool",
            "content": "sunny, 21C",
            "tool_call_id": "call_7",
        }
    else:
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][1]["content"][0]["type"] == "tool_use"
        assert body["messages"][2]["content"][0]["tool_use_id"] == "call_7"


async def test_stateless_round_trip_echoes_output_items(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream
) -> None:
    call = FakeToolCall("get_weather", ['{"city": "Oslo"}'], id="call_9")
    first = model(text=["Checking. "], reasoning=["think"], tool_calls=[call])
    question: Any = {"role": "user", "content": "Weather in Oslo?"}
    response = await client.responses.create(
        model=f"oai/{first}", input=[question], tools=[WEATHER], store=False
    )
    assert [i.type for i in response.output] == ["reasoning", "message", "function_call"]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)  # store=False keeps nothing

    second = model(text=["Cold."])
    result: Any = {"type": "function_call_output", "call_id": "call_9", "output": "-3C"}
    answer = await client.responses.create(
        model=f"oai/{second}",
        input=[question, *response.output, result],
        tools=[WEATHER],
        store=False,
    )
    assert answer.output_text == "Cold."
    messages = sent(upstream, second)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == "Checking. " or messages[1]["content"][0]["text"] == (
        "Checking. "
    )
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'


class Weather(pydantic.BaseModel):
    city: str
    degrees: int


@pytest.mark.parametrize("kind", KINDS)
async def test_parse_with_a_pydantic_model(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    name = model(text=['{"city": "Paris", ', '"degrees": 21}'])
    parsed = await client.responses.parse(
        model=f"{kind}/{name}", input="Weather in Paris as JSON", text_format=Weather
    )
    assert parsed.output_parsed == Weather(city="Paris", degrees=21)
    body = sent(upstream, name)
    if kind == "oai":
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Weather"
        assert fmt["json_schema"]["schema"]["required"] == ["city", "degrees"]
    else:
        assert body["output_config"]["format"]["schema"]["required"] == ["city", "degrees"]


@pytest.mark.parametrize("kind", KINDS)
async def test_image_input(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, kind: str
) -> None:
    name = model()  # no text: the fake answers how many images it saw
    response = await client.responses.create(
        model=f"{kind}/{name}",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {
                        "type": "input_image",
                        "image_url": f"data:image/png;base64,{PNG}",
                        "detail": "auto",
                    },
                ],
            }
        ],
    )
    assert response.output_text.startswith("saw 1 image")


@pytest.mark.parametrize("target", ["oai", "demo"])
async def test_chain_retrieve_and_delete(
    client: openai.AsyncOpenAI, model: Model, upstream: FakeUpstream, target: str
) -> None:
    def model_id() -> tuple[str, str]:
        if target == "demo":
            return "demo/echo", ""
        name = model(text=["Noted."])
        return f"oai/{name}", name

    first_model, _ = model_id()
    first = await client.responses.create(
        model=first_model, input="My name is Ada.", instructions="Only the first turn's."
    )
    second_model, second_name = model_id()
    second = await client.responses.create(
        model=second_model, input="What is my name?", previous_response_id=first.id
    )
    third_model, third_name = model_id()
    third = await client.responses.create(
        model=third_model, input="And again?", previous_response_id=second.id
    )
    if target == "oai":
        messages = sent(upstream, third_name)["messages"]
        assert [(m["role"], m["content"]) for m in messages] == [
            ("user", "My name is Ada."),
            ("assistant", "Noted."),
            ("user", "What is my name?"),
            ("assistant", "Noted."),
            ("user", "And again?"),
        ]  # the first turn's instructions are not carried over

    again = await client.responses.retrieve(third.id)
    assert again.id == third.id and again.output_text == third.output_text
    assert again.previous_response_id == second.id

    await client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(
            model=first_model, input="More?", previous_response_id=second.id
        )
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(second.id)
    assert (await client.responses.retrieve(third.id)).id == third.id


async def test_incomplete_when_cut_by_max_output_tokens(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    name = model(text=["cut"], finish_reason="length")
    response = await client.responses.create(model=f"oai/{name}", input="hi", max_output_tokens=16)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


async def test_failure_after_start_is_an_error_event(gateway: str, model: Model) -> None:
    name = model(text=["one", "two", "three"], error_after=1)
    body = {"model": f"oai/{name}", "input": "hello", "stream": True}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/responses", json=body)
    events = sse_events(response.text)
    names = [n for n, _ in events]
    assert names[-2:] == ["error", "response.failed"]
    assert "response.completed" not in names
    assert events[-1][1]["response"]["status"] == "failed"
    assert events[-2][1]["code"] and events[-2][1]["message"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


async def test_failure_before_start_is_a_json_error(
    client: openai.AsyncOpenAI, model: Model
) -> None:
    name = model(status=500, error_message="boom")
    with pytest.raises(openai.APIStatusError) as caught:
        await client.responses.create(model=f"oai/{name}", input="hi", stream=True)
    assert caught.value.status_code >= 500


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": "hi", "colour": "red"}]}, "input[0].colour"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
    ],
)
async def test_refused_fields_are_named(
    gateway: str, model: Model, upstream: FakeUpstream, extra: dict[str, Any], param: str
) -> None:
    name = model()
    body = {"model": f"oai/{name}", "input": "hi", **extra}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert upstream.by_model(name) == []


async def test_unknown_ids_and_cancel(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_nothing")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(
            model="demo/echo", input="hi", previous_response_id="resp_nothing"
        )
    assert "resp_nothing" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_nothing")
    response = await client.responses.create(model="demo/echo", input="hi")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.cancel(response.id)
    assert "background" in refused.value.message


async def test_a_response_belongs_to_its_key(upstream: FakeUpstream) -> None:
    one, two = new_key(), new_key()
    auth = AuthSettings(keys=[digest(one), digest(two)])
    with gateway_with(upstream, auth=auth) as url:
        mine = openai.AsyncOpenAI(base_url=url + "/api", api_key=one, max_retries=0)
        theirs = openai.AsyncOpenAI(base_url=url + "/api", api_key=two, max_retries=0)
        async with mine, theirs:
            response = await mine.responses.create(model="demo/echo", input="secret")
            assert (await mine.responses.retrieve(response.id)).id == response.id
            with pytest.raises(openai.NotFoundError):
                await theirs.responses.retrieve(response.id)
            with pytest.raises(openai.NotFoundError):
                await theirs.responses.create(
                    model="demo/echo", input="more", previous_response_id=response.id
                )
            with pytest.raises(openai.NotFoundError):
                await theirs.responses.delete(response.id)
            assert (await mine.responses.retrieve(response.id)).id == response.id


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_upstream(
    gateway: str, model: Model, upstream: FakeUpstream, stream: bool
) -> None:
    name = model(tokens=50, pace=0.05)
    body = {"model": f"oai/{name}", "input": "hi", "stream": stream}
    async with httpx2.AsyncClient() as http:
        if stream:
            async with http.stream("POST", gateway + "/api/responses", json=body) as response:
                async for chunk in response.aiter_bytes():
                    if b"output_text.delta" in chunk:
                        break  # first token seen: hang up
        else:
            with pytest.raises(httpx2.ReadTimeout):
                await http.post(gateway + "/api/responses", json=body, timeout=0.3)
    (recorded,) = upstream.by_model(name)
    await upstream.wait_disconnected(recorded, timeout=5)
    assert recorded.deltas_sent < 50


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"reasoning": {"effort": "high"}, "max_output_tokens": 100}, "reasoning.effort"),
        ({"temperature": 0.5}, "temperature"),
    ],
)
async def test_provider_refusals_name_the_responses_field(
    gateway: str, model: Model, upstream: FakeUpstream, extra: dict[str, Any], param: str
) -> None:
    name = model()
    body = {"model": f"ant/{name}", "input": "hi", **extra}
    async with httpx2.AsyncClient() as http:
        response = await http.post(gateway + "/api/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert upstream.by_model(name) == []


async def test_keepalive_while_the_first_token_is_awaited(make_gateway: Any, model: Model) -> None:
    name = model(text=["late"], first_token_delay=0.5)
    with make_gateway(server=ServerSettings(sse_heartbeat=0.1)) as url:
        body = {"model": f"oai/{name}", "input": "hi", "stream": True}
        async with httpx2.AsyncClient() as http:
            response = await http.post(url + "/api/responses", json=body)
        assert response.text.startswith("event: response.created\n")
        assert ": keepalive" in response.text  # comments after the lifecycle events
        names = [n for n, _ in sse_events(response.text)]
        assert names.count("response.created") == 1 and names[-1] == "response.completed"
        async with openai.AsyncOpenAI(base_url=url + "/api", api_key="x", max_retries=0) as c:
            async with c.responses.stream(model=f"oai/{name}", input="hi") as stream:
                final = await stream.get_final_response()
        assert final.output_text == "late"


async def test_demo_tools_round_trip(client: openai.AsyncOpenAI) -> None:
    first = await client.responses.create(model="demo/tools", input="Weather?", tools=[WEATHER])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    second = await client.responses.create(
        model="demo/tools",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[WEATHER],
    )
    assert second.status == "completed" and "sunny" in second.output_text


async def test_input_items_of_a_conversation(client: openai.AsyncOpenAI, model: Model) -> None:
    call = FakeToolCall("get_weather", ['{"city": "Rome"}'], id="call_3")
    first = await client.responses.create(
        model=f"oai/{model(text=['Let me see. '], tool_calls=[call])}",
        instructions="Not an item.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Weather here?"},
                    {
                        "type": "input_image",
                        "image_url": f"data:image/png;base64,{PNG}",
                        "detail": "low",
                    },
                ],
            }
        ],
        tools=[WEATHER],
    )
    second = await client.responses.create(
        model=f"oai/{model(text=['Warm.'])}",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": "call_3", "output": "30C"}],
        tools=[WEATHER],
    )
    page = await client.responses.input_items.list(second.id, order="asc")
    kinds = [item.type for item in page.data]
    assert kinds == ["message", "message", "function_call", "function_call_output"]
    question, said, asked, answered = page.data
    assert question.type == "message" and question.role == "user"
    assert [part.type for part in question.content] == ["input_text", "input_image"]
    assert said.type == "message" and said.role == "assistant"
    assert said.content[0].type == "output_text" and said.content[0].text == "Let me see. "
    assert asked.type == "function_call" and asked.call_id == "call_3"
    assert answered.type == "function_call_output" and answered.output == "30C"
    assert not page.has_more

    newest = await client.responses.input_items.list(second.id, limit=1)
    assert [item.id for item in newest.data] == [answered.id] and newest.has_more
    ids = [item.id async for item in client.responses.input_items.list(second.id, limit=1)]
    assert ids == [answered.id, asked.id, said.id, question.id]  # the SDK follows `after`
    only_first = await client.responses.input_items.list(first.id)
    assert [item.type for item in only_first.data] == ["message"]  # its answer is no input


async def test_a_cached_answer_is_a_new_response(upstream: FakeUpstream, model: Model) -> None:
    name = model(text=["cached ", "answer"])
    body = {"model": f"oai/{name}", "input": "hi"}
    with gateway_with(upstream, cache=CacheSettings(completions=True)) as url:
        async with httpx2.AsyncClient() as http:
            first = await http.post(url + "/api/responses", json=body)
            second = await http.post(url + "/api/responses", json=body)
            streamed = await http.post(url + "/api/responses", json={**body, "stream": True})
            kept = await http.get(url + "/api/responses/" + second.json()["id"])
    assert "x-tokenrelay-cache" not in first.headers
    assert second.headers["x-tokenrelay-cache"] == "hit"
    assert streamed.headers["x-tokenrelay-cache"] == "hit"
    assert second.json()["id"] != first.json()["id"]
    assert second.json()["output"][0]["content"][0]["text"] == "cached answer"
    deltas = [d["delta"] for n, d in sse_events(streamed.text) if n.endswith("output_text.delta")]
    assert deltas == ["cached ", "answer"]
    assert kept.json()["id"] == second.json()["id"]
    assert len(upstream.by_model(name)) == 1


async def test_a_fallback_answers_under_its_own_name(make_gateway: Any, model: Model) -> None:
    broken, spare = model(status=500), model(text=["spare"])
    fallbacks = {f"oai/{broken}": [f"oai/{spare}"]}
    with make_gateway(fallbacks=fallbacks) as url:
        async with openai.AsyncOpenAI(base_url=url + "/api", api_key="x", max_retries=0) as c:
            response = await c.responses.create(model=f"oai/{broken}", input="hi")
            async with c.responses.stream(model=f"oai/{broken}", input="hi") as stream:
                final = await stream.get_final_response()
    assert response.output_text == "spare" and response.model == f"oai/{spare}"
    assert final.output_text == "spare" and final.model == f"oai/{spare}"
