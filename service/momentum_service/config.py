"""A model's config: its momentum rule and its learning-rate schedule (domain, no HTTP).

Stored as JSON ``{"optimizer": {"rule": ..., ...}, "schedule": {"type": ..., ...}}``;
a config written before rules and schedules existed reads as the ``pytorch`` rule with a
constant schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidConfig
from .kernels import Rule, Schedule, rule_from_dict, schedule_from_dict
from .kernels.schedules import ConstantSchedule

__all__ = ["ModelConfig"]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    rule: Rule
    schedule: Schedule

    @classmethod
    def build(cls, optimizer: Mapping[str, Any], schedule: Mapping[str, Any] | None = None) -> ModelConfig:
        """Validate a config from its parts; :class:`InvalidConfig` names the part at fault."""
        try:
            rule = rule_from_dict(dict(optimizer))
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(str(exc), "optimizer") from None
        try:
            sched = ConstantSchedule() if schedule is None else schedule_from_dict(dict(schedule))
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(str(exc), "schedule") from None
        return cls(rule, sched)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls.build(data["optimizer"], data.get("schedule"))

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.rule.to_dict(), "schedule": self.schedule.to_dict()}

    def patched(self, optimizer: Mapping[str, Any], schedule: Mapping[str, Any] | None) -> ModelConfig:
        """This config with some hyperparameters changed and/or the schedule replaced, validated."""
        changes = {k: v for k, v in optimizer.items() if k != "rule"}
        try:
            rule = self.rule.updated(**changes)
        except TypeError:
            return ModelConfig.build({**self.rule.to_dict(), **changes})  # names the unknown field
        except ValueError as exc:
            raise InvalidConfig(str(exc), "optimizer") from None
        if schedule is None:
            return ModelConfig(rule, self.schedule)
        return ModelConfig(rule, ModelConfig.build(rule.to_dict(), schedule).schedule)
