"""safetensors bodies without copying the tensors: written as parts, read as views.

A request body is a small header (JSON, padded to 8 bytes) followed by each array's own buffer;
the SDK's transport sends the parts with one scatter-gather system call, so a gradient is never
copied into a body. A response is read into one buffer, and each tensor is a numpy view of it.
Tensors are laid out widest dtype first, so every view is aligned.

bfloat16 (which numpy lacks) is written from its raw 16-bit patterns, marked ``BF16``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._tensors import Array, dumps, loads

MEDIA_TYPE = "application/x-safetensors"

_WRITE = {"float32": "F32", "float64": "F64", "float16": "F16"}
_READ: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}

Buffer = bytes | memoryview


@dataclass(frozen=True, slots=True)
class Bfloat16:
    """bfloat16 data as its raw bits (a uint16 array): what a torch bfloat16 tensor holds."""

    bits: npt.NDArray[np.uint16]


def encode(tensors: Mapping[str, Array | Bfloat16], metadata: Mapping[str, Any]) -> tuple[Buffer, ...]:
    """The body as parts: the header, then each array's little-endian buffer (no copy when it already is)."""
    arrays: list[tuple[str, str, npt.NDArray[Any]]] = []
    for name, value in tensors.items():
        a: npt.NDArray[Any]
        if isinstance(value, Bfloat16):
            a, wire = np.ascontiguousarray(value.bits).reshape(value.bits.shape), "BF16"
        else:
            a, wire = np.ascontiguousarray(value).reshape(value.shape), _WRITE[value.dtype.name]
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays.append((name, wire, a))
    arrays.sort(key=lambda entry: -entry[2].itemsize)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {key: dumps(value).decode() for key, value in metadata.items()}
    offset = 0
    for name, wire, a in arrays:
        header[name] = {"dtype": wire, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = dumps(header)
    text += b" " * (-(len(text) + 8) % 8)  # the data starts 8-byte aligned
    parts: list[Buffer] = [len(text).to_bytes(8, "little") + text]
    parts += [a.data.cast("B") for _, _, a in arrays if a.nbytes]
    return tuple(parts)


def decode(body: Buffer | npt.NDArray[np.uint8]) -> tuple[dict[str, Array], dict[str, Any]]:
    """The arrays (views of ``body``: writable when it is) and the metadata, each value decoded from JSON.

    Raises ``ValueError`` when the body is not valid safetensors.
    """
    buf = np.frombuffer(body, np.uint8) if not isinstance(body, np.ndarray) else body
    if len(buf) < 8:
        raise ValueError(f"a safetensors body has at least 8 bytes, got {len(buf)}")
    n = int.from_bytes(buf[:8].tobytes(), "little")
    if n > len(buf) - 8:
        raise ValueError(f"the header length {n} exceeds the body")
    header = loads(buf[8 : 8 + n].tobytes())
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    arrays: dict[str, Array] = {}
    for name, info in header.items():
        dtype: np.dtype[Any] | None = _READ.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unknown or missing dtype")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(buf) - start or math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"tensor {name!r}: data_offsets {info['data_offsets']} do not fit")
        flat = buf[start + begin : start + end].view(dtype)
        if info["dtype"] == "BF16":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        elif not flat.dtype.isnative:
            flat = flat.astype(flat.dtype.newbyteorder("="))
        arrays[str(name)] = flat.reshape(shape)
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a JSON object")
    return arrays, {str(key): loads(str(value).encode()) for key, value in metadata.items()}
