"""No lost update: 8 worker processes x 100 pushes through 2 server processes, one Redis.

Why this catches a lost update: every push of the same gradient must advance the
parameter by exactly one momentum step. If two servers read the same state and both
write their result, one push is lost: the final step count is below 800, two pushes
report the same step, and the value equals fewer than 800 sequential steps (the
momentum rule is not idempotent, so the values differ). The negative control below runs
the same harness against servers whose commit is not conditional, and sees exactly that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from .helpers import ROOT, RedisProcess, ServerProcess

WORKERS, PUSHES, SIZE, GRAD = 8, 100, 1000, 0.125
OPT = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


def run_workers(urls: list[str], *, strict: bool = True) -> list[int]:
    """Start the workers at once, wait for all, and return every step they were given (a worker that
    failed fails the test, unless not ``strict``: then it contributes what it printed, nothing)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.push_worker",
                ",".join(urls[i % 2 :] + urls[: i % 2]),
                "m",
                "w",
                str(PUSHES),
                str(SIZE),
                str(GRAD),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for i in range(WORKERS)
    ]
    steps: list[int] = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        if strict:
            assert p.returncode == 0
        steps += json.loads(out) if p.returncode == 0 else []
    return steps


def setup_model(url: str) -> np.ndarray:
    p0 = np.linspace(-1, 1, SIZE, dtype=np.float32)
    assert httpx.put(f"{url}/v1/models/m", json={"optimizer": OPT}).status_code == 201
    r = httpx.put(
        f"{url}/v1/models/m/params/w", json={"shape": [SIZE], "dtype": "float32", "data": p0.astype(float).tolist()}
    )
    assert r.status_code == 201
    return p0


def torch_reference(p0: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` sequential torch.optim.SGD steps with the same gradient: the exact expected value."""
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD([p], **OPT)
    for _ in range(steps):
        p.grad = torch.full((SIZE,), GRAD, dtype=torch.float32)
        opt.step()
    return p.detach().numpy()


def final_state(url: str) -> tuple[int, np.ndarray]:
    body = httpx.get(f"{url}/v1/models/m/params/w").json()
    return body["step"], np.asarray(body["data"], dtype=np.float64).astype(np.float32)


@pytest.mark.slow
def test_no_lost_update_across_processes(redis_server: RedisProcess) -> None:
    servers = [ServerProcess(redis_url=redis_server.url).start() for _ in range(2)]
    try:
        p0 = setup_model(servers[0].url)
        steps = run_workers([s.url for s in servers])
        total = WORKERS * PUSHES
        assert sorted(steps) == list(range(1, total + 1)), "each push must get its own step: none lost, none twice"
        step, value = final_state(servers[1].url)
        assert step == total
        assert value.tobytes() == torch_reference(p0, total).tobytes()
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_negative_control_catches_lost_updates_without_leases_and_fences(redis_server: RedisProcess) -> None:
    """Servers that each take the model (no lease against another) and write whatever happened meanwhile
    (no fence): each serves its own copy, and the same checks fail. (Their journal is no longer one
    history either: a rebuild from it finds entries that do not follow each other, and answers 500.)"""
    servers = [ServerProcess(redis_url=redis_server.url, unsafe="no-fencing").start() for _ in range(2)]
    try:
        p0 = setup_model(servers[0].url)
        steps = run_workers([s.url for s in servers], strict=False)
        total = WORKERS * PUSHES
        assert sorted(steps) != list(range(1, total + 1))
        r = httpx.get(f"{servers[0].url}/v1/models/m/params/w")
        if r.status_code == 200:
            step, value = final_state(servers[0].url)
            assert step < total or value.tobytes() != torch_reference(p0, total).tobytes()
        else:
            assert r.status_code == 500 and "log entry" in r.json()["detail"]
    finally:
        for s in servers:
            s.stop()
