"""Owner failover, fencing and Redis crashes, with real processes and a real Redis.

- **Chaos, ``"step"`` durability:** 3 replicas, 8 workers pushing with Idempotency-Keys through any
  replica; for 60 s the model's owner is SIGKILLed (and restarted) or SIGSTOPped past its lease (and
  woken), in turns. Every acknowledged push got its own step (1..N, none twice, none lost), and the
  final state is bitwise the kernel replaying the pushes in that order.
- **``flush_ms``, owner SIGKILLed:** what is lost is only what was acknowledged in the last
  ``flush_ms`` plus one lease period before the kill (measured, asserted; the lease period is the
  allowance for a write in flight and a loaded machine), nothing is applied twice, and the SDK tells
  the workers (:class:`momentum_client.StepWentBack`).
- **``flush_ms`` models handed to a replica that joins**, under load: nothing acknowledged is lost or
  applied twice (before the hand-back stopped the owner taking steps and waited for its write in
  flight, one or two acknowledged pushes were lost per moved model).
- **Fencing, deterministic:** an owner paused with acknowledged steps not yet written wakes after
  another replica took the model over: its write is refused, and the state rebuilt from Redis is
  bitwise what the new owner acknowledged. The negative control (servers without leases and fences)
  lets the woken owner's write land, and the rebuilt state differs.
- **Redis SIGKILLed and restarted from its AOF** (``appendfsync always``) under load: nothing
  acknowledged is lost, none twice, and the same server processes serve on without a restart.
- **Models spread over the replicas:** 30 models created through one replica are owned by all
  three, every replica answers for every model, and every replica lists them all (each summary
  from the model's owner).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import momentum_client as mc
import numpy as np
import pytest

from .helpers import RedisProcess, ServerProcess, wait_until
from .replicas import OPT, SIZE, assert_each_push_once, collect, create, owner_url, read, start_workers, tensor
from .step_worker import push

pytestmark = pytest.mark.slow

LEASE_MS = 1000
FAST_LEASE = {"MOMENTUM_LEASE_MS": str(LEASE_MS)}
CHAOS_S = float(os.environ.get("MOMENTUM_CHAOS_S", "60"))


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


def start_replicas(redis: RedisProcess, n: int, unsafe: str | None = None) -> list[ServerProcess]:
    return [ServerProcess(redis_url=redis.url, env=FAST_LEASE, unsafe=unsafe).start() for _ in range(n)]


def stop_all(servers: list[ServerProcess]) -> None:
    for s in servers:
        if s.proc is not None:
            s.resume()
        s.stop()


def owner_of(redis: RedisProcess, servers: list[ServerProcess]) -> ServerProcess:
    """The model's owner by its lease in Redis (waiting while no lease is held)."""
    wait_until(lambda: owner_url(redis) is not None, what="an owner")
    url = owner_url(redis)
    found = [s for s in servers if s.url == url]
    assert found, f"the lease names {url}, none of {[s.url for s in servers]}"
    return found[0]


# -- chaos: the owner killed and paused for 60 s under 8 workers ----------------------------------


def test_owner_killed_and_paused_for_60_s_under_8_workers(redis_server: RedisProcess) -> None:
    servers = start_replicas(redis_server, 3)
    try:
        p0 = np.linspace(-1, 1, SIZE, dtype=np.float32)
        create(servers[0].url, OPT, p0)
        workers = start_workers(
            [s.url for s in servers], 2, 4, seconds=CHAOS_S, timeout=3
        )  # a paused one is given up on
        rng = random.Random(13)
        kills = pauses = 0
        end = time.monotonic() + CHAOS_S - 3
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.8, 2.0))
            owner = owner_of(redis_server, servers)
            if (kills + pauses) % 2 == 0:
                owner.kill()  # SIGKILL: steps in flight are retried elsewhere with their keys
                time.sleep(rng.uniform(0.1, 0.5))
                owner.start()
                kills += 1
            else:
                owner.pause()  # SIGSTOP past the lease: another replica takes over; the woken one must not write
                time.sleep(LEASE_MS / 1000 * rng.uniform(1.3, 2.5))
                owner.resume()
                pauses += 1
        records = collect(workers)
        total = len(records)
        assert min(kills, pauses) >= max(2, int(CHAOS_S // 12)), (kills, pauses)
        assert total >= 20 * CHAOS_S, f"only {total} pushes in {CHAOS_S} s"
        print(f"chaos {CHAOS_S:g} s: {kills} kills, {pauses} pauses, {total} pushes acknowledged and applied once")
        assert_each_push_once(servers[1].url, p0, records)
        logs = "".join(s.log() for s in servers)
        assert "Traceback" not in logs
    finally:
        stop_all(servers)


# -- flush_ms: the owner killed with acknowledged steps in memory ---------------------------------

FLUSH_MS, SLOTS, WORKERS = 500, 16384, 4


def test_flush_ms_owner_killed_loses_only_its_last_flush_ms_and_tells_the_workers(
    redis_server: RedisProcess,
) -> None:
    servers = start_replicas(redis_server, 3)
    try:
        # Every replica sees the three live (a heartbeat is a third of a lease), so the model is created on
        # the replica that rendezvous hashing gives it: no rebalancing moves it while the test runs.
        time.sleep(LEASE_MS / 1000)
        with mc.Client(servers[0].url) as admin:
            info = admin.create_model("m", lr=1.0, durability={"flush_ms": FLUSH_MS})
            assert info.durability == {"flush_ms": FLUSH_MS}
            admin.init_params("m", {"w": np.zeros(SLOTS, np.float32)})
        owner = owner_of(redis_server, servers)
        others = [s for s in servers if s is not owner]
        sent: dict[int, float] = {}  # slot -> when its push was sent
        acked: dict[int, float] = {}  # slot -> when its push was acknowledged
        told: list[mc.StepWentBack] = []
        killed_at: list[float] = []
        stop = threading.Event()

        def worker(w: int) -> None:
            grad = np.zeros(SLOTS, np.float32)
            with mc.Client(others[w % 2].url, timeout=5, max_retries=20) as client:
                for slot in range(w, SLOTS, WORKERS):
                    if stop.is_set():
                        return
                    grad[slot] = 1.0
                    sent[slot] = time.monotonic()
                    try:
                        client.push_gradients("m", {"w": grad})
                    except mc.StepWentBack as exc:
                        told.append(exc)
                    acked[slot] = time.monotonic()
                    grad[slot] = 0.0

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        # The owner writes every FLUSH_MS from the first push, so a kill at a whole number of periods
        # would race with a write (and find next to nothing in memory): kill in the middle of one.
        time.sleep(3.0 + FLUSH_MS / 2000)
        assert owner_url(redis_server) == owner.url, "the model moved to another replica while the workers pushed"
        killed_at.append(time.monotonic())
        owner.kill()
        dead_at = time.monotonic()  # kill() returns once the process is reaped
        time.sleep(3.0 + LEASE_MS / 1000)
        stop.set()
        for t in threads:
            t.join()
        survivor = owner_of(redis_server, others)
        step, value, _ = read(survivor.url)
        assert set(np.unique(value).tolist()) <= {0.0, -1.0}, "a push was applied twice"
        applied = {int(i) for i in np.flatnonzero(value == -1.0)}
        assert step == len(applied)
        assert applied <= set(acked), "only pushes that were sent are applied"
        lost = {slot: killed_at[0] - at for slot, at in acked.items() if slot not in applied}
        assert lost, "the owner held acknowledged steps in memory when it was killed"
        oldest = max(lost.values())
        bound = (FLUSH_MS + LEASE_MS) / 1000
        assert oldest <= bound, f"a push acknowledged {oldest:.3f} s before the kill was lost (bound {bound} s)"
        # A push sent between the SIGKILL call and the process's death can reach the owner and be
        # acknowledged by it (the main thread may lose the CPU between the two): it is sent "before
        # the kill" for this check. Nothing sent once the process was gone may be lost.
        late = {slot: round(sent[slot] - dead_at, 3) for slot in lost if sent[slot] >= dead_at}
        assert not late, f"pushes sent after the owner died were lost (slot: seconds after): {late}"
        assert told, "the workers were told that the model's steps went back"
        assert all(set(e.regressions) == {"w"} for e in told)
        during = sum(1 for slot in lost if sent[slot] >= killed_at[0])
        print(
            f"flush_ms={FLUSH_MS}: {len(lost)} of {len(acked)} acknowledged pushes lost, "
            f"oldest {oldest:.3f} s, {during} sent during the kill call"
        )
    finally:
        stop_all(servers)


# -- hand-backs: flush_ms models moved to a replica that joins --------------------------------------

MOVING_MODELS, MOVING_SLOTS = 12, 4096


def test_flush_ms_models_handed_to_a_joining_replica_lose_no_acknowledged_step(redis_server: RedisProcess) -> None:
    """12 ``flush_ms`` models pushed to through one replica; a second replica joins and rebalancing hands
    it its share while the workers push. Nothing crashed, so nothing acknowledged may be lost: each
    model's state, read from its owner (the newcomer's rebuilt from Redis), holds exactly the pushes
    acknowledged, once each."""
    servers = start_replicas(redis_server, 1)
    try:
        models = [f"h{i}" for i in range(MOVING_MODELS)]
        with mc.Client(servers[0].url) as admin:
            for m in models:
                admin.create_model(m, lr=1.0, durability={"flush_ms": FLUSH_MS})
                admin.init_params(m, {"w": np.zeros(MOVING_SLOTS, np.float32)})
        acked: dict[str, list[int]] = {m: [] for m in models}
        stop = threading.Event()

        def worker(mine: list[str]) -> None:
            grad = np.zeros(MOVING_SLOTS, np.float32)
            with mc.Client(servers[0].url, timeout=5, max_retries=20) as client:
                for slot in range(MOVING_SLOTS):
                    for m in mine:
                        if stop.is_set():
                            return
                        grad[slot] = 1.0
                        client.push_gradients(m, {"w": grad})
                        acked[m].append(slot)
                        grad[slot] = 0.0

        threads = [threading.Thread(target=worker, args=(models[w::WORKERS],)) for w in range(WORKERS)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        servers.append(ServerProcess(redis_url=redis_server.url, env=FAST_LEASE).start())
        newcomer = servers[1].url
        # (Rendezvous hashing gives each model to the newcomer with probability 1/2: none of 12, 1 in 4,096.)
        wait_until(lambda: any(owner_url(redis_server, m) == newcomer for m in models), 20, "a model handed over")
        time.sleep(2.0)  # more hand-overs (a quarter of the models per lease period), under the same load
        stop.set()
        for t in threads:
            t.join()
        moved = [m for m in models if owner_url(redis_server, m) == newcomer]
        for m in models:
            step, value, _ = read(servers[0].url, model=m)
            assert set(np.unique(value).tolist()) <= {0.0, -1.0}, f"{m}: a push was applied twice"
            applied = np.flatnonzero(value == -1.0).tolist()
            lost = sorted(set(acked[m]) - set(applied))
            assert not lost, f"{m} (moved: {m in moved}): {len(lost)} acknowledged pushes lost, slots {lost[:10]}"
            assert applied == acked[m] and step == len(applied), m
        print(
            f"{len(moved)} of {MOVING_MODELS} flush_ms models handed over under load, {sum(map(len, acked.values()))} "
            "acknowledged pushes, none lost, none applied twice"
        )
    finally:
        stop_all(servers)


# -- fencing: a paused owner wakes after a takeover -----------------------------------------------


def one_hot_body(slot: int) -> bytes:
    g = np.zeros(64)
    g[slot] = 1.0
    return json.dumps({"gradients": {"w": tensor(g)}, "return_params": False}).encode()


def paused_owner_round(redis: RedisProcess, unsafe: str | None) -> tuple[bytes, bytes, int, int]:
    """A owns the model (flush_ms 3000) and acknowledges 5 pushes, held in memory; A is paused past its
    lease; B takes the model over, acknowledges 5 others and flushes them; A is woken (its flush is due).
    Returns B's state (value bytes, velocity-free), its step, and the same as rebuilt from Redis by a new
    server once A and B are gone."""
    a, b = start_replicas(redis, 2, unsafe)
    fresh: ServerProcess | None = None
    try:
        create(a.url, {"lr": 1.0}, np.zeros(64), durability={"flush_ms": 3000})
        a, b = sorted([a, b], key=lambda s: s.url != owner_url(redis))
        with httpx.Client(timeout=5) as client:
            for slot in range(5):
                r = push(client, f"{a.url}/v1/models/m/step", one_hot_body(slot), uuid.uuid4().hex)
                assert r.status_code == 200, r.text
        a.pause()
        time.sleep(LEASE_MS / 1000 * 1.5)
        with httpx.Client(timeout=5) as client:
            for slot in range(10, 15):
                r = push(client, f"{b.url}/v1/models/m/step", one_hot_body(slot), uuid.uuid4().hex)
                assert r.status_code == 200, r.text
        time.sleep(3.5)  # B's flush (a snapshot, at this size)
        step_b, value_b, _ = read(b.url)
        a.resume()  # its flush timer is overdue: it tries to write its 5 steps (a snapshot) at once
        time.sleep(1.0)
        a.kill()
        b.kill()
        fresh = ServerProcess(redis_url=redis.url, env=FAST_LEASE, unsafe=unsafe).start()
        step_r, value_r, _ = read(fresh.url)  # once B's lease has expired: rebuilt from Redis
        return value_b.tobytes(), value_r.tobytes(), step_b, step_r
    finally:
        stop_all([a, b] + ([fresh] if fresh else []))


def test_a_paused_owner_that_wakes_after_a_takeover_cannot_write(redis_server: RedisProcess) -> None:
    served, rebuilt, step_b, step_r = paused_owner_round(redis_server, None)
    value = np.frombuffer(served)
    assert value[10:15].tolist() == [-1.0] * 5 and not value[:5].any(), "B served from what was written"
    assert (rebuilt, step_r) == (served, step_b) == (rebuilt, 5), "the woken owner's write was refused"


def test_negative_control_without_fencing_the_woken_owner_writes_over_the_new_one(
    redis_server: RedisProcess,
) -> None:
    served, rebuilt, step_b, step_r = paused_owner_round(redis_server, "no-fencing")
    assert (rebuilt, step_r) != (served, step_b), "without fences, the woken owner's steps land in Redis"
    assert np.frombuffer(rebuilt)[:5].tolist() == [-1.0] * 5


# -- ownership spread over the replicas ----------------------------------------------------------


def test_models_created_through_one_replica_are_spread_over_all(redis_server: RedisProcess) -> None:
    servers = start_replicas(redis_server, 3)
    try:
        time.sleep(2 * LEASE_MS / 1000)  # the replicas' heartbeats: each knows the others
        names = [f"model-{i}" for i in range(30)]
        with httpx.Client(timeout=10) as client:
            for name in names:  # all through the first replica
                r = client.put(f"{servers[0].url}/v1/models/{name}", json={"optimizer": {"lr": 0.5}})
                assert r.status_code == 201, r.text
                r = client.put(f"{servers[0].url}/v1/models/{name}/params/w", json=tensor(np.ones(2)))
                assert r.status_code == 201, r.text
            owners = {name: owner_url(redis_server, name) for name in names}
            counts = {s.url: sum(u == s.url for u in owners.values()) for s in servers}
            assert all(n >= 3 for n in counts.values()), counts  # rendezvous hashing: about 10 each
            for i, name in enumerate(names):  # any replica answers for any model (forwarding)
                url = servers[i % 3].url
                r = client.post(f"{url}/v1/models/{name}/step", json={"gradients": {"w": tensor(np.ones(2))}})
                assert r.status_code == 200 and r.json()["params"]["w"]["data"] == [0.5, 0.5], r.text
                forwarded = owners[name] != url
                assert (r.headers.get("momentum-owner") == owners[name]) == forwarded, (r.headers, owners[name])
            for server in servers:  # every replica lists every model, summarised by its owner
                r = client.get(f"{server.url}/v1/models", params={"limit": 1000})
                assert r.status_code == 200, r.text
                listed = r.json()["models"]
                assert [m["name"] for m in listed] == sorted(names)
                assert all(m["params"] == 1 and m["steps"] == 1 for m in listed), listed
    finally:
        stop_all(servers)


# -- Redis SIGKILLed and restarted from its AOF --------------------------------------------------


def test_redis_killed_and_restarted_from_its_aof_under_load() -> None:
    redis = RedisProcess(appendonly=True).start()  # appendfsync always
    servers = start_replicas(redis, 2)
    try:
        p0 = np.linspace(-1, 1, SIZE, dtype=np.float32)
        create(servers[0].url, OPT, p0)
        workers = start_workers([s.url for s in servers], 2, 3, seconds=14, timeout=3)
        for _ in range(2):
            time.sleep(4)
            redis.kill()
            time.sleep(1.0)
            redis.start()  # the same port and directory: it loads its AOF
        records = collect(workers)
        total = len(records)
        assert total >= 200, total
        assert_each_push_once(servers[0].url, p0, records)  # read from the same processes, never restarted
        wait_until(lambda: all(httpx.get(s.url + "/readyz").status_code == 200 for s in servers), what="ready")
    finally:
        stop_all(servers)
        redis.stop()
