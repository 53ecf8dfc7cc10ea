"""The binary wire format: request and response bodies in safetensors.

``Content-Type: application/x-safetensors`` sends tensors this way, and
``Accept: application/x-safetensors`` receives them. Tensor names are parameter names.
Everything else travels in the safetensors ``__metadata__`` (a string-to-string map), as
JSON text under documented keys (see the README).

Writing uses the ``safetensors`` library. Reading is done here, for three reasons: the
arrays must be zero-copy views of the body (a 40 MB gradient is not copied again),
``__metadata__`` must be read (``safetensors.deserialize`` drops it), and bfloat16, which
numpy lacks, must become float32. The checks are those of the format, made before
anything is allocated. The header length must fit in the body, the header must be a JSON
object, and each tensor needs a known dtype and integer dimensions. Its byte range must lie
inside the data, and must hold exactly ``prod(shape) * itemsize`` bytes, computed with
Python integers, so a declared shape of ``[2**40, 2**40]`` is refused without allocating.
The ranges must tile the data without gaps or overlaps. A malformed body is a 422
``malformed-safetensors``; nothing is ever read outside the body.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import safetensors.numpy

from ..settings import Settings
from ..store.base import Array
from .problems import Problem

MEDIA_TYPE = "application/x-safetensors"

# Wire dtypes. F16 and BF16 are accepted for gradients only, and become float32 exactly.
_READ: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
STATE_DTYPES = frozenset({"F32", "F64"})
GRADIENT_DTYPES = frozenset(_READ)
_MAX_HEADER = 16 * 1024 * 1024


def is_safetensors(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == MEDIA_TYPE


def wants_safetensors(accept: str | None) -> bool:
    """Whether the client asked for safetensors (simple media-range match; q-values are ignored)."""
    if not accept:
        return False
    return any(part.split(";", 1)[0].strip().lower() == MEDIA_TYPE for part in accept.split(","))


def _bad(detail: str) -> Problem:
    return Problem(422, "malformed-safetensors", detail, errors=[{"loc": ["body"], "msg": detail}])


def parse(
    raw: bytes | memoryview, settings: Settings, *, allowed: frozenset[str] = frozenset(_READ)
) -> tuple[dict[str, Array], dict[str, str]]:
    """The tensors (float32/float64 arrays, read-only views where possible) and the metadata."""
    if len(raw) < 8:
        raise _bad(f"a safetensors body starts with an 8-byte header length; this one has {len(raw)} bytes")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8 or n > _MAX_HEADER:
        raise _bad(f"the header length {n} exceeds the body ({len(raw) - 8} bytes after the length)")
    try:
        header = orjson.loads(raw[8 : 8 + n])
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("the header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("__metadata__ must map strings to strings")
    data_start, data_len = 8 + n, len(raw) - 8 - n
    spans: list[tuple[int, int, str]] = []
    specs: dict[str, tuple[np.dtype[Any], str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
        wire, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if wire not in _READ:
            raise _bad(f"tensor {name!r}: dtype {wire!r} is not one of {', '.join(sorted(_READ))}")
        if wire not in allowed:
            raise _bad(f"tensor {name!r}: dtype {wire} is not accepted here (use {' or '.join(sorted(allowed))})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise _bad(f"tensor {name!r}: shape must be a list of integers")
        if any(d < 0 for d in shape):
            raise _bad(f"tensor {name!r}: negative dimension in {shape}")
        if len(shape) > settings.max_tensor_dims:
            raise _bad(f"tensor {name!r}: at most {settings.max_tensor_dims} dimensions")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _bad(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(f"tensor {name!r}: data_offsets {offsets} are outside the {data_len} data bytes")
        dtype, size = _READ[wire], math.prod(shape)
        if size * dtype.itemsize != end - begin:
            raise _bad(
                f"tensor {name!r}: shape {shape} of {wire} needs {size * dtype.itemsize} bytes, not {end - begin}"
            )
        if size > settings.max_tensor_elements:
            raise Problem(
                413,
                "tensor-too-large",
                f"tensor {name!r}: shape {shape} has {size} elements; the limit is {settings.max_tensor_elements}",
                limit=settings.max_tensor_elements,
            )
        spans.append((begin, end, name))
        specs[name] = (dtype, wire, tuple(shape), begin, size)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _bad(f"tensor {name!r}: the data must be tiled without gaps or overlaps (at byte {position})")
        position = end
    if position != data_len:
        raise _bad(f"{data_len - position} trailing bytes after the last tensor")
    tensors: dict[str, Array] = {}
    for name, (dtype, wire, shape, begin, size) in specs.items():
        flat = np.frombuffer(raw, dtype=dtype, count=size, offset=data_start + begin)
        tensors[name] = _native(flat, wire).reshape(shape)
    return tensors, {str(k): v for k, v in metadata.items()}


def _native(flat: np.ndarray[Any, Any], wire: str) -> Array:
    if wire == "BF16":  # the top half of a float32: widening is exact
        return (flat.astype(np.uint32) << 16).view(np.float32)
    if wire == "F16":
        return flat.astype(np.float32)
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))


def encode(tensors: dict[str, Array], metadata: dict[str, Any]) -> bytes:
    """A safetensors body; each metadata value is written as JSON text."""
    text = {key: orjson.dumps(value).decode() for key, value in metadata.items()}
    arrays = {name: np.ascontiguousarray(a).reshape(a.shape) for name, a in tensors.items()}  # 0-d stays 0-d
    out: bytes = safetensors.numpy.save(arrays, metadata=text)
    return out
