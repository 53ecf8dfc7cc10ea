"""A model's checkpoint: its config and every parameter's value, state buffers and step.

What ``GET /v1/models/{model}/checkpoint`` reads and ``PUT`` restores (the file format is
:mod:`..api.codecs.checkpoint`). Restoring replaces the whole model with one log entry
(:class:`~.entries.RestoreEntry`), so a checkpoint restored and trained on gives, bitwise, what
the uninterrupted run gives: the values, every state buffer and every parameter's step (the
schedule's position) come back exactly. The idempotency keys and the sync contributions waiting
for other workers are not part of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import ModelConfig
from .state import ParamState
from .tensors import RawTensors

__all__ = ["Checkpoint", "Saved"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint as received, checked for consistency by its codec: ``tensors`` holds ``<name>``
    and ``<name>@<buffer>`` for each parameter of ``params`` (``name -> (step, buffer names)``)."""

    config: ModelConfig
    tensors: RawTensors
    params: Mapping[str, tuple[int, tuple[str, ...]]]


@dataclass(frozen=True, slots=True)
class Saved:
    """A model as saved: its config and its parameters' states (arrays shared with the owner, never copied)."""

    config: ModelConfig
    params: Mapping[str, ParamState]
