"""The changes an owner makes to a model, as logged in its journal (one :class:`Record` each).

A step's entry keeps what replaying it needs and nothing it could recompute: the gradients as
received, the step each parameter was at and the learning rate used, and (for the dedup
records and the owner's memory of them) the step's idempotency key and fingerprint. Records are
JSON metadata plus the tensors' bytes; the metadata is small (the tensors' names, codes,
shapes and byte ranges).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..store.base import MAX_CHUNK, Buffer, Record
from .tensors import RawTensors, as_bytes

__all__ = [
    "ConfigEntry",
    "DeleteEntry",
    "Entry",
    "PutEntry",
    "RestoreEntry",
    "StepEntry",
    "from_record",
    "to_record",
]


@dataclass(frozen=True, slots=True)
class StepEntry:
    """One update of some parameters: ``grads`` (as received; for a sync step, the workers' mean),
    each parameter's step before it (``steps``) and learning rate (``lrs``)."""

    grads: RawTensors
    steps: Mapping[str, int]
    lrs: Mapping[str, float]
    key: str | None = None
    fingerprint: str | None = None
    sync: tuple[int, tuple[int, ...]] | None = None  # (base step, contributing workers)


@dataclass(frozen=True, slots=True)
class PutEntry:
    """Parameters set to values (their state reset, their step 0)."""

    values: RawTensors


@dataclass(frozen=True, slots=True)
class DeleteEntry:
    name: str


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    config: dict[str, Any]
    rev: str


@dataclass(frozen=True, slots=True)
class RestoreEntry:
    """The whole model replaced by a checkpoint: its config, and every parameter's value, state
    buffers and step. ``tensors`` holds ``<name>`` (the value) and ``<name>@<buffer>`` (a state
    buffer) as received; ``params`` maps each name to ``(step, buffer names)``."""

    config: dict[str, Any]
    rev: str
    tensors: RawTensors
    params: Mapping[str, tuple[int, tuple[str, ...]]]


Entry = StepEntry | PutEntry | DeleteEntry | ConfigEntry | RestoreEntry


def chunks(data: memoryview) -> tuple[Buffer, ...]:
    """``data`` as buffers of at most :data:`MAX_CHUNK` bytes (views, no copy)."""
    if data.nbytes == 0:
        return ()
    return tuple(data[i : i + MAX_CHUNK] for i in range(0, data.nbytes, MAX_CHUNK))


def joined(data: tuple[Buffer, ...]) -> memoryview:
    """The buffers of a record as one (a view when there is one buffer)."""
    if len(data) == 1:
        return as_bytes(data[0])
    return memoryview(b"".join(data))


def _uniform(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else values


def _per_name(packed: Any, names: list[str], cast: type) -> dict[str, Any]:
    values = packed if isinstance(packed, list) else [packed] * len(names)
    if len(values) != len(names):
        raise ValueError("a per-parameter list does not match the tensors")
    return {n: cast(v) for n, v in zip(names, values, strict=True)}


def to_record(entry: Entry) -> Record:
    if isinstance(entry, StepEntry):
        names = entry.grads.names
        meta: dict[str, Any] = {
            "kind": "step",
            "tensors": entry.grads.to_json(),
            "steps": _uniform([entry.steps[n] for n in names]),
            "lrs": _uniform([entry.lrs[n] for n in names]),
        }
        if entry.key is not None:
            meta["key"], meta["fp"] = entry.key, entry.fingerprint
        if entry.sync is not None:
            meta["sync"] = [entry.sync[0], list(entry.sync[1])]
        return Record(meta, chunks(entry.grads.data))
    if isinstance(entry, PutEntry):
        return Record({"kind": "put", "tensors": entry.values.to_json()}, chunks(entry.values.data))
    if isinstance(entry, DeleteEntry):
        return Record({"kind": "delete", "name": entry.name})
    if isinstance(entry, RestoreEntry):
        params = {n: [step, list(buffers)] for n, (step, buffers) in entry.params.items()}
        meta = {
            "kind": "restore",
            "config": entry.config,
            "rev": entry.rev,
            "tensors": entry.tensors.to_json(),
            "params": params,
        }
        return Record(meta, chunks(entry.tensors.data))
    return Record({"kind": "config", "config": entry.config, "rev": entry.rev})


def from_record(record: Record) -> Entry:
    meta = record.meta
    kind = meta.get("kind")
    if kind == "step":
        grads = RawTensors.from_json(meta["tensors"], joined(record.data))
        names = grads.names
        sync = meta.get("sync")
        return StepEntry(
            grads,
            _per_name(meta["steps"], names, int),
            _per_name(meta["lrs"], names, float),
            meta.get("key"),
            meta.get("fp"),
            None if sync is None else (int(sync[0]), tuple(int(w) for w in sync[1])),
        )
    if kind == "put":
        return PutEntry(RawTensors.from_json(meta["tensors"], joined(record.data)))
    if kind == "delete":
        return DeleteEntry(str(meta["name"]))
    if kind == "config":
        return ConfigEntry(dict(meta["config"]), str(meta["rev"]))
    if kind == "restore":
        params = {str(n): (int(step), tuple(str(b) for b in bufs)) for n, (step, bufs) in meta["params"].items()}
        tensors = RawTensors.from_json(meta["tensors"], joined(record.data))
        return RestoreEntry(dict(meta["config"]), str(meta["rev"]), tensors, params)
    raise ValueError(f"unknown log entry kind {kind!r}")
