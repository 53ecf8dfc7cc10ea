"""Building requests: the base URL and the headers every request carries, URL paths, JSON and
safetensors bodies, and the model config bodies; arguments are checked here, before sending."""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, TypeAlias
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from . import _safetensors
from ._flow import Request
from ._models import OptimizerConfig
from ._tensors import SAFETENSORS, as_wire_array, dumps, encode_tensor
from ._version import __version__

Wire: TypeAlias = Literal["safetensors", "json"]
"""How tensors travel: ``"safetensors"`` (binary, the default) or ``"json"``."""

WIRES = ("safetensors", "json")
BINARY_ACCEPT = f"{SAFETENSORS}, application/json, application/problem+json"

DEFAULT_HEADERS = {
    "Accept": "application/json, application/problem+json",
    "User-Agent": f"momentum-client/{__version__}",
}


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer`` for ``api_key``, else for ``$MOMENTUM_API_KEY``, else nothing."""
    key = api_key if api_key is not None else os.environ.get("MOMENTUM_API_KEY")
    if key is None or key == "":
        return {}
    if not isinstance(key, str) or not _KEY_TEXT.fullmatch(key):
        raise ValueError("api_key must be printable ASCII without spaces")
    return {"Authorization": f"Bearer {key}"}


_KEY_TEXT = re.compile(r"[\x21-\x7e]{1,1024}")


def normalize_base_url(base_url: str | httpx.URL) -> str:
    """``base_url`` without a trailing slash; ``ValueError`` unless it is an absolute http(s) URL."""
    url = httpx.URL(str(base_url))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url must be an absolute http:// or https:// URL, got {str(base_url)!r}")
    if url.query or url.fragment:
        raise ValueError(f"base_url must not have a query or fragment, got {str(base_url)!r}")
    return str(url).rstrip("/")


# -- paths and bodies ------------------------------------------------------------------------


def segment(name: str, what: str) -> str:
    """``name`` (of a ``what``: model, parameter...) percent-encoded as one URL path segment."""
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    if name in ("", ".", ".."):
        raise ValueError(f"{what} name {name!r} cannot be used as a URL path segment")
    return quote(name, safe="")


def model_path(model: str) -> str:
    return f"/v1/models/{segment(model, 'model')}"


def param_path(model: str, name: str) -> str:
    return f"{model_path(model)}/params/{segment(name, 'parameter')}"


def json_request(method: str, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Request:
    """A request with a JSON body."""
    return Request(
        method, path, headers={"Content-Type": "application/json", **(headers or {})}, content=(dumps(body),)
    )


def tensor_request(
    method: str,
    path: str,
    tensors: Mapping[str, npt.ArrayLike],
    fields: Mapping[str, Any],
    what: str,
    wire: Wire,
    headers: Mapping[str, str] | None = None,
) -> Request:
    """A request carrying tensors: ``{key: {name: tensor}, **fields}`` in JSON, or a safetensors body."""
    if wire == "json":
        key = "gradients" if what == "gradient" else "params"
        return json_request(method, path, {key: _encode_all(tensors, what), **fields}, headers)
    arrays = {}
    for name, value in tensors.items():
        segment(name, what)
        arrays[name] = as_wire_array(value, f"{what} {name!r}", half=what == "gradient")
    return Request(
        method,
        path,
        headers={"Content-Type": SAFETENSORS, "Accept": BINARY_ACCEPT, **(headers or {})},
        content=_safetensors.encode(arrays, fields),
    )


def _encode_all(tensors: Mapping[str, npt.ArrayLike], what: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in tensors.items():
        segment(name, what)
        out[name] = encode_tensor(value, f"{what} {name!r}", half=what == "gradient")
    return out


def as_index(value: Any, what: str) -> int:
    """``value`` as an int (numpy integers too); ``TypeError`` for anything else, bools included."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {value!r}") from None


# -- model config bodies ---------------------------------------------------------------------


# Fields sent only when they differ from their neutral value, so that a rule without them
# (e.g. keras has no dampening) is not sent one.
NEUTRAL: dict[str, object] = {"dampening": 0.0, "nesterov": False, "weight_decay": 0.0, "maximize": False}


def optimizer_json(values: Mapping[str, object]) -> dict[str, object]:
    """Hyperparameters as JSON values; numpy scalars become Python ones, NaN/inf raise ``ValueError``."""
    out: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, (bool, np.bool_)):
            value = bool(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value!r}")
        out[key] = value  # anything else is sent as is, for the server to judge
    return out


def schedule_json(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(schedule, Mapping):
        raise TypeError(f"schedule must be a mapping like {{'type': 'cosine', 'T_max': 100}}, got {schedule!r}")
    return dict(schedule)


def mode_json(mode: str | None, workers: int | None, max_staleness: int | None) -> dict[str, Any]:
    """The given mode fields (``None`` ones left out); ``TypeError`` for values of the wrong type."""
    out: dict[str, Any] = {}
    if mode is not None:
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a str ('async', 'sync' or 'bounded'), got {mode!r}")
        out["mode"] = mode
    if workers is not None:
        out["workers"] = as_index(workers, "workers")
    if max_staleness is not None:
        out["max_staleness"] = as_index(max_staleness, "max_staleness")
    return out


Durability: TypeAlias = str | Mapping[str, int]
"""When a step is acknowledged: ``"step"`` (once logged in Redis), ``{"flush_ms": N}`` (from memory) or
``{"replicas": N}`` (once logged in Redis and on N of its replicas)."""


def durability_json(durability: Durability) -> str | dict[str, int]:
    if durability == "step":
        return "step"
    if isinstance(durability, Mapping) and set(durability) == {"flush_ms"}:
        return {"flush_ms": as_index(durability["flush_ms"], "durability['flush_ms']")}
    if isinstance(durability, Mapping) and set(durability) == {"replicas"}:
        return {"replicas": as_index(durability["replicas"], "durability['replicas']")}
    raise ValueError(f'durability must be "step", {{"flush_ms": N}} or {{"replicas": N}}, got {durability!r}')


def model_body(
    config: OptimizerConfig,
    schedule: Mapping[str, Any] | None,
    mode: str,
    workers: int | None,
    max_staleness: int | None,
    durability: Durability | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
    shards: int | None = None,
) -> dict[str, Any]:
    """A model config body; ``mode`` is sent unless it is the default, async; ``durability``, ``groups`` and
    ``shards`` if given."""
    fields = {k: v for k, v in asdict(config).items() if k not in NEUTRAL or v != NEUTRAL[k]}
    body: dict[str, Any] = {"optimizer": optimizer_json(fields)}
    if schedule is not None:
        body["schedule"] = schedule_json(schedule)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str ('async', 'sync' or 'bounded'), got {mode!r}")
    body.update(mode_json(None if mode == "async" else mode, workers, max_staleness))
    if durability is not None:
        body["durability"] = durability_json(durability)
    if groups is not None:
        body["groups"] = groups_json(groups)
    if shards is not None:
        body["shards"] = as_index(shards, "shards")
    return body


def groups_json(groups: Any) -> Any:
    """Parameter groups as the API takes them: a list of ``{"params": [...], <hyperparameters>}`` (or, for
    :meth:`update_model`, ``{group name: changes}``)."""
    if isinstance(groups, Mapping):
        return {str(name): _group(change, f"groups[{name!r}]") for name, change in groups.items()}
    if isinstance(groups, str | bytes) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of dicts (or a dict of changes by group name), got {groups!r}")
    return [_group(g, f"groups[{i}]") for i, g in enumerate(groups)]


def _group(group: Mapping[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(group, Mapping):
        raise TypeError(f"{what} must be a dict of params and hyperparameters, got {group!r}")
    out = dict(group)
    if "params" in out:
        params = out["params"]
        if isinstance(params, str) or not isinstance(params, Iterable):
            raise TypeError(f"{what}['params'] must be a list of parameter names or patterns, got {params!r}")
        out["params"] = [str(p) for p in params]
    hyper = {k: v for k, v in out.items() if k not in ("params", "name")}
    return {**{k: out[k] for k in ("name", "params") if k in out}, **optimizer_json(hyper)}
