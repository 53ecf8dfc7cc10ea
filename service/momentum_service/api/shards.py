"""Sharded models over HTTP: a request for the model fanned out to its shards' owners, and their answers merged.

A model created with ``"shards": n`` (n > 1) keeps its parameters in n shards (see
:mod:`..engine.shards`): shard 0 is the model itself, shard ``i`` the internal model ``<m>~<i>``,
each with its own owner, lease, log and idempotency table. Every request for the model reaches
the model's owner (shard 0) as any request does; there, the handlers below split it by shard,
run each part on its shard's owner (this process's engine when it owns the shard, else that
replica over HTTP, at ``/v1/models/<m>~<i>/...`` with the caller's API key and the
``Momentum-Forwarded`` header), concurrently, and merge the answers into one response in the
client's wire format.

**What a step on a sharded model guarantees.** The gradients are split by shard and each part
is applied by its shard's owner, all or none within the shard, as an unsharded step is.

- *At most once per shard, completed by a retry.* With an ``Idempotency-Key``, every shard
  applies its part at most once per key (each shard's own idempotency table, under a
  fingerprint derived from the whole request's). A retry of the same request with the same key
  completes the shards a failed attempt missed; the shards that applied it answer their first
  result again (nothing is applied twice).
- *Never a partial 200.* The answer is 200 only when every shard has applied (or replayed) its
  part; each parameter's ``step`` says the step it reached. When a shard's owner does not answer
  (or its store fails), the answer is a 503 ``step-incomplete`` with ``Retry-After``, which says
  which shards applied the step (``applied``: shard -> its parameters' steps) and which did not
  confirm it (``incomplete``); a retry with the same key completes it. When a shard *refuses*
  its part (an unknown parameter, a shape mismatch, a non-finite result: a 4xx) while others
  applied theirs, the answer is a 409 ``step-partly-applied`` with the same fields and the
  shard's problem: a retry cannot fix it, and the shards that applied keep it. (The model's owner
  checks the gradients' names, shapes and dtypes against every shard's parameters first, so an
  unknown parameter or a gradient of another shape is refused with nothing applied anywhere;
  what remains is a non-finite result, or a parameter changed by a concurrent request.)
- *Readers are told.* ``GET /v1/models/{m}`` gathers every shard's parameters and adds
  ``shard_steps`` (each shard's parameter count and highest/lowest step) and ``consistent``
  (every shard that has parameters is at the same highest step: false while a step has reached
  some shards and not the others). ``GET .../params`` gives each parameter its own ``step``.

Only async mode is sharded (``sync`` and ``bounded`` need every shard to agree on a step: 422
when creating or patching); a step's ``expected_steps`` and ``base_step`` are refused (422), as
a shard could refuse them while another applied its part. A checkpoint of a sharded model
gathers every shard's parameters, each as its shard has it when read (taken while steps run, the
shards may be at different steps: each parameter's step is saved); restoring one restores every
shard (the shards first, the model last; the shard count cannot change: 409). The training
series (``/metrics``) records the pushes' metrics with shard 0's part.

**Configuration changes** keep no half-made model visible: a model is created shards first
(their old state, if a failed create or delete left any, dropped) and the model itself last, so
``GET`` finds it only once every shard exists; a config replaced or patched goes to the shards
first and the model last (a failure in between leaves some shards with the new config; the same
request, retried, completes it); a delete removes the model first (it is gone at once) and then
its shards (a shard that could not be deleted is dropped by the next create of the model).
Parameters are set and deleted on their shards (a ``PUT`` of several parameters is all or
none per shard; retried, it completes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import httpx
import orjson
import xxhash
from momentum_client._transport import BODY, PARTS, AsyncZeroCopyTransport, Body
from starlette.datastructures import Headers, QueryParams
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..auth import ApiKey
from ..config import ModelConfig
from ..engine import (
    Idempotency,
    ModelOwner,
    ParameterServer,
    ParamMeta,
    ParamRecord,
    ParamState,
    RawTensors,
    Remote,
    StepResult,
)
from ..engine.checkpoints import Checkpoint, Saved
from ..engine.modes import Push
from ..engine.shards import base_of, is_shard, shard_name, shard_of, split
from ..errors import (
    IdempotencyInFlight,
    ModelExists,
    ModelNotFound,
    NotOwner,
    OwnerUnreachable,
    ParamNotFound,
    RuleChange,
    StoreUnavailable,
    TensorMismatch,
)
from ..store.base import Array
from . import codecs
from .codecs import checkpoint as checkpoint_codec
from .codecs import safetensors as st
from .forward import FORWARDED, hops
from .problems import Problem, json_response, render
from .responses import PartsResponse

log = logging.getLogger("momentum_service")

__all__ = ["SHARD_PATH", "count", "serve", "step_response"]

SHARD_PATH = re.compile(r"^/v1/models/(?P<shard>[A-Za-z0-9][A-Za-z0-9._-]{0,127}~[1-9][0-9]?)(?P<rest>/.*)?$")
FINGERPRINT = "momentum-shard-fingerprint"
"""A shard step's header: the fingerprint its Idempotency-Key is kept under (derived from the whole request's)."""
_TIMEOUTS = {"connect": 2.0, "write": 60.0, "pool": 2.0}
_T = TypeVar("_T")


# -- which models are sharded ---------------------------------------------------------------------


async def count(server: ParameterServer, model: str) -> int:
    """The shards of ``model`` as this replica serves it (1: not sharded, not here, or no such model)."""
    if "~" in model:
        return 1
    owner = server.owners.get(model)
    if owner is None:
        routed = await server.route(model)
        if isinstance(routed, Remote):
            return 1
        owner = routed
    state = owner.state
    return 1 if state is None else state.config.shards


def shard_fingerprint(fingerprint: str, shard: str) -> str:
    """What shard ``shard``'s part of a request is remembered under with its Idempotency-Key."""
    return xxhash.xxh3_128_hexdigest(f"{fingerprint}\n{shard}".encode())


# -- calling a shard's owner ----------------------------------------------------------------------

_transports: weakref.WeakKeyDictionary[ParameterServer, AsyncZeroCopyTransport] = weakref.WeakKeyDictionary()


def _transport(server: ParameterServer) -> AsyncZeroCopyTransport:
    found = _transports.get(server)
    if found is None:
        found = _transports[server] = AsyncZeroCopyTransport(retries=1)
    return found


class ShardUnavailable(Exception):
    """A shard's owner did not answer, or answered 503 (its part may or may not be applied: retry)."""

    def __init__(self, shard: str, detail: str) -> None:
        super().__init__(detail)
        self.shard = shard


class ShardRefused(Exception):
    """A shard's owner answered a 4xx: its problem document, as it is."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", status)))
        self.status, self.problem = status, problem


async def _call(
    server: ParameterServer,
    remote: Remote,
    shard: str,
    method: str,
    rest: str = "",
    *,
    authorization: str | None,
    parts: tuple[bytes | memoryview, ...] = (),
    headers: Mapping[str, str] | None = None,
) -> tuple[bytes | memoryview, httpx.Headers]:
    """``method /v1/models/<shard><rest>`` on the replica that owns the shard: its 2xx body and headers."""
    raw = [(FORWARDED, b"1")]
    if authorization:
        raw.append((b"authorization", authorization.encode("latin-1")))
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    timeouts = {**_TIMEOUTS, "read": max(10.0, 4 * server.cluster.lease_ms / 1000)}
    url = f"{remote.url.rstrip('/')}/v1/models/{shard}{rest}"
    request = httpx.Request(method, url, headers=raw, extensions={PARTS: parts, "timeout": timeouts})
    try:
        response = await _transport(server).handle_async_request(request)
        stream = response.extensions.get(BODY)
        content = stream.take().data if isinstance(stream, Body) else await response.aread()
    except httpx.TransportError as exc:
        server.forget_remote(shard)
        raise ShardUnavailable(
            shard, f"the server that owns shard {shard!r} ({remote.url}) did not answer ({type(exc).__name__})"
        ) from None
    if response.status_code < 300:
        return content, response.headers
    try:
        problem = orjson.loads(content)
        assert isinstance(problem, dict)
    except Exception:
        problem = {"detail": bytes(content[:300]).decode("utf-8", "replace")}
    if response.status_code >= 500:
        server.forget_remote(shard)
        raise ShardUnavailable(shard, f"shard {shard!r}: {problem.get('detail', response.status_code)}")
    raise ShardRefused(response.status_code, problem)


async def _on(
    server: ParameterServer,
    shard: str,
    local: Callable[[ModelOwner], Awaitable[_T]],
    remote: Callable[[Remote], Awaitable[_T]],
) -> _T:
    """``local`` with the shard's owner when it is this replica, else ``remote`` with the replica that owns it."""
    routed = await server.route(shard)
    if isinstance(routed, Remote):
        return await remote(routed)
    return await local(routed)


def _raised(exc: BaseException) -> BaseException:
    """A shard's failure as the client should hear it (a 503 stays retryable, a 4xx is passed on)."""
    if isinstance(exc, ShardUnavailable):
        return OwnerUnreachable(f"{exc}; nothing else was changed that a retry does not complete: retry")
    if isinstance(exc, ShardRefused):
        p = exc.problem
        extra = {k: v for k, v in p.items() if k not in ("type", "title", "status", "detail", "instance")}
        slug = str(p.get("type", "")).rsplit(":", 1)[-1] or "shard-refused"
        return Problem(exc.status, slug, str(p.get("detail", "")), **extra)
    return exc


async def _all(calls: list[Awaitable[_T]]) -> list[_T]:
    """Every call's result; the first failure (after all have ended) raised as the client should hear it."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise _raised(r)
    return results  # type: ignore[return-value]


# -- steps ----------------------------------------------------------------------------------------


def _decode_step(content: bytes | memoryview) -> dict[str, StepResult]:
    tensors, metadata = st.read(content, codecs.Limits(max_params=1 << 30, max_tensor_elements=1 << 40))
    params = orjson.loads(metadata.get("params", "{}"))
    return {
        name: StepResult(
            tensors.get(name), int(f["step"]), float(f["lr"]), False, f.get("current_step"), f.get("staleness")
        )
        for name, f in params.items()
    }


async def step_response(
    server: ParameterServer, model: str, n: int, body: codecs.StepBody, key: Idempotency | None, headers: Headers
) -> Response:
    """A step on a sharded model (see the module's docstring for what it guarantees)."""
    options = body.options
    for name, given in (("expected_steps", options.expected_steps), ("base_step", options.base_step)):
        if given is not None:
            raise Problem(
                422,
                "invalid-request",
                f"{name} is not supported on sharded models (model {model!r} has {n} shards): a shard could refuse "
                "it while another applied its part",
                errors=[{"loc": ["body", name], "msg": "not supported on sharded models"}],
            )
    authorization = headers.get("authorization")
    await _checked(server, model, n, body.grads, authorization)
    parts = split(body.grads, n)
    replayed: dict[int, bool] = {}

    async def one(i: int, names: list[str]) -> dict[str, StepResult]:
        shard = shard_name(model, i)
        grads = {name: body.grads[name] for name in names}
        idem = None if key is None else Idempotency(key.key, shard_fingerprint(key.fingerprint, shard), key.fresh)

        async def local(owner: ModelOwner) -> dict[str, StepResult]:
            push = Push(None, options.worker_id, None)
            results = await owner.step(grads, None, push, idem, options.metrics if i == 0 else None)
            assert isinstance(results, dict)  # async mode: applied at once
            return results

        async def remote(to: Remote) -> dict[str, StepResult]:
            meta: dict[str, Any] = {"return_params": options.return_params}
            if options.worker_id is not None:
                meta["worker_id"] = options.worker_id
            extra = {"content-type": st.MEDIA_TYPE, "accept": st.MEDIA_TYPE}
            if idem is not None:
                extra.update({"idempotency-key": idem.key, FINGERPRINT: idem.fingerprint})
                if idem.fresh:
                    extra["momentum-fresh-key"] = "1"
            encoded = st.encode(grads, meta)
            content, got = await _call(
                server, to, shard, "POST", "/step", authorization=authorization, parts=encoded.parts, headers=extra
            )
            results = _decode_step(content)
            if got.get("idempotent-replayed") == "true":
                results = {k: dataclasses.replace(r, replayed=True) for k, r in results.items()}
            return results

        results = await _on(server, shard, local, remote)
        replayed[i] = all(r.replayed for r in results.values())
        return results

    order = list(parts)
    outcomes = await asyncio.gather(*(one(i, parts[i]) for i in order), return_exceptions=True)
    done = {i: o for i, o in zip(order, outcomes, strict=True) if not isinstance(o, BaseException)}
    failed = {i: o for i, o in zip(order, outcomes, strict=True) if isinstance(o, BaseException)}
    if failed:
        raise _incomplete(model, key, done, failed)
    merged = {name: done[shard_of(name, n)][name] for name in body.grads}
    out = codecs.for_response(headers.get("accept")).encode_step(merged, options.return_params)
    extra = {"Momentum-Shards": ",".join(map(str, sorted(order)))}
    again = sorted(i for i, r in replayed.items() if r)
    if again:
        extra["Momentum-Shards-Replayed"] = ",".join(map(str, again))
    if len(again) == len(order):
        extra["Idempotent-Replayed"] = "true"
    return PartsResponse(out, headers=extra)


# What the model's owner knows of its shards' parameters (name -> shape, dtype), to refuse a step that names
# an unknown parameter or has a gradient of another shape before any shard applies its part. Loaded from
# the shards on first use; dropped around every change of the parameters made through the model (all are).
_layouts: weakref.WeakKeyDictionary[ModelOwner, tuple[str, dict[str, tuple[tuple[int, ...], str]]]] = (
    weakref.WeakKeyDictionary()
)


async def _checked(server: ParameterServer, model: str, n: int, grads: Mapping[str, Array], auth: str | None) -> None:
    """ParamNotFound or TensorMismatch (nothing applied anywhere) for gradients the shards would refuse."""
    owner = await server.owner(model)
    state = owner.state
    if state is None:
        raise ModelNotFound(model)
    found = _layouts.get(owner)
    if found is None or found[0] != state.inc:
        per_shard = await metas(server, model, n, auth)
        found = (state.inc, {p.name: (p.shape, p.dtype) for ps in per_shard for p in ps})
        _layouts[owner] = found
    layout = found[1]
    missing = [name for name in grads if name not in layout]
    if missing:
        raise ParamNotFound(model, missing)
    mismatches = {}
    for name, grad in grads.items():
        shape, dtype = layout[name]
        if grad.shape != tuple(shape) or grad.dtype.name != dtype:
            mismatches[name] = {
                "expected": {"shape": list(shape), "dtype": dtype},
                "got": {"shape": list(grad.shape), "dtype": grad.dtype.name},
            }
    if mismatches:
        raise TensorMismatch(model, mismatches)


@contextlib.asynccontextmanager
async def _changing(server: ParameterServer, model: str) -> AsyncIterator[None]:
    """Around a change of the model's parameters: what the owner knew of them is dropped before and after."""
    owner = server.owners.get(model)
    if owner is not None:
        _layouts.pop(owner, None)
    try:
        yield
    finally:
        owner = server.owners.get(model)
        if owner is not None:
            _layouts.pop(owner, None)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ShardUnavailable | StoreUnavailable | NotOwner | IdempotencyInFlight) or (
        isinstance(exc, ShardRefused) and exc.status == 409 and "idempotency-in-flight" in str(exc.problem.get("type"))
    )


def _incomplete(
    model: str, key: Idempotency | None, done: dict[int, dict[str, StepResult]], failed: dict[int, BaseException]
) -> BaseException:
    """The error for a step some shards did not apply (see the module's docstring)."""
    if not done:  # nothing applied anywhere: the first shard's own error (a refusal before unavailability)
        refusals = [e for e in failed.values() if not _retryable(e)]
        return _raised(refusals[0] if refusals else next(iter(failed.values())))
    applied = {str(i): {n: r.step for n, r in res.items()} for i, res in sorted(done.items())}
    missing = sorted(failed)
    reasons = "; ".join(f"shard {i}: {_raised(failed[i])}" for i in missing)
    shards = f"shard(s) {', '.join(map(str, sorted(done)))}"
    if all(_retryable(e) for e in failed.values()):
        if key is not None:
            advice = (
                "retry with the same Idempotency-Key: the shards that applied it answer their first result again "
                "and the others apply it (nothing is applied twice)"
            )
        else:
            advice = (
                "the request had no Idempotency-Key, so a retry would apply it again on the shards that did: send "
                "the gradients of the missing shards' parameters only (or always send an Idempotency-Key)"
            )
        return Problem(
            503,
            "step-incomplete",
            f"the step on model {model!r} was applied by {shards} but not confirmed by shard(s) "
            f"{', '.join(map(str, missing))} ({reasons}); {advice}",
            headers={"Retry-After": "1"},
            applied=applied,
            incomplete=missing,
        )
    return Problem(
        409,
        "step-partly-applied",
        f"the step on model {model!r} was applied by {shards} and refused by shard(s) "
        f"{', '.join(map(str, missing))} ({reasons}); the shards that applied it keep it (a retry with the same "
        "Idempotency-Key does not apply it twice)",
        applied=applied,
        incomplete=missing,
    )


# -- the model: create, replace, patch, delete, read ------------------------------------------------


def _shard_config(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, shards=1)


async def _set_config(
    server: ParameterServer, model: str, n: int, config: ModelConfig, fresh: bool, authorization: str | None
) -> None:
    """Every shard but 0 gets ``config`` (``fresh``: created anew, whatever an earlier attempt left)."""
    sub = _shard_config(config)

    async def one(shard: str) -> None:
        async def local(owner: ModelOwner) -> None:
            if fresh and owner.state is not None:
                await owner.delete_model()
            await owner.put_model(sub, only_create=False)

        async def remote(to: Remote) -> None:
            body = orjson.dumps({"config": sub.to_dict(), "fresh": fresh})
            await _call(server, to, shard, "PUT", authorization=authorization, parts=(body,))

        await _on(server, shard, local, remote)

    await _all([one(shard_name(model, i)) for i in range(1, n)])


async def put_model(
    server: ParameterServer, model: str, config: ModelConfig, only_create: bool, authorization: str | None
) -> tuple[Any, bool]:
    """Create a sharded model (shards first, the model last), or replace its config (the same shard count)."""
    owner = await server.owner(model)
    current = None if owner.state is None else owner.state.config
    if current is not None:
        if only_create:
            raise ModelExists(model, current.to_dict())
        if current.shards != config.shards:
            raise Problem(
                409,
                "shards-change",
                f"model {model!r} has {current.shards} parameter shard(s); a model's shards are fixed when it is "
                f"created (delete it and create it again with shards {config.shards})",
                current=current.shards,
                requested=config.shards,
            )
        if current.rule.name != config.rule.name:
            raise RuleChange(model, current.rule.name, config.rule.name)
    async with _changing(server, model):
        await _set_config(server, model, config.shards, config, current is None, authorization)
        record, created = await owner.put_model(config, only_create=only_create)
    return record, created


async def patch_model(
    server: ParameterServer, model: str, n: int, args: tuple[Any, ...], authorization: str | None
) -> Any:
    """Change the config of every shard (the shards first, the model last)."""
    owner = await server.owner(model)
    if owner.state is None:
        raise ModelNotFound(model)
    current = owner.state.config
    if "rule" in args[0] and args[0]["rule"] != current.rule.name:
        raise RuleChange(model, current.rule.name, str(args[0]["rule"]))
    await _set_config(server, model, n, current.patched(*args), False, authorization)
    return await owner.patch_model(*args)


async def delete_model(server: ParameterServer, model: str, n: int, authorization: str | None) -> None:
    """The model first (it is gone at once), then its shards (best effort: a next create drops what is left)."""
    async with _changing(server, model):
        await (await server.owner(model)).delete_model()

    async def one(shard: str) -> None:
        async def local(owner: ModelOwner) -> None:
            with contextlib.suppress(ModelNotFound):
                await owner.delete_model()

        async def remote(to: Remote) -> None:
            with contextlib.suppress(ShardRefused):  # 404: gone already
                await _call(server, to, shard, "DELETE", authorization=authorization)

        await _on(server, shard, local, remote)

    try:
        await _all([one(shard_name(model, i)) for i in range(1, n)])
    except Exception as exc:
        log.warning("model %r deleted, but not all of its shards (%s); the next create drops them", model, exc)


async def metas(server: ParameterServer, model: str, n: int, authorization: str | None) -> list[list[ParamMeta]]:
    """Every shard's parameters (shard 0, the model, must exist)."""

    async def one(i: int) -> list[ParamMeta]:
        shard = shard_name(model, i)

        async def local(owner: ModelOwner) -> list[ParamMeta]:
            try:
                return (await owner.get_model())[1]
            except ModelNotFound:
                if i == 0:
                    raise
                return []

        async def remote(to: Remote) -> list[ParamMeta]:
            content, _ = await _call(server, to, shard, "GET", authorization=authorization)
            return [ParamMeta(p[0], tuple(p[1]), p[2], p[3]) for p in orjson.loads(content)["params"]]

        return await _on(server, shard, local, remote)

    return await _all([one(i) for i in range(n)])


def model_json(base: dict[str, Any], per_shard: list[list[ParamMeta]]) -> dict[str, Any]:
    """``GET /v1/models/{m}``'s body for a sharded model: ``base`` (name and config) with every shard's
    parameters, ``shard_steps`` and ``consistent``."""
    every = sorted((p for ps in per_shard for p in ps), key=lambda p: p.name)
    shard_steps = [
        {
            "shard": i,
            "params": len(ps),
            "steps": max((p.step for p in ps), default=0),
            "min_steps": min((p.step for p in ps), default=0),
        }
        for i, ps in enumerate(per_shard)
    ]
    highest = {s["steps"] for s in shard_steps if s["params"]}
    return {
        **base,
        "params": {p.name: {"shape": list(p.shape), "dtype": p.dtype, "step": p.step} for p in every},
        "shard_steps": shard_steps,
        "consistent": len(highest) <= 1,
    }


# -- parameters -----------------------------------------------------------------------------------


async def put_params(
    server: ParameterServer,
    model: str,
    n: int,
    values: Mapping[str, Array],
    only_create: bool,
    authorization: str | None,
) -> dict[str, bool]:
    """Set parameters on their shards (all or none per shard)."""
    await server.owner(model)  # the model must exist here: 404 otherwise, before any shard is written

    async def one(i: int, names: list[str]) -> dict[str, bool]:
        shard = shard_name(model, i)
        part = {name: values[name] for name in names}

        async def local(owner: ModelOwner) -> dict[str, bool]:
            return await owner.put_params(RawTensors.pack(part), only_create=only_create)

        async def remote(to: Remote) -> dict[str, bool]:
            encoded = st.encode(part, {"only_create": only_create})
            headers = {"content-type": st.MEDIA_TYPE}
            content, _ = await _call(
                server, to, shard, "PUT", "/params", authorization=authorization, parts=encoded.parts, headers=headers
            )
            created: dict[str, bool] = orjson.loads(content)["created"]
            return created

        return await _on(server, shard, local, remote)

    created: dict[str, bool] = {}
    async with _changing(server, model):
        for part in await _all([one(i, names) for i, names in split(values, n).items()]):
            created.update(part)
    return {name: created[name] for name in values}


async def _local_params(
    owner: ModelOwner, names: list[str] | None, with_state: bool
) -> tuple[dict[str, ParamRecord], list[str]]:
    try:
        return await owner.get_params(names, with_state=with_state), []
    except ParamNotFound as exc:
        missing = exc.names
        rest = [n for n in names or [] if n not in set(missing)]
        return (await owner.get_params(rest, with_state=with_state) if rest else {}), missing
    except ModelNotFound:
        return {}, list(names or [])


async def get_params(
    server: ParameterServer,
    model: str,
    n: int,
    names: list[str] | None,
    with_state: bool,
    authorization: str | None,
) -> dict[str, ParamRecord]:
    """Parameters from their shards (all of them when ``names`` is None), each with its own step."""
    await server.owner(model)
    wanted = {i: None for i in range(n)} if names is None else split(names, n)

    async def one(i: int, part: list[str] | None) -> tuple[dict[str, ParamRecord], list[str]]:
        shard = shard_name(model, i)

        async def local(owner: ModelOwner) -> tuple[dict[str, ParamRecord], list[str]]:
            return await _local_params(owner, part, with_state)

        async def remote(to: Remote) -> tuple[dict[str, ParamRecord], list[str]]:
            query = [] if part is None else [f"names={quote(','.join(part))}"]
            query += ["state=1"] if with_state else []
            rest = "/params" + ("?" + "&".join(query) if query else "")
            content, _ = await _call(server, to, shard, "GET", rest, authorization=authorization)
            limits = codecs.Limits(max_params=1 << 30, max_tensor_elements=1 << 40)
            tensors, metadata = st.read(content, limits, allowed=st.STATE_DTYPES)
            steps: dict[str, int] = orjson.loads(metadata.get("steps", "{}"))
            out = {}
            for name, step in steps.items():
                prefix = name + "@"
                state = {k[len(prefix) :]: a for k, a in tensors.items() if k.startswith(prefix)}
                out[name] = ParamRecord(name, tensors[name], state, step)
            return out, list(orjson.loads(metadata.get("missing", "[]")))

        return await _on(server, shard, local, remote)

    found: dict[str, ParamRecord] = {}
    missing: list[str] = []
    for got, lost in await _all([one(i, part) for i, part in wanted.items()]):
        found.update(got)
        missing += lost
    if missing:
        raise ParamNotFound(model, missing)
    return {name: found[name] for name in (sorted(found) if names is None else names)}


async def delete_param(server: ParameterServer, model: str, n: int, name: str, authorization: str | None) -> None:
    await server.owner(model)
    shard = shard_name(model, shard_of(name, n))

    async def local(owner: ModelOwner) -> None:
        await owner.delete_param(name)

    async def remote(to: Remote) -> None:
        await _call(server, to, shard, "DELETE", f"/params/{quote(name)}", authorization=authorization)

    try:
        async with _changing(server, model):
            await _on(server, shard, local, remote)
    except (ShardRefused, ShardUnavailable) as exc:
        raise _raised(exc) from None


# -- the internal shard routes (/v1/models/<m>~<i>/...), asked by the model's owner ---------------------


def _level(method: str, rest: str) -> str:
    if method == "GET":
        return "read"
    if (method, rest) in (("POST", "/step"), ("PUT", "/params")):
        return "write"
    return "admin"


async def serve(scope: Scope, receive: Receive, send: Send, body: memoryview, key: ApiKey | None) -> None:
    """A request for a shard, from the owner of its model (problem+json for every error)."""
    path: str = scope["path"]
    method: str = scope["method"]
    try:
        match = SHARD_PATH.match(path)
        assert match is not None
        shard, rest = match.group("shard"), match.group("rest") or ""
        if hops(scope) == 0 or not is_shard(shard):
            raise Problem(
                404, "not-found", f"{shard!r} is a shard of model {base_of(shard)!r}: ask the model, not its shards"
            )
        level = _level(method, rest)
        if key is not None and not key.allows(level, base_of(shard)):
            raise Problem(
                403,
                "forbidden",
                f"this API key may not {level} model {base_of(shard)!r}",
                required=f"{level}:{base_of(shard)}",
            )
        state = scope["app"].state
        response = await _serve(state.server, state.limits, method, shard, rest, Headers(scope=scope), body, scope)
    except Exception as exc:
        response = render(exc, method, path)
    await response(scope, receive, send)


async def _serve(
    server: ParameterServer,
    limits: codecs.Limits,
    method: str,
    shard: str,
    rest: str,
    headers: Headers,
    body: memoryview,
    scope: Scope,
) -> Response:
    query = QueryParams(scope.get("query_string", b""))
    if (method, rest) == ("POST", "/step"):
        received = st.SafetensorsCodec().decode_step(body, limits)
        key = headers.get("idempotency-key")
        fingerprint = headers.get(FINGERPRINT)
        fresh = headers.get("momentum-fresh-key", "") in ("1", "true")
        idem = None if key is None or fingerprint is None else Idempotency(key, fingerprint, fresh)
        options = received.options
        results = await server.step(
            shard, received.grads, received=received.received, idempotency=idem, worker_id=options.worker_id
        )
        assert isinstance(results, dict)
        replayed = any(r.replayed for r in results.values())
        encoded = st.SafetensorsCodec().encode_step(results, options.return_params)
        return PartsResponse(encoded, headers={"Idempotent-Replayed": "true"} if replayed else None)
    owner = await server.owner(shard)
    if (method, rest) == ("GET", ""):
        _, params = await owner.get_model()
        return json_response({"params": [[p.name, list(p.shape), p.dtype, p.step] for p in params]})
    if (method, rest) == ("PUT", ""):
        request = orjson.loads(body)
        if request["fresh"] and owner.state is not None:
            await owner.delete_model()
        await owner.put_model(ModelConfig.from_dict(request["config"]), only_create=False)
        return json_response({"ok": True})
    if (method, rest) == ("DELETE", ""):
        await owner.delete_model()
        return Response(status_code=204)
    if (method, rest) == ("PUT", "/params"):
        values, metadata = st.read(body, limits, allowed=st.STATE_DTYPES)
        only_create = orjson.loads(metadata.get("only_create", "false"))
        created = await owner.put_params(RawTensors.pack(values), only_create=bool(only_create))
        return json_response({"created": created})
    if (method, rest) == ("GET", "/params"):
        names_text = query.get("names")
        names = None if names_text is None else [n for n in names_text.split(",") if n]
        found, missing = await _local_params(owner, names, query.get("state") == "1")
        tensors: dict[str, Array] = {}
        for name, rec in found.items():
            tensors[name] = rec.value
            for buffer, a in rec.state.items():
                tensors[f"{name}@{buffer}"] = a
        encoded = st.encode(tensors, {"steps": {n: r.step for n, r in found.items()}, "missing": missing})
        return PartsResponse(encoded)
    if (method, rest) == ("PUT", "/checkpoint"):
        restored = checkpoint_codec.decode(body, limits)
        if headers.get("momentum-shard-fresh") == "1" and owner.state is not None:
            await owner.delete_model()
        await owner.restore(restored, only_create=False)
        return json_response({"ok": True})
    if method == "DELETE" and rest.startswith("/params/"):
        await owner.delete_param(unquote(rest[len("/params/") :]))
        return Response(status_code=204)
    raise Problem(404, "not-found", f"no shard route {method} {rest or '/'}")


# -- checkpoints ----------------------------------------------------------------------------------


async def checkpoint(server: ParameterServer, model: str, n: int, authorization: str | None) -> Saved:
    """The model's config and every shard's parameters (values, state buffers, steps), each as its shard
    has it when read: taken while steps run, the shards may be at different steps (each parameter's is saved)."""
    owner = await server.owner(model)
    if owner.state is None:
        raise ModelNotFound(model)
    config = owner.state.config
    records = await get_params(server, model, n, None, True, authorization)
    return Saved(config, {name: ParamState(r.value, dict(r.state), r.step) for name, r in records.items()})


async def restore(
    server: ParameterServer, model: str, saved: Checkpoint, only_create: bool, authorization: str | None
) -> tuple[Any, bool]:
    """Create or replace a sharded model from a checkpoint: each shard restored with its parameters (the
    shards first, the model last, as a create); the shard count cannot change (409)."""
    owner = await server.owner(model)
    current = None if owner.state is None else owner.state.config
    n = saved.config.shards
    if current is not None:
        if only_create:
            raise ModelExists(model, current.to_dict())
        if current.shards != n:
            raise Problem(
                409,
                "shards-change",
                f"model {model!r} has {current.shards} parameter shard(s) and the checkpoint {n}; a model's shards "
                "are fixed when it is created (delete it first to restore this checkpoint)",
                current=current.shards,
                requested=n,
            )
        if current.rule.name != saved.config.rule.name:
            raise RuleChange(model, current.rule.name, saved.config.rule.name)
    arrays = saved.tensors.arrays()
    parts = split(saved.params, n)
    sub_config = _shard_config(saved.config)
    fresh = current is None

    def part(i: int, config: ModelConfig) -> Checkpoint:
        names = set(parts.get(i, []))
        tensors = {k: a for k, a in arrays.items() if k.split("@", 1)[0] in names}
        return Checkpoint(config, RawTensors.pack(tensors), {k: v for k, v in saved.params.items() if k in names})

    async def one(i: int) -> None:
        shard = shard_name(model, i)
        sub = part(i, sub_config)

        async def local(shard_owner: ModelOwner) -> None:
            if fresh and shard_owner.state is not None:
                await shard_owner.delete_model()
            await shard_owner.restore(sub, only_create=False)

        async def remote(to: Remote) -> None:
            states = {
                name: ParamState(arrays[name], {b: arrays[f"{name}@{b}"] for b in buffers}, step)
                for name, (step, buffers) in sub.params.items()
            }
            encoded = checkpoint_codec.encode_checkpoint(shard, Saved(sub_config, states))
            extra = {"content-type": st.MEDIA_TYPE, "momentum-shard-fresh": "1" if fresh else "0"}
            auth = authorization
            await _call(server, to, shard, "PUT", "/checkpoint", authorization=auth, parts=encoded.parts, headers=extra)

        await _on(server, shard, local, remote)

    async with _changing(server, model):
        await _all([one(i) for i in range(1, n)])
        record, created = await owner.restore(part(0, saved.config), only_create=only_create)
    return record, created
