"""A model's changes on their way to its journal: in order, in batches, with snapshots.

The owner applies a change in memory and queues its log record here; the writer commits what
is queued as one :class:`~momentum_service.store.Batch` (one atomic write, fenced by the
owner's lease), while further changes queue behind it: under load, many steps share a write
(group commit). When the batch's records would be larger than the state itself, or the log
since the last snapshot has grown past ``snapshot_ratio`` times the state, the batch carries a
snapshot of the state instead of its records (the journal then drops the log up to it), so the
journal's size and a rebuild's work stay bounded, and a ``flush_ms`` model that steps many
times per flush writes the state once rather than every gradient.

Durability ``step``: a batch is written as soon as the previous one is done, and a step waits
for its batch (:meth:`LogWriter.wait`). ``flush_ms``: a change is written at most ``flush_ms``
after it was queued, or as soon as the write before it is done if that took longer (the timer
counts from the oldest change queued, not from the end of the last write, so a slow write does
not add itself to the next change's wait); steps do not wait, unless more than
``max_pending_bytes`` are queued (back-pressure). A batch that fails is never partly written.
With ``step`` durability any failure ends the owner (its memory holds changes the journal
refused, or may not have: it is rebuilt from the journal by the next request). With ``flush_ms``
an unreachable or full store is retried until it takes the batch; a fenced write ends the owner.
A drain (:meth:`LogWriter.drain`, before a hand-back) waits for the write in flight as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StoreFull, StoreUnavailable
from ..store.base import Batch, Journal, KeyRecord, Lease, Record
from .events import Events

log = logging.getLogger("momentum_service")

__all__ = ["LogWriter", "SnapshotPolicy"]


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    ratio: float = 4.0  # a snapshot once the log since the last one exceeds this many times the state
    min_log_bytes: int = 1 << 20  # ... and at least this many bytes
    max_entries: int = 100_000  # ... or this many entries


@dataclass(slots=True)
class _Change:
    seq: int
    record: Record
    keys: list[KeyRecord]
    config: tuple[dict[str, object], str] | None


class LogWriter:
    def __init__(
        self,
        journal: Journal,
        model: str,
        inc: str,
        *,
        lease: Callable[[], Lease],
        flush_ms: Callable[[], int | None],
        replicas: Callable[[], int] = lambda: 0,
        snapshot: Callable[[], Record],
        state_bytes: Callable[[], int],
        on_lost: Callable[[BaseException], None],
        durable_seq: int = 0,
        log_bytes: int = 0,
        log_entries: int = 0,
        policy: SnapshotPolicy = SnapshotPolicy(),
        max_pending_bytes: int = 256 << 20,
        key_ttl_ms: int = 86_400_000,
        events: Events | None = None,
    ) -> None:
        self.key_ttl_ms = key_ttl_ms
        self.events = events or Events()
        self.journal, self.model, self.inc = journal, model, inc
        self._lease, self._flush_ms, self._snapshot, self._state_bytes = lease, flush_ms, snapshot, state_bytes
        self._on_lost = on_lost
        self._replicas = replicas
        self.durable_seq = durable_seq
        self.log_bytes, self.log_entries = log_bytes, log_entries
        self.policy, self.max_pending_bytes = policy, max_pending_bytes
        self._queue: list[_Change] = []
        self._last_seq = durable_seq  # the last change added (queued, being written, or written)
        self._queued_bytes = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._oldest = 0.0  # the loop's time when the oldest change in the queue was queued
        self.failed: BaseException | None = None  # the writer gave up: every wait raises this
        self.retrying: BaseException | None = None  # a flush_ms batch is being retried after this
        self.batches = 0
        self.snapshots = 0

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes

    @property
    def backlogged(self) -> bool:
        return self._queued_bytes > self.max_pending_bytes

    def add(
        self,
        seq: int,
        record: Record,
        keys: list[KeyRecord] | None = None,
        config: tuple[dict[str, object], str] | None = None,
    ) -> None:
        """Queue the record of change ``seq`` (the changes' seqs follow each other)."""
        if self.failed is not None:
            raise self.failed
        if not self.journal.durable:  # nothing to write: the memory is the only copy
            self.durable_seq = seq
            return
        if not self._queue:
            self._oldest = asyncio.get_running_loop().time()
        self._queue.append(_Change(seq, record, keys or [], config))
        self._last_seq = seq
        self._queued_bytes += record.nbytes
        self._schedule()

    def _schedule(self) -> None:
        if self._task is not None:
            return  # the running flush takes what is queued when it is done
        flush_ms = self._flush_ms()
        if flush_ms is None or self.backlogged:
            self._start()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._oldest + flush_ms / 1000, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._task is None and self._queue and self.failed is None:
            self._task = asyncio.ensure_future(self._run())

    def _waiting(self) -> bool:
        return any(s > self.durable_seq for s, _ in self._waiters)

    async def wait(self, seq: int) -> None:
        """Until change ``seq`` is in the journal (raises what made the writer give up)."""
        if self.failed is not None:
            raise self.failed
        if seq <= self.durable_seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        if self._task is None:
            self._start()  # someone waits: write now rather than at the timer
        await fut  # (a waiter that is cancelled cancels only its own future: the write goes on)

    async def drain(self) -> None:
        """Write everything queued, now, and wait for the write in flight too (the last change added may
        be in it, with nothing left queued)."""
        if self._last_seq > self.durable_seq:
            await self.wait(self._last_seq)

    def close(self, exc: BaseException) -> None:
        """Give up: every waiter, now and later, gets ``exc``; nothing more is written."""
        if self.failed is None:
            self.failed = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(self.failed)
                fut.exception()
        self._waiters.clear()
        self._queue.clear()
        self._queued_bytes = 0

    async def _run(self) -> None:
        try:
            while self._queue and self.failed is None:
                await self._write_one()
                if self._flush_ms() is not None and not self.backlogged and not self._waiting():
                    break  # flush_ms: what came meanwhile waits for the next tick, to be written with more
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.error("model %r: writing to the journal failed: %s", self.model, exc)
            if isinstance(exc, StoreUnavailable):
                exc = StoreUnavailable(
                    "the store failed while the step was being written, so it may or may not have been applied: "
                    f"retry with the same Idempotency-Key ({exc})"
                )
            self._on_lost(exc)  # which closes this writer, with what the waiters are to hear
            self.close(exc)
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            if self._queue and self.failed is None:
                self._schedule()

    async def _write_one(self) -> None:
        changes, self._queue = self._queue, []
        nbytes, self._queued_bytes = self._queued_bytes, 0
        state_bytes = self._state_bytes()
        entries = self.log_entries + len(changes)
        log_bytes = self.log_bytes + nbytes
        due = log_bytes >= max(self.policy.ratio * state_bytes, self.policy.min_log_bytes) or (
            entries >= self.policy.max_entries
        )
        # Taken now, synchronously: the state is exactly at the last change's seq.
        snapshot = self._snapshot() if nbytes > state_bytes or due else None
        configs = [c.config for c in changes if c.config is not None]
        batch = Batch(
            self.inc,
            self.durable_seq,
            changes[-1].seq,
            () if snapshot is not None else tuple(c.record for c in changes),
            snapshot,
            [k for c in changes for k in c.keys],
            configs[-1] if configs else None,
            nbytes=snapshot.nbytes if snapshot is not None else nbytes,
            key_ttl_ms=self.key_ttl_ms,
            replicas=self._replicas(),
        )
        delay = 0.05
        while True:
            try:
                await self.journal.commit(self._lease(), self.model, batch)
                break
            except (StoreUnavailable, StoreFull) as exc:
                if self._flush_ms() is None:
                    raise  # "step": the waiting steps hear of it, and the owner is rebuilt from the journal
                if self.retrying is None:
                    log.warning("model %r: the journal refused a flush (%s); retrying", self.model, exc)
                self.retrying = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self.retrying = None
        self.batches += 1
        if snapshot is not None:
            self.snapshots += 1
            self.log_bytes, self.log_entries = 0, 0
        else:
            self.log_bytes, self.log_entries = log_bytes, entries
        self.events.written(self.model, batch.nbytes, snapshot is not None, self.log_bytes)
        self._written(batch.seq)

    def _written(self, seq: int) -> None:
        self.durable_seq = seq
        still = []
        for s, fut in self._waiters:
            if s <= seq:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((s, fut))
        self._waiters = still

    async def aclose(self) -> None:
        """Write what is queued (best effort), then stop."""
        with contextlib.suppress(Exception):
            await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
