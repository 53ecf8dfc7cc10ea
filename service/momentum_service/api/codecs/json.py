"""The JSON wire format, for curl and for any language: tensors as ``{"shape", "dtype", "data"}``.

Bodies are parsed by orjson (which refuses NaN, Infinity and numbers that overflow), bounded in
depth and in how many parameters they name before anything else looks at them, and validated by
the API's schemas (:mod:`..schemas`) with errors in plain words (:mod:`..messages`). A tensor's
numbers become a numpy array in one call, without per-element Python work. Every number sent
back is written with full float64 precision: float32 values are widened exactly, so parsing
the JSON as float64 and casting to the declared dtype gives back the exact bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel

from ...engine import ParamRecord, StepResult
from ...store.base import Array
from .. import schemas
from . import BodyError, Encoded, Limits, StepBody
from .checks import at, check_count, check_finite, check_shape, step_options, validate

MEDIA_TYPE = "application/json"
_DTYPES = {"float32": np.float32, "float64": np.float64}

M = TypeVar("M", bound=BaseModel)


def load(body: bytes | memoryview, limits: Limits) -> Any:
    """The body as JSON, bounded in depth (422) and in the parameters it names (413)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError(
            422, "malformed-json", f"the body is not valid JSON: {exc}", errors=[{"loc": ["body"], "msg": str(exc)}]
        ) from None
    _check_structure(obj, limits)
    return obj


def parse(
    body: bytes | memoryview, model: type[M], limits: Limits, *, explain: Callable[[Any], None] | None = None
) -> M:
    """The body validated by ``model`` (see :func:`.checks.validate` for ``explain``)."""
    return validate(model, load(body, limits), ["body"], explain=explain)


def _check_structure(obj: Any, limits: Limits) -> None:
    """422 for a body nested deeper than ``max_json_depth``; 413 for more parameters than allowed."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        if depth > limits.max_json_depth:
            raise BodyError(
                422,
                "too-deep",
                f"the JSON body is nested deeper than {limits.max_json_depth} levels",
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
                check_count(len(named), limits, key)


def to_array(t: schemas.Tensor, where: list[Any], limits: Limits) -> Array:
    """A validated JSON tensor as a numpy array (413 over the element cap, 422 if inconsistent)."""
    size = check_shape(t.shape, where, limits)
    if len(t.data) != size:
        raise BodyError(
            422,
            "invalid-tensor",
            f"{at(where)}: data has {len(t.data)} numbers but shape {t.shape} needs {size}",
            errors=[{"loc": ["body", *where], "msg": "data length != prod(shape)"}],
        )
    wide = np.array(t.data, dtype=np.float64)
    with np.errstate(over="ignore"):  # out of float32's range becomes inf, refused just below
        arr: Array = wide.astype(_DTYPES[t.dtype], copy=False).reshape(t.shape)
    check_finite(arr, where)
    return arr


def _arrays(tensors: Mapping[str, schemas.Tensor], prefix: str, limits: Limits) -> dict[str, Array]:
    return {name: to_array(t, [prefix, name], limits) for name, t in tensors.items()}


def tensor_json(a: Array) -> dict[str, Any]:
    """A tensor's JSON: its numbers as float64 (exact for float32), serialized by orjson without Python work."""
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": np.ascontiguousarray(a, dtype=np.float64).ravel()}


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def step_json(r: StepResult, with_value: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if with_value and r.value is not None:
        out.update(tensor_json(r.value))
    out["step"], out["lr"] = r.step, r.lr
    if r.current_step is not None:
        out["current_step"] = r.current_step
    if r.staleness is not None:
        out["staleness"] = r.staleness
    return out


def param_json(rec: ParamRecord, include: frozenset[str]) -> dict[str, Any]:
    out = {"name": rec.name, **tensor_json(rec.value), "step": rec.step}
    if "velocity" in include:
        out["velocity"] = None if rec.velocity is None else tensor_json(rec.velocity)
    if "state" in include:
        out["state"] = {name: tensor_json(a) for name, a in sorted(rec.state.items())}
    return out


class JsonCodec:
    media_type: ClassVar[str] = MEDIA_TYPE

    def decode_step(self, body: memoryview, limits: Limits) -> StepBody:
        parsed = parse(body, schemas.StepRequest, limits)
        grads = _arrays(parsed.gradients, "gradients", limits)
        return StepBody(grads, step_options(parsed, ["body"], grads))

    def decode_values(self, body: memoryview, limits: Limits) -> dict[str, Array]:
        return _arrays(parse(body, schemas.ParamsPut, limits).params, "params", limits)

    def decode_value(self, body: memoryview, name: str, limits: Limits) -> Array:
        return to_array(parse(body, schemas.Tensor, limits), [], limits)

    def encode_step(self, results: Mapping[str, StepResult], with_values: bool) -> Encoded:
        return Encoded(MEDIA_TYPE, (dumps({"params": {n: step_json(r, with_values) for n, r in results.items()}}),))

    def encode_params(self, params: Mapping[str, ParamRecord], include: frozenset[str]) -> Encoded:
        content = {"params": {n: param_json(p, include) for n, p in params.items()}}
        return Encoded(MEDIA_TYPE, (dumps(content),))

    def encode_param(self, rec: ParamRecord, include: frozenset[str]) -> Encoded:
        return Encoded(MEDIA_TYPE, (dumps(param_json(rec, include)),))
