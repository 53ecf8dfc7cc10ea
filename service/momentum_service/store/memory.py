"""The embedded journal: nothing outlives the process.

The default when no Redis URL is configured, so the server runs with nothing else installed.
The process is the only replica and owns every model; its memory is the only copy of the state,
which is lost when the process stops. Every write succeeds at once: with the embedded journal,
both durabilities mean "applied in this process's memory".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Batch, Holder, KeyRecord, Lease, Loaded, Replica


class MemoryJournal:
    kind = "memory"
    durable = False
    replicated = False

    def __init__(self) -> None:
        self._names: set[str] = set()  # the models that exist (their state is their owners')

    async def model_names(self, after: str, limit: int) -> list[str]:
        return sorted(n for n in self._names if n > after)[:limit]

    async def wait_replicas(self, lease: Lease, model: str, replicas: int) -> None:
        raise NotImplementedError("no replicas here (replicated is False)")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def heartbeat(self, replica: Replica, ttl_ms: int) -> list[Replica]:
        return [replica]

    async def acquire(self, model: str, replica: Replica, lease_ms: int) -> Lease | Holder:
        return Lease(model, 1, replica.id)

    async def renew(self, leases: Sequence[Lease], lease_ms: int) -> list[bool]:
        return [True] * len(leases)

    async def release(self, lease: Lease) -> None:
        return None

    async def holder(self, model: str) -> Holder | None:
        return None

    async def load(self, model: str) -> Loaded | None:
        return None  # a model exists only as long as its owner, in this process

    async def create(self, lease: Lease, model: str, config: dict[str, Any], rev: str, inc: str) -> None:
        self._names.add(model)

    async def commit(self, lease: Lease, model: str, batch: Batch) -> None:
        return None

    async def delete(self, lease: Lease, model: str) -> None:
        self._names.discard(model)

    async def append_points(self, model: str, inc: str, points: Sequence[bytes], cap: int) -> None:
        return None  # the owner's series is the only copy

    async def load_points(self, model: str, inc: str, cap: int) -> list[bytes]:
        return []

    async def lookup(self, model: str, inc: str, key: str) -> KeyRecord | None:
        return None
