"""Tensors as they were received: one buffer and where each tensor lies in it.

A step's log entry keeps its gradients exactly as the client sent them (float16 and bfloat16
at half the bytes), so that replaying the log widens them the same way and computes the same
update. A body in the binary wire format already is such a buffer (safetensors tiles its
tensors without gaps), so the entry refers to the body's own bytes and nothing is copied; other
bodies are packed into one buffer once (:meth:`RawTensors.pack`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.dtypes import CODES, code_of, widen
from ..store.base import Array

__all__ = ["RawTensors", "TensorSpec"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of a :class:`RawTensors`: its name, element code (see :mod:`..kernels.dtypes`),
    shape, and byte range in the buffer."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    def to_json(self) -> list[Any]:
        return [self.name, self.code, list(self.shape), self.begin, self.end]

    @classmethod
    def from_json(cls, raw: list[Any]) -> TensorSpec:
        name, code, shape, begin, end = raw
        if code not in CODES:
            raise ValueError(f"unknown element code {code!r}")
        return cls(str(name), code, tuple(int(d) for d in shape), int(begin), int(end))


@dataclass(frozen=True, slots=True)
class RawTensors:
    data: memoryview  # bytes (format "B"); the tensors' elements are little-endian
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def arrays(self) -> dict[str, Array]:
        """The tensors as native float32/float64 arrays (read-only views when no widening is needed)."""
        out = {}
        for s in self.specs:
            dtype = CODES[s.code]
            count = math.prod(s.shape)
            if (s.end - s.begin) != count * dtype.itemsize or not 0 <= s.begin <= s.end <= self.data.nbytes:
                raise ValueError(f"tensor {s.name!r}: its byte range does not match its shape")
            flat = np.frombuffer(self.data, dtype=dtype, count=count, offset=s.begin)
            out[s.name] = widen(flat, s.code).reshape(s.shape)
        return out

    def to_json(self) -> list[list[Any]]:
        return [s.to_json() for s in self.specs]

    @classmethod
    def from_json(cls, specs: list[list[Any]], data: bytes | memoryview) -> RawTensors:
        return cls(as_bytes(data), tuple(TensorSpec.from_json(s) for s in specs))

    @classmethod
    def pack(cls, arrays: Mapping[str, Array]) -> RawTensors:
        """Arrays (float32/float64) copied once into one buffer, little-endian."""
        total = sum(a.nbytes for a in arrays.values())
        buf = bytearray(total)
        specs, offset = [], 0
        for name, a in arrays.items():
            end = offset + a.nbytes
            view = np.frombuffer(buf, dtype=a.dtype.newbyteorder("<"), count=a.size, offset=offset)
            view[...] = a.reshape(-1)
            specs.append(TensorSpec(name, code_of(a), tuple(a.shape), offset, end))
            offset = end
        return cls(memoryview(buf), tuple(specs))


def as_bytes(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (no copy)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
