"""Learning-rate schedules, computed from a parameter's step count exactly as torch does.

A schedule maps a base learning rate and an update index ``k`` (0-based: the number of
updates already applied to the parameter) to the learning rate of update ``k``. It equals,
bit for bit in float64, ``optimizer.param_groups[0]["lr"]`` after ``k`` calls of the torch
scheduler's ``step()`` (torch 2.13, ``torch.optim.lr_scheduler``)::

    {"type": "constant"}                                      LambdaLR(lambda epoch: 1.0)
    {"type": "step", "step_size": 30, "gamma": 0.1}           StepLR
    {"type": "multistep", "milestones": [30, 80], "gamma": 0.1}   MultiStepLR
    {"type": "exponential", "gamma": 0.99}                    ExponentialLR
    {"type": "cosine", "T_max": 100, "eta_min": 0.0}          CosineAnnealingLR
    {"type": "linear", "start_factor": 0.25, "end_factor": 1.0, "total_iters": 10}   LinearLR
    {"type": "sequential", "schedulers": [...], "milestones": [10]}  SequentialLR

torch computes most of these recursively (each lr from the previous one), which rounds
differently from the closed forms in its docs; to give torch's numbers, the schedules here
replay the same recursion, mirroring torch's code line for line. :class:`LRTable` keeps the
values already computed, so each new step costs O(1).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from itertools import pairwise
from typing import Any, ClassVar, Protocol

from .errors import FieldError

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CosineSchedule",
    "ExponentialSchedule",
    "LRTable",
    "LinearSchedule",
    "MultiStepSchedule",
    "Schedule",
    "SequentialSchedule",
    "StepSchedule",
    "schedule_from_dict",
]

_MAX_MILESTONES = 1024
_MAX_SEQUENCE = 16


class Schedule(Protocol):
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    def runner(self, base_lr: float) -> _Runner:
        """A fresh replay of torch's scheduler over a group whose initial lr is ``base_lr``."""
        ...


# --- validation -------------------------------------------------------------------------


def _int(name: str, value: Any, *, minimum: int, field: tuple[str | int, ...] = ()) -> int:
    where = field or (name,)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{name} must be an integer, got {value!r}", *where)
    if value < minimum:
        raise FieldError(f"{name} must be >= {minimum}, got {value!r}", *where)
    return value


def _float(name: str, value: Any, *, low: float = 0.0, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"{name} must be a number, got {value!r}", name)
    number = float(value)
    if not math.isfinite(number):
        raise FieldError(f"{name} must be finite, got {value!r}", name)
    if number < low or (low_open and number == low) or (high is not None and number > high):
        lo = f"({low:g}" if low_open else f"[{low:g}"
        hi = f"{high:g}]" if high is not None else "inf)"
        raise FieldError(f"{name} must be in {lo}, {hi}, got {value!r}", name)
    return number


def _milestones(name: str, value: Any, *, strictly: bool) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise FieldError(f"{name} must be a list of integers, got {value!r}", name)
    if len(value) > _MAX_MILESTONES:
        raise FieldError(f"{name} may hold at most {_MAX_MILESTONES} entries, got {len(value)}", name)
    out = tuple(_int(f"{name}[{i}]", v, minimum=1, field=(name, i)) for i, v in enumerate(value))
    for a, b in pairwise(out):
        if b < a or (strictly and b == a):
            order = "increasing" if strictly else "non-decreasing"
            raise FieldError(f"{name} must be {order}, got {list(out)}", name)
    return out


# --- replay of torch's schedulers ---------------------------------------------------------


class _Group:
    """The slice of a torch param group a scheduler touches."""

    __slots__ = ("initial_lr", "lr")

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.initial_lr = lr


class _Sched:
    """One torch scheduler's state: ``last_epoch``, ``_step_count`` and ``base_lr``."""

    spec: _SpecBase

    def __init__(self, group: _Group, spec: Any) -> None:
        self.spec = spec
        self.group = group
        self.base_lr = group.initial_lr
        self.last_epoch = -1
        self.step_count = 0
        self.initial_step()

    # LRScheduler._initial_step / step / _update_lr
    def initial_step(self) -> None:
        self.step_count = 0
        self.step(initial=True)

    def step(self, *, initial: bool = False) -> None:
        self.step_count += 1
        self.last_epoch += 1
        self.group.lr = self.get_lr(initial)

    def update_to(self, epoch: int) -> None:
        """``_update_lr(epoch)``: jump to an epoch with the closed form (SequentialLR's milestones)."""
        self.last_epoch = epoch
        self.group.lr = self.closed_form()

    def get_lr(self, initial: bool) -> float:
        raise NotImplementedError

    def closed_form(self) -> float:
        return self.get_lr(False)


class _Constant(_Sched):
    def get_lr(self, initial: bool) -> float:  # LambdaLR with lambda epoch: 1.0
        return self.base_lr * 1.0


class _Step(_Sched):
    spec: StepSchedule

    def get_lr(self, initial: bool) -> float:
        if self.last_epoch == 0 or self.last_epoch % self.spec.step_size != 0:
            return self.group.lr
        return self.group.lr * self.spec.gamma

    def closed_form(self) -> float:
        return self.base_lr * self.spec.gamma ** (self.last_epoch // self.spec.step_size)


class _MultiStep(_Sched):
    spec: MultiStepSchedule

    def __init__(self, group: _Group, spec: MultiStepSchedule) -> None:
        self.counts = Counter(spec.milestones)
        super().__init__(group, spec)

    def get_lr(self, initial: bool) -> float:
        if self.last_epoch not in self.counts:
            return self.group.lr
        return self.group.lr * self.spec.gamma ** self.counts[self.last_epoch]

    def closed_form(self) -> float:
        return self.base_lr * self.spec.gamma ** bisect_right(self.spec.milestones, self.last_epoch)


class _Exponential(_Sched):
    spec: ExponentialSchedule

    def get_lr(self, initial: bool) -> float:
        if initial:
            return self.group.lr
        return self.group.lr * self.spec.gamma

    def closed_form(self) -> float:
        return self.base_lr * self.spec.gamma**self.last_epoch


class _Cosine(_Sched):
    spec: CosineSchedule

    def get_lr(self, initial: bool) -> float:
        t_max, eta_min, e = self.spec.T_max, self.spec.eta_min, self.last_epoch
        if initial:
            return self.group.lr
        if self.step_count == 1 and e > 0:
            return eta_min + (self.base_lr - eta_min) * (1 + math.cos(e * math.pi / t_max)) / 2
        if (e - 1 - t_max) % (2 * t_max) == 0:
            return self.group.lr + (self.base_lr - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        return (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max)) * (
            self.group.lr - eta_min
        ) + eta_min

    def closed_form(self) -> float:
        t_max, eta_min = self.spec.T_max, self.spec.eta_min
        return eta_min + (self.base_lr - eta_min) * (1 + math.cos(math.pi * self.last_epoch / t_max)) / 2


class _Linear(_Sched):
    spec: LinearSchedule

    def get_lr(self, initial: bool) -> float:
        start, end, total = self.spec.start_factor, self.spec.end_factor, self.spec.total_iters
        if self.last_epoch == 0:
            return self.group.lr * start
        if initial or self.last_epoch > total:
            return self.group.lr
        return self.group.lr * (1.0 + (end - start) / (total * start + (self.last_epoch - 1) * (end - start)))

    def closed_form(self) -> float:
        start, end, total = self.spec.start_factor, self.spec.end_factor, self.spec.total_iters
        return self.base_lr * (start + (end - start) * min(total, self.last_epoch) / total)


class _Runner:
    """Replays a scheduler step by step; ``lr`` is the group's lr after ``k`` steps."""

    def __init__(self, group: _Group, step: Any) -> None:
        self.group = group
        self._step = step

    @property
    def lr(self) -> float:
        return self.group.lr

    def step(self) -> None:
        self._step()


class _Sequential:
    """SequentialLR: its constructor resets the lr, undoes each child's initial step, re-runs the first."""

    def __init__(self, group: _Group, spec: SequentialSchedule) -> None:
        self.group = group
        self.milestones = spec.milestones
        self.children = [child.make(group) for child in spec.schedulers]  # each constructor steps once
        self.last_epoch = 0
        group.lr = group.initial_lr
        for child in self.children:
            child.last_epoch -= 1
        self.children[bisect_right(self.milestones, 0)].initial_step()

    def step(self) -> None:
        self.last_epoch += 1
        idx = bisect_right(self.milestones, self.last_epoch)
        child = self.children[idx]
        if idx > 0 and self.milestones[idx - 1] == self.last_epoch:
            child.update_to(0)
        else:
            child.step()


# --- the schedule specs ---------------------------------------------------------------------


class _SpecBase:
    type: ClassVar[str]
    _sched: ClassVar[Callable[..., _Sched]]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def make(self, group: _Group) -> _Sched:
        return self._sched(group, self)

    def runner(self, base_lr: float) -> _Runner:
        group = _Group(base_lr)
        return _Runner(group, self.make(group).step)


@dataclass(frozen=True, slots=True)
class ConstantSchedule(_SpecBase):
    """The lr stays the base lr."""

    type: ClassVar[str] = "constant"
    _sched: ClassVar[Callable[..., _Sched]] = _Constant


@dataclass(frozen=True, slots=True)
class StepSchedule(_SpecBase):
    """``lr * gamma ** (k // step_size)`` (torch's StepLR)."""

    type: ClassVar[str] = "step"
    _sched: ClassVar[Callable[..., _Sched]] = _Step
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _int("step_size", self.step_size, minimum=1)
        object.__setattr__(self, "gamma", _float("gamma", self.gamma))


@dataclass(frozen=True, slots=True)
class MultiStepSchedule(_SpecBase):
    """``lr * gamma ** (number of milestones <= k)`` (torch's MultiStepLR)."""

    type: ClassVar[str] = "multistep"
    _sched: ClassVar[Callable[..., _Sched]] = _MultiStep
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", _milestones("milestones", self.milestones, strictly=False))
        object.__setattr__(self, "gamma", _float("gamma", self.gamma))


@dataclass(frozen=True, slots=True)
class ExponentialSchedule(_SpecBase):
    """``lr * gamma ** k`` (torch's ExponentialLR)."""

    type: ClassVar[str] = "exponential"
    _sched: ClassVar[Callable[..., _Sched]] = _Exponential
    gamma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _float("gamma", self.gamma))


@dataclass(frozen=True, slots=True)
class CosineSchedule(_SpecBase):
    """``eta_min + (lr - eta_min) * (1 + cos(pi * k / T_max)) / 2`` (torch's CosineAnnealingLR).

    Like torch, it does not stop at ``T_max``: the lr rises again over the next ``T_max``
    steps, and so on.
    """

    type: ClassVar[str] = "cosine"
    _sched: ClassVar[Callable[..., _Sched]] = _Cosine
    T_max: int
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        _int("T_max", self.T_max, minimum=1)
        object.__setattr__(self, "eta_min", _float("eta_min", self.eta_min))


@dataclass(frozen=True, slots=True)
class LinearSchedule(_SpecBase):
    """``lr * factor``, the factor going linearly from ``start_factor`` to ``end_factor``
    over ``total_iters`` steps, then staying (torch's LinearLR)."""

    type: ClassVar[str] = "linear"
    _sched: ClassVar[Callable[..., _Sched]] = _Linear
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_factor", _float("start_factor", self.start_factor, high=1.0, low_open=True))
        object.__setattr__(self, "end_factor", _float("end_factor", self.end_factor, high=1.0))
        _int("total_iters", self.total_iters, minimum=1)


@dataclass(frozen=True, slots=True)
class SequentialSchedule(_SpecBase):
    """``schedulers[i]`` runs from ``milestones[i-1]`` (torch's SequentialLR, with its quirks:
    at a milestone the next scheduler restarts from the base lr, by its closed form)."""

    type: ClassVar[str] = "sequential"
    schedulers: tuple[_SpecBase, ...] = field(default=())
    milestones: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.schedulers, (list, tuple)) or not self.schedulers:
            raise FieldError("schedulers must be a non-empty list of schedules", "schedulers")
        if len(self.schedulers) > _MAX_SEQUENCE:
            raise FieldError(
                f"schedulers may hold at most {_MAX_SEQUENCE} schedules, got {len(self.schedulers)}", "schedulers"
            )
        children = []
        for i, child in enumerate(self.schedulers):
            if isinstance(child, dict):
                child = _from_dict(child, where=("schedulers", i))
            if isinstance(child, SequentialSchedule):
                raise FieldError(
                    f"schedulers[{i}]: a sequential schedule cannot contain another one", "schedulers", i, "type"
                )
            children.append(child)
        object.__setattr__(self, "schedulers", tuple(children))
        object.__setattr__(self, "milestones", _milestones("milestones", self.milestones, strictly=True))
        if len(self.milestones) != len(self.schedulers) - 1:
            raise FieldError(
                f"milestones must hold one entry fewer than schedulers ({len(self.schedulers) - 1}), "
                f"got {len(self.milestones)}",
                "milestones",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "schedulers": [s.to_dict() for s in self.schedulers],
            "milestones": list(self.milestones),
        }

    def make(self, group: _Group) -> _Sched:  # pragma: no cover - a sequential is never a child
        raise TypeError("a sequential schedule cannot be nested")

    def runner(self, base_lr: float) -> _Runner:
        group = _Group(base_lr)
        return _Runner(group, _Sequential(group, self).step)


SCHEDULES: dict[str, type[Any]] = {
    cls.type: cls
    for cls in (
        ConstantSchedule,
        StepSchedule,
        MultiStepSchedule,
        ExponentialSchedule,
        CosineSchedule,
        LinearSchedule,
        SequentialSchedule,
    )
}


def _from_dict(data: Any, *, where: tuple[str | int, ...] = ()) -> Any:
    """The schedule of a dict; ``where`` is its place in a sequential schedule (``("schedulers", 1)``)."""
    text = "".join(f"[{w}]" if isinstance(w, int) else f"{w}" for w in where) + ("." if where else "")
    if not isinstance(data, dict):
        raise FieldError(f"{text[:-1] or 'schedule'} must be an object, got {data!r}", *where)
    data = dict(data)
    kind = data.pop("type", None)
    cls = SCHEDULES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FieldError(f"{text}type must be one of {', '.join(SCHEDULES)}, got {kind!r}", *where, "type")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        has = ", ".join(names) if names else "no fields"
        raise FieldError(
            f"{text}schedule {kind!r} has no field {', '.join(unknown)}; it has: {has}", *where, unknown[0]
        )
    try:
        return cls(**data)
    except TypeError as exc:  # a required field is missing
        required = [f.name for f in fields(cls) if f.default is f.default_factory]
        missing = [name for name in required if name not in data]
        raise FieldError(
            f"{text}schedule {kind!r} requires {', '.join(required)}", *where, *(missing[:1] or required[:1])
        ) from exc
    except FieldError as exc:
        raise FieldError(f"{text}{exc}", *where, *exc.field) from None


def schedule_from_dict(data: Any) -> Schedule:
    """Build a schedule from its dict form (``{"type": ..., ...}``); ``ValueError`` says what was wrong."""
    schedule: Schedule = _from_dict(data)
    return schedule


class LRTable:
    """Learning rates already computed, per (schedule, base lr): each new step costs O(1).

    A replay of torch's recursion to step ``k`` costs ``k`` iterations once (about a second
    per million steps); the values are kept in compact float64 arrays, for the ``max_entries``
    most recently used schedules.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, float], tuple[array[float], _Runner]] = OrderedDict()

    def lr(self, schedule: Schedule, base_lr: float, k: int) -> float:
        """The lr of update ``k`` (0-based) of a parameter."""
        if isinstance(schedule, ConstantSchedule):
            return base_lr
        key = (repr(schedule.to_dict()), base_lr)
        entry = self._entries.get(key)
        if entry is None:
            runner = schedule.runner(base_lr)
            entry = (array("d", [runner.lr]), runner)
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        values, runner = entry
        while len(values) <= k:
            runner.step()
            values.append(runner.lr)
        return values[k]
