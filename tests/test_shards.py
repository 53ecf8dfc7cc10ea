"""Parameter shards (``"shards": n``): what a step on a sharded model guarantees, tested exactly.

- **In process** (the embedded store, and one replica on Redis): the model's parameters are
  split over its shards by ``xxh3_64(name) % n``; steps, reads and writes through the model equal
  an unsharded model's, bitwise; a retry with the same key replays on every shard; the config
  cannot change its shard count; sync mode, ``expected_steps`` and ``base_step`` are refused; a
  checkpoint saves and restores every shard; GET model reports each shard's steps and whether
  they agree.
- **Three replicas on one Redis** (real processes): a model of 12 parameters in 3 shards is
  owned by 3 distinct replicas (their leases in Redis); steps through any replica equal the
  kernel replayed locally, bitwise; a step whose shard's owner is SIGSTOPped is a 503 that says
  which shards applied it, GET model says ``consistent: false`` meanwhile, and the same request
  retried with the same key completes the missing shard and applies nothing twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from momentum_service.api import create_app
from momentum_service.engine.shards import shard_name, shard_of, split
from momentum_service.kernels import SGDConfig, sgd_update
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal

from .helpers import RedisProcess, ServerProcess, wait_until
from .replicas import owner_url

OPT = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
NAMES = [f"layer{i}.weight" for i in range(12)]
SHARDS = 3


def tensor(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": a.astype(np.float64).ravel().tolist()}


def array(t: dict[str, Any]) -> np.ndarray:
    return np.asarray(t["data"], dtype=np.float64).astype(t["dtype"]).reshape(t["shape"])


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {n: rng.standard_normal((3, 5)).astype(np.float32) for n in NAMES}


def gradient(step: int, name: str) -> np.ndarray:
    rng = np.random.default_rng(1000 * step + NAMES.index(name))
    return rng.standard_normal((3, 5)).astype(np.float32)


def replay(p0: dict[str, np.ndarray], steps: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The kernel applied locally: every parameter updated ``steps`` times."""
    cfg = SGDConfig(**OPT)  # type: ignore[arg-type]
    out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, value in p0.items():
        velocity = None
        for k in range(steps):
            value, velocity = sgd_update(cfg, value, velocity, gradient(k, name))
        out[name] = (value, velocity)
    return out


def step_body(k: int) -> dict[str, Any]:
    return {"gradients": {n: tensor(gradient(k, n)) for n in NAMES}}


def test_placement_is_stable_and_uses_every_shard() -> None:
    parts = split(NAMES, SHARDS)
    assert sorted(parts) == list(range(SHARDS)), parts
    assert all(shard_of(n, SHARDS) == i for i, names in parts.items() for n in names)
    assert shard_name("m", 0) == "m" and shard_name("m", 2) == "m~2"
    assert shard_of("anything", 1) == 0


# -- in process ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "memory":
        journal: Any = MemoryJournal()
    else:
        from momentum_service.store.redis import RedisJournal

        redis: RedisProcess = request.getfixturevalue("redis_proc")
        journal = RedisJournal.from_url(redis.url, prefix=f"shards{time.monotonic_ns()}")
    app = create_app(Settings(), journal=journal)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client
    await journal.close()


async def test_sharded_model_in_one_process(api: httpx.AsyncClient) -> None:
    p0 = initial()
    r = await api.put("/v1/models/m", json={"optimizer": OPT, "shards": SHARDS})
    assert r.status_code == 201, r.text
    assert r.json()["shards"] == SHARDS and r.json()["consistent"] is True
    r = await api.put("/v1/models/m/params", json={"params": {n: tensor(v) for n, v in p0.items()}})
    assert r.status_code == 201, r.text
    # Each shard holds its own parameters (shard i > 0 is the internal model m~i).
    r = await api.get("/v1/models/m")
    body = r.json()
    assert sorted(body["params"]) == sorted(NAMES)
    parts = split(NAMES, SHARDS)
    assert [s["params"] for s in body["shard_steps"]] == [len(parts.get(i, [])) for i in range(SHARDS)]
    # Shards are internal: not listed, and not reachable by a client.
    listed = (await api.get("/v1/models")).json()["models"]
    assert [m["name"] for m in listed] == ["m"] and listed[0]["params"] == len(NAMES)
    assert (await api.get("/v1/models/m~1")).status_code in (404, 422)

    for k in range(3):
        r = await api.post("/v1/models/m/step", json=step_body(k), headers={"Idempotency-Key": f"s{k}"})
        assert r.status_code == 200, r.text
        assert r.headers["momentum-shards"] == "0,1,2"
        assert {n: p["step"] for n, p in r.json()["params"].items()} == dict.fromkeys(NAMES, k + 1)
    # A retry with the same key replays on every shard: nothing applied twice.
    r = await api.post("/v1/models/m/step", json=step_body(2), headers={"Idempotency-Key": "s2"})
    assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true"
    assert {p["step"] for p in r.json()["params"].values()} == {3}
    # The same key with another body is refused.
    r = await api.post("/v1/models/m/step", json=step_body(5), headers={"Idempotency-Key": "s2"})
    assert r.status_code == 422, r.text

    expected = replay(p0, 3)
    r = await api.get("/v1/models/m/params", params={"include": "velocity"})
    got = r.json()["params"]
    assert sorted(got) == sorted(NAMES)
    for name, (value, velocity) in expected.items():
        assert got[name]["step"] == 3
        assert array(got[name]).tobytes() == value.tobytes()
        assert velocity is not None and array(got[name]["velocity"]).tobytes() == velocity.tobytes()
    one = (await api.get(f"/v1/models/m/params/{NAMES[4]}")).json()
    assert array(one).tobytes() == expected[NAMES[4]][0].tobytes()
    safetensors = await api.get(
        "/v1/models/m/params", params={"names": ",".join(NAMES[:4])}, headers={"Accept": "application/x-safetensors"}
    )
    assert safetensors.status_code == 200 and safetensors.headers["content-type"] == "application/x-safetensors"

    # A step on some parameters only moves their shards: GET model tells the shards apart.
    lone = NAMES[0]
    r = await api.post("/v1/models/m/step", json={"gradients": {lone: tensor(gradient(9, lone))}})
    assert r.status_code == 200 and r.headers["momentum-shards"] == str(shard_of(lone, SHARDS))
    body = (await api.get("/v1/models/m")).json()
    assert body["consistent"] is False
    assert body["shard_steps"][shard_of(lone, SHARDS)]["steps"] == 4
    assert body["params"][lone]["step"] == 4

    # A step some shard would refuse is refused before any shard applies its part.
    steps_before = {n: p["step"] for n, p in (await api.get("/v1/models/m")).json()["params"].items()}
    r = await api.post("/v1/models/m/step", json={"gradients": {**step_body(3)["gradients"], "nope": tensor(p0[lone])}})
    assert r.status_code == 404 and r.json()["missing"] == ["nope"], r.text
    wrong = {**step_body(3)["gradients"], NAMES[-1]: tensor(np.zeros(4, np.float32))}
    r = await api.post("/v1/models/m/step", json={"gradients": wrong})
    assert r.status_code == 409 and r.json()["type"].endswith("tensor-mismatch"), r.text
    assert {n: p["step"] for n, p in (await api.get("/v1/models/m")).json()["params"].items()} == steps_before

    # Unknown parameters: 404 naming them (no shard applied anything).
    r = await api.get("/v1/models/m/params", params={"names": f"{NAMES[1]},nope,nada"})
    assert r.status_code == 404 and r.json()["missing"] == ["nada", "nope"]

    # What a sharded model refuses.
    r = await api.post("/v1/models/m/step", json={**step_body(0), "expected_steps": {NAMES[0]: 4}})
    assert r.status_code == 422 and "not supported on sharded models" in r.json()["detail"]
    r = await api.post("/v1/models/m/step", json={**step_body(0), "base_step": 3})
    assert r.status_code == 422 and "not supported on sharded models" in r.json()["detail"]
    r = await api.put("/v1/models/m", json={"optimizer": OPT, "shards": 2})
    assert r.status_code == 409 and r.json()["current"] == SHARDS
    r = await api.put("/v1/models/m", json={"optimizer": OPT})
    assert r.status_code == 409
    r = await api.patch("/v1/models/m", json={"shards": 4})
    assert r.status_code == 422 and "shards cannot be changed" in r.json()["detail"]
    r = await api.patch("/v1/models/m", json={"mode": "sync", "workers": 2})
    assert r.status_code == 422 and "not supported on sharded models" in r.json()["detail"]
    r = await api.put("/v1/models/other", json={"optimizer": OPT, "shards": 2, "mode": "sync", "workers": 2})
    assert r.status_code == 422

    # A config change reaches every shard: the next step of each uses the new lr.
    r = await api.patch("/v1/models/m", json={"optimizer": {"lr": 0.5}})
    assert r.status_code == 200 and r.json()["optimizer"]["lr"] == 0.5 and r.json()["shards"] == SHARDS
    r = await api.post("/v1/models/m/step", json=step_body(7))
    assert {p["lr"] for p in r.json()["params"].values()} == {0.5}

    # The checkpoint restores every shard: replacing the model, and creating it again after a delete.
    saved = await api.get("/v1/models/m/checkpoint")
    assert saved.status_code == 200, saved.text
    before = (await api.get("/v1/models/m/params", params={"include": "state"})).json()
    assert (await api.post("/v1/models/m/step", json=step_body(8))).status_code == 200  # undone by the restore
    ckpt = {"Content-Type": "application/x-safetensors"}
    assert (await api.put("/v1/models/m/checkpoint", content=saved.content, headers=ckpt)).status_code == 200
    assert (await api.get("/v1/models/m/params", params={"include": "state"})).json() == before
    assert (await api.delete("/v1/models/m")).status_code == 204
    r = await api.put("/v1/models/m/checkpoint", content=saved.content, headers=ckpt)
    assert r.status_code == 201 and r.json()["shard_steps"][shard_of(lone, SHARDS)]["steps"] == 5
    assert (await api.get("/v1/models/m/params", params={"include": "state"})).json() == before
    r = await api.put("/v1/models/m2", json={"optimizer": OPT, "shards": 2})
    assert (await api.put("/v1/models/m2/checkpoint", content=saved.content, headers=ckpt)).status_code == 409

    # A shard refusing its part (here a non-finite result) while the others applied theirs: a 409 that says
    # which applied; never a 200.
    huge = {n: tensor(gradient(11, n)) for n in NAMES}
    victim = split(NAMES, SHARDS)[1][0]
    huge[victim] = tensor(np.full((3, 5), 3e38, np.float32))
    r = await api.post("/v1/models/m/step", json={"gradients": huge}, headers={"Idempotency-Key": "huge"})
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["type"].endswith("step-partly-applied") and problem["incomplete"] == [1]
    assert sorted(problem["applied"]) == ["0", "2"]
    assert (await api.get("/v1/models/m")).json()["consistent"] is False

    # Delete a parameter (on its shard), then the model (and its shards); a new one starts empty.
    assert (await api.delete(f"/v1/models/m/params/{NAMES[5]}")).status_code == 204
    assert NAMES[5] not in (await api.get("/v1/models/m")).json()["params"]
    assert (await api.delete("/v1/models/m")).status_code == 204
    assert (await api.get("/v1/models/m")).status_code == 404
    r = await api.put("/v1/models/m", json={"optimizer": OPT, "shards": SHARDS})
    assert r.status_code == 201 and r.json()["params"] == {}


# -- three replicas on one Redis --------------------------------------------------------------------

KEY, OTHER = "shards-test-key-m", "shards-test-key-other"
KEYS = ";".join(
    f"{hashlib.sha256(k.encode()).hexdigest()} {scope}" for k, scope in ((KEY, "admin:m"), (OTHER, "admin:x*"))
)
LEASE = {"MOMENTUM_LEASE_MS": "1000", "MOMENTUM_API_KEYS": KEYS}


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


def _retry_until_answered(client: httpx.Client, url: str, body: dict[str, Any], key: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        r = client.post(url, json=body, headers={"Idempotency-Key": key})
        if r.status_code != 503 and r.status_code != 409:
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


@pytest.mark.slow
def test_three_replicas_shards_on_distinct_owners_and_a_retry_completes_a_paused_shard(
    redis_server: RedisProcess,
) -> None:
    servers = [ServerProcess(redis_url=redis_server.url, env=LEASE).start() for _ in range(3)]
    try:
        # Every replica sees the other two before the model is placed.
        wait_until(lambda: redis_server.client().zcard("momentum:{replicas}:live") == 3, what="3 live replicas")
        time.sleep(0.5)
        urls = [s.url for s in servers]
        p0 = initial()
        # The shards' requests carry the caller's key, authorized by its scope on the model ("admin:m").
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
            r = client.put(f"{urls[0]}/v1/models/m", json={"optimizer": OPT, "shards": SHARDS})
            assert r.status_code == 201, r.text
            r = client.put(f"{urls[1]}/v1/models/m/params", json={"params": {n: tensor(v) for n, v in p0.items()}})
            assert r.status_code == 201, r.text
            owners = [owner_url(redis_server, shard_name("m", i)) for i in range(SHARDS)]
            assert None not in owners and len(set(owners)) == SHARDS, owners

            other = {"Authorization": f"Bearer {OTHER}"}
            r = client.post(f"{urls[0]}/v1/models/m/step", json=step_body(0), headers=other)
            assert r.status_code == 403, r.text
            r = client.get(f"{owners[1]}/v1/models/m~1", headers={"Momentum-Forwarded": "1"})
            assert r.status_code == 200  # a peer's request for a shard, with a key that may read the model
            r = client.get(f"{owners[1]}/v1/models/m~1", headers={"Momentum-Forwarded": "1", **other})
            assert r.status_code == 403, r.text
            steps = 0
            for k in range(4):  # through every replica in turn
                r = client.post(
                    f"{urls[k % 3]}/v1/models/m/step", json=step_body(k), headers={"Idempotency-Key": f"k{k}"}
                )
                assert r.status_code == 200, r.text
                steps += 1

            # Pause the owner of a shard that is not the model's own, and step through the model's owner.
            paused = next(s for s in servers if s.url == owners[1])
            entry = next(s for s in servers if s.url == owners[0])
            paused.pause()
            try:
                r = client.post(
                    f"{entry.url}/v1/models/m/step", json=step_body(steps), headers={"Idempotency-Key": "p"}
                )
                assert r.status_code == 503, r.text
                problem = r.json()
                assert problem["type"].endswith("step-incomplete") and r.headers["retry-after"]
                assert problem["incomplete"] == [1] and sorted(problem["applied"]) == ["0", "2"]
                assert "same Idempotency-Key" in problem["detail"]
                r = client.get(f"{entry.url}/v1/models/m")  # shard 1 is behind (read from its new owner, or 503)
                if r.status_code == 200:
                    assert r.json()["consistent"] is False
            finally:
                paused.resume()
            r = _retry_until_answered(client, f"{urls[2]}/v1/models/m/step", step_body(steps), "p")
            assert r.status_code == 200, r.text
            assert {p["step"] for p in r.json()["params"].values()} == {steps + 1}
            steps += 1
            r = client.get(f"{urls[1]}/v1/models/m")
            assert r.json()["consistent"] is True, r.json()["shard_steps"]
            # Each shard applied every step once: the values are the kernel's, bitwise.
            r = client.get(f"{urls[2]}/v1/models/m/params", params={"include": "velocity"})
            got = r.json()["params"]
            for name, (value, velocity) in replay(p0, steps).items():
                assert got[name]["step"] == steps, (name, got[name]["step"])
                assert array(got[name]).tobytes() == value.tobytes(), name
                assert velocity is not None and array(got[name]["velocity"]).tobytes() == velocity.tobytes()
            # A checkpoint gathers every shard, and restores them all (here after the model was deleted).
            before = client.get(f"{urls[0]}/v1/models/m/params", params={"include": "state"}).json()
            saved = client.get(f"{urls[1]}/v1/models/m/checkpoint")
            assert saved.status_code == 200, saved.text
            assert client.delete(f"{urls[2]}/v1/models/m").status_code == 204
            headers = {"Content-Type": "application/x-safetensors"}
            r = client.put(f"{urls[0]}/v1/models/m/checkpoint", content=saved.content, headers=headers)
            assert r.status_code == 201, r.text
            assert client.get(f"{urls[1]}/v1/models/m/params", params={"include": "state"}).json() == before
            # A step on one shard's parameters only: every replica's GET model says the shards disagree.
            lone = split(NAMES, SHARDS)[2]
            r = client.post(
                f"{urls[0]}/v1/models/m/step", json={"gradients": {n: tensor(gradient(99, n)) for n in lone}}
            )
            assert r.status_code == 200 and r.headers["momentum-shards"] == "2", r.text
            for url in urls:
                body = client.get(f"{url}/v1/models/m").json()
                assert body["consistent"] is False
                assert [s["steps"] for s in body["shard_steps"]] == [steps, steps, steps + 1]
        assert "Traceback" not in "".join(s.log() for s in servers)
    finally:
        for s in servers:
            if s.proc is not None:
                s.resume()
            s.stop()


@pytest.mark.slow
def test_embedded_store_server_process_keeps_every_shard_local() -> None:
    server = ServerProcess().start()
    try:
        p0 = initial()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.put("/v1/models/m", json={"optimizer": OPT, "shards": SHARDS}).status_code == 201
            r = client.put("/v1/models/m/params", json={"params": {n: tensor(v) for n, v in p0.items()}})
            assert r.status_code == 201, r.text
            for k in range(2):
                r = client.post("/v1/models/m/step", json=step_body(k), headers={"Idempotency-Key": f"e{k}"})
                assert r.status_code == 200 and r.headers["momentum-shards"] == "0,1,2", r.text
            r = client.post("/v1/models/m/step", json=step_body(1), headers={"Idempotency-Key": "e1"})
            assert r.headers["idempotent-replayed"] == "true"
            body = client.get("/v1/models/m").json()
            assert body["consistent"] is True and [s["steps"] for s in body["shard_steps"]] == [2, 2, 2]
            got = client.get("/v1/models/m/params", params={"include": "velocity"}).json()["params"]
            for name, (value, velocity) in replay(p0, 2).items():
                assert array(got[name]).tobytes() == value.tobytes()
                assert velocity is not None and array(got[name]["velocity"]).tobytes() == velocity.tobytes()
    finally:
        server.stop()


async def test_the_sdk_creates_and_steps_a_sharded_model(api: httpx.AsyncClient) -> None:
    """``create_model(shards=n)`` in the Python SDK; the model it describes says so, steps are the kernel's."""
    import momentum_client as mc

    async with mc.AsyncClient("http://test", client=api) as client:
        info = await client.create_model("sdk", **OPT, shards=SHARDS)  # type: ignore[arg-type]
        assert info.shards == SHARDS and info.consistent
        p0 = initial()
        await client.init_params("sdk", p0)
        for k in range(3):
            await client.push_gradients("sdk", {n: gradient(k, n) for n in NAMES})
        info = await client.get_model("sdk")
        assert info.shards == SHARDS and info.consistent
        values = await client.get_params("sdk")
        expected = replay(p0, 3)
        assert all(values[n].tobytes() == expected[n][0].tobytes() for n in NAMES)
        with pytest.raises(mc.InvalidRequest, match="shards must be between 1 and 64, got 65"):
            await client.create_model("bad", lr=0.1, shards=65)
