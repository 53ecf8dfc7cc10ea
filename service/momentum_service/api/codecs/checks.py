"""The checks every codec makes of what a body carries, with the same errors whatever the format."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from ...store.base import Array
from ..messages import PATTERN_HELP, summary
from ..messages import explain as explain_errors
from ..schemas import PARAM_NAME_PATTERN
from ..schemas import StepOptions as StepOptionsSchema
from . import BodyError, Limits, StepOptions

_NAME = re.compile(PARAM_NAME_PATTERN)


def check_count(n: int, limits: Limits, what: str = "the request") -> None:
    """413 when a request names more parameters than allowed, in any of its lists (tensors, expected_steps)."""
    if n > limits.max_params:
        where = "the request" if what == "the request" else f"{what} in the request"
        raise BodyError(
            413,
            "too-many-params",
            f"{where} names {n} parameters; the limit is {limits.max_params} per request",
            limit=limits.max_params,
        )


def check_name(name: str, where: list[Any]) -> None:
    if not _NAME.fullmatch(name):  # match() would let "w\n" through ($ matches before a last \n)
        raise BodyError(
            422,
            "invalid-request",
            f"tensor name {name!r} is not a valid parameter name: a name is {PATTERN_HELP['name']}",
            errors=[{"loc": ["body", *where], "msg": PATTERN_HELP["name"]}],
        )


def check_shape(shape: list[int] | tuple[int, ...], where: list[Any], limits: Limits) -> int:
    """The number of elements of a declared shape: 422 over the dimension cap, 413 over the element cap."""
    if len(shape) > limits.max_tensor_dims:
        raise BodyError(
            422,
            "invalid-tensor",
            f"{at(where)}: at most {limits.max_tensor_dims} dimensions",
            errors=[{"loc": ["body", *where], "msg": "too many dimensions"}],
        )
    counted = 1
    for d in shape:
        counted *= d if d else 1  # numpy refuses [0, 2**62] too: no elements, but too big
    if counted > limits.max_tensor_elements:
        size = 0 if 0 in shape else counted
        aside = " (zero dimensions aside)" if counted != size else ""
        raise BodyError(
            413,
            "tensor-too-large",
            f"{at(where)}: shape {list(shape)} has {counted} elements{aside}; "
            f"the limit is {limits.max_tensor_elements}",
            limit=limits.max_tensor_elements,
        )
    return 0 if 0 in shape else counted


def check_finite(a: Array, where: list[Any]) -> None:
    if not np.isfinite(a).all():
        raise BodyError(
            422,
            "non-finite",
            f"{at(where)}: every number must be finite in {a.dtype.name}",
            errors=[{"loc": ["body", *where], "msg": "non-finite number"}],
        )


def at(where: list[Any]) -> str:
    return ".".join(str(w) for w in where)


# At most this many errors are listed (and how many there were): a request naming a million bad
# parameters must not get a response bigger than itself.
MAX_ERRORS = 20


def invalid_request(errors: list[dict[str, Any]]) -> BodyError:
    """A 422 listing the first ``MAX_ERRORS`` errors (and how many there are in all)."""
    extra: dict[str, Any] = {"error_count": len(errors)} if len(errors) > MAX_ERRORS else {}
    return BodyError(422, "invalid-request", summary(errors), errors=errors[:MAX_ERRORS], **extra)


M = TypeVar("M", bound=BaseModel)


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
        raise invalid_request(explain_errors(exc.errors(include_url=False), obj, loc, model)) from None


def step_options(valid: StepOptionsSchema, loc: list[Any], grads: dict[str, Array]) -> StepOptions:
    """A step's options (validated by the API's ``StepOptions`` schema), naming only sent gradients."""
    if valid.expected_steps is not None:
        extra = sorted(set(valid.expected_steps) - set(grads))
        if extra:
            raise invalid_request(
                [
                    {"loc": [*loc, "expected_steps", n], "msg": f"expected_steps names {n!r}, which has no gradient"}
                    for n in extra
                ]
            )
    return StepOptions(valid.return_params, valid.expected_steps, valid.worker_id, valid.base_step, valid.metrics)
