"""The values the client returns: frozen dataclasses parsed from API responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ._tensors import Array

__all__ = [
    "HYPERPARAMETERS",
    "RULES",
    "ModelInfo",
    "OptimizerConfig",
    "OptimizerUpdate",
    "ParamInfo",
    "ParamState",
    "StepResult",
]

RULES = ("pytorch", "keras", "tf1", "ema", "previous_delta")


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """A model's momentum rule and hyperparameters.

    ``rule`` is one of :data:`RULES` (see the API docs for each formula); the other fields
    have the meaning of ``torch.optim.SGD``'s arguments. A field the rule does not have
    (``dampening`` and ``maximize`` exist only in ``pytorch``) reads as its neutral value.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    rule: str = "pytorch"


class OptimizerUpdate(TypedDict, total=False):
    """The keyword arguments of ``update_model``: any subset of the hyperparameters."""

    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool


HYPERPARAMETERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """A parameter's metadata: its shape, dtype (``"float32"``/``"float64"``) and step count."""

    shape: tuple[int, ...]
    dtype: str
    step: int


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model: its name, its optimizer configuration and its parameters' metadata."""

    name: str
    optimizer: OptimizerConfig
    params: Mapping[str, ParamInfo] = field(default_factory=dict)
    schedule: Mapping[str, Any] = field(default_factory=lambda: {"type": "constant"})
    """The learning-rate schedule, as the API writes it (e.g. ``{"type": "cosine", "T_max": 100, "eta_min": 0.0}``)."""
    mode: str = "async"
    """How pushes combine: ``"async"`` (each applied on arrival), ``"sync"`` (``workers`` pushes per step,
    their mean applied once) or ``"bounded"`` (pushes at most ``max_staleness`` steps stale)."""
    workers: int | None = None
    """Pushes per step in ``sync`` mode, else ``None``."""
    max_staleness: int | None = None
    """The largest accepted staleness in ``bounded`` mode, else ``None``."""
    durability: str | Mapping[str, int] = "step"
    """When a step is acknowledged: ``"step"`` (once its log entry is in Redis), ``{"flush_ms": N}``
    (from the owner's memory, written to Redis within N ms) or ``{"replicas": N}`` (once in Redis and on
    N of its replicas)."""
    groups: Sequence[Mapping[str, Any]] = ()
    """Parameter groups, as the API writes them: ``{"name", "params", <hyperparameters>}`` each
    (a parameter takes the first group that names or matches it, else ``optimizer``)."""
    shards: int = 1
    """How many owners the parameters are split over (see the README's "Scaling out")."""
    consistent: bool = True
    """False while a step has reached some shards of a sharded model and not the others."""


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model as :meth:`Client.list_models` lists it."""

    name: str
    rule: str
    mode: str
    params: int
    """The number of parameters."""
    steps: int
    """The largest step count of its parameters (0 without parameters)."""


@dataclass(frozen=True, slots=True, eq=False)
class ParamState:
    """A parameter's full optimizer state.

    ``velocity`` is the momentum buffer, ``None`` until the first step with momentum.
    ``step`` counts the steps applied to this parameter. ``state`` holds every buffer the model's
    rule keeps for it by name (today's rules keep one, ``"velocity"``; empty before the first step).
    """

    name: str
    value: Array
    velocity: Array | None
    step: int
    state: Mapping[str, Array] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, eq=False)
class StepResult:
    """One parameter after a step: its new value (``None`` with ``return_params=False``),
    its step count, and the learning rate the update used (the schedule's value for it).

    ``replayed`` is true when the server answered a retry with the result of an earlier attempt
    (the step was applied once, by that attempt). If later steps have moved the parameter on since,
    ``current_step`` is its step now and ``value`` its value now; otherwise ``current_step`` is ``None``.

    ``staleness`` (for a step sent with ``base_step``): how many updates other pushes applied to the
    parameter between ``base_step`` and this one; ``None`` without ``base_step``.
    """

    value: Array | None
    step: int
    lr: float
    current_step: int | None = None
    replayed: bool = False
    staleness: int | None = None
