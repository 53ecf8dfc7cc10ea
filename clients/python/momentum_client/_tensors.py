"""numpy arrays (and torch tensors) <-> the API's tensors in JSON, and the JSON codec.

The binary wire format (the default) is safetensors, written and read in ``_safetensors.py``.

A tensor in JSON is ``{"shape": [...], "dtype": "float32"|"float64", "data": [flat row-major]}``.
Values travel as float64 decimals with round-trip precision: a float32 array is widened to
float64 (exact) before encoding, and decoding parses float64 then casts to the declared dtype,
which gives back the exact bits. ``orjson`` is used when importable (much faster for large
arrays); otherwise the standard library ``json``.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Array",
    "DTYPES",
    "SAFETENSORS",
    "as_float_array",
    "as_wire_array",
    "decode_tensor",
    "dumps",
    "encode_tensor",
    "loads",
]

SAFETENSORS = "application/x-safetensors"


def _optional_orjson() -> Any:
    try:  # an optional speedup, not a dependency of the client
        return importlib.import_module("orjson")
    except ImportError:  # pragma: no cover - depends on the environment
        return None


_orjson: Any = _optional_orjson()

Array = npt.NDArray[np.floating[Any]]
"""A float32 or float64 numpy array."""

DTYPES = ("float32", "float64")


def _is_torch(value: Any) -> bool:
    return type(value).__module__.split(".", 1)[0] == "torch" and hasattr(value, "detach")


def _from_torch(value: Any) -> Any:
    """A torch tensor as a numpy array without a copy where torch allows one; anything else as it is.

    The tensor may require grad (it is detached) or live on a GPU (it is copied to the CPU).
    bfloat16, which numpy lacks, is widened to float32, exactly (a bfloat16 is the top half of
    a float32). torch is never imported here: a tensor's own methods are used.
    """
    if not _is_torch(value):
        return value
    tensor = value.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    return tensor.numpy()


def as_wire_array(value: Any, what: str, *, half: bool = False) -> Any:
    """``value`` for the binary wire: :func:`as_float_array`, except that a torch bfloat16 gradient
    (``half``) goes as its raw bits (``_safetensors.Bfloat16``), at half the bytes of float32."""
    if half and _is_torch(value) and str(value.dtype) == "torch.bfloat16":
        import torch  # the caller has it: the value is a torch tensor

        from ._safetensors import Bfloat16

        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        return Bfloat16(tensor.contiguous().view(torch.int16).numpy().view(np.uint16))
    return as_float_array(value, what, half=half)


def as_float_array(value: npt.ArrayLike, what: str, *, half: bool = False) -> Array:
    """``value`` as a float32/float64 array (or float16, with ``half``).

    Arrays (and anything ``np.asarray`` understands) keep their float32/float64 dtype; torch
    tensors too, on any device, requiring grad or not (bfloat16 ones become float32, exactly);
    Python ints, floats and (nested) lists of them become float64. Any other dtype (float16
    unless ``half``, integer arrays, bool, complex, ...) raises :class:`TypeError`.
    """
    arr = np.asarray(_from_torch(value))
    if arr.dtype.kind == "f" and (arr.dtype.itemsize in (4, 8) or (half and arr.dtype.itemsize == 2)):
        return arr
    if arr.dtype.kind in "iu" and _is_python_number_or_list(value):
        return arr.astype(np.float64)
    raise TypeError(
        f"{what} has dtype {arr.dtype}; only float32 and float64 are supported "
        "(convert explicitly, e.g. with .astype(np.float32))"
    )


def _is_python_number_or_list(value: object) -> bool:
    return isinstance(value, (int, float, list, tuple)) and not isinstance(value, bool)


def encode_tensor(value: npt.ArrayLike, what: str, *, half: bool = False) -> dict[str, Any]:
    """The JSON tensor object for ``value``; its ``data`` is a flat float64 array for :func:`dumps`.

    Raises :class:`TypeError` for unsupported dtypes and :class:`ValueError` for NaN or
    infinity, which JSON cannot represent. ``what`` names the value in those messages. With
    ``half`` (gradients), float16 is accepted and sent as float32 (exact).
    """
    arr = as_float_array(value, what, half=half)
    if arr.dtype.itemsize == 2:
        arr = arr.astype(np.float32)
    flat = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)  # float32 -> float64 is exact
    finite = np.isfinite(flat)
    if not finite.all():
        index = int(np.argmin(finite))
        raise ValueError(f"{what} contains {flat[index]} at flat index {index}; JSON cannot carry NaN or infinity")
    return {"shape": list(arr.shape), "dtype": "float32" if arr.dtype.itemsize == 4 else "float64", "data": flat}


def decode_tensor(obj: Any) -> Array:
    """The array for a JSON tensor object. Raises ``TypeError``/``ValueError`` when malformed."""
    if not isinstance(obj, dict):
        raise TypeError(f"a tensor must be a JSON object, got {type(obj).__name__}")
    shape, dtype, data = obj["shape"], obj["dtype"], obj["data"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"tensor shape must be a list of non-negative integers, got {shape!r}")
    if dtype not in DTYPES:
        raise ValueError(f"tensor dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(data, list):
        raise TypeError(f"tensor data must be a JSON array, got {type(data).__name__}")
    flat = np.asarray(data)
    if flat.dtype.kind not in "fiu" and flat.size:  # strings, nulls, booleans, nested objects
        raise ValueError("tensor data must be an array of numbers")
    flat = flat.astype(np.float64, copy=False)
    if flat.ndim != 1 or flat.size != math.prod(shape):
        raise ValueError(f"tensor data has {flat.size} numbers, shape {shape} needs {math.prod(shape)}")
    return flat.astype(np.dtype(dtype), copy=False).reshape(shape)


def dumps(body: Any) -> bytes:
    """Encode a request body; numpy arrays in it (from :func:`encode_tensor`) become JSON arrays."""
    if _orjson is not None:
        encoded: bytes = _orjson.dumps(body, option=_orjson.OPT_SERIALIZE_NUMPY)
        return encoded
    return json.dumps(body, allow_nan=False, separators=(",", ":"), default=_to_list).encode()


def _to_list(value: object) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def loads(content: Any) -> Any:
    """Decode a response body (bytes, or a buffer of them)."""
    if _orjson is not None:
        return _orjson.loads(content if isinstance(content, bytes | memoryview) else memoryview(content))
    return json.loads(bytes(content))
