"""Every exception the SDK raises, in one tree::

    MomentumError                     base class; catch this to catch everything below
    ├── TransportError                no HTTP response: connection refused/reset, DNS, TLS, ...
    │   └── RequestTimeout            connect/read/write/pool timeout (also a builtin TimeoutError)
    ├── StepTimeout                   a sync-mode step still waits for other workers after the
    │                                 client's ``sync_wait`` (``base_step``, ``workers``,
    │                                 ``contributions``; also a builtin TimeoutError)
    ├── UnexpectedResponse            a success response whose body the SDK cannot interpret
    ├── StepWentBack                  a step was applied, but a parameter's step count is not past
    │                                 one this client saw before: steps it was told of were lost
    │                                 (``regressions``, ``result``; see below)
    └── APIError                      the server answered with an error status (4xx/5xx)
        ├── InvalidRequest            400, 422 (``errors``: the server's validation errors)
        ├── Unauthorized              401 no API key, or one the server does not know
        ├── Forbidden                 403 the API key's scopes do not cover the model (``required``)
        ├── NotFound                  404 unknown model or parameter
        ├── Conflict                  409 the request conflicts with current state (``current_steps``)
        │   ├── TensorMismatch        409 ``tensor-mismatch``: a gradient's shape or dtype is not its
        │   │                         parameter's (``mismatches``; the message says what to cast)
        │   └── PreconditionFailed    412 ``If-None-Match: *`` and it exists (``existing``)
        │       └── ModelExists       412 ``model-exists``: ``create_model`` of a model that exists
        │                             (``existing_config``)
        ├── PayloadTooLarge           413
        ├── UnsupportedMediaType      415
        └── ServerError               any other 5xx
            └── ServiceUnavailable    503 the store is unavailable, full or contended (``retry_after``)

An error status without a status-specific class (405, 429, ...) raises :class:`APIError`
itself. The class is chosen by status code, so error bodies that are not
``application/problem+json`` map the same way; two codes refine it (``tensor-mismatch``,
``model-exists``). Every :class:`APIError` has ``code``, the
problem type's slug (``"step-mismatch"`` for ``urn:momentum-service:problem:step-mismatch``),
to tell apart the cases that share a status, and ``retry_after`` from the ``Retry-After`` header.
The 409 slugs: ``tensor-mismatch`` (gradient shape/dtype), ``rule-change``, ``step-mismatch``
(``expected_steps`` not met), ``stale-gradient`` (bounded mode, or a sync push for another
step), ``step-already-applied`` (sync mode, applied without this worker) and
``idempotency-in-flight``; the three step ones carry the parameters' ``current_steps``.

``step``, ``step_results`` and ``push_gradients`` send an ``Idempotency-Key`` and retry by
themselves (up to the client's ``max_retries``, with backoff) on :class:`TransportError`,
:class:`ServiceUnavailable`, 502 and 504 from a proxy, and 409 ``idempotency-in-flight``; those exceptions reach the
caller of a step only once the retries are used up, and the step was then applied at most once.
Other calls are not retried.

A parameter's step count only grows while its model lives: a step sent after this client saw step
``s`` of a parameter gets a step above ``s``. When it does not, what the client was told was lost:
a model with ``{"durability": {"flush_ms": N}}`` acknowledges steps from the owner's memory, and a
crash of that owner loses the steps of its last N ms (plus a lease period); a model deleted and
created again by someone else starts over too. The step was applied (to the state as it is now)
and the client raises :class:`StepWentBack` with it (``result``: what the call would have returned),
or, with ``on_step_back="warn"``, warns :class:`StepWentBackWarning` and returns it. The client
forgets what it saw of a model when it deletes, re-creates or re-initialises it itself.

Invalid arguments (an unsupported dtype, NaN in a tensor, an unknown hyperparameter) are
programming errors and raise the builtin :class:`TypeError` / :class:`ValueError` before any
request is sent.
"""

from __future__ import annotations

import email.utils
import http
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = [
    "MomentumError",
    "TransportError",
    "RequestTimeout",
    "StepTimeout",
    "UnexpectedResponse",
    "StepWentBack",
    "StepWentBackWarning",
    "APIError",
    "InvalidRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "TensorMismatch",
    "PreconditionFailed",
    "ModelExists",
    "ModelConfigWarning",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "ServerError",
    "ServiceUnavailable",
]


class MomentumError(Exception):
    """Base class of every exception raised by the momentum client."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take keyword-only arguments; pickle (e.g. across a process pool) by state.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[MomentumError], args: tuple[Any, ...], state: dict[str, Any]) -> MomentumError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class TransportError(MomentumError):
    """The request got no HTTP response. The underlying ``httpx`` exception is ``__cause__``."""

    def __init__(self, message: str, *, method: str, url: str) -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class RequestTimeout(TransportError, TimeoutError):
    """The request timed out (connect, read, write or connection-pool timeout)."""


class StepTimeout(MomentumError, TimeoutError):
    """A sync-mode step was not complete after the client's ``sync_wait``.

    ``base_step`` is the step the push contributes to, ``workers`` the contributions the
    step needs, ``contributions`` how many workers had contributed per parameter at the last
    answer. The push stays recorded on the server: sending it again (same arguments, or the
    same ``idempotency_key``) waits for the step again without counting it twice.
    """

    def __init__(
        self,
        message: str,
        *,
        base_step: int,
        workers: int,
        contributions: Mapping[str, int],
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.base_step = base_step
        self.workers = workers
        self.contributions: dict[str, int] = dict(contributions)
        self.method = method
        self.url = url


class UnexpectedResponse(MomentumError):
    """A success response whose body is not what the API defines (wrong server or version?)."""

    def __init__(self, message: str, *, status: int, method: str, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.method = method
        self.url = url


class StepWentBack(MomentumError):
    """A step was applied, but a parameter's step count is not past one this client had seen.

    ``regressions`` is ``{name: (step, seen)}``: the step count the server gave now, and the
    highest one this client had seen before sending. The steps in between were lost by the
    server (see the module docstring), so the worker's view of training went back: reload the
    parameters (or restart from a checkpoint) if that matters. ``result`` is what the call
    would have returned; the step itself was applied once.
    """

    def __init__(self, message: str, *, model: str, regressions: Mapping[str, tuple[int, int]], result: Any) -> None:
        super().__init__(message)
        self.model = model
        self.regressions: dict[str, tuple[int, int]] = dict(regressions)
        self.result = result


class StepWentBackWarning(UserWarning):
    """What :class:`StepWentBack` says, as a warning: clients made with ``on_step_back="warn"``."""


class APIError(MomentumError):
    """The server answered with an error status.

    ``problem`` is the RFC 9457 problem object (extension members included); ``type``,
    ``title``, ``detail`` and ``instance`` are its standard members, ``None`` when absent.
    """

    def __init__(
        self,
        status: int,
        problem: Mapping[str, Any],
        *,
        headers: httpx.Headers | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        self.type: str | None = _str_or_none(problem.get("type"))
        self.title: str | None = _str_or_none(problem.get("title"))
        self.detail: str | None = _str_or_none(problem.get("detail"))
        self.instance: str | None = _str_or_none(problem.get("instance"))
        self.headers = headers if headers is not None else httpx.Headers()
        self.method = method
        self.url = url
        super().__init__(self._message())

    @property
    def code(self) -> str | None:
        """The problem type's slug (``"step-mismatch"``); ``None`` when the type is not one of this API's."""
        if self.type is not None and self.type.startswith(PROBLEM_TYPE_PREFIX):
            return self.type[len(PROBLEM_TYPE_PREFIX) :]
        return None

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait, from the ``Retry-After`` header (delay or HTTP date); ``None`` if absent."""
        return parse_retry_after(self.headers.get("retry-after"))

    def _message(self) -> str:
        text = f"{self.status} {self.title or _phrase(self.status)}"
        if self.detail:
            text += f": {self.detail}"
        if self.method and self.url:
            text += f" ({self.method} {self.url})"
        return text


class InvalidRequest(APIError):
    """400 or 422: the request was malformed or failed validation."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The ``errors`` extension member: ``[{"loc": [...], "msg": str}, ...]`` (may be empty)."""
        errors = self.problem.get("errors")
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    def _message(self) -> str:
        text = super()._message()
        shown = [f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in self.errors[:3]]
        if shown:
            text += "; " + "; ".join(shown)
            if len(self.errors) > 3:
                text += f"; ... ({len(self.errors) - 3} more)"
        return text


class Unauthorized(APIError):
    """401: no API key was sent, or the server does not know it (``api_key=`` or ``MOMENTUM_API_KEY``)."""


class Forbidden(APIError):
    """403: the API key is valid, but its scopes do not allow this on this model."""

    @property
    def required(self) -> str | None:
        """The scope the request needed, e.g. ``"admin:mnist"`` (from the problem's ``required``)."""
        return _str_or_none(self.problem.get("required"))


class NotFound(APIError):
    """404: the model or parameter does not exist."""


class Conflict(APIError):
    """409: the request conflicts with current state (see ``code`` for which conflict)."""

    @property
    def current_steps(self) -> dict[str, int]:
        """The ``current_steps`` extension member: ``{parameter: step}`` (``{}`` when absent)."""
        steps = self.problem.get("current_steps")
        if not isinstance(steps, dict):
            return {}
        return {n: s for n, s in steps.items() if isinstance(n, str) and isinstance(s, int) and not isinstance(s, bool)}


class PreconditionFailed(Conflict):
    """412: an ``If-None-Match: *`` create found the resource already there."""

    @property
    def existing(self) -> list[str]:
        """The ``existing`` extension member: names of the parameters that already exist."""
        existing = self.problem.get("existing")
        return [n for n in existing if isinstance(n, str)] if isinstance(existing, list) else []


class TensorMismatch(Conflict):
    """409 ``tensor-mismatch``: a gradient does not have its parameter's shape or dtype (nothing was applied).

    ``mismatches`` is ``{name: {"expected": {"shape", "dtype"}, "got": {"shape", "dtype"}}}``. The
    message names each parameter and, when only the dtype differs, the cast to make (numpy's
    default is float64, a float32 parameter needs float32 gradients), or ``cast_gradients=True``
    on the client to let it cast.
    """

    @property
    def mismatches(self) -> dict[str, dict[str, Any]]:
        raw = self.problem.get("mismatches")
        return {n: m for n, m in raw.items() if isinstance(m, dict)} if isinstance(raw, dict) else {}

    def _message(self) -> str:
        parts = []
        for name, m in sorted(self.mismatches.items()):
            expected, got = m.get("expected") or {}, m.get("got") or {}
            if expected.get("shape") == got.get("shape") and expected.get("dtype") != got.get("dtype"):
                parts.append(
                    f"gradient {name!r} is {got.get('dtype')} but the parameter is {expected.get('dtype')}: cast it "
                    f"(grad.astype(np.{expected.get('dtype')})), or create the client with cast_gradients=True"
                )
            else:
                parts.append(
                    f"gradient {name!r} has shape {got.get('shape')} and dtype {got.get('dtype')}, the parameter "
                    f"{expected.get('shape')} and {expected.get('dtype')}"
                )
        text = f"{self.status} {self.title or _phrase(self.status)}: " + ("; ".join(parts) or (self.detail or ""))
        if self.method and self.url:
            text += f" ({self.method} {self.url})"
        return text


class ModelExists(PreconditionFailed):
    """412 ``model-exists``: ``create_model`` found the model already there, and changed nothing.

    ``existing_config`` is its config as the server holds it (``optimizer``, ``schedule``, ``mode``...).
    Pass ``exist_ok=True`` to use the existing model, or call ``update_model`` / ``replace_model``.
    """

    @property
    def existing_config(self) -> dict[str, Any]:
        existing = self.problem.get("existing")
        return existing if isinstance(existing, dict) else {}


class ModelConfigWarning(UserWarning):
    """``create_model(..., exist_ok=True)`` found the model with another config than the one asked for.

    The existing model is left as it is (another worker may have created it, or someone changed its
    hyperparameters since): the message lists the differences. Turn it into an error with
    ``warnings.simplefilter("error", ModelConfigWarning)``.
    """


class PayloadTooLarge(APIError):
    """413: the request body or a tensor exceeds the server's limits."""


class UnsupportedMediaType(APIError):
    """415: the request body's media type is not accepted."""


class ServerError(APIError):
    """A 5xx answer."""


class ServiceUnavailable(ServerError):
    """503: the server cannot reach its store right now, or is contended; retrying later may succeed."""


PROBLEM_TYPE_PREFIX = "urn:momentum-service:problem:"

_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidRequest,
    503: ServiceUnavailable,
}


def api_error(
    status: int,
    problem: Mapping[str, Any],
    *,
    headers: httpx.Headers | None = None,
    method: str = "",
    url: str = "",
) -> APIError:
    """The exception for an error answer, its class chosen by ``status`` (refined by a few codes)."""
    cls = _BY_STATUS.get(status) or (ServerError if 500 <= status <= 599 else APIError)
    refined = _BY_CODE.get((status, str(problem.get("type", "")).removeprefix(PROBLEM_TYPE_PREFIX)))
    cls = refined or cls
    return cls(status, problem, headers=headers, method=method, url=url)


_BY_CODE: dict[tuple[int, str], type[APIError]] = {
    (409, "tensor-mismatch"): TensorMismatch,
    (412, "model-exists"): ModelExists,
}


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header value in seconds (delay or HTTP date); ``None`` if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
