"""A model's config: its momentum rule, learning-rate schedule and mode (domain, no HTTP).

Stored as JSON ``{"optimizer": {"rule": ..., ...}, "schedule": {"type": ..., ...},
"mode": "async"|"sync"|"bounded", "workers": n, "max_staleness": s,
"durability": "step"|{"flush_ms": n}, "groups": [{"name": ..., "params": [...], <hyperparameters>}]}``;
a config written before rules and schedules existed reads as the ``pytorch`` rule with a
constant schedule in async mode.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from .errors import InvalidConfig
from .kernels import Rule, Schedule, rule_from_dict, schedule_from_dict
from .kernels.errors import FieldError
from .kernels.schedules import ConstantSchedule
from .kernels.sgd import check_bool, check_number

__all__ = ["Durability", "MODE_FIELDS", "Mode", "ModelConfig", "ParamGroup"]


MAX_WORKERS = 1024
MAX_STALENESS = 2**31 - 1
MODES = ("async", "sync", "bounded")


def _count(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise FieldError(f"{name} must be between {low} and {high}, got {value!r}", name)
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
            raise FieldError(f"mode must be one of {', '.join(MODES)}, got {self.kind!r}", "mode")
        if self.kind == "sync":
            if self.workers is None:
                raise FieldError("mode 'sync' requires workers (the number of workers per step)", "workers")
            _count("workers", self.workers, 1, MAX_WORKERS)
        elif self.workers is not None:
            raise FieldError(f"workers applies only to mode 'sync', not {self.kind!r}", "workers")
        if self.kind == "bounded":
            if self.max_staleness is None:
                raise FieldError("mode 'bounded' requires max_staleness (in steps)", "max_staleness")
            _count("max_staleness", self.max_staleness, 0, MAX_STALENESS)
        elif self.max_staleness is not None:
            raise FieldError(f"max_staleness applies only to mode 'bounded', not {self.kind!r}", "max_staleness")

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
MAX_FLUSH_MS = 60_000


MAX_WAIT_REPLICAS = 8


@dataclass(frozen=True, slots=True)
class Durability:
    """When a step is acknowledged, against when it is in the journal (Redis).

    ``step`` (``flush_ms`` None): once its log entry is written. ``{"flush_ms": n}``: at once,
    from the owner's memory; the log reaches the journal within ``n`` ms, so a crash of the
    owner loses at most the steps of the last ``n`` ms (plus the lease period).
    ``{"replicas": n}``: once its log entry is written *and* at least ``n`` Redis replicas of the
    primary holding it have it (Redis ``WAIT``), so a failover of that primary loses no acknowledged step.
    """

    flush_ms: int | None = None
    replicas: int = 0

    def __post_init__(self) -> None:
        if self.flush_ms is not None:
            _count("durability.flush_ms", self.flush_ms, 1, MAX_FLUSH_MS)
        if self.replicas:
            _count("durability.replicas", self.replicas, 1, MAX_WAIT_REPLICAS)

    @classmethod
    def parse(cls, value: Any) -> Durability:
        if value is None or value == "step":
            return cls()
        if isinstance(value, Mapping) and set(value) == {"flush_ms"}:
            return cls(_integral(value["flush_ms"]))
        if isinstance(value, Mapping) and set(value) == {"replicas"}:
            return cls(replicas=_integral(value["replicas"]))
        raise FieldError(
            f'durability must be "step", {{"flush_ms": n}} (n from 1 to {MAX_FLUSH_MS}) or {{"replicas": n}} '
            f"(n from 1 to {MAX_WAIT_REPLICAS}), got {value!r}",
            "durability",
        )

    def to_json(self) -> Any:
        if self.replicas:
            return {"replicas": self.replicas}
        return "step" if self.flush_ms is None else {"flush_ms": self.flush_ms}


MAX_GROUPS = 1024
MAX_GROUP_PARAMS = 100_000
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class ParamGroup:
    """Hyperparameters of their own for some parameters ("no weight decay on biases and norms").

    ``params`` are parameter names or ``fnmatch`` patterns (``*.bias``); a parameter takes the
    first group that names or matches it, else the model's optimizer. ``overrides`` are some of
    the rule's hyperparameters; the rest are the model's, so a PATCH of the model's optimizer
    reaches every group that does not override that hyperparameter.
    """

    name: str
    params: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": list(self.params), **dict(self.overrides)}

    def matches(self, param: str) -> bool:
        return any(p == param or fnmatchcase(param, p) for p in self.params)


def _parse_groups(rule: Rule, groups: Any) -> tuple[tuple[ParamGroup, ...], tuple[Rule, ...]]:
    """The groups of a config, validated against ``rule``, with each group's rule."""
    if groups is None:
        return (), ()
    if not isinstance(groups, Sequence) or isinstance(groups, str | bytes):
        raise InvalidConfig(f"groups must be a list of parameter groups, got {groups!r}"[:300], "groups")
    if len(groups) > MAX_GROUPS:
        raise InvalidConfig(f"at most {MAX_GROUPS} parameter groups, got {len(groups)}", "groups")
    out: list[ParamGroup] = []
    rules: list[Rule] = []
    names: set[str] = set()
    named: dict[str, str] = {}
    for i, raw in enumerate(groups):
        if not isinstance(raw, Mapping):
            raise InvalidConfig(f"groups[{i}] must be an object with params and hyperparameters", "groups", (i,))
        raw = dict(raw)
        name = raw.pop("name", None)
        name = str(i) if name is None else name
        if not isinstance(name, str) or not _GROUP_NAME.match(name):
            raise InvalidConfig(
                f"groups[{i}].name must be 1 to 128 letters, digits or ._:- (not starting with ._:-), got {name!r}",
                "groups",
                (i, "name"),
            )
        if name in names:
            raise InvalidConfig(f"two parameter groups are named {name!r}", "groups", (i, "name"))
        names.add(name)
        params = raw.pop("params", None)
        if (
            not isinstance(params, Sequence)
            or isinstance(params, str | bytes)
            or not params
            or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in params)
        ):
            raise InvalidConfig(
                f"groups[{i}].params must be a non-empty list of parameter names or patterns (1 to 256 characters)",
                "groups",
                (i, "params"),
            )
        if len(params) > MAX_GROUP_PARAMS:
            raise InvalidConfig(f"groups[{i}].params: at most {MAX_GROUP_PARAMS} entries", "groups", (i, "params"))
        for p in params:
            if p in named:
                raise InvalidConfig(
                    f"parameter {p!r} is in groups {named[p]!r} and {name!r}; a parameter may be in one group only",
                    "groups",
                    (i, "params"),
                )
            named[p] = name
        if "rule" in raw:
            raise InvalidConfig(
                f"groups[{i}]: a group cannot change the rule (the model's rule is {rule.name!r})",
                "groups",
                (i, "rule"),
            )
        allowed = [k for k in rule.to_dict() if k != "rule"]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise InvalidConfig(
                f"groups[{i}]: rule {rule.name!r} has no hyperparameter {', '.join(unknown)}; its hyperparameters "
                f"are: {', '.join(allowed)}",
                "groups",
                (i, unknown[0]),
            )
        try:
            group_rule = rule.updated(**raw)
        except (TypeError, ValueError) as exc:
            path = exc.field if isinstance(exc, FieldError) else ()
            raise InvalidConfig(f"groups[{i}] ({name!r}): {exc}", "groups", (i, *path)) from None
        resolved = group_rule.to_dict()
        out.append(ParamGroup(name, tuple(params), tuple((k, resolved[k]) for k in raw)))
        rules.append(group_rule)
    return tuple(out), tuple(rules)


_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    rule: Rule
    schedule: Schedule
    mode: Mode = Mode()
    durability: Durability = Durability()
    groups: tuple[ParamGroup, ...] = ()
    group_rules: tuple[Rule, ...] = ()
    shards: int = 1
    """Parameter shards (see ``engine/shards.py``): fixed when the model is created."""
    _rules: dict[str, Rule] = field(default_factory=dict, compare=False, repr=False)

    def rule_for(self, param: str) -> Rule:
        """The rule (with its hyperparameters) that updates ``param``: its group's, else the model's."""
        if not self.groups:
            return self.rule
        found = self._rules.get(param)
        if found is None:
            found = next((r for g, r in zip(self.groups, self.group_rules, strict=True) if g.matches(param)), self.rule)
            if len(self._rules) < 1_000_000:
                self._rules[param] = found
        return found

    @classmethod
    def build(
        cls,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        mode: Mapping[str, Any] | None = None,
        durability: Any = None,
        groups: Any = None,
        shards: Any = None,
    ) -> ModelConfig:
        """Validate a config from its parts; :class:`InvalidConfig` names the part at fault."""
        try:
            rule = rule_from_dict(dict(optimizer))
        except (TypeError, ValueError) as exc:
            raise _invalid(exc, "optimizer") from None
        try:
            sched = ConstantSchedule() if schedule is None else schedule_from_dict(dict(schedule))
        except (TypeError, ValueError) as exc:
            raise _invalid(exc, "schedule") from None
        parsed, rules = _parse_groups(rule, groups)
        modes = _mode(lambda: Mode.from_fields(mode or {}))
        count = _shards(shards, modes)
        return cls(rule, sched, modes, _mode(lambda: Durability.parse(durability)), parsed, rules, count)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls.build(
            data["optimizer"],
            data.get("schedule"),
            {k: data[k] for k in MODE_FIELDS if k in data},
            data.get("durability"),
            data.get("groups"),
            data.get("shards"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "optimizer": self.rule.to_dict(),
            "schedule": self.schedule.to_dict(),
            **self.mode.to_dict(),
            "durability": self.durability.to_json(),
        }
        if self.groups:
            out["groups"] = [g.to_dict() for g in self.groups]
        if self.shards > 1:
            out["shards"] = self.shards
        return out

    def patched(
        self,
        optimizer: Mapping[str, Any],
        schedule: Mapping[str, Any] | None,
        mode: Mapping[str, Any] | None = None,
        durability: Any = None,
        groups: Any = None,
    ) -> ModelConfig:
        """This config with some hyperparameters, the schedule, the mode, the durability and/or the groups
        changed, validated.

        ``groups`` as a list replaces the groups; as a mapping ``{group name: changes}`` it changes those
        groups (their ``params`` and/or hyperparameters), keeping the others.
        """
        changes = {k: v for k, v in optimizer.items() if k != "rule"}
        try:
            rule = self.rule.updated(**changes)
        except TypeError:
            return ModelConfig.build({**self.rule.to_dict(), **changes})  # names the unknown field
        except ValueError as exc:
            raise _invalid(exc, "optimizer") from None
        new_schedule = self.schedule if schedule is None else ModelConfig.build(rule.to_dict(), schedule).schedule
        new_mode = self.mode if not mode else _mode(lambda: self.mode.patched(mode))
        new_durability = self.durability if durability is None else _mode(lambda: Durability.parse(durability))
        group_list: Any = [g.to_dict() for g in self.groups]
        if isinstance(groups, Mapping):
            by_name = {g["name"]: g for g in group_list}
            for gname, change in groups.items():
                if gname not in by_name:
                    raise InvalidConfig(
                        f"the model has no parameter group {gname!r}; its groups are: {', '.join(by_name) or '(none)'}",
                        "groups",
                        (gname,),
                    )
                if not isinstance(change, Mapping) or "name" in change:
                    raise InvalidConfig(
                        f"groups.{gname}: give the params and/or hyperparameters to change (not its name)",
                        "groups",
                        (gname,),
                    )
                by_name[gname].update(change)
        elif groups is not None:
            group_list = groups
        parsed, rules = _parse_groups(rule, group_list)
        _shards(self.shards, new_mode)
        return ModelConfig(rule, new_schedule, new_mode, new_durability, parsed, rules, self.shards)


MAX_SHARDS = 64


def _shards(value: Any, mode: Mode) -> int:
    """A config's parameter shard count (1 to ``MAX_SHARDS``; ``None``: 1); only async mode is sharded."""
    if value is None:
        return 1
    try:
        count = _count("shards", _integral(value), 1, MAX_SHARDS)
    except FieldError as exc:
        raise _invalid(exc, None) from None
    if count > 1 and mode.kind != "async":
        raise InvalidConfig(
            f"mode {mode.kind!r} is not supported on sharded models (shards {count}): a sharded model runs in "
            "mode 'async'",
            "mode",
        )
    return count


def _mode(make: Callable[[], _T]) -> _T:
    try:
        return make()
    except (TypeError, ValueError) as exc:
        raise _invalid(exc, None) from None


def _invalid(exc: Exception, part: str | None) -> InvalidConfig:
    """The config error for a validation error of ``part`` (``None``: the mode fields, top level)."""
    field = exc.field if isinstance(exc, FieldError) else ()
    return InvalidConfig(str(exc), part or (str(field[0]) if field else "mode"), (*field[1:],) if not part else field)


def _integral(value: Any) -> Any:
    return int(value) if type(value) is float and value.is_integer() else value


def explain_put(body: Any) -> None:
    """Raise the domain's :class:`InvalidConfig` for a model config body it rejects (else nothing).

    Called when the body failed the API's schema, so that the error says what the rule, the
    schedule or the mode itself says (``lr must be >= 0, got -0.1``), at the field's place.
    """
    if not isinstance(body, dict) or not isinstance(body.get("optimizer"), dict):
        return
    schedule = body.get("schedule")
    mode = {k: _integral(body[k]) for k in MODE_FIELDS if k in body and body[k] is not None}
    with contextlib.suppress(TypeError):
        ModelConfig.build(
            body["optimizer"],
            schedule if isinstance(schedule, dict) else None,
            mode,
            body.get("durability"),
            body.get("groups"),
            body.get("shards"),
        )


_PATCHABLE = {
    "lr": "number",
    "momentum": "number",
    "dampening": "number",
    "weight_decay": "number",
    "nesterov": "bool",
    "maximize": "bool",
    "rule": "str",
}


def explain_patch(body: Any) -> None:
    """Like :func:`explain_put`, for a PATCH body (whose rule is the stored model's)."""
    if not isinstance(body, dict):
        return
    if "shards" in body:
        raise InvalidConfig(
            "shards cannot be changed: a model's parameter shards are fixed when it is created (delete the model "
            "and create it again with another count)",
            "shards",
        )
    optimizer = body.get("optimizer")
    if isinstance(optimizer, dict):
        for name, value in optimizer.items():
            kind = _PATCHABLE.get(name)
            if kind is None:
                raise InvalidConfig(
                    f"optimizer has no hyperparameter {name!r}; the hyperparameters are: {', '.join(_PATCHABLE)} "
                    "(each rule has some of them)",
                    "optimizer",
                    (name,),
                )
            try:
                if kind == "number" and value is not None:
                    check_number(name, value)
                elif kind == "bool" and value is not None:
                    check_bool(name, value)
                elif kind == "str" and value is not None and not isinstance(value, str):
                    raise FieldError(f"rule must be a string, got {value!r}", "rule")
            except FieldError as exc:
                raise _invalid(exc, "optimizer") from None
    schedule = body.get("schedule")
    if isinstance(schedule, dict):
        try:
            schedule_from_dict(schedule)
        except (TypeError, ValueError) as exc:
            raise _invalid(exc, "schedule") from None
    if body.get("durability") is not None:
        try:
            Durability.parse(body["durability"])
        except (TypeError, ValueError) as exc:
            raise _invalid(exc, None) from None
    fields = {k: _integral(body[k]) for k in MODE_FIELDS if body.get(k) is not None}
    if "mode" in fields and fields["mode"] not in MODES:
        raise InvalidConfig(f"mode must be one of {', '.join(MODES)}, got {fields['mode']!r}", "mode")
    for name, low, high in (("workers", 1, MAX_WORKERS), ("max_staleness", 0, MAX_STALENESS)):
        if name in fields:
            try:
                _count(name, fields[name], low, high)
            except FieldError as exc:
                raise _invalid(exc, None) from None
