"""The store contract, run on every backend (the ``store`` fixture is parametrized)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from momentum_service.config import ModelConfig
from momentum_service.engine import ParameterServer
from momentum_service.errors import ModelNotFound, ParamNotFound, ParamsExist
from momentum_service.kernels import SGDConfig, sgd_update
from momentum_service.kernels.schedules import ConstantSchedule
from momentum_service.store import Claim, ClaimState, ParamRecord, ParamUpdate, Store, new_token
from momentum_service.store.redis import RedisStore, StateCache

CFG = {"optimizer": SGDConfig(lr=0.1, momentum=0.9).to_dict()}


def f32(*xs: float) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


async def test_put_model_creates_then_replaces_keeping_params(store: Store) -> None:
    rec, created = await store.put_model("m", CFG)
    assert created and rec.config == CFG
    await store.put_params("m", {"w": f32(1, 2)}, only_create=False)
    cfg2 = {"optimizer": SGDConfig(lr=0.5).to_dict()}
    rec2, created2 = await store.put_model("m", cfg2)
    assert not created2 and rec2.rev != rec.rev
    got = await store.get_model("m")
    assert got is not None and got.config == cfg2 and got.rev == rec2.rev
    assert [p.name for p in await store.list_params("m")] == ["w"]


async def test_missing_model(store: Store) -> None:
    assert await store.get_model("nope") is None
    assert await store.delete_model("nope") is False
    for call in (
        store.list_params("nope"),
        store.read("nope", None, with_velocity=False),
        store.put_params("nope", {"w": f32(1)}, only_create=False),
        store.delete_param("nope", "w"),
        store.replace_config("nope", "rev", CFG),
        store.commit_step("nope", "rev", []),
    ):
        with pytest.raises(ModelNotFound):
            await call


async def test_replace_config_is_compare_and_set(store: Store) -> None:
    rec, _ = await store.put_model("m", CFG)
    cfg2 = {"optimizer": SGDConfig(lr=0.2).to_dict()}
    new = await store.replace_config("m", rec.rev, cfg2)
    assert new is not None and new.config == cfg2
    assert await store.replace_config("m", rec.rev, CFG) is None  # stale revision
    got = await store.get_model("m")
    assert got is not None and got.config == cfg2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
async def test_values_round_trip_exactly(store: Store, dtype: type, shape: tuple[int, ...]) -> None:
    await store.put_model("m", CFG)
    rng = np.random.default_rng(0)
    value = (rng.standard_normal(shape) * 1e-3).astype(dtype)
    assert await store.put_params("m", {"layer.0:w": value}, only_create=False) == {"layer.0:w": True}
    _, params = await store.read("m", ["layer.0:w"], with_velocity=True)
    rec = params["layer.0:w"]
    assert rec.value.dtype == dtype and rec.value.shape == shape
    assert rec.value.tobytes() == value.tobytes()
    assert rec.velocity is None and rec.step == 0


async def test_put_params_resets_and_only_create_is_all_or_nothing(store: Store) -> None:
    rec, _ = await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1), "b": f32(2)}, only_create=False)
    _, ps = await store.read("m", None, with_velocity=True)
    ok = await store.commit_step("m", rec.rev, [ParamUpdate("a", ps["a"].etag, f32(5), f32(0.5), 1, new_token())])
    assert ok.status == "applied"
    with pytest.raises(ParamsExist) as exc:
        await store.put_params("m", {"a": f32(9), "c": f32(3)}, only_create=True)
    assert exc.value.names == ["a"]
    _, ps = await store.read("m", None, with_velocity=True)
    assert sorted(ps) == ["a", "b"]  # c was not created
    assert ps["a"].value.tolist() == [5.0] and ps["a"].step == 1 and ps["a"].velocity is not None
    created = await store.put_params("m", {"a": f32(7), "c": f32(3)}, only_create=False)
    assert created == {"a": False, "c": True}
    _, ps = await store.read("m", ["a"], with_velocity=True)
    assert ps["a"].value.tolist() == [7.0] and ps["a"].step == 0 and ps["a"].velocity is None


async def test_read_names_every_missing_parameter(store: Store) -> None:
    await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1)}, only_create=False)
    with pytest.raises(ParamNotFound) as exc:
        await store.read("m", ["a", "y", "x"], with_velocity=False)
    assert exc.value.names == ["x", "y"]


async def test_list_params_is_sorted_metadata(store: Store) -> None:
    await store.put_model("m", CFG)
    await store.put_params("m", {"z": f32(1, 2), "a": np.zeros((2, 2))}, only_create=False)
    metas = await store.list_params("m")
    assert [(p.name, p.shape, p.dtype, p.step) for p in metas] == [
        ("a", (2, 2), "float64", 0),
        ("z", (2,), "float32", 0),
    ]


async def test_commit_step_is_all_or_nothing(store: Store) -> None:
    rec, _ = await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1), "b": f32(2)}, only_create=False)
    _, ps = await store.read("m", None, with_velocity=True)
    stale = ParamUpdate("b", "not-the-etag", f32(20), None, 1, new_token())
    updates = [ParamUpdate("a", ps["a"].etag, f32(10), None, 1, "e1"), stale]
    assert (await store.commit_step("m", rec.rev, updates)).status == "conflict"
    _, after = await store.read("m", None, with_velocity=True)
    assert after["a"].value.tolist() == [1.0] and after["a"].step == 0  # a untouched too
    # A config change since the read also invalidates the commit.
    await store.put_model("m", CFG)
    update = ParamUpdate("a", ps["a"].etag, f32(10), None, 1, "e2")
    assert (await store.commit_step("m", rec.rev, [update])).status == "conflict"


async def test_commit_step_applies_and_replay_is_harmless(store: Store) -> None:
    rec, _ = await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1)}, only_create=False)
    _, ps = await store.read("m", None, with_velocity=True)
    update = ParamUpdate("a", ps["a"].etag, f32(3), f32(0.25), 1, new_token())
    assert (await store.commit_step("m", rec.rev, [update])).status == "applied"
    # The same commit sent again (e.g. re-sent by a client library after a dropped reply)
    # finds its own etag in place: it reports success and applies nothing more.
    assert (await store.commit_step("m", rec.rev, [update])).status == "applied"
    _, ps = await store.read("m", None, with_velocity=True)
    assert ps["a"].value.tolist() == [3.0] and ps["a"].step == 1 and ps["a"].etag == update.etag
    v = ps["a"].velocity
    assert v is not None and v.tolist() == [0.25]
    # Clearing the velocity (a commit with None) removes it.
    clear = ParamUpdate("a", update.etag, f32(4), None, 2, new_token())
    assert (await store.commit_step("m", rec.rev, [clear])).status == "applied"
    _, ps = await store.read("m", None, with_velocity=True)
    assert ps["a"].velocity is None


async def test_delete_param_and_model(store: Store) -> None:
    await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1), "b": f32(2)}, only_create=False)
    assert await store.delete_param("m", "a") is True
    assert await store.delete_param("m", "a") is False
    assert [p.name for p in await store.list_params("m")] == ["b"]
    assert await store.delete_model("m") is True
    assert await store.get_model("m") is None
    await store.put_model("m", CFG)
    assert await store.list_params("m") == []  # nothing survived the delete


async def test_concurrent_steps_lose_nothing(store: Store) -> None:
    """64 concurrent steps through two engines on one store equal 64 sequential steps."""
    cfg = SGDConfig(lr=0.01, momentum=0.9, nesterov=True)
    engines = [ParameterServer(store), ParameterServer(store)]
    await engines[0].put_model("m", ModelConfig(cfg, ConstantSchedule()))
    p0 = np.linspace(-1, 1, 33, dtype=np.float32)
    await store.put_params("m", {"w": p0}, only_create=False)
    grad = np.full(33, 0.3, dtype=np.float32)
    results = await asyncio.gather(*(engines[i % 2].step("m", {"w": grad}) for i in range(64)))
    assert sorted(r["w"].step for r in results) == list(range(1, 65))  # every push got its own step
    value, velocity = p0, None
    for _ in range(64):
        value, velocity = sgd_update(cfg, value, velocity, grad)
    _, ps = await store.read("m", ["w"], with_velocity=True)
    assert ps["w"].step == 64
    assert ps["w"].value.tobytes() == value.tobytes()


def claim_for(key: str, fingerprint: str = "fp", *, lease_ms: int = 60_000) -> Claim:
    return Claim(key, fingerprint, new_token(), lease_ms, 60_000)


async def test_claims_hold_one_attempt_at_a_time(store: Store) -> None:
    await store.put_model("m", CFG)
    first, second = claim_for("k"), claim_for("k")
    assert (await store.claim("m", first)).status == "owned"
    assert (await store.claim("m", first)).status == "owned"  # renewing is fine
    assert (await store.claim("m", second)).status == "in_flight"
    assert (await store.claim("m", claim_for("k", "other-body"))).status == "mismatch"
    await store.release("m", second)  # not the holder: no effect
    assert (await store.claim("m", second)).status == "in_flight"
    await store.release("m", first)
    assert (await store.claim("m", second)).status == "owned"
    assert (await store.claim("m", claim_for("k2"))).status == "owned"  # keys are independent


async def test_a_claimed_commit_applies_once_and_records_its_summary(store: Store) -> None:
    rec, _ = await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1)}, only_create=False)
    _, ps = await store.read("m", None, with_velocity=True)
    claim = claim_for("k")
    assert (await store.claim("m", claim)).status == "owned"
    update = ParamUpdate("a", ps["a"].etag, f32(3), None, 1, new_token())
    assert (await store.commit_step("m", rec.rev, [update], claim, "S1")).status == "applied"
    # Re-sent (same attempt): done by this owner, nothing applied again.
    again = await store.commit_step("m", rec.rev, [update], claim, "S1")
    assert (again.status, again.owner, again.summary) == ("done", claim.owner, "S1")
    # Another attempt with the same key, computed from the new state: still not applied.
    _, ps = await store.read("m", None, with_velocity=True)
    retry = claim_for("k")
    later = ParamUpdate("a", ps["a"].etag, f32(5), None, 2, new_token())
    outcome = await store.commit_step("m", rec.rev, [later], retry, "S2")
    assert (outcome.status, outcome.owner, outcome.summary) == ("done", claim.owner, "S1")
    assert (await store.claim("m", retry)) == ClaimState("done", claim.owner, "S1")
    assert (await store.commit_step("m", rec.rev, [later], claim_for("k", "x"), "")).status == "mismatch"
    _, ps = await store.read("m", None, with_velocity=True)
    assert ps["a"].step == 1 and ps["a"].value.tolist() == [3.0]
    # A key held by a live attempt stops another attempt's commit.
    holder, intruder = claim_for("k3"), claim_for("k3")
    await store.claim("m", holder)
    assert (await store.commit_step("m", rec.rev, [later], intruder, "")).status == "in_flight"
    # A conflict leaves the key pending, not done.
    stale = ParamUpdate("a", "old-etag", f32(9), None, 2, new_token())
    assert (await store.commit_step("m", rec.rev, [stale], holder, "")).status == "conflict"
    assert (await store.claim("m", holder)).status == "owned"


async def test_leases_and_records_expire(store: Store) -> None:
    await store.put_model("m", CFG)
    short = Claim("k", "fp", new_token(), 50, 50)
    assert (await store.claim("m", short)).status == "owned"
    await asyncio.sleep(0.15)
    assert (await store.claim("m", claim_for("k"))).status == "owned"  # the dead attempt's lease ran out
    rec, _ = await store.put_model("m", CFG)
    await store.put_params("m", {"a": f32(1)}, only_create=False)
    _, ps = await store.read("m", None, with_velocity=True)
    quick = Claim("q", "fp", new_token(), 60_000, 50)
    await store.claim("m", quick)
    update = ParamUpdate("a", ps["a"].etag, f32(3), None, 1, new_token())
    assert (await store.commit_step("m", rec.rev, [update], quick, "S")).status == "applied"
    await asyncio.sleep(0.15)
    assert (await store.claim("m", claim_for("q"))).status == "owned"  # forgotten after the TTL


async def test_redis_keys_stay_under_the_prefix(redis_proc, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    store = RedisStore.from_url(redis_proc.url, prefix=redis_prefix)
    try:
        await store.put_model("m", CFG)
        await store.put_params("m", {"a": f32(1), "b.c:d": f32(2)}, only_create=False)
        client = redis_proc.client()
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*"))
        inc = client.hget(f"{redis_prefix}:{{m}}:model", "inc").decode()
        assert keys == [
            f"{redis_prefix}:{{m}}:i:{inc}:p:a",
            f"{redis_prefix}:{{m}}:i:{inc}:p:b.c:d",
            f"{redis_prefix}:{{m}}:i:{inc}:params",
            f"{redis_prefix}:{{m}}:model",
        ]
        await store.delete_model("m")
        assert list(client.scan_iter(match=f"{redis_prefix}:*")) == []
        client.close()
    finally:
        await store.close()


async def test_a_cached_state_is_never_served_stale(redis_proc, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    """Two stores on one Redis (two server processes): each sees the other's writes at once."""

    a = RedisStore.from_url(redis_proc.url, prefix=redis_prefix)
    b = RedisStore.from_url(redis_proc.url, prefix=redis_prefix)
    try:
        rec, _ = await a.put_model("m", CFG)
        await a.put_params("m", {"w": f32(1)}, only_create=False)
        for k in range(1, 4):
            writer, reader = (a, b) if k % 2 else (b, a)
            _, ps = await writer.read("m", ["w"], with_velocity=True)
            update = ParamUpdate("w", ps["w"].etag, f32(10 * k), f32(k), k, new_token())
            assert (await writer.commit_step("m", rec.rev, [update])).status == "applied"
            _, seen = await reader.read("m", ["w"], with_velocity=True)
            assert seen["w"].value.tolist() == [10.0 * k] and seen["w"].step == k
            assert seen["w"].velocity is not None and seen["w"].velocity.tolist() == [float(k)]
        # A value set by the other process replaces what this one cached.
        await b.put_params("m", {"w": f32(-5)}, only_create=False)
        _, seen = await a.read("m", ["w"], with_velocity=True)
        assert seen["w"].value.tolist() == [-5.0] and seen["w"].velocity is None and seen["w"].step == 0
        # Cached arrays are shared, so they are read-only.
        assert not seen["w"].value.flags.writeable
    finally:
        await a.close()
        await b.close()


def test_the_state_cache_keeps_within_its_budget() -> None:

    cache = StateCache(max_bytes=3000)
    for i in range(10):
        cache.put("m", ParamRecord(f"p{i}", np.zeros(5, np.float32), np.zeros(5, np.float32), 0, f"e{i}"))
    assert cache.bytes <= 3000 and cache.get("m", "p9", "e9") is not None and cache.get("m", "p0", "e0") is None
    assert cache.get("m", "p9", "other-etag") is None
    cache.put("m", ParamRecord("huge", np.zeros(1000, np.float32), None, 0, "e"))  # bigger than the budget
    assert cache.get("m", "huge", "e") is None
    cache.drop("m")
    assert cache.bytes == 0


def test_the_state_cache_counts_what_it_really_holds() -> None:
    """MOMENTUM_CACHE_BYTES bounds the process's memory: a tiny entry costs far more than its data."""
    import tracemalloc

    cache = StateCache(max_bytes=1 << 30)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(5_000):
        value = np.frombuffer(np.float32([i, i + 1]).tobytes(), np.float32)  # a view, as read from Redis
        cache.put("model", ParamRecord(f"layer{i}.weight", value, np.zeros(2, np.float32), 3, new_token()))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    data = 5_000 * 16
    assert used > 10 * data  # the data is the least of it
    assert 0.75 * used <= cache.bytes <= 1.5 * used, (cache.bytes, used)


def test_the_buffer_pool_recycles_and_evicts_only_free_arrays() -> None:
    from momentum_service.kernels.buffers import BufferPool

    pool = BufferPool(max_bytes=10 << 20, min_bytes=1 << 20)
    a, b = pool.empty(1 << 20, np.uint8), pool.empty(1 << 20, np.uint8)
    assert a is not b and pool.bytes == 2 << 20
    held = a.reshape(1024, 1024)  # a view keeps its base in use
    del a
    c = pool.empty(1 << 20, np.uint8)
    assert c is not held.base and c is not b and pool.bytes == 3 << 20
    del c
    again = pool.empty(1 << 20, np.uint8)  # the one freed just now
    assert pool.bytes == 3 << 20
    full = pool.empty(8 << 20, np.uint8)  # no room, and every pooled array in use: allocated plainly
    assert pool.bytes == 3 << 20 and full.nbytes == 8 << 20
    del b, full
    big = pool.empty(8 << 20, np.uint8)  # needs room: evicts the free 1 MiB array, not the ones in use
    assert pool.bytes == 10 << 20 and big.nbytes == 8 << 20
    assert held.base is not None and again.nbytes == 1 << 20
    small = pool.empty(1000, np.uint8)  # under min_bytes: not pooled
    assert pool.bytes == 10 << 20 and small.nbytes == 1000
