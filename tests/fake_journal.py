"""A durable journal in a dict: the contract of :class:`~momentum_service.store.Journal`, kept in this
process, so that the engine's pieces can be tested alone (and fast) with a journal that remembers.

It checks what the Redis journal checks (fencing, the head's seq, idempotency keys) and can be told
to fail: ``fail_next`` raises the given error from the next commits, before anything is written.
``hold``, when set to an unset :class:`asyncio.Event`, keeps the next commits waiting until it is set
(a slow write), and ``commit_times`` records when each commit returned (the loop's time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from momentum_service.errors import Fenced, KeyTaken
from momentum_service.store import Batch, Head, Holder, KeyRecord, Lease, Loaded, Record, Replica


@dataclass
class _Model:
    head: Head
    log: dict[int, Record] = field(default_factory=dict)
    snapshot: Record | None = None
    keys: dict[str, tuple[KeyRecord, float]] = field(default_factory=dict)


@dataclass
class _Lease:
    replica: str
    url: str
    fence: int
    until: float


class FakeJournal:
    kind = "fake"
    durable = True
    replicated = False

    def __init__(self) -> None:
        self.models: dict[str, _Model] = {}
        self.leases: dict[str, _Lease] = {}
        self.replicas: dict[str, tuple[str, float]] = {}
        self.commits: list[Batch] = []
        self.fail_next: list[BaseException] = []
        self.hold: asyncio.Event | None = None
        self.commit_times: list[float] = []
        self.lookups = 0

    async def wait_replicas(self, lease: Lease, model: str, replicas: int) -> None:
        raise NotImplementedError("no replicas here (replicated is False)")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def heartbeat(self, replica: Replica, ttl_ms: int) -> list[Replica]:
        now = time.monotonic()
        self.replicas[replica.id] = (replica.url, now + ttl_ms / 1000)
        return [Replica(i, u) for i, (u, until) in self.replicas.items() if until > now]

    async def acquire(self, model: str, replica: Replica, lease_ms: int) -> Lease | Holder:
        now = time.monotonic()
        cur = self.leases.get(model)
        if cur is not None and cur.replica != replica.id and cur.until > now:
            return Holder(cur.replica, cur.url, cur.fence, int((cur.until - now) * 1000))
        fence = (cur.fence if cur is not None else 0) + 1
        self.leases[model] = _Lease(replica.id, replica.url, fence, now + lease_ms / 1000)
        return Lease(model, fence, replica.id)

    async def renew(self, leases: Sequence[Lease], lease_ms: int) -> list[bool]:
        out = []
        for lease in leases:
            cur = self.leases.get(lease.model)
            ok = cur is not None and cur.fence == lease.fence and cur.replica == lease.replica
            if ok and cur is not None:
                cur.until = time.monotonic() + lease_ms / 1000
            out.append(ok)
        return out

    async def release(self, lease: Lease) -> None:
        cur = self.leases.get(lease.model)
        if cur is not None and cur.fence == lease.fence:
            cur.until = 0.0

    async def holder(self, model: str) -> Holder | None:
        cur = self.leases.get(model)
        now = time.monotonic()
        if cur is None or cur.until <= now:
            return None
        return Holder(cur.replica, cur.url, cur.fence, int((cur.until - now) * 1000))

    def _fenced(self, lease: Lease) -> bool:
        cur = self.leases.get(lease.model)
        return cur is None or cur.fence != lease.fence

    async def append_points(self, model: str, inc: str, points: Sequence[bytes], cap: int) -> None:
        return None

    async def load_points(self, model: str, inc: str, cap: int) -> list[bytes]:
        return []

    async def model_names(self, after: str, limit: int) -> list[str]:
        return sorted(n for n in self.models if n > after)[:limit]

    async def load(self, model: str) -> Loaded | None:
        m = self.models.get(model)
        if m is None:
            return None
        first = 1 if m.snapshot is None else int(m.snapshot.meta["seq"]) + 1
        return Loaded(m.head, m.snapshot, [m.log[s] for s in range(first, m.head.seq + 1)])

    async def create(self, lease: Lease, model: str, config: dict[str, Any], rev: str, inc: str) -> None:
        if self._fenced(lease) or model in self.models:
            raise Fenced("fenced")
        self.models[model] = _Model(Head(config, rev, inc, 0))

    async def commit(self, lease: Lease, model: str, batch: Batch) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self._commit(lease, model, batch)
        self.commit_times.append(asyncio.get_running_loop().time())

    def _commit(self, lease: Lease, model: str, batch: Batch) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)
        m = self.models.get(model)
        if self._fenced(lease) or m is None or m.head.inc != batch.inc:
            raise Fenced("fenced")
        if m.head.seq != batch.base_seq:
            if m.head.seq == batch.seq:
                return
            raise Fenced(f"head at {m.head.seq}, not {batch.base_seq}")
        now = time.monotonic()
        for rec in batch.keys:
            found = m.keys.get(rec.key)
            if found is not None and found[1] > now:
                raise KeyTaken(rec.key, found[0].fingerprint, found[0].summary)
        for i, record in enumerate(batch.entries):
            m.log[batch.base_seq + 1 + i] = Record(record.meta, tuple(bytes(b) for b in record.data))
        if batch.snapshot is not None:
            m.snapshot = Record({**batch.snapshot.meta}, tuple(bytes(b) for b in batch.snapshot.data))
            for s in [s for s in m.log if s <= batch.seq]:
                del m.log[s]
        config, rev = batch.config if batch.config is not None else (m.head.config, m.head.rev)
        m.head = Head(config, rev, m.head.inc, batch.seq)
        for rec in batch.keys:
            m.keys[rec.key] = (rec, now + batch.key_ttl_ms / 1000)
        self.commits.append(batch)

    async def delete(self, lease: Lease, model: str) -> None:
        if self._fenced(lease):
            raise Fenced("fenced")
        self.models.pop(model, None)

    async def lookup(self, model: str, inc: str, key: str) -> KeyRecord | None:
        self.lookups += 1
        m = self.models.get(model)
        if m is None or m.head.inc != inc:
            return None
        found = m.keys.get(key)
        return found[0] if found is not None and found[1] > time.monotonic() else None
