"""A deleted model is gone whole: nothing of it is read by a model created again under its name.

Found by trying the service as a new user: an Idempotency-Key used before a DELETE was replayed
after it (the new model's step silently dropped), and a re-created sync model counted stale
contributions. Each case runs on both stores; on Redis, no key of the old model survives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from momentum_service.store import Journal
from momentum_service.store.redis import RedisJournal

from .test_http import array, make_client, tensor


@pytest.fixture
async def api(store: Journal) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store, sync_timeout_s=0.2) as client:
        yield client


async def _create(api: httpx.AsyncClient, **mode: Any) -> None:
    r = await api.put("/v1/models/m", json={"optimizer": {"lr": 0.1, "momentum": 0.9}, **mode})
    assert r.status_code == 201, r.text
    r = await api.put("/v1/models/m/params/w", json=tensor([1.0, 2.0]))
    assert r.status_code == 201, r.text


async def test_an_idempotency_key_from_before_a_delete_is_not_replayed(api: httpx.AsyncClient) -> None:
    push = {"gradients": {"w": tensor([0.5, -0.5])}}
    key = {"idempotency-key": "push-3"}
    await _create(api)
    for _ in range(2):
        assert (await api.post("/v1/models/m/step", json=push)).status_code == 200
    r = await api.post("/v1/models/m/step", json=push, headers=key)
    assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 3

    assert (await api.delete("/v1/models/m")).status_code == 204
    await _create(api)
    first = await api.post("/v1/models/m/step", json=push)
    assert first.json()["params"]["w"]["step"] == 1
    # The same key and body as before the delete: a new step of the new model, applied.
    again = await api.post("/v1/models/m/step", json=push, headers=key)
    assert again.status_code == 200, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["params"]["w"]["step"] == 2
    state = (await api.get("/v1/models/m/params/w")).json()
    assert state["step"] == 2 and array(state).tolist() != array(first.json()["params"]["w"]).tolist()
    # ...and that key now belongs to the new model's step 2.
    replay = await api.post("/v1/models/m/step", json=push, headers=key)
    assert replay.headers["idempotent-replayed"] == "true" and replay.json()["params"]["w"]["step"] == 2


async def test_sync_contributions_from_before_a_delete_do_not_count(api: httpx.AsyncClient) -> None:
    sync = {"mode": "sync", "workers": 2}
    await _create(api, **sync)
    r = await api.post(
        "/v1/models/m/step", json={"gradients": {"w": tensor([1.0, 1.0])}, "worker_id": 0, "base_step": 0}
    )
    assert r.status_code == 202 and r.json()["contributions"] == {"w": 1}

    assert (await api.delete("/v1/models/m")).status_code == 204
    await _create(api, **sync)
    # Worker 1 alone: one contribution of two, not "2 of 2" from the old model's worker 0.
    r = await api.post(
        "/v1/models/m/step", json={"gradients": {"w": tensor([3.0, 3.0])}, "worker_id": 1, "base_step": 0}
    )
    assert r.status_code == 202, r.text
    assert r.json()["contributions"] == {"w": 1}
    r = await api.post(
        "/v1/models/m/step", json={"gradients": {"w": tensor([5.0, 5.0])}, "worker_id": 0, "base_step": 0}
    )
    assert r.status_code == 200, r.text
    # The mean of the new model's two pushes only: (3 + 5) / 2 = 4; lr 0.1, first momentum step.
    assert array(r.json()["params"]["w"]).tolist() == pytest.approx([1.0 - 0.4, 2.0 - 0.4])


async def test_a_parameter_deleted_with_its_model_is_not_there_after_re_creation(api: httpx.AsyncClient) -> None:
    await _create(api)
    assert (await api.put("/v1/models/m/params/extra", json=tensor([9.0]))).status_code == 201
    assert (await api.delete("/v1/models/m")).status_code == 204
    assert (await api.put("/v1/models/m", json={"optimizer": {"lr": 0.1}})).status_code == 201
    assert (await api.get("/v1/models/m")).json()["params"] == {}
    assert (await api.get("/v1/models/m/params/extra")).status_code == 404


async def test_redis_keeps_no_key_of_a_deleted_model(redis_proc, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    """The log, the snapshots and the idempotency records: all unlinked by the DELETE itself (the lease,
    the model name's, stays: its fencing token must keep growing)."""
    store = RedisJournal.from_url(redis_proc.url, prefix=redis_prefix)
    client = redis_proc.client()
    try:
        async with make_client(store, sync_timeout_s=0.05) as api:
            await _create(api)
            for i in range(50):
                r = await api.post(
                    "/v1/models/m/step",
                    json={"gradients": {"w": tensor([0.5, i])}},
                    headers={"idempotency-key": f"k{i}"},
                )
                assert r.status_code == 200
            sync = {"optimizer": {"lr": 0.1}, "mode": "sync", "workers": 3}
            assert (await api.put("/v1/models/s", json=sync)).status_code == 201
            assert (await api.put("/v1/models/s/params/w", json=tensor([1.0]))).status_code == 201
            r = await api.post(
                "/v1/models/s/step", json={"gradients": {"w": tensor([1.0])}, "worker_id": 2, "base_step": 0}
            )
            assert r.status_code == 202
            before = {k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*")}
            assert any(k.endswith(":idem") for k in before) and any(":log:" in k for k in before)

            for model in ("m", "s"):
                assert (await api.delete(f"/v1/models/{model}")).status_code == 204
            left = sorted(k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*"))
            assert left == [
                f"{redis_prefix}:{{m}}:lease",
                f"{redis_prefix}:{{replicas}}:live",
                f"{redis_prefix}:{{replicas}}:urls",
                f"{redis_prefix}:{{s}}:lease",
            ] or left == [f"{redis_prefix}:{{m}}:lease", f"{redis_prefix}:{{s}}:lease"]
    finally:
        client.close()
        await store.close()


@pytest.mark.parametrize("names", [["w", "w:who"], ["w", "w:grads"], ["a:1", "a"], ["x:g:1", "x"]])
async def test_names_that_look_like_key_suffixes_never_share_state(api: httpx.AsyncClient, names: list[str]) -> None:
    """Every key and field kind, with a name that is another's suffix (both stores)."""
    sync = {"optimizer": {"lr": 1.0}, "mode": "sync", "workers": 2}
    assert (await api.put("/v1/models/m", json=sync)).status_code == 201
    init = {"params": {n: tensor([0.0, 0.0]) for n in names}}
    assert (await api.put("/v1/models/m/params", json=init)).status_code == 201
    grads = {n: tensor([float(i + 1), float(10 * (i + 1))]) for i, n in enumerate(names)}
    r = await api.post("/v1/models/m/step", json={"gradients": grads, "worker_id": 0, "base_step": 0})
    assert r.status_code == 202, r.text
    assert r.json()["contributions"] == dict.fromkeys(names, 1)
    twice = {n: tensor([float(i + 1), float(10 * (i + 1))]) for i, n in enumerate(names)}
    r = await api.post("/v1/models/m/step", json={"gradients": twice, "worker_id": 1, "base_step": 0})
    assert r.status_code == 200, r.text
    for i, n in enumerate(names):
        assert array(r.json()["params"][n]).tolist() == [-(i + 1.0), -10.0 * (i + 1)]
    r = await api.post(
        "/v1/models/m/step",
        json={"gradients": {names[1]: tensor([1.0, 1.0])}, "worker_id": 0, "base_step": 1},
        headers={"idempotency-key": names[0]},
    )
    assert r.status_code == 202
    state = (await api.get("/v1/models/m/params", params={"include": "velocity"})).json()["params"]
    assert {n: state[n]["step"] for n in names} == dict.fromkeys(names, 1)
    np.testing.assert_array_equal(array(state[names[0]]), [-1.0, -10.0])
