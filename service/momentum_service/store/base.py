"""The store protocol: what the engine needs from a place that keeps parameters.

A store keeps, per model, its config (a JSON-able dict) with a revision token, and per
parameter its value, momentum velocity (absent until the first momentum update), step
count and an etag that changes with every write. Updates are optimistic: the engine
reads records, computes, and calls :meth:`Store.commit_step`, which applies all the
updates of one request at once, or none if any record (or the model config) changed
since it was read.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "Claim",
    "ClaimState",
    "CommitOutcome",
    "Contribution",
    "ModelRecord",
    "ParamMeta",
    "ParamRecord",
    "ParamUpdate",
    "Store",
    "new_token",
]

Array = npt.NDArray[np.floating]


def new_token() -> str:
    """A fresh revision/etag token: 96 random bits, so concurrent writers never collide."""
    return secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    config: dict[str, Any]
    rev: str


@dataclass(frozen=True, slots=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str
    step: int


@dataclass(frozen=True, slots=True)
class ParamRecord:
    name: str
    value: Array
    velocity: Array | None
    step: int
    etag: str

    @property
    def meta(self) -> ParamMeta:
        return ParamMeta(self.name, tuple(self.value.shape), self.value.dtype.name, self.step)


@dataclass(frozen=True, slots=True)
class ParamUpdate:
    """The new state of one parameter, valid only if its etag is still ``expected_etag``."""

    name: str
    expected_etag: str
    value: Array
    velocity: Array | None
    step: int
    etag: str


@dataclass(frozen=True, slots=True)
class Claim:
    """One attempt's claim on an idempotency key (the ``Idempotency-Key`` header of a step).

    A key's record is *pending* (an attempt holds it, for ``lease_ms`` unless renewed) or
    *done* (the step was applied; kept ``ttl_ms``, with the ``summary`` the engine stored).
    ``fingerprint`` identifies the request the key was first used with.
    """

    key: str
    fingerprint: str
    owner: str
    lease_ms: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class ClaimState:
    """What :meth:`Store.claim` found.

    ``owned``: this attempt holds the key (new, or renewed); ``in_flight``: another attempt
    holds it; ``mismatch``: the key was used with another request; ``done``: applied already,
    by ``owner``, with ``summary``.
    """

    status: Literal["owned", "in_flight", "mismatch", "done"]
    owner: str | None = None
    summary: str | None = None


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """What :meth:`Store.commit_step` did.

    ``applied``; ``conflict`` (nothing applied: the model or a parameter changed since the
    read); or, for a claimed step, the :class:`ClaimState` that stopped it (``done``: the key's
    step was applied already, maybe by this very attempt if ``claim.owner == owner``).
    """

    status: Literal["applied", "conflict", "in_flight", "mismatch", "done"]
    owner: str | None = None
    summary: str | None = None


@dataclass(frozen=True, slots=True)
class Contribution:
    """What :meth:`Store.contribute` did.

    ``added`` (or ``duplicate``: this worker had contributed to that step already, and is not
    counted twice), with ``counts``: the number of distinct workers per parameter so far; or
    ``moved``: some parameter is not at the step (nothing was added), with their ``steps``.
    """

    status: Literal["added", "duplicate", "moved"]
    counts: dict[str, int]
    steps: dict[str, int]


@runtime_checkable
class Store(Protocol):
    """Where models and parameters live. Every method is atomic on its own."""

    kind: str

    async def ping(self) -> None:
        """Raise :class:`~momentum_service.errors.StoreUnavailable` if the store cannot serve."""

    async def close(self) -> None: ...

    async def put_model(
        self, model: str, config: dict[str, Any], *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        """Create the model or replace its config (parameters are kept). Returns (record, created).

        With ``only_create``, an existing model is left as it is: ModelExists carries its config.
        A model created after a delete of the same name is a new *incarnation*: nothing of the old
        one (parameters, idempotency records, sync contributions) is ever read again.
        """

    async def get_model(self, model: str) -> ModelRecord | None: ...

    async def replace_config(self, model: str, expected_rev: str, config: dict[str, Any]) -> ModelRecord | None:
        """Compare-and-set the config. ``None`` if the revision changed; ModelNotFound if gone."""

    async def delete_model(self, model: str) -> bool:
        """Delete the model and everything of it (parameters, idempotency records, sync
        contributions), all unreachable at once. False if it did not exist. Works even when the
        store is full."""

    async def list_params(self, model: str) -> list[ParamMeta]:
        """Metadata of every parameter, sorted by name. ModelNotFound if the model does not exist."""

    async def read(
        self, model: str, names: list[str] | None, *, with_velocity: bool
    ) -> tuple[ModelRecord, dict[str, ParamRecord]]:
        """The model and the named parameters (all when ``names`` is None), read together.

        Raises ModelNotFound, or ParamNotFound naming every missing parameter. Without
        ``with_velocity`` the records' velocity is None.
        """

    async def put_params(self, model: str, values: dict[str, Array], *, only_create: bool) -> dict[str, bool]:
        """Set values, resetting velocity and step; returns {name: created}.

        With ``only_create`` nothing is written if any parameter exists (ParamsExist names them).
        Raises ModelNotFound.
        """

    async def delete_param(self, model: str, name: str) -> bool:
        """False if the parameter did not exist; ModelNotFound if the model does not."""

    async def commit_step(
        self,
        model: str,
        expected_rev: str,
        updates: list[ParamUpdate],
        claim: Claim | None = None,
        summary: str = "",
    ) -> CommitOutcome:
        """Apply every update, or none if the model's rev or any parameter's etag changed.

        The store takes the updates' arrays as they are (the caller must not change them after):
        a step's new state is not copied again to be kept.

        ``conflict`` tells the caller to re-read and recompute. With a ``claim``, the check of
        the key's record, the updates and the record becoming *done* (with ``summary``) are
        one atomic operation, so a step is never applied twice under one key, whatever is
        re-sent or retried. Raises ModelNotFound if the model is gone.
        """

    async def claim(self, model: str, claim: Claim) -> ClaimState:
        """Take (or renew) the key's lease unless it is done, held by another attempt, or mismatched.

        Keys are per model incarnation. Raises ModelNotFound without the model."""

    async def release(self, model: str, claim: Claim) -> None:
        """Drop the key's record if it is still pending under this claim (the attempt failed)."""

    # Synchronous training: gradients gathered per parameter and step, until enough workers sent theirs.

    async def contribute(
        self, model: str, step: int, worker: int, grads: dict[str, Array], ttl_ms: int
    ) -> Contribution:
        """Add a worker's gradients for ``step``, atomically, if every parameter is at that step.

        The first contribution of a worker to a step counts; a repeat changes nothing. Raises
        ModelNotFound or ParamNotFound.
        """

    async def contributions(self, model: str, step: int, names: list[str]) -> dict[str, dict[int, bytes]]:
        """Every worker's gradient bytes (little-endian) per parameter for ``step``."""

    async def contributors(self, model: str, step: int, names: list[str]) -> dict[str, set[int]]:
        """The workers that contributed to ``step`` (remembered after the gradients are dropped)."""

    async def drop_contributions(self, model: str, step: int, names: list[str]) -> None:
        """Forget the gradients of an applied step (its contributors stay known until they expire)."""

    async def steps(self, model: str, names: list[str]) -> dict[str, int]:
        """The parameters' current steps (a cheap read to wait on). Raises ParamNotFound."""
