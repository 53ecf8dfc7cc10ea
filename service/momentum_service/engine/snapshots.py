"""A model's whole state as one journal :class:`Record`, and back.

The metadata lists the parameters (name, step, element code, shape, state buffer names) and
the recent sync steps; the data is each parameter's value and then its state buffers, in that
order, each array split into buffers of at most :data:`MAX_CHUNK` bytes. Writing a snapshot
hands the arrays' own memory to the journal: installed arrays are never changed in place, so
the owner keeps stepping while the snapshot is written.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..kernels.dtypes import CODES, code_of
from ..store.base import Array, Buffer, Record
from .entries import chunks
from .state import ModelState, ParamState

__all__ = ["from_snapshot", "to_snapshot"]


def _little(a: Array) -> memoryview:
    contiguous = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return contiguous.reshape(-1).view(np.uint8).data


def to_snapshot(state: ModelState) -> Record:
    params: list[list[Any]] = []
    data: list[Buffer] = []
    for name, p in state.params.items():
        arrays = [p.value, *(p.state[b] for b in sorted(p.state))]
        counts = []
        for a in arrays:
            parts = chunks(_little(a))
            counts.append(len(parts))
            data.extend(parts)
        params.append([name, p.step, code_of(p.value), list(p.value.shape), sorted(p.state), counts])
    meta = {
        "seq": state.seq,
        "inc": state.inc,
        "rev": state.rev,
        "config": state.config.to_dict(),
        "params": params,
        "synced": [[base, sorted(workers)] for base, workers in state.synced.items()],
    }
    return Record(meta, tuple(data))


def _array(parts: list[Buffer], code: str, shape: list[int]) -> Array:
    dtype = CODES[code]
    raw: Buffer = parts[0] if len(parts) == 1 else b"".join(parts)
    a: Array = np.frombuffer(raw, dtype=dtype, count=math.prod(shape)).reshape(shape)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    a.flags.writeable = False
    return a


def from_snapshot(name: str, record: Record) -> ModelState:
    meta = record.meta
    state = ModelState(name, str(meta["inc"]), str(meta["rev"]), ModelConfig.from_dict(meta["config"]))
    state.seq = int(meta["seq"])
    data, at = record.data, 0
    for pname, step, code, shape, buffers, counts in meta["params"]:
        arrays = []
        for count in counts:
            arrays.append(_array(list(data[at : at + count]), code, shape))
            at += count
        value, *bufs = arrays
        state.params[pname] = ParamState(value, dict(zip(buffers, bufs, strict=True)), int(step))
    state.synced = OrderedDict((int(base), frozenset(int(w) for w in workers)) for base, workers in meta["synced"])
    return state
