"""Who may do what over HTTP: bearer API keys checked against each route's scope.

The key itself is checked first, by :mod:`.admission`, before a body is read; each route then
checks that the key's scopes cover its model.

Every ``/v1`` route depends on :func:`require` with its level: ``read`` (GET a model or
parameters), ``write`` (steps, setting parameter values) or ``admin`` (creating,
replacing, patching and deleting models and parameters). Without a key, or with an unknown
one, the answer is 401 with ``WWW-Authenticate: Bearer``; with a key whose scopes do not
cover the model, 403. ``/healthz`` and ``/readyz`` need no key; the API documentation
(``/openapi.json``, ``/docs``, ``/redoc``) needs a valid key unless ``MOMENTUM_PUBLIC_DOCS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import ApiKey, KeyRing
from .problems import Problem

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="momentum-service"'}


def _unauthorized(detail: str, invalid: bool) -> Problem:
    header = 'Bearer realm="momentum-service", error="invalid_token"' if invalid else _CHALLENGE["WWW-Authenticate"]
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": header})


def authenticate(ring: KeyRing, authorization: str | None) -> ApiKey:
    """The key of an ``Authorization`` header, or the 401 to answer."""
    if not authorization:
        raise _unauthorized("this server requires an API key: send Authorization: Bearer <key>", invalid=False)
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("send the API key as Authorization: Bearer <key>", invalid=False)
    key = ring.authenticate(token.strip())
    if key is None:
        raise _unauthorized("the API key is not valid", invalid=True)
    return key


def require(level: str) -> Callable[..., Awaitable[ApiKey | None]]:
    """A dependency that lets the request through if its key may act at ``level`` on the path's model."""

    async def check(request: Request, credentials: Credentials) -> ApiKey | None:
        ring: KeyRing = request.app.state.keys
        if not ring:
            return None
        key: ApiKey | None = request.scope.get("state", {}).get("momentum.key")  # authenticated by admission
        if key is None:
            header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
            key = authenticate(ring, header or request.headers.get("authorization"))
        model = request.path_params.get("model", "")
        if not key.allows(level, model):
            raise Problem(
                403,
                "forbidden",
                f"this API key may not {level} model {model!r} (it needs {'an' if level == 'admin' else 'a'} "
                f"{level}: scope matching the model; admin includes write, which includes read)",
                required=f"{level}:{model}",
            )
        return key

    check.__name__ = f"require_{level}"
    return check


async def caller(request: Request, credentials: Credentials) -> ApiKey | None:
    """The request's key (401 without a valid one), for routes not about one model; None without keys."""
    ring: KeyRing = request.app.state.keys
    if not ring:
        return None
    key: ApiKey | None = request.scope.get("state", {}).get("momentum.key")
    if key is None and request.url.path == "/metrics" and request.app.state.settings.public_metrics:
        return None  # served without a key (MOMENTUM_PUBLIC_METRICS)
    if key is None:
        header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
        key = authenticate(ring, header or request.headers.get("authorization"))
    return key


CallerDep = Annotated[ApiKey | None, Depends(caller)]
READ = Depends(require("read"))
WRITE = Depends(require("write"))
ADMIN = Depends(require("admin"))
