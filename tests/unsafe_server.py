"""A deliberately broken server, for the negative controls of the tests only.

Usage: python -m tests.unsafe_server no-fencing|no-dedup serve [options]

- ``no-fencing``: every replica takes every model (no lease is held against another) and its
  writes land whatever happened meanwhile (no fencing token, no check of the head's seq): what a
  parameter server without leases and fences would do.
- ``no-dedup``: the idempotency records are not written with the steps (nor looked up), so a
  retry that reaches another owner cannot know the step was applied.

Nothing in the package can run this way: the switches are monkeypatches made here.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from momentum_service.cli import main
from momentum_service.engine.cluster import Cluster
from momentum_service.store import Batch, Holder, KeyRecord, Lease, Record, Replica
from momentum_service.store.redis import RedisJournal

_commit = RedisJournal.commit
_acquire = RedisJournal.acquire


async def _current(journal: RedisJournal, model: str, replica: str) -> Lease:
    fence = await journal._redis.hget(journal.keys.lease(model), "fence")
    return Lease(model, int(fence), replica)


async def unfenced_acquire(self: RedisJournal, model: str, replica: Replica, lease_ms: int) -> Lease | Holder:
    if await self._redis.hget(self.keys.lease(model), "fence") is None:
        return await _acquire(self, model, replica, lease_ms)
    return await _current(self, model, replica.id)


async def unfenced_commit(self: RedisJournal, lease: Lease, model: str, batch: Batch) -> None:
    seq = await self._redis.hget(self.keys.model(model), "seq")
    head = int(seq) if seq is not None else batch.base_seq
    moved = dataclasses.replace(batch, base_seq=head, seq=batch.seq + head - batch.base_seq)
    await _commit(self, await _current(self, model, lease.replica), model, moved)


async def no_holder(self: RedisJournal, model: str) -> Holder | None:
    return None


async def always_renewed(self: RedisJournal, leases: Any, lease_ms: int) -> list[bool]:
    return [True] * len(leases)


async def undeduplicated_commit(self: RedisJournal, lease: Lease, model: str, batch: Batch) -> None:
    """Neither the records nor the keys in the log entries (which a rebuilt owner would remember)."""
    entries = [Record({k: v for k, v in r.meta.items() if k not in ("key", "fp")}, r.data) for r in batch.entries]
    await _commit(self, lease, model, dataclasses.replace(batch, keys=(), entries=entries))


async def nothing_found(self: RedisJournal, model: str, inc: str, key: str) -> KeyRecord | None:
    return None


if __name__ == "__main__":
    mode = sys.argv.pop(1)
    if mode == "no-fencing":
        RedisJournal.acquire = unfenced_acquire  # type: ignore[method-assign]
        RedisJournal.commit = unfenced_commit  # type: ignore[method-assign]
        RedisJournal.holder = no_holder  # type: ignore[method-assign]
        RedisJournal.renew = always_renewed  # type: ignore[method-assign]
        Cluster.preferred = lambda self, model: self.me  # type: ignore[method-assign]
    elif mode == "no-dedup":
        RedisJournal.commit = undeduplicated_commit  # type: ignore[method-assign]
        RedisJournal.lookup = nothing_found  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.exit(main())
