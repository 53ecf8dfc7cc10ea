"""Scaling out, with real processes: a 6-node Redis Cluster (3 primaries, 3 replicas), 3 service
replicas behind HAProxy (deploy/haproxy.cfg as it is), worker threads pushing steps to many models.

- **Redis failover**: a Redis primary SIGKILLed under 8 workers; its replica is promoted, the dead
  node restarted (it rejoins as the new primary's replica), and the service serves the models of
  that primary again within a measured bound. With durability ``{"replicas": 1}`` every
  acknowledged step is kept and none applied twice (checked bit for bit against the kernel); with
  ``"step"`` the steps lost are counted (what the failover dropped of the acknowledged ones).
- **Rebalancing**: a service replica SIGKILLed and a new one added under load: every model stays
  served, the new replica takes a share of the models, and each acknowledged push is applied once.

The measured figures are printed (``-s``) and appended to ``$MOMENTUM_SCALEOUT_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import httpx
import momentum_client as mc
import numpy as np
import pytest

from .balancer import HAProxyProcess
from .helpers import RedisProcess, ServerProcess, wait_until
from .redis_cluster import RedisCluster
from .replicas import owner_url
from .scaleout import Pushes, assert_each_push_once, create_models, lost, start_replica

pytestmark = pytest.mark.slow

MODELS = [f"m{i}" for i in range(12)]


def report(name: str, **figures: object) -> None:
    line = json.dumps({"test": name, **figures})
    print(line)
    path = os.environ.get("MOMENTUM_SCALEOUT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    c = RedisCluster().start()
    yield c
    c.stop()


def stop_all(servers: list[ServerProcess]) -> None:
    for s in servers:
        s.stop()


@pytest.mark.parametrize("durability", ["replicas", "step"])
def test_a_redis_primary_killed_under_8_workers(cluster: RedisCluster, durability: str) -> None:
    servers = [start_replica(cluster) for _ in range(3)]
    balancer = HAProxyProcess([s.url for s in servers]).start()
    try:
        config: dict[str, object] = {"durability": {"replicas": 1}} if durability == "replicas" else {}
        create_models(balancer.url, MODELS, **config)
        victim = cluster.node_of("momentum:{m0}:model")
        hit = {m for m in MODELS if cluster.node_of(f"momentum:{{{m}}}:model").port == victim.port}
        pushes = Pushes([balancer.url], MODELS).start(8)
        time.sleep(4)
        before = pushes.total()
        killed_at = time.monotonic()
        victim.kill()
        promoted = cluster.wait_ok(timeout=30)
        # The dead node comes back (as compose's restart policy brings its container back) and rejoins as
        # a replica of the promoted one: until it has synced, that primary has no replica to WAIT for.
        cluster.restart(victim)
        rejoined = promoted + cluster.wait_ok(timeout=30)
        time.sleep(5)
        end = time.monotonic()
        pushes.stop()
        recovery = pushes.gap_after(killed_at, hit)
        outage = pushes.longest_gap(killed_at, end, hit)
        others = pushes.longest_gap(killed_at, end, set(MODELS) - hit)
        per_model_lost = {m: lost(balancer.url, m, pushes.records[m]) for m in MODELS}
        report(
            f"redis-failover-{durability}",
            pushes=pushes.total(),
            pushes_before_kill=before,
            models_on_killed_primary=len(hit),
            replica_promoted_s=round(promoted, 2),
            killed_node_back_as_replica_s=round(rejoined, 2),
            first_step_on_its_models_s=round(recovery, 2),
            longest_pause_its_models_s=round(outage, 2),
            longest_pause_other_models_s=round(others, 2),
            lost=sum(per_model_lost.values()),
        )
        assert recovery < 20, f"the models of the killed primary were not served again within 20 s ({recovery:.1f})"
        if durability == "replicas":
            for m in MODELS:
                assert_each_push_once(balancer.url, m, pushes.records[m])
        else:
            # Without WAIT, what the dead primary had not yet sent to its replica is gone; never more than was
            # acknowledged, and nothing applied twice: the steps are counted, not asserted to be zero.
            assert all(n >= 0 for n in per_model_lost.values()), per_model_lost
    finally:
        balancer.stop()
        stop_all(servers)


def test_a_service_replica_killed_and_one_added_under_load(cluster: RedisCluster) -> None:
    servers = [start_replica(cluster) for _ in range(3)]
    urls = [s.url for s in servers]
    try:
        create_models(urls[0], MODELS)
        pushes = Pushes(urls, MODELS).start(6)
        time.sleep(3)
        victim = servers[0]
        owned_by_victim = [m for m in MODELS if owner_url(cluster, m) == victim.url]
        killed_at = time.monotonic()
        victim.kill()
        urls.remove(victim.url)  # the workers stop sending to it (as the balancer's health check would)
        time.sleep(4)
        newcomer = start_replica(cluster)
        servers.append(newcomer)
        urls.append(newcomer.url)
        added_at = time.monotonic()

        def newcomer_owns_some() -> bool:
            return any(owner_url(cluster, m) == newcomer.url for m in MODELS)

        wait_until(newcomer_owns_some, timeout=30, what="the new replica to take a share of the models")
        took = time.monotonic() - added_at
        time.sleep(3)
        pushes.stop()
        owners = {m: owner_url(cluster, m) for m in MODELS}
        share = sum(1 for u in owners.values() if u == newcomer.url)
        report(
            "service-replica-killed-and-added",
            pushes=pushes.total(),
            models_of_killed_replica=len(owned_by_victim),
            first_step_on_them_s=round(pushes.gap_after(killed_at, set(owned_by_victim)), 2)
            if owned_by_victim
            else None,
            newcomer_first_model_s=round(took, 2),
            newcomer_models=share,
        )
        assert share >= 1
        assert victim.url not in owners.values()
        for m in MODELS:
            for u in urls:  # every live replica answers for every model
                assert httpx.get(f"{u}/v1/models/{m}", timeout=10).status_code == 200
            assert_each_push_once(urls[0], m, pushes.records[m])
    finally:
        stop_all(servers)


@pytest.mark.parametrize("follow", [True, False])
def test_the_sdk_sends_a_models_requests_to_its_owner_with_follow_owner(redis_proc: RedisProcess, follow: bool) -> None:
    """With ``follow_owner=True`` the SDK learns the owner from a forwarded answer (``Momentum-Owner``) and goes
    there directly: with the replica it first asked paused (SIGSTOP), its steps still go through. Without it
    (the negative control), they time out on the paused replica."""
    prefix = f"f{uuid.uuid4().hex[:8]}"
    env = {"MOMENTUM_LEASE_MS": "1000", "MOMENTUM_REDIS_PREFIX": prefix}
    servers = [ServerProcess(redis_url=redis_proc.url, env=env).start() for _ in range(2)]
    try:
        front, _ = servers
        with mc.Client(servers[1].url) as admin:  # models created until one is owned by the other replica
            for i in range(20):
                model = f"f{i}"
                admin.create_model(model, lr=0.1, momentum=0.9)
                admin.init_params(model, {"w": np.zeros(4, np.float32)})
                client = redis_proc.client()
                try:
                    owner = client.hget(f"{prefix}:{{{model}}}:lease", "url")
                finally:
                    client.close()
                if owner is not None and owner.decode() != front.url:
                    break
            else:
                pytest.fail("every model went to the first replica")
        with mc.Client(front.url, follow_owner=follow, timeout=2, max_retries=1) as client:
            client.push_gradients(model, {"w": np.ones(4, np.float32)})  # forwarded by front, which names the owner
            front.pause()
            try:
                if follow:
                    steps = [client.push_gradients(model, {"w": np.ones(4, np.float32)})["w"] for _ in range(3)]
                    assert steps == [2, 3, 4]
                else:
                    with pytest.raises(mc.TransportError):
                        client.push_gradients(model, {"w": np.ones(4, np.float32)})
            finally:
                front.resume()
    finally:
        stop_all(servers)


def test_a_models_slot_migrated_to_another_primary_under_load(cluster: RedisCluster) -> None:
    """Slot migration (as ``redis-cli --cluster reshard`` does it) while workers push: redis-py follows ASK and
    MOVED, a script that meets a half-moved model gets TRYAGAIN (a 503, retried with the same key), and each
    acknowledged push is applied once, bit for bit."""
    servers = [start_replica(cluster) for _ in range(2)]
    models = MODELS[:4]
    try:
        create_models(servers[0].url, models)
        pushes = Pushes([s.url for s in servers], models).start(4)
        time.sleep(2)
        key = "momentum:{m0}:model"
        target = next(n for n in cluster.primaries() if n.port != cluster.node_of(key).port)
        started = time.monotonic()
        moved = cluster.migrate_slot(key, target)
        took = time.monotonic() - started
        assert cluster.node_of(key).port == target.port
        time.sleep(2)
        pushes.stop()
        report("slot-migration", keys_moved=moved, migration_s=round(took, 2), pushes=pushes.total())
        assert moved >= 3  # the model's head, lease, log...
        assert len(pushes.records["m0"]) > 10
        for m in models:
            assert_each_push_once(servers[0].url, m, pushes.records[m])
    finally:
        stop_all(servers)


def test_a_redis_primary_that_stops_answering_gives_503s_within_the_bound(cluster: RedisCluster) -> None:
    """A primary SIGSTOPped (its sockets open, no answers): steps on its models are answered within about 3x
    ``MOMENTUM_REDIS_TIMEOUT_S`` (a 503 to retry, or applied once its replica has taken over), never held."""
    timeout_s = 0.5
    server = start_replica(cluster, MOMENTUM_REDIS_TIMEOUT_S=str(timeout_s))
    try:
        create_models(server.url, ["m0"])
        victim = cluster.node_of("momentum:{m0}:model")
        answers: list[tuple[float, int]] = []
        step = {"gradients": {"w": {"shape": [64], "dtype": "float32", "data": [0.01] * 64}}}
        victim.pause()
        try:
            end = time.monotonic() + 6
            with httpx.Client(timeout=30) as client:
                while time.monotonic() < end:
                    t = time.monotonic()
                    r = client.post(f"{server.url}/v1/models/m0/step", json=step)
                    answers.append((time.monotonic() - t, r.status_code))
        finally:
            victim.resume()
        slowest = max(s for s, _ in answers)
        statuses = sorted({c for _, c in answers})
        report("redis-primary-paused", answers=len(answers), slowest_s=round(slowest, 2), statuses=statuses)
        assert set(statuses) <= {200, 503} and 503 in statuses
        assert slowest < 3 * timeout_s + 1.5, f"an answer took {slowest:.2f} s"
    finally:
        server.stop()
