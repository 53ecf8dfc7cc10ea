"""The parameter server's operations, each served by the model's owner.

:class:`ParameterServer` finds (or becomes) the owner of the model a request is about
(:meth:`ParameterServer.route`) and hands the request to it. When another replica owns the model,
``route`` says which (a :class:`Remote`): the HTTP layer forwards the request there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..errors import Fenced, NotOwner, OwnerLost
from ..kernels.schedules import LRTable
from ..store.base import Array, Holder, Journal
from .checkpoints import Checkpoint, Saved
from .cluster import Cluster, LeaseHandle
from .idempotency import Idempotency
from .modes import Push
from .owner import EngineOptions, ModelOwner
from .results import StepPending, StepResult
from .series import Point
from .state import ModelRecord, ParamMeta, ParamRecord
from .tensors import RawTensors

log = logging.getLogger("momentum_service")

POINTS_FLUSH_S = 0.5
"""How often owners append their new training-series points to the journal (what a crash can lose of it)."""

__all__ = ["NotOwner", "ParameterServer", "Remote"]


def _idle(owner: ModelOwner, idle_s: float) -> bool:
    return time.monotonic() - owner.last_used >= idle_s


@dataclass(frozen=True, slots=True)
class Remote:
    """Another replica, which owns (or should take) the model."""

    url: str
    replica: str


class ParameterServer:
    def __init__(
        self,
        journal: Journal,
        *,
        url: str = "http://127.0.0.1:8000",
        lease_ms: int = 5000,
        options: EngineOptions | None = None,
    ) -> None:
        self.journal = journal
        self.options = options or EngineOptions()
        self.cluster = Cluster(journal, url, lease_ms=lease_ms)
        self.cluster.on_lost = self._lost
        self.owners: dict[str, ModelOwner] = {}
        self.lr_table = LRTable()
        self._routing: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._remote: dict[str, tuple[Remote, float]] = {}  # model -> (its owner elsewhere, until)
        self._sweeper: asyncio.Future[None] | None = None
        self._saver: asyncio.Future[None] | None = None
        self._balancer: asyncio.Future[None] | None = None
        self._handed: dict[str, float] = {}  # model -> until when a forwarded request for it is not taken back

    @property
    def store(self) -> Journal:
        return self.journal

    async def start(self) -> None:
        await self.cluster.start()
        if self.journal.durable:
            self._sweeper = asyncio.ensure_future(self._sweeps())
            self._saver = asyncio.ensure_future(self._save_points())
            self._balancer = asyncio.ensure_future(self._rebalances())

    async def close(self) -> None:
        """Write what every owner has queued, and hand the models over."""
        for task in (self._sweeper, self._saver, self._balancer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for owner in list(self.owners.values()):
            with contextlib.suppress(Exception):
                await owner.close()
        await self.cluster.stop()
        if self.journal.durable:  # their leases are released: if this server starts again, it takes them again
            for model, owner in list(self.owners.items()):
                self.owners.pop(model, None)
                owner.invalidate(Fenced(f"this server stopped and handed model {model!r} over"))

    async def _save_points(self) -> None:
        """Every ``POINTS_FLUSH_S``, each owner's new training-series points go to the journal."""
        while True:
            await asyncio.sleep(POINTS_FLUSH_S)
            for owner in list(self.owners.values()):
                try:
                    await owner.save_points()
                except Exception as exc:
                    log.warning("model %r: saving its training series failed: %s", owner.name, exc)

    async def _sweeps(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.options.idle_s / 4)))
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("handing idle models back failed: %s", exc)

    async def sweep(self, idle_s: float | None = None) -> list[str]:
        """Hand back the models not used for ``idle_s`` (default ``options.idle_s``): what their owner
        queued is written, their lease released and their memory freed; the next request for one
        takes it again (on any replica) and rebuilds it from the journal. Not with the embedded
        store (its memory is the only copy), nor while a sync step's contributions wait."""
        if not self.journal.durable:
            return []
        idle = self.options.idle_s if idle_s is None else idle_s
        released = []
        for model, owner in list(self.owners.items()):
            if time.monotonic() - owner.last_used < idle or owner.sync.pending:
                continue
            if await self._hand_back(model, owner, "was idle", functools.partial(_idle, owner, idle)):
                released.append(model)
        if released:
            log.info("handed back %d idle model(s): %s", len(released), ", ".join(map(repr, released[:10])))
        return released

    async def _hand_back(self, model: str, owner: ModelOwner, why: str, still: Callable[[], bool]) -> bool:
        """Stop owning ``model`` while ``still()``: the owner stops taking changes, what it queued is
        written, its lease released, its memory freed. Requests for it meanwhile hear a 503 and retry
        (with the same Idempotency-Key). Not while its writer retries a refused flush, and given up
        (the owner serving on) if the drain takes longer than a lease period."""
        async with self._routing_lock(model):
            if self.owners.get(model) is not owner or not still():
                return False  # used or taken meanwhile
            if owner.writer is not None and owner.writer.retrying is not None:
                return False  # the store refuses writes: keep the steps in memory, and serve on
            handed = False
            try:
                try:
                    await asyncio.wait_for(owner.close(), self.cluster.lease_ms / 1000)  # what is queued, written
                except TimeoutError:
                    log.warning("model %r: its journal writes took over a lease period; not handed back", model)
                    return False
                if owner.lost is not None or not still():
                    return False
                self.owners.pop(model, None)
                handle = self.cluster.leases.get(model)
                self.cluster.drop(model)
                owner.invalidate(Fenced(f"model {model!r} {why} and was handed back"))
                if handle is not None:
                    with contextlib.suppress(Exception):
                        await self.journal.release(handle.lease)
                self.options.events.owner_changed(model, "released")
                handed = True
                return True
            finally:
                if not handed:
                    owner.reopen()

    async def _rebalances(self) -> None:
        """Every lease period, hand the models another replica should own to it (see :meth:`rebalance`).

        A replica counts once it has been live for a whole lease period, so one that comes and goes
        does not pull models back and forth."""
        first_seen: dict[str, float] = {}
        period = self.cluster.lease_ms / 1000
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            first_seen = {r.id: first_seen.get(r.id, now) for r in self.cluster.live}
            settled = {r for r, since in first_seen.items() if now - since >= period}
            try:
                await self.rebalance(settled)
            except Exception as exc:
                log.warning("rebalancing models failed: %s", exc)

    async def rebalance(self, settled: set[str] | None = None, limit: int | None = None) -> list[str]:
        """Hand back the models that rendezvous hashing now gives to another live replica (one that joined,
        among ``settled`` if given), at most ``limit`` (default: a quarter of the models owned, at least 1)
        at a time. Their next request goes to that replica, which takes the model from the journal: a
        joining replica takes its share of the models, within a few lease periods."""
        if self.cluster.single:
            return []
        now = time.monotonic()
        self._handed = {m: until for m, until in self._handed.items() if until > now}
        owned = list(self.owners.items())
        limit = max(1, len(owned) // 4) if limit is None else limit
        moved: list[str] = []
        for model, owner in owned:
            if len(moved) >= limit:
                break
            preferred = self.cluster.preferred(model)
            if preferred.id == self.cluster.me.id or (settled is not None and preferred.id not in settled):
                continue
            if owner.sync.pending:
                continue  # a sync step's contributions wait in this owner's memory
            moving = functools.partial(self._should_move, model)
            if await self._hand_back(model, owner, f"belongs to replica {preferred.url} now", moving):
                self._handed[model] = time.monotonic() + 2 * self.cluster.lease_ms / 1000
                moved.append(model)
        if moved:
            log.info("handed %d model(s) to the replicas that joined: %s", len(moved), ", ".join(map(repr, moved[:10])))
        return moved

    def _should_move(self, model: str) -> bool:
        return self.cluster.preferred(model).id != self.cluster.me.id

    # Routing.

    def _lost(self, model: str) -> None:
        owner = self.owners.pop(model, None)
        if owner is not None:
            self.options.events.owner_changed(model, "lost")
            owner.invalidate(Fenced(f"another server took model {model!r} over"))

    def forget_remote(self, model: str) -> None:
        """The remote owner did not answer: look it up again next time."""
        self._remote.pop(model, None)

    async def route(self, model: str, *, forwarded: bool = False) -> ModelOwner | Remote:
        """This process's owner of ``model`` (taking the model if nobody holds it), or the replica that owns it."""
        owner = self.owners.get(model)
        if owner is not None and owner.usable:
            owner.last_used = time.monotonic()
            return owner
        if not forwarded:
            cached = self._remote.get(model)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
        async with self._routing_lock(model):
            return await self._route(model, forwarded)

    def _routing_lock(self, model: str) -> asyncio.Lock:
        """The lock under which ``model`` is taken, dropped or handed back (one per model in use)."""
        lock = self._routing.get(model)
        if lock is None:
            lock = self._routing[model] = asyncio.Lock()
        return lock

    async def _route(self, model: str, forwarded: bool) -> ModelOwner | Remote:
        owner = self.owners.get(model)
        if owner is not None and owner.closing and owner.lost is None:
            # (Only while the process stops: a hand-back holds this lock until it is done or undone.)
            raise OwnerLost(f"this server is stopping and writing model {model!r}'s last changes; retry")
        if owner is not None:
            if owner.lost is None and not owner.usable:  # the lease lapsed: try to renew it now
                with contextlib.suppress(Exception):
                    await self.cluster.renew([model])
            if owner.usable:
                return owner
            self.owners.pop(model, None)
            self.cluster.drop(model)
        if not self.cluster.single:
            holder = await self.journal.holder(model)
            if holder is not None and holder.replica != self.cluster.me.id:
                remote = Remote(holder.url, holder.replica)
                self._remote[model] = (remote, time.monotonic() + min(holder.remaining_ms / 1000, 1.0))
                return remote
            if holder is None and (not forwarded or self._handed.get(model, 0.0) > time.monotonic()):
                # (A request forwarded here for a model just handed to another replica goes on there: a
                # replica that still had this one as its owner must not give it back.)
                preferred = self.cluster.preferred(model)
                if preferred.id != self.cluster.me.id:
                    return Remote(preferred.url, preferred.id)
        got = await self.cluster.acquire(model)
        if isinstance(got, Holder):
            return Remote(got.url, got.replica)
        owner = self._owner_for(model, got)
        try:
            await owner.load()
        except BaseException:
            self.cluster.drop(model)
            with contextlib.suppress(Exception):
                await self.journal.release(got.lease)
            raise
        self._remote.pop(model, None)
        self.owners[model] = owner
        self.options.events.owner_changed(model, "took")
        if owner.loaded_entries:
            log.info("model %r: rebuilt from the journal (%d log entries replayed)", model, owner.loaded_entries)
        return owner

    def _owner_for(self, model: str, handle: LeaseHandle) -> ModelOwner:
        return ModelOwner(model, self.journal, lambda: handle.lease, self.options, self.lr_table, valid=handle.valid)

    async def owner(self, model: str) -> ModelOwner:
        routed = await self.route(model)
        if isinstance(routed, Remote):
            raise NotOwner(model, routed.url, routed.replica)
        return routed

    # Operations.

    async def put_model(
        self, model: str, config: ModelConfig, *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        """Create the model, or replace its config (same rule only; see :class:`RuleChange`).

        With ``only_create`` an existing model is never changed: :class:`ModelExists`."""
        return await (await self.owner(model)).put_model(config, only_create=only_create)

    async def patch_model(
        self,
        model: str,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        mode: Mapping[str, Any] | None = None,
        durability: Any = None,
        groups: Any = None,
    ) -> ModelRecord:
        """Change some hyperparameters, the schedule, the mode, the durability and/or the parameter groups;
        from the next step."""
        return await (await self.owner(model)).patch_model(optimizer, schedule, mode, durability, groups)

    async def get_model(self, model: str) -> tuple[ModelRecord, list[ParamMeta]]:
        return await (await self.owner(model)).get_model()

    async def list_params(self, model: str) -> list[ParamMeta]:
        return (await self.get_model(model))[1]

    async def checkpoint(self, model: str) -> Saved:
        """The model's config and every parameter's value, state buffers and step."""
        return await (await self.owner(model)).checkpoint()

    async def restore(
        self, model: str, checkpoint: Checkpoint, *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        """Create the model from ``checkpoint``, or replace it whole (same rule only); True if created."""
        return await (await self.owner(model)).restore(checkpoint, only_create=only_create)

    async def delete_model(self, model: str) -> None:
        await (await self.owner(model)).delete_model()

    async def put_params(
        self, model: str, values: Mapping[str, Array] | RawTensors, *, only_create: bool
    ) -> dict[str, bool]:
        raw = values if isinstance(values, RawTensors) else RawTensors.pack(values)
        return await (await self.owner(model)).put_params(raw, only_create=only_create)

    async def get_params(self, model: str, names: list[str] | None, *, with_state: bool) -> dict[str, ParamRecord]:
        return await (await self.owner(model)).get_params(names, with_state=with_state)

    async def delete_param(self, model: str, name: str) -> None:
        await (await self.owner(model)).delete_param(name)

    async def step(
        self,
        model: str,
        grads: Mapping[str, Array],
        *,
        received: RawTensors | None = None,
        expected_steps: Mapping[str, int] | None = None,
        idempotency: Idempotency | None = None,
        worker_id: int | None = None,
        base_step: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, StepResult] | StepPending:
        """Apply one momentum update to every named parameter, all or none.

        Each parameter's update ``k`` (its step count before the update) uses the schedule's lr
        for ``k``. With ``expected_steps``, nothing is applied unless those parameters are at those
        steps (:class:`StepMismatch`). With ``idempotency``, the step is applied at most once per
        key: a repeat returns the first result. In ``bounded`` mode, ``base_step`` (the step the
        gradients were computed from) may be at most ``max_staleness`` behind
        (:class:`StaleGradient`). In ``sync`` mode the push is ``worker_id``'s contribution to
        ``base_step``. ``received``: the gradients as they came (logged as they are). ``metrics``: the
        worker's scalars, kept in the model's training series with the push.
        """
        owner = await self.owner(model)
        return await owner.step(grads, received, Push(expected_steps, worker_id, base_step), idempotency, metrics)

    async def points(self, model: str, since: int, limit: int) -> list[Point]:
        """The model's training series after point ``since`` (at most ``limit``)."""
        return (await self.owner(model)).points(since, limit)
