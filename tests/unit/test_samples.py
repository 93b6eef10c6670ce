"""providers.samples: values that validate against the schemas tools and structured output use."""

from __future__ import annotations

import datetime
import enum
import json
from typing import Any, Literal

import pydantic
import pytest

from providers.samples import sample


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(pydantic.BaseModel):
    street: str
    number: int = pydantic.Field(ge=10)


class Person(pydantic.BaseModel):
    name: str
    age: int
    height: float
    member: bool
    email: str = pydantic.Field(json_schema_extra={"format": "email"})
    born: datetime.date
    seen: datetime.datetime
    colour: Colour
    kind: Literal["a", "b"]
    home: Address
    others: list[Address]
    nickname: str | None
    tags: dict[str, int]


@pytest.mark.parametrize("model", [Person, Address])
def test_pydantic_schemas_validate(model: type[pydantic.BaseModel]) -> None:
    value = sample(model.model_json_schema())
    model.model_validate(value)


def test_sample_text_fills_plain_strings() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    assert sample(schema, "hello") == {"q": "hello"}


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "integer", "minimum": 4}, 5),
        ({"type": "number"}, 1.0),
        ({"type": ["null", "boolean"]}, True),
        ({"const": 3}, 3),
        ({"default": "x", "type": "string"}, "x"),
        ({"enum": ["low", "high"]}, "low"),
        ({"anyOf": [{"type": "null"}, {"type": "integer"}]}, 1),
        ({"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}}]}, {"a": True}),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [1, 1]),
        ({"type": "object"}, {}),
        ({}, "demo"),
        ("not a schema", None),
    ],
)
def test_keywords(schema: Any, expected: Any) -> None:
    assert sample(schema) == expected


def test_recursive_refs_end() -> None:
    schema = {
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
        "$ref": "#/$defs/Node",
    }
    value = sample(schema)
    depth = 0
    while isinstance(value, dict):
        value, depth = value["next"], depth + 1
    assert 0 < depth <= 16


def test_references_that_fan_out_are_cut_off_at_a_bounded_size() -> None:
    node = {"type": "object", "properties": {f"p{i}": {"$ref": "#/$defs/n"} for i in range(8)}}
    fanned = {"$ref": "#/$defs/n", "$defs": {"n": node}}
    array = {"type": "array", "minItems": 8, "items": {"$ref": "#/$defs/a"}}
    nested = {"$ref": "#/$defs/a", "$defs": {"a": array}}
    for schema in (fanned, nested):
        assert len(json.dumps(sample(schema))) < 20_000


@pytest.mark.parametrize(
    "schema",
    [
        {"allOf": [{"$ref": 5}]},
        {"allOf": [{"$ref": "#/x"}], "x": 5},
        {"allOf": [{"$ref": "#/x"}], "x": [1]},
        {"$ref": "#/x/0", "x": [{"type": "string"}]},
        {"$ref": None},
    ],
)
def test_malformed_references_give_a_value_not_an_error(schema: dict[str, Any]) -> None:
    json.dumps(sample(schema))
