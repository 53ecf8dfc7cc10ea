"""The values the client returns: frozen dataclasses parsed from API responses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from ._tensors import Array

__all__ = ["OptimizerConfig", "OptimizerUpdate", "ParamInfo", "ModelInfo", "ParamState", "HYPERPARAMETERS"]


@dataclass(frozen=True, slots=True)
class OptimizerConfig:
    """A model's hyperparameters, with the meaning of ``torch.optim.SGD``'s arguments."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False


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


@dataclass(frozen=True, slots=True, eq=False)
class ParamState:
    """A parameter's full optimizer state.

    ``velocity`` is the momentum buffer, ``None`` until the first step with momentum.
    ``step`` counts the steps applied to this parameter.
    """

    name: str
    value: Array
    velocity: Array | None
    step: int
