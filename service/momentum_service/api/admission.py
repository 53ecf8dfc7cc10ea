"""Admission: who gets in, and what a request may hold, before any route runs (ASGI middleware).

A request goes through, in order:

1. **API key** (when keys are configured): a missing or unknown key is a 401 at once, before a
   byte of its body is read, so nobody without a key can make the server hold anything.
2. **Its key's share**: at most ``max_concurrent_per_key`` requests of one key are in the server
   at a time (reading their bodies or being handled); beyond, 503 with ``Retry-After``. One
   tenant, however busy or hostile, cannot take every slot from the others.
3. **Its body, read once**, into one buffer sized from ``Content-Length`` (by the HTTP protocol
   itself, see :mod:`.protocol`, or here from ``receive``; a chunked body fills a buffer of the
   size limit whose pages become resident only as it arrives, never copied to grow), before the
   request takes a processing slot: a slow sender holds a connection and its own buffer, not a
   slot that fast requests need. The body is bounded by
   size (413, from ``Content-Length`` before reading), by time (``body_timeout_s``: 408, and the
   connection is closed) and, over all bodies being read at once, by memory (``max_body_bytes``
   times ``bodies_in_flight``: beyond, 503).
4. **A processing slot**: at most ``max_concurrent`` requests are handled at once; beyond, 503
   with ``Retry-After``.
5. **Routing** (with several replicas, see :mod:`.forward`): a request about a model that another
   replica owns is forwarded there, and its answer relayed.
6. **Dispatch**: a step goes to ``fast_step`` (:func:`.step.serve_step`), straight from ASGI;
   everything else to the FastAPI application.

The body is handed to the routes as ``scope["state"]["momentum.body"]`` (a read-only
memoryview, see :func:`body_of`); ``receive`` replays it for anything else that asks.
``/healthz`` and ``/readyz`` skip all of this; the API docs need a valid key unless
``public_docs``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import ApiKey, KeyRing
from ..kernels.buffers import POOL
from ..logs import REQUEST_ID, new_request_id
from ..telemetry import Telemetry, reset_current, set_current
from . import shards
from .problems import PROBLEM_JSON, Problem, render
from .protocol import BODY_BUFFER, BodyBuffer
from .security import authenticate

log = logging.getLogger("momentum_service")

BODY = "momentum.body"
KEY = "momentum.key"

STEP_PATH = re.compile(r"^/v1/models/(?P<model>[^/]+)/step$")
FastStep = Callable[[Scope, Receive, Send, str, memoryview, ApiKey | None], Awaitable[None]]
"""Serves ``POST /v1/models/{model}/step`` from ASGI, given the model, the body and the key (see :mod:`.step`)."""
Router = Callable[[Scope, Receive, Send, memoryview], Awaitable[bool]]
"""Forwards a request about a model another replica owns (True), or leaves it to this one (False)."""

_DOCS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
_UNLIMITED = ("/healthz", "/readyz")
_DOCS_ASSETS = "/docs/assets/"
_DASHBOARD = re.compile(r"^/dashboard(?:/[^/]*)?$")


def body_of(request: Request) -> memoryview:
    """The request's body, as read once by :class:`Admission` (no copy)."""
    body: memoryview = request.scope["state"][BODY]
    return body


def key_of(request: Request) -> ApiKey | None:
    """The API key :class:`Admission` authenticated the request with (``None`` without keys)."""
    key: ApiKey | None = request.scope["state"].get(KEY)
    return key


class _Refused(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: list[tuple[bytes, bytes]],
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail, self.headers = status, slug, title, detail, headers
        self.extensions = extensions


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        *,
        ring: KeyRing,
        public_docs: bool,
        max_concurrent: int,
        max_concurrent_per_key: int,
        max_body_bytes: int,
        body_timeout_s: float,
        bodies_in_flight: int,
        fast_step: FastStep | None = None,
        router: Router | None = None,
        telemetry: Telemetry | None = None,
        public_metrics: bool = False,
    ) -> None:
        self.app, self.ring, self.public_docs = app, ring, public_docs
        self.telemetry, self.public_metrics = telemetry or Telemetry(), public_metrics
        self.fast_step, self.router = fast_step, router
        self.max_concurrent, self.max_per_key = max_concurrent, max_concurrent_per_key
        self.max_body, self.body_timeout = max_body_bytes, body_timeout_s
        self.body_budget = max_body_bytes * bodies_in_flight
        self.active = 0  # requests being handled (they hold a processing slot)
        self.per_key: Counter[str] = Counter()  # requests in the server, per API key
        self.reading = 0  # bytes reserved by the bodies being read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNLIMITED:
            await self.app(scope, receive, send)
            return
        started = False
        status, sent = 0, 0
        offered = next((v.decode("latin-1") for n, v in scope["headers"] if n == b"x-request-id"), None)
        rid = new_request_id(offered)
        rid_header = (b"x-request-id", rid.encode())

        async def tracked(message: Message) -> None:
            nonlocal started, status, sent
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        tokens = set_current(self.telemetry), REQUEST_ID.set(rid)
        began = time.perf_counter()
        try:
            await self._admit(scope, receive, tracked)
        except _Refused as refused:
            self.telemetry.problem(refused.status, refused.slug)
            if refused.status in (401, 403):
                log.info("refused %s %s: %s (%s)", scope["method"], scope["path"], refused.slug, refused.detail)
            await _reply(tracked, refused, scope["path"])
        except Exception as exc:  # a bug: answered as problem+json like any other error, never a bare 500
            if started:
                raise
            response = render(exc, scope["method"], scope["path"])
            await response(scope, receive, tracked)
        finally:
            kind = route_kind(scope["path"])
            t = self.telemetry
            t.child(t.requests, kind, str(status)).inc()
            t.child(t.request_seconds, kind).observe(time.perf_counter() - began)
            t.child(t.bytes_out, kind).inc(sent)
            reset_current(tokens[0])
            REQUEST_ID.reset(tokens[1])

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        key = self._authenticate(scope)
        if key is None and self.ring and self._public(path):
            await self.app(scope, receive, send)  # public docs, dashboard or metrics: no key, no body
            return
        who = "" if key is None else key.digest
        if key is not None and self.per_key[who] >= self.max_per_key:
            raise _Refused(
                503,
                "overloaded",
                "Service unavailable",
                f"this API key has {self.max_per_key} requests in the server, its share; retry shortly",
                [(b"retry-after", b"1")],
            )
        self.per_key[who] += 1
        try:
            body = await self._read_body(scope, receive)
            self.telemetry.child(self.telemetry.bytes_in, route_kind(path)).inc(body.nbytes)
            if self.active >= self.max_concurrent:
                raise _Refused(
                    503,
                    "overloaded",
                    "Service unavailable",
                    f"the server is handling {self.max_concurrent} requests, its limit; retry shortly",
                    [(b"retry-after", b"1")],
                )
            state = scope.setdefault("state", {})
            state[BODY], state[KEY] = body, key
            self.active += 1
            try:
                if self.router is not None and await self.router(scope, receive, send, body):
                    return
                if shards.SHARD_PATH.match(path):  # a sharded model's owner asking for one of its shards
                    await shards.serve(scope, receive, send, body, key)
                    return
                step = STEP_PATH.match(path) if scope["method"] == "POST" and self.fast_step else None
                if step is not None and self.fast_step is not None:  # the hot path, without FastAPI's machinery
                    await self.fast_step(scope, receive, send, step.group("model"), body, key)
                else:
                    await self.app(scope, _replay(body, receive), send)
            finally:
                self.active -= 1
        finally:
            self.per_key[who] -= 1
            if not self.per_key[who]:
                del self.per_key[who]

    def _public(self, path: str) -> bool:
        """Served without a key: the dashboard's page and files (they hold no data: its script asks for a
        key), the docs and their assets (``MOMENTUM_PUBLIC_DOCS``) and ``/metrics`` (``MOMENTUM_PUBLIC_METRICS``)."""
        return (
            _DASHBOARD.match(path) is not None
            or ((path in _DOCS or path.startswith(_DOCS_ASSETS)) and self.public_docs)
            or (path == "/metrics" and self.public_metrics)
        )

    def _authenticate(self, scope: Scope) -> ApiKey | None:
        """The request's key; 401 without a valid one (when keys are configured, and for every
        path but the public docs)."""
        if not self.ring:
            return None
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            return authenticate(self.ring, header)
        except Problem as problem:
            if self._public(scope["path"]):
                return None
            challenge = problem.headers["WWW-Authenticate"].encode()
            raise _Refused(
                401, "unauthorized", "Unauthorized", problem.detail, [(b"www-authenticate", challenge)]
            ) from None

    async def _read_body(self, scope: Scope, receive: Receive) -> memoryview:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            raise _Refused(
                413,
                "body-too-large",
                "Content too large",
                f"the body is {declared} bytes; the limit is {self.max_body}",
                [(b"connection", b"close")],
                limit=self.max_body,
            )
        reserved = declared if declared is not None else 0
        if self.reading + reserved > self.body_budget:
            raise _Refused(
                503,
                "overloaded",
                "Service unavailable",
                "the server is receiving as many request bodies as its memory allows; retry shortly",
                [(b"retry-after", b"1")],
            )
        ledger = [reserved]  # what this body holds of the budget (a chunked body adds as it grows)
        self.reading += reserved
        read_by_protocol: BodyBuffer | None = scope.get("extensions", {}).get(BODY_BUFFER)
        try:
            async with asyncio.timeout(self.body_timeout):
                if read_by_protocol is not None:  # read by the HTTP protocol into one buffer already
                    await read_by_protocol.arrived.wait()
                    if read_by_protocol.error is not None:
                        raise _Refused(400, "incomplete-body", "Bad request", read_by_protocol.error, [])
                    return read_by_protocol.view()
                return await self._receive_all(receive, declared, ledger)
        except TimeoutError:
            raise _Refused(
                408,
                "body-timeout",
                "Request timeout",
                f"the body did not arrive within {self.body_timeout:g} s (MOMENTUM_BODY_TIMEOUT_S); "
                "nothing was changed",
                [(b"connection", b"close")],
            ) from None
        finally:
            self.reading -= ledger[0]

    async def _receive_all(self, receive: Receive, declared: int | None, ledger: list[int]) -> memoryview:
        """The whole body in one buffer: preallocated from Content-Length, or for a chunked body at the size
        limit; either way its pages are only touched (resident) as bytes arrive, and nothing is copied.
        A chunked body's share of the bodies-in-flight budget grows geometrically with what arrived."""
        # A declared length recurs (a model's steps): its buffer comes from the pool.
        buffer = POOL.empty(declared, np.uint8) if declared is not None else None
        capacity = declared or 0  # what the budget holds for this body
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(
                    400,
                    "incomplete-body",
                    "Bad request",
                    f"the client disconnected after {size} bytes of the body",
                    [(b"connection", b"close")],
                )
            chunk = message.get("body", b"")
            end = size + len(chunk)
            if end > self.max_body:
                raise _Refused(
                    413,
                    "body-too-large",
                    "Content too large",
                    f"the body exceeds the limit of {self.max_body} bytes",
                    [(b"connection", b"close")],
                    limit=self.max_body,
                )
            if end > capacity:
                if declared is not None:  # more bytes than Content-Length said: the server's HTTP layer refuses
                    raise _Refused(
                        400, "bad-content-length", "Bad request", "the body is longer than its Content-Length", []
                    )
                grown = min(self.max_body, max(end, 2 * capacity, 1 << 16))
                ledger[0] += grown - capacity
                self.reading += grown - capacity
                capacity = grown
            if buffer is None:  # untouched pages: resident only as the body fills them, never copied to grow
                buffer = np.empty(self.max_body, np.uint8)
            buffer[size:end] = np.frombuffer(chunk, np.uint8)
            size = end
            if not message.get("more_body", False):
                break
        view = buffer.data[:size]
        return view.toreadonly()


_KINDS = (
    (re.compile(r"^/v1/models/[^/]+/step$"), "step"),
    (re.compile(r"^/v1/models/[^/]+/params(/[^/]+)?$"), "params"),
    (re.compile(r"^/v1/models/[^/]+/checkpoint$"), "checkpoint"),
    (re.compile(r"^/v1/models/[^/]+/metrics$"), "series"),
    (re.compile(r"^/v1/models/[^/]+$"), "model"),
    (re.compile(r"^/v1/models/?$"), "models"),
    (re.compile(r"^/metrics$"), "metrics"),
    (re.compile(r"^/dashboard(/.*)?$"), "dashboard"),
    (re.compile(r"^/(docs|redoc|openapi\.json)"), "docs"),
)


def route_kind(path: str) -> str:
    """A request's kind, as a bounded label (never the path itself: model names are unbounded)."""
    for pattern, kind in _KINDS:
        if pattern.match(path):
            return kind
    return "other"


def _content_length(scope: Scope) -> int | None:
    values = [v for n, v in scope["headers"] if n == b"content-length"]
    if not values:
        return None
    try:
        return max(0, int(values[0]))
    except ValueError:
        raise _Refused(400, "bad-content-length", "Bad request", "Content-Length is not a number", []) from None


def _replay(body: memoryview, receive: Receive) -> Receive:
    """A ``receive`` that gives the body once (already read), then waits for what the client does next."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        return await receive()

    return replayed


async def _reply(send: Send, refused: _Refused, path: str) -> None:
    body = orjson.dumps(
        {
            "type": f"urn:momentum-service:problem:{refused.slug}",
            "title": refused.title,
            "status": refused.status,
            "detail": refused.detail,
            "instance": path,
            **refused.extensions,
        }
    )
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": refused.status,
        "headers": [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            *refused.headers,
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})
