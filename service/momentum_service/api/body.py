"""Reading request bodies: media type, size limit, JSON parsing, validation, tensors.

Bodies are parsed here rather than by FastAPI so that a 64 MiB body is refused before
it is read, JSON is parsed by orjson (which also refuses NaN, Infinity and overflowing
numbers), and tensors become numpy arrays without per-element Python work.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..settings import Settings
from ..store.base import Array
from . import messages, wire
from .admission import body_of
from .problems import Problem
from .schemas import PARAM_NAME_PATTERN, Tensor

M = TypeVar("M", bound=BaseModel)

_DTYPES = {"float32": np.float32, "float64": np.float64}
_PARAM_NAME = re.compile(PARAM_NAME_PATTERN)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


@dataclass(frozen=True, slots=True)
class TensorBody(Generic[M]):
    """A body that carries tensors, as JSON (``parsed``) or as safetensors (``tensors`` and ``metadata``)."""

    parsed: M | None
    tensors: dict[str, Array]
    metadata: dict[str, str]
    raw: memoryview


async def parse_tensor_body(
    request: Request, model: type[M], settings: Settings, *, dtypes: frozenset[str] = wire.STATE_DTYPES
) -> TensorBody[M]:
    """Either JSON validated by ``model`` or safetensors (tensors of ``dtypes``); 415 for anything else."""
    content_type = request.headers.get("content-type", "")
    if wire.is_safetensors(content_type):
        raw = body_of(request)
        tensors, metadata = await off_the_loop(len(raw), _read_safetensors, raw, settings, dtypes)
        return TensorBody(None, tensors, metadata, raw)
    parsed, raw = await parse_json_raw(request, model, settings)
    return TensorBody(parsed, {}, {}, raw)


def _read_safetensors(
    raw: memoryview, settings: Settings, dtypes: frozenset[str]
) -> tuple[dict[str, Array], dict[str, str]]:
    try:
        tensors, metadata = wire.parse(raw, settings, allowed=dtypes)
    except ValueError as exc:  # numpy refuses a shape like [0, 2**62]: no elements, but too big
        detail = f"a tensor's shape is not valid: {exc}"
        raise Problem(422, "malformed-safetensors", detail, errors=[{"loc": ["body"], "msg": detail}]) from None
    check_count(len(tensors), settings)
    for name, a in tensors.items():
        if not _PARAM_NAME.fullmatch(name):  # match() would let "w\n" through ($ matches before a last \n)
            raise Problem(
                422,
                "invalid-request",
                f"tensor name {name!r} is not a valid parameter name",
                errors=[{"loc": ["body", name], "msg": messages.PATTERN_HELP["name"]}],
            )
        check_finite(a, [name])
    return tensors, metadata


# Work on a body bigger than this (parsing, validating, checking every number) runs in a worker
# thread, so that one large or hostile request does not stall every other request on the loop.
OFFLOAD_BYTES = 1 << 20

T = TypeVar("T")


async def off_the_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when ``size`` (the bytes it works on) is over OFFLOAD_BYTES."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def metadata_fields(metadata: dict[str, str], names: tuple[str, ...], settings: Settings) -> dict[str, Any]:
    """The given keys of safetensors metadata, each decoded from JSON text (other keys are ignored)."""
    out = {}
    for key in names:
        if key in metadata:
            try:
                out[key] = orjson.loads(metadata[key])
            except orjson.JSONDecodeError:
                raise Problem(
                    422,
                    "invalid-request",
                    f"metadata {key!r} must be JSON text, got {metadata[key][:100]!r}",
                    errors=[{"loc": ["body", "__metadata__", key], "msg": "not JSON"}],
                ) from None
            if isinstance(out[key], dict):
                check_count(len(out[key]), settings, key)
    return out


def validate(model: type[M], obj: Any, loc: list[Any], *, explain: Callable[[Any], None] | None = None) -> M:
    """``obj`` validated by ``model``; else a 422 whose errors say in plain words what is wrong.

    ``explain`` is called with ``obj`` first when validation fails: a domain check that may raise
    a more telling error (a config's own validation names the field and the allowed values).
    """
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        if explain is not None:
            explain(obj)
        raise invalid_request(messages.explain(exc.errors(include_url=False), obj, loc, model)) from None


def invalid_request(errors: list[dict[str, Any]]) -> Problem:
    """A 422 listing the first ``MAX_ERRORS`` errors (and how many there are in all)."""
    shown = errors[:MAX_ERRORS]
    extra: dict[str, Any] = {"error_count": len(errors)} if len(errors) > MAX_ERRORS else {}
    return Problem(422, "invalid-request", messages.summary(errors), errors=shown, **extra)


# An error lists at most this many problems: a request naming a million bad parameters must not
# get a response bigger than itself.
MAX_ERRORS = 20


def check_finite(a: Array, where: list[Any]) -> None:
    if not np.isfinite(a).all():
        raise Problem(
            422,
            "non-finite",
            f"{_at(where)}: every number must be finite in {a.dtype.name}",
            errors=_err(where, "non-finite number"),
        )


async def parse_json(
    request: Request, model: type[M], settings: Settings, *, explain: Callable[[Any], None] | None = None
) -> M:
    parsed, _ = await parse_json_raw(request, model, settings, explain=explain)
    return parsed


async def parse_json_raw(
    request: Request, model: type[M], settings: Settings, *, explain: Callable[[Any], None] | None = None
) -> tuple[M, memoryview]:
    """The validated body, and its bytes (for an idempotency fingerprint); see :func:`validate`."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise Problem(
            415,
            "unsupported-media-type",
            f"send the body as Content-Type: application/json or {wire.MEDIA_TYPE} where tensors are sent "
            f"(got {content_type or 'none'!r})",
            headers={"Accept-Post": f"application/json, {wire.MEDIA_TYPE}"},
        )
    raw = body_of(request)
    return await off_the_loop(len(raw), _decode_json, raw, model, settings, explain), raw


def _decode_json(raw: memoryview, model: type[M], settings: Settings, explain: Callable[[Any], None] | None) -> M:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            422, "malformed-json", f"the body is not valid JSON: {exc}", errors=[{"loc": ["body"], "msg": str(exc)}]
        ) from None
    _check_shape(obj, settings)
    return validate(model, obj, ["body"], explain=explain)


def _check_shape(obj: Any, settings: Settings) -> None:
    """422 for a body nested deeper than ``max_json_depth``; 413 for more tensors than allowed."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > settings.max_json_depth:
            raise Problem(
                422,
                "too-deep",
                f"the JSON body is nested deeper than {settings.max_json_depth} levels",
                errors=[{"loc": ["body"], "msg": "too deeply nested"}],
            )
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list) and node and isinstance(node[0], (dict, list)):
            # A list of numbers (a tensor's data) is a leaf: it is not walked element by element.
            stack.extend((v, level + 1) for v in node if isinstance(v, (dict, list)))
    if isinstance(obj, dict):
        for key in ("gradients", "params", "expected_steps"):
            named = obj.get(key)
            if isinstance(named, dict):
                check_count(len(named), settings, key)


def check_count(n: int, settings: Settings, what: str = "the request") -> None:
    """413 when a request names more parameters than allowed, in any of its lists (tensors, expected_steps)."""
    if n > settings.max_params_per_request:
        where = "the request" if what == "the request" else f"{what} in the request"
        raise Problem(
            413,
            "too-many-params",
            f"{where} names {n} parameters; the limit is {settings.max_params_per_request} per request",
            limit=settings.max_params_per_request,
        )


def to_array(t: Tensor, where: list[Any], settings: Settings) -> Array:
    """A validated JSON tensor as a numpy array (413 over the element cap, 422 if inconsistent)."""
    if len(t.shape) > settings.max_tensor_dims:
        raise Problem(
            422, "invalid-tensor", f"{_at(where)}: at most {settings.max_tensor_dims} dimensions", errors=_err(where)
        )
    size = math.prod(t.shape)
    counted = math.prod(d for d in t.shape if d)  # numpy refuses [0, 2**62] too: no elements, but too big
    if counted > settings.max_tensor_elements:
        aside = " (zero dimensions aside)" if counted != size else ""
        raise Problem(
            413,
            "tensor-too-large",
            f"{_at(where)}: shape {t.shape} has {counted} elements{aside}; the limit is {settings.max_tensor_elements}",
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
    check_finite(arr, where)
    return arr


async def arrays_of(tensors: dict[str, Tensor], prefix: str, settings: Settings, size: int) -> dict[str, Array]:
    """The validated JSON tensors of a body of ``size`` bytes as arrays (off the loop when large)."""

    def convert() -> dict[str, Array]:
        return {name: to_array(t, [prefix, name], settings) for name, t in tensors.items()}

    return await off_the_loop(size, convert)


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
