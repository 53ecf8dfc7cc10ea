"""What a step answers."""

from __future__ import annotations

from dataclasses import dataclass

from ..store.base import Array

__all__ = ["StepPending", "StepResult"]


@dataclass(frozen=True, slots=True)
class StepResult:
    """A parameter after a step: its new value, its step count, and the lr used.

    ``replayed``: the step was applied by an earlier request with the same idempotency key.
    ``current_step``: for a replay (or a sync worker's retry), the parameter's step when it has
    moved on since (then ``value`` is its current value, not the step's result); ``value`` is None
    if the parameter is gone. ``staleness``: for a push with a ``base_step``, the updates applied
    to the parameter since that step, before this one (stale gradients act as extra momentum).
    """

    value: Array | None
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
