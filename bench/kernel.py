"""Benchmark the exact momentum kernel against plain numpy and torch.optim.SGD (CPU).

Run: .venv/bin/python bench/kernel.py [--size 1000000] [--repeat 7]
Prints the median time per step (ms) of one full momentum update with weight decay and
nesterov, for float32 and float64, measured in one run, interleaved:

  ours-native   sgd_update's native path (the C extension kernels/_sgd.c), what the server runs
  ours-numpy    sgd_update's numpy path (the emulated fma; the reference and the fallback)
  numpy naive   the unfused numpy expression (not bitwise equal to torch; the speed floor of numpy)
  torch         torch.optim.SGD.step on one thread

Every variant allocates fresh outputs, as sgd_update does; torch updates in place.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from momentum_service.kernels import SGDConfig, sgd

CFG = SGDConfig(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)


def naive(value: np.ndarray, velocity: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dt = value.dtype.type
    g = grad + dt(CFG.weight_decay) * value
    b = velocity * dt(CFG.momentum) + g
    g = g + dt(CFG.momentum) * b
    return value - dt(CFG.lr) * g, b


def timed(fn: Callable[[], object], inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    kernels = sgd._NATIVE_KERNELS
    if kernels:
        from momentum_service.kernels import _sgd

        fma_note = "hardware FMA" if _sgd.hardware_fma() else "libm fma (no hardware FMA on this CPU)"
        print(f"native kernel: {_sgd.__file__} ({fma_note})")
    else:
        print(f"native kernel: not available ({sgd.NATIVE_IMPORT_ERROR})")
    print(f"one momentum step (nesterov, weight decay) on {args.size:,} elements; median of {args.repeat}, ms")
    print(f"{'dtype':8} {'ours-native':>12} {'ours-numpy':>11} {'numpy naive':>12} {'torch':>8}")
    for dtype in (np.float32, np.float64):
        value = rng.standard_normal(args.size).astype(dtype)
        velocity = rng.standard_normal(args.size).astype(dtype)
        grad = rng.standard_normal(args.size).astype(dtype)
        tp = torch.nn.Parameter(torch.from_numpy(value.copy()))
        opt = torch.optim.SGD([tp], lr=CFG.lr, momentum=CFG.momentum, nesterov=True, weight_decay=CFG.weight_decay)
        tp.grad = torch.from_numpy(grad.copy())
        opt.step()
        kernel = kernels.get(np.dtype(dtype))
        fns: dict[str, Callable[[], object]] = {
            "numpy": partial(sgd._update_numpy, CFG, CFG.lr, value, velocity, grad),
            "naive": partial(naive, value, velocity, grad),
            "torch": opt.step,
        }
        if kernel is not None:
            fns = {"native": partial(sgd._update_native, kernel, CFG, CFG.lr, value, velocity, grad), **fns}
        runs: dict[str, list[float]] = {k: [] for k in fns}
        inner = max(1, 20_000_000 // args.size)
        for _ in range(args.repeat):
            for name, fn in fns.items():
                runs[name].append(timed(fn, inner))
        med = {k: statistics.median(v) for k, v in runs.items()}
        native = f"{med['native']:12.2f}" if "native" in med else f"{'n/a':>12}"
        print(f"{np.dtype(dtype).name:8} {native} {med['numpy']:11.2f} {med['naive']:12.2f} {med['torch']:8.2f}")


if __name__ == "__main__":
    main()
