"""providers.sse.SSEDecoder: events from raw bytes, however the bytes are split."""

from __future__ import annotations

import random

import pytest

from providers.sse import SSEDecoder

Events = list[tuple[bytes | None, bytes]]

STREAM = (
    b": this is a comment\n"
    b"\n"
    b'data: {"a":1}\n'
    b"\n"
    b"event: message_start\n"
    b'data: {"type":"message_start"}\n'
    b"\n"
    b"id: 7\n"
    b"retry: 1000\n"
    b"data:no-space\n"
    b"\n"
    b"event: ping\r\n"
    b"data: crlf line\r\n"
    b"\r\n"
    b"data: first line\n"
    b": a comment between data lines\n"
    b"data: second line\n"
    b"data:\n"
    b"data:  two leading spaces\n"
    b"\n"
    b"event: content_block_delta\n"
    b'data: {"text":"caf\xc3\xa9 \xf0\x9f\x8e\x89"}\n'
    b"\n"
    b"event:   spaced   \n"
    b"data: x\n"
    b"\n"
    b"event: no_data_is_dropped\n"
    b"\n"
    b"data: [DONE]\n"
    b"\n"
)

EXPECTED: Events = [
    (None, b'{"a":1}'),
    (b"message_start", b'{"type":"message_start"}'),
    (None, b"no-space"),
    (b"ping", b"crlf line"),
    (None, b"first line\nsecond line\n\n two leading spaces"),
    (b"content_block_delta", b'{"text":"caf\xc3\xa9 \xf0\x9f\x8e\x89"}'),
    (b"spaced", b"x"),
    (None, b"[DONE]"),
]


def feed_all(pieces: list[bytes]) -> Events:
    decoder = SSEDecoder()
    events: Events = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    return events


def test_whole_stream_at_once() -> None:
    assert feed_all([STREAM]) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_one_event_per_read() -> None:
    """Reads that each end an event, as upstreams usually send them (the decoder's quick path
    for a lone one-line `data:` event, next to every other shape)."""
    pieces = [piece + b"\n\n" for piece in STREAM.split(b"\n\n")[:-1]]
    assert b"".join(pieces) == STREAM
    assert feed_all(pieces) == EXPECTED
    assert feed_all([b"data: x\r\n\n", b"data:  y\n\n"]) == [(None, b"x"), (None, b" y")]


def test_split_at_every_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        assert feed_all([STREAM[:cut], STREAM[cut:]]) == EXPECTED, f"split at byte {cut}"


def test_split_at_every_pair_of_boundaries() -> None:
    for first in range(0, len(STREAM) + 1, 3):
        for second in range(first, len(STREAM) + 1, 5):
            pieces = [STREAM[:first], STREAM[first:second], STREAM[second:]]
            assert feed_all(pieces) == EXPECTED, f"split at bytes {first} and {second}"


@pytest.mark.parametrize("seed", range(20))
def test_random_pieces(seed: int) -> None:
    rng = random.Random(seed)
    pieces = []
    at = 0
    while at < len(STREAM):
        size = rng.randint(0, 12)
        pieces.append(STREAM[at : at + size])
        at += size
    assert b"".join(pieces) == STREAM
    assert feed_all(pieces) == EXPECTED


def test_events_are_returned_by_the_feed_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: a\ndata: 1") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [(b"a", b"1")]
    assert decoder.feed(b"data: 2\n\ndata: 3\n\ndata: 4") == [(None, b"2"), (None, b"3")]
    assert decoder.feed(b"\n\n") == [(None, b"4")]


def test_unterminated_event_is_not_emitted() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: partial\n") == []
    assert decoder.feed(b"") == []


def test_event_name_resets_after_each_event() -> None:
    assert feed_all([b"event: a\ndata: 1\n\ndata: 2\n\n"]) == [(b"a", b"1"), (None, b"2")]


def test_event_name_without_data_does_not_leak_into_next_event() -> None:
    assert feed_all([b"event: a\n\ndata: 2\n\n"]) == [(None, b"2")]


def test_crlf_only_stream() -> None:
    stream = b"event: e\r\ndata: 1\r\ndata: 2\r\n\r\n: c\r\n\r\ndata: 3\r\n\r\n"
    expected = [(b"e", b"1\n2"), (None, b"3")]
    assert feed_all([stream]) == expected
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == expected


def test_only_comments_and_blank_lines() -> None:
    assert feed_all([b": keepalive\n\n: keepalive\n\n\n\n"]) == []


def test_empty_data_field_is_an_event() -> None:
    assert feed_all([b"data:\n\n", b"data: \n\n"]) == [(None, b""), (None, b"")]
