"""Helpers of the scale-out tests and benchmark: service replicas on a Redis Cluster, many models,
worker threads pushing steps to them with Idempotency-Keys (retried with the same key and bytes, as
the SDK does), and the checks that every acknowledged push was applied once.

Model ``mK`` has one parameter ``w`` of :data:`SIZE` floats; worker ``w``'s push ``j`` carries
:func:`tests.step_worker.gradient` ``(w, j, SIZE)``. Worker ``w`` pushes to the models ``models[w::workers]``
in turn (or ``models[w % len(models)]``): a model that cannot be served holds up only its own workers.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np

from .helpers import ServerProcess
from .redis_cluster import RedisCluster
from .replicas import OPT, SIZE, read, replay, tensor
from .step_worker import gradient, push

LEASE_MS = 1000


def start_replica(cluster: RedisCluster, **env: str) -> ServerProcess:
    return ServerProcess(env={**cluster.env(), "MOMENTUM_LEASE_MS": str(LEASE_MS), **env}).start()


def p0(model: str) -> np.ndarray:
    return np.linspace(-1, 1, SIZE, dtype=np.float32) * (1 + int(model[1:]))


def create_models(url: str, models: list[str], **config: object) -> None:
    with httpx.Client(timeout=30) as client:
        for m in models:
            r = client.put(f"{url}/v1/models/{m}", json={"optimizer": OPT, **config})
            assert r.status_code == 201, r.text
            r = client.put(f"{url}/v1/models/{m}/params/w", json=tensor(p0(m)))
            assert r.status_code == 201, r.text


@dataclass
class Pushes:
    """Worker threads pushing until stopped; what each acknowledged push got."""

    urls: list[str]  # read at every push: a test may add or remove replicas meanwhile
    models: list[str]
    records: dict[str, list[list[int]]] = field(default_factory=dict)  # model -> [step, worker, j]
    acks: list[tuple[float, float, str]] = field(default_factory=list)  # (sent, acknowledged, model), monotonic
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, workers: int, timeout: float = 10.0) -> Pushes:
        self.records = {m: [] for m in self.models}
        mine = [self.models[w::workers] or [self.models[w % len(self.models)]] for w in range(workers)]
        self._threads = [
            threading.Thread(target=self._run, args=(w, mine[w], timeout), daemon=True) for w in range(workers)
        ]
        for t in self._threads:
            t.start()
        return self

    def _run(self, worker: int, models: list[str], timeout: float) -> None:
        try:
            with httpx.Client(timeout=timeout) as client:
                j = 0
                while not self._stop.is_set():
                    model = models[j % len(models)]
                    sent = time.monotonic()
                    g = gradient(worker, j, SIZE)
                    body = {
                        "gradients": {"w": {"shape": [SIZE], "dtype": "float32", "data": g.tolist()}},
                        "return_params": False,
                    }
                    urls = list(self.urls)
                    first = (worker + j) % len(urls)
                    targets = [f"{u}/v1/models/{model}/step" for u in urls[first:] + urls[:first]]
                    r = push(client, targets, json.dumps(body).encode(), uuid.uuid4().hex, deadline=90.0)
                    r.raise_for_status()
                    step = r.json()["params"]["w"]["step"]
                    with self._lock:
                        self.records[model].append([step, worker, j])
                        self.acks.append((sent, time.monotonic(), model))
                    j += 1
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        assert not any(t.is_alive() for t in self._threads), "a worker is stuck"
        assert not self.errors, f"workers failed: {self.errors[:3]}"

    def total(self) -> int:
        return sum(len(r) for r in self.records.values())

    def gap_after(self, when: float, models: set[str]) -> float:
        """Seconds from ``when`` to the acknowledgement of the first push of one of ``models`` sent after it."""
        after = [acked for sent, acked, m in self.acks if sent > when and m in models]
        assert after, "no push of those models sent after that time was acknowledged"
        return min(after) - when

    def longest_gap(self, start: float, end: float, models: set[str]) -> float:
        """The longest time without an acknowledgement of any of ``models`` in ``[start, end]``."""
        times = sorted(t for _, t, m in self.acks if start <= t <= end and m in models)
        points = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(points))


def assert_each_push_once(url: str, model: str, records: list[list[int]]) -> None:
    """Every acknowledged push of ``model`` got its own step (1..N: none lost, none twice), and ``w`` is the
    kernel replaying them in that order, value and velocity bit for bit."""
    total = len(records)
    assert sorted(r[0] for r in records) == list(range(1, total + 1)), f"{model}: every acknowledged push, once"
    step, value, velocity = read(url, model=model)
    expected_value, expected_velocity = replay(p0(model), records)
    assert step == total, (model, step, total)
    assert value.tobytes() == expected_value.tobytes(), model
    if total:
        assert velocity is not None and expected_velocity is not None
        assert velocity.tobytes() == expected_velocity.tobytes(), model


def lost(url: str, model: str, records: list[list[int]]) -> int:
    """Acknowledged pushes of ``model`` that its state no longer counts (0 when each was applied once)."""
    step, _, _ = read(url, model=model)
    return len(records) - step
