"""The momentum rule of ``torch.optim.SGD``, as a pure function over numpy arrays.

Per parameter ``p`` with velocity buffer ``b`` (absent until its first momentum update)::

    g = -grad if maximize else grad
    g = g + wd*p                              (when wd != 0)
    b = g on the first update, else b = m*b + (1-d)*g      (when m != 0)
    g = g + m*b if nesterov else b            (when m != 0)
    p = p - lr*g

Every ``x + a*y`` is computed as torch's CPU kernel does, as one fused multiply-add
(see :mod:`.fma`), and ``m*b`` as one rounded product, so float32 and float64 results
are bitwise those of torch 2.13 on CPU.

Two implementations compute the same bits:

* the native kernel ``momentum_service.kernels._sgd`` (C, built from ``_sgd.c`` when the
  package is installed): one pass over the elements with C99 ``fmaf``/``fma`` (hardware FMA
  where the CPU has it), the GIL released. It serves float32 and float64 whenever it imported;
* the numpy path (:func:`_update_flat`, with the emulated fma of :mod:`.fma`): the reference,
  and the fallback when the extension is not built (or for any other dtype).

:data:`BACKEND` says which one float32/float64 updates take (``"native"`` or ``"numpy"``);
:data:`NATIVE_IMPORT_ERROR` says why the extension did not import, if it did not.

Environment: ``MOMENTUM_PURE_KERNEL=1`` (or ``true``/``yes``/``on``) forces the numpy path, to
compare or to rule the extension out when debugging; unset or anything else keeps the native
kernel. It is read once, when this module is first imported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .buffers import POOL
from .errors import FieldError
from .fma import fma

__all__ = ["SGDConfig", "sgd_update"]

Array = npt.NDArray[np.floating]


def check_number(name: str, value: Any, *, upper: float | None = None) -> float:
    """A hyperparameter as a float; ``ValueError`` says what is wrong (type, finiteness, range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"{name} must be a number, got {value!r}", name)
    if not math.isfinite(value):
        raise FieldError(f"{name} must be finite, got {value!r}", name)
    if value < 0.0:
        raise FieldError(f"{name} must be >= 0, got {value!r}", name)
    if upper is not None and value > upper:
        raise FieldError(f"{name} must be between 0 and {upper:g}, got {value!r}", name)
    return float(value)


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FieldError(f"{name} must be a boolean, got {value!r}", name)


@dataclass(frozen=True, slots=True)
class SGDConfig:
    """Hyperparameters of the ``pytorch`` rule, validated like ``torch.optim.SGD``'s constructor."""

    name: ClassVar[str] = "pytorch"
    buffers: ClassVar[tuple[str, ...]] = ("velocity",)
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))
        for name in ("nesterov", "maximize"):
            check_bool(name, getattr(self, name))
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise FieldError(
                "nesterov momentum requires momentum > 0 and dampening = 0, "
                f"got momentum={self.momentum!r}, dampening={self.dampening!r}",
                "nesterov",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def updated(self, **changes: Any) -> SGDConfig:
        """A copy with some fields changed, validated as a whole."""
        return replace(self, **changes)

    def update(self, value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array | None]:
        """One step with learning rate ``lr`` (see :func:`sgd_update`)."""
        return sgd_update(self, value, velocity, grad, lr=lr)

    def apply(self, value: Array, state: Mapping[str, Array], grad: Array, lr: float) -> tuple[Array, dict[str, Array]]:
        """One step over the rule's named state (``{"velocity": ...}``, empty before the first)."""
        return with_velocity(self.update, value, state, grad, lr)


def with_velocity(
    update: Callable[[Array, Array | None, Array, float], tuple[Array, Array | None]],
    value: Array,
    state: Mapping[str, Array],
    grad: Array,
    lr: float,
) -> tuple[Array, dict[str, Array]]:
    """A one-buffer rule's ``update(value, velocity, grad, lr)`` over named state ``{"velocity": v}``."""
    new_value, velocity = update(value, state.get("velocity"), grad, lr)
    return new_value, {} if velocity is None else {"velocity": velocity}


NativeKernel = Callable[..., None]

PURE_KERNEL = os.environ.get("MOMENTUM_PURE_KERNEL", "").strip().lower() in {"1", "true", "yes", "on"}

try:
    from ._sgd import sgd_float32, sgd_float64
except ImportError as exc:  # not built (no C compiler at install time): the numpy path serves all
    NATIVE_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
    _NATIVE_KERNELS: dict[np.dtype[Any], NativeKernel] = {}
else:
    NATIVE_IMPORT_ERROR = None
    _NATIVE_KERNELS = {np.dtype(np.float32): sgd_float32, np.dtype(np.float64): sgd_float64}

# The kernels sgd_update dispatches to, by dtype; empty means the numpy path for everything.
_NATIVE: dict[np.dtype[Any], NativeKernel] = {} if PURE_KERNEL else dict(_NATIVE_KERNELS)
BACKEND = "native" if _NATIVE else "numpy"


def sgd_update(
    config: SGDConfig, value: Array, velocity: Array | None, grad: Array, *, lr: float | None = None
) -> tuple[Array, Array | None]:
    """One momentum step. Returns ``(new_value, new_velocity)``; the inputs are not modified.

    ``lr`` overrides ``config.lr`` (a scheduled learning rate).

    ``value``, ``velocity`` and ``grad`` share one dtype (float32 or float64) and shape.
    ``velocity`` is ``None`` before the parameter's first update with momentum; it stays
    ``None`` (or unchanged) while momentum is 0, exactly like torch's ``momentum_buffer``.
    A ``grad`` or ``velocity`` of another shape raises ValueError, of another dtype TypeError.
    """
    _check_operands(value, velocity, grad)
    step_lr = config.lr if lr is None else lr
    kernel = _NATIVE.get(value.dtype)
    if kernel is not None:
        return _update_native(kernel, config, step_lr, value, velocity, grad)
    return _update_numpy(config, step_lr, value, velocity, grad)


def _check_operands(value: Array, velocity: Array | None, grad: Array) -> None:
    for name, other in (("grad", grad), ("velocity", velocity)):
        if other is None:
            continue
        if other.shape != value.shape:
            raise ValueError(f"{name} has shape {other.shape}, the value {value.shape}")
        if other.dtype != value.dtype:
            raise TypeError(f"{name} has dtype {other.dtype}, the value {value.dtype}")


def _update_native(
    kernel: NativeKernel, config: SGDConfig, lr: float, value: Array, velocity: Array | None, grad: Array
) -> tuple[Array, Array | None]:
    """The one-pass C kernel: flat C-contiguous operands (copies only where needed), new outputs (from
    :data:`.buffers.POOL`: memory of outputs nobody holds any more)."""
    shape = value.shape
    v, g = np.ravel(value), np.ravel(grad)
    momentum = config.momentum != 0
    b = np.ravel(velocity) if momentum and velocity is not None else None
    new_value = POOL.empty(v.size, v.dtype)  # recycled memory: no page faults on first write
    new_velocity = POOL.empty(v.size, v.dtype) if momentum else None
    kernel(
        v,
        b,
        g,
        new_value,
        new_velocity,
        lr,
        config.momentum,
        config.dampening,
        config.weight_decay,
        config.nesterov,
        config.maximize,
    )
    if new_velocity is None:  # momentum 0: the buffer, if any, is left as it is (like torch's)
        return new_value.reshape(shape), (None if velocity is None else velocity.reshape(shape))
    return new_value.reshape(shape), new_velocity.reshape(shape)


# Large tensors are updated block by block on the numpy path: each block's temporaries stay
# in the CPU cache and are recycled by the allocator, instead of a fresh 8 MB array per operation.
_BLOCK = 1 << 15


def _update_numpy(
    config: SGDConfig, lr: float, value: Array, velocity: Array | None, grad: Array
) -> tuple[Array, Array | None]:
    """The numpy path: the reference implementation, and the fallback."""
    shape = value.shape
    # Work on 1-D views: numpy ufuncs turn 0-d arrays into scalars, which would lose the dtype discipline.
    v, g = value.reshape(-1), grad.reshape(-1)
    b = None if velocity is None else velocity.reshape(-1)
    if v.size <= _BLOCK:
        new_value, new_velocity = _update_flat(config, lr, v, b, g)
    else:
        new_value = np.empty_like(v)
        new_velocity = None if config.momentum == 0 and b is None else np.empty_like(v)
        for start in range(0, v.size, _BLOCK):
            part = slice(start, start + _BLOCK)
            nv, nb = _update_flat(config, lr, v[part], None if b is None else b[part], g[part])
            new_value[part] = nv
            if new_velocity is not None:
                new_velocity[part] = nb
    return new_value.reshape(shape), (None if new_velocity is None else new_velocity.reshape(shape))


def _update_flat(
    config: SGDConfig, lr: float, value: Array, velocity: Array | None, grad: Array
) -> tuple[Array, Array | None]:
    g = -grad if config.maximize else grad
    if config.weight_decay != 0:
        g = fma(config.weight_decay, value, g)
    new_velocity = velocity
    if config.momentum != 0:
        if velocity is None:
            new_velocity = g.copy()
        else:
            scaled = velocity * value.dtype.type(config.momentum)
            new_velocity = fma(1.0 - config.dampening, g, scaled)
        g = fma(config.momentum, new_velocity, g) if config.nesterov else new_velocity
    return fma(-lr, g, value), new_velocity
