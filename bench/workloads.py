"""The workloads: which parameters a model has and what one measured step sends.

Every system runs the same workload the same way: each step pushes one float32 gradient per
parameter and receives the updated parameters, under ``torch.optim.SGD``'s rule with lr 0.01
and momentum 0.9. A ``singles`` workload is the exception on purpose: one measured "step" is
one request *per parameter* (the 1,000-requests side of the batching comparison).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

LR = 0.01
MOMENTUM = 0.9

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Workload:
    """A named set of parameters (name, shape); ``singles``: one request per parameter per step."""

    name: str
    description: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    singles: bool = False
    group: str = "main"

    @property
    def floats(self) -> int:
        """Floats in one full set of parameters (the gradient of one step has as many)."""
        return sum(math.prod(shape) for _, shape in self.params)

    @property
    def payload_bytes(self) -> int:
        """Useful bytes moved by one step: the float32 gradients up plus the float32 parameters down."""
        return 2 * 4 * self.floats

    def initial(self) -> dict[str, F32]:
        """The initial parameters (the same for every system and run)."""
        rng = np.random.default_rng(1234)
        return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.1) for name, shape in self.params}

    def gradients(self, worker: int) -> dict[str, F32]:
        """The gradients worker ``worker`` pushes at every step (fixed, so no time goes into making them)."""
        rng = np.random.default_rng(10_000 + worker)
        return {name: (rng.standard_normal(shape, dtype=np.float32) * 1e-3) for name, shape in self.params}


def _mlp() -> tuple[tuple[str, tuple[int, ...]], ...]:
    sizes = (784, 640, 640, 128, 10)
    out: list[tuple[str, tuple[int, ...]]] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        out.append((f"fc{i + 1}.weight", (fan_out, fan_in)))
        out.append((f"fc{i + 1}.bias", (fan_out,)))
    return tuple(out)


def _one(n: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return (("w", (n,)),)


def _many(count: int, size: int = 100) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((f"p{i:04d}", (size,)) for i in range(count))


def _label(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


MAIN = {
    "tiny": Workload("tiny", "1 parameter of 1,000 floats", _one(1_000)),
    "mlp": Workload("mlp", "8 parameters: a 784-640-640-128-10 MLP (~1M floats)", _mlp()),
    "wide": Workload("wide", "1 parameter of 10M floats", _one(10_000_000)),
}

SIZE_SERIES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
"""Floats in the one parameter of each point of the size series; 1k and 10M are ``tiny`` and ``wide``."""

PARAM_SERIES = (1, 10, 100, 1_000)
"""Parameters (of 100 floats each) in the one request of each point of the parameter-count series."""

BATCH_PARAMS = 1_000


def size_workload(n: int) -> Workload:
    """The size-series point with ``n`` floats (``tiny`` and ``wide`` themselves for 1k and 10M)."""
    for w in MAIN.values():
        if w.params == _one(n):
            return w
    return Workload(f"size-{_label(n)}", f"1 parameter of {n:,} floats", _one(n), group="sizes")


def params_workload(count: int) -> Workload:
    return Workload(f"params-{count}", f"{count} parameters of 100 floats in one request", _many(count), group="params")


def singles_workload(count: int = BATCH_PARAMS) -> Workload:
    return Workload(
        f"singles-{count}",
        f"{count} parameters of 100 floats, one request each (a step = {count} requests)",
        _many(count),
        singles=True,
        group="batching",
    )


GROUPS = ("tiny", "mlp", "wide", "sizes", "params", "batching")
"""What ``--workloads`` accepts: the three main workloads, and the three series."""
