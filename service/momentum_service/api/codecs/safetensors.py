"""The binary wire format: bodies in safetensors, read and written without copying the tensors.

``Content-Type: application/x-safetensors`` sends tensors this way, and ``Accept:
application/x-safetensors`` receives them. Tensor names are parameter names (a velocity is
``<name>@velocity``). Everything else travels in the ``__metadata__`` (a string-to-string map),
as JSON text under documented keys (see the README).

**Reading** is done here rather than with the ``safetensors`` library, for three reasons: the
arrays must be zero-copy views of the body (a 40 MB gradient is not copied again),
``__metadata__`` must be read (``safetensors.deserialize`` drops it), and bfloat16, which numpy
lacks, must become float32. The checks are those of the format, made before anything is
allocated. The header length must fit in the body, the header must be a JSON object, and each
tensor needs a known dtype and integer dimensions. Its byte range must lie inside the data,
and must hold exactly ``prod(shape) * itemsize`` bytes, computed with Python integers, so a
declared shape of ``[2**40, 2**40]`` is refused without allocating. The ranges must tile the
data without gaps or overlaps. A malformed body is a 422 ``malformed-safetensors``; nothing is
ever read outside the body. ``tests/test_wire.py`` fuzzes this reader against the library's.

**Writing** builds only the header: the body is the header's bytes, then each array's own
buffer, as separate parts. Tensors are laid out widest dtype first, and the header is padded
to 8 bytes (as the library does), so every array of the body is aligned for a zero-copy view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import orjson

from ...engine import ParamRecord, RawTensors, StepResult, TensorSpec
from ...engine.tensors import as_bytes
from ...kernels.dtypes import CODES, NAMES, STATE_CODES, widen
from ...store.base import Array
from .. import schemas
from . import BodyError, Encoded, Limits, StepBody
from .checks import check_count, check_finite, check_name, step_options, validate

MEDIA_TYPE = "application/x-safetensors"

# Wire dtypes. F16 and BF16 are accepted for gradients only, and become float32 exactly.
_READ = CODES
_WRITE = NAMES
STATE_DTYPES = STATE_CODES
GRADIENT_DTYPES = frozenset(_READ)
_MAX_HEADER = 16 * 1024 * 1024
STEP_OPTIONS = ("return_params", "expected_steps", "worker_id", "base_step", "metrics")


def _bad(detail: str) -> BodyError:
    return BodyError(422, "malformed-safetensors", detail, errors=[{"loc": ["body"], "msg": detail}])


def read(
    raw: bytes | memoryview, limits: Limits, *, allowed: frozenset[str] = frozenset(_READ)
) -> tuple[dict[str, Array], dict[str, str]]:
    """The tensors (float32/float64 arrays, read-only views where possible) and the metadata."""
    tensors, metadata, _ = read_raw(raw, limits, allowed=allowed)
    return tensors, metadata


def read_raw(
    raw: bytes | memoryview, limits: Limits, *, allowed: frozenset[str] = frozenset(_READ)
) -> tuple[dict[str, Array], dict[str, str], RawTensors]:
    """:func:`read`, and the tensors as received: the body's data section and each tensor's place in it."""
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
    check_count(len(header), limits)
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
        if len(shape) > limits.max_tensor_dims:
            raise _bad(f"tensor {name!r}: at most {limits.max_tensor_dims} dimensions")
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
        if size > limits.max_tensor_elements:
            raise BodyError(
                413,
                "tensor-too-large",
                f"tensor {name!r}: shape {shape} has {size} elements; the limit is {limits.max_tensor_elements}",
                limit=limits.max_tensor_elements,
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
    received = []
    for name, (dtype, wire, shape, begin, size) in specs.items():
        try:
            flat = np.frombuffer(raw, dtype=dtype, count=size, offset=data_start + begin)
            tensors[name] = widen(flat, wire).reshape(shape)
        except ValueError as exc:  # numpy refuses a shape like [0, 2**62]: no elements, but too big
            raise _bad(f"tensor {name!r}: its shape is not valid: {exc}") from None
        received.append(TensorSpec(name, wire, shape, begin, begin + size * dtype.itemsize))
    data = as_bytes(raw)[data_start:]
    return tensors, {str(k): v for k, v in metadata.items()}, RawTensors(data, tuple(received))


def _checked(
    raw: memoryview, limits: Limits, allowed: frozenset[str]
) -> tuple[dict[str, Array], dict[str, str], RawTensors]:
    tensors, metadata, received = read_raw(raw, limits, allowed=allowed)
    for name, a in tensors.items():
        check_name(name, [name])
        check_finite(a, [name])
    return tensors, metadata, received


def _metadata_fields(metadata: Mapping[str, str], names: tuple[str, ...], limits: Limits) -> dict[str, Any]:
    """The given keys of the metadata, each decoded from JSON text (other keys are ignored)."""
    out = {}
    for key in names:
        if key in metadata:
            try:
                out[key] = orjson.loads(metadata[key])
            except orjson.JSONDecodeError:
                raise BodyError(
                    422,
                    "invalid-request",
                    f"metadata {key!r} must be JSON text, got {metadata[key][:100]!r}",
                    errors=[{"loc": ["body", "__metadata__", key], "msg": "not JSON"}],
                ) from None
            if isinstance(out[key], dict):
                check_count(len(out[key]), limits, key)
    return out


def encode(tensors: Mapping[str, Array], metadata: Mapping[str, Any]) -> Encoded:
    """A safetensors body as parts: the header, then each array's buffer (each metadata value as JSON text)."""
    # ascontiguousarray makes 0-d arrays 1-d: reshape keeps a scalar a scalar (a view, no copy).
    contiguous = ((n, np.ascontiguousarray(a).reshape(a.shape)) for n, a in tensors.items())
    arrays = sorted(contiguous, key=lambda na: -na[1].itemsize)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {key: orjson.dumps(value).decode() for key, value in metadata.items()}
    offset = 0
    for name, a in arrays:
        spans = [offset, offset + a.nbytes]
        header[name] = {"dtype": _WRITE[a.dtype.name], "shape": list(a.shape), "data_offsets": spans}
        offset += a.nbytes
    text = orjson.dumps(header)
    text += b" " * (-(len(text) + 8) % 8)  # the data starts 8-byte aligned
    parts: list[bytes | memoryview] = [len(text).to_bytes(8, "little") + text]
    for _, a in arrays:
        if a.nbytes:
            little = a if a.dtype.byteorder in _LITTLE else a.astype(a.dtype.newbyteorder("<"))
            parts.append(little.data.cast("B"))
    return Encoded(MEDIA_TYPE, tuple(parts))


_LITTLE = ("<", "=", "|") if np.little_endian else ("<", "|")


def _step_fields(r: StepResult) -> dict[str, Any]:
    out: dict[str, Any] = {"step": r.step, "lr": r.lr}
    if r.current_step is not None:
        out["current_step"] = r.current_step
    if r.staleness is not None:
        out["staleness"] = r.staleness
    return out


class SafetensorsCodec:
    media_type: ClassVar[str] = MEDIA_TYPE

    def decode_step(self, body: memoryview, limits: Limits) -> StepBody:
        tensors, metadata, received = _checked(body, limits, GRADIENT_DTYPES)
        fields = _metadata_fields(metadata, STEP_OPTIONS, limits)
        loc = ["body", "__metadata__"]
        options = step_options(validate(schemas.StepOptions, fields, loc), loc, tensors)
        if not tensors:
            raise BodyError(422, "invalid-request", "no gradients given", errors=[{"loc": ["body"], "msg": "empty"}])
        return StepBody(tensors, options, received)

    def decode_values(self, body: memoryview, limits: Limits) -> dict[str, Array]:
        tensors, _, _ = _checked(body, limits, STATE_DTYPES)
        if not tensors:
            raise BodyError(422, "invalid-request", "no parameters given", errors=[{"loc": ["body"], "msg": "empty"}])
        return tensors

    def decode_value(self, body: memoryview, name: str, limits: Limits) -> Array:
        tensors, _, _ = _checked(body, limits, STATE_DTYPES)
        if list(tensors) != [name]:
            raise BodyError(
                422,
                "invalid-request",
                f"the safetensors body must hold exactly one tensor, named {name!r}; it holds {sorted(tensors)[:20]}",
                errors=[{"loc": ["body"], "msg": f"one tensor named {name!r}"}],
            )
        return tensors[name]

    def encode_step(self, results: Mapping[str, StepResult], with_values: bool) -> Encoded:
        tensors = {n: r.value for n, r in results.items() if with_values and r.value is not None}
        return encode(tensors, {"params": {n: _step_fields(r) for n, r in results.items()}})

    def encode_params(self, params: Mapping[str, ParamRecord], include: frozenset[str]) -> Encoded:
        tensors: dict[str, Array] = {}
        for name, rec in params.items():
            tensors[name] = rec.value
            for buffer, a in sorted(rec.state.items()):
                if "state" in include or buffer in include:
                    tensors[f"{name}@{buffer}"] = a
        return encode(tensors, {"params": {name: {"step": rec.step} for name, rec in params.items()}})

    def encode_param(self, rec: ParamRecord, include: frozenset[str]) -> Encoded:
        return self.encode_params({rec.name: rec}, include)
