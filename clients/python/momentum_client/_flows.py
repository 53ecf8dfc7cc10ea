"""The flows of every operation but the steps (those are in ``_steps``): models, parameters and
the health probes. Each is a generator run by a client (see ``_flow``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _safetensors
from ._errors import error_from_response, raise_for_status, unexpected
from ._exceptions import ModelConfigWarning, ModelExists, PreconditionFailed
from ._flow import Buffer, Flow, Request, Response, send
from ._models import HYPERPARAMETERS, ModelInfo, ModelSummary, OptimizerConfig, ParamState
from ._parse import (
    expect_bool,
    expect_int,
    expect_object,
    expect_str,
    parse,
    parse_entries,
    parse_model,
    parse_model_page,
)
from ._requests import (
    BINARY_ACCEPT,
    NEUTRAL,
    Durability,
    Wire,
    as_index,
    durability_json,
    groups_json,
    json_request,
    mode_json,
    model_body,
    model_path,
    optimizer_json,
    param_path,
    schedule_json,
    segment,
    tensor_request,
)
from ._tensors import SAFETENSORS, Array, decode_tensor

# -- models ----------------------------------------------------------------------------------


def config_differences(requested: Mapping[str, Any], existing: Mapping[str, Any]) -> list[str]:
    """What a requested config body sets differently from an existing model's config.

    Only what the request says is compared (a field it leaves out, the server fills with its
    default, and so does the existing config), plus the rule and the mode.
    """
    out = []
    asked_opt, have_opt = dict(requested.get("optimizer", {})), dict(existing.get("optimizer", {}))
    asked_opt.setdefault("rule", "pytorch")
    for key, value in asked_opt.items():
        if have_opt.get(key, NEUTRAL.get(key)) != value:
            out.append(f"optimizer.{key}: asked {value!r}, the model has {have_opt.get(key)!r}")
    for key, value in {k: v for k, v in have_opt.items() if k in NEUTRAL and k not in asked_opt}.items():
        if value != NEUTRAL[key]:
            out.append(f"optimizer.{key}: asked {NEUTRAL[key]!r} (the default), the model has {value!r}")
    asked_schedule = dict(requested.get("schedule") or {"type": "constant"})
    have_schedule = dict(existing.get("schedule") or {"type": "constant"})
    if any(have_schedule.get(k) != v for k, v in asked_schedule.items()):
        out.append(f"schedule: asked {asked_schedule}, the model has {have_schedule}")
    for key in ("mode", "workers", "max_staleness"):
        asked = requested.get(key, "async" if key == "mode" else None)
        if existing.get(key, "async" if key == "mode" else None) != asked:
            out.append(f"{key}: asked {asked!r}, the model has {existing.get(key)!r}")
    if "durability" in requested and requested["durability"] != existing.get("durability", "step"):
        out.append(f"durability: asked {requested['durability']!r}, the model has {existing.get('durability')!r}")
    if "groups" in requested:
        asked_groups, have_groups = list(requested["groups"]), list(existing.get("groups") or [])
        if len(asked_groups) != len(have_groups) or any(
            {**{k: h.get(k) for k in a}, "name": h.get("name")} != {"name": str(i), **a}
            for i, (a, h) in enumerate(zip(asked_groups, have_groups, strict=True))
        ):
            out.append(f"groups: asked {asked_groups!r}, the model has {have_groups!r}")
    return out


def create_model(
    model: str,
    config: OptimizerConfig,
    schedule: Mapping[str, Any] | None,
    mode: str = "async",
    workers: int | None = None,
    max_staleness: int | None = None,
    exist_ok: bool = False,
    durability: Durability | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
    shards: int | None = None,
) -> Flow[ModelInfo]:
    """PUT the model with ``If-None-Match: *``: create it, never change an existing one.

    An existing model raises :class:`ModelExists`, or with ``exist_ok`` is returned as it is
    (a :class:`ModelConfigWarning` lists how its config differs from the one asked for).
    """
    body = model_body(config, schedule, mode, workers, max_staleness, durability, groups, shards)
    response = yield from send(json_request("PUT", model_path(model), body, {"If-None-Match": "*"}))
    if response.status == 412 and exist_ok:
        error = error_from_response(response)
        if isinstance(error, ModelExists):
            differences = config_differences(body, error.existing_config)
            if differences:
                warnings.warn(
                    ModelConfigWarning(
                        f"model {model!r} exists with another config than asked for, and was left as it is: "
                        + "; ".join(differences)
                    ),
                    stacklevel=4,
                )
            return (yield from get_model(model))
    return parse(response, parse_model)


def replace_model(
    model: str,
    config: OptimizerConfig,
    schedule: Mapping[str, Any] | None,
    mode: str = "async",
    workers: int | None = None,
    max_staleness: int | None = None,
    durability: Durability | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
    shards: int | None = None,
) -> Flow[ModelInfo]:
    """PUT the model's whole config (created if it does not exist; parameters are kept; same rule only)."""
    body = model_body(config, schedule, mode, workers, max_staleness, durability, groups, shards)
    response = yield from send(json_request("PUT", model_path(model), body))
    return parse(response, parse_model)


def update_model(
    model: str,
    hyperparameters: Mapping[str, object],
    schedule: Mapping[str, Any] | None = None,
    mode: str | None = None,
    workers: int | None = None,
    max_staleness: int | None = None,
    durability: Durability | None = None,
    groups: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
) -> Flow[ModelInfo]:
    """PATCH some hyperparameters, the schedule, mode fields, durability and/or groups; unknown names raise
    ``TypeError`` before sending."""
    unknown = [key for key in hyperparameters if key not in HYPERPARAMETERS]
    if unknown:
        raise TypeError(
            f"update_model() got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid names are {', '.join(HYPERPARAMETERS)}"
        )
    mode_fields = mode_json(mode, workers, max_staleness)
    if not hyperparameters and schedule is None and not mode_fields and durability is None and groups is None:
        raise TypeError(
            "update_model() needs at least one hyperparameter, a schedule, mode, workers, max_staleness, durability "
            "or groups"
        )
    body: dict[str, Any] = {}
    if hyperparameters:
        body["optimizer"] = optimizer_json(hyperparameters)
    if schedule is not None:
        body["schedule"] = schedule_json(schedule)
    body.update(mode_fields)
    if durability is not None:
        body["durability"] = durability_json(durability)
    if groups is not None:
        body["groups"] = groups_json(groups)
    response = yield from send(json_request("PATCH", model_path(model), body))
    return parse(response, parse_model)


def list_models(page_size: int = 100) -> Flow[list[ModelSummary]]:
    """GET every page of the model list (those the client's key may read), in name order."""
    limit = as_index(page_size, "page_size")
    if not 1 <= limit <= 1000:
        raise ValueError(f"page_size must be from 1 to 1000, got {page_size!r}")
    models: list[ModelSummary] = []
    after: str | None = None
    while True:
        params = {"limit": str(limit)} | ({"after": after} if after is not None else {})
        response = yield from send(Request("GET", "/v1/models", params=params))
        page, after = parse(response, parse_model_page)
        models += page
        if after is None:
            return models


def save_checkpoint(model: str) -> Flow[memoryview]:
    """GET the model's checkpoint file (safetensors: values, state buffers, steps and config)."""
    response = yield from send(Request("GET", model_path(model) + "/checkpoint", headers={"Accept": SAFETENSORS}))
    raise_for_status(response)
    if response.headers.get("content-type", "").split(";")[0].strip() != SAFETENSORS:
        raise unexpected(response, "expected a safetensors checkpoint file")
    content = response.content
    return (content.data if isinstance(content, np.ndarray) else memoryview(content)).cast("B")


def load_checkpoint(model: str, content: Buffer, replace: bool) -> Flow[ModelInfo]:
    """PUT a checkpoint file: create the model from it, or (``replace``) replace the model whole."""
    headers = {"Content-Type": SAFETENSORS} | ({} if replace else {"If-None-Match": "*"})
    response = yield from send(Request("PUT", model_path(model) + "/checkpoint", headers=headers, content=(content,)))
    return parse(response, parse_model)


def get_model(model: str) -> Flow[ModelInfo]:
    """GET the model representation."""
    response = yield from send(Request("GET", model_path(model)))
    return parse(response, parse_model)


def delete_model(model: str) -> Flow[None]:
    """DELETE the model and all its parameters."""
    response = yield from send(Request("DELETE", model_path(model)))
    raise_for_status(response)


# -- parameters ------------------------------------------------------------------------------


def init_params(
    model: str, params: Mapping[str, npt.ArrayLike], exist_ok: bool, wire: Wire = "json"
) -> Flow[dict[str, bool]]:
    """Bulk PUT parameters; returns ``{name: created}`` in the order given.

    With ``exist_ok`` each request carries ``If-None-Match: *`` (all-or-nothing on the server);
    on 412 the names in ``existing`` are marked not created and the rest is sent again, until
    nothing is left. Existing parameters are thus never overwritten, even when many workers
    initialize the same model concurrently.
    """
    path = model_path(model) + "/params"
    pending = dict(params)
    created: dict[str, bool] = {}
    while pending:
        headers = {"If-None-Match": "*"} if exist_ok else None
        response = yield from send(tensor_request("PUT", path, pending, {}, "parameter", wire, headers))
        if exist_ok and response.status == 412:
            error = error_from_response(response)
            assert isinstance(error, PreconditionFailed)
            existing = [name for name in error.existing if name in pending]
            if not existing:  # no progress possible: surface the server's answer
                raise error
            for name in existing:
                created[name] = False
                del pending[name]
            continue
        flags = parse(
            response,
            lambda body: {name: expect_bool(expect_object(p)["created"]) for name, p in body["params"].items()},
        )
        missing = pending.keys() - flags.keys()
        if missing:
            raise unexpected(response, f"no result for parameter(s) {sorted(missing)}")
        created.update((name, flags[name]) for name in pending)
        break
    return {name: created[name] for name in params}


def get_params(model: str, names: Iterable[str] | None, wire: Wire = "json") -> Flow[dict[str, Array]]:
    """GET all parameters' values, or only ``names``."""
    query: dict[str, str] = {}
    if names is not None:
        if isinstance(names, str):
            raise TypeError("names must be an iterable of parameter names, not a single str")
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            segment(name, "parameter")
            if "," in name:
                raise ValueError(f"parameter name {name!r} contains ',' and cannot be listed in ?names=")
        if not wanted:
            return {}
        query["names"] = ",".join(wanted)
    headers = {"Accept": BINARY_ACCEPT} if wire == "safetensors" else {}
    response = yield from send(Request("GET", model_path(model) + "/params", params=query, headers=headers))
    return _values(response)


def _values(response: Response) -> dict[str, Array]:
    out = {}
    for name, (value, _, _) in parse_entries(response).items():
        if value is None:
            raise unexpected(response, f"no value for parameter {name!r}")
        out[name] = value
    return out


def get_param_state(model: str, name: str, wire: Wire = "json") -> Flow[ParamState]:
    """GET one parameter with its rule's state (every named buffer, the momentum buffer among them)."""
    path = param_path(model, name)
    if wire == "safetensors":
        headers = {"Accept": BINARY_ACCEPT}
        response = yield from send(Request("GET", path, params={"include": "state"}, headers=headers))
        raise_for_status(response)
        try:
            arrays, metadata = _safetensors.decode(response.content)
            fields = expect_object(expect_object(metadata["params"])[name])
        except (KeyError, TypeError, ValueError) as exc:
            raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc
        if name not in arrays:
            raise unexpected(response, f"no value for parameter {name!r}")
        prefix = f"{name}@"
        state = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
        return ParamState(name, arrays[name], state.get("velocity"), expect_int(fields.get("step")), state)
    response = yield from send(Request("GET", path, params={"include": "state"}))

    def parser(body: Any) -> ParamState:
        state = {
            expect_str(k): decode_tensor(t) for k, t in expect_object(expect_object(body).get("state", {})).items()
        }
        return ParamState(
            expect_str(body["name"]), decode_tensor(body), state.get("velocity"), expect_int(body["step"]), state
        )

    return parse(response, parser)


def delete_param(model: str, name: str) -> Flow[None]:
    """DELETE one parameter."""
    response = yield from send(Request("DELETE", param_path(model, name)))
    raise_for_status(response)


# -- health ----------------------------------------------------------------------------------


def probe(path: str) -> Flow[bool]:
    """GET a health endpoint: ``True`` on 200, ``False`` on any other status."""
    response = yield from send(Request("GET", path))
    return response.status == 200
