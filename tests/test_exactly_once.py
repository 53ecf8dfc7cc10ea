"""Consistency across workers and replicas, with real processes: 2 servers on one Redis (one owns
the model, the other forwards to it).

- 32 workers x 250 pushes of distinct gradients: the steps the pushes got are 1..8000, each
  once, and the final state equals replaying the gradients in that order with the kernel.
- 200 ambiguous failures (a client timeout shorter than a frozen Redis; the owner killed
  mid-request; the owner killed while its writes wait in a frozen Redis, which applies them once
  it thaws, or just after they landed but before its clients heard), each retried with the same
  Idempotency-Key on the other replica: every push applied exactly once. Negative controls:
  without keys, the same retries apply pushes twice; with keys but without the idempotency
  records written with the log (``no-dedup`` servers), the new owner cannot know and applies
  them twice too.
- 20 concurrent requests with one key, over both replicas: one applied.
- Sync mode, 4 workers over 2 replicas, 50 steps: bitwise single-process training on the
  mean gradient.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from momentum_service.engine import mean_gradient
from momentum_service.kernels import SGDConfig, sgd_update

from .helpers import RedisProcess, ServerProcess
from .replicas import OPT, SIZE, assert_each_push_once, collect, create, owner_url, read, start_workers, tensor
from .step_worker import gradient, push

pytestmark = pytest.mark.slow

FAST_LEASE = {"MOMENTUM_LEASE_MS": "2500"}  # a dead owner's models are taken over within 2.5 s; a frozen
# Redis (< 1 s here) leaves the lease current, so the writes a killed owner left in its socket land


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture
def replicas(redis_server: RedisProcess) -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(redis_url=redis_server.url, env=FAST_LEASE).start() for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def owner_first(redis_server: RedisProcess, servers: list[ServerProcess], model: str = "m") -> list[ServerProcess]:
    """The servers, the model's owner (by its lease in Redis) first."""
    url = owner_url(redis_server, model)
    assert url is not None
    return sorted(servers, key=lambda s: s.url != url)


# -- 32 workers x 250 pushes ------------------------------------------------------------------------

WORKERS, PUSHES, PROCESSES = 32, 250, 4


def test_32_workers_x_250_pushes_through_2_replicas(replicas: list[ServerProcess]) -> None:
    p0 = np.linspace(-1, 1, SIZE, dtype=np.float32)
    create(replicas[0].url, OPT, p0)
    records = collect(start_workers([s.url for s in replicas], PROCESSES, WORKERS // PROCESSES, pushes=PUSHES))
    assert len(records) == WORKERS * PUSHES
    assert_each_push_once(replicas[1].url, p0, records)


# -- ambiguous failures, retried with the same key on the other replica --------------------------

SLOTS = 220  # one slot per push: push i subtracts 1 from slot i only (lr 1, plain SGD)


def one_hot(i: int) -> bytes:
    g = np.zeros(SLOTS)
    g[i] = 1.0
    return json.dumps({"gradients": {"w": tensor(g)}, "return_params": False}).encode()


def fire(url: str, bodies: dict[str, bytes], timeout: float, use_keys: bool = True) -> dict[str, str]:
    """Send every body at once; the outcome per key: 'ok', or the failure the client saw."""
    outcome: dict[str, str] = {}

    def send(key: str, body: bytes) -> None:
        headers = {"content-type": "application/json", **({"Idempotency-Key": key} if use_keys else {})}
        try:
            r = httpx.post(f"{url}/v1/models/m/step", content=body, headers=headers, timeout=timeout)
            outcome[key] = "ok" if r.status_code == 200 else f"status {r.status_code}"
        except httpx.TransportError as exc:
            outcome[key] = type(exc).__name__

    with ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(lambda kv: send(*kv), bodies.items()))
    return outcome


def retry_all(url: str, bodies: dict[str, bytes], use_keys: bool = True) -> None:
    with httpx.Client(timeout=30) as client:
        for key, body in bodies.items():
            if use_keys:
                r = push(client, f"{url}/v1/models/m/step", body, key)
            else:
                r = client.post(f"{url}/v1/models/m/step", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text


def frozen_redis_rounds(
    redis_server: RedisProcess, a: str, b: str, first: int, rounds: int, use_keys: bool = True
) -> int:
    """Freeze Redis, push to A with a short client timeout, thaw, retry on B. Returns failures seen."""
    failures, i = 0, first
    assert redis_server.proc is not None
    for r in range(rounds):
        bodies = {uuid.uuid4().hex: one_hot(i + k) for k in range(10)}
        i += 10
        redis_server.proc.send_signal(signal.SIGSTOP)
        # Short freezes leave A's Redis commands waiting; long ones (> the 2 s socket timeout)
        # make A's client time out and re-send them, the case that used to apply a script twice.
        thaw = threading.Timer(0.6 if r % 2 else 2.4, redis_server.proc.send_signal, [signal.SIGCONT])
        thaw.start()
        try:
            outcome = fire(a, bodies, timeout=0.3, use_keys=use_keys)
        finally:
            thaw.join()
        failures += sum(v != "ok" for v in outcome.values())
        retry_all(b, bodies, use_keys)
    return failures


def killed_server_rounds(
    redis_server: RedisProcess, servers: list[ServerProcess], first: int, rounds: int, use_keys: bool = True
) -> int:
    """Push to the owner A, SIGKILL A mid-request, retry everything on B (which takes the model over
    once A's lease expires), restart A. Returns failures seen."""
    failures, i = 0, first
    rng = random.Random(4)
    for _ in range(rounds):
        a, b = owner_first(redis_server, servers)
        bodies = {uuid.uuid4().hex: one_hot(i + k) for k in range(10)}
        i += 10
        killer = threading.Timer(rng.uniform(0.0, 0.03), a.kill)
        killer.start()
        outcome = fire(a.url, bodies, timeout=5, use_keys=use_keys)
        killer.join()
        failures += sum(v != "ok" for v in outcome.values())
        retry_all(b.url, bodies, use_keys)
        a.start()
    return failures


def dead_owner_rounds(
    redis_server: RedisProcess, servers: list[ServerProcess], first: int, rounds: int, use_keys: bool = True
) -> int:
    """Freeze Redis, push to the owner A with a client timeout shorter than the freeze, then SIGKILL A:
    in odd rounds while its writes wait in Redis's socket (Redis may apply them once thawed: its lease
    is still current), in even rounds once Redis is thawed and A's writes have landed (the clients never
    heard). Retry everything on B, which takes the model over once A's lease expires and knows the keys
    only from the journal. Returns failures."""
    failures, i = 0, first
    assert redis_server.proc is not None
    for r in range(rounds):
        a, b = owner_first(redis_server, servers)
        bodies = {uuid.uuid4().hex: one_hot(i + k) for k in range(10)}
        i += 10
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            outcome = fire(a.url, bodies, timeout=0.3, use_keys=use_keys)
            if r % 2:
                a.kill()
                time.sleep(0.1)  # A's socket to Redis closes with its last writes in it
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        if r % 2 == 0:
            time.sleep(0.5)  # A's writes land; its answers go to clients that left
            a.kill()
        failures += sum(v != "ok" for v in outcome.values())
        retry_all(b.url, bodies, use_keys)
        a.start()
    return failures


def test_200_ambiguous_failures_each_applied_exactly_once(
    redis_server: RedisProcess, replicas: list[ServerProcess]
) -> None:
    a, b = replicas
    create(a.url, {"lr": 1.0}, np.zeros(SLOTS))
    failures = frozen_redis_rounds(redis_server, a.url, b.url, 0, 8)
    failures += killed_server_rounds(redis_server, replicas, 80, 6)
    failures += dead_owner_rounds(redis_server, replicas, 140, 6)
    step, value, _ = read(replicas[0].url)
    assert value[:200].tolist() == [-1.0] * 200, f"pushes applied {sorted(set(value[:200].tolist()))} times"
    assert step == 200
    # Nearly every push saw its first attempt fail (a kill can land after some replies).
    assert failures >= 150, failures


def test_negative_control_retries_without_keys_apply_twice(
    redis_server: RedisProcess, replicas: list[ServerProcess]
) -> None:
    a, b = replicas
    create(a.url, {"lr": 1.0}, np.zeros(SLOTS))
    frozen_redis_rounds(redis_server, a.url, b.url, 0, 2, use_keys=False)
    time.sleep(0.5)  # let A's abandoned requests finish
    _, value, _ = read(b.url)
    assert (value[:20] == -2.0).any(), "without keys, a timed-out push that was applied is applied again"


def test_negative_control_without_the_idempotency_records_a_new_owner_applies_twice(
    redis_server: RedisProcess,
) -> None:
    servers = [ServerProcess(redis_url=redis_server.url, env=FAST_LEASE, unsafe="no-dedup").start() for _ in range(2)]
    try:
        create(servers[0].url, {"lr": 1.0}, np.zeros(SLOTS))
        dead_owner_rounds(redis_server, servers, 0, 2)  # round 0: every push's write landed before A died
        _, value, _ = read(servers[0].url)
        assert (value[:20] == -2.0).any(), "without the records, the new owner cannot know the pushes were applied"
    finally:
        for s in servers:
            s.stop()


def test_20_concurrent_requests_with_one_key_over_2_replicas(replicas: list[ServerProcess]) -> None:
    create(replicas[0].url, {"lr": 1.0}, np.zeros(SLOTS))
    body, key = one_hot(0), "one-key"
    barrier = threading.Barrier(20)
    answers: list[int] = []

    def send(n: int) -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            r = push(client, f"{replicas[n % 2].url}/v1/models/m/step", body, key)
            answers.append(r.status_code)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [200] * 20
    step, value, _ = read(replicas[0].url)
    assert step == 1 and value[0] == -1.0


# -- sync mode ------------------------------------------------------------------------------------


def test_sync_4_workers_over_2_replicas_equal_training_on_the_mean(replicas: list[ServerProcess]) -> None:
    shape, steps, workers = (17, 3), 50, [3, 0, 2, 1]
    p0 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    create(replicas[0].url, OPT, p0, mode="sync", workers=4)
    grads = {w: [gradient(w, k, 51).reshape(shape) for k in range(steps)] for w in workers}
    seen: dict[int, list[bytes]] = {w: [] for w in workers}

    def worker(w: int) -> None:
        with httpx.Client(timeout=30) as client:
            for k in range(steps):
                body = json.dumps({"gradients": {"w": tensor(grads[w][k])}, "worker_id": w, "base_step": k}).encode()
                while True:
                    r = push(client, f"{replicas[w % 2].url}/v1/models/m/step", body, uuid.uuid4().hex)
                    if r.status_code != 202:
                        break
                assert r.status_code == 200, r.text
                out = r.json()["params"]["w"]
                assert out["step"] == k + 1
                seen[w].append(np.asarray(out["data"]).astype(np.float32).tobytes())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, workers))
    cfg, value, velocity = SGDConfig(**OPT), p0, None  # type: ignore[arg-type]
    for k in range(steps):
        mean = mean_gradient({w: grads[w][k] for w in workers})
        value, velocity = sgd_update(cfg, value, velocity, mean)
        assert all(seen[w][k] == value.tobytes() for w in workers), f"step {k}"
    step, final, _ = read(replicas[1].url)
    assert step == steps and final.tobytes() == value.tobytes()
