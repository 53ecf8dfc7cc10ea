"""What a model's mode asks of a push before it is applied (``async``, ``bounded``; ``sync`` is :mod:`.sync`).

Pure checks on the parameters' current steps; each raises the error that says what was wrong
and that nothing was applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ModeFieldRequired, StaleGradient, StepMismatch

__all__ = ["Push", "check_push", "staleness"]


@dataclass(frozen=True, slots=True)
class Push:
    """A step's options besides its gradients."""

    expected_steps: Mapping[str, int] | None = None
    worker_id: int | None = None
    base_step: int | None = None


def check_push(model: str, config: ModelConfig, current: Mapping[str, int], push: Push) -> None:
    """``expected_steps`` must match; a ``base_step`` may not be ahead, nor (bounded) too stale."""
    if push.expected_steps is not None and any(current[n] != k for n, k in push.expected_steps.items()):
        raise StepMismatch(model, current, push.expected_steps)
    if config.mode.kind == "bounded" or push.base_step is not None:
        limit = config.mode.max_staleness if config.mode.kind == "bounded" else None
        _check_staleness(model, current, push.base_step, limit)


def staleness(push: Push, step_before: int) -> int | None:
    """How many updates a push's parameter had since its ``base_step`` (None without one)."""
    return None if push.base_step is None else step_before - push.base_step


def _check_staleness(model: str, current: Mapping[str, int], base_step: int | None, max_staleness: int | None) -> None:
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
