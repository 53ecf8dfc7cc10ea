"""Everything ``Client`` and ``AsyncClient`` share, without I/O.

Each API operation is a *flow*: a generator that yields instructions and returns the
operation's result (or raises). A :class:`Request` is to be sent: the client sends its
:class:`Response` back into the flow, or throws the :class:`TransportError` in when there was
none (the flow may catch it and retry). A :class:`Sleep` is to be waited out; the client sends
``None`` back. A client drives a flow with its own transport and sleep, so both clients run the
same request building, response parsing, error mapping and multi-request logic (the
``init_params(exist_ok=True)`` loop, the step retries), and differ only in how they send and wait.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt

from . import _safetensors
from ._exceptions import (
    APIError,
    ModelConfigWarning,
    ModelExists,
    PreconditionFailed,
    StepTimeout,
    StepWentBack,
    StepWentBackWarning,
    TensorMismatch,
    TransportError,
    UnexpectedResponse,
    api_error,
    parse_retry_after,
)
from ._models import HYPERPARAMETERS, ModelInfo, OptimizerConfig, ParamInfo, ParamState, StepResult
from ._tensors import (
    DTYPES,
    SAFETENSORS,
    Array,
    as_float_array,
    as_wire_array,
    decode_tensor,
    dumps,
    encode_tensor,
    loads,
)
from ._version import __version__

T = TypeVar("T")

Buffer: TypeAlias = bytes | memoryview
Wire: TypeAlias = Literal["safetensors", "json"]
"""How tensors travel: ``"safetensors"`` (binary, the default) or ``"json"``."""

WIRES = ("safetensors", "json")
_BINARY_ACCEPT = f"{SAFETENSORS}, application/json, application/problem+json"

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
    content: tuple[Buffer, ...] = ()
    """The body as parts (a safetensors header, then the arrays' buffers), sent as they are."""

    @property
    def length(self) -> int:
        return sum(memoryview(p).nbytes for p in self.content)


@dataclass(frozen=True, slots=True)
class Response:
    """The parts of an HTTP response a flow looks at, plus what was requested (for messages).

    ``content`` is the body: bytes, or (from the SDK's own transport) a view of the one buffer it
    was read into, from which safetensors arrays are taken without a copy.
    """

    status: int
    headers: httpx.Headers
    content: Buffer | npt.NDArray[np.uint8]
    method: str
    url: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` before the flow goes on (the client sends ``None`` back)."""

    seconds: float


Instruction: TypeAlias = Request | Sleep
Flow: TypeAlias = Generator[Instruction, Response | None, T]


def send(request: Request) -> Flow[Response]:
    """Yield ``request`` and return its response: ``response = yield from send(request)``.

    The client throws a :class:`TransportError` in here when the request got no response.
    """
    response = yield request
    if response is None:  # pragma: no cover - a client bug
        raise RuntimeError("a Request must be answered with a Response")
    return response


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


# -- retries ---------------------------------------------------------------------------------

DEFAULT_MAX_RETRIES = 5
DEFAULT_SYNC_WAIT = 300.0
BACKOFF_BASE = 0.05
BACKOFF_CAP = 2.0


def check_retry_settings(max_retries: int, sync_wait: float) -> None:
    """``TypeError``/``ValueError`` unless ``max_retries`` is an int >= 0 and ``sync_wait`` a number >= 0."""
    if isinstance(max_retries, bool) or not isinstance(max_retries, int):
        raise TypeError(f"max_retries must be an int, got {max_retries!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if isinstance(sync_wait, bool) or not isinstance(sync_wait, (int, float)):
        raise TypeError(f"sync_wait must be a number of seconds, got {sync_wait!r}")
    if not sync_wait >= 0:  # also refuses NaN
        raise ValueError(f"sync_wait must be >= 0 seconds, got {sync_wait}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a step flow retries.

    A transient failure (no response, 503, 409 ``idempotency-in-flight``) is retried up to
    ``max_retries`` times in a row, after ``Retry-After`` if the answer has one, else a full-jitter
    exponential backoff ``random() * min(max_delay, base_delay * 2**n)`` for the n-th retry in a
    row (n from 0); a delay never exceeds ``max_delay``. A sync step's 202 re-sends the push until
    ``sync_wait`` seconds of ``clock`` have passed since the first attempt. ``random`` returns
    floats in [0, 1).
    """

    max_retries: int
    sync_wait: float
    random: Callable[[], float]
    clock: Callable[[], float]
    base_delay: float = BACKOFF_BASE
    max_delay: float = BACKOFF_CAP

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before the ``retry``-th retry in a row (from 0)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return self.random() * min(self.max_delay, self.base_delay * 2.0 ** min(retry, 64))


def is_transient(response: Response) -> bool:
    """Whether re-sending the same request (with the same ``Idempotency-Key``) may succeed."""
    if response.status in (502, 503, 504):  # unavailable, or a proxy lost the upstream's answer
        return True
    return response.status == 409 and error_from_response(response).code == "idempotency-in-flight"


# -- responses -------------------------------------------------------------------------------


def error_from_response(response: Response) -> APIError:
    """The :class:`APIError` subclass instance for an error response (problem+json or not)."""
    problem: dict[str, Any] = {}
    try:
        body = loads(response.content) if len(response.content) else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    else:
        text = bytes(response.content).decode("utf-8", "replace").strip()
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


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


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
    return ModelInfo(
        name=_str(body["name"]),
        optimizer=optimizer,
        params=params,
        schedule=schedule,
        mode=_str(body.get("mode", "async")),
        workers=_optional_int(body.get("workers")),
        max_staleness=_optional_int(body.get("max_staleness")),
        durability=_durability_of(body.get("durability", "step")),
    )


def _durability_of(value: Any) -> str | dict[str, int]:
    if value == "step":
        return "step"
    return {"flush_ms": _int(_object(value)["flush_ms"])}


def _param_info(value: Any) -> ParamInfo:
    p = _object(value)
    dtype = _str(p["dtype"])
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return ParamInfo(shape=tuple(_int(n) for n in p["shape"]), dtype=dtype, step=_int(p["step"]))


def _tensors(body: Any, key: str) -> dict[str, Array]:
    return {name: decode_tensor(t) for name, t in _object(_object(body)[key]).items()}


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
        for name, p in _object(_object(body)["params"]).items():
            p = _object(p)
            velocity = p.get("velocity")
            value = decode_tensor(p) if "data" in p else None
            out[_str(name)] = (value, None if velocity is None else decode_tensor(velocity), p)
        return out

    if not _is_binary(response):
        return parse(response, from_json)
    raise_for_status(response)
    try:
        arrays, metadata = _safetensors.decode(response.content)
        fields = _object(metadata["params"])
        return {
            _str(name): (arrays.get(name), arrays.get(f"{name}@velocity"), _object(p)) for name, p in fields.items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc


def _tensor_request(
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
        return _json(method, path, {key: _encode_all(tensors, what), **fields}, headers)
    arrays = {}
    for name, value in tensors.items():
        _segment(name, what)
        arrays[name] = as_wire_array(value, f"{what} {name!r}", half=what == "gradient")
    return Request(
        method,
        path,
        headers={"Content-Type": SAFETENSORS, "Accept": _BINARY_ACCEPT, **(headers or {})},
        content=_safetensors.encode(arrays, fields),
    )


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
    return Request(
        method, path, headers={"Content-Type": "application/json", **(headers or {})}, content=(dumps(body),)
    )


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
        out[name] = encode_tensor(value, f"{what} {name!r}", half=what == "gradient")
    return out


# -- flows -----------------------------------------------------------------------------------


# Fields sent only when they differ from their neutral value, so that a rule without them
# (e.g. keras has no dampening) is not sent one.
_NEUTRAL: dict[str, object] = {"dampening": 0.0, "nesterov": False, "weight_decay": 0.0, "maximize": False}


def _schedule_json(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    if not isinstance(schedule, Mapping):
        raise TypeError(f"schedule must be a mapping like {{'type': 'cosine', 'T_max': 100}}, got {schedule!r}")
    return dict(schedule)


def _mode_json(mode: str | None, workers: int | None, max_staleness: int | None) -> dict[str, Any]:
    """The given mode fields (``None`` ones left out); ``TypeError`` for values of the wrong type."""
    out: dict[str, Any] = {}
    if mode is not None:
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a str ('async', 'sync' or 'bounded'), got {mode!r}")
        out["mode"] = mode
    if workers is not None:
        out["workers"] = _index(workers, "workers")
    if max_staleness is not None:
        out["max_staleness"] = _index(max_staleness, "max_staleness")
    return out


Durability: TypeAlias = str | Mapping[str, int]
"""When a step is acknowledged: ``"step"`` (once logged in Redis) or ``{"flush_ms": N}`` (from memory)."""


def _durability_json(durability: Durability) -> str | dict[str, int]:
    if durability == "step":
        return "step"
    if isinstance(durability, Mapping) and set(durability) == {"flush_ms"}:
        return {"flush_ms": _index(durability["flush_ms"], "durability['flush_ms']")}
    raise ValueError(f'durability must be "step" or {{"flush_ms": N}}, got {durability!r}')


def _model_body(
    config: OptimizerConfig,
    schedule: Mapping[str, Any] | None,
    mode: str,
    workers: int | None,
    max_staleness: int | None,
    durability: Durability | None = None,
) -> dict[str, Any]:
    """A model config body; ``mode`` is sent unless it is the default, async; ``durability`` if given."""
    fields = {k: v for k, v in asdict(config).items() if k not in _NEUTRAL or v != _NEUTRAL[k]}
    body: dict[str, Any] = {"optimizer": _optimizer_json(fields)}
    if schedule is not None:
        body["schedule"] = _schedule_json(schedule)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str ('async', 'sync' or 'bounded'), got {mode!r}")
    body.update(_mode_json(None if mode == "async" else mode, workers, max_staleness))
    if durability is not None:
        body["durability"] = _durability_json(durability)
    return body


def config_differences(requested: Mapping[str, Any], existing: Mapping[str, Any]) -> list[str]:
    """What a requested config body sets differently from an existing model's config.

    Only what the request says is compared (a field it leaves out, the server fills with its
    default, and so does the existing config), plus the rule and the mode.
    """
    out = []
    asked_opt, have_opt = dict(requested.get("optimizer", {})), dict(existing.get("optimizer", {}))
    asked_opt.setdefault("rule", "pytorch")
    for key, value in asked_opt.items():
        if have_opt.get(key, _NEUTRAL.get(key)) != value:
            out.append(f"optimizer.{key}: asked {value!r}, the model has {have_opt.get(key)!r}")
    for key, value in {k: v for k, v in have_opt.items() if k in _NEUTRAL and k not in asked_opt}.items():
        if value != _NEUTRAL[key]:
            out.append(f"optimizer.{key}: asked {_NEUTRAL[key]!r} (the default), the model has {value!r}")
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
) -> Flow[ModelInfo]:
    """PUT the model with ``If-None-Match: *``: create it, never change an existing one.

    An existing model raises :class:`ModelExists`, or with ``exist_ok`` is returned as it is
    (a :class:`ModelConfigWarning` lists how its config differs from the one asked for).
    """
    body = _model_body(config, schedule, mode, workers, max_staleness, durability)
    response = yield from send(_json("PUT", _model_path(model), body, {"If-None-Match": "*"}))
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
) -> Flow[ModelInfo]:
    """PUT the model's whole config (created if it does not exist; parameters are kept; same rule only)."""
    response = yield from send(
        _json("PUT", _model_path(model), _model_body(config, schedule, mode, workers, max_staleness, durability))
    )
    return parse(response, parse_model)


def update_model(
    model: str,
    hyperparameters: Mapping[str, object],
    schedule: Mapping[str, Any] | None = None,
    mode: str | None = None,
    workers: int | None = None,
    max_staleness: int | None = None,
    durability: Durability | None = None,
) -> Flow[ModelInfo]:
    """PATCH some hyperparameters, the schedule and/or mode fields; unknown names raise ``TypeError`` before sending."""
    unknown = [key for key in hyperparameters if key not in HYPERPARAMETERS]
    if unknown:
        raise TypeError(
            f"update_model() got unknown hyperparameter(s) {', '.join(map(repr, unknown))}; "
            f"valid names are {', '.join(HYPERPARAMETERS)}"
        )
    mode_fields = _mode_json(mode, workers, max_staleness)
    if not hyperparameters and schedule is None and not mode_fields and durability is None:
        raise TypeError(
            "update_model() needs at least one hyperparameter, a schedule, mode, workers, max_staleness or durability"
        )
    body: dict[str, Any] = {}
    if hyperparameters:
        body["optimizer"] = _optimizer_json(hyperparameters)
    if schedule is not None:
        body["schedule"] = _schedule_json(schedule)
    body.update(mode_fields)
    if durability is not None:
        body["durability"] = _durability_json(durability)
    response = yield from send(_json("PATCH", _model_path(model), body))
    return parse(response, parse_model)


def get_model(model: str) -> Flow[ModelInfo]:
    """GET the model representation."""
    response = yield from send(Request("GET", _model_path(model)))
    return parse(response, parse_model)


def delete_model(model: str) -> Flow[None]:
    """DELETE the model and all its parameters."""
    response = yield from send(Request("DELETE", _model_path(model)))
    raise_for_status(response)


def init_params(
    model: str, params: Mapping[str, npt.ArrayLike], exist_ok: bool, wire: Wire = "json"
) -> Flow[dict[str, bool]]:
    """Bulk PUT parameters; returns ``{name: created}`` in the order given.

    With ``exist_ok`` each request carries ``If-None-Match: *`` (all-or-nothing on the server);
    on 412 the names in ``existing`` are marked not created and the rest is sent again, until
    nothing is left. Existing parameters are thus never overwritten, even when many workers
    initialize the same model concurrently.
    """
    path = _model_path(model) + "/params"
    pending = dict(params)
    created: dict[str, bool] = {}
    while pending:
        headers = {"If-None-Match": "*"} if exist_ok else None
        response = yield from send(_tensor_request("PUT", path, pending, {}, "parameter", wire, headers))
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


def get_params(model: str, names: Iterable[str] | None, wire: Wire = "json") -> Flow[dict[str, Array]]:
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
    headers = {"Accept": _BINARY_ACCEPT} if wire == "safetensors" else {}
    response = yield from send(Request("GET", _model_path(model) + "/params", params=query, headers=headers))
    return _values(response)


def _values(response: Response) -> dict[str, Array]:
    out = {}
    for name, (value, _, _) in parse_entries(response).items():
        if value is None:
            raise _unexpected(response, f"no value for parameter {name!r}")
        out[name] = value
    return out


def get_param_state(model: str, name: str, wire: Wire = "json") -> Flow[ParamState]:
    """GET one parameter with its rule's state (every named buffer, the momentum buffer among them)."""
    path = f"{_model_path(model)}/params/{_segment(name, 'parameter')}"
    if wire == "safetensors":
        headers = {"Accept": _BINARY_ACCEPT}
        response = yield from send(Request("GET", path, params={"include": "state"}, headers=headers))
        raise_for_status(response)
        try:
            arrays, metadata = _safetensors.decode(response.content)
            fields = _object(_object(metadata["params"])[name])
        except (KeyError, TypeError, ValueError) as exc:
            raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc
        if name not in arrays:
            raise _unexpected(response, f"no value for parameter {name!r}")
        prefix = f"{name}@"
        state = {k[len(prefix) :]: a for k, a in arrays.items() if k.startswith(prefix)}
        return ParamState(name, arrays[name], state.get("velocity"), _int(fields.get("step")), state)
    response = yield from send(Request("GET", path, params={"include": "state"}))

    def parser(body: Any) -> ParamState:
        state = {_str(k): decode_tensor(t) for k, t in _object(_object(body).get("state", {})).items()}
        return ParamState(_str(body["name"]), decode_tensor(body), state.get("velocity"), _int(body["step"]), state)

    return parse(response, parser)


def delete_param(model: str, name: str) -> Flow[None]:
    """DELETE one parameter."""
    response = yield from send(Request("DELETE", f"{_model_path(model)}/params/{_segment(name, 'parameter')}"))
    raise_for_status(response)


@dataclass(frozen=True, slots=True)
class StepOptions:
    """The optional parts of a step request: body fields sent only when given, and the key."""

    expected_steps: Mapping[str, int] | None = None
    worker_id: int | None = None
    base_step: int | None = None
    idempotency_key: str | None = None


_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def _index(value: Any, what: str) -> int:
    """``value`` as an int (numpy integers too); ``TypeError`` for anything else, bools included."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {value!r}") from None


def idempotency_key(key: str | None) -> str:
    """``key`` checked (1 to 255 visible ASCII characters, else ``ValueError``), or a fresh one."""
    if key is None:
        return uuid.uuid4().hex
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a str, got {type(key).__name__}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"idempotency_key must be 1 to 255 visible ASCII characters, got {key!r}")
    return key


def _step_request(
    model: str, gradients: Mapping[str, npt.ArrayLike], return_params: bool, options: StepOptions, wire: Wire
) -> Request:
    body: dict[str, Any] = {"return_params": return_params}
    if options.expected_steps is not None:
        if not isinstance(options.expected_steps, Mapping):
            raise TypeError(f"expected_steps must be a mapping {{name: step}}, got {options.expected_steps!r}")
        body["expected_steps"] = {
            _str(name): _index(step, f"expected_steps[{name!r}]") for name, step in options.expected_steps.items()
        }
    if options.worker_id is not None:
        body["worker_id"] = _index(options.worker_id, "worker_id")
    if options.base_step is not None:
        body["base_step"] = _index(options.base_step, "base_step")
    headers = {"Idempotency-Key": idempotency_key(options.idempotency_key)}
    if options.idempotency_key is None:
        headers[FRESH_KEY] = "1"  # a key made up just now: the server need not look it up (first attempt only)
    return _tensor_request("POST", _model_path(model) + "/step", gradients, body, "gradient", wire, headers)


FRESH_KEY = "Momentum-Fresh-Key"
"""Sent with the first attempt of a push whose Idempotency-Key the SDK made up: no server can have seen
the key yet, so the model's owner skips looking it up in Redis. Retries never send it."""


def _retry_of(request: Request) -> Request:
    """The request as it is re-sent: the same bytes and key, without the fresh-key mark."""
    if FRESH_KEY not in request.headers:
        return request
    headers = {k: v for k, v in request.headers.items() if k != FRESH_KEY}
    return Request(request.method, request.path, request.params, headers, request.content)


def _pending(response: Response) -> tuple[int, int, dict[str, int]]:
    """``(base_step, workers, contributions)`` of a 202 ``pending`` answer."""

    def parser(body: Any) -> tuple[int, int, dict[str, int]]:
        body = _object(body)
        if body["status"] != "pending":
            raise ValueError(f"a 202 answer's status is {body['status']!r}, not 'pending'")
        counts = {_str(name): _int(n) for name, n in _object(body["contributions"]).items()}
        return _int(body["base_step"]), _int(body["workers"]), counts

    return parse(response, parser)


def _post_step(request: Request, policy: RetryPolicy) -> Flow[Response]:
    """Send a step until it has a final answer, re-sending the very same request (bytes and key).

    Transient failures (see :func:`is_transient`) are retried up to ``policy.max_retries`` times in
    a row, then the last one is raised. A 202 (sync mode, the step waits for other workers) is
    re-sent, after its ``Retry-After``, until ``policy.sync_wait`` has passed since the first
    attempt, then :class:`StepTimeout` is raised. A 202 ends a run of failures: the server is there.
    """
    start = policy.clock()
    failures = 0
    while True:
        try:
            response = yield from send(request)
        except TransportError:
            request = _retry_of(request)
            if failures >= policy.max_retries:
                raise
            yield Sleep(policy.delay(failures, None))
            failures += 1
            continue
        request = _retry_of(request)
        if response.status == 202:
            failures = 0
            base_step, workers, contributions = _pending(response)
            elapsed = policy.clock() - start
            if elapsed >= policy.sync_wait:
                done = ", ".join(f"{name}: {n}/{workers}" for name, n in contributions.items())
                raise StepTimeout(
                    f"the sync step from base_step {base_step} was not complete after {policy.sync_wait:g} s "
                    f"(contributions {done}); {request.method} {response.url}",
                    base_step=base_step,
                    workers=workers,
                    contributions=contributions,
                    method=request.method,
                    url=response.url,
                )
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            wait = min(policy.delay(0, retry_after), policy.sync_wait - elapsed)
            if wait > 0:
                yield Sleep(wait)
            continue
        if is_transient(response):
            if failures >= policy.max_retries:
                raise error_from_response(response)
            yield Sleep(policy.delay(failures, parse_retry_after(response.headers.get("retry-after"))))
            failures += 1
            continue
        return response


def _replayed(response: Response) -> bool:
    value: str = response.headers.get("idempotent-replayed", "")
    return value.strip().lower() == "true"


DTypes: TypeAlias = dict[tuple[str, str], str]
"""Parameters' dtypes as learnt by a client that casts gradients: ``{(model, name): "float32"}``."""


StepBack: TypeAlias = Literal["raise", "warn"]
STEP_BACK = ("raise", "warn")


class SeenSteps:
    """The highest step count a client saw per parameter, to tell when a model's steps went back.

    A step sent after the client saw step ``s`` of a parameter must get a step above ``s`` (steps
    only grow), whatever other workers do meanwhile; so the check compares an answer with what was
    known when the request was sent, and stays right when one client sends steps concurrently.
    """

    def __init__(self, on_back: StepBack = "raise") -> None:
        if on_back not in STEP_BACK:
            raise ValueError(f"on_step_back must be one of {', '.join(STEP_BACK)}, got {on_back!r}")
        self.on_back = on_back
        self._steps: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def known(self, model: str, names: Iterable[str]) -> dict[str, int]:
        with self._lock:
            return {n: self._steps[(model, n)] for n in names if (model, n) in self._steps}

    def saw(self, model: str, steps: Mapping[str, int], known: Mapping[str, int], result: Any) -> None:
        """Record an answer's steps; raise (or warn) if one is not past what was known at sending."""
        regressions = {n: (s, known[n]) for n, s in steps.items() if n in known and s <= known[n]}
        with self._lock:
            for n, s in steps.items():
                key = (model, n)
                if n in regressions or s > self._steps.get(key, -1):
                    self._steps[key] = s
        if not regressions:
            return
        lost = ", ".join(f"{n!r} is at step {s} after step {seen}" for n, (s, seen) in regressions.items())
        message = (
            f"model {model!r} went back: {lost} was seen by this client. Steps it acknowledged were lost "
            "(a server that acknowledged them from memory, with flush_ms durability, crashed; or the model "
            "was deleted and created again). This step was applied to the state as it is now."
        )
        if self.on_back == "warn":
            warnings.warn(StepWentBackWarning(message), stacklevel=5)
        else:
            raise StepWentBack(message, model=model, regressions=regressions, result=result)

    def forget(self, model: str, names: Iterable[str] | None = None) -> None:
        """Forget what was seen of a model (or of some of its parameters): they start over legitimately."""
        with self._lock:
            if names is None:
                for key in [k for k in self._steps if k[0] == model]:
                    del self._steps[key]
            else:
                for n in names:
                    self._steps.pop((model, n), None)


def _check_steps(
    seen: SeenSteps | None,
    model: str,
    steps: Mapping[str, int],
    known: Mapping[str, int],
    response: Response,
    options: StepOptions,
    result: Any,
) -> None:
    # A replay of the caller's own key may be an old step's answer: it says nothing about going back.
    if seen is not None and not (_replayed(response) and options.idempotency_key is not None):
        seen.saw(model, steps, known, result)


def _cast(model: str, gradients: Mapping[str, npt.ArrayLike], dtypes: DTypes | None) -> Mapping[str, npt.ArrayLike]:
    """The gradients, each float32/float64 one cast to its parameter's dtype where that is known."""
    if not dtypes:
        return gradients
    out: dict[str, npt.ArrayLike] = {}
    for name, value in gradients.items():
        want = dtypes.get((model, name))
        arr = as_float_array(value, f"gradient {name!r}", half=True)
        out[name] = arr.astype(want) if want is not None and arr.dtype.itemsize != 2 and arr.dtype != want else value
    return out


def _send_step(
    model: str,
    gradients: Mapping[str, npt.ArrayLike],
    return_params: bool,
    options: StepOptions,
    policy: RetryPolicy,
    wire: Wire,
    dtypes: DTypes | None,
) -> Flow[Response]:
    """POST a step (see :func:`_post_step`). With ``dtypes`` (a client that casts gradients), a 409
    ``tensor-mismatch`` in dtypes only teaches the parameters' dtypes, and the step is sent again, cast."""
    response = yield from _post_step(
        _step_request(model, _cast(model, gradients, dtypes), return_params, options, wire), policy
    )
    if dtypes is not None and response.status == 409:
        error = error_from_response(response)
        mismatches = error.mismatches if isinstance(error, TensorMismatch) else {}
        if mismatches and all(m["expected"]["shape"] == m["got"]["shape"] for m in mismatches.values()):
            for name, m in mismatches.items():
                dtypes[(model, name)] = str(m["expected"]["dtype"])
            request = _step_request(model, _cast(model, gradients, dtypes), return_params, options, wire)
            response = yield from _post_step(request, policy)
    return response


def _learn_dtypes(model: str, values: Mapping[str, Array | None], dtypes: DTypes | None) -> None:
    if dtypes is not None:
        dtypes.update({(model, name): v.dtype.name for name, v in values.items() if v is not None})


def step(
    model: str,
    gradients: Mapping[str, npt.ArrayLike],
    options: StepOptions,
    policy: RetryPolicy,
    wire: Wire = "json",
    dtypes: DTypes | None = None,
    seen: SeenSteps | None = None,
) -> Flow[dict[str, Array]]:
    """POST one optimizer step; returns the updated values."""
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, True, options, policy, wire, dtypes)
    values: dict[str, Array] = {}
    steps: dict[str, int] = {}
    for name, (value, _, p) in parse_entries(response).items():
        if value is None:
            raise _unexpected(response, f"no value for parameter {name!r}")
        values[name] = value
        try:
            steps[name] = _int(p["step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc
    _learn_dtypes(model, values, dtypes)
    _check_steps(seen, model, steps, known, response, options, values)
    return values


def step_results(
    model: str,
    gradients: Mapping[str, npt.ArrayLike],
    return_params: bool,
    options: StepOptions,
    policy: RetryPolicy,
    wire: Wire = "json",
    dtypes: DTypes | None = None,
    seen: SeenSteps | None = None,
) -> Flow[dict[str, StepResult]]:
    """POST one optimizer step; returns each parameter's value (if asked), step, lr and staleness."""
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, return_params, options, policy, wire, dtypes)
    replayed = _replayed(response)
    out = {}
    for name, (value, _, p) in parse_entries(response).items():
        try:
            out[name] = StepResult(
                value=value if return_params else None,
                step=_int(p["step"]),
                lr=_float(p["lr"]),
                current_step=_optional_int(p.get("current_step")),
                replayed=replayed,
                staleness=_optional_int(p.get("staleness")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc
        if return_params and value is None:
            raise _unexpected(response, f"no value for parameter {name!r}")
    _learn_dtypes(model, {n: r.value for n, r in out.items()}, dtypes)
    _check_steps(seen, model, {n: r.step for n, r in out.items()}, known, response, options, out)
    return out


def push_gradients(
    model: str,
    gradients: Mapping[str, npt.ArrayLike],
    options: StepOptions,
    policy: RetryPolicy,
    wire: Wire = "json",
    dtypes: DTypes | None = None,
    seen: SeenSteps | None = None,
) -> Flow[dict[str, int]]:
    """POST one optimizer step without downloading values; returns the new step counts."""
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, False, options, policy, wire, dtypes)
    try:
        steps = {name: _int(p["step"]) for name, (_, _, p) in parse_entries(response).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise _unexpected(response, f"{type(exc).__name__}: {exc}") from exc
    _check_steps(seen, model, steps, known, response, options, steps)
    return steps


def probe(path: str) -> Flow[bool]:
    """GET a health endpoint: ``True`` on 200, ``False`` on any other status."""
    response = yield from send(Request("GET", path))
    return response.status == 200
