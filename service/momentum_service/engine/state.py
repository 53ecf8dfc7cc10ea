"""A model's state in its owner's memory, and the one function that changes it per log entry.

The owner applies a change in two halves: :func:`compute_step` works out the parameters' new
states (pure, possibly in a worker thread), and :meth:`ModelState.apply` installs them and
counts the change. Rebuilding a model from its journal calls the very same two functions on
each logged entry (:meth:`ModelState.replay`), so the rebuilt state is bitwise the one the
owner had: the kernels are deterministic, and nothing else goes into an update.

Arrays are never changed in place once installed: an update writes new arrays. A snapshot, a
response or a log write may therefore hold on to a state's arrays while later steps run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import NonFiniteResult, ParamNotFound, StoreError, TensorMismatch
from ..kernels import Rule
from ..store.base import Array
from .entries import ConfigEntry, DeleteEntry, Entry, PutEntry, RestoreEntry, StepEntry

__all__ = ["ModelRecord", "ModelState", "ParamMeta", "ParamRecord", "ParamState", "compute_step"]

RECENT_SYNC_STEPS = 64
"""Sync steps whose contributors an owner remembers (to answer a worker's retry of an applied step)."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    config: dict[str, Any]
    rev: str


@dataclass(frozen=True, slots=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str
    step: int


@dataclass(frozen=True, slots=True)
class ParamState:
    """A parameter: its value, the rule's named state buffers (none before the first update), its step."""

    value: Array
    state: Mapping[str, Array]
    step: int


@dataclass(frozen=True, slots=True)
class ParamRecord:
    """A parameter as read: its state buffers only when asked for (else empty)."""

    name: str
    value: Array
    state: Mapping[str, Array]
    step: int

    @property
    def velocity(self) -> Array | None:
        return self.state.get("velocity")


class JournalCorrupt(StoreError):
    """A logged entry does not apply to the state it follows (the journal was changed by hand?)."""


def compute_step(
    rules: ModelConfig | Rule,
    params: Mapping[str, ParamState],
    grads: Mapping[str, Array],
    lrs: Mapping[str, float],
) -> dict[str, ParamState]:
    """The parameters' states after one update each, each by its rule (its parameter group's, if any);
    raises :class:`NonFiniteResult` (nothing changes)."""
    out = {}
    for name, grad in grads.items():
        p = params[name]
        rule = rules.rule_for(name) if isinstance(rules, ModelConfig) else rules
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is refused just below
            value, state = rule.apply(p.value, p.state, grad, lrs[name])
        if not _finite(value) or not all(_finite(b) for b in state.values()):
            raise NonFiniteResult(f"the update of {name!r} overflows to a non-finite value; nothing was applied")
        for a in (value, *state.values()):
            a.flags.writeable = False  # shared with responses and snapshots from now on
        out[name] = ParamState(value, state, p.step + 1)
    return out


def _finite(a: Array) -> bool:
    """Whether every element is finite, without allocating: min and max carry any NaN or infinity."""
    return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def check_grads(model: str, params: Mapping[str, ParamState], grads: Mapping[str, Array]) -> None:
    """Every gradient names an existing parameter of its shape and dtype."""
    missing = [n for n in grads if n not in params]
    if missing:
        raise ParamNotFound(model, missing)
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


@dataclass
class ModelState:
    """One incarnation of a model, as its owner serves it: ``seq`` changes applied so far."""

    name: str
    inc: str
    rev: str
    config: ModelConfig
    params: dict[str, ParamState] = field(default_factory=dict)
    seq: int = 0
    # Recent sync steps: base step -> the workers whose gradients were averaged into it.
    synced: OrderedDict[int, frozenset[int]] = field(default_factory=OrderedDict)

    @property
    def record(self) -> ModelRecord:
        return ModelRecord(self.name, self.config.to_dict(), self.rev)

    @property
    def nbytes(self) -> int:
        """The bytes of every array of the state (what a snapshot writes)."""
        return sum(p.value.nbytes + sum(b.nbytes for b in p.state.values()) for p in self.params.values())

    def metas(self) -> list[ParamMeta]:
        return [ParamMeta(n, tuple(p.value.shape), p.value.dtype.name, p.step) for n, p in sorted(self.params.items())]

    def apply(self, entry: Entry, updated: Mapping[str, ParamState] | None = None) -> None:
        """Install one change (a step's parameters as computed by :func:`compute_step`)."""
        if isinstance(entry, StepEntry):
            assert updated is not None
            self.params.update(updated)
            if entry.sync is not None:
                base, workers = entry.sync
                self.synced[base] = frozenset(workers)
                while len(self.synced) > RECENT_SYNC_STEPS:
                    self.synced.popitem(last=False)
        elif isinstance(entry, PutEntry):
            for name, value in entry.values.arrays().items():
                value.flags.writeable = False
                self.params[name] = ParamState(value, {}, 0)
        elif isinstance(entry, DeleteEntry):
            self.params.pop(entry.name, None)
        elif isinstance(entry, ConfigEntry):
            self.config = ModelConfig.from_dict(entry.config)
            self.rev = entry.rev
        elif isinstance(entry, RestoreEntry):
            arrays = entry.tensors.arrays()
            for a in arrays.values():
                a.flags.writeable = False
            self.config = ModelConfig.from_dict(entry.config)
            self.rev = entry.rev
            self.params = {
                name: ParamState(arrays[name], {b: arrays[f"{name}@{b}"] for b in buffers}, step)
                for name, (step, buffers) in entry.params.items()
            }
            self.synced.clear()
        self.seq += 1

    def replay(self, entry: Entry) -> None:
        """Apply a logged entry as its owner did (the same kernel on the same inputs)."""
        if not isinstance(entry, StepEntry):
            self.apply(entry)
            return
        grads = entry.grads.arrays()
        try:
            check_grads(self.name, self.params, grads)
        except (ParamNotFound, TensorMismatch) as exc:
            raise JournalCorrupt(f"log entry {self.seq + 1} of model {self.name!r}: {exc}") from None
        for name, before in entry.steps.items():
            if self.params[name].step != before:
                raise JournalCorrupt(
                    f"log entry {self.seq + 1} of model {self.name!r} updates {name!r} from step {before}, "
                    f"but the parameter is at step {self.params[name].step}"
                )
        try:
            updated = compute_step(self.config, self.params, grads, entry.lrs)
        except NonFiniteResult as exc:
            raise JournalCorrupt(f"log entry {self.seq + 1} of model {self.name!r}: {exc}") from None
        self.apply(entry, updated)
