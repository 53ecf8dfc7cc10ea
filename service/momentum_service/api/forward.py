"""Requests for a model another replica owns are forwarded to it, as they came.

Any replica takes any request: behind a load balancer, or with a client that knows one URL,
every request still reaches the model's owner. The request goes on with its method, path,
query, headers (but the hop-by-hop ones) and body (the buffer admission read, sent without a
copy), and the owner's answer comes back as it is, with ``Momentum-Owner: <url>`` added. A
request is forwarded at most twice (``Momentum-Forwarded`` counts the hops): replicas whose
views of the others briefly differ cannot bounce it around.

If the owner does not answer, the answer is a 503 ``owner-unreachable`` with ``Retry-After``:
when a replica dies, its models are taken over once their leases expire, and a retry then
finds the new owner.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import orjson
from momentum_client._transport import BODY, PARTS, AsyncZeroCopyTransport, Body
from starlette.types import Receive, Scope, Send

from ..engine import ParameterServer, Remote
from ..engine.shards import is_shard
from ..errors import OwnerUnreachable
from ..store.base import Buffer
from .schemas import MODEL_NAME_PATTERN

__all__ = ["FORWARDED", "Forwarder", "RemoteProblem", "model_of"]


class RemoteProblem(Exception):
    """The owner answered a forwarded request with an error: passed on as it is."""

    def __init__(self, status: int, content: bytes, content_type: str) -> None:
        super().__init__(f"{status}")
        self.status, self.content, self.content_type = status, content, content_type


FORWARDED = b"momentum-forwarded"
OWNER = b"momentum-owner"
MAX_HOPS = 2
_MODEL_PATH = re.compile(r"^/v1/models/(?P<model>[^/]+)(?:/|$)")
_MODEL = re.compile(MODEL_NAME_PATTERN)
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"content-length",
    b"host",
    FORWARDED,
}
_TIMEOUTS = {"connect": 2.0, "write": 60.0, "pool": 2.0}


def model_of(path: str) -> str | None:
    """The model (or a sharded model's shard, ``<m>~<i>``) a ``/v1/models/{model}...`` path is about (None for
    other paths and invalid names)."""
    match = _MODEL_PATH.match(path)
    if match is None or not (_MODEL.match(match.group("model")) or is_shard(match.group("model"))):
        return None
    return match.group("model")


def hops(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == FORWARDED:
            try:
                return int(value)
            except ValueError:
                return MAX_HOPS
    return 0


class Forwarder:
    def __init__(self, server: ParameterServer) -> None:
        self.server = server
        self.transport = AsyncZeroCopyTransport(retries=1)
        # An owner that does not answer within a few lease periods is paused or gone (a step takes far
        # less): the request is answered 503 rather than held, and by then another replica owns the model.
        self.timeouts = {**_TIMEOUTS, "read": max(10.0, 4 * server.cluster.lease_ms / 1000)}

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def get_json(self, remote: Remote, model: str, path: str, authorization: bytes | None) -> Any:
        """``GET path`` of the replica that owns ``model``, as JSON (a 503 ``owner-unreachable`` if it does
        not answer; its own problem, if any, as :class:`RemoteProblem`)."""
        headers = [(FORWARDED, b"1")] + ([(b"authorization", authorization)] if authorization else [])
        request = httpx.Request(
            "GET", remote.url.rstrip("/") + path, headers=headers, extensions={"timeout": self.timeouts}
        )
        try:
            response = await self.transport.handle_async_request(request)
            content = await response.aread()
        except httpx.TransportError as exc:
            self.server.forget_remote(model)
            raise OwnerUnreachable(
                f"the server that owns model {model!r} ({remote.url}) did not answer ({type(exc).__name__}); retry",
                retry_after=1,
            ) from None
        if response.status_code != 200:
            raise RemoteProblem(response.status_code, content, response.headers.get("content-type", ""))
        return orjson.loads(content)

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, model: str, body: memoryview, remote: Remote
    ) -> None:
        hop = hops(scope)
        if hop >= MAX_HOPS:
            raise OwnerUnreachable(
                f"the request for model {model!r} was forwarded {hop} times without reaching its owner (the "
                "servers' views of each other differ for a moment); nothing was applied: retry",
                retry_after=1,
            )
        query = scope.get("query_string", b"")
        url = remote.url.rstrip("/") + scope["path"] + ("?" + query.decode("latin-1") if query else "")
        headers = [(n, v) for n, v in scope["headers"] if n not in _HOP_BY_HOP]
        headers.append((FORWARDED, str(hop + 1).encode()))
        request = httpx.Request(
            scope["method"],
            url,
            headers=headers,
            extensions={PARTS: (body,) if body.nbytes else (), "timeout": self.timeouts},
        )
        try:
            response = await self.transport.handle_async_request(request)
        except httpx.TransportError as exc:
            self.server.forget_remote(model)
            sent = not isinstance(exc, httpx.ConnectError)
            applied = (
                "it may or may not have been applied: retry with the same Idempotency-Key"
                if sent
                else "nothing was applied: retry"
            )
            raise OwnerUnreachable(
                f"the server that owns model {model!r} ({remote.url}) did not answer ({type(exc).__name__}); "
                f"{applied} (when a server dies, its models are taken over within the lease period)",
                retry_after=1,
            ) from None
        stream = response.extensions.get(BODY)
        content: Buffer = stream.take().data if isinstance(stream, Body) else await response.aread()
        out = [(n, v) for n, v in response.headers.raw if n.lower() not in _HOP_BY_HOP]
        out += [(b"content-length", str(len(content)).encode()), (OWNER, remote.url.encode())]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": memoryview(content), "more_body": False})
