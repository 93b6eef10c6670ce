"""The in-memory stream journal: numbering, following, bounds, expiry (pure logic, no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from providers.types import TextDelta, Usage
from server.journal import Done, Entry, Head, Journal, Record, Truncated


def head(stream_id: str = "chatcmpl-x") -> Head:
    return Head(stream_id=stream_id, owner="k", created=1)


def done() -> Done:
    return Done(reason="stop", usage=Usage(), outcome="completed", model="m")


async def collect(entry: Entry, after: int) -> list[tuple[int, Record]]:
    return [item async for item in entry.follow(after)]


async def test_records_are_numbered_and_followed_to_the_end() -> None:
    journal = Journal()
    entry = journal.open(head())
    assert [entry.append(TextDelta(f"t{i}")) for i in range(3)] == [0, 1, 2]

    async def finish_later() -> None:
        await asyncio.sleep(0.01)
        entry.append(TextDelta("t3"))
        entry.append(done())

    task = asyncio.create_task(finish_later())
    got = await asyncio.wait_for(collect(entry, 0), 2)
    await task
    assert [seq for seq, _ in got] == [1, 2, 3, 4]
    assert got[-1][1] == done() and entry.ended and entry.terminal == done()
    assert await collect(entry, 4) == []  # after the end: nothing more


async def test_bounds_drop_the_oldest_and_a_reader_behind_them_is_told() -> None:
    journal = Journal(max_events=4)
    entry = journal.open(head())
    for i in range(10):
        entry.append(TextDelta(f"t{i}"))
    assert entry.base == 6 and entry.last_seq() == 9
    with pytest.raises(Truncated) as caught:
        await collect_until(entry, -1, 1)
    assert caught.value.first == 6
    entry.append(done())
    assert [seq for seq, _ in await collect(entry, 6)] == [7, 8, 9, 10]


async def collect_until(entry: Entry, after: int, count: int) -> list[tuple[int, Record]]:
    got = []
    async for item in entry.follow(after):
        got.append(item)
        if len(got) == count:
            break
    return got


async def test_byte_bound_per_stream_and_memory_bound_for_all() -> None:
    journal = Journal(max_bytes=1000, memory_bytes=3000)
    entry = journal.open(head("a"))
    for _ in range(10):
        entry.append(TextDelta("x" * 200))
    assert entry.bytes <= 1000 and entry.base > 0
    ended = []
    for name in ("b", "c", "d", "e"):
        other = journal.open(head(name))
        other.append(TextDelta("y" * 600))
        other.append(done())
        ended.append(other)
    # Over the process bound, ended entries go first, oldest first; the live one stays.
    assert journal.bytes <= 3000
    assert journal.get("a") is entry
    assert journal.get("b") is None and ended[0].status == "ended" and ended[0].count == 2


async def test_ended_entries_expire_after_the_ttl() -> None:
    journal = Journal(ttl=0.05)
    entry = journal.open(head())
    entry.append(done())
    assert journal.get("chatcmpl-x") is entry
    await asyncio.sleep(0.08)
    assert journal.get("chatcmpl-x") is None
    assert journal.bytes == 0


async def test_a_waiting_follower_that_is_cancelled_leaves_no_waiter() -> None:
    journal = Journal()
    entry = journal.open(head())
    task = asyncio.create_task(collect(entry, -1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert entry._waiters == []
