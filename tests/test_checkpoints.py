"""Checkpoints (``GET``/``PUT /v1/models/{model}/checkpoint``) and the model list (``GET /v1/models``).

The promise: train 100 steps, save, delete the model, restore and train 100 more, and the state
is bitwise that of 200 uninterrupted steps, for every rule, with a schedule and parameter groups,
on every store. A hostile file is a 4xx problem and changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
from momentum_service.auth import hash_key
from momentum_service.engine import EngineOptions, ModelOwner
from momentum_service.kernels.schedules import LRTable
from momentum_service.store import Journal, MemoryJournal
from momentum_service.store.base import Lease
from momentum_service.store.redis import RedisJournal

from .helpers import RedisProcess
from .test_http import array, assert_problem, make_client, tensor

ST = "application/x-safetensors"
SCHEDULE = {"type": "step", "step_size": 30, "gamma": 0.5}
RULES: list[dict[str, Any]] = [
    {"rule": "pytorch", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"rule": "pytorch", "lr": 0.05, "momentum": 0.9, "dampening": 0.1, "maximize": True},
    {"rule": "keras", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"rule": "tf1", "lr": 0.05, "momentum": 0.9},
    {"rule": "ema", "lr": 0.05, "momentum": 0.9},
    {"rule": "previous_delta", "lr": 0.05, "momentum": 0.5},
]


def config_for(optimizer: dict[str, Any]) -> dict[str, Any]:
    groups = [{"params": ["*.bias"], "lr": 0.01}]
    if optimizer["rule"] in ("pytorch", "keras"):
        groups[0]["weight_decay"] = 0.0
    return {"optimizer": optimizer, "schedule": SCHEDULE, "groups": groups}


def init_values(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "fc.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "fc.bias": rng.standard_normal(4).astype(np.float32),
        "scale": np.asarray(rng.standard_normal(), dtype=np.float64),  # 0-d, float64
    }


def grads_at(k: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + k)
    return {n: rng.standard_normal(v.shape).astype(v.dtype) for n, v in values.items()}


async def create(api: httpx.AsyncClient, model: str, config: dict[str, Any], values: dict[str, np.ndarray]) -> None:
    assert (await api.put(f"/v1/models/{model}", json=config)).status_code == 201
    body = {"params": {n: tensor(v, v.dtype.name) for n, v in values.items()}}
    assert (await api.put(f"/v1/models/{model}/params", json=body)).status_code == 201


async def train(api: httpx.AsyncClient, model: str, steps: range, values: dict[str, np.ndarray]) -> None:
    for k in steps:
        body = safetensors.numpy.save(grads_at(k, values))
        r = await api.post(f"/v1/models/{model}/step", content=body, headers={"Content-Type": ST})
        assert r.status_code == 200, r.text


async def full_state(api: httpx.AsyncClient, model: str) -> dict[str, Any]:
    r = await api.get(f"/v1/models/{model}/params", params={"include": "state"}, headers={"Accept": ST})
    assert r.status_code == 200, r.text
    tensors = safetensors.numpy.load(r.content)
    meta = json.loads(_metadata(r.content)["params"])
    return {"tensors": {n: (a.dtype.name, a.shape, a.tobytes()) for n, a in tensors.items()}, "steps": meta}


def _metadata(raw: bytes) -> dict[str, str]:
    n = int.from_bytes(raw[:8], "little")
    meta: dict[str, str] = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    return meta


@pytest.mark.parametrize("optimizer", RULES, ids=[f"{o['rule']}-{i}" for i, o in enumerate(RULES)])
async def test_100_steps_saved_deleted_restored_and_100_more_equal_200_steps(
    store: Journal, optimizer: dict[str, Any]
) -> None:
    values = init_values(np.random.default_rng(7))
    config = config_for(optimizer)
    async with make_client(store) as api:
        await create(api, "straight", config, values)
        await train(api, "straight", range(200), values)

        await create(api, "resumed", config, values)
        await train(api, "resumed", range(100), values)
        saved = await api.get("/v1/models/resumed/checkpoint")
        assert saved.status_code == 200 and saved.headers["content-type"] == ST
        assert (await api.delete("/v1/models/resumed")).status_code == 204
        assert (await api.get("/v1/models/resumed")).status_code == 404
        r = await api.put("/v1/models/resumed/checkpoint", content=saved.content, headers={"Content-Type": ST})
        assert r.status_code == 201, r.text
        assert r.json()["groups"] == (await api.get("/v1/models/straight")).json()["groups"]
        assert {n: p["step"] for n, p in r.json()["params"].items()} == dict.fromkeys(values, 100)
        await train(api, "resumed", range(100, 200), values)

        straight, resumed = await full_state(api, "straight"), await full_state(api, "resumed")
        assert resumed == straight  # values, every state buffer and each step: bitwise
        assert any("@" in n for n in straight["tensors"])  # the state buffers were compared too

        # A negative control: restoring the values alone (a new model from them) loses the momentum.
        await create(api, "values-only", config, {n: array_of(saved.content, n) for n in values})
        await train(api, "values-only", range(100, 200), values)
        assert (await full_state(api, "values-only"))["tensors"] != straight["tensors"]


def array_of(raw: bytes, name: str) -> np.ndarray:
    out: np.ndarray = safetensors.numpy.load(raw)[name]
    return out


async def test_a_restore_survives_the_owner_rebuilding_from_redis(redis_proc: RedisProcess, redis_prefix: str) -> None:
    """The restore is one log entry: an owner rebuilt from the journal (as after a crash) has its state, bitwise."""
    values = init_values(np.random.default_rng(3))
    journal = RedisJournal.from_url(redis_proc.url, prefix=redis_prefix)
    async with make_client(journal) as api:
        await create(api, "m", config_for(RULES[0]), values)
        await train(api, "m", range(20), values)
        saved = (await api.get("/v1/models/m/checkpoint")).content
        await train(api, "m", range(20, 30), values)  # moved on; the restore takes it back to step 20
        r = await api.put("/v1/models/m/checkpoint", content=saved, headers={"Content-Type": ST})
        assert r.status_code == 200, r.text
        before = await full_state(api, "m")
    assert all(p["step"] == 20 for p in before["steps"].values())
    rebuilt = ModelOwner("m", journal, lambda: Lease("m", 0, "test"), EngineOptions(), LRTable())
    await rebuilt.load()
    assert rebuilt.loaded_entries > 0  # replayed from the log, the restore entry included
    records = await rebuilt.get_params(None, with_state=True)
    tensors = {}
    for name, rec in records.items():
        tensors[name] = (rec.value.dtype.name, rec.value.shape, rec.value.tobytes())
        for b, a in rec.state.items():
            tensors[f"{name}@{b}"] = (a.dtype.name, a.shape, a.tobytes())
    assert tensors == before["tensors"]
    await journal.close()


def make_file(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    return bytes(safetensors.numpy.save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()}))


GOOD_CONFIG = {"optimizer": {"rule": "pytorch", "lr": 0.1, "momentum": 0.9}}
W = np.ones((2, 2), np.float32)


def good() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return (
        {"w": W, "w@velocity": W * 0.5},
        {"format": "momentum-checkpoint/1", "config": GOOD_CONFIG, "params": {"w": {"step": 3, "state": ["velocity"]}}},
    )


def hostile() -> list[tuple[str, bytes, int]]:
    cases: list[tuple[str, bytes, int]] = []

    def case(name: str, change: Any, status: int = 422) -> None:
        tensors, meta = good()
        change(tensors, meta)
        cases.append((name, make_file(tensors, meta), status))

    case("buffer of another shape", lambda t, m: t.update({"w@velocity": np.ones(3, np.float32)}))
    case("buffer of another dtype", lambda t, m: t.update({"w@velocity": np.ones((2, 2), np.float64)}))
    case("missing buffer", lambda t, m: t.pop("w@velocity"))
    case("buffer not listed", lambda t, m: m["params"]["w"].update({"state": []}))
    case(
        "buffer the rule lacks", lambda t, m: (t.update({"w@accum": W}), m["params"]["w"].update({"state": ["accum"]}))
    )
    case("listed parameter missing", lambda t, m: m["params"].update({"b": {"step": 0}}))
    case("tensor not listed", lambda t, m: t.update({"b": W}))
    case("negative step", lambda t, m: m["params"]["w"].update({"step": -1}))
    case("step not an integer", lambda t, m: m["params"]["w"].update({"step": 1.5}))
    case("wrong format", lambda t, m: m.update({"format": "something-else/9"}))
    case("no config", lambda t, m: m.pop("config"))
    case("invalid config", lambda t, m: m.update({"config": {"optimizer": {"lr": -1}}}))
    case("unknown rule", lambda t, m: m.update({"config": {"optimizer": {"rule": "adam", "lr": 0.1}}}))
    case("non-finite value", lambda t, m: t.update({"w": np.full((2, 2), np.inf, np.float32)}))
    case("invalid name", lambda t, m: (t.update({"bad name": W}), m["params"].update({"bad name": {"step": 0}})))
    case("two @", lambda t, m: t.update({"w@velocity@x": W}))
    case("another rule", lambda t, m: m.update({"config": {"optimizer": {"rule": "keras", "lr": 0.1}}}), 409)
    cases.append(("not safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", 422))
    cases.append(("truncated", make_file(*good())[:-3], 422))
    return cases


@pytest.mark.parametrize(("name", "body", "status"), hostile(), ids=[c[0] for c in hostile()])
async def test_a_hostile_checkpoint_is_a_4xx_and_changes_nothing(
    store: Journal, name: str, body: bytes, status: int
) -> None:
    async with make_client(store) as api:
        await create(api, "m", GOOD_CONFIG, {"w": W * 2})
        await train(api, "m", range(3), {"w": W})
        before = (await full_state(api, "m"), (await api.get("/v1/models/m")).json())
        r = await api.put("/v1/models/m/checkpoint", content=body, headers={"Content-Type": ST})
        assert_problem(r, status)
        assert (await full_state(api, "m"), (await api.get("/v1/models/m")).json()) == before
        r = await api.put("/v1/models/new/checkpoint", content=body, headers={"Content-Type": ST})
        if status == 409:  # no rule to conflict with: created
            assert r.status_code == 201
        else:
            assert_problem(r, status)
            assert (await api.get("/v1/models/new")).status_code == 404


async def test_the_good_file_restores_and_other_media_types_are_refused() -> None:
    async with make_client(MemoryJournal()) as api:
        body = make_file(*good())
        r = await api.put("/v1/models/m/checkpoint", content=body, headers={"Content-Type": "application/json"})
        assert_problem(r, 415)
        assert (await api.get("/v1/models/m")).status_code == 404
        r = await api.put("/v1/models/m/checkpoint", content=body, headers={"Content-Type": ST})
        assert r.status_code == 201, r.text
        state = (await api.get("/v1/models/m/params/w", params={"include": "state"})).json()
        assert state["step"] == 3 and array(state["state"]["velocity"]).tolist() == (W * 0.5).tolist()
        r = await api.put("/v1/models/m/checkpoint", content=body, headers={"Content-Type": ST, "If-None-Match": "*"})
        assert_problem(r, 412, "model-exists")
        # The saved file reads with the reference library, metadata included.
        saved = (await api.get("/v1/models/m/checkpoint")).content
        assert set(safetensors.numpy.load(saved)) == {"w", "w@velocity"}
        meta = _metadata(saved)
        assert json.loads(meta["format"]) == "momentum-checkpoint/1" and json.loads(meta["model"]) == "m"
        assert json.loads(meta["params"]) == {"w": {"step": 3, "state": ["velocity"]}}
        assert (await api.get("/v1/models/nope/checkpoint")).status_code == 404


# The model list.


async def test_the_model_list_pages_in_name_order_with_each_models_summary(store: Journal) -> None:
    async with make_client(store) as api:
        names = [f"m{i:02d}" for i in range(7)]
        for i, name in enumerate(names):
            rule = "keras" if i % 2 else "pytorch"
            assert (await api.put(f"/v1/models/{name}", json={"optimizer": {"rule": rule, "lr": 0.1}})).is_success
            values = {f"p{j}": np.zeros(2, np.float32) for j in range(i)}
            if values:
                body = {"params": {n: tensor(v) for n, v in values.items()}}
                assert (await api.put(f"/v1/models/{name}/params", json=body)).is_success
                await train(api, name, range(i), values)
        seen, after = [], None
        while True:
            params: dict[str, Any] = {"limit": 3} | ({"after": after} if after else {})
            r = await api.get("/v1/models", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["models"]) <= 3
            seen += page["models"]
            after = page["next"]
            if after is None:
                break
        assert [m["name"] for m in seen] == names
        for i, m in enumerate(seen):
            assert m == {
                "name": names[i],
                "rule": "keras" if i % 2 else "pytorch",
                "mode": "async",
                "params": i,
                "steps": i,
            }
        await api.delete("/v1/models/m03")
        assert [m["name"] for m in (await api.get("/v1/models")).json()["models"]] == [n for n in names if n != "m03"]
        assert_problem(await api.get("/v1/models", params={"limit": 0}), 422)
        assert_problem(await api.get("/v1/models", params={"after": "bad name!"}), 422)


async def test_the_model_list_shows_only_what_the_key_may_read() -> None:
    keys = {"own": "key-read-own", "root": "key-admin-all"}
    lines = f"{hash_key(keys['own'])} read:own-*\n{hash_key(keys['root'])} admin:*"
    async with make_client(MemoryJournal(), api_keys=lines) as api:
        root = {"Authorization": f"Bearer {keys['root']}"}
        for name in ("own-a", "other-b", "own-c"):
            assert (await api.put(f"/v1/models/{name}", json={"optimizer": {"lr": 0.1}}, headers=root)).is_success
        r = await api.get("/v1/models", headers={"Authorization": f"Bearer {keys['own']}"})
        assert [m["name"] for m in r.json()["models"]] == ["own-a", "own-c"]
        r = await api.get("/v1/models", headers=root)
        assert [m["name"] for m in r.json()["models"]] == ["other-b", "own-a", "own-c"]
        assert_problem(await api.get("/v1/models"), 401)


def test_a_checkpoint_streams_both_ways_without_a_second_copy() -> None:
    """Saving hands the parameters' own arrays to the response; restoring keeps the body's bytes as the
    tensors (the restore entry's tensors are a view of the request body, not a copy)."""
    from momentum_service.api.codecs import Limits
    from momentum_service.api.codecs.checkpoint import decode, encode_checkpoint
    from momentum_service.config import ModelConfig
    from momentum_service.engine.checkpoints import Saved
    from momentum_service.engine.state import ParamState

    value, velocity = np.arange(1 << 16, dtype=np.float32), np.ones(1 << 16, np.float32)
    saved = Saved(ModelConfig.from_dict(GOOD_CONFIG), {"w": ParamState(value, {"velocity": velocity}, 5)})
    encoded = encode_checkpoint("m", saved)
    parts = [np.frombuffer(p, np.uint8) for p in encoded.parts]
    assert any(np.shares_memory(p, value) for p in parts) and any(np.shares_memory(p, velocity) for p in parts)
    body = np.frombuffer(b"".join(bytes(p) for p in encoded.parts), np.uint8)
    checkpoint = decode(memoryview(body.data), Limits())
    assert np.shares_memory(np.frombuffer(checkpoint.tensors.data, np.uint8), body)
    restored = checkpoint.tensors.arrays()
    assert np.shares_memory(restored["w"], body) and restored["w"].tobytes() == value.tobytes()
    assert checkpoint.params == {"w": (5, ("velocity",))}
