"""The embedded store: everything in this process's memory.

The default when no Redis URL is configured, so the server runs with nothing else
installed. State is lost when the process stops, and is not shared between processes.
Every method runs without awaiting in between, so each is atomic on the event loop.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelExists, ModelNotFound, ParamNotFound, ParamsExist
from .base import (
    Array,
    Claim,
    ClaimState,
    CommitOutcome,
    Contribution,
    ModelRecord,
    ParamMeta,
    ParamRecord,
    ParamUpdate,
    new_token,
)


@dataclass
class _Idem:
    state: str  # "pending" or "done"
    fingerprint: str
    owner: str
    summary: str
    expires: float  # time.monotonic()


@dataclass
class _Model:
    """One incarnation of a model: deleting the model drops this object and everything in it, so a
    model created again under the same name starts with no parameters, keys or sync steps."""

    config: dict[str, Any]
    rev: str
    params: dict[str, ParamRecord] = field(default_factory=dict)
    idem: dict[str, _Idem] = field(default_factory=dict)
    # (step, name) -> (expiry, {worker: gradient bytes}, contributors)
    sync: dict[tuple[int, str], tuple[float, dict[int, bytes], set[int]]] = field(default_factory=dict)
    next_sweep: float = 0.0

    def idem_record(self, key: str) -> _Idem | None:
        now = time.monotonic()
        if now >= self.next_sweep:  # drop expired records now and then, as Redis does
            self.idem = {k: r for k, r in self.idem.items() if r.expires > now}
            self.next_sweep = now + 10.0
        rec = self.idem.get(key)
        return rec if rec is not None and rec.expires > now else None


class MemoryStore:
    kind = "memory"

    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _model(self, model: str) -> _Model:
        try:
            return self._models[model]
        except KeyError:
            raise ModelNotFound(model) from None

    async def put_model(
        self, model: str, config: dict[str, Any], *, only_create: bool = False
    ) -> tuple[ModelRecord, bool]:
        rev = new_token()
        existing = self._models.get(model)
        if existing is not None and only_create:
            raise ModelExists(model, copy.deepcopy(existing.config))
        if existing is None:
            self._models[model] = _Model(copy.deepcopy(config), rev)
        else:
            existing.config, existing.rev = copy.deepcopy(config), rev
        return ModelRecord(model, copy.deepcopy(config), rev), existing is None

    async def get_model(self, model: str) -> ModelRecord | None:
        m = self._models.get(model)
        return None if m is None else ModelRecord(model, copy.deepcopy(m.config), m.rev)

    async def replace_config(self, model: str, expected_rev: str, config: dict[str, Any]) -> ModelRecord | None:
        m = self._model(model)
        if m.rev != expected_rev:
            return None
        m.config, m.rev = copy.deepcopy(config), new_token()
        return ModelRecord(model, copy.deepcopy(config), m.rev)

    async def delete_model(self, model: str) -> bool:
        return self._models.pop(model, None) is not None

    async def list_params(self, model: str) -> list[ParamMeta]:
        m = self._model(model)
        return [m.params[name].meta for name in sorted(m.params)]

    async def read(
        self, model: str, names: list[str] | None, *, with_velocity: bool
    ) -> tuple[ModelRecord, dict[str, ParamRecord]]:
        m = self._model(model)
        wanted = sorted(m.params) if names is None else names
        missing = [n for n in wanted if n not in m.params]
        if missing:
            raise ParamNotFound(model, missing)
        out = {}
        for name in wanted:
            rec = m.params[name]
            # Stored arrays are read-only copies, so records can be handed out as they are.
            out[name] = rec if with_velocity else ParamRecord(name, rec.value, None, rec.step, rec.etag)
        return ModelRecord(model, copy.deepcopy(m.config), m.rev), out

    async def put_params(self, model: str, values: dict[str, Array], *, only_create: bool) -> dict[str, bool]:
        m = self._model(model)
        if only_create:
            existing = [n for n in values if n in m.params]
            if existing:
                raise ParamsExist(model, existing)
        created = {name: name not in m.params for name in values}
        for name, value in values.items():
            m.params[name] = ParamRecord(name, _frozen(value), None, 0, new_token())
        return created

    async def delete_param(self, model: str, name: str) -> bool:
        return self._model(model).params.pop(name, None) is not None

    async def commit_step(
        self,
        model: str,
        expected_rev: str,
        updates: list[ParamUpdate],
        claim: Claim | None = None,
        summary: str = "",
    ) -> CommitOutcome:
        m = self._model(model)
        if claim is not None:
            rec = m.idem_record(claim.key)
            if rec is not None:
                if rec.fingerprint != claim.fingerprint:
                    return CommitOutcome("mismatch")
                if rec.state == "done":
                    return CommitOutcome("done", rec.owner, rec.summary)
                if rec.owner != claim.owner:
                    return CommitOutcome("in_flight")
        elif updates and (first := m.params.get(updates[0].name)) is not None and first.etag == updates[0].etag:
            return CommitOutcome("applied")  # this very commit was applied already
        if m.rev != expected_rev:
            return CommitOutcome("conflict")
        for u in updates:
            rec_p = m.params.get(u.name)
            if rec_p is None or rec_p.etag != u.expected_etag:
                return CommitOutcome("conflict")
        for u in updates:
            velocity = None if u.velocity is None else _owned(u.velocity)
            m.params[u.name] = ParamRecord(u.name, _owned(u.value), velocity, u.step, u.etag)
        if claim is not None:
            expires = time.monotonic() + claim.ttl_ms / 1000
            m.idem[claim.key] = _Idem("done", claim.fingerprint, claim.owner, summary, expires)
        return CommitOutcome("applied")

    async def claim(self, model: str, claim: Claim) -> ClaimState:
        m = self._model(model)
        rec = m.idem_record(claim.key)
        if rec is not None:
            if rec.fingerprint != claim.fingerprint:
                return ClaimState("mismatch")
            if rec.state == "done":
                return ClaimState("done", rec.owner, rec.summary)
            if rec.owner != claim.owner:
                return ClaimState("in_flight")
        expires = time.monotonic() + claim.lease_ms / 1000
        m.idem[claim.key] = _Idem("pending", claim.fingerprint, claim.owner, "", expires)
        return ClaimState("owned")

    async def release(self, model: str, claim: Claim) -> None:
        m = self._models.get(model)
        rec = None if m is None else m.idem_record(claim.key)
        if m is not None and rec is not None and rec.state == "pending" and rec.owner == claim.owner:
            del m.idem[claim.key]

    def _sync_entry(self, model: str, step: int, name: str) -> tuple[float, dict[int, bytes], set[int]] | None:
        m = self._models.get(model)
        entry = None if m is None else m.sync.get((step, name))
        if m is not None and entry is not None and entry[0] <= time.monotonic():
            del m.sync[(step, name)]
            return None
        return entry

    async def contribute(
        self, model: str, step: int, worker: int, grads: dict[str, Array], ttl_ms: int
    ) -> Contribution:
        m = self._model(model)
        missing = [n for n in grads if n not in m.params]
        if missing:
            raise ParamNotFound(model, missing[:1])
        steps = {n: m.params[n].step for n in grads}
        if any(s != step for s in steps.values()):
            return Contribution("moved", {}, steps)
        now = time.monotonic()
        m.sync = {k: e for k, e in m.sync.items() if e[0] > now}
        duplicate, counts = False, {}
        for name, grad in grads.items():
            _, by_worker, who = m.sync.get((step, name), (0.0, {}, set()))
            duplicate = duplicate or worker in who
            if worker not in who:
                by_worker[worker] = np.ascontiguousarray(grad).astype(grad.dtype.newbyteorder("<")).tobytes()
                who.add(worker)
            m.sync[(step, name)] = (now + ttl_ms / 1000, by_worker, who)
            counts[name] = len(who)
        return Contribution("duplicate" if duplicate else "added", counts, steps)

    async def contributions(self, model: str, step: int, names: list[str]) -> dict[str, dict[int, bytes]]:
        out = {}
        for name in names:
            entry = self._sync_entry(model, step, name)
            out[name] = {} if entry is None else dict(entry[1])
        return out

    async def contributors(self, model: str, step: int, names: list[str]) -> dict[str, set[int]]:
        out = {}
        for name in names:
            entry = self._sync_entry(model, step, name)
            out[name] = set() if entry is None else set(entry[2])
        return out

    async def drop_contributions(self, model: str, step: int, names: list[str]) -> None:
        for name in names:
            entry = self._sync_entry(model, step, name)
            if entry is not None:
                self._models[model].sync[(step, name)] = (entry[0], {}, entry[2])

    async def steps(self, model: str, names: list[str]) -> dict[str, int]:
        m = self._model(model)
        missing = [n for n in names if n not in m.params]
        if missing:
            raise ParamNotFound(model, missing)
        return {n: m.params[n].step for n in names}


def _frozen(a: Array) -> Array:
    out: Array = np.array(a, copy=True)
    out.flags.writeable = False
    return out


def _owned(a: Array) -> Array:
    """A committed state, kept as it is (the store owns it from the commit on: no copy), read-only."""
    a.flags.writeable = False
    return a
