"""The engine's pieces over a journal that remembers (``FakeJournal``): rebuilds, durability, group
commit, snapshots, fencing and failures, each without HTTP or Redis (the same over Redis is in
``test_failover.py``, with real processes)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest
from momentum_service.config import ModelConfig
from momentum_service.engine import (
    EngineOptions,
    Idempotency,
    ModelOwner,
    ParameterServer,
    RawTensors,
    StepPending,
    TensorSpec,
)
from momentum_service.engine.idempotency import Guard
from momentum_service.engine.modes import Push, check_push
from momentum_service.engine.state import compute_step
from momentum_service.engine.sync import SyncCoordinator
from momentum_service.engine.writer import SnapshotPolicy
from momentum_service.errors import (
    IdempotencyInFlight,
    IdempotencyKeyReused,
    OwnerLost,
    StaleGradient,
    StepMismatch,
    StoreFull,
    StoreUnavailable,
)
from momentum_service.kernels import rule_from_dict, schedule_from_dict
from momentum_service.kernels.schedules import LRTable
from momentum_service.store import KeyRecord, Lease, MemoryJournal, Replica

from .fake_journal import FakeJournal

RULES = [
    {"rule": "pytorch", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"rule": "pytorch", "lr": 0.05, "momentum": 0.5, "dampening": 0.25, "maximize": True},
    {"rule": "keras", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.001},
    {"rule": "tf1", "lr": 0.05, "momentum": 0.9},
    {"rule": "ema", "lr": 0.05, "momentum": 0.9},
    {"rule": "previous_delta", "lr": 0.05, "momentum": 0.5},
]
SCHEDULES = [
    None,
    {"type": "step", "step_size": 7, "gamma": 0.5},
    {
        "type": "sequential",
        "schedulers": [{"type": "linear", "total_iters": 5}, {"type": "cosine", "T_max": 20}],
        "milestones": [6],
    },
]


def server(journal: FakeJournal, *, ratio: float = 4.0, min_log: int = 1 << 20, **options: Any) -> ParameterServer:
    policy = SnapshotPolicy(ratio=ratio, min_log_bytes=min_log)
    return ParameterServer(journal, lease_ms=60_000, options=EngineOptions(snapshots=policy, **options))


def state_of(owner: ModelOwner) -> dict[str, tuple[int, bytes, dict[str, bytes]]]:
    assert owner.state is not None
    return {
        n: (p.step, p.value.tobytes(), {b: a.tobytes() for b, a in p.state.items()})
        for n, p in owner.state.params.items()
    }


def half(g: np.ndarray) -> tuple[np.ndarray, RawTensors]:
    """A gradient sent as float16, as the codec gives it: widened for the kernel, and the bytes as received."""
    h = g.astype(np.float16)
    raw = RawTensors(memoryview(h.tobytes()), (TensorSpec("w", "F16", h.shape, 0, h.nbytes),))
    return h.astype(np.float32), raw


async def handover(journal: FakeJournal, model: str) -> ParameterServer:
    """A new process takes the model over (the old one's lease is released, as at shutdown)."""
    lease = journal.leases[model]
    await journal.release(Lease(model, lease.fence, lease.replica))
    return server(journal)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["constant", "step", "sequential"])
@pytest.mark.parametrize("optimizer", RULES, ids=lambda o: o["rule"] + ("-" + "-".join(sorted(o)[:2])))
async def test_a_rebuild_is_bitwise_the_state_it_replaces(optimizer: dict[str, Any], schedule: Any, dtype: Any) -> None:
    """Snapshots and log replay, through every rule and schedule: the rebuilt state is the live one, bit
    for bit; rebuilding again (a crash during a rebuild) changes nothing."""
    journal = FakeJournal()
    live = server(journal, ratio=1.5, min_log=0)  # a snapshot every few steps: some rebuilds start from one
    config = ModelConfig.build(optimizer, schedule)
    await live.put_model("m", config)
    rng = np.random.default_rng(7)
    await live.put_params(
        "m", {"w": rng.standard_normal(33).astype(dtype), "b": rng.standard_normal(2).astype(dtype)}, only_create=False
    )
    for k in range(40):
        grads = {"w": rng.standard_normal(33).astype(dtype)}
        received = None
        if dtype is np.float32 and k % 3 == 0:
            grads["w"], received = half(grads["w"])  # logged at half the bytes
        if k % 4 == 0:
            grads["b"] = rng.standard_normal(2).astype(dtype)
            received = None
        key = Idempotency(f"k{k}", "fp", fresh=True) if k % 2 else None
        await live.step("m", grads, received=received, idempotency=key)
        if k == 20:
            await live.patch_model("m", {"lr": 0.02})
    original = state_of(live.owners["m"])
    assert any(b.snapshot is not None for b in journal.commits) and any(b.entries for b in journal.commits)
    for _ in range(2):
        rebuilt = await handover(journal, "m")
        owner = await rebuilt.owner("m")
        assert state_of(owner) == original
        assert owner.state is not None and owner.state.config.rule.lr == 0.02
    # ...and the rebuilt owner steps on exactly as the original would have (its memory, still here).
    g = {"w": rng.standard_normal(33).astype(dtype)}
    old = live.owners["m"].state
    assert old is not None
    lr = LRTable().lr(old.config.schedule, old.config.rule.lr, old.params["w"].step)
    expected = compute_step(old.config.rule, old.params, g, {"w": lr})["w"]
    got = await rebuilt.step("m", g)
    assert isinstance(got, dict) and got["w"].value is not None
    assert got["w"].value.tobytes() == expected.value.tobytes() and got["w"].step == expected.step


async def test_a_rebuilt_owner_remembers_the_keys_of_the_log() -> None:
    journal = FakeJournal()
    live = server(journal)
    await live.put_model("m", ModelConfig.build({"lr": 0.1}))
    await live.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    first = await live.step("m", {"w": np.ones(3, np.float32)}, idempotency=Idempotency("k", "fp", fresh=True))
    rebuilt = await handover(journal, "m")
    again = await rebuilt.step("m", {"w": np.ones(3, np.float32)}, idempotency=Idempotency("k", "fp"))
    assert isinstance(first, dict) and isinstance(again, dict)
    assert again["w"].replayed and again["w"].step == first["w"].step == 1
    assert journal.lookups == 0  # known from the replayed log: no lookup needed
    with pytest.raises(IdempotencyKeyReused):
        await rebuilt.step("m", {"w": np.ones(3, np.float32)}, idempotency=Idempotency("k", "other"))


async def test_steps_in_flight_share_a_write_group_commit() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1, "momentum": 0.9}))
    await srv.put_params("m", {"w": np.zeros(1000, np.float32)}, only_create=False)
    before = len(journal.commits)
    results = await asyncio.gather(*(srv.step("m", {"w": np.full(1000, i, np.float32)}) for i in range(50)))
    steps = sorted(r["w"].step for r in results if isinstance(r, dict))
    assert steps == list(range(1, 51))
    batches = journal.commits[before:]
    assert sum(b.seq - b.base_seq for b in batches) == 50 and len(batches) < 10, len(batches)
    assert journal.models["m"].head.seq == srv.owners["m"].writer.durable_seq  # type: ignore[union-attr]


async def test_flush_ms_answers_from_memory_and_writes_within_the_period() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 50}))
    await srv.put_params("m", {"w": np.zeros(4, np.float32)}, only_create=False)
    seq0 = journal.models["m"].head.seq
    for _ in range(5):
        await srv.step("m", {"w": np.ones(4, np.float32)})
    assert journal.models["m"].head.seq == seq0  # answered, not written yet
    await asyncio.sleep(0.1)
    assert journal.models["m"].head.seq == seq0 + 5
    assert len(journal.commits) == 2 + 0 or journal.commits[-1].seq - journal.commits[-1].base_seq == 5
    # Many steps per flush: the state (8 bytes x 2) is smaller than their log, so a snapshot is written.
    assert journal.commits[-1].snapshot is not None and not journal.commits[-1].entries


async def test_flush_ms_counts_from_the_oldest_change_so_a_slow_write_does_not_add_to_the_next() -> None:
    """A step queued while a write is slow is written when that write ends, if its ``flush_ms`` has
    passed by then, not ``flush_ms`` after it (which would let a crash lose it for longer)."""
    flush_ms = 400
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": flush_ms}))
    await srv.put_params("m", {"w": np.zeros(4, np.float32)}, only_create=False)
    loop = asyncio.get_running_loop()
    seq0, commits0 = journal.models["m"].head.seq, len(journal.commit_times)
    journal.hold = asyncio.Event()  # the next writes wait until it is set
    await srv.step("m", {"w": np.ones(4, np.float32)})
    await asyncio.sleep(flush_ms / 1000 + 0.05)  # its flush has started and is held
    await srv.step("m", {"w": np.ones(4, np.float32)})  # queued during the slow write
    queued = loop.time()
    await asyncio.sleep(flush_ms / 1000 + 0.05)  # the second step's flush_ms passes during the write
    journal.hold.set()
    released = loop.time()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if journal.models["m"].head.seq == seq0 + 2:
            break
    assert journal.models["m"].head.seq == seq0 + 2
    second = journal.commit_times[commits0 + 1]
    assert second - queued > flush_ms / 1000  # (not written early either)
    assert second - released < flush_ms / 2000, f"written {second - released:.3f} s after the slow write ended"


async def test_a_lost_lease_ends_the_owner_and_nothing_more_is_written() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}))
    await srv.put_params("m", {"w": np.zeros(2, np.float32)}, only_create=False)
    await srv.step("m", {"w": np.ones(2, np.float32)})
    lease = journal.leases["m"]
    lease.until = 0.0  # expired (the owner was paused), and another replica took the model
    other = await journal.acquire("m", Replica("other", "http://other"), 60_000)
    assert isinstance(other, Lease)
    seq = journal.models["m"].head.seq
    with pytest.raises(OwnerLost):
        await srv.step("m", {"w": np.ones(2, np.float32)})
    assert journal.models["m"].head.seq == seq and srv.owners["m"].lost is not None


@pytest.mark.parametrize("failure", [StoreUnavailable("down"), StoreFull("full")])
async def test_with_step_durability_a_failed_write_fails_the_step_and_the_owner_is_rebuilt(
    failure: Exception,
) -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}))
    await srv.put_params("m", {"w": np.zeros(2, np.float32)}, only_create=False)
    await srv.step("m", {"w": np.ones(2, np.float32)})
    journal.fail_next = [failure]
    with pytest.raises(type(failure)):
        await srv.step("m", {"w": np.ones(2, np.float32)})
    assert srv.owners["m"].lost is not None
    params = await srv.get_params("m", None, with_state=False)  # a new owner, from the journal
    assert params["w"].step == 1 and params["w"].value.tolist() == np.float32([-0.1, -0.1]).tolist()
    r = await srv.step("m", {"w": np.ones(2, np.float32)})
    assert isinstance(r, dict) and r["w"].step == 2


async def test_with_flush_ms_a_failed_write_is_retried_until_it_lands() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 10}))
    await srv.put_params("m", {"w": np.zeros(2, np.float32)}, only_create=False)
    journal.fail_next = [StoreUnavailable("down"), StoreFull("full"), StoreUnavailable("down")]
    for _ in range(3):
        await srv.step("m", {"w": np.ones(2, np.float32)})
    for _ in range(100):
        await asyncio.sleep(0.05)
        if journal.models["m"].head.seq == 4:
            break
    assert journal.models["m"].head.seq == 4 and srv.owners["m"].lost is None and not journal.fail_next


async def test_a_key_an_earlier_owner_applied_is_never_applied_again() -> None:
    journal = FakeJournal()
    first = server(journal)
    await first.put_model("m", ModelConfig.build({"lr": 1.0}))
    await first.put_params("m", {"w": np.zeros(1, np.float32)}, only_create=False)
    await first.step("m", {"w": np.ones(1, np.float32)}, idempotency=Idempotency("k", "fp", fresh=True))
    # Snapshot it (the log with the key is gone: only the journal's record knows it).
    owner = first.owners["m"]
    assert owner.writer is not None and owner.state is not None
    await journal.commit(journal_lease(journal), "m", snapshot_batch(owner))
    second = await handover(journal, "m")
    replay = await second.step("m", {"w": np.ones(1, np.float32)}, idempotency=Idempotency("k", "fp"))
    assert isinstance(replay, dict) and replay["w"].replayed and journal.lookups == 1
    # A client that wrongly says its key is fresh: the journal refuses the batch, nothing is applied.
    third = await handover(journal, "m")
    with pytest.raises(OwnerLost):
        await third.step("m", {"w": np.ones(1, np.float32)}, idempotency=Idempotency("k", "fp", fresh=True))
    params = await third.get_params("m", None, with_state=False)
    assert params["w"].value.tolist() == [-1.0] and params["w"].step == 1


def journal_lease(journal: FakeJournal) -> Lease:
    cur = journal.leases["m"]
    return Lease("m", cur.fence, cur.replica)


def snapshot_batch(owner: ModelOwner) -> Any:
    from momentum_service.engine.snapshots import to_snapshot
    from momentum_service.store import Batch

    assert owner.state is not None
    return Batch(owner.state.inc, owner.state.seq, owner.state.seq, snapshot=to_snapshot(owner.state))


# -- the pieces alone ----------------------------------------------------------------------------------


async def test_the_guard_holds_a_key_once_and_replays_it() -> None:
    found: dict[str, KeyRecord] = {"old": KeyRecord("old", "fp", "[3,0.1]")}
    asked: list[str] = []

    async def lookup(key: str) -> KeyRecord | None:
        asked.append(key)
        return found.get(key)

    guard = Guard(60, max_keys=2, lookup=lookup)
    assert await guard.begin(Idempotency("a", "fp")) is None
    with pytest.raises(IdempotencyInFlight):
        await guard.begin(Idempotency("a", "fp"))
    guard.finish(KeyRecord("a", "fp", "[1,0.1]"))
    assert await guard.begin(Idempotency("a", "fp")) == KeyRecord("a", "fp", "[1,0.1]")
    with pytest.raises(IdempotencyKeyReused):
        await guard.begin(Idempotency("a", "other"))
    assert await guard.begin(Idempotency("old", "fp")) == found["old"]  # looked up: an earlier owner's
    assert await guard.begin(Idempotency("fresh", "fp", fresh=True)) is None and "fresh" not in asked
    guard.abandon("fresh")
    assert await guard.begin(Idempotency("fresh", "fp", fresh=True)) is None  # free again
    guard.finish(KeyRecord("b", "fp", "x"))
    guard.finish(KeyRecord("c", "fp", "x"))
    assert len(guard) == 2  # the least recently used first out


def test_the_guard_forgets_expired_keys() -> None:
    now = [0.0]
    guard = Guard(10, clock=lambda: now[0])
    guard.finish(KeyRecord("a", "fp", "s"))
    now[0] = 11.0
    assert asyncio.run(guard.begin(Idempotency("a", "fp"))) is None


async def test_sync_rounds_count_each_worker_once_and_average_in_worker_order() -> None:
    sync = SyncCoordinator()
    big, one = np.float32([2.0**24]), np.float32([1.0])
    sync.contribute(0, 2, {"w": big})
    sync.contribute(0, 0, {"w": one})
    sync.contribute(0, 0, {"w": np.float32([9.0])})  # a repeat: not counted, not averaged
    assert sync.counts(0, ["w"], 3) == {"w": 2} and not sync.complete(0, ["w"], 3)
    sync.contribute(0, 1, {"w": one})
    assert sync.complete(0, ["w"], 3)
    assert sync.means(0, ["w"], 3)["w"][0] == np.float32((2.0**24 + 2) / 3)  # (1 + 1) + 2^24: in worker order


def test_modes_refuse_what_they_must() -> None:
    bounded = ModelConfig.build({"lr": 0.1}, mode={"mode": "bounded", "max_staleness": 2})
    check_push("m", bounded, {"w": 5}, Push(base_step=3))
    with pytest.raises(StaleGradient):
        check_push("m", bounded, {"w": 6}, Push(base_step=3))
    with pytest.raises(StaleGradient):
        check_push("m", bounded, {"w": 2}, Push(base_step=3))  # ahead
    with pytest.raises(StepMismatch):
        check_push("m", ModelConfig.build({"lr": 0.1}), {"w": 2}, Push(expected_steps={"w": 1}))


def test_the_kernels_state_is_named_buffers() -> None:
    for optimizer in RULES:
        rule = rule_from_dict(dict(optimizer))
        value, state = rule.apply(np.ones(3), {}, np.ones(3), 0.1)
        assert set(state) <= set(rule.buffers) and rule.buffers == ("velocity",)
        _, state2 = rule.apply(value, state, np.ones(3), 0.1)
        assert set(state2) == set(rule.buffers)
    assert LRTable().lr(schedule_from_dict({"type": "step", "step_size": 1, "gamma": 0.5}), 1.0, 2) == 0.25
    _ = uuid


async def test_an_idle_model_is_handed_back_written_and_taken_again_from_the_journal() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1, "momentum": 0.9}, durability={"flush_ms": 60_000}))
    await srv.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    for _ in range(3):  # acknowledged from memory: nothing of them written yet (a 60 s flush)
        await srv.step("m", {"w": np.ones(3, np.float32)}, idempotency=Idempotency(uuid.uuid4().hex, "fp", fresh=True))
    before = state_of(srv.owners["m"])
    assert await srv.sweep(idle_s=3600) == []  # used just now: kept
    assert await srv.sweep(idle_s=0) == ["m"]
    assert "m" not in srv.owners and await journal.holder("m") is None  # written, released, forgotten
    taken = await server(journal).owner("m")  # any replica takes it: rebuilt as it was
    assert state_of(taken) == before


async def test_a_step_during_a_hand_back_waits_for_it_and_is_never_acknowledged_then_dropped() -> None:
    """A ``flush_ms`` step that came while the owner drained its queue before a hand-back used to be
    acknowledged from memory and dropped with it. Now the owner takes no change once the hand-back
    starts: the step waits, and the model's next owner applies it."""
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 60_000}))
    await srv.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    for _ in range(3):
        await srv.step("m", {"w": np.ones(3, np.float32)})
    old = srv.owners["m"]
    journal.hold = asyncio.Event()  # the drain's write waits
    sweep = asyncio.ensure_future(srv.sweep(idle_s=0))
    await asyncio.sleep(0.05)
    assert old.closing and not old.usable
    with pytest.raises(OwnerLost):  # a step already inside the old owner is refused (a 503: retried)
        await old.step({"w": np.ones(3, np.float32)}, None, Push(None, None, None), None, None)
    late = asyncio.ensure_future(srv.step("m", {"w": np.ones(3, np.float32)}))
    await asyncio.sleep(0.05)
    assert not late.done()  # waiting for the hand-back
    journal.hold.set()
    assert await sweep == ["m"]
    result = await late
    assert isinstance(result, dict) and result["w"].step == 4
    assert srv.owners["m"] is not old  # taken again from the journal, with the 3 steps drained
    assert (await srv.get_params("m", None, with_state=False))["w"].step == 4


async def test_a_hand_back_waits_for_the_write_in_flight() -> None:
    """The last steps may be in a write still in flight with nothing left queued: the drain waits for
    that write (it used to return at once, and the write was cancelled with the owner)."""
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 20}))
    await srv.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    journal.hold = asyncio.Event()
    for _ in range(2):
        await srv.step("m", {"w": np.ones(3, np.float32)})
    await asyncio.sleep(0.1)  # their write has started, and is held
    writer = srv.owners["m"].writer
    assert writer is not None and writer.pending_bytes == 0 and writer.durable_seq < srv.owners["m"].state.seq  # type: ignore[union-attr]
    sweep = asyncio.ensure_future(srv.sweep(idle_s=0))
    await asyncio.sleep(0.05)
    assert not sweep.done()  # waiting for the write
    journal.hold.set()
    assert await sweep == ["m"]
    assert (await srv.get_params("m", None, with_state=False))["w"].step == 2


async def test_a_hand_back_that_does_not_happen_leaves_the_owner_serving() -> None:
    journal = FakeJournal()
    srv = server(journal)
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 60_000}))
    await srv.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    await srv.step("m", {"w": np.ones(3, np.float32)})
    owner = srv.owners["m"]
    answers = iter([True, False])  # still to be handed back before the drain, no longer after it
    assert not await srv._hand_back("m", owner, "test", lambda: next(answers))
    assert srv.owners["m"] is owner and owner.usable and not owner.closing
    result = await srv.step("m", {"w": np.ones(3, np.float32)})
    assert isinstance(result, dict) and result["w"].step == 2


@pytest.mark.parametrize("durable", [True, False], ids=["journal", "embedded"])
async def test_a_server_stopped_and_started_again_serves_its_models(durable: bool) -> None:
    """``close`` (the app's shutdown) writes what the owners hold; started again in the same process (an
    app entered twice), the server serves on: the embedded store's owners are the only copy and stay,
    and a journal's models are taken again from it."""
    journal = FakeJournal() if durable else MemoryJournal()
    srv = server(journal) if durable else ParameterServer(journal)  # type: ignore[arg-type]
    await srv.start()
    await srv.put_model("m", ModelConfig.build({"lr": 0.1}, durability={"flush_ms": 60_000} if durable else None))
    await srv.put_params("m", {"w": np.zeros(3, np.float32)}, only_create=False)
    await srv.step("m", {"w": np.ones(3, np.float32)})
    await srv.close()
    await srv.start()
    try:
        result = await srv.step("m", {"w": np.ones(3, np.float32)})
        assert isinstance(result, dict) and result["w"].step == 2
    finally:
        await srv.close()


async def test_no_hand_back_while_sync_contributions_wait_nor_with_the_embedded_store() -> None:
    journal = FakeJournal()
    srv = server(journal, sync_timeout_s=0.01)
    await srv.put_model("s", ModelConfig.build({"lr": 0.1}, mode={"mode": "sync", "workers": 2}))
    await srv.put_params("s", {"w": np.zeros(2, np.float32)}, only_create=False)
    pending = await srv.step("s", {"w": np.ones(2, np.float32)}, worker_id=0, base_step=0)
    assert isinstance(pending, StepPending)
    assert await srv.sweep(idle_s=0) == []  # worker 0's contribution lives in memory only
    embedded = ParameterServer(MemoryJournal())
    await embedded.put_model("m", ModelConfig.build({"lr": 0.1}))
    assert await embedded.sweep(idle_s=0) == [] and "m" in embedded.owners
