"""Sample JSON values that satisfy a JSON schema: the demo provider's tool arguments and answers.

Covers what tool and structured-output schemas use in practice (OpenAI strict schemas and the
ones pydantic writes): types, enums, consts, defaults, nested objects and arrays, `anyOf` /
`oneOf` / `allOf`, local `$ref`s, common string formats and numeric bounds.
"""

from __future__ import annotations

from typing import Any

_FORMATS = {
    "date-time": "2026-01-01T12:00:00Z",
    "date": "2026-01-01",
    "time": "12:00:00",
    "email": "demo@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_MAX_DEPTH = 16
# Values one sample may hold: a schema whose `$ref`s fan out (each of several properties
# referring back to the object holding them) would otherwise ask for exponentially many.
_MAX_VALUES = 1000


def sample(schema: Any, text: str = "demo") -> Any:
    """A value valid against `schema`; strings are `text` where nothing else is asked for."""
    return _Sampler(schema if isinstance(schema, dict) else {}, text).value(schema, 0)


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


class _Sampler:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self._root = root
        self._text = text
        self._left = _MAX_VALUES

    def _resolve(self, ref: Any) -> dict[str, Any]:
        """The schema a local `$ref` points at; an empty schema for anything else."""
        node: Any = self._root
        if not isinstance(ref, str):
            return {}
        for key in ref.removeprefix("#/").split("/"):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    def value(self, schema: Any, depth: int) -> Any:
        self._left -= 1
        if not isinstance(schema, dict) or depth > _MAX_DEPTH or self._left < 0:
            return None
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        for key in ("const", "default"):
            if key in schema:
                return schema[key]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                typed = [o for o in options if not _is_null(o)]
                return self.value((typed or options)[0], depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged.update(self._resolve(part["$ref"]) if "$ref" in part else part)
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None and "properties" in schema:
            kind = "object"
        return self._typed(kind, schema, depth)

    def _typed(self, kind: Any, schema: dict[str, Any], depth: int) -> Any:
        match kind:
            case "object":
                properties = schema.get("properties")
                if not isinstance(properties, dict):
                    return {}
                return {name: self.value(sub, depth + 1) for name, sub in properties.items()}
            case "array":
                count = schema.get("minItems", 1)
                items = schema.get("items", {"type": "string"})
                count = count if isinstance(count, int) and 0 <= count <= 8 else 1
                # Each item sampled (not one repeated), so every one counts against the limit.
                return [self.value(items, depth + 1) for _ in range(count)]
            case "string":
                fmt = schema.get("format")
                if isinstance(fmt, str) and fmt in _FORMATS:
                    return _FORMATS[fmt]
                return self._text
            case "integer" | "number":
                low = schema.get("minimum", schema.get("exclusiveMinimum"))
                number = low + 1 if isinstance(low, int | float) else 1
                return int(number) if kind == "integer" else float(number)
            case "boolean":
                return True
            case "null":
                return None
            case _:
                return self._text
