"""The parameter server's operations, over any :class:`~momentum_service.store.Store`.

A step reads the model config and the named parameters, checks every gradient against
its parameter, computes the momentum update with the pure kernel and commits all the
new states at once, conditional on nothing having changed since the read. When another
writer got there first (another request, another server process), it reads again and
recomputes, so no update is ever lost, and none is applied twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import ModelConfig
from .errors import (
    Contention,
    ModelNotFound,
    NonFiniteResult,
    ParamNotFound,
    RuleChange,
    StoreUnavailable,
    TensorMismatch,
)
from .kernels import Rule
from .kernels.schedules import LRTable
from .store import ModelRecord, ParamMeta, ParamRecord, ParamUpdate, Store, new_token
from .store.base import Array

# Updates bigger than this many elements are computed in a worker thread (numpy releases
# the GIL), so one large step does not stall every other request on the event loop.
_THREAD_THRESHOLD = 1 << 16


def config_of(record: ModelRecord) -> ModelConfig:
    return ModelConfig.from_dict(record.config)


@dataclass(frozen=True, slots=True)
class StepResult:
    """A parameter after a step: its new value and velocity, its step count, and the lr used."""

    value: Array
    velocity: Array | None
    step: int
    lr: float


class ParameterServer:
    def __init__(self, store: Store, *, contention_timeout_s: float = 10.0) -> None:
        self.store = store
        self.contention_timeout_s = contention_timeout_s
        self.lr_table = LRTable()

    async def put_model(self, model: str, config: ModelConfig) -> tuple[ModelRecord, bool]:
        """Create the model, or replace its config (same rule only; see :class:`RuleChange`)."""
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        while True:
            record = await self.store.get_model(model)
            if record is None:
                return await self.store.put_model(model, config.to_dict())
            _check_same_rule(model, config_of(record), config.rule.name)
            updated = await self.store.replace_config(model, record.rev, config.to_dict())
            if updated is not None:
                return updated, False
            attempt = await _backoff(attempt, deadline)

    async def patch_model(
        self, model: str, optimizer: Mapping[str, Any], schedule: Mapping[str, Any] | None = None
    ) -> ModelRecord:
        """Change some hyperparameters and/or replace the schedule; they apply from the next step."""
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        while True:
            record = await self.store.get_model(model)
            if record is None:
                raise ModelNotFound(model)
            current = config_of(record)
            if "rule" in optimizer:
                _check_same_rule(model, current, optimizer["rule"])
            config = current.patched(optimizer, schedule)
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

    async def step(self, model: str, grads: Mapping[str, Array]) -> dict[str, StepResult]:
        """Apply one momentum update to every named parameter, all or none.

        Each parameter's update ``k`` (its step count before the update) uses the
        schedule's lr for ``k``.
        """
        names = list(grads)
        deadline = time.monotonic() + self.contention_timeout_s
        attempt = 0
        big = sum(g.size for g in grads.values()) > _THREAD_THRESHOLD
        while True:
            record, params = await self.store.read(model, names, with_velocity=True)
            _check_shapes(model, params, grads)
            config = config_of(record)
            lrs = {n: self.lr_table.lr(config.schedule, config.rule.lr, params[n].step) for n in names}
            if big:
                updates = await asyncio.to_thread(_compute, config.rule, lrs, params, grads)
            else:
                updates = _compute(config.rule, lrs, params, grads)
            try:
                committed = await self.store.commit_step(model, record.rev, updates)
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    "the store failed while this step was being committed, so it may or may not have been "
                    "applied: read the parameters' step to find out before pushing it again"
                ) from exc
            if committed:
                return {u.name: StepResult(u.value, u.velocity, u.step, lrs[u.name]) for u in updates}
            attempt = await _backoff(attempt, deadline)


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
    for name, grad in grads.items():
        rec = params[name]
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is rejected just below
            value, velocity = rule.update(rec.value, rec.velocity, grad, lrs[name])
        if not np.isfinite(value).all() or (velocity is not None and not np.isfinite(velocity).all()):
            raise NonFiniteResult(f"the update of {name!r} overflows to a non-finite value; nothing was applied")
        updates.append(ParamUpdate(name, rec.etag, value, velocity, rec.step + 1, new_token()))
    return updates


async def _backoff(attempt: int, deadline: float) -> int:
    """Sleep a little (jittered, growing) before retrying a lost race; give up at the deadline."""
    if time.monotonic() >= deadline:
        raise Contention("too many concurrent updates to the same parameters; retry later")
    await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
    return attempt + 1
