"""Pure numeric kernels: numpy in, numpy out, no I/O."""

from .fma import fma
from .rules import RULES, EMAMomentum, KerasSGD, PreviousDelta, Rule, TF1Momentum, rule_from_dict
from .schedules import SCHEDULES, Schedule, schedule_from_dict
from .sgd import SGDConfig, sgd_update

__all__ = [
    "EMAMomentum",
    "KerasSGD",
    "PreviousDelta",
    "RULES",
    "Rule",
    "SCHEDULES",
    "SGDConfig",
    "Schedule",
    "TF1Momentum",
    "fma",
    "rule_from_dict",
    "schedule_from_dict",
    "sgd_update",
]
