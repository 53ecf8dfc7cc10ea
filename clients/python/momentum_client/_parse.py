"""Reading success answers: :func:`parse` (status check, then a parser on the JSON body), the
``expect_*`` checks of JSON values, :func:`parse_model`, and :func:`parse_entries` for the
parameters of a params or step answer in JSON or safetensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from . import _safetensors
from ._errors import raise_for_status, unexpected
from ._flow import Response
from ._models import ModelInfo, ModelSummary, OptimizerConfig, ParamInfo
from ._tensors import DTYPES, SAFETENSORS, Array, decode_tensor, loads

T = TypeVar("T")


def parse(response: Response, parser: Callable[[Any], T]) -> T:
    """Check the status, then apply ``parser`` to the JSON body; malformed bodies raise ``UnexpectedResponse``."""
    raise_for_status(response)
    try:
        return parser(loads(response.content))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc


def expect_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def expect_optional_int(value: Any) -> int | None:
    return None if value is None else expect_int(value)


def expect_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def expect_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def expect_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def expect_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_model(body: Any) -> ModelInfo:
    """A :class:`ModelInfo` from the model representation."""
    body = expect_object(body)
    opt = expect_object(body["optimizer"])
    optimizer = OptimizerConfig(
        lr=expect_float(opt["lr"]),
        momentum=expect_float(opt["momentum"]),
        dampening=expect_float(opt.get("dampening", 0.0)),
        nesterov=expect_bool(opt.get("nesterov", False)),
        weight_decay=expect_float(opt.get("weight_decay", 0.0)),
        maximize=expect_bool(opt.get("maximize", False)),
        rule=expect_str(opt.get("rule", "pytorch")),
    )
    params = {expect_str(name): _param_info(p) for name, p in expect_object(body["params"]).items()}
    schedule = expect_object(body.get("schedule", {"type": "constant"}))
    return ModelInfo(
        name=expect_str(body["name"]),
        optimizer=optimizer,
        params=params,
        schedule=schedule,
        mode=expect_str(body.get("mode", "async")),
        workers=expect_optional_int(body.get("workers")),
        max_staleness=expect_optional_int(body.get("max_staleness")),
        durability=_durability_of(body.get("durability", "step")),
        groups=tuple(expect_object(g) for g in body.get("groups") or ()),
        shards=expect_int(body.get("shards", 1)),
        consistent=expect_bool(body.get("consistent", True)),
    )


def parse_model_page(body: Any) -> tuple[list[ModelSummary], str | None]:
    """The models of one page of ``GET /v1/models``, and the cursor of the next page (None on the last)."""
    body = expect_object(body)
    models = []
    for raw in body["models"]:
        m = expect_object(raw)
        models.append(
            ModelSummary(
                expect_str(m["name"]),
                expect_str(m["rule"]),
                expect_str(m["mode"]),
                expect_int(m["params"]),
                expect_int(m["steps"]),
            )
        )
    after = body.get("next")
    return models, None if after is None else expect_str(after)


def _durability_of(value: Any) -> str | dict[str, int]:
    if value == "step":
        return "step"
    durability = expect_object(value)
    if set(durability) not in ({"flush_ms"}, {"replicas"}):
        raise ValueError(f"unknown durability {durability!r}")
    return {k: expect_int(v) for k, v in durability.items()}


def _param_info(value: Any) -> ParamInfo:
    p = expect_object(value)
    dtype = expect_str(p["dtype"])
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return ParamInfo(shape=tuple(expect_int(n) for n in p["shape"]), dtype=dtype, step=expect_int(p["step"]))


def _is_binary(response: Response) -> bool:
    media: str = response.headers.get("content-type", "")
    return media.split(";", 1)[0].strip().lower() == SAFETENSORS


Entries: TypeAlias = dict[str, tuple[Array | None, Array | None, dict[str, Any]]]


def parse_entries(response: Response) -> Entries:
    """``{name: (value, velocity, fields)}`` from a params or step answer, JSON or safetensors.

    ``fields`` holds the per-parameter fields (``step``, ``lr``, ...); value and velocity are
    ``None`` when the answer has none.
    """

    def from_json(body: Any) -> Entries:
        out: Entries = {}
        for name, p in expect_object(expect_object(body)["params"]).items():
            p = expect_object(p)
            velocity = p.get("velocity")
            value = decode_tensor(p) if "data" in p else None
            out[expect_str(name)] = (value, None if velocity is None else decode_tensor(velocity), p)
        return out

    if not _is_binary(response):
        return parse(response, from_json)
    raise_for_status(response)
    try:
        arrays, metadata = _safetensors.decode(response.content)
        fields = expect_object(metadata["params"])
        return {
            expect_str(name): (arrays.get(name), arrays.get(f"{name}@velocity"), expect_object(p))
            for name, p in fields.items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc
