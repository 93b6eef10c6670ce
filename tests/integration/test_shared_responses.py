"""Responses API conversations shared by two real gateway processes through a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import openai
import pytest

from server.auth import digest, new_key
from tests.conftest import UPSTREAM_KEY
from tests.fakeupstream import FakeUpstream, Script
from tests.support.process import Served, serve_process
from tests.support.redis import RedisServer

KEY, OTHER = new_key(), new_key()


def config(upstream: FakeUpstream, redis: RedisServer, namespace: str) -> str:
    return (
        'demo = false\n[server]\nlog_level = "warning"\n'
        f'[auth]\nkeys = ["{digest(KEY)}", "{digest(OTHER)}"]\n'
        f'[cache]\nurl = "{redis.url}"\nnamespace = "{namespace}"\ntimeout = 1.0\n'
        "[responses]\nttl = 600.0\n"
        f'[[providers]]\nname = "oai"\nkind = "openai"\nbase_url = "{upstream.url}/v1"\n'
        'api_key_env = "UPSTREAM_KEY"\nretries = 0\n'
    )


ENV = {"UPSTREAM_KEY": UPSTREAM_KEY}


@pytest.fixture
def setup(upstream: FakeUpstream, fresh_redis: RedisServer) -> Iterator[str]:
    yield config(upstream, fresh_redis, uuid.uuid4().hex)


def client(served: Served, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/api", api_key=key, max_retries=0)


def scripted(upstream: FakeUpstream, text: str) -> str:
    name = f"m-{uuid.uuid4().hex[:12]}"
    upstream.scripts[name] = Script(text=[text])
    return f"oai/{name}"


def test_a_conversation_moves_between_replicas_and_survives_a_restart(
    upstream: FakeUpstream, setup: str
) -> None:
    with serve_process(setup, env=ENV) as one, serve_process(setup, env=ENV) as two:
        with client(one) as a, client(two) as b, client(two, OTHER) as other:
            first = a.responses.create(model=scripted(upstream, "Hi Ada."), input="I am Ada.")
            model = scripted(upstream, "You are Ada.")
            with b.responses.stream(
                model=model, input="Who am I?", previous_response_id=first.id
            ) as stream:
                second = stream.get_final_response()
            messages = upstream.by_model(model.removeprefix("oai/"))[0].body["messages"]
            assert [(m["role"], m["content"]) for m in messages] == [
                ("user", "I am Ada."),
                ("assistant", "Hi Ada."),
                ("user", "Who am I?"),
            ]
            assert a.responses.retrieve(second.id).output_text == "You are Ada."
            with pytest.raises(openai.NotFoundError):
                other.responses.retrieve(second.id)
            with pytest.raises(openai.NotFoundError):
                other.responses.create(model=model, input="Me?", previous_response_id=second.id)
            a.responses.delete(first.id)
            with pytest.raises(openai.NotFoundError):
                b.responses.retrieve(first.id)
    with serve_process(setup, env=ENV) as again, client(again) as c:
        kept = c.responses.retrieve(second.id)
        assert kept.output_text == "You are Ada." and kept.previous_response_id == first.id
        third = c.responses.create(
            model=scripted(upstream, "Still Ada."), input="Sure?", previous_response_id=second.id
        )
        assert third.output_text == "Still Ada."


def test_an_unreadable_store_is_an_error_naming_the_id(
    upstream: FakeUpstream, fresh_redis: RedisServer, setup: str
) -> None:
    with serve_process(setup, env=ENV) as one, client(one) as a:
        first = a.responses.create(model=scripted(upstream, "Hello."), input="Hi.")
        fresh_redis.stop()
        try:
            with pytest.raises(openai.APIStatusError) as caught:
                a.responses.create(
                    model=scripted(upstream, "never"), input="More.", previous_response_id=first.id
                )
            assert caught.value.status_code == 503
            error = caught.value.body
            assert isinstance(error, dict) and error["param"] == "previous_response_id"
            assert error["code"] == "store_unavailable" and first.id in error["message"]
            # A new conversation needs no stored state: it is still served.
            fresh = a.responses.create(model=scripted(upstream, "New."), input="Hi.")
            assert fresh.output_text == "New."
        finally:
            fresh_redis.start()
