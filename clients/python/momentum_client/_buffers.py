"""Response buffers, recycled once nothing refers to them any more.

A large response is read into one fresh buffer, and for large buffers "fresh" is expensive: the
allocator maps new pages and the first write faults each one in (for a 40 MB answer, more time
than receiving it). The pool hands out buffers of the sizes asked for and takes each back as
soon as no array, view or memoryview refers to it (its reference count says so): in a training
loop, the arrays of the step before last are dropped, and their memory serves the next answer.
It keeps at most ``max_bytes`` of buffers; smaller than ``min_bytes`` ones are allocated plainly.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import numpy.typing as npt

Bytes = npt.NDArray[np.uint8]


class BufferPool:
    def __init__(self, max_bytes: int = 1 << 30, min_bytes: int = 1 << 20) -> None:
        self.max_bytes, self.min_bytes = max_bytes, min_bytes
        self.bytes = 0
        self._buffers: dict[int, list[Bytes]] = {}
        self._lock = threading.Lock()

    def empty(self, n: int) -> Bytes:
        """``n`` uninitialised bytes: a free pooled buffer, or a new one."""
        if n < self.min_bytes:
            return np.empty(n, np.uint8)
        with self._lock:
            buffers = self._buffers.setdefault(n, [])
            for b in buffers:
                if sys.getrefcount(b) == 3:  # the list, ``b`` and getrefcount's argument: free
                    return b
            fresh = np.empty(n, np.uint8)
            if self.bytes + n <= self.max_bytes:
                buffers.append(fresh)
                self.bytes += n
            return fresh


POOL = BufferPool()
