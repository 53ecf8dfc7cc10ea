"""Large arrays, recycled once nothing refers to them any more.

A step writes its new value and velocity into new arrays, and a request's body is read into a
new buffer. For large arrays, "new" is expensive: the allocator maps fresh pages for each one
and the kernel faults every page in on its first write. Measured here, a 10M-float step spent
more time faulting in its 80 MB of outputs than computing them. A :class:`BufferPool` hands out
arrays of the sizes asked for and takes each back as soon as no array, view or buffer refers to
it (its reference count says so), so a steady stream of steps reuses the same memory.

The pool holds at most ``max_bytes`` (arrays in use or free). To make room for a new size, it
lets go of free arrays of the sizes least recently asked for; when the arrays it holds are all
in use, it allocates plainly. So a process keeps at most ``max_bytes`` for reuse, and a size that
stopped being asked for (a deleted model's, a one-off request's) is given back. Arrays smaller
than ``min_bytes`` are always allocated plainly: the allocator reuses small blocks well.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["POOL", "BufferPool"]

Key = tuple[str, int]


class BufferPool:
    def __init__(self, max_bytes: int = 256 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self.bytes = 0
        self._arrays: OrderedDict[Key, list[npt.NDArray[Any]]] = OrderedDict()  # least recently asked first
        self._lock = threading.Lock()

    def empty(self, n: int, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
        """A 1-D array of ``n`` elements, uninitialised: a free pooled one, or a new one."""
        dt = np.dtype(dtype)
        nbytes = n * dt.itemsize
        if nbytes < self.min_bytes:
            return np.empty(n, dt)
        key = (dt.str, n)
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            self._arrays.move_to_end(key)
            for a in arrays:
                if _free(a, held=1):
                    return a
            fresh = np.empty(n, dt)
            if self.bytes + nbytes > self.max_bytes:
                self._evict(self.bytes + nbytes - self.max_bytes, keep=key)
            if self.bytes + nbytes <= self.max_bytes:
                arrays.append(fresh)
                self.bytes += nbytes
            return fresh

    def _evict(self, need: int, keep: Key) -> None:
        """Let go of free arrays, least recently asked-for sizes first, until ``need`` bytes are gone."""
        for key in list(self._arrays):
            if need <= 0:
                return
            if key == keep:
                continue
            kept = []
            for a in self._arrays[key]:
                if need > 0 and _free(a, held=1):
                    self.bytes -= a.nbytes
                    need -= a.nbytes
                else:
                    kept.append(a)
            if kept:
                self._arrays[key] = kept
            else:
                del self._arrays[key]

    def clear(self) -> None:
        with self._lock:
            self._arrays.clear()
            self.bytes = 0


def _free(a: npt.NDArray[Any], held: int) -> bool:
    """Whether nothing refers to ``a`` but the pool's ``held`` references and this call's own: the
    caller's loop variable, this function's parameter and getrefcount's argument."""
    return sys.getrefcount(a) == held + 3


POOL = BufferPool()
"""The process's pool: the kernels' outputs and the request bodies of the server (its budget is the
``MOMENTUM_BUFFER_POOL_BYTES`` setting)."""
