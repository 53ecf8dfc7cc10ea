"""Who may do what over HTTP: bearer API keys checked against each route's scope, and the
limits that protect the process as a whole (the cap on concurrent requests).

Every ``/v1`` route depends on :func:`require` with its level: ``read`` (GET a model or
parameters), ``write`` (steps, setting parameter values) or ``admin`` (creating,
replacing, patching and deleting models and parameters). Without a key, or with an unknown
one, the answer is 401 with ``WWW-Authenticate: Bearer``; with a key whose scopes do not
cover the model, 403. ``/healthz`` and ``/readyz`` need no key; the API documentation
(``/openapi.json``, ``/docs``, ``/redoc``) needs a valid key unless ``MOMENTUM_PUBLIC_DOCS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import ApiKey, KeyRing
from .problems import PROBLEM_JSON, Problem

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


READ = Depends(require("read"))
WRITE = Depends(require("write"))
ADMIN = Depends(require("admin"))

_DOCS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
_UNLIMITED = ("/healthz", "/readyz")


def _problem_bytes(status: int, slug: str, title: str, detail: str, path: str) -> bytes:
    return orjson.dumps(
        {
            "type": f"urn:momentum-service:problem:{slug}",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": path,
        }
    )


class Guard:
    """ASGI middleware: the concurrent-request cap (503 beyond it) and the documentation's key check."""

    def __init__(self, app: ASGIApp, *, ring: KeyRing, max_concurrent: int, public_docs: bool) -> None:
        self.app, self.ring, self.max_concurrent, self.public_docs = app, ring, max_concurrent, public_docs
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in _UNLIMITED:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_concurrent:
            body = _problem_bytes(
                503,
                "overloaded",
                "Service unavailable",
                f"the server is handling {self.max_concurrent} requests, its limit; retry shortly",
                path,
            )
            await _reply(send, 503, body, [(b"retry-after", b"1")])
            return
        if self.ring and not self.public_docs and path in _DOCS:
            headers = dict(scope["headers"])
            try:
                authenticate(self.ring, (headers.get(b"authorization") or b"").decode("latin-1") or None)
            except Problem as problem:
                body = _problem_bytes(401, "unauthorized", "Unauthorized", problem.detail, path)
                challenge = problem.headers["WWW-Authenticate"].encode()
                await _reply(send, 401, body, [(b"www-authenticate", challenge)])
                return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()), *headers],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})
