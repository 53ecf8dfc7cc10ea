"""Reading request bodies: media type, size limit, JSON parsing, validation, tensors.

Bodies are parsed here rather than by FastAPI so that a 64 MiB body is refused before
it is read, JSON is parsed by orjson (which also refuses NaN, Infinity and overflowing
numbers), and tensors become numpy arrays without per-element Python work.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..settings import Settings
from ..store.base import Array
from .problems import Problem, validation_errors
from .schemas import Tensor

M = TypeVar("M", bound=BaseModel)

_DTYPES = {"float32": np.float32, "float64": np.float64}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Problem(400, "bad-content-length", "Content-Length is not a number") from None
        if size > limit:
            raise Problem(413, "body-too-large", f"the body is {size} bytes; the limit is {limit}", limit=limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise Problem(413, "body-too-large", f"the body exceeds the limit of {limit} bytes", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_json(request: Request, model: type[M], settings: Settings) -> M:
    parsed, _ = await parse_json_raw(request, model, settings)
    return parsed


async def parse_json_raw(request: Request, model: type[M], settings: Settings) -> tuple[M, bytes]:
    """The validated body, and its bytes (for an idempotency fingerprint)."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise Problem(
            415,
            "unsupported-media-type",
            f"send the body as Content-Type: application/json (got {content_type or 'none'!r})",
            headers={"Accept-Post": "application/json"},
        )
    raw = await read_limited(request, settings.max_body_bytes)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            422, "malformed-json", f"the body is not valid JSON: {exc}", errors=[{"loc": ["body"], "msg": str(exc)}]
        ) from None
    try:
        return model.model_validate(obj), raw
    except ValidationError as exc:
        errs = validation_errors(exc.errors(include_url=False, include_input=False))
        for e in errs:
            e["loc"] = ["body", *e["loc"]]
        raise Problem(422, "invalid-request", "the request body is not valid", errors=errs) from None


def to_array(t: Tensor, where: list[Any], settings: Settings) -> Array:
    """A validated JSON tensor as a numpy array (413 over the element cap, 422 if inconsistent)."""
    if len(t.shape) > settings.max_tensor_dims:
        raise Problem(
            422, "invalid-tensor", f"{_at(where)}: at most {settings.max_tensor_dims} dimensions", errors=_err(where)
        )
    size = math.prod(t.shape)
    if size > settings.max_tensor_elements:
        raise Problem(
            413,
            "tensor-too-large",
            f"{_at(where)}: shape {t.shape} has {size} elements; the limit is {settings.max_tensor_elements}",
            limit=settings.max_tensor_elements,
        )
    if len(t.data) != size:
        raise Problem(
            422,
            "invalid-tensor",
            f"{_at(where)}: data has {len(t.data)} numbers but shape {t.shape} needs {size}",
            errors=_err(where, "data length != prod(shape)"),
        )
    wide = np.array(t.data, dtype=np.float64)
    with np.errstate(over="ignore"):  # out of float32's range becomes inf, refused just below
        arr: Array = wide.astype(_DTYPES[t.dtype], copy=False).reshape(t.shape)
    if not np.isfinite(arr).all():
        raise Problem(
            422,
            "non-finite",
            f"{_at(where)}: every number must be finite in {t.dtype}",
            errors=_err(where, "non-finite number"),
        )
    return arr


def _at(where: list[Any]) -> str:
    return ".".join(str(w) for w in where)


def _err(where: list[Any], msg: str = "invalid tensor") -> list[dict[str, Any]]:
    return [{"loc": ["body", *where], "msg": msg}]


def encode_array(a: Array) -> np.ndarray[Any, np.dtype[np.float64]]:
    """float64 view of an array for JSON: widening float32 is exact, so no digit is lost."""
    return np.ascontiguousarray(a, dtype=np.float64)


def tensor_json(a: Array) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": encode_array(a).ravel()}


def json_response_bytes(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
