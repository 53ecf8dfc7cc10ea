"""Benchmark the exact momentum kernel against plain numpy and torch.optim.SGD (CPU).

Run: .venv/bin/python bench/kernel.py [--size 1000000] [--repeat 7]
Prints the median time per step (ms) of one full momentum update with weight decay and
nesterov, for float32 and float64, measured in one run, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from momentum_service.kernels import SGDConfig, sgd_update

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
    print(f"one momentum step (nesterov, weight decay) on {args.size:,} elements; median of {args.repeat}, ms")
    print(f"{'dtype':8} {'exact (ours)':>13} {'plain numpy':>12} {'torch.optim.SGD':>16}")
    for dtype in (np.float32, np.float64):
        value = rng.standard_normal(args.size).astype(dtype)
        velocity = rng.standard_normal(args.size).astype(dtype)
        grad = rng.standard_normal(args.size).astype(dtype)
        tp = torch.nn.Parameter(torch.from_numpy(value.copy()))
        opt = torch.optim.SGD([tp], lr=CFG.lr, momentum=CFG.momentum, nesterov=True, weight_decay=CFG.weight_decay)
        tp.grad = torch.from_numpy(grad.copy())
        opt.step()
        runs: dict[str, list[float]] = {"ours": [], "naive": [], "torch": []}
        inner = max(1, 20_000_000 // args.size)
        for _ in range(args.repeat):
            inputs = (value, velocity, grad)
            runs["ours"].append(timed(lambda a=inputs: sgd_update(CFG, *a), inner))  # type: ignore[misc]
            runs["naive"].append(timed(lambda a=inputs: naive(*a), inner))  # type: ignore[misc]
            runs["torch"].append(timed(opt.step, inner))
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"{np.dtype(dtype).name:8} {med['ours']:13.2f} {med['naive']:12.2f} {med['torch']:16.2f}")


if __name__ == "__main__":
    main()
