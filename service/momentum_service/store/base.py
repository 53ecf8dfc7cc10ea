"""The journal protocol: what the engine needs from the place that keeps a model durably.

A model is served from memory by one *owner* (see :mod:`..engine`); its journal is the durable
record from which any server process can rebuild it, bitwise:

- a **head** per model: its config (JSON) and revision, its *incarnation* (a model deleted and
  created again is a new one, sharing nothing with the old) and ``seq``, the number of changes
  made to it;
- a **log** of those changes (a step's gradients as received, with the steps and learning
  rates it used; parameters set or deleted; a new config), each a :class:`Record` of JSON
  metadata and data buffers, numbered ``1..seq``;
- now and then a **snapshot**: the whole state at some ``seq`` (the log up to it is dropped);
- the **idempotency records** of applied steps (key, fingerprint, summary), kept for a TTL;
- **leases**: which process owns each model, with a *fencing token* that only grows. Every
  write carries the writer's lease and is refused (:class:`Fenced`) unless the lease is still
  the current one, so a process that lost its lease (paused, partitioned, slow) can never write
  again, whatever it still believes;
- the **replicas**: the live server processes and their URLs, so that requests can be
  forwarded to a model's owner and new models spread over them.

A :class:`Batch` of changes is written in one atomic operation together with the fencing check
and the idempotency records of its steps. The embedded journal (:mod:`.memory`) keeps nothing:
the process is the only owner and its memory the only copy.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import Fenced, KeyTaken

__all__ = [
    "Array",
    "Batch",
    "Buffer",
    "Fenced",
    "Head",
    "Holder",
    "Journal",
    "KeyRecord",
    "KeyTaken",
    "Lease",
    "Loaded",
    "Record",
    "Replica",
    "new_token",
]

Array = npt.NDArray[np.floating]
Buffer = bytes | bytearray | memoryview


def new_token() -> str:
    """A fresh revision/incarnation token: 96 random bits, so concurrent writers never collide."""
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class Replica:
    """A server process: a random id per start, and the URL other replicas reach it at."""

    id: str
    url: str


@dataclass(frozen=True, slots=True)
class Lease:
    """The proof that ``replica`` owns ``model``: its fencing token (a number that only grows per model)."""

    model: str
    fence: int
    replica: str = ""


@dataclass(frozen=True, slots=True)
class Holder:
    """Another replica's live lease on a model, with the time it has left."""

    replica: str
    url: str
    fence: int
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class Head:
    config: dict[str, Any]
    rev: str
    inc: str
    seq: int


@dataclass(frozen=True, slots=True)
class Record:
    """A log entry or a snapshot: JSON metadata and data buffers (each at most :data:`MAX_CHUNK` bytes)."""

    meta: dict[str, Any]
    data: tuple[Buffer, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(memoryview(b).nbytes for b in self.data)


MAX_CHUNK = 256 << 20
"""The largest buffer of a record (Redis takes at most 512 MB per value)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An applied step's idempotency key: the request's fingerprint and the step's summary."""

    key: str
    fingerprint: str
    summary: str


@dataclass(frozen=True, slots=True)
class Loaded:
    """What the journal holds of a model: its head, the latest snapshot (``meta["seq"]`` is its
    seq) and the log entries after it, in order (``seq`` of the snapshot + 1 .. ``head.seq``)."""

    head: Head
    snapshot: Record | None
    log: list[Record]


@dataclass(frozen=True, slots=True)
class Batch:
    """Changes written at once, after ``base_seq`` (the head's seq they follow), up to ``seq``.

    ``entries`` are the log entries ``base_seq + 1 .. seq``, or none when ``snapshot`` (the
    state at ``seq``) stands for them; a snapshot also drops the log up to ``seq``. ``keys`` are
    the idempotency records of the steps, ``config`` the head's new ``(config, rev)``.
    """

    inc: str
    base_seq: int
    seq: int
    entries: Sequence[Record] = ()
    snapshot: Record | None = None
    keys: Sequence[KeyRecord] = ()
    config: tuple[dict[str, Any], str] | None = None
    nbytes: int = field(default=0, compare=False)
    key_ttl_ms: int = 86_400_000
    replicas: int = 0
    """Written only once at least this many replicas of the Redis primary holding it have it (``WAIT``);
    a journal without replicas never sees a batch asking for them (see :attr:`Journal.replicated`)."""


@runtime_checkable
class Journal(Protocol):
    kind: str
    durable: bool
    """Whether anything outlives the process (False for the embedded journal)."""
    replicated: bool
    """Whether a batch may ask to be on the store's replicas before it counts as written (:attr:`Batch.replicas`)."""

    async def ping(self) -> None:
        """Raise :class:`~momentum_service.errors.StoreUnavailable` if the journal cannot serve."""

    async def close(self) -> None: ...

    # Replicas and leases.

    async def heartbeat(self, replica: Replica, ttl_ms: int) -> list[Replica]:
        """Say this replica is alive for ``ttl_ms`` more; the live replicas, this one included."""

    async def acquire(self, model: str, replica: Replica, lease_ms: int) -> Lease | Holder:
        """A new lease on ``model`` (with a fencing token greater than any before), unless another
        replica's lease is live: then that :class:`Holder`."""

    async def renew(self, leases: Sequence[Lease], lease_ms: int) -> list[bool]:
        """Extend each lease that is still current; False for each that is not (lost)."""

    async def release(self, lease: Lease) -> None:
        """End the lease now if it is still current (another replica may take the model at once)."""

    async def holder(self, model: str) -> Holder | None:
        """The live lease on ``model``, if any."""

    async def wait_replicas(self, lease: Lease, model: str, replicas: int) -> None:
        """Return once ``replicas`` replicas of the store have everything written for ``model`` so far, or raise
        :class:`~momentum_service.errors.StoreUnavailable` (only called when :attr:`replicated`)."""
        ...

    # A model's durable record. Writes are fenced by the lease.

    async def model_names(self, after: str, limit: int) -> list[str]:
        """The names of the models that exist, in order, those after ``after`` (``""``: from the first), at
        most ``limit``."""
        ...

    async def load(self, model: str) -> Loaded | None:
        """The model's head, latest snapshot and log after it; None if the model does not exist."""

    async def create(self, lease: Lease, model: str, config: dict[str, Any], rev: str, inc: str) -> None:
        """Create the model's head (a new incarnation, seq 0). The caller has checked it does not exist."""

    async def commit(self, lease: Lease, model: str, batch: Batch) -> None:
        """Write the batch atomically: all of it, or (Fenced, KeyTaken) nothing."""

    async def delete(self, lease: Lease, model: str) -> None:
        """Delete the model and everything of it, at once. Works even when the store is full."""

    async def append_points(self, model: str, inc: str, points: Sequence[bytes], cap: int) -> None:
        """Append training-series points (JSON) to the incarnation's list, keeping its last ``cap``."""
        ...

    async def load_points(self, model: str, inc: str, cap: int) -> list[bytes]:
        """The incarnation's last ``cap`` training-series points, oldest first."""
        ...

    async def lookup(self, model: str, inc: str, key: str) -> KeyRecord | None:
        """The live idempotency record of ``key`` in the incarnation, if any."""
