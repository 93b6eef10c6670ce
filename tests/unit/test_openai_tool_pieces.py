"""providers.openai._tool_call: tool-call pieces in OpenAI's shape, whatever a server sends."""

from __future__ import annotations

import msgspec

from providers.openai import _Chunk, _tool_call
from providers.types import ToolCallDelta


def pieces(*chunks: str) -> list[ToolCallDelta]:
    opened: dict[int, str] = {}
    out = []
    for raw in chunks:
        chunk = msgspec.json.decode(raw, type=_Chunk)
        for position, call in enumerate(chunk.choices[0].delta.tool_calls or ()):
            out.append(_tool_call(call, position, opened))
    return out


def test_openai_shape_is_kept() -> None:
    got = pieces(
        '{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":""}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}',
    )
    assert got == [ToolCallDelta(0, "c1", "f", ""), ToolCallDelta(0, None, None, "{}")]


def test_ids_and_names_repeated_on_every_piece_are_sent_once() -> None:
    got = pieces(
        '{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":"{\\"a\\""}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f","arguments":": 1}"}}]}}]}',
    )
    assert got == [ToolCallDelta(0, "c1", "f", '{"a"'), ToolCallDelta(0, None, None, ": 1}")]


def test_missing_index_and_id_are_filled_in() -> None:
    got = pieces(
        '{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{}"}},{"function":{"name":"g","arguments":"{}"}}]}}]}'
    )
    assert [(p.index, p.name) for p in got] == [(0, "f"), (1, "g")]
    assert all(p.id and p.id.startswith("call_") for p in got)
    assert got[0].id != got[1].id


def test_calls_without_an_index_one_per_chunk_stay_apart() -> None:
    got = pieces(
        '{"choices":[{"delta":{"tool_calls":[{"id":"a","function":{"name":"f","arguments":""}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{}"}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"id":"b","function":{"name":"g","arguments":"{"}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"id":"b","function":{"arguments":"}"}}]}}]}',
        '{"choices":[{"delta":{"tool_calls":[{"function":{"name":"h","arguments":"{}"}}]}}]}',
    )
    assert [(p.index, p.id, p.name, p.arguments) for p in got[:4]] == [
        (0, "a", "f", ""),
        (0, None, None, "{}"),
        (1, "b", "g", "{"),
        (1, None, None, "}"),
    ]
    assert (got[4].index, got[4].name) == (2, "h")
