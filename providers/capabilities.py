"""What one provider can honour of a request: which options and which kinds of content part.

A request that sets something its provider cannot honour is refused before any upstream call,
with a 400 naming the field or the part, so nothing a client set is silently left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from providers.errors import UnsupportedFeatureError
from providers.types import OPTION_FIELDS, PART_KINDS, ChatRequest

# Content parts that need more than text: the names of their `type` on the wire.
MEDIA_PARTS = ("image_url", "input_audio", "file")


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """The options (fields of `Options`) and media parts a provider takes."""

    options: frozenset[str]
    parts: frozenset[str]

    def restricted(self, parts: Iterable[str] | None) -> Capabilities:
        """The same, taking only the media parts an operator allows (None: no restriction)."""
        if parts is None:
            return self
        return Capabilities(options=self.options, parts=self.parts & frozenset(parts))

    def check(self, provider: str, request: ChatRequest) -> None:
        """Raise `UnsupportedFeatureError` naming the first field or part not taken."""
        options = self.options
        for field in OPTION_FIELDS:
            if field not in options and getattr(request, field) is not None:
                raise UnsupportedFeatureError(
                    f"'{field}' is not supported by provider '{provider}'; "
                    "leave it out or use a model of another provider.",
                    param=field,
                )
        parts = self.parts
        for i, message in enumerate(request.messages):
            content = message.content
            if content is None or isinstance(content, str):
                continue
            for j, part in enumerate(content):
                kind = PART_KINDS[type(part)]
                if kind in MEDIA_PARTS and kind not in parts:
                    raise UnsupportedFeatureError(
                        f"Provider '{provider}' does not take '{kind}' content parts "
                        f"(at 'messages[{i}].content[{j}]').",
                        param=f"messages[{i}].content[{j}]",
                    )


EVERYTHING = Capabilities(options=frozenset(OPTION_FIELDS), parts=frozenset(MEDIA_PARTS))
