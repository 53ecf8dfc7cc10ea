"""Helpers shared by the tests that run several server replicas on one Redis: the model ``m``'s
owner, its parameter ``w`` created and read over HTTP, worker processes (``tests.step_worker``)
and the kernel replaying what they pushed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
from momentum_service.kernels import SGDConfig, sgd_update

from .helpers import ROOT, RedisProcess
from .redis_cluster import RedisCluster
from .step_worker import gradient

OPT = {"lr": 0.01, "momentum": 0.9, "nesterov": True}
SIZE = 64  # floats in the gradients the workers push


def owner_url(redis: RedisProcess | RedisCluster, model: str = "m") -> str | None:
    """The URL of the replica that holds ``model``'s lease in Redis (None while nobody does)."""
    client = redis.client()
    try:
        url = client.hget(f"momentum:{{{model}}}:lease", "url")
    finally:
        client.close()
    return None if url is None else url.decode()


def tensor(a: np.ndarray) -> dict[str, object]:
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": a.astype(np.float64).ravel().tolist()}


def create(url: str, optimizer: dict[str, object], value: np.ndarray, **config: object) -> None:
    """Model ``m`` with ``config`` and its parameter ``w`` set to ``value``."""
    assert httpx.put(f"{url}/v1/models/m", json={"optimizer": optimizer, **config}).status_code == 201
    assert httpx.put(f"{url}/v1/models/m/params/w", json=tensor(value)).status_code == 201


def read(url: str, deadline: float = 30.0, model: str = "m") -> tuple[int, np.ndarray, np.ndarray | None]:
    """``model``'s ``w``: its step, value and velocity, retrying while the model changes hands (503, no answer)."""
    end = time.monotonic() + deadline
    with httpx.Client(timeout=5) as client:
        while True:
            try:
                r = client.get(f"{url}/v1/models/{model}/params/w", params={"include": "velocity"})
                if r.status_code != 503:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, f"no answer from {url} for model {model}"
            time.sleep(0.1)
    assert r.status_code == 200, r.text
    body = r.json()
    value = np.asarray(body["data"]).astype(body["dtype"])
    v = body["velocity"]
    return body["step"], value, None if v is None else np.asarray(v["data"]).astype(v["dtype"])


def start_workers(
    urls: list[str], processes: int, threads: int, *, pushes: int = 0, seconds: float = 0.0, timeout: float = 30.0
) -> list[subprocess.Popen[bytes]]:
    """``processes`` x ``threads`` workers pushing distinct gradients to ``m`` through any of ``urls``:
    ``pushes`` each, or (with 0) for ``seconds``; ``timeout`` is their client's."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.step_worker",
                ",".join(urls),
                "m",
                str(i * threads),
                str(threads),
                str(pushes),
                str(SIZE),
                str(seconds),
                str(timeout),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for i in range(processes)
    ]


def collect(procs: list[subprocess.Popen[bytes]]) -> list[list[int]]:
    """Every push's ``[step, worker, j]``, once the workers are done (each must succeed)."""
    records: list[list[int]] = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0
        records += json.loads(out)
    return records


def replay(p0: np.ndarray, records: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
    """The kernel applied to every push's gradient in the order of the steps the pushes got."""
    cfg, value, velocity = SGDConfig(**OPT), p0, None  # type: ignore[arg-type]
    for _, w, j in sorted(records):
        value, velocity = sgd_update(cfg, value, velocity, gradient(w, j, SIZE))
    return value, velocity


def assert_each_push_once(url: str, p0: np.ndarray, records: list[list[int]]) -> None:
    """Every acknowledged push got its own step (1..N: none lost, none twice), and ``w`` as ``url`` reads it
    is the kernel replaying the pushes in that order from ``p0``, value and velocity bit for bit."""
    total = len(records)
    assert sorted(r[0] for r in records) == list(range(1, total + 1)), "every acknowledged push, once"
    step, value, velocity = read(url)
    expected_value, expected_velocity = replay(p0, records)
    assert step == total
    assert value.tobytes() == expected_value.tobytes()
    assert velocity is not None and expected_velocity is not None
    assert velocity.tobytes() == expected_velocity.tobytes()
