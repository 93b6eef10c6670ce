"""providers.registry.Registry: model-id routing, aliases and allow-lists (no upstream calls)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from providers.anthropic import AnthropicProvider
from providers.demo import DemoProvider
from providers.errors import ModelNotFoundError
from providers.openai import OpenAIProvider
from providers.registry import Registry
from providers.settings import ProviderSettings

NOWHERE = "http://127.0.0.1:9"
ENVIRON = {"K": "x"}


# Building SDK clients costs ~70 ms each, so the module shares one registry.
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry() -> AsyncIterator[Registry]:
    reg = Registry.from_settings(
        [
            ProviderSettings(
                name="openai",
                kind="openai",
                base_url=NOWHERE,
                api_key_env="K",
                models=["gpt-4o", "gpt-4o-mini", "shared"],
                aliases={"fast": "gpt-4o-mini", "smart": "gpt-4o"},
            ),
            ProviderSettings(
                name="claude",
                kind="anthropic",
                base_url=NOWHERE,
                api_key_env="K",
                models=["claude-sonnet", "shared"],
                aliases={"sonnet": "claude-sonnet", "opus": "claude-opus-4"},
            ),
            ProviderSettings(name="openrouter", kind="openai", base_url=NOWHERE),
            ProviderSettings(name="demo", kind="demo", pace=0),
        ],
        environ=ENVIRON,
    )
    yield reg
    await reg.aclose()


def test_providers_are_built_by_kind(registry: Registry) -> None:
    assert registry.names == ["openai", "claude", "openrouter", "demo"]
    assert isinstance(registry.get("openai")[0], OpenAIProvider)
    assert isinstance(registry.get("claude")[0], AnthropicProvider)
    assert isinstance(registry.get("openrouter")[0], OpenAIProvider)
    assert isinstance(registry.get("demo")[0], DemoProvider)
    for name in registry.names:
        provider, settings = registry.get(name)
        assert provider.name == name
        assert settings.name == name


@pytest.mark.parametrize(
    ("model_id", "provider", "upstream"),
    [
        ("openai/gpt-4o", "openai", "gpt-4o"),
        ("openai/gpt-4o-mini", "openai", "gpt-4o-mini"),
        ("openai/fast", "openai", "gpt-4o-mini"),
        ("openai/smart", "openai", "gpt-4o"),
        ("claude/claude-sonnet", "claude", "claude-sonnet"),
        ("claude/sonnet", "claude", "claude-sonnet"),
        # An alias may point outside the allow-list: the operator chose it.
        ("claude/opus", "claude", "claude-opus-4"),
        ("openrouter/anything-at-all", "openrouter", "anything-at-all"),
        ("openrouter/meta-llama/llama-3-8b", "openrouter", "meta-llama/llama-3-8b"),
        ("openrouter/a/b/c", "openrouter", "a/b/c"),
        ("demo/echo", "demo", "echo"),
        ("demo/reasoner", "demo", "reasoner"),
        # Bare names: routed when exactly one provider lists them (models or aliases).
        ("gpt-4o", "openai", "gpt-4o"),
        ("fast", "openai", "gpt-4o-mini"),
        ("claude-sonnet", "claude", "claude-sonnet"),
        ("opus", "claude", "claude-opus-4"),
    ],
)
def test_resolve(registry: Registry, model_id: str, provider: str, upstream: str) -> None:
    route = registry.resolve(model_id)
    assert route.provider is registry.get(provider)[0]
    assert route.settings is registry.get(provider)[1]
    assert route.model == upstream


@pytest.mark.parametrize(
    "model_id",
    [
        "openai/o1",  # outside the allow-list
        "openai/gpt-4",  # a prefix of an allowed name is not allowed
        "claude/gpt-4o",  # another provider's model
        "nobody/gpt-4o",  # unknown provider
        "OpenAI/gpt-4o",  # provider names are case sensitive
        "openai/",  # empty model part
        "/gpt-4o",  # empty provider part
        "/",
        "",
        "shared",  # listed by two providers: ambiguous
        "echo",  # the demo provider does not list bare names
        "anything-at-all",  # providers without allow-lists do not claim bare names
        "demo/nope",
        "demo/",
    ],
)
def test_not_found(registry: Registry, model_id: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(model_id)
    assert info.value.param == "model"
    assert f"'{model_id}'" in info.value.message
    assert "providers: openai, claude, openrouter, demo" in info.value.message


def test_ambiguous_bare_name_still_routes_with_prefix(registry: Registry) -> None:
    assert registry.resolve("openai/shared").settings.name == "openai"
    assert registry.resolve("claude/shared").settings.name == "claude"


def test_not_found_shortens_a_long_id(registry: Registry) -> None:
    model_id = "nobody/" + "x" * 300
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(model_id)
    assert f"'{model_id[:100]}…'" in info.value.message
    assert model_id[:101] not in info.value.message


async def test_empty_registry() -> None:
    reg = Registry({})
    with pytest.raises(ModelNotFoundError) as info:
        reg.resolve("demo/echo")
    assert "(providers: none)" in info.value.message
    await reg.aclose()


async def test_same_name_in_models_and_aliases_of_one_provider_is_not_ambiguous() -> None:
    reg = Registry.from_settings(
        [
            ProviderSettings(
                name="p",
                kind="openai",
                base_url=NOWHERE,
                models=["m", "n"],
                aliases={"m": "n"},
            )
        ],
        environ={},
    )
    try:
        route = reg.resolve("m")
        assert route.settings.name == "p"
        assert route.model == "n"
    finally:
        await reg.aclose()


@pytest.mark.parametrize(
    ("settings", "allowed"),
    [
        (ProviderSettings(name="d", kind="demo"), frozenset({"echo", "reasoner", "tools"})),
        (ProviderSettings(name="d", kind="demo", models=["echo"]), frozenset({"echo"})),
        (ProviderSettings(name="o", kind="openai"), None),
        (ProviderSettings(name="o", kind="openai", models=[]), frozenset()),
        (ProviderSettings(name="a", kind="anthropic", models=["x"]), frozenset({"x"})),
    ],
)
def test_allowed(settings: ProviderSettings, allowed: frozenset[str] | None) -> None:
    assert settings.allowed() == allowed


async def test_demo_allow_list_can_be_narrowed() -> None:
    reg = Registry.from_settings([ProviderSettings(name="d", kind="demo", models=["echo"])], {})
    try:
        assert reg.resolve("d/echo").model == "echo"
        assert reg.resolve("echo").model == "echo"
        with pytest.raises(ModelNotFoundError):
            reg.resolve("d/reasoner")
    finally:
        await reg.aclose()
