"""Synchronous training at a model's owner: the workers' gradients for one step, averaged once.

A sync push is worker ``w``'s contribution to step ``base`` of some parameters. The owner
gathers them per parameter in memory; the push that completes a parameter set (every one of
``0..workers-1`` has contributed to each of its parameters) applies the mean as one logged step,
and every waiting push of that step gets the result. Contributions are not logged: a step that
was never applied is not acknowledged to anyone (a push waits, or gets a 202 and sends itself
again), so after a change of owner the workers' re-sent pushes gather again. What is logged is
the applied step, with the workers averaged into it, so that a worker's retry of an applied
step can be told apart from a late push that missed it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..store.base import Array
from .results import StepResult

__all__ = ["SyncCoordinator", "mean_gradient"]


def mean_gradient(contributions: Mapping[int, Array]) -> Array:
    """The mean of the workers' gradients: summed in worker-id order, then divided by their number.

    Each addition and the division round once in the gradients' dtype, so the result is
    reproducible bit for bit: ``(((g_0 + g_1) + g_2) + ...) / n``.
    """
    total: Array | None = None
    for worker in sorted(contributions):
        g = contributions[worker]
        total = g.copy() if total is None else total + g
    assert total is not None
    out: Array = total / total.dtype.type(len(contributions))
    return out


@dataclass
class _Round:
    """The contributions to one step: per parameter, per worker; and the futures of the results."""

    started: float
    grads: dict[str, dict[int, Array]] = field(default_factory=dict)
    results: dict[str, asyncio.Future[StepResult]] = field(default_factory=dict)


class SyncCoordinator:
    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = ttl_s
        self._rounds: dict[int, _Round] = {}

    @property
    def pending(self) -> bool:
        """Whether contributions wait for a step (held in memory only)."""
        return bool(self._rounds)

    def contribute(self, base: int, worker: int, grads: Mapping[str, Array]) -> None:
        """Add a worker's gradients to step ``base`` (a worker's repeat is not counted twice)."""
        now = time.monotonic()
        for old in [b for b, r in self._rounds.items() if now - r.started > self.ttl_s]:
            self.drop(old)
        rnd = self._rounds.setdefault(base, _Round(now))
        for name, g in grads.items():
            rnd.grads.setdefault(name, {}).setdefault(worker, g)

    def counts(self, base: int, names: Iterable[str], workers: int) -> dict[str, int]:
        rnd = self._rounds.get(base)
        got = {} if rnd is None else rnd.grads
        return {n: sum(1 for w in got.get(n, {}) if w < workers) for n in names}

    def complete(self, base: int, names: Iterable[str], workers: int) -> bool:
        return all(c >= workers for c in self.counts(base, names, workers).values())

    def means(self, base: int, names: Iterable[str], workers: int) -> dict[str, Array]:
        """The mean gradient per parameter, over exactly workers ``0..workers-1``."""
        rnd = self._rounds[base]
        return {n: mean_gradient({w: g for w, g in rnd.grads[n].items() if w < workers}) for n in names}

    def waiters(self, base: int, names: Iterable[str]) -> dict[str, asyncio.Future[StepResult]]:
        rnd = self._rounds.setdefault(base, _Round(time.monotonic()))
        loop = asyncio.get_running_loop()
        return {n: rnd.results.setdefault(n, loop.create_future()) for n in names}

    def applied(self, base: int, results: Mapping[str, StepResult]) -> None:
        """The step's parameters were applied: answer their waiters and forget their gradients."""
        rnd = self._rounds.get(base)
        if rnd is None:
            return
        for name, result in results.items():
            rnd.grads.pop(name, None)
            fut = rnd.results.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
        if not rnd.grads and not rnd.results:
            del self._rounds[base]

    def drop(self, base: int) -> None:
        rnd = self._rounds.pop(base, None)
        if rnd is not None:
            for fut in rnd.results.values():
                fut.cancel()

    def fail(self, exc: BaseException) -> None:
        """The owner lost the model: every waiter gets ``exc`` and every contribution is dropped."""
        for rnd in self._rounds.values():
            for fut in rnd.results.values():
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: a waiter that gave up must not leave a warning behind
        self._rounds.clear()

    def forget_before(self, step: int) -> None:
        """Drop the rounds of steps that can no longer be applied (the parameters moved past them)."""
        for base in [b for b in self._rounds if b < step and not self._rounds[b].results]:
            del self._rounds[base]
