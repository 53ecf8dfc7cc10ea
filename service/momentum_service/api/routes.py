"""HTTP API v1 routes. Handlers translate between HTTP and :class:`ParameterServer` calls."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from .. import config as config_module
from ..config import ModelConfig
from ..engine import ModelRecord, ParameterServer, ParamMeta, ParamRecord
from ..errors import listed
from ..store.base import Array
from . import codecs, schemas, shards
from .admission import body_of
from .body import off_the_loop, parse_json
from .codecs.checks import check_count
from .codecs.safetensors import MEDIA_TYPE as SAFETENSORS
from .deps import LimitsDep, ModelName, ParamPath, ServerDep
from .problems import Problem, json_response
from .responses import PartsResponse
from .schemas import problem_responses
from .security import ADMIN, READ, WRITE
from .step import step_response

# Every v1 route may answer 401/403 (API keys) and 503 (store unavailable, or the concurrency cap).
# It may answer 422 too (a path parameter that does not match its pattern).
log = logging.getLogger("momentum_service")
router = APIRouter(prefix="/v1", responses=problem_responses(401, 403, 422, 503))

_PARAM_NAME = re.compile(schemas.PARAM_NAME_PATTERN)
_BODY_ERRORS = (413, 415, 422)


def _body_doc(model: type[BaseModel], binary: str | None = None) -> dict[str, Any]:
    """Document a request body that the handler parses itself (see ``body.parse_json``).

    ``binary`` describes the safetensors form, for the endpoints that carry tensors.
    """
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary is not None:
        content[SAFETENSORS] = {"schema": {"type": "string", "format": "binary", "description": binary}}
    return {"requestBody": {"required": True, "content": content}}


def _binary_response(description: str) -> dict[str, Any]:
    """The safetensors alternative of a 200 response (asked for with ``Accept``)."""
    return {SAFETENSORS: {"schema": {"type": "string", "format": "binary", "description": description}}}


_STEP_BINARY = (
    "safetensors: one tensor per gradient, named after its parameter (F32, F64, F16 or BF16; F16/BF16 are "
    'widened exactly to float32). `__metadata__` may hold, as JSON text: `return_params` (`"false"`), '
    '`expected_steps` (`{"w": 3}`), `worker_id`, `base_step`.'
)
_STEP_BINARY_OUT = (
    "With `Accept: application/x-safetensors`: the new values as tensors (none with return_params false), and "
    '`__metadata__.params`, JSON text `{name: {"step", "lr", "current_step"?, "staleness"?}}`.'
)
_PARAMS_BINARY = "safetensors: one tensor per parameter, named after it (F32 or F64)."
_PARAMS_BINARY_OUT = (
    "With `Accept: application/x-safetensors`: one tensor per parameter, plus `<name>@<buffer>` for each state "
    "buffer with `?include=state` (`<name>@velocity` alone with `?include=velocity`; none before the first "
    'update), and `__metadata__.params`: JSON text `{name: {"step"}}`.'
)


BODY_MODELS: list[type[BaseModel]] = [
    schemas.ModelPut,
    schemas.ModelPatch,
    schemas.Tensor,
    schemas.ParamsPut,
    schemas.StepRequest,
]


_json = json_response


def _model_json(record: ModelRecord, params: list[ParamMeta]) -> dict[str, Any]:
    return {
        "name": record.name,
        **ModelConfig.from_dict(record.config).to_dict(),
        "params": {p.name: {"shape": list(p.shape), "dtype": p.dtype, "step": p.step} for p in params},
    }


async def _answer(server: ParameterServer, model: str, record: ModelRecord, request: Request) -> dict[str, Any]:
    """The model's body: its config and parameters (gathered from every shard of a sharded model)."""
    n = await shards.count(server, model)
    if n > 1:
        auth = request.headers.get("authorization")
        return shards.model_json(_model_json(record, []), await shards.metas(server, model, n, auth))
    return _model_json(record, await server.list_params(model))


def _durability(value: Any) -> Any:
    """The durability field as the domain takes it: ``"step"`` or ``{"flush_ms": n}`` (None: not given)."""
    return value.model_dump() if isinstance(value, BaseModel) else value


def _only_create(if_none_match: str | None) -> bool:
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    raise Problem(
        422,
        "unsupported-precondition",
        "only 'If-None-Match: *' (create, never overwrite) is supported",
        errors=[{"loc": ["header", "If-None-Match"], "msg": "must be *"}],
    )


async def _put_params(
    server: ParameterServer, model: str, values: Mapping[str, Array], only_create: bool, request: Request
) -> dict[str, bool]:
    n = await shards.count(server, model)
    if n > 1:
        return await shards.put_params(server, model, n, values, only_create, request.headers.get("authorization"))
    return await server.put_params(model, values, only_create=only_create)


async def _get_params(
    server: ParameterServer, model: str, names: list[str] | None, with_state: bool, request: Request
) -> dict[str, ParamRecord]:
    n = await shards.count(server, model)
    if n > 1:
        return await shards.get_params(server, model, n, names, with_state, request.headers.get("authorization"))
    return await server.get_params(model, names, with_state=with_state)


_INCLUDE = ("state", "velocity")


def _include(include: str | None) -> frozenset[str]:
    parts = {p.strip() for p in (include or "").split(",") if p.strip()}
    unknown = parts - set(_INCLUDE)
    if unknown:
        raise Problem(
            422,
            "invalid-request",
            f"unknown include value(s): {', '.join(sorted(unknown))}; supported: {', '.join(_INCLUDE)}",
            errors=[{"loc": ["query", "include"], "msg": f"supported: {', '.join(_INCLUDE)}"}],
        )
    return frozenset(parts)


# Optional headers and query parameters are ``X | SkipJsonSchema[None]``: absent is not ``null``. A
# pattern goes on the string type itself: FastAPI leaves out of the document one given to Query().
IfNoneMatch = Annotated[
    Annotated[str, StringConstraints(pattern=r"^\*$")] | SkipJsonSchema[None],
    Header(description="`*` creates only: 412 if the parameter exists, and nothing is written."),
]
IfNoneMatchModel = Annotated[
    Annotated[str, StringConstraints(pattern=r"^\*$")] | SkipJsonSchema[None],
    Header(
        description="`*` creates only: if the model exists, 412 `model-exists` with its config in `existing`, "
        "and nothing is changed (safe for every worker to send at start-up)."
    ),
]
Include = Annotated[
    Annotated[str, StringConstraints(pattern=schemas.INCLUDE_PATTERN)] | SkipJsonSchema[None],
    Query(
        description="`state` adds each parameter's rule state, every named buffer (`velocity` for the momentum "
        "rules); `velocity` adds that one buffer as a field of its own (as before named buffers)."
    ),
]


@router.put(
    "/models/{model}",
    dependencies=[ADMIN],
    status_code=201,
    response_model=schemas.ModelOut,
    responses={
        200: {"model": schemas.ModelOut, "description": "Config replaced"},
        **problem_responses(409, 412, *_BODY_ERRORS),
    },
    openapi_extra=_body_doc(schemas.ModelPut),
    summary="Create a model or replace its config (parameters are kept; the rule cannot change: 409); "
    "with If-None-Match: * only create (412 with the existing config if it exists)",
)
async def put_model(
    model: ModelName,
    request: Request,
    server: ServerDep,
    limits: LimitsDep,
    if_none_match: IfNoneMatchModel = None,
) -> Response:
    only_create = _only_create(if_none_match)
    body = await parse_json(request, schemas.ModelPut, limits, explain=config_module.explain_put)
    config = ModelConfig.build(
        body.optimizer.model_dump(),
        body.schedule.model_dump() if body.schedule else None,
        body.model_dump(include={"mode", "workers", "max_staleness"}, exclude_none=True),
        _durability(body.durability),
        None if body.groups is None else [g.model_dump(exclude_none=True) for g in body.groups],
        body.shards,
    )
    if config.shards > 1 or await shards.count(server, model) > 1:
        auth = request.headers.get("authorization")
        record, created = await shards.put_model(server, model, config, only_create, auth)
    else:
        record, created = await server.put_model(model, config, only_create=only_create)
    log.info(
        "model %r %s: rule %s, mode %s",
        model,
        "created" if created else "config replaced",
        config.rule.name,
        config.mode.kind,
        extra={"model": model},
    )
    headers = {"Location": f"/v1/models/{model}"} if created else None
    return _json(await _answer(server, model, record, request), 201 if created else 200, headers)


@router.get("/models/{model}", dependencies=[READ], response_model=schemas.ModelOut, responses=problem_responses(404))
async def get_model(model: ModelName, request: Request, server: ServerDep) -> Response:
    record, params = await server.get_model(model)
    if await shards.count(server, model) > 1:
        return _json(await _answer(server, model, record, request))
    return _json(_model_json(record, params))


@router.patch(
    "/models/{model}",
    dependencies=[ADMIN],
    response_model=schemas.ModelOut,
    responses=problem_responses(404, 409, *_BODY_ERRORS),
    openapi_extra=_body_doc(schemas.ModelPatch),
    summary="Change some hyperparameters and/or the schedule; they apply from the next step",
)
async def patch_model(model: ModelName, request: Request, server: ServerDep, limits: LimitsDep) -> Response:
    body = await parse_json(request, schemas.ModelPatch, limits, explain=config_module.explain_patch)
    nulls = sorted(k for k in body.model_fields_set if getattr(body, k) is None)
    if nulls:
        raise Problem(
            422,
            "invalid-request",
            f"{', '.join(nulls)} cannot be null (leave a field out to keep its value)",
            errors=[{"loc": ["body", k], "msg": "null is not a value"} for k in nulls],
        )
    mode = body.model_dump(include={"mode", "workers", "max_staleness"}, exclude_unset=True)
    groups: Any = None
    if isinstance(body.groups, list):
        groups = [g.model_dump(exclude_none=True) for g in body.groups]
    elif isinstance(body.groups, dict):
        groups = {k: g.model_dump(exclude_none=True) for k, g in body.groups.items()}
        empty = sorted(k for k, g in groups.items() if not g)
        if empty:
            raise Problem(
                422,
                "invalid-request",
                f"nothing to change in group(s) {', '.join(empty)}: give params and/or hyperparameters",
                errors=[{"loc": ["body", "groups", k], "msg": "empty"} for k in empty],
            )
    if body.optimizer is None and body.schedule is None and not mode and body.durability is None and not groups:
        raise Problem(
            422,
            "invalid-request",
            "nothing to change: give optimizer (some hyperparameters), schedule, mode fields, durability and/or groups",
            errors=[
                {
                    "loc": ["body"],
                    "msg": "optimizer, schedule, mode, workers, max_staleness, durability or groups is required",
                }
            ],
        )
    changes = body.optimizer.model_dump(exclude_unset=True) if body.optimizer else {}
    nulls = sorted(k for k, v in changes.items() if v is None)
    if nulls:
        raise Problem(
            422,
            "invalid-request",
            f"hyperparameters cannot be null: {', '.join(nulls)} (leave a field out to keep its value)",
            errors=[{"loc": ["body", "optimizer", k], "msg": "null is not a value"} for k in nulls],
        )
    schedule = body.schedule.model_dump() if body.schedule else None
    args = (changes, schedule, mode, _durability(body.durability), groups)
    n = await shards.count(server, model)
    if n > 1:
        record = await shards.patch_model(server, model, n, args, request.headers.get("authorization"))
    else:
        record = await server.patch_model(model, *args)
    changed = [*(f"optimizer.{k}" for k in changes), *(["schedule"] if schedule else []), *mode]
    changed += [k for k in ("durability", "groups") if getattr(body, k) is not None]
    log.info("model %r reconfigured: %s", model, ", ".join(changed), extra={"model": model})
    return _json(await _answer(server, model, record, request))


@router.delete("/models/{model}", dependencies=[ADMIN], status_code=204, responses=problem_responses(404))
async def delete_model(model: ModelName, request: Request, server: ServerDep) -> Response:
    n = await shards.count(server, model)
    if n > 1:
        await shards.delete_model(server, model, n, request.headers.get("authorization"))
    else:
        await server.delete_model(model)
    log.info("model %r deleted", model, extra={"model": model})
    return Response(status_code=204)


@router.put(
    "/models/{model}/params/{name}",
    dependencies=[WRITE],
    status_code=201,
    response_model=schemas.ParamPutOut,
    responses={200: {"description": "Value replaced"}, **problem_responses(404, 412, *_BODY_ERRORS)},
    openapi_extra=_body_doc(schemas.Tensor, "safetensors: exactly one tensor, named after the parameter (F32 or F64)."),
    summary="Set a parameter's value; resets its velocity and step",
)
async def put_param(
    model: ModelName,
    name: ParamPath,
    request: Request,
    server: ServerDep,
    limits: LimitsDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    only_create = _only_create(if_none_match)
    codec = codecs.for_request(request.headers.get("content-type"))
    raw = body_of(request)
    value = await off_the_loop(len(raw), codec.decode_value, raw, name, limits)
    created = await _put_params(server, model, {name: value}, only_create, request)
    out = {"name": name, "shape": list(value.shape), "dtype": value.dtype.name, "step": 0}
    headers = {"Location": f"/v1/models/{model}/params/{name}"} if created[name] else None
    return _json(out, 201 if created[name] else 200, headers)


@router.put(
    "/models/{model}/params",
    dependencies=[WRITE],
    status_code=201,
    response_model=schemas.ParamsPutOut,
    responses={200: {"description": "Some values replaced"}, **problem_responses(404, 412, *_BODY_ERRORS)},
    openapi_extra=_body_doc(schemas.ParamsPut, _PARAMS_BINARY),
    summary="Set many parameters at once (all or nothing)",
)
async def put_params(
    model: ModelName, request: Request, server: ServerDep, limits: LimitsDep, if_none_match: IfNoneMatch = None
) -> Response:
    only_create = _only_create(if_none_match)
    codec = codecs.for_request(request.headers.get("content-type"))
    raw = body_of(request)
    values = await off_the_loop(len(raw), codec.decode_values, raw, limits)
    created = await _put_params(server, model, values, only_create, request)
    out = {
        name: {"shape": list(v.shape), "dtype": v.dtype.name, "step": 0, "created": created[name]}
        for name, v in values.items()
    }
    return _json({"params": out}, 201 if all(created.values()) else 200)


@router.get(
    "/models/{model}/params/{name}",
    dependencies=[READ],
    response_model=schemas.ParamOut,
    responses={200: {"content": _binary_response(_PARAMS_BINARY_OUT)}, **problem_responses(404, 422)},
)
async def get_param(
    model: ModelName, name: ParamPath, request: Request, server: ServerDep, include: Include = None
) -> Response:
    wanted = _include(include)
    params = await _get_params(server, model, [name], bool(wanted), request)
    codec = codecs.for_response(request.headers.get("accept"))
    return PartsResponse(codec.encode_param(params[name], wanted))


@router.get(
    "/models/{model}/params",
    dependencies=[READ],
    response_model=schemas.ParamsOut,
    responses={200: {"content": _binary_response(_PARAMS_BINARY_OUT)}, **problem_responses(404, 422)},
)
async def get_params(
    model: ModelName,
    request: Request,
    server: ServerDep,
    limits: LimitsDep,
    names: Annotated[
        Annotated[str, StringConstraints(pattern=schemas.NAMES_PATTERN)] | SkipJsonSchema[None],
        Query(description="Comma-separated parameter names; all when absent."),
    ] = None,
    include: Include = None,
) -> Response:
    include_set = _include(include)
    wanted = None
    if names is not None:
        wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
        check_count(len(wanted), limits, "names")
        bad = [n for n in wanted if not _PARAM_NAME.fullmatch(n)]
        if bad or not wanted:
            raise Problem(
                422,
                "invalid-request",
                f"invalid parameter name(s) in names: {listed(bad)}" if bad else "names is empty",
                errors=[{"loc": ["query", "names"], "msg": "comma-separated parameter names"}],
            )
    params = await _get_params(server, model, wanted, bool(include_set), request)
    codec = codecs.for_response(request.headers.get("accept"))
    return PartsResponse(codec.encode_params(params, include_set))


@router.delete("/models/{model}/params/{name}", dependencies=[ADMIN], status_code=204, responses=problem_responses(404))
async def delete_param(model: ModelName, name: ParamPath, request: Request, server: ServerDep) -> Response:
    n = await shards.count(server, model)
    if n > 1:
        await shards.delete_param(server, model, n, name, request.headers.get("authorization"))
    else:
        await server.delete_param(model, name)
    return Response(status_code=204)


IdempotencyKey = Annotated[
    str | SkipJsonSchema[None],
    Header(
        alias="Idempotency-Key",
        description="Makes the step exactly-once: a retry with the same key and body returns the first result "
        "(header `Idempotent-Replayed: true`) without applying it again; the same key with another body is a 422; "
        "a retry while the first attempt is in flight is a 409 (retry shortly). Keys are kept per model for "
        "`MOMENTUM_IDEMPOTENCY_TTL_S` (default 24 h). 1 to 255 visible ASCII characters; a quoted string "
        '(`"..."`, as in the IETF draft) is accepted too.',
    ),
]


@router.post(
    "/models/{model}/step",
    dependencies=[WRITE],
    response_model=schemas.StepOut,
    responses={
        200: {"content": _binary_response(_STEP_BINARY_OUT)},
        202: {"model": schemas.StepPendingOut, "description": "Sync mode: the step is not complete yet"},
        **problem_responses(404, 409, *_BODY_ERRORS, 503),
    },
    openapi_extra=_body_doc(schemas.StepRequest, _STEP_BINARY),
    summary="Apply one momentum update per named parameter (all or none) and return the new values",
)
async def step(
    model: ModelName,
    request: Request,
    server: ServerDep,
    limits: LimitsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Answered by :func:`.step.serve_step` from the admission middleware (this route documents it, and
    answers the same way through :func:`.step.step_response` if ever reached)."""
    return await step_response(model, request.url.path, request.headers, body_of(request), server, limits)


health = APIRouter()


class Status(BaseModel):
    status: Literal["ok", "unavailable"]
    store: str | None = None


@health.get("/healthz", response_model=Status, summary="The process is up")
async def healthz() -> Response:
    return _json({"status": "ok"})


@health.get("/readyz", response_model=Status, responses=problem_responses(503), summary="The store is reachable")
async def readyz(server: ServerDep) -> Response:
    await server.store.ping()
    return _json({"status": "ok", "store": server.store.kind})
