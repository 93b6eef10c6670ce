"""The schema of one `[[providers]]` settings table."""

from __future__ import annotations

from typing import Literal

import msgspec

from providers import demo

Kind = Literal["openai", "anthropic", "demo"]


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
    transport: Literal["lean", "httpx"] = "lean"  # httpx for HTTP(S)_PROXY or HTTP/2 upstreams
    retries: int = 2
    retry_backoff: float = 0.25
    retry_max_delay: float = 4.0
    default_max_tokens: int = 4096
    stream_usage: bool = True
    pace: float = 0.02
    # Media content parts to accept (default: all the kind can take); e.g. [] for a text-only
    # model behind an OpenAI-compatible server, so images are refused before any upstream call.
    inputs: list[Literal["image_url", "input_audio", "file"]] | None = None

    def allowed(self) -> frozenset[str] | None:
        """The allow-list, or None when the provider serves whatever its upstream has."""
        if self.models is not None:
            return frozenset(self.models)
        if self.kind == "demo":
            return frozenset(demo.MODELS)
        return None
