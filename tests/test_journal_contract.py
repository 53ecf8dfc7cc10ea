"""The journal contract, on every journal that keeps anything (the Redis one, and the in-process fake
the engine's unit tests use), and what the embedded journal promises (nothing kept, one owner)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from momentum_service.errors import Fenced, KeyTaken, StoreUnavailable
from momentum_service.store import Batch, Holder, Journal, KeyRecord, Lease, MemoryJournal, Record, Replica
from momentum_service.store.redis import RedisJournal

from .conftest import cluster_journal
from .fake_journal import FakeJournal
from .helpers import RedisProcess
from .redis_cluster import RedisCluster

A, B = Replica("replica-a", "http://a:1"), Replica("replica-b", "http://b:2")
CONFIG = {"optimizer": {"rule": "pytorch", "lr": 0.1}}


@pytest.fixture(params=["fake", "redis", "cluster"])
async def journal(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Journal]:
    j: Journal
    if request.param == "fake":
        j = FakeJournal()
    elif request.param == "cluster":
        j = cluster_journal(request.getfixturevalue("redis_cluster"), redis_prefix)
    else:
        proc: RedisProcess = request.getfixturevalue("redis_proc")
        j = RedisJournal.from_url(proc.url, prefix=redis_prefix)
    yield j
    await j.close()


async def lease_on(journal: Journal, model: str = "m", replica: Replica = A, lease_ms: int = 5000) -> Lease:
    got = await journal.acquire(model, replica, lease_ms)
    assert isinstance(got, Lease), got
    return got


def entry(n: int, size: int = 4) -> Record:
    data = np.arange(size, dtype=np.float32) + n
    return Record({"kind": "step", "n": n}, (memoryview(data).cast("B"),))


async def created(journal: Journal, model: str = "m") -> Lease:
    lease = await lease_on(journal, model)
    await journal.create(lease, model, CONFIG, "rev0", "inc0")
    return lease


# -- leases -------------------------------------------------------------------------------------


async def test_a_live_lease_is_held_and_fences_only_grow(journal: Journal) -> None:
    first = await lease_on(journal, lease_ms=300)
    other = await journal.acquire("m", B, 300)
    assert isinstance(other, Holder) and other.replica == A.id and other.url == A.url and other.fence == first.fence
    assert 0 < other.remaining_ms <= 300
    held = await journal.holder("m")
    assert held is not None and (held.replica, held.url, held.fence) == (A.id, A.url, first.fence)
    await asyncio.sleep(0.4)  # expired: another replica may take it, with a greater fence
    assert await journal.holder("m") is None
    second = await lease_on(journal, replica=B)
    assert second.fence > first.fence
    assert await journal.renew([first, second], 5000) == [False, True]  # the first is lost for good
    await journal.release(second)
    third = await lease_on(journal)  # released: taken at once
    assert third.fence > second.fence
    again = await lease_on(journal)  # the holder itself may take a new term (a rebuilt owner)
    assert again.fence > third.fence and await journal.renew([third], 5000) == [False]


async def test_heartbeats_list_the_live_replicas(journal: Journal) -> None:
    assert await journal.heartbeat(A, 300) == [A]
    assert sorted(await journal.heartbeat(B, 5000), key=lambda r: r.id) == [A, B]
    await asyncio.sleep(0.4)
    assert await journal.heartbeat(B, 5000) == [B]


# -- a model's record -------------------------------------------------------------------------------


async def test_create_then_load_an_empty_model(journal: Journal) -> None:
    assert await journal.load("m") is None
    await created(journal)
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.config == CONFIG and loaded.head.seq == 0
    assert loaded.head.inc == "inc0" and loaded.snapshot is None and loaded.log == []


async def test_entries_come_back_in_order_with_their_bytes(journal: Journal) -> None:
    lease = await created(journal)
    await journal.commit(lease, "m", Batch("inc0", 0, 2, [entry(1), entry(2)]))
    await journal.commit(lease, "m", Batch("inc0", 2, 3, [entry(3, 100_000)], config=({"x": 1}, "rev1")))
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.seq == 3
    assert loaded.head.config == {"x": 1} and loaded.head.rev == "rev1"
    assert [r.meta["n"] for r in loaded.log] == [1, 2, 3]
    for n, record in zip((1, 2, 3), loaded.log, strict=True):
        got = np.frombuffer(b"".join(bytes(b) for b in record.data), np.float32)
        assert got.tolist() == (np.arange(got.size, dtype=np.float32) + n).tolist()


async def test_a_large_batch_goes_through_a_transaction(journal: Journal) -> None:
    lease = await created(journal)
    big = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MB: staged, renamed
    record = Record({"kind": "step"}, (memoryview(big).cast("B"), memoryview(big[:10]).cast("B")))
    await journal.commit(lease, "m", Batch("inc0", 0, 1, [record]))
    loaded = await journal.load("m")
    assert loaded is not None and [bytes(b) for b in loaded.log[0].data] == [big.tobytes(), big[:10].tobytes()]


async def test_a_snapshot_drops_the_log_before_it(journal: Journal) -> None:
    lease = await created(journal)
    await journal.commit(lease, "m", Batch("inc0", 0, 3, [entry(1), entry(2), entry(3)]))
    snap = Record({"seq": 5, "what": "state"}, (b"abc", b"defg"))
    await journal.commit(lease, "m", Batch("inc0", 3, 5, snapshot=snap))  # entries 4 and 5 in it
    await journal.commit(lease, "m", Batch("inc0", 5, 6, [entry(6)]))
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.seq == 6
    assert loaded.snapshot is not None and loaded.snapshot.meta == {"seq": 5, "what": "state"}
    assert [bytes(b) for b in loaded.snapshot.data] == [b"abc", b"defg"]
    assert [r.meta["n"] for r in loaded.log] == [6]
    newer = Record({"seq": 6}, (b"x",))
    await journal.commit(lease, "m", Batch("inc0", 6, 6, snapshot=newer))  # a snapshot of the same seq
    loaded = await journal.load("m")
    assert loaded is not None and loaded.snapshot is not None and loaded.snapshot.meta == {"seq": 6}
    assert loaded.log == []


async def test_a_fenced_writer_writes_nothing(journal: Journal) -> None:
    old = await created(journal)
    new = await lease_on(journal, replica=A)  # a new term (the same replica, rebuilt)
    before = await journal.load("m")
    big = Record({"kind": "step"}, (bytes(1 << 20),))
    for batch in (Batch("inc0", 0, 1, [entry(1)]), Batch("inc0", 0, 1, [big]), Batch("inc0", 0, 1, snapshot=big)):
        with pytest.raises(Fenced):
            await journal.commit(old, "m", batch)
    with pytest.raises(Fenced):
        await journal.delete(old, "m")
    assert await journal.load("m") == before
    await journal.commit(new, "m", Batch("inc0", 0, 1, [entry(1)]))


async def test_a_batch_that_does_not_follow_the_head_writes_nothing(journal: Journal) -> None:
    lease = await created(journal)
    await journal.commit(lease, "m", Batch("inc0", 0, 1, [entry(1)]))
    with pytest.raises(Fenced):
        await journal.commit(lease, "m", Batch("inc0", 0, 2, [entry(1), entry(2)]))
    with pytest.raises(Fenced):
        await journal.commit(lease, "m", Batch("other-inc", 1, 2, [entry(2)]))
    # The same batch again (its first answer lost) finds the head at its own seq: done, not repeated.
    await journal.commit(lease, "m", Batch("inc0", 0, 1, [entry(1)]))
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.seq == 1 and len(loaded.log) == 1


async def test_idempotency_records_are_written_with_their_batch_and_expire(journal: Journal) -> None:
    lease = await created(journal)
    rec = KeyRecord("k1", "fp1", "[1,0.1]")
    await journal.commit(lease, "m", Batch("inc0", 0, 1, [entry(1)], keys=[rec], key_ttl_ms=300))
    assert await journal.lookup("m", "inc0", "k1") == rec
    assert await journal.lookup("m", "other-inc", "k1") is None
    assert await journal.lookup("m", "inc0", "k2") is None
    with pytest.raises(KeyTaken) as taken:  # the key again, in a later batch: nothing of it is written
        await journal.commit(lease, "m", Batch("inc0", 1, 2, [entry(2)], keys=[rec]))
    assert (taken.value.key, taken.value.fingerprint, taken.value.summary) == ("k1", "fp1", "[1,0.1]")
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.seq == 1
    await asyncio.sleep(0.4)
    assert await journal.lookup("m", "inc0", "k1") is None  # expired


async def test_the_models_are_listed_in_name_order_and_a_deleted_one_is_not(journal: Journal) -> None:
    leases = {name: await created(journal, name) for name in ("b", "a.x", "c-1", "a")}
    assert await journal.model_names("", 10) == ["a", "a.x", "b", "c-1"]
    assert await journal.model_names("a", 2) == ["a.x", "b"] and await journal.model_names("c-1", 10) == []
    await journal.delete(leases["b"], "b")
    assert await journal.model_names("", 10) == ["a", "a.x", "c-1"]


async def test_series_points_are_appended_capped_and_read_back(journal: Journal) -> None:
    await created(journal)
    await journal.append_points("m", "inc0", [b"1", b"2", b"3"], 4)
    await journal.append_points("m", "inc0", [b"4", b"5"], 4)
    assert await journal.load_points("m", "inc0", 4) == ([b"2", b"3", b"4", b"5"] if journal.kind == "redis" else [])


async def test_delete_makes_the_model_unknown(journal: Journal) -> None:
    lease = await created(journal)
    await journal.commit(lease, "m", Batch("inc0", 0, 1, [entry(1)], keys=[KeyRecord("k", "f", "s")]))
    await journal.delete(lease, "m")
    assert await journal.load("m") is None and await journal.lookup("m", "inc0", "k") is None
    await journal.create(lease, "m", CONFIG, "rev", "inc1")  # a new incarnation starts empty
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.inc == "inc1" and loaded.log == []


async def test_create_never_overwrites(journal: Journal) -> None:
    lease = await created(journal)
    with pytest.raises(Fenced):
        await journal.create(lease, "m", {"other": 1}, "rev", "inc1")
    loaded = await journal.load("m")
    assert loaded is not None and loaded.head.config == CONFIG


# -- Redis only -----------------------------------------------------------------------------------


async def test_redis_keys_stay_under_the_prefix_and_the_models_tag(redis_proc: RedisProcess, redis_prefix: str) -> None:
    journal = RedisJournal.from_url(redis_proc.url, prefix=redis_prefix)
    client = redis_proc.client()
    try:
        await journal.heartbeat(A, 5000)
        lease = await created(journal)
        big = Record({"kind": "step"}, (bytes(1 << 19),))
        await journal.commit(lease, "m", Batch("inc0", 0, 2, [entry(1), big], keys=[KeyRecord("k", "f", "s")]))
        await journal.commit(lease, "m", Batch("inc0", 2, 3, snapshot=Record({"seq": 3}, (b"s",))))
        keys = sorted(k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*"))
        index = f"{redis_prefix}:{{models}}:index"  # the names of the models (GET /v1/models)
        assert all(k.startswith(f"{redis_prefix}:{{m}}:") or "{replicas}" in k or k == index for k in keys), keys
        assert not any(":stage:" in k for k in keys), "a staged buffer outlived its transaction"
        assert not any(":log:" in k for k in keys), "the snapshot dropped the log"
    finally:
        client.close()
        await journal.close()


# -- the embedded journal ---------------------------------------------------------------------------


async def test_the_embedded_journal_keeps_nothing_and_one_replica_owns_all() -> None:
    journal = MemoryJournal()
    assert not journal.durable
    lease = await journal.acquire("m", A, 1)
    assert isinstance(lease, Lease) and isinstance(await journal.acquire("m", B, 1), Lease)
    await journal.create(lease, "m", CONFIG, "rev", "inc")
    await journal.commit(lease, "m", Batch("inc", 0, 1, [entry(1)]))
    assert await journal.load("m") is None and await journal.holder("m") is None
    assert await journal.lookup("m", "inc", "k") is None
    assert await journal.renew([lease], 1) == [True]


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


# -- replicated durability (Redis WAIT) ---------------------------------------------------------


@pytest.mark.parametrize("big", [False, True], ids=["inline", "transaction"])
async def test_a_batch_asking_for_replicas_is_on_the_replica_when_commit_returns(
    redis_cluster: RedisCluster, redis_prefix: str, big: bool
) -> None:
    journal = cluster_journal(redis_cluster, redis_prefix)
    try:
        lease = await created(journal)
        data = np.arange((1 << 18) if big else 4, dtype=np.float32)
        record = Record({"kind": "step"}, (memoryview(data).cast("B"),))
        await journal.commit(lease, "m", Batch("inc0", 0, 1, [record], replicas=1))
        # Read the replica itself (READONLY), at once: the entry is there, not on its way.
        primary = redis_cluster.node_of(journal.keys.model("m"))
        replica = redis_cluster.replica_of(primary)
        client = replica.client()
        try:
            client.execute_command("READONLY")
            assert client.hget(journal.keys.model("m"), "seq") == b"1"
            assert client.get(journal.keys.log("m", "inc0", 1, 0)) == data.tobytes()
        finally:
            client.close()
    finally:
        await journal.close()


async def test_a_batch_asking_for_more_replicas_than_confirm_is_a_503_but_is_written(
    redis_cluster: RedisCluster, redis_proc: RedisProcess, redis_prefix: str
) -> None:
    """Each primary has one replica (and the single Redis none): asking for one more is refused as unavailable
    (the client retries with the same key), though the batch is on the primary (and replays)."""
    for journal, replicas in (
        (cluster_journal(redis_cluster, redis_prefix), 2),
        (RedisJournal.from_url(redis_proc.url, prefix=redis_prefix, timeout=0.4), 1),
    ):
        try:
            lease = await created(journal)
            with pytest.raises(StoreUnavailable, match=f"only 0 of the {replicas} replicas|only 1 of the 2 replicas"):
                await journal.commit(lease, "m", Batch("inc0", 0, 1, [entry(1)], replicas=replicas))
            loaded = await journal.load("m")
            assert loaded is not None and loaded.head.seq == 1
        finally:
            await journal.close()


async def test_a_connection_closed_under_a_command_is_a_503_and_a_bug_of_ours_is_not() -> None:
    """redis-py's asyncio cluster client can use a connection another task is closing (its transport or writer
    gone: AttributeError, RuntimeError): an outage, 503. The same error types raised by our own code propagate."""
    from momentum_service.store.redis import _guard

    inside_redis = compile("None.writelines([])", "/x/site-packages/redis/asyncio/connection.py", "exec")
    with pytest.raises(StoreUnavailable, match="connection closed under a command"):
        async with _guard():
            exec(inside_redis, {})
    with pytest.raises(AttributeError):
        async with _guard():
            exec(compile("None.writelines([])", __file__, "exec"), {})
