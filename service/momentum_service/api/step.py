"""``POST /v1/models/{model}/step``: the hot path, from a body already read to a response not yet built.

:func:`step_response` is the whole step over HTTP: the body decoded once by its codec (off the
event loop when large), the Idempotency-Key checked and fingerprinted, the engine called, the
results encoded as parts. :func:`serve_step` runs it for the admission middleware straight from
ASGI, without FastAPI's per-request machinery (routing, dependency solving, validation of a
body it does not parse): the same checks are made here, the same errors answered (the path's
model name, the key's scope, problem+json for everything). The FastAPI route of the same path
stays, for the OpenAPI document, and answers through :func:`step_response` too.
"""

from __future__ import annotations

import logging
import re
import time

import xxhash
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..auth import ApiKey
from ..engine import Idempotency, ParameterServer, StepPending
from ..telemetry import current
from . import codecs, shards
from .body import off_the_loop
from .messages import PATTERN_HELP, shown
from .problems import Problem, json_response, render
from .responses import PartsResponse
from .schemas import MODEL_NAME_PATTERN

log = logging.getLogger("momentum_service")

_MODEL = re.compile(MODEL_NAME_PATTERN)
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def fingerprint(method: str, path: str, content_type: str, raw: bytes | memoryview) -> str:
    """What identifies a request under its Idempotency-Key: method, path, media type and the whole body.

    XXH3-128 (xxhash) reads the body at memory speed (a 4 MB gradient in about 0.1 ms, where
    SHA-256 took 2.3 ms and CRC-32 1.0 ms). It is not a cryptographic hash, and need not be: the
    key is the client's own, and this only catches a client that sends another body under it.
    """
    digest = xxhash.xxh3_128()
    digest.update(f"{method}\n{path}\n{content_type}\n{len(raw)}\n".encode())
    digest.update(raw)
    return digest.hexdigest()


FRESH_KEY = "momentum-fresh-key"
"""A request header: the SDK made the Idempotency-Key up for this push and sends it for the first time,
so no earlier owner of the model can have seen it (the owner skips looking it up in the journal)."""


def idempotency(headers: Headers, path: str, raw: memoryview) -> Idempotency | None:
    """The request's Idempotency-Key and fingerprint; 422 for two keys or a malformed one."""
    keys = headers.getlist("idempotency-key")
    if not keys:
        return None
    if len(keys) > 1:  # which one counts would be ambiguous
        raise Problem(
            422,
            "invalid-idempotency-key",
            "the request has more than one Idempotency-Key header; send exactly one",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "sent more than once"}],
        )
    key = keys[0]
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.match(key):
        raise Problem(
            422,
            "invalid-idempotency-key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "1 to 255 visible ASCII characters"}],
        )
    fresh = headers.get(FRESH_KEY, "").strip().lower() in ("1", "true")
    return Idempotency(key, fingerprint("POST", path, headers.get("content-type", ""), raw), fresh)


async def step_response(
    model: str, path: str, headers: Headers, body: memoryview, server: ParameterServer, limits: codecs.Limits
) -> Response:
    """Decode, step, encode: the response to a step request whose body has been read."""
    began = time.perf_counter()
    response = await _step_response(model, path, headers, body, server, limits)
    elapsed = time.perf_counter() - began
    telemetry = current()
    if telemetry is not None:
        telemetry.child(telemetry.step_seconds, telemetry.label(model)).observe(elapsed)
        if elapsed * 1000 > telemetry.slow_step_ms:
            log.warning(
                "slow step: model %r took %.0f ms (over %g ms), %d bytes",
                model,
                elapsed * 1000,
                telemetry.slow_step_ms,
                len(body),
                extra={"model": model, "elapsed_ms": round(elapsed * 1000, 1)},
            )
    return response


async def _step_response(
    model: str, path: str, headers: Headers, body: memoryview, server: ParameterServer, limits: codecs.Limits
) -> Response:
    codec = codecs.for_request(headers.get("content-type"))
    received = await off_the_loop(len(body), codec.decode_step, body, limits)
    key = await off_the_loop(len(body), idempotency, headers, path, body)
    n = await shards.count(server, model)
    if n > 1:
        return await shards.step_response(server, model, n, received, key, headers)
    options = received.options
    results = await server.step(
        model,
        received.grads,
        received=received.received,
        expected_steps=options.expected_steps,
        idempotency=key,
        worker_id=options.worker_id,
        base_step=options.base_step,
        metrics=options.metrics,
    )
    if isinstance(results, StepPending):
        pending = {
            "status": "pending",
            "base_step": results.base_step,
            "workers": results.workers,
            "contributions": results.counts,
            "detail": "not all workers have contributed to this step yet; send the same push again to wait for "
            "the result (it is not counted twice)",
        }
        location = f"/v1/models/{model}/params?names={','.join(received.grads)}"
        return json_response(pending, 202, headers={"Location": location, "Retry-After": "0"})
    replayed = any(r.replayed for r in results.values())
    out = codecs.for_response(headers.get("accept"))
    encoded = out.encode_step(results, options.return_params)
    return PartsResponse(encoded, headers={"Idempotent-Replayed": "true"} if replayed else None)


def _check_scope(key: ApiKey | None, model: str) -> None:
    if key is not None and not key.allows("write", model):
        raise Problem(
            403,
            "forbidden",
            f"this API key may not write model {model!r} (it needs a write: scope matching the model; "
            "admin includes write, which includes read)",
            required=f"write:{model}",
        )


async def serve_step(
    scope: Scope, receive: Receive, send: Send, model: str, body: memoryview, key: ApiKey | None
) -> None:
    """A step straight from ASGI (see the module's docstring); every error is problem+json."""
    path: str = scope["path"]
    state = scope["app"].state
    try:
        if not _MODEL.match(model):
            msg = f"model must be {PATTERN_HELP['model']}, got {shown(model)}"
            raise Problem(422, "invalid-request", msg, errors=[{"loc": ["path", "model"], "msg": msg}])
        _check_scope(key, model)
        server: ParameterServer = state.server
        limits: codecs.Limits = state.limits
        response = await step_response(model, path, Headers(scope=scope), body, server, limits)
    except Exception as exc:  # every error the step can raise, rendered as the FastAPI handlers do
        response = render(exc, "POST", path)
    await response(scope, receive, send)
