"""Builds providers from settings and routes `provider/model` ids to them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from providers import demo
from providers.base import Provider
from providers.errors import ModelNotFoundError
from providers.settings import ProviderSettings


@dataclass(frozen=True, slots=True)
class Route:
    """Where a model id goes: the provider, the upstream model name and its settings."""

    provider: Provider
    model: str
    settings: ProviderSettings


def _key(settings: ProviderSettings, environ: Mapping[str, str]) -> str:
    return environ.get(settings.api_key_env, "") if settings.api_key_env else ""


def build_provider(settings: ProviderSettings, environ: Mapping[str, str]) -> Provider:
    """Create one provider with its own SDK client; an SDK is imported only when it is used."""
    key = _key(settings, environ)
    if settings.kind == "openai":
        from providers import openai

        return openai.create(settings, key)
    if settings.kind == "anthropic":
        from providers import anthropic

        return anthropic.create(settings, key)
    return demo.DemoProvider(name=settings.name, pace=settings.pace, inputs=settings.inputs)


class Registry:
    """A plain mapping of provider name to provider, and the model-id routing rules."""

    def __init__(
        self,
        entries: Mapping[str, tuple[Provider, ProviderSettings]],
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self._entries = dict(entries)
        self._credentials = dict(credentials or {})
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
        credentials = {
            p.name: hashlib.sha256(_key(p, environ).encode()).hexdigest()[:16] for p in providers
        }
        return cls({p.name: (build_provider(p, environ), p) for p in providers}, credentials)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> tuple[Provider, ProviderSettings]:
        return self._entries[name]

    def credential_id(self, name: str) -> str:
        """A short digest of the provider's key: tells credentials apart without holding one."""
        return self._credentials.get(name, "")

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
