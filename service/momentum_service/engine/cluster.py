"""Which server process owns which model: replicas, leases and their renewal.

Every replica registers itself (a random id and the URL the others reach it at) with a
heartbeat, and sees the live replicas. A model nobody holds is taken by the replica that
*rendezvous hashing* prefers for it among the live ones (the highest hash of replica and model),
so models spread over the replicas, and each replica computes the same preference without
talking to the others; a request that reaches another replica is forwarded there.

A replica that takes a model holds a lease with a fencing token; it renews all its leases every
third of the lease period, and trusts a lease only until ``lease_ms`` (less a safety margin)
after it *sent* the last successful renewal, by its own monotonic clock. A lease that could not
be renewed in time stops its owner from answering (the journal would refuse its writes anyway);
a lease found lost ends its owner.

The embedded journal has a single replica that owns everything; nothing is renewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from ..store.base import Holder, Journal, Lease, Replica
from . import shards

log = logging.getLogger("momentum_service")

__all__ = ["Cluster", "LeaseHandle", "rendezvous"]

SAFETY = 0.8
"""A lease is trusted for this fraction of its period after the renewal that extended it was sent."""


def rendezvous(replicas: list[Replica], model: str) -> Replica:
    """The replica that should own ``model``: the highest hash of (replica id, model)."""
    return max(replicas, key=lambda r: (xxhash.xxh3_64_intdigest(f"{r.id}\x00{model}".encode()), r.id))


def ranking(replicas: list[Replica], model: str) -> list[Replica]:
    """The replicas by rendezvous preference for ``model``, the preferred first."""
    return sorted(replicas, key=lambda r: (xxhash.xxh3_64_intdigest(f"{r.id}\x00{model}".encode()), r.id), reverse=True)


@dataclass(slots=True)
class LeaseHandle:
    lease: Lease
    deadline: float  # time.monotonic() until which the lease is trusted

    def valid(self) -> bool:
        return time.monotonic() < self.deadline


class Cluster:
    def __init__(self, journal: Journal, url: str, *, lease_ms: int = 5000) -> None:
        self.journal = journal
        self.me = Replica(secrets.token_hex(8), url)
        self.lease_ms = lease_ms
        self.live: list[Replica] = [self.me]
        self.leases: dict[str, LeaseHandle] = {}
        self.on_lost: Callable[[str], None] = lambda model: None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def single(self) -> bool:
        """One replica owns everything (the embedded journal): no leases to take or renew."""
        return not self.journal.durable

    async def start(self) -> None:
        if self.single:
            return
        with contextlib.suppress(Exception):  # Redis may be down at start: the loop keeps trying
            self.live = await self.journal.heartbeat(self.me, self.lease_ms)
        self._tasks = [asyncio.ensure_future(self._heartbeats()), asyncio.ensure_future(self._renewals())]

    async def stop(self) -> None:
        """Stop renewing and hand every model over at once (their next owner need not wait for expiry)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        for handle in list(self.leases.values()):
            with contextlib.suppress(Exception):
                await self.journal.release(handle.lease)
        self.leases.clear()

    def preferred(self, model: str) -> Replica:
        """The live replica that should take ``model``: its rendezvous choice. Shard ``<m>~<i>`` of a sharded
        model (see :mod:`.shards`) takes the ``i``-th replica of ``<m>``'s rendezvous ranking (modulo the live
        replicas), so a model's shards land on distinct replicas whenever there are enough of them."""
        live = self.live if any(r.id == self.me.id for r in self.live) else [*self.live, self.me]
        index = shards.index_of(model)
        if index == 0:
            return rendezvous(live, model)
        ranked = ranking(live, shards.base_of(model))
        return ranked[index % len(ranked)]

    async def acquire(self, model: str) -> LeaseHandle | Holder:
        if self.single:
            handle = LeaseHandle(Lease(model, 1, self.me.id), float("inf"))
            self.leases[model] = handle
            return handle
        sent = time.monotonic()
        got = await self.journal.acquire(model, self.me, self.lease_ms)
        if isinstance(got, Holder):
            return got
        handle = LeaseHandle(got, sent + SAFETY * self.lease_ms / 1000)
        self.leases[model] = handle
        return handle

    def drop(self, model: str) -> None:
        self.leases.pop(model, None)

    async def renew(self, models: list[str] | None = None) -> None:
        """Renew the leases (all, or the given models'); a lease found lost is dropped and reported."""
        handles = [(m, h) for m, h in self.leases.items() if models is None or m in models]
        if not handles:
            return
        sent = time.monotonic()
        current = await self.journal.renew([h.lease for _, h in handles], self.lease_ms)
        for (model, handle), ok in zip(handles, current, strict=True):
            if self.leases.get(model) is not handle:
                continue  # re-acquired meanwhile
            if ok:
                handle.deadline = sent + SAFETY * self.lease_ms / 1000
            else:
                log.warning("lost the lease on model %r (another replica owns it now)", model)
                del self.leases[model]
                self.on_lost(model)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                self.live = await self.journal.heartbeat(self.me, self.lease_ms)
            except Exception as exc:
                log.warning("replica heartbeat failed: %s", exc)

    async def _renewals(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                await self.renew()
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc)
