"""Resumable streams: a disconnect is not a cancel, and any replica can pick the stream up.

A stream the client asked to be resumable runs as usual, through a `Tee`: the sink that writes
every event to the stream's journal entry (see `server/journal.py`) and, while its client is
there, to that client. When the client goes away without cancelling, the stream goes on into
the journal alone, and `resume_grace` seconds after the last reader left it is stopped (outcome
`abandoned`). Readers follow the journal from any sequence number: on this replica from memory,
elsewhere from Redis. An explicit cancel (WebSocket `chat.cancel`, `POST …/cancel`) stops the
stream at once, on whichever replica runs it.

Only the principal that started a stream (its gateway key; without keys, its client address)
may read or cancel it; to anyone else it does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Protocol

from providers.errors import GatewayError, InvalidRequestError
from providers.types import Delta, FinishReason, Usage
from server import metrics
from server.chat import ERROR_WRITE_TIMEOUT, ChatService, Prepared, Sink, write_or_abort
from server.errors import (
    ErrorBody,
    JournalTruncatedError,
    JournalUnavailableError,
    StreamNotFoundError,
    error_body,
)
from server.journal import Done, Entry, Failed, Head, Journal, Record, Truncated
from server.journal_redis import (
    JournalUnavailable,
    RedisJournal,
    RemoteGone,
    RemoteTruncated,
    ReplicaGone,
)
from server.stream_state import StreamState

log = logging.getLogger("tokenrelay.resume")

RESUMABLE_HEADER = b"x-tokenrelay-resumable"
STREAM_ID_HEADER = b"x-tokenrelay-stream-id"
CANCEL_WAIT = 5.0  # how long a cancel waits for the stream's last record
# How far the Redis copy of a live stream trails its replica, as a rule (FLUSH_DELAY and one
# write; a slow Redis or a busy replica can exceed it): lookups that may be early wait this once.
REDIS_LAG = 0.1


def new_stream_id() -> str:
    """`chatcmpl-` and 128 random bits: the stream's id and its completion id."""
    return "chatcmpl-" + secrets.token_hex(16)


class Tee:
    """The sink of a resumable stream: the journal first, then the client while it is there."""

    __slots__ = ("entry", "live", "state", "task", "readers", "grace", "_held")

    def __init__(self, entry: Entry, live: Sink | None, state: StreamState) -> None:
        self.entry = entry
        self.live = live
        self.state = state
        self.task: asyncio.Future[None] | None = None  # what runs the stream (to cancel it)
        self.readers = 0  # resumed readers following it, here or on other replicas
        self.grace: asyncio.TimerHandle | None = None
        self._held: Delta | None = None  # journalled by `write_now`, not yet the client's

    async def delta(self, event: Delta) -> None:
        if event is self._held:  # in the journal already; the client refused it then
            self._held = None
        else:
            entry = self.entry
            if entry.count == 0:
                entry.head.model = self.state.model  # the model that answers: a fallback, maybe
            entry.append(event)
        live = self.live
        if live is not None:
            try:
                await live.delta(event)
            except Exception:
                self.live = None  # the client is gone; the journal goes on

    def write_now(self, event: Delta) -> bool:
        """Journal the delta, then write it to the client at once if it is there and takes it;
        False leaves it for `delta`, which then only writes it to the client."""
        entry = self.entry
        if entry.count == 0:
            return False  # the first delta names the answering model: `delta` does it
        entry.append(event)
        live = self.live
        if live is None:
            return True  # nobody to write to: journalled is delivered
        try:
            if live.write_now(event):
                return True
        except Exception:
            self.live = None  # the client is gone; the journal goes on
            return True
        self._held = event
        return False

    async def finish(self, reason: FinishReason, usage: Usage) -> None:
        state = self.state
        ttft = state.ttft
        if self.entry.count == 0:
            self.entry.head.model = state.model
        self.entry.append(
            Done(
                reason=reason,
                usage=usage,
                outcome="completed",
                model=state.model,
                ttft_ms=None if ttft is None else round(ttft * 1000, 3),
                cached=state.cached,
            )
        )
        live = self.live
        if live is not None:
            try:
                await live.finish(reason, usage)
            except Exception:
                self.live = None

    async def error(self, exc: GatewayError) -> None:
        self.entry.append(Failed(error=error_body(exc, self.state.request_id)))
        live = self.live
        if live is not None:
            try:
                await live.error(exc)
            except Exception:
                self.live = None

    def cancelled(self) -> Done | None:
        """Record the end of a stream that was stopped (None when it had already ended)."""
        if self.entry.ended:
            return None
        state = self.state
        done = Done(
            reason="cancelled",
            usage=state.usage_so_far(),
            outcome=state.cancel_cause or "client_disconnected",
            model=state.model,
        )
        self.entry.append(done)
        return done


Records = AsyncGenerator[tuple[int, Record], None]


class Follower:
    """A reader's view of a stream: its head, and its records after the sequence asked for."""

    __slots__ = ("head", "records")

    def __init__(self, head: Head, records: Records):
        self.head = head
        self.records = records


class ReplaySink(Protocol):
    """How a transport writes a journal's records to a reader."""

    async def delta(self, event: Delta) -> None: ...

    async def done(self, record: Done) -> None: ...

    async def failed(self, body: ErrorBody) -> None: ...

    async def interrupted(self, body: ErrorBody) -> None:
        """The journal failed this reader midway (not the stream's own end)."""
        ...


async def replay(
    follower: Follower, sink: ReplaySink, *, write_timeout: float, request_id: str
) -> None:
    """Write a reader's records until the stream's end. A journal failing midway ends the
    reader with that error; a write the client does not take within `write_timeout` raises
    `TimeoutError` (the caller drops the connection)."""
    records = follower.records
    try:
        async for _, record in records:
            async with asyncio.timeout(write_timeout):
                if isinstance(record, Done):
                    await sink.done(record)
                elif isinstance(record, Failed):
                    await sink.failed(record.error)
                else:
                    await sink.delta(record)
    except GatewayError as exc:
        async with asyncio.timeout(min(write_timeout, ERROR_WRITE_TIMEOUT)):
            await sink.interrupted(error_body(exc, request_id))
    finally:
        await records.aclose()


class Streams:
    """The resumable streams this replica runs, and reading any stream's journal."""

    def __init__(
        self,
        journal: Journal,
        *,
        resume_grace: float = 30.0,
        idle_limit: float = 300.0,
        replica: str = "",
    ) -> None:
        self.journal = journal
        self.mirror: RedisJournal | None = journal.mirror
        self.resume_grace = resume_grace
        self.idle_limit = idle_limit  # a remote reader gives up after this long without news
        self.replica = replica
        self._live: dict[str, Tee] = {}
        self._chores: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        """Hear cancels and attaches from other replicas (with Redis; in the running loop)."""
        if self.mirror is not None:
            self.mirror.listen(self._on_control)

    # -- the streams this replica runs ------------------------------------------------------

    def open(
        self,
        stream_id: str,
        owner: str,
        created: int,
        include_usage: bool,
        state: StreamState,
        live: Sink | None,
    ) -> Tee:
        head = Head(
            stream_id=stream_id,
            owner=owner,
            created=created,
            include_usage=include_usage,
            model=state.model,
            replica=self.replica,
        )
        tee = Tee(self.journal.open(head), live, state)
        self._live[stream_id] = tee
        return tee

    async def run(self, service: ChatService, prepared: Prepared, tee: Tee) -> None:
        """Run the stream into `tee`; a stop still ends its journal (with `cancelled`)."""
        state = tee.state
        try:
            await service.run(prepared, tee, state)
        except asyncio.CancelledError:
            done = tee.cancelled()
            live = tee.live
            if done is not None and live is not None and state.cancel_cause == "cancelled":
                with contextlib.suppress(Exception):
                    await write_or_abort(
                        live.finish("cancelled", done.usage), state, ERROR_WRITE_TIMEOUT
                    )
            raise
        finally:
            self._close(tee)

    def bind(self, tee: Tee, task: asyncio.Future[None]) -> None:
        """The task that runs the stream: a cancel or the grace time stops it. However it ends
        (even cancelled before its first step), the journal gets its end."""
        tee.task = task

        def ended(_: asyncio.Future[None]) -> None:
            tee.cancelled()  # nothing when the stream recorded its own end
            self._close(tee)

        task.add_done_callback(ended)

    def detach(self, tee: Tee) -> None:
        """The client that started the stream went away without cancelling it."""
        tee.live = None
        self._arm(tee)

    def _close(self, tee: Tee) -> None:
        if tee.grace is not None:
            tee.grace.cancel()
            tee.grace = None
        self._live.pop(tee.entry.head.stream_id, None)

    def _arm(self, tee: Tee) -> None:
        if tee.live is None and tee.readers <= 0 and tee.grace is None and not tee.entry.ended:
            loop = asyncio.get_running_loop()
            tee.grace = loop.call_later(self.resume_grace, self._abandon, tee)

    def _disarm(self, tee: Tee) -> None:
        if tee.grace is not None:
            tee.grace.cancel()
            tee.grace = None

    def _abandon(self, tee: Tee) -> None:
        tee.grace = None
        if tee.entry.ended or tee.task is None:
            return
        metrics.STREAMS_ABANDONED.inc()
        log.info(
            "resumable stream abandoned: nobody came back",
            extra={"fields": {"stream_id": tee.entry.head.stream_id}},
        )
        tee.state.cancel("abandoned")
        tee.task.cancel()

    def _stop(self, tee: Tee, lag: float = 0.0) -> bool:
        """Cancel the stream now; False when it has already ended or is being stopped."""
        if tee.entry.ended or tee.task is None or tee.state.cancel_cause is not None:
            return False
        tee.state.cancel("cancelled")
        if lag and tee.state.cancelled_at is not None:
            tee.state.cancelled_at -= lag  # the cancel arrived at another replica this earlier
        tee.task.cancel()
        return True

    def _on_control(self, kind: str, message: str) -> None:
        stream_id, _, sent = message.partition(" ")
        tee = self._live.get(stream_id)
        if tee is None:
            return
        if kind == "cancel":
            try:
                lag = max(time.time() - float(sent), 0.0) if sent else 0.0
            except ValueError:
                lag = 0.0
            self._stop(tee, min(lag, 1.0))
        elif kind == "attach":
            tee.readers += 1
            self._disarm(tee)
        elif kind == "detach":
            tee.readers = max(tee.readers - 1, 0)
            self._arm(tee)

    def _later(self, coroutine: Coroutine[object, object, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coroutine)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # -- reading and cancelling any stream --------------------------------------------------

    async def follow(self, stream_id: str, owner: str, after: int, transport: str) -> Follower:
        """A reader of the stream from after sequence `after`; raises a `GatewayError`."""
        entry = self.journal.get(stream_id)
        if entry is not None:
            if entry.head.owner != owner:
                raise _not_found(stream_id)
            if entry.status == "lost":
                raise JournalUnavailableError(f"The journal of stream {stream_id} was dropped.")
            _check_after(after, entry.last_seq())
            if after + 1 < entry.base:
                raise _truncated(stream_id, entry.base)
            metrics.STREAM_RESUMES.labels(transport, "same").inc()
            return Follower(entry.head, self._local(entry, after))
        if self.mirror is None:
            raise _not_found(stream_id)
        try:
            found = await self._remote_head(stream_id, owner)
            live = found.get("status") == "live"
            if live and not await self.mirror.replica_alive(found.get("replica", "")):
                raise ReplicaGone(stream_id)
            last = await self.mirror.last_seq(stream_id)
            if after > last and live:
                # The replica running it writes to Redis every few milliseconds: a client may
                # have seen a little more than Redis holds yet, but not more than that.
                await asyncio.sleep(REDIS_LAG)
                last = await self.mirror.last_seq(stream_id)
            _check_after(after, last)
        except ReplicaGone as exc:
            raise _orphaned(stream_id) from exc
        except JournalUnavailable as exc:
            raise _unavailable(stream_id) from exc
        head = Head(
            stream_id=stream_id,
            owner=owner,
            created=int(found.get("created") or 0),
            include_usage=found.get("include_usage") == "1",
            model=found.get("model", ""),
            replica=found.get("replica", ""),
        )
        metrics.STREAM_RESUMES.labels(transport, "other").inc()
        return Follower(head, self._remote(head, after))

    async def _remote_head(self, stream_id: str, owner: str) -> dict[str, str]:
        """The head in Redis of a stream `owner` may read; raises when there is none.

        The replica running a stream writes it to Redis every few milliseconds, so one opened
        there a moment ago (its client already holds the id) may not be in Redis yet: a head
        not found is looked for once more after `REDIS_LAG` before the stream is unknown."""
        assert self.mirror is not None
        found = await self.mirror.head(stream_id)
        if found is None:
            await asyncio.sleep(REDIS_LAG)
            found = await self.mirror.head(stream_id)
        if found is None or found.get("owner") != owner:
            raise _not_found(stream_id)
        if found.get("status") == "lost":
            raise JournalUnavailableError(
                f"Stream {stream_id} cannot be resumed here: its shared journal is "
                "incomplete (Redis failed while it ran). Only its own replica had it all."
            )
        return found

    async def _local(self, entry: Entry, after: int) -> Records:
        tee = self._live.get(entry.head.stream_id)
        if tee is not None:
            tee.readers += 1
            self._disarm(tee)
        try:
            async for item in entry.follow(after):
                yield item
        except Truncated as exc:
            raise _truncated(entry.head.stream_id, exc.first) from None
        finally:
            if tee is not None:
                tee.readers -= 1
                self._arm(tee)

    async def _remote(self, head: Head, after: int) -> Records:
        mirror = self.mirror
        assert mirror is not None
        stream_id = head.stream_id
        await mirror.publish("attach", stream_id)
        try:
            async for seq, record in mirror.follow(stream_id, after, self.idle_limit):
                if not head.model:  # the stream had no output yet when the reader came
                    with contextlib.suppress(JournalUnavailable):
                        head.model = (await mirror.head(stream_id) or {}).get("model", "")
                yield seq, record
        except RemoteTruncated as exc:
            raise _truncated(stream_id, exc.first) from None
        except RemoteGone:
            raise _not_found(stream_id) from None
        except ReplicaGone as exc:
            raise _orphaned(stream_id) from exc
        except JournalUnavailable as exc:
            raise _unavailable(stream_id) from exc
        finally:
            self._later(mirror.publish("detach", stream_id))

    async def cancel(self, stream_id: str, owner: str) -> tuple[bool, Record | None]:
        """Stop the stream wherever it runs; (whether this call stopped it, its last record).

        The record is None when the stream did not end within a few seconds of the cancel."""
        entry = self.journal.get(stream_id)
        if entry is not None:
            if entry.head.owner != owner:
                raise _not_found(stream_id)
            tee = self._live.get(stream_id)
            stopped = tee is not None and self._stop(tee)
            return stopped, await _last_record(entry.follow(entry.last_seq()), entry.terminal)
        if self.mirror is None:
            raise _not_found(stream_id)
        try:
            found = await self._remote_head(stream_id, owner)
            last = await self.mirror.last_seq(stream_id)
            stopped = False
            if found.get("status") != "ended":
                if not await self.mirror.publish("cancel", f"{stream_id} {time.time():.6f}"):
                    raise _unavailable(stream_id)
                stopped = True
            records = self.mirror.follow(stream_id, max(last - 1, -1), CANCEL_WAIT)
            return stopped, await _last_record(records, None)
        except RemoteGone:
            raise _not_found(stream_id) from None
        except (JournalUnavailable, RemoteTruncated) as exc:
            raise _unavailable(stream_id) from exc

    async def aclose(self) -> None:
        """At shutdown: no more grace timers; the streams themselves end with the server's."""
        for tee in list(self._live.values()):
            self._disarm(tee)
        for task in list(self._chores):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 1.0)
        if self.mirror is not None:
            await self.mirror.aclose()


async def _last_record(records: Records, ended: Record | None) -> Record | None:
    """Read on until the terminal record (bounded by CANCEL_WAIT)."""
    last = ended
    try:
        async with asyncio.timeout(CANCEL_WAIT):
            async for _, record in records:
                last = record
    except (TimeoutError, Truncated):
        pass
    finally:
        await records.aclose()
    return last if isinstance(last, (Done, Failed)) else None


def _check_after(after: int, last: int) -> None:
    if after > last:
        raise InvalidRequestError(
            f"'after' is {after}, past the stream's last event ({last}).", param="after"
        )


def _not_found(stream_id: str) -> StreamNotFoundError:
    return StreamNotFoundError(f"No resumable stream '{stream_id}' for this client.")


def _truncated(stream_id: str, first: int) -> JournalTruncatedError:
    return JournalTruncatedError(
        f"Stream {stream_id} no longer holds the events asked for: its journal keeps events "
        f"from {first} on (raise [streams] journal_max_events / journal_max_bytes to keep more)."
    )


def _orphaned(stream_id: str) -> JournalUnavailableError:
    return JournalUnavailableError(
        f"Stream {stream_id} cannot be resumed further: the replica running it stopped before "
        "it ended. Send the request again."
    )


def _unavailable(stream_id: str) -> JournalUnavailableError:
    return JournalUnavailableError(
        f"Stream {stream_id} cannot be resumed now: the shared journal (Redis) is unavailable. "
        "Retry shortly, or on the replica that runs it."
    )
