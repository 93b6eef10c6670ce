"""The stream journal in Redis, so that any replica can replay and follow any stream.

Per stream, two keys under `<namespace>:journal:<stream id>`: a hash (`:head`, the `Head` and
the stream's status) and a Redis Stream (`:events`) whose entry ids are `0-<seq + 1>`, so a
reader after sequence `n` simply reads after id `0-<n + 1>`, with blocking `XREAD` while the
stream is live. Writes are queued by the relay (no I/O, no await) and sent in one pipeline per
loop tick at most, one flush at a time. Keys live `live_ttl` while the stream runs (renewed by
every flush) and `ttl` once it ended; trimming follows the in-memory entry's bounds.

Fail-open: a failed flush never touches the relay. The streams in it are marked lost (their
Redis copy has a gap), their heads say so once Redis answers again, and readers elsewhere get
a clear "journal unavailable" instead of a gapped answer. Meanwhile the journal backs off (a
down Redis costs nothing per chunk) and new streams are journalled again once it answers.

Cancels and attaches travel on one pub/sub channel: every replica hears every message and acts
on the streams it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import msgspec

from server import metrics
from server.journal import TERMINAL, Entry, Record

log = logging.getLogger("tokenrelay.journal")

BLOCK_SECONDS = 1.0  # one blocking read; between them a reader looks at the stream's head
MAX_QUEUED = 50_000  # streams waiting for a flush before new ones are given up
ALIVE_TTL = 3.0  # a replica that has not said it is alive for this long has stopped
# Events outlive their head by this much: a reader that found the head finds the events too,
# and one that finds no head answers 404 whatever it read before.
OUTLIVE_MS = 1000
# Writes wait this long for company: one command per flush carries every stream's new events,
# so a replica elsewhere sees them at most this much later (a resume there waits that long
# for events its client says it has seen).
FLUSH_DELAY = 0.02

# ARGV[1]: one flush's entries, each a stream's events key, its entry id, its first seq and its
# records, length-prefixed (see `_entry`). One command and one argument per flush, whatever the
# number of streams: a pipeline of XADDs (or one argument per field) costs the gateway the
# packing of every command and argument in Python, while Redis walks the blob in C and Lua.
# The keys are not declared, so this journal wants a single Redis server (not a cluster).
_APPEND = """
local blob = ARGV[1]
local pos, n = 1, 0
while pos <= #blob do
  local key, id, first, records
  key, id, first, records, pos = struct.unpack('>Hc0Hc0I4I4c0', blob, pos)
  redis.call('XADD', key, id, 'f', first, 'r', records)
  n = n + 1
end
return n
"""
_PREFIX = struct.Struct(">H")
_COUNTS = struct.Struct(">II")


def _entry(key: str, entry_id: str, first: int, records: bytes) -> bytes:
    """One stream's entry in the blob `_APPEND` reads."""
    k, i = key.encode(), entry_id.encode()
    prefix, count = _PREFIX.pack, _COUNTS.pack
    return b"".join((prefix(len(k)), k, prefix(len(i)), i, count(first, len(records)), records))


encode_records = msgspec.msgpack.Encoder().encode
decode_records = msgspec.msgpack.Decoder(list[Record]).decode


class _Batch:
    """One stream's writes between two flushes."""

    __slots__ = ("entry", "keys", "opened", "first", "records", "trim", "ended")

    def __init__(self, entry: Entry, keys: tuple[str, str]) -> None:
        self.entry = entry
        self.keys = keys  # its head's and its events' Redis keys
        self.opened = False
        self.first = -1  # sequence number of records[0]
        self.records: list[Record] = []
        self.trim: int | None = None
        self.ended = False


class JournalUnavailable(Exception):
    """Redis cannot be read now, or this stream's copy in it is incomplete."""


class ReplicaGone(JournalUnavailable):
    """The replica running a live stream stopped (crashed, killed) before the stream ended."""


class RemoteGone(Exception):
    """The stream's keys expired (its journal_ttl ran out) while it was being read."""


class RemoteTruncated(Exception):
    def __init__(self, first: int) -> None:
        super().__init__(first)
        self.first = first


class RedisJournal:
    """Mirrors entries into Redis in batches and reads entries written by other replicas."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "tokenrelay",
        timeout: float = 0.1,
        ttl: float = 60.0,
        live_ttl: float = 600.0,
        replica: str = "",
    ) -> None:
        import redis.asyncio

        self._url = url
        self._timeout = timeout
        self.ttl = ttl
        self.live_ttl = max(live_ttl, ttl)
        self.replica = replica
        self._prefix = f"{namespace}:journal:"
        self.channel = f"{namespace}:streams:control"
        self._client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._append = self._client.register_script(_APPEND)
        # Blocking reads hold a connection for up to BLOCK_SECONDS: a client of their own.
        self._reader: Any = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=BLOCK_SECONDS + max(timeout, 0.5),
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
        )
        self._pending: dict[str, _Batch] = {}  # by stream, in the order they first wrote
        self._renewed: dict[str, float] = {}  # when each live stream's keys were last renewed
        self._scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        self._lost: dict[str, Entry] = {}  # stream id -> entry whose Redis copy has a gap
        self._announced: set[str] = set()  # lost streams whose head in Redis says so
        self._down_until = 0.0
        self._backoff = 0.0
        self._last_log = 0.0
        self._control: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        # Set at shutdown. The background loops stop on it, not only on their cancel: redis-py
        # may swallow a cancel that lands inside a command, and a loop that went on after
        # that would hold the process's shutdown forever.
        self._stopping = False

    # -- writing (called by the relay: queue only) ------------------------------------------

    def opened(self, entry: Entry) -> None:
        batch = self._batch(entry)
        if batch is not None:
            batch.opened = True

    def append(self, entry: Entry, seq: int, record: Record) -> None:
        batch = self._batch(entry)
        if batch is not None:
            if batch.first < 0:
                batch.first = seq
            batch.records.append(record)

    def trim(self, entry: Entry) -> None:
        batch = self._batch(entry)
        if batch is not None:
            batch.trim = entry.base

    def ended(self, entry: Entry) -> None:
        batch = self._batch(entry)
        if batch is not None:
            batch.ended = True
        elif entry.head.stream_id in self._lost:
            self._schedule()  # once its head says "lost", it is forgotten

    def _batch(self, entry: Entry) -> _Batch | None:
        """The stream's writes waiting for the next flush (None: it is not mirrored)."""
        stream_id = entry.head.stream_id
        batch = self._pending.get(stream_id)
        if batch is not None:
            return batch
        if stream_id in self._lost:
            return None
        if time.monotonic() < self._down_until or len(self._pending) >= MAX_QUEUED:
            self._lose(entry)
            return None
        batch = self._pending[stream_id] = _Batch(entry, self._key(stream_id))
        self._schedule()
        return batch

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self._kick)

    def _kick(self) -> None:
        self._scheduled = False
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        else:
            self._schedule()  # after the flush in progress

    def _lose(self, entry: Entry) -> None:
        if entry.head.stream_id not in self._lost:
            self._lost[entry.head.stream_id] = entry
            self._renewed.pop(entry.head.stream_id, None)
            metrics.JOURNAL_WRITE_FAILURES.inc()

    def _key(self, stream_id: str) -> tuple[str, str]:
        base = self._prefix + stream_id
        return base + ":head", base + ":events"

    async def _flush(self) -> None:
        """Send what is queued in one pipeline; a failure loses those streams' Redis copies."""
        if time.monotonic() < self._down_until:
            return  # `_failed` scheduled the next attempt
        if not self._pending and not self._lost:
            return
        batches, self._pending = self._pending, {}
        try:
            await self._write(list(batches.values()))
        except Exception as exc:  # any failure: those streams lose their Redis copy
            for batch in batches.values():
                self._lose(batch.entry)
            self._failed(exc)
            return
        if self._backoff:
            log.info("stream journal: Redis answering again")
        self._backoff = 0.0

    async def _write(self, batches: list[_Batch]) -> None:
        live_px = int(self.live_ttl * 1000)
        ended_px = max(int(self.ttl * 1000), 1)
        now = time.monotonic()
        renew_after = self.live_ttl / 4
        entries: list[bytes] = []
        async with self._client.pipeline(transaction=False) as pipe:
            for batch in batches:
                entry = batch.entry
                head_key, events_key = batch.keys
                if batch.opened:
                    head = entry.head
                    pipe.hset(
                        head_key,
                        mapping={
                            "owner": head.owner,
                            "created": head.created,
                            "include_usage": int(head.include_usage),
                            "model": head.model,
                            "replica": head.replica,
                            "status": "live",
                        },
                    )
                    pipe.pexpire(head_key, live_px)
                records = batch.records
                if records:
                    first = batch.first
                    if first == 0:  # the model that answers is known at the first output
                        pipe.hset(head_key, "model", entry.head.model)
                    # One entry per stream and flush, its id its last record's seq + 1.
                    entry_id = f"0-{first + len(records)}"
                    entries.append(_entry(events_key, entry_id, first, encode_records(records)))
            if entries:  # every stream's entry in one command: Redis does the loop
                await self._append(args=[b"".join(entries)], client=pipe)
            for batch in batches:
                stream_id = batch.entry.head.stream_id
                head_key, events_key = batch.keys
                if batch.trim is not None:
                    # Exact: redis-py trims approximately by default, which keeps whole
                    # 100-entry nodes, so a replica would serve what the bounds dropped.
                    pipe.xtrim(events_key, minid=f"0-{batch.trim + 1}", approximate=False)
                if batch.ended:
                    pipe.hset(head_key, "status", "ended")
                    pipe.pexpire(head_key, ended_px)
                    pipe.pexpire(events_key, ended_px + OUTLIVE_MS)
                    self._renewed.pop(stream_id, None)
                elif now - self._renewed.get(stream_id, -renew_after) >= renew_after:
                    # A live stream's keys expire only if its replica stops renewing them.
                    self._renewed[stream_id] = now
                    pipe.pexpire(head_key, live_px)
                    pipe.pexpire(events_key, live_px + OUTLIVE_MS)
            # Streams whose copy has a gap say so, once, so readers elsewhere stop at once.
            announced = [e for sid, e in self._lost.items() if sid not in self._announced]
            for entry in announced:
                head_key, events_key = self._key(entry.head.stream_id)
                pipe.hset(head_key, mapping={"owner": entry.head.owner, "status": "lost"})
                pipe.pexpire(head_key, ended_px)
                pipe.delete(events_key)
            await pipe.execute()
        for entry in announced:
            self._announced.add(entry.head.stream_id)
        for stream_id in [sid for sid in self._announced if self._lost[sid].ended]:
            self._announced.discard(stream_id)  # ended and marked: nothing more to do
            del self._lost[stream_id]

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(self._backoff * 2 or 0.25, 5.0)
        self._down_until = time.monotonic() + self._backoff
        # Try again after the back-off, if only to mark the lost streams' heads.
        asyncio.get_running_loop().call_later(self._backoff + 0.01, self._schedule)
        now = time.monotonic()
        if now - self._last_log >= 30.0:
            log.warning(
                "stream journal: Redis write failed; streams go on without a shared journal",
                extra={"fields": {"error": type(exc).__name__}},
            )
            self._last_log = now

    async def healthy(self) -> bool:
        try:
            alive = bool(await self._client.ping())
        except Exception:
            return False
        if alive:
            self._down_until = 0.0
        return alive and not self._lost

    # -- reading (a stream another replica runs) --------------------------------------------

    async def head(self, stream_id: str) -> dict[str, str] | None:
        """The stream's head, or None when Redis has none; raises `JournalUnavailable`."""
        head_key, _ = self._key(stream_id)
        try:
            raw = await self._reader.hgetall(head_key)
        except Exception as exc:
            raise JournalUnavailable(str(exc) or type(exc).__name__) from exc
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def last_seq(self, stream_id: str) -> int:
        """The sequence number of the newest record in Redis (-1 when none)."""
        _, events_key = self._key(stream_id)
        try:
            found = await self._reader.xrevrange(events_key, count=1)
        except Exception as exc:
            raise JournalUnavailable(str(exc) or type(exc).__name__) from exc
        return _seq(found[0][0]) if found else -1

    async def follow(
        self, stream_id: str, after: int, idle_limit: float
    ) -> AsyncGenerator[tuple[int, Record], None]:
        """Records after `after`, then new ones as they are written, up to the terminal one.

        Blocking reads (no sleeping between polls); between them the head says whether the
        stream ended or was lost. Raises `RemoteTruncated` when the first record wanted was
        trimmed, `RemoteGone` when the stream expired meanwhile, and `JournalUnavailable` on a
        gap, a lost copy, Redis failing, or nothing new for `idle_limit` seconds while the
        stream claims to be live.
        """
        head_key, events_key = self._key(stream_id)
        expected = after + 1
        cursor = f"0-{after + 1}"
        idle_since = time.monotonic()
        while True:
            try:
                found = await self._reader.xread(
                    {events_key: cursor}, count=512, block=int(BLOCK_SECONDS * 1000)
                )
            except Exception as exc:
                raise JournalUnavailable(str(exc) or type(exc).__name__) from exc
            if not found:
                head = await self.head(stream_id) or {}
                status = head.get("status")
                if status == "live" and not await self.replica_alive(head.get("replica", "")):
                    raise ReplicaGone(f"the replica running {stream_id} stopped")
                if status == "live" and time.monotonic() - idle_since < idle_limit:
                    continue
                if status == "ended":
                    return  # nothing after `after`
                if status is None:
                    raise RemoteGone(stream_id)
                raise JournalUnavailable(f"the journal of {stream_id} is {status or 'gone'}")
            idle_since = time.monotonic()
            for entry_id, fields in found[0][1]:
                first = int(fields[b"f"])
                records = decode_records(fields[b"r"])
                if first > expected:
                    if expected == after + 1:
                        raise RemoteTruncated(first)
                    raise JournalUnavailable(f"the journal of {stream_id} has a gap")
                for seq, record in enumerate(records, first):
                    if seq < expected:
                        continue  # the entry began before the sequence asked for
                    yield seq, record
                    if isinstance(record, TERMINAL):
                        return
                    expected = seq + 1
                cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    # -- control: cancel and attach across replicas -----------------------------------------

    async def publish(self, kind: str, stream_id: str) -> bool:
        try:
            await self._client.publish(self.channel, f"{kind} {stream_id}")
        except Exception:
            return False
        return True

    def listen(self, handler: Callable[[str, str], None]) -> None:
        """Hear every replica's control messages (resubscribing after a failure), and say
        that this replica is alive, so readers elsewhere know when its streams are orphans."""
        self._control = asyncio.create_task(self._listen(handler))
        self._beat = asyncio.create_task(self._heartbeat())

    def _alive_key(self, replica: str) -> str:
        return f"{self._prefix}replica:{replica}"

    async def _heartbeat(self) -> None:
        key = self._alive_key(self.replica)
        while not self._stopping:
            try:
                await self._client.set(key, b"1", px=int(ALIVE_TTL * 1000))
            except Exception:
                await asyncio.sleep(0.25)  # say it again soon once Redis is back
                continue
            await asyncio.sleep(ALIVE_TTL / 3)

    async def replica_alive(self, replica: str) -> bool:
        """Whether the replica that wrote a head still says it is alive (True when unknown)."""
        if not replica:
            return True
        try:
            return bool(await self._reader.exists(self._alive_key(replica)))
        except Exception as exc:
            raise JournalUnavailable(str(exc) or type(exc).__name__) from exc

    async def _listen(self, handler: Callable[[str, str], None]) -> None:
        import redis.asyncio

        backoff = 0.0
        while not self._stopping:
            client: Any = redis.asyncio.Redis.from_url(
                self._url, socket_connect_timeout=self._timeout, health_check_interval=10
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    backoff = 0.0
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        kind, _, stream_id = message["data"].decode().partition(" ")
                        handler(kind, stream_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                backoff = min(backoff * 2 or 0.25, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff)

    async def aclose(self) -> None:
        """Send what is queued (briefly), stop listening, close the clients."""
        self._stopping = True
        if self._pending and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush())
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flushing, 2.0)
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(BaseException):
                await self._beat
            with contextlib.suppress(Exception):  # a clean stop: its streams are not orphans
                await self._client.delete(self._alive_key(self.replica))
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(BaseException):
                await self._control
        await self._client.aclose()
        await self._reader.aclose()


def _seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[2]) - 1
