"""A model's training series: one point per applied push, with the scalars its worker reported.

Workers may send scalars with a step (``"metrics": {"loss": 0.31}``); the model's owner keeps a
point per applied push: when, the step it brought its parameters to, the lr it used, the worker
and its staleness (when the push said), and those scalars. ``GET /v1/models/{model}/metrics``
serves them (the dashboard polls it with ``since=``). The series is bounded: the oldest points
are dropped past ``cap``. With Redis, the owner appends its new points to a capped list of the
model's incarnation every ``flush`` seconds, and a new owner reads them back: what a crash can lose
is the points of the last flush period (the series is for watching training, not its record: the
log is). With the embedded store the owner's memory is the only copy.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Point", "Series"]


@dataclass(frozen=True, slots=True)
class Point:
    id: int
    time: float
    step: int
    lr: float
    worker: int | None
    staleness: int | None
    metrics: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "step": self.step,
            "lr": self.lr,
            "worker": self.worker,
            "staleness": self.staleness,
            "metrics": dict(self.metrics),
        }

    def dumps(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def loads(cls, raw: bytes | str) -> Point:
        d = orjson.loads(raw)
        return cls(
            int(d["id"]),
            float(d["time"]),
            int(d["step"]),
            float(d["lr"]),
            None if d.get("worker") is None else int(d["worker"]),
            None if d.get("staleness") is None else int(d["staleness"]),
            {str(k): float(v) for k, v in (d.get("metrics") or {}).items()},
        )


class Series:
    """The points of one model incarnation, oldest first, at most ``cap``; ``unsaved`` are those not yet
    appended to the journal."""

    def __init__(self, cap: int = 10_000, points: list[Point] | None = None) -> None:
        self.cap = cap
        self._points: deque[Point] = deque(points or (), maxlen=cap)
        self.next_id = (self._points[-1].id + 1) if self._points else 1
        self.unsaved: list[Point] = []

    def __len__(self) -> int:
        return len(self._points)

    def add(
        self,
        step: int,
        lr: float,
        worker: int | None = None,
        staleness: int | None = None,
        metrics: Mapping[str, float] | None = None,
        at: float | None = None,
    ) -> Point:
        point = Point(self.next_id, time.time() if at is None else at, step, lr, worker, staleness, metrics or {})
        self.next_id += 1
        self._points.append(point)
        self.unsaved.append(point)
        if len(self.unsaved) > self.cap:
            del self.unsaved[: len(self.unsaved) - self.cap]
        return point

    def since(self, after: int, limit: int) -> list[Point]:
        """The points with an id above ``after``, oldest first, at most ``limit``."""
        if not self._points or self._points[-1].id <= after:
            return []
        first = self._points[0].id
        start = max(0, after - first + 1)  # ids are consecutive within the deque
        out = []
        for i in range(start, len(self._points)):
            out.append(self._points[i])
            if len(out) >= limit:
                break
        return out

    def take_unsaved(self) -> list[Point]:
        out, self.unsaved = self.unsaved, []
        return out

    def put_back(self, points: list[Point]) -> None:
        """Points whose write failed: written with the next ones (still bounded by ``cap``)."""
        self.unsaved = (points + self.unsaved)[-self.cap :]
