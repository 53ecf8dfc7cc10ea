"""Steps: their keyword options (:class:`StepOptions`), idempotency keys, the retrying send, the
check that a model's steps did not go back (:class:`SeenSteps`), and the step flows
(:func:`step`, :func:`step_results`, :func:`push_gradients`)."""

from __future__ import annotations

import logging
import math
import re
import threading
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeAlias, TypedDict

import numpy.typing as npt

from ._errors import error_from_response, unexpected
from ._exceptions import (
    StepTimeout,
    StepWentBack,
    StepWentBackWarning,
    TensorMismatch,
    TransportError,
    parse_retry_after,
)
from ._flow import Flow, Request, Response, Sleep, send
from ._models import StepResult
from ._parse import expect_float, expect_int, expect_object, expect_optional_int, expect_str, parse, parse_entries
from ._requests import Wire, as_index, model_path, tensor_request
from ._retry import RetryPolicy, is_transient
from ._tensors import Array, as_float_array


class StepOptions(TypedDict, total=False):
    """The keyword options of ``step``, ``step_results`` and ``push_gradients``; any may be left out.

    ``expected_steps`` (``{name: step}``): apply only if those parameters are at those steps,
    else :class:`Conflict` ``step-mismatch`` with ``current_steps``. ``base_step``: the step the
    gradients were computed from (required in ``bounded`` and ``sync`` mode); ``worker_id``: this
    worker's id (``sync`` mode). ``idempotency_key``: the key to send (1 to 255 visible ASCII
    characters), by default a fresh one per call; pass the same key to re-send a step whose
    outcome you do not know (after an exception), with the same arguments. ``metrics``
    (``{"loss": 0.31}``): training scalars kept with the push in the model's series (``GET
    /v1/models/{model}/metrics``, the dashboard's curves); at most 32, finite numbers. ``None`` is
    the same as leaving an option out.
    """

    expected_steps: Mapping[str, int] | None
    worker_id: int | None
    base_step: int | None
    idempotency_key: str | None
    metrics: Mapping[str, float] | None


def check_options(method: str, options: Mapping[str, object]) -> None:
    """``TypeError`` for a keyword that is not one of :class:`StepOptions`, as Python says it."""
    for key in options:
        if key not in StepOptions.__optional_keys__:
            raise TypeError(f"{method}() got an unexpected keyword argument {key!r}")


log = logging.getLogger("momentum_client")
"""The SDK's logger: each retry of a step (INFO) and each step given up (WARNING), never a key."""

_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def idempotency_key(key: str | None) -> str:
    """``key`` checked (1 to 255 visible ASCII characters, else ``ValueError``), or a fresh one."""
    if key is None:
        return uuid.uuid4().hex
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key must be a str, got {type(key).__name__}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"idempotency_key must be 1 to 255 visible ASCII characters, got {key!r}")
    return key


def metrics_json(metrics: Mapping[str, float]) -> dict[str, float]:
    """Training scalars as JSON numbers (numpy and torch scalars too); ``ValueError`` for a non-finite one."""
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping {{name: number}}, got {metrics!r}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metrics names must be str, got {name!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metrics[{name!r}] must be finite, got {value!r}")
        out[name] = number
    return out


def _step_request(
    model: str, gradients: Mapping[str, npt.ArrayLike], return_params: bool, options: StepOptions, wire: Wire
) -> Request:
    body: dict[str, Any] = {"return_params": return_params}
    expected_steps = options.get("expected_steps")
    if expected_steps is not None:
        if not isinstance(expected_steps, Mapping):
            raise TypeError(f"expected_steps must be a mapping {{name: step}}, got {expected_steps!r}")
        body["expected_steps"] = {
            expect_str(name): as_index(step, f"expected_steps[{name!r}]") for name, step in expected_steps.items()
        }
    worker_id = options.get("worker_id")
    if worker_id is not None:
        body["worker_id"] = as_index(worker_id, "worker_id")
    base_step = options.get("base_step")
    if base_step is not None:
        body["base_step"] = as_index(base_step, "base_step")
    metrics = options.get("metrics")
    if metrics is not None:
        body["metrics"] = metrics_json(metrics)
    key = options.get("idempotency_key")
    headers = {"Idempotency-Key": idempotency_key(key)}
    if key is None:
        headers[FRESH_KEY] = "1"  # a key made up just now: the server need not look it up (first attempt only)
    return tensor_request("POST", model_path(model) + "/step", gradients, body, "gradient", wire, headers)


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
        body = expect_object(body)
        if body["status"] != "pending":
            raise ValueError(f"a 202 answer's status is {body['status']!r}, not 'pending'")
        counts = {expect_str(name): expect_int(n) for name, n in expect_object(body["contributions"]).items()}
        return expect_int(body["base_step"]), expect_int(body["workers"]), counts

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
        except TransportError as exc:
            request = _retry_of(request)
            if failures >= policy.max_retries:
                log.warning(
                    "%s %s: no answer (%s); giving up after %d retries", request.method, request.path, exc, failures
                )
                raise
            delay = policy.delay(failures, None)
            log.info(
                "%s %s: no answer (%s); retry %d of %d in %.3f s, same Idempotency-Key",
                request.method,
                request.path,
                exc,
                failures + 1,
                policy.max_retries,
                delay,
            )
            yield Sleep(delay)
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
                log.warning(
                    "%s %s: %d; giving up after %d retries", request.method, request.path, response.status, failures
                )
                raise error_from_response(response)
            delay = policy.delay(failures, parse_retry_after(response.headers.get("retry-after")))
            log.info(
                "%s %s: %d; retry %d of %d in %.3f s, same Idempotency-Key",
                request.method,
                request.path,
                response.status,
                failures + 1,
                policy.max_retries,
                delay,
            )
            yield Sleep(delay)
            failures += 1
            continue
        return response


def _replayed(response: Response) -> bool:
    value: str = response.headers.get("idempotent-replayed", "")
    return value.strip().lower() == "true"


# -- steps that went back --------------------------------------------------------------------


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
    if seen is not None and not (_replayed(response) and options.get("idempotency_key") is not None):
        seen.saw(model, steps, known, result)


# -- gradients cast to their parameters' dtypes ----------------------------------------------


DTypes: TypeAlias = dict[tuple[str, str], str]
"""Parameters' dtypes as learnt by a client that casts gradients: ``{(model, name): "float32"}``."""


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


def _learn_dtypes(model: str, values: Mapping[str, Array | None], dtypes: DTypes | None) -> None:
    if dtypes is not None:
        dtypes.update({(model, name): v.dtype.name for name, v in values.items() if v is not None})


# -- the step flows --------------------------------------------------------------------------


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
    check_options("step", options)
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, True, options, policy, wire, dtypes)
    values: dict[str, Array] = {}
    steps: dict[str, int] = {}
    for name, (value, _, p) in parse_entries(response).items():
        if value is None:
            raise unexpected(response, f"no value for parameter {name!r}")
        values[name] = value
        try:
            steps[name] = expect_int(p["step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc
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
    check_options("step_results", options)
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, return_params, options, policy, wire, dtypes)
    replayed = _replayed(response)
    out = {}
    for name, (value, _, p) in parse_entries(response).items():
        try:
            out[name] = StepResult(
                value=value if return_params else None,
                step=expect_int(p["step"]),
                lr=expect_float(p["lr"]),
                current_step=expect_optional_int(p.get("current_step")),
                replayed=replayed,
                staleness=expect_optional_int(p.get("staleness")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc
        if return_params and value is None:
            raise unexpected(response, f"no value for parameter {name!r}")
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
    check_options("push_gradients", options)
    known = seen.known(model, gradients) if seen is not None else {}
    response = yield from _send_step(model, gradients, False, options, policy, wire, dtypes)
    try:
        steps = {name: expect_int(p["step"]) for name, (_, _, p) in parse_entries(response).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise unexpected(response, f"{type(exc).__name__}: {exc}") from exc
    _check_steps(seen, model, steps, known, response, options, steps)
    return steps
