"""A model's config: its momentum rule, learning-rate schedule and mode (domain, no HTTP).

Stored as JSON ``{"optimizer": {"rule": ..., ...}, "schedule": {"type": ..., ...},
"mode": "async"|"sync"|"bounded", "workers": n, "max_staleness": s}``;
a config written before rules and schedules existed reads as the ``pytorch`` rule with a
constant schedule in async mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidConfig
from .kernels import Rule, Schedule, rule_from_dict, schedule_from_dict
from .kernels.schedules import ConstantSchedule

__all__ = ["MODE_FIELDS", "Mode", "ModelConfig"]


MAX_WORKERS = 1024
MAX_STALENESS = 2**31 - 1
MODES = ("async", "sync", "bounded")


def _count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Mode:
    """How pushes become updates.

    ``async``: each push is applied on arrival. ``sync``: the mean of ``workers`` distinct
    workers' gradients for the same step is applied once. ``bounded``: a push whose gradient
    was computed more than ``max_staleness`` steps ago is refused.
    """

    kind: str = "async"
    workers: int | None = None
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.kind!r}")
        if self.kind == "sync":
            if self.workers is None:
                raise ValueError("mode 'sync' requires workers (the number of workers per step)")
            _count("workers", self.workers, 1, MAX_WORKERS)
        elif self.workers is not None:
            raise ValueError(f"workers applies only to mode 'sync', not {self.kind!r}")
        if self.kind == "bounded":
            if self.max_staleness is None:
                raise ValueError("mode 'bounded' requires max_staleness (in steps)")
            _count("max_staleness", self.max_staleness, 0, MAX_STALENESS)
        elif self.max_staleness is not None:
            raise ValueError(f"max_staleness applies only to mode 'bounded', not {self.kind!r}")

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Mode:
        return cls(fields.get("mode", "async"), fields.get("workers"), fields.get("max_staleness"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.kind}
        if self.workers is not None:
            out["workers"] = self.workers
        if self.max_staleness is not None:
            out["max_staleness"] = self.max_staleness
        return out

    def patched(self, fields: Mapping[str, Any]) -> Mode:
        """Another mode replaces this one whole; otherwise the given fields change."""
        if "mode" in fields and fields["mode"] != self.kind:
            return Mode.from_fields(fields)
        return Mode.from_fields({**self.to_dict(), **fields})


MODE_FIELDS = ("mode", "workers", "max_staleness")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    rule: Rule
    schedule: Schedule
    mode: Mode = Mode()

    @classmethod
    def build(
        cls,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        mode: Mapping[str, Any] | None = None,
    ) -> ModelConfig:
        """Validate a config from its parts; :class:`InvalidConfig` names the part at fault."""
        try:
            rule = rule_from_dict(dict(optimizer))
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(str(exc), "optimizer") from None
        try:
            sched = ConstantSchedule() if schedule is None else schedule_from_dict(dict(schedule))
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(str(exc), "schedule") from None
        return cls(rule, sched, _mode(lambda: Mode.from_fields(mode or {})))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls.build(data["optimizer"], data.get("schedule"), {k: data[k] for k in MODE_FIELDS if k in data})

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.rule.to_dict(), "schedule": self.schedule.to_dict(), **self.mode.to_dict()}

    def patched(
        self, optimizer: Mapping[str, Any], schedule: Mapping[str, Any] | None, mode: Mapping[str, Any] | None = None
    ) -> ModelConfig:
        """This config with some hyperparameters, the schedule and/or the mode changed, validated."""
        changes = {k: v for k, v in optimizer.items() if k != "rule"}
        try:
            rule = self.rule.updated(**changes)
        except TypeError:
            return ModelConfig.build({**self.rule.to_dict(), **changes})  # names the unknown field
        except ValueError as exc:
            raise InvalidConfig(str(exc), "optimizer") from None
        new_schedule = self.schedule if schedule is None else ModelConfig.build(rule.to_dict(), schedule).schedule
        new_mode = self.mode if not mode else _mode(lambda: self.mode.patched(mode))
        return ModelConfig(rule, new_schedule, new_mode)


def _mode(make: Callable[[], Mode]) -> Mode:
    try:
        return make()
    except (TypeError, ValueError) as exc:
        raise InvalidConfig(str(exc), "mode") from None
