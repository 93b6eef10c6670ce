"""Builds providers from settings and routes `provider/model` ids to them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import anthropic
import httpx2
import msgspec
import openai

from providers import demo
from providers.anthropic import AnthropicProvider
from providers.base import Provider
from providers.errors import ModelNotFoundError
from providers.openai import OpenAIProvider

Kind = Literal["openai", "anthropic", "demo"]
OPENAI_URL = "https://api.openai.com/v1"
ANTHROPIC_URL = "https://api.anthropic.com"


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[[providers]]` table. Keys never live here: `api_key_env` names the variable."""

    name: str
    kind: Kind
    base_url: str | None = None
    api_key_env: str | None = None
    models: list[str] | None = None
    aliases: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout: float = 10.0
    first_token_timeout: float = 180.0
    idle_timeout: float = 90.0
    max_connections: int = 1000
    default_max_tokens: int = 4096
    stream_usage: bool = True
    pace: float = 0.02

    def allowed(self) -> frozenset[str] | None:
        """The allow-list, or None when the provider serves whatever its upstream has."""
        if self.models is not None:
            return frozenset(self.models)
        if self.kind == "demo":
            return frozenset(demo.MODELS)
        return None


@dataclass(frozen=True, slots=True)
class Route:
    """Where a model id goes: the provider, the upstream model name and its settings."""

    provider: Provider
    model: str
    settings: ProviderSettings


def build_provider(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    """Create one provider with its own SDK client and connection pool."""
    key = environ.get(settings.api_key_env, "") if settings.api_key_env else ""
    timeout = httpx2.Timeout(
        connect=settings.connect_timeout, read=None, write=30.0, pool=settings.connect_timeout
    )
    limits = httpx2.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=min(settings.max_connections, 100),
    )
    # The stream service enforces first-token and idle timeouts itself (read=None here),
    # and retries are the gateway's decision, so the SDKs' own retries are off.
    if settings.kind == "openai":
        return OpenAIProvider(
            name=settings.name,
            client=openai.AsyncOpenAI(
                api_key=key or "unused",
                base_url=settings.base_url or OPENAI_URL,
                max_retries=0,
                timeout=timeout,
                http_client=openai.DefaultAsyncHttpxClient(timeout=timeout, limits=limits),
            ),
            secret=key or None,
            official=settings.base_url is None or settings.base_url.rstrip("/") == OPENAI_URL,
            stream_usage=settings.stream_usage,
        )
    if settings.kind == "anthropic":
        return AnthropicProvider(
            name=settings.name,
            client=anthropic.AsyncAnthropic(
                api_key=key or "unused",
                base_url=settings.base_url or ANTHROPIC_URL,
                max_retries=0,
                timeout=timeout,
                http_client=anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits),
            ),
            secret=key or None,
            default_max_tokens=settings.default_max_tokens,
        )
    return demo.DemoProvider(name=settings.name, pace=settings.pace)


class Registry:
    """A plain mapping of provider name to provider, and the model-id routing rules."""

    def __init__(self, entries: Mapping[str, tuple[Provider, ProviderSettings]]) -> None:
        self._entries = dict(entries)
        # Bare model names (no `provider/` prefix) route where exactly one provider lists them.
        bare: dict[str, list[str]] = {}
        for name, (_, settings) in self._entries.items():
            for model in (*settings.aliases, *(settings.models or ())):
                bare.setdefault(model, []).append(name)
        self._bare = {model: names[0] for model, names in bare.items() if len(set(names)) == 1}

    @classmethod
    def from_settings(
        cls, providers: list[ProviderSettings], environ: Mapping[str, str]
    ) -> Registry:
        return cls({p.name: (build_provider(p, environ), p) for p in providers})

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> tuple[Provider, ProviderSettings]:
        return self._entries[name]

    def resolve(self, model_id: str) -> Route:
        """Route a client's model id, or raise `ModelNotFoundError` without any upstream call."""
        name, sep, model = model_id.partition("/")
        if not sep:
            name, model = self._bare.get(model_id, ""), model_id
        entry = self._entries.get(name)
        if entry is None or not model:
            raise self._not_found(model_id)
        provider, settings = entry
        upstream = settings.aliases.get(model, model)
        allowed = settings.allowed()
        if allowed is not None and upstream not in allowed and model not in settings.aliases:
            raise self._not_found(model_id)
        return Route(provider=provider, model=upstream, settings=settings)

    def _not_found(self, model_id: str) -> ModelNotFoundError:
        shown = model_id if len(model_id) <= 100 else model_id[:100] + "…"
        example = next(iter(self._entries), "demo")
        return ModelNotFoundError(
            f"The model '{shown}' does not exist or is not served here; "
            f"use 'provider/model' (providers: {', '.join(self._entries) or 'none'}), "
            f"e.g. '{example}/…', and see GET /api/models.",
            param="model",
        )

    async def aclose(self) -> None:
        for provider, _ in self._entries.values():
            await provider.aclose()
