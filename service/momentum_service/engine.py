"""The parameter server's operations, over any :class:`~momentum_service.store.Store`.

A step reads the model config and the named parameters, checks every gradient against
its parameter, computes the momentum update with the pure kernel and commits all the
new states at once, conditional on nothing having changed since the read. When another
writer got there first (another request, another server process), it reads again and
recomputes, so no update is ever lost, and none is applied twice.

On top of that: an ``Idempotency-Key`` makes a step exactly-once across retries and
replicas (the store writes the key's record in the same atomic commit); ``expected_steps``
makes it conditional on the parameters' versions; and a model's mode decides how pushes
become updates (``async``: on arrival; ``bounded``: unless too stale; ``sync``: the mean of
the workers' contributions to a step, applied once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import weakref
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import (
    Contention,
    IdempotencyInFlight,
    IdempotencyKeyReused,
    ModeFieldRequired,
    ModelExists,
    ModelNotFound,
    NonFiniteResult,
    ParamNotFound,
    RuleChange,
    StaleGradient,
    StepAlreadyApplied,
    StepMismatch,
    StoreError,
    StoreFull,
    StoreUnavailable,
    TensorMismatch,
    WorkerOutOfRange,
)
from .kernels import Rule
from .kernels.schedules import LRTable
from .store import Claim, ClaimState, ModelRecord, ParamMeta, ParamRecord, ParamUpdate, Store, new_token
from .store.base import Array

# Updates bigger than this many elements are computed in a worker thread (numpy releases
# the GIL), so one large step does not stall every other request on the event loop.
_THREAD_THRESHOLD = 1 << 16


_CONFIGS: dict[str, ModelConfig] = {}


def config_of(record: ModelRecord) -> ModelConfig:
    """The record's config, parsed once per revision (revisions are unique tokens)."""
    config = _CONFIGS.get(record.rev)
    if config is None:
        config = ModelConfig.from_dict(record.config)
        if len(_CONFIGS) >= 1024:
            _CONFIGS.clear()
        _CONFIGS[record.rev] = config
    return config


@dataclass(frozen=True, slots=True)
class StepResult:
    """A parameter after a step: its new value and velocity, its step count, and the lr used.

    ``replayed``: the step was applied by an earlier request with the same idempotency key.
    ``current_step``: for a replay, the parameter's step when it has moved on since (then
    ``value`` is its current value, not the step's result); ``value`` is None if it is gone.
    ``staleness``: for a push with a ``base_step``, the updates applied to the parameter since
    that step, before this one (stale gradients act as extra momentum).
    """

    value: Array | None
    velocity: Array | None
    step: int
    lr: float
    replayed: bool = False
    current_step: int | None = None
    staleness: int | None = None


@dataclass(frozen=True, slots=True)
class StepPending:
    """A sync push whose step was not complete within the sync timeout: ``counts`` of ``workers``
    have contributed. Sending the same push again waits again (it is not counted twice)."""

    base_step: int
    counts: dict[str, int]
    workers: int


@dataclass(frozen=True, slots=True)
class _Sync:
    workers: int


@dataclass(frozen=True, slots=True)
class _Push:
    expected_steps: Mapping[str, int] | None
    worker_id: int | None
    base_step: int | None


def mean_gradient(contributions: Mapping[int, bytes], like: Array) -> Array:
    """The mean of the workers' gradients: summed in worker-id order, then divided by their number.

    Each addition and the division round once in the parameter's dtype, so the result is
    reproducible bit for bit: ``(((g_0 + g_1) + g_2) + ...) / n``.
    """
    dtype = like.dtype.newbyteorder("<")
    total: Array | None = None
    for worker in sorted(contributions):
        g = np.frombuffer(contributions[worker], dtype=dtype).reshape(like.shape).astype(like.dtype)
        total = g.copy() if total is None else total + g
    assert total is not None
    return total / like.dtype.type(len(contributions))


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An ``Idempotency-Key`` and the fingerprint of the request it came with."""

    key: str
    fingerprint: str


class ParameterServer:
    def __init__(
        self,
        store: Store,
        *,
        contention_timeout_s: float = 10.0,
        idempotency_ttl_s: float = 86400.0,
        idempotency_lease_s: float = 10.0,
        sync_timeout_s: float = 5.0,
        sync_ttl_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.contention_timeout_s = contention_timeout_s
        self.ttl_ms = max(1, round(idempotency_ttl_s * 1000))
        self.lease_ms = max(1, round(idempotency_lease_s * 1000))
        self.sync_timeout_s = sync_timeout_s
        self.sync_ttl_ms = max(1, round(sync_ttl_s * 1000))
        self.lr_table = LRTable()
        # Steps on one model queue up in this process instead of racing each other: only
        # steps from other processes can then invalidate a commit.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._store_failed: dict[str, float] = {}  # model -> when a step on it last met an unavailable store
        self._tasks: set[asyncio.Future[None]] = set()  # best-effort work that no answer waits for

    def _lock(self, model: str) -> asyncio.Lock:
        lock = self._locks.get(model)
        if lock is None:
            lock = self._locks[model] = asyncio.Lock()
        return lock

    async def put_model(
        self, model: str, config: ModelConfig, *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        """Create the model, or replace its config (same rule only; see :class:`RuleChange`).

        With ``only_create`` an existing model is never changed: :class:`ModelExists`."""
        if only_create:
            return await self.store.put_model(model, config.to_dict(), only_create=True)
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        while True:
            record = await self.store.get_model(model)
            if record is None:
                with contextlib.suppress(ModelExists):  # created meanwhile: replace its config, same rule only
                    return await self.store.put_model(model, config.to_dict(), only_create=True)
                continue
            _check_same_rule(model, config_of(record), config.rule.name)
            updated = await self.store.replace_config(model, record.rev, config.to_dict())
            if updated is not None:
                return updated, False
            attempt = await _backoff(attempt, deadline)

    async def patch_model(
        self,
        model: str,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        mode: Mapping[str, Any] | None = None,
    ) -> ModelRecord:
        """Change some hyperparameters, the schedule and/or the mode; they apply from the next step."""
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        while True:
            record = await self.store.get_model(model)
            if record is None:
                raise ModelNotFound(model)
            current = config_of(record)
            if "rule" in optimizer:
                _check_same_rule(model, current, optimizer["rule"])
            config = current.patched(optimizer, schedule, mode)
            updated = await self.store.replace_config(model, record.rev, config.to_dict())
            if updated is not None:
                return updated
            attempt = await _backoff(attempt, deadline)

    async def get_model(self, model: str) -> tuple[ModelRecord, list[ParamMeta]]:
        record = await self.store.get_model(model)
        if record is None:
            raise ModelNotFound(model)
        return record, await self.store.list_params(model)

    async def list_params(self, model: str) -> list[ParamMeta]:
        return await self.store.list_params(model)

    async def delete_model(self, model: str) -> None:
        if not await self.store.delete_model(model):
            raise ModelNotFound(model)

    async def put_params(self, model: str, values: dict[str, Array], *, only_create: bool) -> dict[str, bool]:
        return await self.store.put_params(model, values, only_create=only_create)

    async def get_params(self, model: str, names: list[str] | None, *, with_velocity: bool) -> dict[str, ParamRecord]:
        _, params = await self.store.read(model, names, with_velocity=with_velocity)
        return params

    async def delete_param(self, model: str, name: str) -> None:
        if not await self.store.delete_param(model, name):
            raise ParamNotFound(model, [name])

    async def step(
        self,
        model: str,
        grads: Mapping[str, Array],
        *,
        expected_steps: Mapping[str, int] | None = None,
        idempotency: Idempotency | None = None,
        worker_id: int | None = None,
        base_step: int | None = None,
    ) -> dict[str, StepResult] | StepPending:
        """Apply one momentum update to every named parameter, all or none.

        Each parameter's update ``k`` (its step count before the update) uses the
        schedule's lr for ``k``. With ``expected_steps``, nothing is applied unless those
        parameters are at those steps (:class:`StepMismatch`). With ``idempotency``, the step
        is applied at most once per key: a repeat returns the first result (see :meth:`_replay`).

        In ``bounded`` mode, ``base_step`` (the step the gradients were computed from) may be
        at most ``max_staleness`` behind (:class:`StaleGradient`). In ``sync`` mode the push is
        ``worker_id``'s contribution to ``base_step`` (see :meth:`_sync`).
        """
        push = _Push(expected_steps, worker_id, base_step)
        claim, claiming = None, None
        if idempotency is not None:
            # The key is claimed while the first attempt reads and computes; its commit waits for the claim.
            claim = Claim(idempotency.key, idempotency.fingerprint, new_token(), self.lease_ms, self.ttl_ms)
            claiming = asyncio.ensure_future(self.store.claim(model, claim))
        try:
            return await self._step(model, grads, push, claim, claiming)
        except (StoreUnavailable, StoreError, StoreFull, Contention, asyncio.CancelledError):
            # The store is failing (or slow): give the key back in the background, so that the answer
            # is not delayed by one more store timeout (a lease that is never released expires).
            self._background(self._release(model, claim, claiming))
            raise
        except BaseException:
            await self._release(model, claim, claiming)  # a 4xx: the key is free again when the client hears
            raise

    def _background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, model: str, claim: Claim | None, claiming: asyncio.Future[ClaimState] | None) -> None:
        """Give the key back, once the claim has landed (so the release cannot overtake it)."""
        if claim is None or claiming is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(claiming)
        await _quietly(self.store.release(model, claim))

    async def _step(
        self,
        model: str,
        grads: Mapping[str, Array],
        push: _Push,
        claim: Claim | None,
        claiming: asyncio.Future[ClaimState] | None,
    ) -> dict[str, StepResult] | StepPending:
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        while True:
            waiting_since = time.monotonic()
            async with self._lock(model):
                if self._store_failed.get(model, 0.0) > waiting_since:
                    # The store failed while this step queued behind another: answer now rather than
                    # spend another full timeout on it (n queued steps would otherwise take n timeouts).
                    raise StoreUnavailable("the store failed while this step waited; nothing was applied")
                try:
                    result = await self._attempt(model, grads, push, claim, claiming)
                except StoreUnavailable:
                    self._store_failed[model] = time.monotonic()
                    raise
            if isinstance(result, _Sync):
                await self._release(model, claim, claiming)  # (worker_id, base_step) is a key already
                return await self._sync(model, grads, push, result.workers)
            if result is not None:
                return result
            attempt = await _backoff(attempt, deadline)
            if claim is not None:  # renew the lease while racing
                state = await self.store.claim(model, claim)
                if state.status != "owned":
                    return await self._settle(model, claim, state.status, state.summary, grads)

    async def _attempt(
        self,
        model: str,
        grads: Mapping[str, Array],
        push: _Push,
        claim: Claim | None,
        claiming: asyncio.Future[ClaimState] | None,
    ) -> dict[str, StepResult] | _Sync | None:
        """Read, compute and commit once: the results, ``None`` after losing a race, or ``_Sync``."""
        names = list(grads)
        record, params = await self.store.read(model, names, with_velocity=True)
        _check_shapes(model, params, grads)
        config = config_of(record)
        if config.mode.kind == "sync":
            return _Sync(config.mode.workers or 1)
        current = {n: params[n].step for n in names}
        try:
            if push.expected_steps is not None and any(current[n] != k for n, k in push.expected_steps.items()):
                raise StepMismatch(model, current, push.expected_steps)
            if config.mode.kind == "bounded" or push.base_step is not None:
                limit = config.mode.max_staleness if config.mode.kind == "bounded" else None
                _check_staleness(model, current, push.base_step, limit)
        except (StepMismatch, StaleGradient):
            # A retry of a step that was applied finds the versions moved on by itself: answer with
            # the first result, not "nothing was applied".
            if claim is not None and claiming is not None:
                state = await claiming
                if state.status != "owned":
                    return await self._settle(model, claim, state.status, state.summary, grads)
            raise
        lrs = {n: self.lr_table.lr(config.schedule, config.rule.lr, params[n].step) for n in names}
        if sum(g.size for g in grads.values()) > _THREAD_THRESHOLD:
            updates = await asyncio.to_thread(_compute, config.rule, lrs, params, grads)
        else:
            updates = _compute(config.rule, lrs, params, grads)
        if claim is not None and claiming is not None:
            state = await claiming
            if state.status != "owned":
                return await self._settle(model, claim, state.status, state.summary, grads)
        try:
            outcome = await self.store.commit_step(model, record.rev, updates, claim, _summary(updates, lrs))
        except StoreUnavailable as exc:
            hint = (
                "retry with the same Idempotency-Key: it is applied exactly once"
                if claim is not None
                else "read the parameters' step to find out before pushing it again"
            )
            raise StoreUnavailable(
                f"the store failed while this step was being committed, so it may or may not have been applied: {hint}"
            ) from exc
        if outcome.status == "applied" or (
            outcome.status == "done" and claim is not None and outcome.owner == claim.owner
        ):  # applied now, or by this very attempt (a re-sent script)
            base = push.base_step
            return {
                u.name: StepResult(
                    u.value, u.velocity, u.step, lrs[u.name], staleness=None if base is None else u.step - 1 - base
                )
                for u in updates
            }
        if outcome.status == "conflict":
            return None
        assert claim is not None
        return await self._settle(model, claim, outcome.status, outcome.summary, grads)

    async def _sync(
        self, model: str, grads: Mapping[str, Array], push: _Push, workers: int
    ) -> dict[str, StepResult] | StepPending:
        """Contribute to a synchronous step, and wait (up to the sync timeout) until it is applied.

        Contributions live in the store, so the workers of one step may use different server
        processes. Whoever sees the last contribution arrive applies the step; any waiter takes
        over if that one fails (the commit's compare-and-set lets only one apply it).
        """
        if push.worker_id is None:
            raise ModeFieldRequired(model, "sync", "worker_id")
        if push.base_step is None:
            raise ModeFieldRequired(model, "sync", "base_step")
        if not 0 <= push.worker_id < workers:
            raise WorkerOutOfRange(model, push.worker_id, workers)
        names, base = list(grads), push.base_step
        got = await self.store.contribute(model, base, push.worker_id, dict(grads), self.sync_ttl_ms)
        if got.status == "moved":
            if all(s > base for s in got.steps.values()):
                who = await self.store.contributors(model, base, names)
                if all(push.worker_id in who[n] for n in names):
                    return await self._sync_result(model, names, base)
                raise StepAlreadyApplied(model, base, got.steps)
            raise StaleGradient(
                f"base_step {base} is not the parameters' current step; a sync push contributes to the current step",
                got.steps,
            )
        deadline = time.monotonic() + self.sync_timeout_s
        counts, delay = got.counts, 0.002
        while True:
            if all(c >= workers for c in counts.values()):
                await self._apply_sync(model, names, base, workers)
            steps = await self.store.steps(model, names)
            if all(s > base for s in steps.values()):
                return await self._sync_result(model, names, base)
            if time.monotonic() >= deadline:
                return StepPending(base, counts, workers)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
            who = await self.store.contributors(model, base, names)
            counts = {n: len({w for w in ws if w < workers}) for n, ws in who.items()}

    async def _apply_sync(self, model: str, names: list[str], base: int, workers: int) -> None:
        """Apply the mean of the contributions to ``base``, unless someone did already."""
        record, params = await self.store.read(model, names, with_velocity=True)
        if any(params[n].step != base for n in names):
            return
        # Exactly the contributions of workers 0..workers-1 (the mean of N, divided by N): ids out of
        # range are refused, and any left from before a PATCH of workers do not count.
        stored = await self.store.contributions(model, base, names)
        contributions = {n: {w: g for w, g in stored[n].items() if w < workers} for n in names}
        if any(len(contributions[n]) != workers for n in names):
            return
        config = config_of(record)
        means = {n: mean_gradient(contributions[n], params[n].value) for n in names}
        lrs = {n: self.lr_table.lr(config.schedule, config.rule.lr, base) for n in names}
        if sum(g.size for g in means.values()) > _THREAD_THRESHOLD:
            updates = await asyncio.to_thread(_compute, config.rule, lrs, params, means)
        else:
            updates = _compute(config.rule, lrs, params, means)
        outcome = await self.store.commit_step(model, record.rev, updates)
        if outcome.status == "applied":
            await _quietly(self.store.drop_contributions(model, base, names))

    async def _sync_result(self, model: str, names: list[str], base: int) -> dict[str, StepResult]:
        record, params = await self.store.read(model, names, with_velocity=False)
        config = config_of(record)
        out = {}
        for n in names:
            rec, lr = params[n], self.lr_table.lr(config.schedule, config.rule.lr, base)
            moved = None if rec.step == base + 1 else rec.step
            out[n] = StepResult(rec.value, None, base + 1, lr, current_step=moved, staleness=0)
        return out

    async def _settle(
        self, model: str, claim: Claim, status: str, summary: str | None, grads: Mapping[str, Array]
    ) -> dict[str, StepResult]:
        """Answer for a key that this attempt does not hold."""
        if status == "mismatch":
            raise IdempotencyKeyReused(claim.key)
        if status == "in_flight":
            raise IdempotencyInFlight(claim.key)
        assert status == "done"
        assert summary is not None
        return await self._replay(model, summary, list(grads))

    async def _replay(self, model: str, summary: str, names: list[str]) -> dict[str, StepResult]:
        """The result of a step applied earlier under the same key, without applying it again.

        ``step`` and ``lr`` are the original ones. The value is the original result while the
        parameter is still at that step; once later steps moved it on, it is the current value
        and ``current_step`` says so (values are not kept per key: that would cost a copy of
        the parameters per step for the whole TTL). ``names`` are the request's: the same as the
        first attempt's, in the same order, since the key's fingerprint matched.
        """
        recorded = _unpack_summary(summary, names)
        try:
            _, params = await self.store.read(model, names, with_velocity=True)
        except (ParamNotFound, ModelNotFound):
            params = {}
        out = {}
        for name, (step, lr) in recorded.items():
            rec = params.get(name)
            if rec is None:
                out[name] = StepResult(None, None, step, lr, replayed=True)
            else:
                moved = None if rec.step == step else rec.step
                out[name] = StepResult(rec.value, rec.velocity, step, lr, replayed=True, current_step=moved)
        return out


def _check_shapes(model: str, params: Mapping[str, ParamRecord], grads: Mapping[str, Array]) -> None:
    mismatches = {}
    for name, grad in grads.items():
        value = params[name].value
        if grad.shape != value.shape or grad.dtype != value.dtype:
            mismatches[name] = {
                "expected": {"shape": list(value.shape), "dtype": value.dtype.name},
                "got": {"shape": list(grad.shape), "dtype": grad.dtype.name},
            }
    if mismatches:
        raise TensorMismatch(model, mismatches)


def _check_same_rule(model: str, current: ModelConfig, requested: Any) -> None:
    if requested != current.rule.name:
        raise RuleChange(model, current.rule.name, str(requested))


def _compute(
    rule: Rule, lrs: Mapping[str, float], params: Mapping[str, ParamRecord], grads: Mapping[str, Array]
) -> list[ParamUpdate]:
    updates = []
    commit = new_token()  # one random token per commit; a parameter's new etag is <token>.<index>
    for index, (name, grad) in enumerate(grads.items()):
        rec = params[name]
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is rejected just below
            value, velocity = rule.update(rec.value, rec.velocity, grad, lrs[name])
        if not _finite(value) or (velocity is not None and not _finite(velocity)):
            raise NonFiniteResult(f"the update of {name!r} overflows to a non-finite value; nothing was applied")
        updates.append(ParamUpdate(name, rec.etag, value, velocity, rec.step + 1, f"{commit}.{index}"))
    return updates


def _finite(a: Array) -> bool:
    """Whether every element is finite, without allocating: min and max carry any NaN or infinity."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def _check_staleness(model: str, current: Mapping[str, int], base_step: int | None, max_staleness: int | None) -> None:
    """A ``base_step`` ahead of a parameter is never valid; past ``max_staleness`` (bounded mode) is too stale."""
    if base_step is None:
        raise ModeFieldRequired(model, "bounded", "base_step")
    ahead = sorted(n for n, s in current.items() if base_step > s)
    if ahead:
        raise StaleGradient(
            f"base_step {base_step} is ahead of {', '.join(map(repr, ahead))} (at step "
            f"{min(current[n] for n in ahead)}); nothing was applied",
            current,
        )
    if max_staleness is None:
        return
    stale = sorted(n for n, s in current.items() if s - base_step > max_staleness)
    if stale:
        worst = max(current[n] for n in stale) - base_step
        raise StaleGradient(
            f"the gradient is {worst} steps stale (computed at step {base_step}); the limit is {max_staleness}; "
            "nothing was applied",
            current,
        )


def _summary(updates: list[ParamUpdate], lrs: Mapping[str, float]) -> str:
    """What an idempotency record keeps of a step: each parameter's new step and lr, by position.

    Not the names: a replay carries the same body (its fingerprint matched), so the same names in
    the same order. When every parameter has the same step and lr (the usual case), one pair is
    kept: ``[step, lr]``; else ``[[steps...], [lrs...]]``, each a single value when uniform.
    """
    steps, lrates = [u.step for u in updates], [lrs[u.name] for u in updates]
    packed = [steps[0] if len(set(steps)) == 1 else steps, lrates[0] if len(set(lrates)) == 1 else lrates]
    return json.dumps(packed, separators=(",", ":"))


def _unpack_summary(summary: str, names: list[str]) -> dict[str, tuple[int, float]]:
    steps, lrates = json.loads(summary)
    n = len(names)
    steps = steps if isinstance(steps, list) else [steps] * n
    lrates = lrates if isinstance(lrates, list) else [lrates] * n
    return {name: (int(st), float(lr)) for name, st, lr in zip(names, steps, lrates, strict=True)}


async def _quietly(op: Awaitable[None]) -> None:
    """Best effort (a lease that is not released expires by itself)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(op)


async def _backoff(attempt: int, deadline: float) -> int:
    """Sleep a little (jittered, growing) before retrying a lost race; give up at the deadline."""
    if time.monotonic() >= deadline:
        raise Contention("too many concurrent updates to the same parameters; retry later")
    await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
    return attempt + 1
