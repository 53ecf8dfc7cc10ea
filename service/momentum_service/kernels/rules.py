"""The momentum rules a model can pick, as small pure transforms over typed state.

Each rule is a frozen dataclass of hyperparameters, validated on construction, with one
method ``update(value, velocity, grad, lr) -> (value, velocity)``: numpy in, numpy out,
inputs never modified. ``lr`` is the learning rate of this update (the schedule's value,
see :mod:`.schedules`); the ``lr`` field is the base learning rate the schedule scales.
``velocity`` is the rule's one state buffer, ``None`` until the rule first creates it.

Everything above the kernels sees a rule's state as *named buffers*: ``buffers`` names them,
and ``apply(value, state, grad, lr) -> (value, state)`` takes and returns ``{name: array}``
(empty before the first update). The engine, the journal, the wire and the SDK carry state
that way, so a rule with two buffers is this module plus its test, not a change to each layer.

The rules differ in where the learning rate sits, which decides what a change of lr does:

* **lr outside the velocity** (``pytorch``, ``tf1``, ``ema``): the velocity accumulates
  raw gradients and each update multiplies it by the *current* lr, so a new lr applies at
  once to the whole accumulated velocity.
* **lr inside the velocity** (``keras``, ``previous_delta``): each step's lr is baked into
  what it contributes, so after a change the old steps keep their old lr and the new one
  takes over only as the velocity decays (after ``lr -> 0``, keras keeps coasting).

Every rule rounds exactly as its reference framework does, so results are bitwise theirs:

=================  ======================================  ===================================
rule               reference                                rounding
=================  ======================================  ===================================
``pytorch``        ``torch.optim.SGD`` (CPU)                fused multiply-adds (:mod:`.fma`)
``keras``          Keras 3 ``SGD``, TensorFlow backend      once per operation; lr, momentum,
                                                            weight decay pass through float32
``tf1``            ``tf.compat.v1.train.MomentumOptimizer`` once per operation; lr and momentum
                                                            pass through float32
``ema``            ``optax.chain(optax.ema(m, debias=       once per operation
                   False), optax.scale_by_learning_rate)``
``previous_delta`` the formula (no framework has it)       once per operation
=================  ======================================  ===================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import numpy.typing as npt

from .errors import FieldError
from .sgd import SGDConfig, with_velocity
from .sgd import check_bool as _check_bool
from .sgd import check_number as _check_number

__all__ = [
    "EMAMomentum",
    "KerasSGD",
    "PreviousDelta",
    "RULES",
    "Rule",
    "SGDConfig",
    "TF1Momentum",
    "rule_from_dict",
]

Array = npt.NDArray[np.floating]


class Rule(Protocol):
    """What every momentum rule provides."""

    name: ClassVar[str]
    buffers: ClassVar[tuple[str, ...]]
    """The names of the rule's state buffers (each the parameter's shape and dtype)."""

    @property
    def lr(self) -> float:
        """The base learning rate (the schedule scales it)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The hyperparameters, with ``"rule": name`` (the inverse of :func:`rule_from_dict`)."""
        ...

    def updated(self, **changes: Any) -> Self:
        """A copy with some hyperparameters changed, validated as a whole."""
        ...

    def update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        """One step with learning rate ``lr``: ``(new_value, new_velocity)``."""
        ...

    def apply(self, value: Array, state: Mapping[str, Array], grad: Array, lr: float) -> tuple[Array, dict[str, Array]]:
        """One step over named state: ``(new_value, new_state)``; the inputs are not modified."""
        ...


def _via_float32(x: float, dtype: np.dtype[Any]) -> np.floating[Any]:
    """``x`` as the frameworks that keep hyperparameters in float32 tensors see it, in ``dtype``."""
    scalar: np.floating[Any] = dtype.type(np.float32(x))
    return scalar


class _RuleBase:
    """Shared plumbing: dict conversion and validated copies."""

    name: ClassVar[str]
    buffers: ClassVar[tuple[str, ...]] = ("velocity",)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]

    def updated(self, **changes: Any) -> Self:
        return replace(self, **changes)  # type: ignore[type-var]

    def update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        """One step with learning rate ``lr``: ``(new_value, new_velocity)``, arrays of the input's shape."""
        # On 1-D views: numpy turns 0-d results into scalars, which would lose the array type.
        shape = value.shape
        flat_velocity = None if velocity is None else velocity.reshape(-1)
        new_value, new_velocity = self._update(value.reshape(-1), flat_velocity, grad.reshape(-1), lr)
        return new_value.reshape(shape), None if new_velocity is None else new_velocity.reshape(shape)

    def apply(self, value: Array, state: Mapping[str, Array], grad: Array, lr: float) -> tuple[Array, dict[str, Array]]:
        return with_velocity(self.update, value, state, grad, lr)

    def _update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class KerasSGD(_RuleBase):
    """Keras 3 ``SGD`` (and the textbook rule ``v = beta*v + eta*g; theta = theta - v``).

    ::

        w = w - w*wd*lr                                 (when weight_decay != 0; decoupled, first)
        v = m*v - lr*g                                  (v starts at 0; only when m != 0)
        w = w + v            or, nesterov:  w = w + (m*v - lr*g)
        w = w - lr*g                                    (when m == 0)

    The textbook velocity is ``-v``: same numbers, opposite sign. Every operation rounds
    once, in the order written; lr, momentum and weight decay are first rounded to float32,
    as Keras keeps them (bitwise Keras 3.15 / TensorFlow 2.21 in float32 and float64).
    """

    name: ClassVar[str] = "keras"
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_number("lr", self.lr))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum, upper=1.0))
        object.__setattr__(self, "weight_decay", _check_number("weight_decay", self.weight_decay))
        _check_bool("nesterov", self.nesterov)

    def _update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        dt = value.dtype
        lr_t = _via_float32(lr, dt)
        w = value
        if self.weight_decay != 0:
            w = w - (w * _via_float32(self.weight_decay, dt)) * lr_t
        if self.momentum == 0:
            return w - grad * lr_t, velocity
        m = _via_float32(self.momentum, dt)
        v = np.zeros_like(w) if velocity is None else velocity
        v = v * m - grad * lr_t
        w = w + (v * m - grad * lr_t) if self.nesterov else w + v
        return w, v


@dataclass(frozen=True, slots=True)
class TF1Momentum(_RuleBase):
    """``tf.compat.v1.train.MomentumOptimizer``::

        accum = m*accum + g                             (accum starts at 0)
        var = var - lr*accum       or, nesterov:  var = var - (lr*g + lr*m*accum)

    Every operation rounds once, as TensorFlow's ``ApplyMomentum`` kernel does; lr and
    momentum are first rounded to float32 (Python floats become float32 tensors).
    """

    name: ClassVar[str] = "tf1"
    lr: float
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_number("lr", self.lr))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum))
        _check_bool("nesterov", self.nesterov)

    def _update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        dt = value.dtype
        lr_t, m = _via_float32(lr, dt), _via_float32(self.momentum, dt)
        accum = grad.copy() if velocity is None else velocity * m + grad
        if self.nesterov:
            return value - (grad * lr_t + (accum * m) * lr_t), accum
        return value - accum * lr_t, accum


@dataclass(frozen=True, slots=True)
class EMAMomentum(_RuleBase):
    """Momentum as a moving average of past gradients::

        v = m*v + (1-m)*g                               (v starts at 0)
        p = p - lr*v

    ``(1-m)`` is computed in float64, then each operation rounds once in the parameter's
    dtype: bitwise ``optax.ema(m, debias=False)`` followed by ``optax.scale_by_learning_rate``
    and ``optax.apply_updates`` run op by op (a ``jax.jit`` of the same chain may fuse
    multiply-adds and differ in the last bit).
    """

    name: ClassVar[str] = "ema"
    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_number("lr", self.lr))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum, upper=1.0))

    def _update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        dt = value.dtype.type
        scaled = grad * dt(1.0 - self.momentum)
        v = scaled if velocity is None else scaled + velocity * dt(self.momentum)
        return value + v * dt(-lr), v


@dataclass(frozen=True, slots=True)
class PreviousDelta(_RuleBase):
    """Re-applies the previous step, once: *not* momentum in the usual sense::

        delta = lr*g
        p = p - delta - m*delta_prev                    (delta_prev starts at 0)

    The velocity is the previous ``delta``. True momentum sums *all* past steps with
    weights ``m, m**2, m**3, ...``, so on a steady slope it moves ``lr*g/(1-m)`` per step
    (10x for m = 0.9); this rule echoes only the last step and moves ``lr*g*(1+m)`` (1.9x).
    It damps less oscillation and never builds up speed in a long ravine.
    """

    name: ClassVar[str] = "previous_delta"
    lr: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_number("lr", self.lr))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum))

    def _update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        dt = value.dtype.type
        delta = grad * dt(lr)
        p = value - delta
        if velocity is not None:
            p = p - velocity * dt(self.momentum)
        return p, delta


RULES: dict[str, type[Any]] = {
    "pytorch": SGDConfig,
    KerasSGD.name: KerasSGD,
    TF1Momentum.name: TF1Momentum,
    EMAMomentum.name: EMAMomentum,
    PreviousDelta.name: PreviousDelta,
}


def rule_from_dict(data: dict[str, Any]) -> Rule:
    """Build a rule from its dict form; ``"rule"`` defaults to ``"pytorch"``.

    Raises ``ValueError`` saying what was wrong: an unknown rule, a field the rule does not
    have (naming the ones it has), a missing lr, or an invalid value.
    """
    data = dict(data)
    name = data.pop("rule", "pytorch")
    cls = RULES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise FieldError(f"unknown rule {name!r}; the rules are: {', '.join(RULES)}", "rule")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise FieldError(
            f"rule {name!r} has no hyperparameter {', '.join(unknown)}; its hyperparameters are: {', '.join(names)}",
            unknown[0],
        )
    if "lr" not in data:
        raise FieldError("lr is required", "lr")
    rule: Rule = cls(**data)
    return rule
