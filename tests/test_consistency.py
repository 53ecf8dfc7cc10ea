"""Versions, exactly-once steps and the sync and bounded modes, in process, on every store backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from momentum_service.api.step import fingerprint
from momentum_service.engine import Idempotency, ParameterServer, mean_gradient
from momentum_service.kernels import SGDConfig, sgd_update
from momentum_service.store import Journal

from .test_http import array, assert_problem, make_client, tensor

OPT = {"lr": 0.1, "momentum": 0.9}


@pytest.fixture
async def api(store: Journal) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store, sync_timeout_s=2.0) as client:
        yield client


async def make_model(api: httpx.AsyncClient, name: str = "m", **config: Any) -> None:
    r = await api.put(f"/v1/models/{name}", json={"optimizer": OPT, **config})
    assert r.status_code == 201, r.text
    r = await api.put(f"/v1/models/{name}/params", json={"params": {"w": tensor([1.0, 2.0]), "b": tensor([0.5])}})
    assert r.status_code == 201


async def state(api: httpx.AsyncClient, name: str = "m") -> Any:
    return (await api.get(f"/v1/models/{name}/params", params={"include": "velocity"})).json()


def push(grad: float = 1.0, **fields: Any) -> dict[str, Any]:
    return {"gradients": {"w": tensor([grad, grad])}, **fields}


# -- versions ------------------------------------------------------------------------------------


async def test_expected_steps(api: httpx.AsyncClient) -> None:
    await make_model(api)
    r = await api.post("/v1/models/m/step", json=push(expected_steps={"w": 0}))
    assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1
    before = await state(api)
    body = assert_problem(await api.post("/v1/models/m/step", json=push(expected_steps={"w": 0})), 409, "step-mismatch")
    assert body["current_steps"] == {"w": 1} and "'w' is at step 1, not 0" in body["detail"]
    assert await state(api) == before  # nothing applied
    two = {"gradients": {"w": tensor([1.0, 1.0]), "b": tensor([1.0])}, "expected_steps": {"w": 1, "b": 1}}
    body = assert_problem(await api.post("/v1/models/m/step", json=two), 409, "step-mismatch")
    assert body["current_steps"] == {"w": 1, "b": 0}
    assert await state(api) == before  # all or nothing: w was at its expected step, b was not
    body = assert_problem(await api.post("/v1/models/m/step", json=push(expected_steps={"b": 0})), 422)
    assert body["errors"][0]["loc"] == ["body", "expected_steps", "b"]
    assert_problem(await api.post("/v1/models/m/step", json=push(expected_steps={"w": -1})), 422)


# -- exactly once -------------------------------------------------------------------------------


async def test_a_retry_with_the_same_key_is_not_applied_again(api: httpx.AsyncClient) -> None:
    await make_model(api)
    key = {"Idempotency-Key": "push-0001"}
    first = await api.post("/v1/models/m/step", json=push(), headers=key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    after = await state(api)
    again = await api.post("/v1/models/m/step", json=push(), headers=key)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # same params, same steps, same lr
    assert await state(api) == after
    # The same key with another body is refused; a new key applies.
    assert_problem(await api.post("/v1/models/m/step", json=push(2.0), headers=key), 422, "idempotency-key-reused")
    r = await api.post("/v1/models/m/step", json=push(), headers={"Idempotency-Key": "push-0002"})
    assert r.json()["params"]["w"]["step"] == 2
    # The replay of a step that others moved on from says so.
    late = await api.post("/v1/models/m/step", json=push(), headers=key)
    w = late.json()["params"]["w"]
    assert (w["step"], w["current_step"]) == (1, 2)
    assert w["data"] == (await state(api))["params"]["w"]["data"]
    # Keys are per model, and the IETF draft's quoted form names the same key.
    r = await api.post("/v1/models/m/step", json=push(), headers={"Idempotency-Key": '"push-0002"'})
    assert r.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "é"])
async def test_invalid_keys(api: httpx.AsyncClient, key: str) -> None:
    await make_model(api)
    headers = [(b"Idempotency-Key", key.encode()), (b"content-type", b"application/json")]
    r = await api.post("/v1/models/m/step", content=httpx.Request("POST", "/", json=push()).content, headers=headers)
    assert_problem(r, 422, "invalid-idempotency-key")
    assert (await state(api))["params"]["w"]["step"] == 0


async def test_a_retry_while_the_first_attempt_is_in_flight_is_a_409(api: httpx.AsyncClient) -> None:
    await make_model(api)
    # Another attempt holds the key: claim it at the model's owner, with the request's fingerprint.
    body = httpx.Request("POST", "http://test/v1/models/m/step", json=push(3.0)).content
    server: ParameterServer = api._transport.app.state.server  # type: ignore[attr-defined]
    guard = (await server.owner("m")).guard
    assert guard is not None
    held = Idempotency("busy", fingerprint("POST", "/v1/models/m/step", "application/json", body))
    assert await guard.begin(held) is None  # this attempt holds the key
    r = await api.post(
        "/v1/models/m/step", content=body, headers={"Idempotency-Key": "busy", "content-type": "application/json"}
    )
    assert_problem(r, 409, "idempotency-in-flight")
    assert r.headers["retry-after"] == "1"
    guard.abandon("busy")
    r = await api.post(
        "/v1/models/m/step", content=body, headers={"Idempotency-Key": "busy", "content-type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1


async def test_a_failed_attempt_releases_its_key(api: httpx.AsyncClient) -> None:
    await make_model(api)
    key = {"Idempotency-Key": "k"}
    bad = {"gradients": {"w": tensor([1.0, 2.0, 3.0])}}
    assert_problem(await api.post("/v1/models/m/step", json=bad, headers=key), 409, "tensor-mismatch")
    r = await api.post("/v1/models/m/step", json=push(), headers=key)  # a corrected request may reuse the key
    assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1


async def test_20_concurrent_requests_with_one_key_apply_once(api: httpx.AsyncClient) -> None:
    await make_model(api)
    key = {"Idempotency-Key": "same"}
    replies = await asyncio.gather(*(api.post("/v1/models/m/step", json=push(), headers=key) for _ in range(20)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 409}
    ok = [r for r in replies if r.status_code == 200]
    assert ok and all(r.json()["params"]["w"]["step"] == 1 for r in ok)
    for r in replies:
        if r.status_code == 409:
            assert r.json()["type"].endswith("idempotency-in-flight")
    assert (await state(api))["params"]["w"]["step"] == 1


# -- bounded staleness ------------------------------------------------------------------------------


async def test_bounded_mode_rejects_exactly_the_stale_pushes(api: httpx.AsyncClient) -> None:
    await make_model(api, mode="bounded", max_staleness=2)
    assert (await api.get("/v1/models/m")).json()["max_staleness"] == 2
    assert_problem(await api.post("/v1/models/m/step", json=push()), 422, "mode-field-required")
    accepted, rejected = [], []
    for _ in range(6):
        for offset in (-3, -2, 0, 1, -1):
            current = (await state(api))["params"]["w"]["step"]
            base = current + offset
            if base < 0:
                continue
            r = await api.post("/v1/models/m/step", json=push(base_step=base, return_params=False))
            if r.status_code == 200:
                accepted.append((current, base))
                assert r.json()["params"]["w"]["step"] == current + 1
            else:
                rejected.append((current, base))
                body = assert_problem(r, 409, "stale-gradient")
                assert body["current_steps"]["w"] == current
                assert (await state(api))["params"]["w"]["step"] == current  # nothing applied
    assert all(0 <= cur - base <= 2 for cur, base in accepted)
    assert all(cur - base > 2 or base > cur for cur, base in rejected)
    assert len(accepted) == (await state(api))["params"]["w"]["step"]
    assert {cur - base for cur, base in rejected} == {3, -1}


# -- sync -------------------------------------------------------------------------------------------


async def test_sync_mode_applies_the_mean_once_per_step(api: httpx.AsyncClient) -> None:
    await make_model(api, mode="sync", workers=4)
    rng = np.random.default_rng(5)
    w, velocity, cfg = np.float32([1.0, 2.0]), None, SGDConfig(**OPT)
    for step in range(6):
        grads = {wid: rng.standard_normal(2).astype(np.float32) for wid in (3, 0, 2, 1)}  # arrival order

        async def send(wid: int, g: np.ndarray, base: int = step) -> httpx.Response:
            body = {"gradients": {"w": tensor(g)}, "worker_id": wid, "base_step": base}
            return await api.post("/v1/models/m/step", json=body)

        replies = await asyncio.gather(*(send(wid, g) for wid, g in grads.items()))
        mean = mean_gradient(dict(grads))
        w, velocity = sgd_update(cfg, w, velocity, mean)
        for r in replies:
            assert r.status_code == 200, r.text
            out = r.json()["params"]["w"]
            assert out["step"] == step + 1 and array(out).tobytes() == w.tobytes()
        # A contributor's late re-send gets the result; an id beyond the workers is refused.
        again = await send(3, grads[3])
        assert again.status_code == 200 and array(again.json()["params"]["w"]).tobytes() == w.tobytes()
        assert_problem(await send(99, grads[3]), 422, "worker-out-of-range")
    assert (await state(api))["params"]["w"]["step"] == 6


def test_the_mean_sums_in_worker_id_order() -> None:
    big, small = np.float32([2.0**24]), np.float32([1.0])
    # ((2^24 + 1) + 1) loses both ones in float32; (1 + 1) + 2^24 keeps them.
    by_order = {1: small, 2: small, 3: big}
    assert mean_gradient(by_order)[0] == np.float32((2.0**24 + 2) / 3)
    swapped = {3: small, 2: small, 1: big}
    assert mean_gradient(swapped)[0] == np.float32(np.float32(2.0**24) / 3)


async def test_sync_mode_duplicates_timeouts_and_required_fields(store: Journal) -> None:
    async with make_client(store, sync_timeout_s=0.3) as api:
        await make_model(api, mode="sync", workers=2)
        body = {"gradients": {"w": tensor([1.0, 1.0])}, "worker_id": 1, "base_step": 0}
        r = await api.post("/v1/models/m/step", json=body)
        assert r.status_code == 202
        pending = r.json()
        assert pending["status"] == "pending" and pending["contributions"] == {"w": 1} and pending["workers"] == 2
        assert r.headers["location"] == "/v1/models/m/params?names=w"
        # The same worker again (with another gradient): not counted twice, still pending.
        r = await api.post("/v1/models/m/step", json={**body, "gradients": {"w": tensor([9.0, 9.0])}})
        assert r.status_code == 202 and r.json()["contributions"] == {"w": 1}
        assert (await state(api))["params"]["w"]["step"] == 0
        other = {"gradients": {"w": tensor([3.0, 3.0])}, "worker_id": 0, "base_step": 0}
        r = await api.post("/v1/models/m/step", json=other)
        assert r.status_code == 200
        # mean of worker 1's first gradient (1) and worker 0's (3) is 2: w = [1, 2] - 0.1 * 2
        assert array(r.json()["params"]["w"]).tolist() == np.float32([0.8, 1.8]).tolist()
        r = await api.post("/v1/models/m/step", json=body)  # worker 1 re-sends after its 202: the result
        assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1
        assert_problem(await api.post("/v1/models/m/step", json={**body, "base_step": 5}), 409, "stale-gradient")
        assert_problem(await api.post("/v1/models/m/step", json=push(base_step=1)), 422, "mode-field-required")
        assert_problem(await api.post("/v1/models/m/step", json=push(worker_id=1)), 422, "mode-field-required")


async def test_sync_worker_ids_are_0_to_workers_minus_1(store: Journal) -> None:
    """The mean of N is the mean of workers 0..N-1: a third id on a 2-worker model is refused, not averaged."""
    async with make_client(store, sync_timeout_s=0.2) as api:
        await make_model(api, mode="sync", workers=2)
        for wid in (2, 5, 1024):
            body = {"gradients": {"w": tensor([7.0, 7.0])}, "worker_id": wid, "base_step": 0}
            problem = assert_problem(await api.post("/v1/models/m/step", json=body), 422, "worker-out-of-range")
            assert problem["errors"][0]["loc"] == ["body", "worker_id"] and "between 0 and 1" in problem["detail"]
        first = {"gradients": {"w": tensor([1.0, 1.0])}, "worker_id": 0, "base_step": 0}
        assert (await api.post("/v1/models/m/step", json=first)).json()["contributions"] == {"w": 1}
        second = {"gradients": {"w": tensor([3.0, 3.0])}, "worker_id": 1, "base_step": 0}
        r = await api.post("/v1/models/m/step", json=second)
        assert r.status_code == 200
        assert array(r.json()["params"]["w"]).tolist() == np.float32([0.8, 1.8]).tolist()  # (1 + 3) / 2, not / 3


async def test_mode_config_validation(api: httpx.AsyncClient) -> None:
    for bad in (
        {"mode": "sync"},
        {"mode": "sync", "workers": 0},
        {"workers": 3},
        {"mode": "bounded"},
        {"mode": "bounded", "max_staleness": -1},
        {"mode": "async", "max_staleness": 3},
        {"mode": "lockstep"},
    ):
        assert_problem(await api.put("/v1/models/x", json={"optimizer": OPT, **bad}), 422)
    assert (await api.get("/v1/models/x")).status_code == 404
    await make_model(api, mode="sync", workers=4)
    r = await api.patch("/v1/models/m", json={"workers": 8})
    assert (r.json()["mode"], r.json()["workers"]) == ("sync", 8)
    r = await api.patch("/v1/models/m", json={"mode": "bounded", "max_staleness": 3})
    assert (r.json()["mode"], r.json()["max_staleness"], r.json().get("workers")) == ("bounded", 3, None)
    assert_problem(await api.patch("/v1/models/m", json={"workers": 2}), 422, "invalid-config")
    r = await api.patch("/v1/models/m", json={"mode": "async"})
    assert r.json()["mode"] == "async" and "max_staleness" not in r.json()


def test_fingerprints_tell_bodies_apart() -> None:
    small, big = b"x" * 100, bytes(range(256)) * 8192  # 2 MiB: the large-body path
    seen = {fingerprint("POST", "/p", "t", small), fingerprint("POST", "/p", "t", big)}
    for base in (small, big):
        for i in (0, len(base) // 2, len(base) - 1):  # any changed byte: the head, the middle, the tail
            changed = bytearray(base)
            changed[i] ^= 1
            seen.add(fingerprint("POST", "/p", "t", bytes(changed)))
        seen.add(fingerprint("POST", "/p", "t", base + b"!"))
        seen.add(fingerprint("POST", "/other", "t", base))
        seen.add(fingerprint("POST", "/p", "application/x-safetensors", base))
    assert len(seen) == 2 + 2 * 6
