"""A model's owner: the one process that serves the model's steps, from memory.

The owner holds the model's :class:`~.state.ModelState` and applies every change to it in
order (one at a time, under a lock: steps on one model never race), queueing each change's log
record with its :class:`~.writer.LogWriter`. It answers a step once the step is as durable as
the model's ``durability`` asks: written to the journal (``step``) or applied in memory
(``flush_ms``). It is built from the journal (:meth:`ModelOwner.load`: the latest snapshot,
then the log replayed through the same kernel) when its process takes the model's lease, and
it ends (:meth:`ModelOwner.invalidate`) when the lease is lost or a write fails in a way that
leaves its memory ahead of the journal; the next request then builds a new one.

The pieces it composes are each tested alone: :mod:`.idempotency` (exactly-once keys),
:mod:`.modes` (what async and bounded pushes must satisfy), :mod:`.sync` (averaging a sync
step's contributions), :mod:`.writer` (durability, group commit, snapshots) and :mod:`.state`
(the state and its one transition function).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import ModelConfig
from ..errors import (
    InvalidConfig,
    ModeFieldRequired,
    ModelExists,
    ModelNotFound,
    OwnerLost,
    ParamNotFound,
    ParamsExist,
    RuleChange,
    StaleGradient,
    StepAlreadyApplied,
    StoreFull,
    StoreUnavailable,
    WorkerOutOfRange,
)
from ..kernels.schedules import LRTable
from ..store.base import Array, Journal, KeyRecord, Lease, new_token
from .checkpoints import Checkpoint, Saved
from .entries import ConfigEntry, DeleteEntry, Entry, PutEntry, RestoreEntry, StepEntry, from_record, to_record
from .events import Events
from .idempotency import Guard, Idempotency
from .modes import Push, check_push, staleness
from .results import StepPending, StepResult
from .series import Point, Series
from .snapshots import from_snapshot, to_snapshot
from .state import ModelRecord, ModelState, ParamMeta, ParamRecord, check_grads, compute_step
from .sync import SyncCoordinator
from .tensors import RawTensors
from .writer import LogWriter, SnapshotPolicy

__all__ = ["EngineOptions", "ModelOwner", "OwnerLost"]

log = logging.getLogger("momentum_service")

_THREAD_THRESHOLD = 1 << 16
"""Updates bigger than this many elements are computed in a worker thread (numpy and the native kernel
release the GIL), so that one large step does not stall every other request on the event loop."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    idempotency_ttl_s: float = 86400.0
    idempotency_memory_keys: int = 100_000
    sync_timeout_s: float = 5.0
    sync_ttl_s: float = 3600.0
    snapshots: SnapshotPolicy = field(default_factory=SnapshotPolicy)
    max_pending_bytes: int = 256 << 20
    idle_s: float = 600.0  # an owner not used for this long hands its model back (with a durable journal)
    series_points: int = 10_000  # training-series points kept per model
    events: Events = field(default_factory=Events)  # what the engine tells an observer (metrics)


def summary(steps: list[int], lrs: list[float]) -> str:
    """What an idempotency record keeps of a step: each parameter's new step and lr, by position.

    Not the names: a replay carries the same body (its fingerprint matched), so the same names in
    the same order. When every parameter has the same step and lr (the usual case), one pair is
    kept: ``[step, lr]``; else ``[[steps...], [lrs...]]``, each a single value when uniform.
    """
    packed = [steps[0] if len(set(steps)) == 1 else steps, lrs[0] if len(set(lrs)) == 1 else lrs]
    return orjson.dumps(packed).decode()


def unpack_summary(text: str, names: list[str]) -> dict[str, tuple[int, float]]:
    steps, lrates = json.loads(text)
    n = len(names)
    steps = steps if isinstance(steps, list) else [steps] * n
    lrates = lrates if isinstance(lrates, list) else [lrates] * n
    return {name: (int(st), float(lr)) for name, st, lr in zip(names, steps, lrates, strict=True)}


class ModelOwner:
    def __init__(
        self,
        name: str,
        journal: Journal,
        lease: Callable[[], Lease],
        options: EngineOptions,
        lr_table: LRTable,
        valid: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name, self.journal, self.options, self.lr_table = name, journal, options, lr_table
        self._lease, self._valid = lease, valid
        self.state: ModelState | None = None
        self.lost: BaseException | None = None
        self.closing = False  # being handed back (or the process stops): no more changes are taken
        self.writer: LogWriter | None = None
        self.guard: Guard | None = None
        self.sync = SyncCoordinator(options.sync_ttl_s)
        self._lock = asyncio.Lock()
        self.series = Series(options.series_points)
        self.loaded_entries = 0  # log entries replayed by the last load
        self.last_used = time.monotonic()

    # Life cycle.

    async def load(self) -> None:
        """Build the state from the journal: the latest snapshot, then the log after it, replayed."""
        loaded = await self.journal.load(self.name)
        if loaded is None:
            self.state = None
            return
        head = loaded.head
        if loaded.snapshot is not None:
            state = from_snapshot(self.name, loaded.snapshot)
        else:
            state = ModelState(self.name, head.inc, head.rev, ModelConfig.from_dict(head.config))
        guard = self._new_guard(head.inc)
        log_bytes = 0
        for record in loaded.log:
            entry = from_record(record)
            state.replay(entry)
            log_bytes += record.nbytes
            if isinstance(entry, StepEntry) and entry.key is not None and entry.fingerprint is not None:
                names = entry.grads.names
                text = summary([entry.steps[n] + 1 for n in names], [entry.lrs[n] for n in names])
                guard.remember(KeyRecord(entry.key, entry.fingerprint, text))
        self.loaded_entries = len(loaded.log)
        self._install(state, guard, log_bytes, len(loaded.log))
        try:
            raw = await self.journal.load_points(self.name, head.inc, self.options.series_points)
            self.series = Series(self.options.series_points, [Point.loads(r) for r in raw])
        except (StoreUnavailable, ValueError, KeyError, TypeError) as exc:  # the series is not the record
            log.warning("model %r: its training series could not be read back (%s); it starts empty", self.name, exc)

    def _new_guard(self, inc: str) -> Guard:
        if not self.journal.durable:
            return Guard(self.options.idempotency_ttl_s)  # the only copy: keep every key for the TTL

        async def lookup(key: str) -> KeyRecord | None:
            return await self.journal.lookup(self.name, inc, key)

        return Guard(self.options.idempotency_ttl_s, max_keys=self.options.idempotency_memory_keys, lookup=lookup)

    def _install(self, state: ModelState, guard: Guard, log_bytes: int = 0, log_entries: int = 0) -> None:
        self.state, self.guard = state, guard
        self.writer = LogWriter(
            self.journal,
            self.name,
            state.inc,
            lease=self._lease,
            flush_ms=self._flush_ms,
            replicas=lambda: 0 if self.state is None else self.state.config.durability.replicas,
            snapshot=lambda: to_snapshot(self._live(closing_ok=True)),
            state_bytes=lambda: self._live(closing_ok=True).nbytes,
            on_lost=self.invalidate,
            durable_seq=state.seq,
            log_bytes=log_bytes,
            log_entries=log_entries,
            policy=self.options.snapshots,
            max_pending_bytes=self.options.max_pending_bytes,
            key_ttl_ms=max(1, round(self.options.idempotency_ttl_s * 1000)),
            events=self.options.events,
        )

    def _check_durability(self, config: ModelConfig) -> ModelConfig:
        """A config asking for Redis replicas (``WAIT``) only on a journal that has them."""
        if config.durability.replicas and not getattr(self.journal, "replicated", False):
            raise InvalidConfig(
                f"durability {{'replicas': {config.durability.replicas}}} needs Redis (a step is acknowledged once "
                f"Redis replicas have it); this server keeps models in its own memory (the embedded store)",
                "durability",
            )
        return config

    def _flush_ms(self) -> int | None:
        return None if self.state is None else self.state.config.durability.flush_ms

    def invalidate(self, exc: BaseException) -> None:
        """Stop serving the model: its memory can no longer be trusted to match the journal."""
        if self.lost is not None:
            return
        self.lost = OwnerLost(
            f"this server stopped serving model {self.name!r} ({exc}); retry, and the model's owner answers"
        )
        if self.writer is not None:  # the waiting steps hear why: a failed store, or "retry elsewhere"
            self.writer.close(exc if isinstance(exc, StoreUnavailable | StoreFull) else self.lost)
        self.sync.fail(self.lost)

    @property
    def usable(self) -> bool:
        return self.lost is None and not self.closing and self._valid()

    def _check(self, *, closing_ok: bool = False) -> None:
        if self.lost is not None:
            raise self.lost
        if not self._valid():
            raise OwnerLost(f"this server's lease on model {self.name!r} could not be renewed in time; retry")
        if self.closing and not closing_ok:
            raise OwnerLost(f"this server is handing model {self.name!r} over to another replica; retry")

    def _live(self, *, closing_ok: bool = False) -> ModelState:
        self._check(closing_ok=closing_ok)
        if self.state is None:
            raise ModelNotFound(self.name)
        return self.state

    def _durable(self) -> bool:
        return self.journal.durable

    async def close(self) -> None:
        """Stop taking changes, and write what is queued (best effort): before the process stops or
        the model is handed back. Every change is applied and queued under one check of
        :meth:`_check`, with no wait between, so once ``closing`` is set nothing more is queued: what
        the drain writes is every change acknowledged (a ``flush_ms`` step acknowledged while the
        drain ran would otherwise be lost with the owner's memory). With the embedded store there is
        nothing to write, and the memory is the only copy: the owner serves on (after a restart of the
        app in the same process, too)."""
        if not self._durable():
            return
        self.closing = True
        if self.writer is not None and self.lost is None:
            await self.writer.aclose()
            await self.save_points()

    def reopen(self) -> None:
        """Take changes again, after a hand-back that did not happen."""
        self.closing = False

    async def save_points(self) -> None:
        """Append the series' new points to the journal (a failure keeps them for the next time)."""
        state = self.state
        if state is None or not self.journal.durable or not self.series.unsaved:
            return
        points = self.series.take_unsaved()
        try:
            await self.journal.append_points(
                self.name, state.inc, [p.dumps() for p in points], self.options.series_points
            )
        except BaseException:
            self.series.put_back(points)
            raise

    def points(self, since: int, limit: int) -> list[Point]:
        """The training series after point ``since`` (at most ``limit``)."""
        self._live()
        return self.series.since(since, limit)

    # Reads: what is applied, once it is as durable as the model asks.

    async def _settled(self) -> ModelState:
        state = self._live()
        assert self.writer is not None
        if state.config.durability.flush_ms is None and self.writer.durable_seq < state.seq:
            await self.writer.wait(state.seq)
            state = self._live()
        return state

    async def get_model(self) -> tuple[ModelRecord, list[ParamMeta]]:
        state = await self._settled()
        return state.record, state.metas()

    async def get_params(self, names: list[str] | None, *, with_state: bool) -> dict[str, ParamRecord]:
        state = await self._settled()
        wanted = sorted(state.params) if names is None else names
        missing = [n for n in wanted if n not in state.params]
        if missing:
            raise ParamNotFound(self.name, missing)
        out = {}
        for n in wanted:
            p = state.params[n]
            out[n] = ParamRecord(n, p.value, p.state if with_state else {}, p.step)
        return out

    # Changes other than steps: applied, logged, and answered once written (whatever the durability).

    async def _change(self, entry: Entry) -> ModelState:
        state = self._live()
        assert self.writer is not None
        state.apply(entry)
        config = (entry.config, entry.rev) if isinstance(entry, ConfigEntry | RestoreEntry) else None
        self.writer.add(state.seq, to_record(entry), None, config)
        await self.writer.wait(state.seq)
        return self._live()

    async def put_model(self, config: ModelConfig, *, only_create: bool) -> tuple[ModelRecord, bool]:
        async with self._lock:
            self._check()
            self._check_durability(config)
            if self.state is None:
                inc, rev = new_token(), new_token()
                await self.journal.create(self._lease(), self.name, config.to_dict(), rev, inc)
                self._install(ModelState(self.name, inc, rev, config), self._new_guard(inc))
                return self._live().record, True
            if only_create:
                raise ModelExists(self.name, self.state.config.to_dict())
            _check_same_rule(self.name, self.state.config, config.rule.name)
            state = await self._change(ConfigEntry(config.to_dict(), new_token()))
            return state.record, False

    async def patch_model(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        mode: Mapping[str, Any] | None,
        durability: Any = None,
        groups: Any = None,
    ) -> ModelRecord:
        async with self._lock:
            current = self._live().config
            if "rule" in optimizer:
                _check_same_rule(self.name, current, optimizer["rule"])
            config = self._check_durability(current.patched(optimizer, schedule, mode, durability, groups))
            state = await self._change(ConfigEntry(config.to_dict(), new_token()))
            return state.record

    async def checkpoint(self) -> Saved:
        """The model's config and parameters as they are now (once as durable as the model asks)."""
        state = await self._settled()
        return Saved(state.config, dict(state.params))

    async def restore(self, checkpoint: Checkpoint, *, only_create: bool) -> tuple[ModelRecord, bool]:
        """Replace the model whole (config, values, state buffers, steps) by ``checkpoint``, or create it.

        One log entry replaces an existing model, so a crash never leaves it half restored. A new
        model is created first (with the checkpoint's config) and then restored: a crash between the
        two leaves it without parameters, and the client's retry (PUT is idempotent) completes it.
        The model's rule cannot change (:class:`RuleChange`, as for ``put_model``). Sync contributions
        waiting for other workers are dropped: their workers hear a 409 and go on from the restored
        steps.
        """
        async with self._lock:
            self._check()
            config = self._check_durability(checkpoint.config)
            created = self.state is None
            if created:
                inc, rev = new_token(), new_token()
                await self.journal.create(self._lease(), self.name, config.to_dict(), rev, inc)
                self._install(ModelState(self.name, inc, rev, config), self._new_guard(inc))
            elif only_create:
                assert self.state is not None
                raise ModelExists(self.name, self.state.config.to_dict())
            else:
                assert self.state is not None
                _check_same_rule(self.name, self.state.config, config.rule.name)
            entry = RestoreEntry(config.to_dict(), new_token(), checkpoint.tensors, dict(checkpoint.params))
            state = await self._change(entry)
            steps = {n: p.step for n, p in state.params.items()}
            self.sync.fail(StaleGradient("the model was restored from a checkpoint; push from its steps", steps))
            return state.record, created

    async def delete_model(self) -> None:
        async with self._lock:
            self._live()
            assert self.writer is not None
            self.writer.close(ModelNotFound(self.name))  # what is queued is deleted anyway
            await self.journal.delete(self._lease(), self.name)
            self.sync.fail(ModelNotFound(self.name))
            self.state, self.writer, self.guard = None, None, None
            self.sync = SyncCoordinator(self.options.sync_ttl_s)
            self.series = Series(self.options.series_points)

    async def put_params(self, values: RawTensors, *, only_create: bool) -> dict[str, bool]:
        async with self._lock:
            state = self._live()
            names = values.names
            if only_create:
                existing = [n for n in names if n in state.params]
                if existing:
                    raise ParamsExist(self.name, existing)
            created = {n: n not in state.params for n in names}
            await self._change(PutEntry(values))
            return created

    async def delete_param(self, name: str) -> None:
        async with self._lock:
            if name not in self._live().params:
                raise ParamNotFound(self.name, [name])
            await self._change(DeleteEntry(name))

    # Steps.

    async def step(
        self,
        grads: Mapping[str, Array],
        received: RawTensors | None,
        push: Push,
        idempotency: Idempotency | None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, StepResult] | StepPending:
        """Apply one update to every named parameter, all or none (see ``ParameterServer.step``)."""
        state = self._live()
        if state.config.mode.kind == "sync":
            synced = await self._sync(grads, push)
            if not isinstance(synced, StepPending):
                self._record(synced, push, metrics)
            return synced
        guard = self.guard
        assert guard is not None
        if idempotency is not None:
            found = await guard.begin(idempotency)
            if found is not None:
                self.options.events.pushed(self.name, "replayed")
                return await self._replay(found, list(grads))
        try:
            seq, results = await self._apply_step(grads, received, push, idempotency)
        except BaseException:
            if idempotency is not None:
                guard.abandon(idempotency.key)
            raise
        writer = self.writer
        assert writer is not None
        if self._durable() and (state.config.durability.flush_ms is None or writer.backlogged):
            await writer.wait(seq)
        self.options.events.stepped(self.name, len(results))  # acknowledged: as durable as the model asks
        self._record(results, push, metrics)
        return results

    def _record(self, results: Mapping[str, StepResult], push: Push, metrics: Mapping[str, float] | None) -> None:
        """One point of the training series for an applied push (and the push counted)."""
        first = next(iter(results.values()), None)
        if first is None:
            return
        stale = [r.staleness for r in results.values() if r.staleness is not None]
        sync = push.worker_id is not None and self.state is not None and self.state.config.mode.kind == "sync"
        self.options.events.pushed(self.name, "contributed" if sync else "applied", max(stale) if stale else None)
        self.series.add(
            max(r.step for r in results.values()),
            first.lr,
            push.worker_id,
            max(stale) if stale else None,
            metrics,
        )

    async def _apply_step(
        self, grads: Mapping[str, Array], received: RawTensors | None, push: Push, idem: Idempotency | None
    ) -> tuple[int, dict[str, StepResult]]:
        async with self._lock:
            state = self._live()
            writer = self.writer
            assert writer is not None
            if writer.failed is not None:
                raise writer.failed
            check_grads(self.name, state.params, grads)
            current = {n: state.params[n].step for n in grads}
            check_push(self.name, state.config, current, push)
            config = state.config
            lrs = {n: self.lr_table.lr(config.schedule, config.rule_for(n).lr, current[n]) for n in grads}
            if sum(g.size for g in grads.values()) > _THREAD_THRESHOLD:
                updated = await asyncio.to_thread(compute_step, config, state.params, grads, lrs)
                state = self._live()  # the owner may have ended meanwhile
            else:
                updated = compute_step(config, state.params, grads, lrs)
            entry = StepEntry(
                received if received is not None else RawTensors.pack(grads),
                current,
                lrs,
                None if idem is None else idem.key,
                None if idem is None else idem.fingerprint,
            )
            names = list(grads)
            keys = []
            if idem is not None:
                text = summary([current[n] + 1 for n in names], [lrs[n] for n in names])
                keys.append(KeyRecord(idem.key, idem.fingerprint, text))
            state.apply(entry, updated)
            if self._durable():
                writer.add(state.seq, to_record(entry), keys)
            else:
                writer.durable_seq = state.seq
            if idem is not None:
                assert self.guard is not None
                self.guard.finish(keys[0])
            results = {
                n: StepResult(updated[n].value, current[n] + 1, lrs[n], staleness=staleness(push, current[n]))
                for n in names
            }
            return state.seq, results

    async def _replay(self, record: KeyRecord, names: list[str]) -> dict[str, StepResult]:
        """The result of a step applied earlier under the same key, without applying it again.

        ``step`` and ``lr`` are the original ones. The value is the original result while the
        parameter is still at that step; once later steps moved it on, it is the current value and
        ``current_step`` says so (values are not kept per key: that would cost a copy of the
        parameters per step for the whole TTL).
        """
        state = await self._settled()
        if state.config.durability.replicas:
            # The first attempt may have been answered 503 because the replicas did not confirm it: a replay
            # is an acknowledgement too, so it waits for them as well.
            await self.journal.wait_replicas(self._lease(), self.name, state.config.durability.replicas)
        out = {}
        for name, (step, lr) in unpack_summary(record.summary, names).items():
            p = state.params.get(name)
            if p is None:
                out[name] = StepResult(None, step, lr, replayed=True)
            else:
                moved = None if p.step == step else p.step
                out[name] = StepResult(p.value, step, lr, replayed=True, current_step=moved)
        return out

    async def _sync(self, grads: Mapping[str, Array], push: Push) -> dict[str, StepResult] | StepPending:
        """Contribute to a synchronous step, and wait (up to the sync timeout) until it is applied."""
        state = self._live()
        workers = state.config.mode.workers or 1
        if push.worker_id is None:
            raise ModeFieldRequired(self.name, "sync", "worker_id")
        if push.base_step is None:
            raise ModeFieldRequired(self.name, "sync", "base_step")
        if not 0 <= push.worker_id < workers:
            raise WorkerOutOfRange(self.name, push.worker_id, workers)
        names, base = list(grads), push.base_step
        applied: tuple[int, dict[str, StepResult]] | None = None
        async with self._lock:
            state = self._live()
            check_grads(self.name, state.params, grads)
            current = {n: state.params[n].step for n in names}
            if any(s != base for s in current.values()):
                if all(s > base for s in current.values()):
                    if push.worker_id in state.synced.get(base, ()):
                        return self._sync_result(state, names, base)
                    raise StepAlreadyApplied(self.name, base, current)
                raise StaleGradient(
                    f"base_step {base} is not the parameters' current step; a sync push contributes to the "
                    "current step",
                    current,
                )
            self.sync.contribute(base, push.worker_id, grads)
            waiters = self.sync.waiters(base, names)
            if self.sync.complete(base, names, workers):
                applied = await self._apply_sync(state, names, base, workers)
        writer = self.writer
        assert writer is not None
        if applied is not None:
            seq, results = applied
            if self._durable() and (state.config.durability.flush_ms is None or writer.backlogged):
                await writer.wait(seq)
            self.options.events.stepped(self.name, len(results))
            self.sync.applied(base, results)
        started = time.monotonic()
        done, _ = await asyncio.wait(waiters.values(), timeout=self.options.sync_timeout_s)
        self.options.events.sync_waited(self.name, time.monotonic() - started)
        if len(done) < len(waiters):
            self.options.events.pushed(self.name, "pending")
            return StepPending(base, self.sync.counts(base, names, workers), workers)
        return {n: fut.result() for n, fut in waiters.items()}

    async def _apply_sync(
        self, state: ModelState, names: list[str], base: int, workers: int
    ) -> tuple[int, dict[str, StepResult]]:
        means = self.sync.means(base, names, workers)
        config = state.config
        lrs = {n: self.lr_table.lr(config.schedule, config.rule_for(n).lr, base) for n in names}
        if sum(g.size for g in means.values()) > _THREAD_THRESHOLD:
            updated = await asyncio.to_thread(compute_step, config, state.params, means, lrs)
            state = self._live()
        else:
            updated = compute_step(config, state.params, means, lrs)
        entry = StepEntry(RawTensors.pack(means), dict.fromkeys(names, base), lrs, sync=(base, tuple(range(workers))))
        state.apply(entry, updated)
        assert self.writer is not None
        if self._durable():
            self.writer.add(state.seq, to_record(entry))
        else:
            self.writer.durable_seq = state.seq
        self.sync.forget_before(base)
        return state.seq, {n: StepResult(updated[n].value, base + 1, lrs[n], staleness=0) for n in names}

    def _sync_result(self, state: ModelState, names: list[str], base: int) -> dict[str, StepResult]:
        config = state.config
        out = {}
        for n in names:
            p, lr = state.params[n], self.lr_table.lr(config.schedule, config.rule_for(n).lr, base)
            moved = None if p.step == base + 1 else p.step
            out[n] = StepResult(p.value, base + 1, lr, current_step=moved, staleness=0)
        return out


def _check_same_rule(model: str, current: ModelConfig, requested: Any) -> None:
    if requested != current.rule.name:
        raise RuleChange(model, current.rule.name, str(requested))
