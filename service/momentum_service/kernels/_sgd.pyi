"""Type stub of the C extension built from _sgd.c (see kernels/sgd.py for the wrapper)."""

from typing_extensions import Buffer

def sgd_float32(
    value: Buffer,
    velocity: Buffer | None,
    grad: Buffer,
    out_value: Buffer,
    out_velocity: Buffer | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None: ...
def sgd_float64(
    value: Buffer,
    velocity: Buffer | None,
    grad: Buffer,
    out_value: Buffer,
    out_velocity: Buffer | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None: ...
def hardware_fma() -> bool: ...
