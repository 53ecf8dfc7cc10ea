"""Everything ``Client`` and ``AsyncClient`` share, without I/O.

Each API operation is a *flow*: a generator that yields the :class:`Request` objects it needs
sent, receives each :class:`Response` back, and returns the operation's result (or raises).
A client drives a flow with its own transport, so both clients run the same request building,
response parsing, error mapping and multi-request logic (the ``init_params(exist_ok=True)``
loop), and differ only in how they send.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from ._exceptions import APIError, PreconditionFailed, UnexpectedResponse, api_error
from ._models import HYPERPARAMETERS, ModelInfo, OptimizerConfig, ParamInfo, ParamState, StepResult
from ._tensors import DTYPES, Array, decode_tensor, dumps, encode_tensor, loads
from ._version import __version__

T = TypeVar("T")

DEFAULT_HEADERS = {
    "Accept": "application/json, application/problem+json",
    "User-Agent": f"momentum-client/{__version__}",
}


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request to send; ``path`` is percent-encoded and relative to the base URL."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass(frozen=True, slots=True)
class Response:
    """The parts of an HTTP response a flow looks at, plus what was requested (for messages)."""

    status: int
    headers: httpx.Headers
    content: bytes
    method: str
    url: str


Flow: TypeAlias = Generator[Request, Response, T]


def normalize_base_url(base_url: str | httpx.URL) -> str:
    """``base_url`` without a trailing slash; ``ValueError`` unless it is an absolute http(s) URL."""
    url = httpx.URL(str(base_url))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url must be an absolute http:// or https:// URL, got {str(base_url)!r}")
    if url.query or url.fragment:
        raise ValueError(f"base_url must not have a query or fragment, got {str(base_url)!r}")
    return str(url).rstrip("/")


# -- responses -------------------------------------------------------------------------------


def error_from_response(response: Response) -> APIError:
    """The :class:`APIError` subclass instance for an error response (problem+json or not)."""
    problem: dict[str, Any] = {}
    try:
        body = loads(response.content) if response.content else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    else:
        text = response.content.decode("utf-8", "replace").strip()
        if text:
            problem = {"detail": text[:500]}
    return api_error(response.status, problem, headers=response.headers, method=response.method, url=response.url)


def raise_for_status(response: Response) -> None:
    """Raise the mapped :class:`APIError` unless the status is 2xx."""
    if not 200 <= response.status <= 299:
        raise error_from_response(response)


def _unexpected(response: Response, message: str) -> UnexpectedResponse:
    return UnexpectedResponse(
        f"unexpected response to {response.method} {response.url} ({response.status}): {message}",
        status=response.status,
        method=response.method,
        url=response.url,
    )


def parse(response: Response, parser: Callable[[Any], T]) -> T:
    """Check the status, then apply ``parser`` to the JSON body; malformed bodies raise ``UnexpectedResponse``."""
    raise_for_status(response)
    try:
        return parser(loads(response.content))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_model(body: Any) -> ModelInfo:
    """A :class:`ModelInfo` from the model representation."""
    body = _object(body)
    opt = _object(body["optimizer"])
    optimizer = OptimizerConfig(
        lr=_float(opt["lr"]),
        momentum=_float(opt["momentum"]),
        dampening=_float(opt.get("dampening", 0.0)),
        nesterov=_bool(opt.get("nesterov", False)),
        weight_decay=_float(opt.get("weight_decay", 0.0)),
        maximize=_bool(opt.get("maximize", False)),
        rule=_str(opt.get("rule", "pytorch")),
    )
    params = {_str(name): _param_info(p) for name, p in _object(body["params"]).items()}
    schedule = _object(body.get("schedule", {"type": "constant"}))
    return ModelInfo(name=_str(body["name"]), optimizer=optimizer, params=params, schedule=schedule)


def _param_info(value: Any) -> ParamInfo:
    p = _object(value)
    dtype = _str(p["dtype"])
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return ParamInfo(shape=tuple(_int(n) for n in p["shape"]), dtype=dtype, step=_int(p["step"]))


def _tensors(body: Any, key: str) -> dict[str, Array]:
    return {name: decode_tensor(t) for name, t in _object(_object(body)[key]).items()}


# -- requests --------------------------------------------------------------------------------


def _segment(name: str, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    if name in ("", ".", ".."):
        raise ValueError(f"{what} name {name!r} cannot be used as a URL path segment")
    return quote(name, safe="")


def _model_path(model: str) -> str:
    return f"/v1/models/{_segment(model, 'model')}"


def _json(method: str, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Request:
    return Request(method, path, headers={"Content-Type": "application/json", **(headers or {})}, content=dumps(body))


def _optimizer_json(values: Mapping[str, object]) -> dict[str, object]:
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


def _encode_all(tensors: Mapping[str, npt.ArrayLike], what: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in tensors.items():
        _segment(name, what)
        out[name] = encode_tensor(value, f"{what} {name!r}")
    return out


# -- flows -----------------------------------------------------------------------------------


# Fields sent only when they differ from their neutral value, so that a rule without them
# (e.g. keras has no dampening) is not sent one.
_NEUTRAL: dict[str, object] = {"dampening": 0.0, "nesterov": False, "weight_decay": 0.0, "maximize": False}


def _schedule_json(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(schedule, Mapping):
        raise TypeError(f"schedule must be a mapping like {{'type': 'cosine', 'T_max': 100}}, got {schedule!r}")
    return dict(schedule)


def create_model(model: str, config: OptimizerConfig, schedule: Mapping[str, Any] | None) -> Flow[ModelInfo]:
    """PUT the model (create, or replace its config)."""
    fields = {k: v for k, v in asdict(config).items() if k not in _NEUTRAL or v != _NEUTRAL[k]}
    body: dict[str, Any] = {"optimizer": _optimizer_json(fields)}
    if schedule is not None:
        body["schedule"] = _schedule_json(schedule)
    response = yield _json("PUT", _model_path(model), body)
    return parse(response, parse_model)


def update_model(
    model: str, hyperparameters: Mapping[str, object], schedule: Mapping[str, Any] | None = None
) -> Flow[ModelInfo]:
    """PATCH some hyperparameters and/or the schedule; unknown names raise ``TypeError`` before sending."""
    unknown = [key for key in hyperparameters if key not in HYPERPARAMETERS]
    if unknown:
        raise TypeError(
            f"update_model() got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid names are {', '.join(HYPERPARAMETERS)}"
        )
    if not hyperparameters and schedule is None:
        raise TypeError("update_model() needs at least one hyperparameter or a schedule")
    body: dict[str, Any] = {}
    if hyperparameters:
        body["optimizer"] = _optimizer_json(hyperparameters)
    if schedule is not None:
        body["schedule"] = _schedule_json(schedule)
    response = yield _json("PATCH", _model_path(model), body)
    return parse(response, parse_model)


def get_model(model: str) -> Flow[ModelInfo]:
    """GET the model representation."""
    response = yield Request("GET", _model_path(model))
    return parse(response, parse_model)


def delete_model(model: str) -> Flow[None]:
    """DELETE the model and all its parameters."""
    response = yield Request("DELETE", _model_path(model))
    raise_for_status(response)


def init_params(model: str, params: Mapping[str, npt.ArrayLike], exist_ok: bool) -> Flow[dict[str, bool]]:
    """Bulk PUT parameters; returns ``{name: created}`` in the order given.

    With ``exist_ok`` each request carries ``If-None-Match: *`` (all-or-nothing on the server);
    on 412 the names in ``existing`` are marked not created and the rest is sent again, until
    nothing is left. Existing parameters are thus never overwritten, even when many workers
    initialize the same model concurrently.
    """
    path = _model_path(model) + "/params"
    pending = _encode_all(params, "parameter")
    created: dict[str, bool] = {}
    while pending:
        headers = {"If-None-Match": "*"} if exist_ok else None
        response = yield _json("PUT", path, {"params": pending}, headers)
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
        flags = parse(response, lambda body: {name: _bool(_object(p)["created"]) for name, p in body["params"].items()})
        missing = pending.keys() - flags.keys()
        if missing:
            raise _unexpected(response, f"no result for parameter(s) {sorted(missing)}")
        created.update((name, flags[name]) for name in pending)
        break
    return {name: created[name] for name in params}


def get_params(model: str, names: Iterable[str] | None) -> Flow[dict[str, Array]]:
    """GET all parameters' values, or only ``names``."""
    query: dict[str, str] = {}
    if names is not None:
        if isinstance(names, str):
            raise TypeError("names must be an iterable of parameter names, not a single str")
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            _segment(name, "parameter")
            if "," in name:
                raise ValueError(f"parameter name {name!r} contains ',' and cannot be listed in ?names=")
        if not wanted:
            return {}
        query["names"] = ",".join(wanted)
    response = yield Request("GET", _model_path(model) + "/params", params=query)
    return parse(response, lambda body: _tensors(body, "params"))


def get_param_state(model: str, name: str) -> Flow[ParamState]:
    """GET one parameter with its momentum buffer."""
    path = f"{_model_path(model)}/params/{_segment(name, 'parameter')}"
    response = yield Request("GET", path, params={"include": "velocity"})

    def parser(body: Any) -> ParamState:
        velocity = _object(body)["velocity"]
        return ParamState(
            name=_str(body["name"]),
            value=decode_tensor(body),
            velocity=None if velocity is None else decode_tensor(velocity),
            step=_int(body["step"]),
        )

    return parse(response, parser)


def delete_param(model: str, name: str) -> Flow[None]:
    """DELETE one parameter."""
    response = yield Request("DELETE", f"{_model_path(model)}/params/{_segment(name, 'parameter')}")
    raise_for_status(response)


def _step_request(model: str, gradients: Mapping[str, npt.ArrayLike], return_params: bool) -> Request:
    body = {"gradients": _encode_all(gradients, "gradient"), "return_params": return_params}
    return _json("POST", _model_path(model) + "/step", body)


def step(model: str, gradients: Mapping[str, npt.ArrayLike]) -> Flow[dict[str, Array]]:
    """POST one optimizer step; returns the updated values."""
    response = yield _step_request(model, gradients, return_params=True)
    return parse(response, lambda body: _tensors(body, "params"))


def step_results(
    model: str, gradients: Mapping[str, npt.ArrayLike], return_params: bool
) -> Flow[dict[str, StepResult]]:
    """POST one optimizer step; returns each parameter's value (if asked), step and lr."""
    response = yield _step_request(model, gradients, return_params=return_params)

    def parser(body: Any) -> dict[str, StepResult]:
        out = {}
        for name, p in _object(_object(body)["params"]).items():
            p = _object(p)
            value = decode_tensor(p) if return_params else None
            out[_str(name)] = StepResult(value=value, step=_int(p["step"]), lr=_float(p["lr"]))
        return out

    return parse(response, parser)


def push_gradients(model: str, gradients: Mapping[str, npt.ArrayLike]) -> Flow[dict[str, int]]:
    """POST one optimizer step without downloading values; returns the new step counts."""
    response = yield _step_request(model, gradients, return_params=False)
    return parse(response, lambda body: {name: _int(_object(p)["step"]) for name, p in _object(body["params"]).items()})


def probe(path: str) -> Flow[bool]:
    """GET a health endpoint: ``True`` on 200, ``False`` on any other status."""
    response = yield Request("GET", path)
    return response.status == 200
