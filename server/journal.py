"""The stream journal: what a resumable stream has sent, so a client can read it again.

Each resumable stream has an `Entry`: its records in order (deltas, then one terminal record:
`Done` or `Failed`), numbered by sequence from 0, and the few facts a reader needs to frame
them (`Head`). The relay appends to the entry in memory (a list append; no encoding, no I/O)
and readers on the same replica follow it from there. With Redis configured a `RedisJournal`
mirrors every entry into a Redis Stream in batches (one pipeline per loop tick at most, never
awaited by the relay), so a replica that did not run the stream can replay and follow it.

Bounds: an entry keeps at most `max_events` records and `max_bytes` (estimated) bytes, dropping
its oldest records first (a reader asking for one of them is told the journal was truncated);
all entries of a process hold at most `memory_bytes`, ended entries going first; an ended entry
is kept `ttl` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Literal

import msgspec

from providers.types import (
    FinishReason,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from server import metrics
from server.errors import ErrorBody

if TYPE_CHECKING:
    from server.journal_redis import RedisJournal

Status = Literal["live", "ended", "lost"]


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    """The last record of a stream that finished or was stopped (`reason` "cancelled")."""

    reason: FinishReason
    usage: Usage
    outcome: str  # completed | cancelled | abandoned
    model: str
    ttft_ms: float | None = None
    cached: bool = False


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    """The last record of a stream that ended with an error (as its client was told)."""

    error: ErrorBody


Record = TextDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | Done | Failed
TERMINAL = (Done, Failed)


class Head(msgspec.Struct, kw_only=True):
    """What a reader needs besides the records: who may read, and how the chunks look."""

    stream_id: str
    owner: str
    created: int
    include_usage: bool = False
    model: str = ""
    replica: str = ""


def record_size(record: Record) -> int:
    """A cheap estimate of a record's bytes (its text plus a fixed overhead)."""
    if isinstance(record, (TextDelta, ReasoningDelta, RefusalDelta)):
        return len(record.text) + 48
    if isinstance(record, ToolCallDelta):
        return len(record.arguments) + len(record.name or "") + len(record.id or "") + 64
    return 256


class Truncated(Exception):
    """The records a reader asked for were dropped by the journal's bounds."""

    def __init__(self, first: int) -> None:
        super().__init__(first)
        self.first = first  # the oldest record still held


class Entry:
    """One stream's records in memory; followers wait for more without polling."""

    __slots__ = (
        "head",
        "_records",
        "_start",
        "base",
        "count",
        "bytes",
        "status",
        "ended_at",
        "_waiters",
        "_journal",
    )

    def __init__(self, head: Head, journal: Journal) -> None:
        self.head = head
        self._records: list[Record] = []
        self._start = 0  # records before this index are dropped (compacted now and then)
        self.base = 0  # the sequence number of the oldest record held
        self.count = 0  # records ever appended: the next one's sequence number
        self.bytes = 0
        self.status: Status = "live"
        self.ended_at: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._journal = journal

    @property
    def ended(self) -> bool:
        return self.status != "live"

    @property
    def terminal(self) -> Record | None:
        """The last record once the stream has ended."""
        if self.status == "live" or self.count == 0 or self._start >= len(self._records):
            return None
        last = self._records[-1]
        return last if isinstance(last, TERMINAL) else None

    def append(self, record: Record) -> int:
        """Add the next record; returns its sequence number. A terminal record ends the entry."""
        seq = self.count
        self.count = seq + 1
        self._records.append(record)
        size = record_size(record)
        self.bytes += size
        journal = self._journal
        journal.bytes += size
        if self.count - self.base > journal.max_events or self.bytes > journal.max_bytes:
            self._trim()
        if journal.mirror is not None:
            journal.mirror.append(self, seq, record)
        if isinstance(record, TERMINAL):
            self.status = "ended"
            self.ended_at = time.monotonic()
            journal.ended(self)
        elif journal.bytes > journal.memory_bytes:
            journal.evict()
        if self._waiters:
            self._wake()
        return seq

    def _trim(self) -> None:
        """Drop the oldest records until the entry is within its bounds (keeps the newest)."""
        journal = self._journal
        records = self._records
        while len(records) - self._start > 1 and (
            self.count - self.base > journal.max_events or self.bytes > journal.max_bytes
        ):
            size = record_size(records[self._start])
            self.bytes -= size
            journal.bytes -= size
            self._start += 1
            self.base += 1
        if self._start > 256 and self._start * 2 > len(records):
            del records[: self._start]
            self._start = 0
        if journal.mirror is not None:
            journal.mirror.trim(self)

    def release(self) -> None:
        """Forget every record (the entry expired or was evicted)."""
        self._journal.bytes -= self.bytes
        self.bytes = 0
        self._records.clear()
        self._start = 0
        self.base = self.count
        if self.status == "live":
            self.status = "lost"
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def last_seq(self) -> int:
        return self.count - 1

    async def follow(self, after: int) -> AsyncGenerator[tuple[int, Record], None]:
        """Every record after sequence `after`, then each new one, until the terminal record.

        Raises `Truncated` when a record it has to give was dropped (also while following a
        reader that fell further behind than the bounds allow).
        """
        seq = after + 1
        loop = asyncio.get_running_loop()
        while True:
            if seq < self.base:
                raise Truncated(self.base)
            while seq < self.count:
                record = self._records[self._start + seq - self.base]
                yield seq, record
                seq += 1
                if isinstance(record, TERMINAL):
                    return
                if seq < self.base:
                    raise Truncated(self.base)
            if self.status != "live":
                if self.status == "lost":
                    raise Truncated(self.base)
                return
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:  # left early (cancelled): forget it
                    self._waiters.remove(waiter)


class Journal:
    """Every resumable stream's entry on this replica, bounded, with an optional Redis mirror."""

    def __init__(
        self,
        *,
        ttl: float = 60.0,
        max_events: int = 20_000,
        max_bytes: int = 4 * 1024 * 1024,
        memory_bytes: int = 256 * 1024 * 1024,
        mirror: RedisJournal | None = None,
    ) -> None:
        self.ttl = ttl
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.mirror = mirror
        self.bytes = 0
        self._entries: dict[str, Entry] = {}
        self._ended: OrderedDict[str, Entry] = OrderedDict()  # oldest end first

    def open(self, head: Head) -> Entry:
        self._expire()
        entry = Entry(head, self)
        self._entries[head.stream_id] = entry
        if self.mirror is not None:
            self.mirror.opened(entry)
        return entry

    def get(self, stream_id: str) -> Entry | None:
        self._expire()
        return self._entries.get(stream_id)

    def ended(self, entry: Entry) -> None:
        self._ended[entry.head.stream_id] = entry
        metrics.JOURNAL_BYTES.set(self.bytes)  # per stream, not per record
        if self.mirror is not None:
            self.mirror.ended(entry)

    def evict(self) -> None:
        """Over the memory bound: ended entries go first, oldest end first."""
        while self.bytes > self.memory_bytes and self._ended:
            _, entry = self._ended.popitem(last=False)
            self._entries.pop(entry.head.stream_id, None)
            entry.release()

    def _expire(self) -> None:
        if not self._ended:
            return
        now = time.monotonic()
        while self._ended:
            stream_id, entry = next(iter(self._ended.items()))
            if entry.ended_at is not None and now - entry.ended_at < self.ttl:
                break
            del self._ended[stream_id]
            self._entries.pop(stream_id, None)
            entry.release()
        metrics.JOURNAL_BYTES.set(self.bytes)
