"""RFC 9457 problem+json: every error the API returns, and the mapping from domain errors.

Types are URNs ``urn:momentum-service:problem:<slug>``; the status tells a client what to do:
4xx means fix the request (nothing changed), 503 means retry later (nothing changed, except
for a step whose commit the store interrupted: its detail says so).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from .. import errors
from ..telemetry import current
from . import messages
from .codecs import BodyError

log = logging.getLogger("momentum_service")

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    412: "Precondition failed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error response. Raise it anywhere in the HTTP layer."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.detail = status, slug, detail
        self.headers = headers or {}
        self.extensions = extensions


def problem_response(request: Request, problem: Problem) -> Response:
    return _response(problem, request.url.path)


def _response(problem: Problem, path: str) -> Response:
    telemetry = current()
    if telemetry is not None:
        telemetry.problem(problem.status, problem.slug)
    body = {
        "type": f"urn:momentum-service:problem:{problem.slug}",
        "title": _TITLES.get(problem.status, "Error"),
        "status": problem.status,
        "detail": problem.detail,
        "instance": path,
        **problem.extensions,
    }
    return Response(orjson.dumps(body), problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers=headers, media_type="application/json"
    )


def from_body(exc: BodyError) -> Problem:
    extensions = dict(exc.extensions)
    if exc.errors is not None:
        extensions["errors"] = exc.errors
    return Problem(exc.status, exc.slug, exc.detail, headers=exc.headers, **extensions)


def render(exc: BaseException, method: str, path: str) -> Response:
    """The problem+json response for any error raised while handling a request (logged as it deserves)."""
    if isinstance(exc, Problem):
        return _response(exc, path)
    if isinstance(exc, BodyError):
        return _response(from_body(exc), path)
    if isinstance(exc, errors.ServiceError):
        if isinstance(exc, errors.StoreUnavailable | errors.StoreFull):
            log.warning("store unavailable: %s", exc)
        elif isinstance(exc, errors.StoreError):
            log.error("store error on %s %s: %s", method, path, exc)
        return _response(from_domain(exc), path)
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return _response(Problem(500, "internal", "unexpected server error; nothing was changed"), path)


def from_domain(exc: errors.ServiceError) -> Problem:
    match exc:
        case errors.ModelNotFound():
            return Problem(404, "model-not-found", str(exc), model=exc.model)
        case errors.ModelExists():
            return Problem(412, "model-exists", str(exc), model=exc.model, existing=exc.config)
        case errors.ParamNotFound():
            return Problem(404, "param-not-found", str(exc), model=exc.model, **_capped("missing", exc.names))
        case errors.ParamsExist():
            return Problem(412, "param-exists", str(exc), **_capped("existing", exc.names))
        case errors.TensorMismatch():
            return Problem(409, "tensor-mismatch", str(exc), **_capped("mismatches", exc.mismatches))
        case errors.InvalidConfig():
            loc = ["body", exc.field, *exc.path]
            return Problem(422, "invalid-config", str(exc), errors=[{"loc": loc, "msg": str(exc)}])
        case errors.RuleChange():
            return Problem(409, "rule-change", str(exc), current=exc.current, requested=exc.requested)
        case errors.StepMismatch():
            return Problem(409, "step-mismatch", str(exc), current_steps=exc.current)
        case errors.IdempotencyKeyReused():
            return Problem(
                422,
                "idempotency-key-reused",
                str(exc),
                errors=[{"loc": ["header", "Idempotency-Key"], "msg": str(exc)}],
            )
        case errors.IdempotencyInFlight():
            return Problem(409, "idempotency-in-flight", str(exc), headers={"Retry-After": "1"})
        case errors.ModeFieldRequired():
            return Problem(422, "mode-field-required", str(exc), errors=[{"loc": ["body", exc.field], "msg": str(exc)}])
        case errors.WorkerOutOfRange():
            loc = ["body", "worker_id"]
            return Problem(422, "worker-out-of-range", str(exc), errors=[{"loc": loc, "msg": str(exc)}])
        case errors.StaleGradient():
            return Problem(409, "stale-gradient", str(exc), current_steps=exc.current)
        case errors.StepAlreadyApplied():
            return Problem(409, "step-already-applied", str(exc), current_steps=exc.current)
        case errors.NonFiniteResult():
            return Problem(422, "non-finite-result", str(exc))
        case errors.Contention():
            return Problem(503, "contention", str(exc), headers={"Retry-After": "1"})
        case errors.OwnerUnreachable():
            return Problem(503, "owner-unreachable", str(exc), headers={"Retry-After": f"{exc.retry_after:.0f}"})
        case errors.OwnerLost() | errors.NotOwner() | errors.Fenced() | errors.KeyTaken():
            return Problem(503, "owner-moved", str(exc), headers={"Retry-After": "0"})
        case errors.StoreUnavailable():
            return Problem(503, "store-unavailable", str(exc), headers={"Retry-After": "1"})
        case errors.StoreFull():
            return Problem(503, "store-full", str(exc), headers={"Retry-After": "5"})
        case errors.StoreError():
            return Problem(500, "store-error", str(exc))
    return Problem(500, "internal", "unexpected error")


def _capped(name: str, items: list[str] | dict[str, Any]) -> dict[str, Any]:
    """``{name: the first LISTED items}``, plus ``{name}_count`` when there were more."""
    if len(items) <= errors.LISTED:
        return {name: items}
    kept: list[str] | dict[str, Any] = (
        items[: errors.LISTED] if isinstance(items, list) else dict(list(items.items())[: errors.LISTED])
    )
    return {name: kept, f"{name}_count": len(items)}


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str:
    """Every method the path supports (Starlette's own 405 names only the first route whose path matched)."""
    routes = request.app.router.routes
    allowed = [m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)]
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    async def on_error(request: Request, exc: Exception) -> Response:
        return render(exc, request.method, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errs: list[dict[str, Any]] = []
        for e in exc.errors():
            loc = list(e.get("loc", ()))[:2]  # (path|query|header, name); the rest names union members
            msg = messages.message(e, loc, None)
            if not any(x["loc"] == loc and x["msg"] == msg for x in errs):
                errs.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
        errs = [e for e in errs if e["type"] != "none_required"] or errs
        return problem_response(request, Problem(422, "invalid-request", messages.summary(errs), errors=errs[:20]))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
        return problem_response(request, Problem(exc.status_code, slug, str(exc.detail), headers=headers))

    app.add_exception_handler(Problem, on_error)
    app.add_exception_handler(BodyError, on_error)
    app.add_exception_handler(errors.ServiceError, on_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
