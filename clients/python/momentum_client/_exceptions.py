"""Every exception the SDK raises, in one tree::

    MomentumError                     base class; catch this to catch everything below
    ├── TransportError                no HTTP response: connection refused/reset, DNS, TLS, ...
    │   └── RequestTimeout            connect/read/write/pool timeout (also a builtin TimeoutError)
    ├── UnexpectedResponse            a success response whose body the SDK cannot interpret
    └── APIError                      the server answered with an error status (4xx/5xx)
        ├── InvalidRequest            400, 422 (``errors``: the server's validation errors)
        ├── NotFound                  404 unknown model or parameter
        ├── Conflict                  409 gradient shape/dtype does not match the parameter
        │   └── PreconditionFailed    412 ``If-None-Match: *`` and it exists (``existing``)
        ├── PayloadTooLarge           413
        ├── UnsupportedMediaType      415
        └── ServerError               any other 5xx
            └── ServiceUnavailable    503 the store is unavailable (``retry_after``)

An error status without a status-specific class (401, 405, 429, ...) raises :class:`APIError`
itself. The class is chosen by status code alone, so error bodies that are not
``application/problem+json`` map the same way.

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
    "UnexpectedResponse",
    "APIError",
    "InvalidRequest",
    "NotFound",
    "Conflict",
    "PreconditionFailed",
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


class UnexpectedResponse(MomentumError):
    """A success response whose body is not what the API defines (wrong server or version?)."""

    def __init__(self, message: str, *, status: int, method: str, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.method = method
        self.url = url


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


class NotFound(APIError):
    """404: the model or parameter does not exist."""


class Conflict(APIError):
    """409: the request conflicts with current state (e.g. gradient shape/dtype mismatch)."""


class PreconditionFailed(Conflict):
    """412: an ``If-None-Match: *`` create found the resource already there."""

    @property
    def existing(self) -> list[str]:
        """The ``existing`` extension member: names of the parameters that already exist."""
        existing = self.problem.get("existing")
        return [n for n in existing if isinstance(n, str)] if isinstance(existing, list) else []


class PayloadTooLarge(APIError):
    """413: the request body or a tensor exceeds the server's limits."""


class UnsupportedMediaType(APIError):
    """415: the request body's media type is not accepted."""


class ServerError(APIError):
    """A 5xx answer."""


class ServiceUnavailable(ServerError):
    """503: the server cannot reach its store right now; retrying later may succeed."""

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait, from the ``Retry-After`` header (delay or HTTP date); ``None`` if absent."""
        return _parse_retry_after(self.headers.get("retry-after"))


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
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
    """The exception for an error answer, its class chosen by ``status`` alone."""
    cls = _BY_STATUS.get(status) or (ServerError if 500 <= status <= 599 else APIError)
    return cls(status, problem, headers=headers, method=method, url=url)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _parse_retry_after(value: str | None) -> float | None:
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
