"""The scaled-out topology of docker-compose.cluster.yml, as processes: HAProxy with the deployment's
own ``deploy/haproxy.cfg`` in front of 3 server replicas sharing one Redis.

Through the balancer's one URL, with the Python SDK: models are created and trained, every result is
the kernel's bit for bit, and the requests are spread over the three replicas (HAProxy's log names
the replica of each). Then one replica is SIGKILLed while workers push: HAProxy takes it out of the
rotation (health check on GET /readyz, refused connections redispatched), the SDK re-sends what got
no answer (or a 502) with the same Idempotency-Key, and every push succeeds and is applied exactly
once (each model's step count is its acknowledged pushes, its state the kernel replaying them).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import momentum_client as mc
import numpy as np
import pytest
from momentum_service.kernels import SGDConfig, sgd_update

from .balancer import HAProxyProcess
from .helpers import RedisProcess, ServerProcess
from .replicas import OPT, owner_url

pytestmark = pytest.mark.slow

LEASE_MS = 1000  # a dead owner's models are taken over within about a second
MODELS = ["bal-a", "bal-b", "bal-c", "bal-d", "bal-e", "bal-f"]
SIZE = 32
WARM_STEPS = 5  # per model, before the kill


def gradient(model: int, j: int) -> np.ndarray:
    return (np.random.default_rng([model, j]).standard_normal(SIZE) * 0.1).astype(np.float32)


def initial(model: int) -> np.ndarray:
    return np.linspace(-1, 1, SIZE, dtype=np.float32) * (model + 1)


def replay(model: int, pushes: int) -> tuple[np.ndarray, np.ndarray]:
    cfg, value, velocity = SGDConfig(**OPT), initial(model), None  # type: ignore[arg-type]
    for j in range(pushes):
        value, velocity = sgd_update(cfg, value, velocity, gradient(model, j))
    assert velocity is not None
    return value, velocity


def served_by(log: str) -> Counter[str]:
    """Requests per replica, from HAProxy's HTTP log lines (``... replicas/momentum-2 ...``)."""
    return Counter(re.findall(r" replicas/(momentum-\d) ", log))


@pytest.fixture
def topology() -> Iterator[tuple[RedisProcess, list[ServerProcess], HAProxyProcess]]:
    redis = RedisProcess().start()
    servers: list[ServerProcess] = []
    balancer: HAProxyProcess | None = None
    try:
        env = {"MOMENTUM_LEASE_MS": str(LEASE_MS)}
        servers = [ServerProcess(redis_url=redis.url, env=env) for _ in range(3)]
        for s in servers:
            s.start()
        balancer = HAProxyProcess([s.url for s in servers]).start()
        yield redis, servers, balancer
    finally:
        if balancer is not None:
            balancer.stop()
        for s in servers:
            s.stop()
        redis.stop()


def test_three_replicas_behind_haproxy_survive_a_sigkill_exactly_once(
    topology: tuple[RedisProcess, list[ServerProcess], HAProxyProcess],
) -> None:
    redis, servers, balancer = topology
    started = time.monotonic()
    pushes = {name: 0 for name in MODELS}
    with mc.Client(balancer.url, timeout=5, max_retries=50) as client:
        for i, name in enumerate(MODELS):
            client.create_model(name, **OPT)  # type: ignore[arg-type]
            client.init_params(name, {"w": initial(i)})
        # Warm-up: results as the kernel computes them, through any replica.
        for j in range(WARM_STEPS):
            for i, name in enumerate(MODELS):
                [result] = client.step_results(name, {"w": gradient(i, j)}).values()
                expected, _ = replay(i, j + 1)
                assert result.step == j + 1
                assert result.value is not None and result.value.tobytes() == expected.tobytes()
                pushes[name] += 1

    spread = served_by(balancer.log())
    assert set(spread) == {"momentum-1", "momentum-2", "momentum-3"}, spread
    assert min(spread.values()) >= len(MODELS) * WARM_STEPS // 4, f"round robin should spread requests: {spread}"
    owners = {name: owner_url(redis, name) for name in MODELS}
    assert set(owners.values()) <= {s.url for s in servers}, owners

    # The victim: a replica that owns at least one model (its models must move to another replica).
    victim_url = max(set(owners.values()), key=lambda u: sum(o == u for o in owners.values()))
    victim = next(s for s in servers if s.url == victim_url)
    failures: list[BaseException] = []
    stop = threading.Event()

    def worker(i: int, name: str) -> None:
        try:
            with mc.Client(balancer.url, timeout=5, max_retries=50) as own:
                j = pushes[name]
                while not stop.is_set():
                    steps = own.push_gradients(name, {"w": gradient(i, j)})
                    assert steps == {"w": j + 1}, (name, steps, j + 1)
                    j += 1
                    pushes[name] = j
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i, name), daemon=True) for i, name in enumerate(MODELS)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before_kill = sum(pushes.values())
    victim.kill()
    killed_at = time.monotonic()
    # Pushes go on through the balancer: the dead replica is taken out, its models taken over.
    time.sleep(4.0)
    after_kill = sum(pushes.values())
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    assert not failures, failures
    assert after_kill > before_kill + len(MODELS), "pushes must go on after the kill"

    # Exactly once: each model's step count is its acknowledged pushes, its state the kernel's replay.
    with mc.Client(balancer.url, timeout=5, max_retries=50) as client:
        for i, name in enumerate(MODELS):
            state = client.get_param_state(name, "w")
            value, velocity = replay(i, pushes[name])
            assert state.step == pushes[name], (name, state.step, pushes[name])
            assert state.value.tobytes() == value.tobytes(), name
            assert state.velocity is not None and state.velocity.tobytes() == velocity.tobytes(), name

    # HAProxy saw the replica go (health check or refused connections), and the SDK had to re-send
    # steps: a 502 (the replica died with the step in flight) or a 503 (its models' lease not yet expired).
    log = balancer.log()
    assert re.search(r"Server replicas/momentum-\d is DOWN", log), log[-3000:]
    assert re.search(r'\s50[234]\s.*"POST /v1/models/bal-\w/step', log), "the kill should have cost some retries"
    total = sum(pushes.values())
    print(
        f"balancer: {total} pushes exactly once over 3 replicas, one SIGKILLed after {killed_at - started:.1f} s; "
        f"served {dict(sorted(served_by(log).items()))}"
    )
    logs = "".join(s.log() for s in servers if s is not victim)
    assert "Traceback" not in logs
