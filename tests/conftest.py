"""Shared fixtures: the fake upstream and gateways wired to it, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from providers.settings import ProviderSettings
from server.app import create_app
from server.settings import ServerSettings, Settings, WebSocketSettings, uvicorn_options
from tests.fakeupstream import FakeUpstream, Script
from tests.support.redis import RedisServer, running_redis
from tests.support.servers import serve_in_thread

UPSTREAM_KEY = "sk-fake-upstream-key-0123456789"
ENVIRON = {"FAKE_OPENAI_KEY": UPSTREAM_KEY, "FAKE_ANTHROPIC_KEY": UPSTREAM_KEY}


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=UPSTREAM_KEY).running_in_thread() as fake:
        yield fake


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session: tests keep apart by namespace and must not stop it."""
    with running_redis() as server:
        yield server


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop and start."""
    with running_redis() as server:
        yield server


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    """A fake upstream of the test's own, whose requests (e.g. `/v1/models` calls) it counts."""
    with FakeUpstream(api_key=UPSTREAM_KEY).running_in_thread() as upstream:
        yield upstream


def model_calls(upstream: FakeUpstream) -> int:
    """How many times the upstream's model list was asked for."""
    return sum(1 for r in list(upstream.requests) if r.path == "/v1/models")


def provider_settings(upstream: FakeUpstream, **overrides: Any) -> list[ProviderSettings]:
    """An OpenAI-compatible, an Anthropic and a fast demo provider, all on the fake upstream."""
    common = {"first_token_timeout": 10.0, "idle_timeout": 10.0, "retries": 0, **overrides}
    return [
        ProviderSettings(
            name="oai",
            kind="openai",
            base_url=upstream.url + "/v1",
            api_key_env="FAKE_OPENAI_KEY",
            **common,
        ),
        ProviderSettings(
            name="ant",
            kind="anthropic",
            base_url=upstream.url,
            api_key_env="FAKE_ANTHROPIC_KEY",
            **common,
        ),
        ProviderSettings(name="demo", kind="demo", pace=0.001),
    ]


GatewayFactory = Callable[..., contextlib.AbstractContextManager[str]]


@pytest.fixture
def make_gateway(upstream: FakeUpstream) -> GatewayFactory:
    """Start a gateway with provider overrides and `[server]` settings; yields its base URL."""

    @contextlib.contextmanager
    def start(
        server: ServerSettings | None = None,
        websocket: WebSocketSettings | None = None,
        fallbacks: dict[str, list[str]] | None = None,
        **provider_overrides: Any,
    ) -> Iterator[str]:
        settings = Settings(
            server=server or ServerSettings(),
            websocket=websocket or WebSocketSettings(),
            providers=provider_settings(upstream, **provider_overrides),
            fallbacks=fallbacks or {},
        )
        options = uvicorn_options(settings)
        with serve_in_thread(create_app(settings, ENVIRON), options=options) as url:
            yield url

    return start


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[str]:
    """A gateway with default settings, shared by a module's tests."""
    settings = Settings(providers=provider_settings(upstream))
    options = uvicorn_options(settings)
    with serve_in_thread(create_app(settings, ENVIRON), options=options) as url:
        yield url


@pytest.fixture
def model(upstream: FakeUpstream) -> Callable[..., str]:
    """Script a fresh upstream model name for this test: `model(tokens=3, pace=0.01)`."""

    def script(**fields: Any) -> str:
        name = f"m-{uuid.uuid4().hex[:12]}"
        upstream.scripts[name] = Script(**fields)
        return name

    return script
