"""The training series: steps may carry the worker's scalars, and every applied push is a point of
``GET /v1/models/{model}/metrics`` (bounded; with Redis, read back by a new owner)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import safetensors.numpy
from momentum_service.engine import EngineOptions, ModelOwner
from momentum_service.engine.series import Series
from momentum_service.kernels.schedules import LRTable
from momentum_service.store import Journal, MemoryJournal
from momentum_service.store.base import Lease
from momentum_service.store.redis import RedisJournal

from .helpers import RedisProcess
from .test_http import assert_problem, make_client, tensor

G = {"w": tensor([1.0, 1.0])}


def test_the_series_keeps_the_last_cap_points_with_consecutive_ids() -> None:
    s = Series(cap=3)
    for k in range(5):
        s.add(k + 1, 0.1, metrics={"loss": float(k)})
    assert [p.id for p in s.since(0, 100)] == [3, 4, 5]
    assert [p.id for p in s.since(3, 100)] == [4, 5] and s.since(5, 100) == [] and [p.id for p in s.since(0, 1)] == [3]
    assert len(s.take_unsaved()) == 3 and s.unsaved == []
    s2 = Series(cap=3, points=s.since(0, 100))
    assert s2.add(9, 0.1).id == 6  # ids go on from the points read back


async def setup(api: httpx.AsyncClient, model: str = "m", **config: Any) -> None:
    assert (await api.put(f"/v1/models/{model}", json={"optimizer": {"lr": 0.1, "momentum": 0.9}, **config})).is_success
    assert (await api.put(f"/v1/models/{model}/params", json={"params": {"w": tensor([1.0, 2.0])}})).is_success


async def points(api: httpx.AsyncClient, model: str = "m", **params: Any) -> dict[str, Any]:
    r = await api.get(f"/v1/models/{model}/metrics", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_every_applied_push_is_a_point_with_its_scalars(store: Journal) -> None:
    async with make_client(store) as api:
        await setup(api)
        r = await api.post("/v1/models/m/step", json={"gradients": G, "metrics": {"loss": 0.5, "acc": 0.25}})
        assert r.status_code == 200
        body = safetensors.numpy.save(
            {"w": np.ones(2, np.float32)}, metadata={"metrics": json.dumps({"loss": 0.25}), "base_step": "1"}
        )
        r = await api.post("/v1/models/m/step", content=body, headers={"Content-Type": "application/x-safetensors"})
        assert r.status_code == 200, r.text
        key = {"Idempotency-Key": "k1"}
        for _ in range(2):  # a replay is not a second point
            assert (await api.post("/v1/models/m/step", json={"gradients": G}, headers=key)).status_code == 200
        got = await points(api)
        assert [(p["id"], p["step"], p["metrics"]) for p in got["points"]] == [
            (1, 1, {"loss": 0.5, "acc": 0.25}),
            (2, 2, {"loss": 0.25}),
            (3, 3, {}),
        ]
        assert got["points"][1]["staleness"] == 0 and got["points"][0]["staleness"] is None
        assert got["points"][0]["lr"] == 0.1 and got["next"] == 3
        assert (await points(api, since=3))["points"] == [] and (await points(api, since=3))["next"] == 3
        assert [p["id"] for p in (await points(api, since=1, limit=1))["points"]] == [2]
        # A refused push is not a point, and refused metrics change nothing.
        for bad in ({"bad name": 1}, {"x": "a"}, {f"m{i}": 1 for i in range(33)}, [1]):
            assert_problem(await api.post("/v1/models/m/step", json={"gradients": G, "metrics": bad}), 422)
        body = safetensors.numpy.save({"w": np.ones(2, np.float32)}, metadata={"metrics": '{"loss": NaN}'})
        r = await api.post("/v1/models/m/step", content=body, headers={"Content-Type": "application/x-safetensors"})
        assert_problem(r, 422)
        assert len((await points(api))["points"]) == 3
        assert (await api.get("/v1/models/m/params/w")).json()["step"] == 3
        assert_problem(await api.get("/v1/models/nope/metrics"), 404)
        assert_problem(await api.get("/v1/models/m/metrics", params={"limit": 0}), 422)


async def test_sync_mode_records_each_workers_push() -> None:
    async with make_client(MemoryJournal(), sync_timeout_s=5) as api:
        await setup(api, mode="sync", workers=2)

        async def push(worker: int) -> None:
            body = {"gradients": G, "worker_id": worker, "base_step": 0, "metrics": {"loss": float(worker)}}
            assert (await api.post("/v1/models/m/step", json=body)).status_code == 200

        import asyncio

        await asyncio.gather(push(0), push(1))
        got = (await points(api))["points"]
        assert sorted((p["worker"], p["step"], p["metrics"]["loss"]) for p in got) == [(0, 1, 0.0), (1, 1, 1.0)]


async def test_the_series_is_capped_and_goes_with_the_model() -> None:
    async with make_client(MemoryJournal(), series_points=5) as api:
        await setup(api)
        for k in range(8):
            await api.post("/v1/models/m/step", json={"gradients": G, "metrics": {"loss": float(k)}})
        got = (await points(api))["points"]
        assert [p["id"] for p in got] == [4, 5, 6, 7, 8] and got[-1]["metrics"] == {"loss": 7.0}
        await api.delete("/v1/models/m")
        await setup(api)
        assert (await points(api))["points"] == []  # a new model, a new series


async def test_a_new_owner_reads_the_series_back_from_redis(redis_proc: RedisProcess, redis_prefix: str) -> None:
    journal = RedisJournal.from_url(redis_proc.url, prefix=redis_prefix)
    async with make_client(journal) as api:
        await setup(api)
        for k in range(4):
            await api.post("/v1/models/m/step", json={"gradients": G, "metrics": {"loss": float(k)}})
        server = api._transport.app.state.server  # type: ignore[attr-defined]
        await server.owners["m"].save_points()  # what the server's saver does every 0.5 s
        before = (await points(api))["points"]
    rebuilt = ModelOwner("m", journal, lambda: Lease("m", 0, "test"), EngineOptions(), LRTable())
    await rebuilt.load()
    assert [p.to_json() for p in rebuilt.points(0, 100)] == before
    assert rebuilt.series.add(5, 0.1).id == 5
    await journal.close()
