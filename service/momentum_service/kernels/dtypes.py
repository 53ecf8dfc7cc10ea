"""Tensor element types as they travel and are logged, and their exact widening.

Values and state are float32 or float64. Gradients may also come as float16 or bfloat16: they
are kept (on the wire and in the step log) at that width, half the bytes, and widened to
float32 for the update, exactly (every float16 and bfloat16 is a float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CODES", "NAMES", "STATE_CODES", "code_of", "widen"]

# Little-endian storage dtypes by code (the safetensors names). BF16 is read as raw uint16.
CODES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
NAMES = {"float32": "F32", "float64": "F64"}
STATE_CODES = frozenset({"F32", "F64"})


def code_of(a: npt.NDArray[Any]) -> str:
    """The code of a float32 or float64 array."""
    return NAMES[a.dtype.name]


def widen(flat: npt.NDArray[Any], code: str) -> npt.NDArray[np.floating]:
    """Stored elements (``CODES[code]``) as a native float32/float64 array; a view when no change is needed."""
    if code == "BF16":  # the top half of a float32: widening is exact
        out: npt.NDArray[np.floating] = (flat.astype(np.uint32) << 16).view(np.float32)
        return out
    if code == "F16":
        return flat.astype(np.float32)
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))
