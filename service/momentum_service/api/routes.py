"""HTTP API v1 routes. Handlers translate between HTTP and :class:`ParameterServer` calls."""

from __future__ import annotations

import hashlib
import re
import zlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, StringConstraints
from pydantic.json_schema import SkipJsonSchema

from .. import config as config_module
from ..config import ModelConfig
from ..engine import Idempotency, StepPending, StepResult
from ..errors import listed
from ..store import ModelRecord, ParamMeta, ParamRecord
from . import schemas, wire
from .body import (
    TensorBody,
    arrays_of,
    check_count,
    invalid_request,
    json_response_bytes,
    metadata_fields,
    off_the_loop,
    parse_json,
    parse_tensor_body,
    tensor_json,
    to_array,
    validate,
)
from .deps import ModelName, ParamPath, ServerDep, SettingsDep
from .problems import Problem
from .schemas import problem_responses
from .security import ADMIN, READ, WRITE

# Every v1 route may answer 401/403 (API keys) and 503 (store unavailable, or the concurrency cap).
# It may answer 422 too (a path parameter that does not match its pattern).
router = APIRouter(prefix="/v1", responses=problem_responses(401, 403, 422, 503))

_PARAM_NAME = re.compile(schemas.PARAM_NAME_PATTERN)
_BODY_ERRORS = (413, 415, 422)


def _body_doc(model: type[BaseModel], binary: str | None = None) -> dict[str, Any]:
    """Document a request body that the handler parses itself (see ``body.parse_json``).

    ``binary`` describes the safetensors form, for the endpoints that carry tensors.
    """
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if binary is not None:
        content[wire.MEDIA_TYPE] = {"schema": {"type": "string", "format": "binary", "description": binary}}
    return {"requestBody": {"required": True, "content": content}}


def _binary_response(description: str) -> dict[str, Any]:
    """The safetensors alternative of a 200 response (asked for with ``Accept``)."""
    return {wire.MEDIA_TYPE: {"schema": {"type": "string", "format": "binary", "description": description}}}


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
    "With `Accept: application/x-safetensors`: one tensor per parameter, plus `<name>@velocity` with "
    '`?include=velocity` (when it exists), and `__metadata__.params`: JSON text `{name: {"step"}}`.'
)


def _safetensors(content: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content, status, headers=headers, media_type=wire.MEDIA_TYPE)


async def _values(body: TensorBody[Any], tensors: dict[str, Any] | None, settings: Any) -> dict[str, Any]:
    """Parameter values from either form of a PUT body."""
    if body.parsed is None:
        return body.tensors
    assert tensors is not None
    return await arrays_of(tensors, "params", settings, len(body.raw))


BODY_MODELS: list[type[BaseModel]] = [
    schemas.ModelPut,
    schemas.ModelPatch,
    schemas.Tensor,
    schemas.ParamsPut,
    schemas.StepRequest,
]


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_response_bytes(content), status, headers=headers, media_type="application/json")


def _model_json(record: ModelRecord, params: list[ParamMeta]) -> dict[str, Any]:
    return {
        "name": record.name,
        **ModelConfig.from_dict(record.config).to_dict(),
        "params": {p.name: {"shape": list(p.shape), "dtype": p.dtype, "step": p.step} for p in params},
    }


def _param_json(rec: ParamRecord, *, with_velocity: bool) -> dict[str, Any]:
    out = {"name": rec.name, **tensor_json(rec.value), "step": rec.step}
    if with_velocity:
        out["velocity"] = None if rec.velocity is None else tensor_json(rec.velocity)
    return out


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


def _with_velocity(include: str | None) -> bool:
    parts = {p.strip() for p in (include or "").split(",") if p.strip()}
    unknown = parts - {"velocity"}
    if unknown:
        raise Problem(
            422,
            "invalid-request",
            f"unknown include value(s): {', '.join(sorted(unknown))}; supported: velocity",
            errors=[{"loc": ["query", "include"], "msg": "supported: velocity"}],
        )
    return "velocity" in parts


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
    Query(description="`velocity` adds each parameter's momentum buffer."),
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
    settings: SettingsDep,
    if_none_match: IfNoneMatchModel = None,
) -> Response:
    only_create = _only_create(if_none_match)
    body = await parse_json(request, schemas.ModelPut, settings, explain=config_module.explain_put)
    config = ModelConfig.build(
        body.optimizer.model_dump(),
        body.schedule.model_dump() if body.schedule else None,
        body.model_dump(include={"mode", "workers", "max_staleness"}, exclude_none=True),
    )
    record, created = await server.put_model(model, config, only_create=only_create)
    params = await server.list_params(model)
    headers = {"Location": f"/v1/models/{model}"} if created else None
    return _json(_model_json(record, params), 201 if created else 200, headers)


@router.get("/models/{model}", dependencies=[READ], response_model=schemas.ModelOut, responses=problem_responses(404))
async def get_model(model: ModelName, server: ServerDep) -> Response:
    record, params = await server.get_model(model)
    return _json(_model_json(record, params))


@router.patch(
    "/models/{model}",
    dependencies=[ADMIN],
    response_model=schemas.ModelOut,
    responses=problem_responses(404, 409, *_BODY_ERRORS),
    openapi_extra=_body_doc(schemas.ModelPatch),
    summary="Change some hyperparameters and/or the schedule; they apply from the next step",
)
async def patch_model(model: ModelName, request: Request, server: ServerDep, settings: SettingsDep) -> Response:
    body = await parse_json(request, schemas.ModelPatch, settings, explain=config_module.explain_patch)
    nulls = sorted(k for k in body.model_fields_set if getattr(body, k) is None)
    if nulls:
        raise Problem(
            422,
            "invalid-request",
            f"{', '.join(nulls)} cannot be null (leave a field out to keep its value)",
            errors=[{"loc": ["body", k], "msg": "null is not a value"} for k in nulls],
        )
    mode = body.model_dump(include={"mode", "workers", "max_staleness"}, exclude_unset=True)
    if body.optimizer is None and body.schedule is None and not mode:
        raise Problem(
            422,
            "invalid-request",
            "nothing to change: give optimizer (some hyperparameters), schedule and/or mode fields",
            errors=[{"loc": ["body"], "msg": "optimizer, schedule, mode, workers or max_staleness is required"}],
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
    record = await server.patch_model(model, changes, schedule, mode)
    params = await server.list_params(model)
    return _json(_model_json(record, params))


@router.delete("/models/{model}", dependencies=[ADMIN], status_code=204, responses=problem_responses(404))
async def delete_model(model: ModelName, server: ServerDep) -> Response:
    await server.delete_model(model)
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
    settings: SettingsDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    only_create = _only_create(if_none_match)
    body = await parse_tensor_body(request, schemas.Tensor, settings)
    if body.parsed is not None:
        value = to_array(body.parsed, [], settings)
    elif list(body.tensors) == [name]:
        value = body.tensors[name]
    else:
        raise Problem(
            422,
            "invalid-request",
            f"the safetensors body must hold exactly one tensor, named {name!r}; it holds {sorted(body.tensors)}",
            errors=[{"loc": ["body"], "msg": f"one tensor named {name!r}"}],
        )
    created = await server.put_params(model, {name: value}, only_create=only_create)
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
    model: ModelName, request: Request, server: ServerDep, settings: SettingsDep, if_none_match: IfNoneMatch = None
) -> Response:
    only_create = _only_create(if_none_match)
    body = await parse_tensor_body(request, schemas.ParamsPut, settings)
    values = await _values(body, body.parsed.params if body.parsed else None, settings)
    if not values:
        raise Problem(422, "invalid-request", "no parameters given", errors=[{"loc": ["body"], "msg": "empty"}])
    created = await server.put_params(model, values, only_create=only_create)
    out = {
        name: {"shape": list(v.shape), "dtype": v.dtype.name, "step": 0, "created": created[name]}
        for name, v in values.items()
    }
    return _json({"params": out}, 201 if all(created.values()) else 200)


def _params_safetensors(params: dict[str, ParamRecord], with_velocity: bool) -> Response:
    tensors: dict[str, Any] = {}
    for name, rec in params.items():
        tensors[name] = rec.value
        if with_velocity and rec.velocity is not None:
            tensors[f"{name}@velocity"] = rec.velocity
    meta = {"params": {name: {"step": rec.step} for name, rec in params.items()}}
    return _safetensors(wire.encode(tensors, meta))


@router.get(
    "/models/{model}/params/{name}",
    dependencies=[READ],
    response_model=schemas.ParamOut,
    responses={200: {"content": _binary_response(_PARAMS_BINARY_OUT)}, **problem_responses(404, 422)},
)
async def get_param(
    model: ModelName, name: ParamPath, request: Request, server: ServerDep, include: Include = None
) -> Response:
    with_velocity = _with_velocity(include)
    params = await server.get_params(model, [name], with_velocity=with_velocity)
    if wire.wants_safetensors(request.headers.get("accept")):
        return _params_safetensors(params, with_velocity)
    return _json(_param_json(params[name], with_velocity=with_velocity))


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
    settings: SettingsDep,
    names: Annotated[
        Annotated[str, StringConstraints(pattern=schemas.NAMES_PATTERN)] | SkipJsonSchema[None],
        Query(description="Comma-separated parameter names; all when absent."),
    ] = None,
    include: Include = None,
) -> Response:
    with_velocity = _with_velocity(include)
    wanted = None
    if names is not None:
        wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
        check_count(len(wanted), settings, "names")
        bad = [n for n in wanted if not _PARAM_NAME.fullmatch(n)]
        if bad or not wanted:
            raise Problem(
                422,
                "invalid-request",
                f"invalid parameter name(s) in names: {listed(bad)}" if bad else "names is empty",
                errors=[{"loc": ["query", "names"], "msg": "comma-separated parameter names"}],
            )
    params = await server.get_params(model, wanted, with_velocity=with_velocity)
    if wire.wants_safetensors(request.headers.get("accept")):
        return _params_safetensors(params, with_velocity)
    return _json({"params": {n: _param_json(p, with_velocity=with_velocity) for n, p in params.items()}})


@router.delete("/models/{model}/params/{name}", dependencies=[ADMIN], status_code=204, responses=problem_responses(404))
async def delete_param(model: ModelName, name: ParamPath, server: ServerDep) -> Response:
    await server.delete_param(model, name)
    return Response(status_code=204)


_STEP_OPTIONS = ("return_params", "expected_steps", "worker_id", "base_step")


def _one_key(request: Request) -> None:
    """Two Idempotency-Key headers would make the step's identity ambiguous: 422, not the first one."""
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise Problem(
            422,
            "invalid-idempotency-key",
            "the request has more than one Idempotency-Key header; send exactly one",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "sent more than once"}],
        )


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

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _idempotency(key: str | None, request: Request, raw: memoryview) -> Idempotency | None:
    if key is None:
        return None
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not _KEY.match(key):
        raise Problem(
            422,
            "invalid-idempotency-key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "1 to 255 visible ASCII characters"}],
        )
    return Idempotency(key, fingerprint(request.method, request.url.path, request.headers.get("content-type", ""), raw))


def fingerprint(method: str, path: str, content_type: str, raw: bytes | memoryview) -> str:
    """What identifies a request under its Idempotency-Key: method, path, media type and body.

    Small bodies are hashed whole with SHA-256. A large body (a gradient of megabytes, where
    SHA-256 costs 0.6 ms per MB) is identified by its length, its CRC-32 (3x faster) and its
    first and last 64 KiB: a retry that sends other bytes under the same key is still caught,
    short of a CRC-32 collision at the same length and ends (a 1 in 2^32 chance). The key is
    the client's own, so this only guards the client against its own mistakes.
    """
    digest = hashlib.sha256(f"{method}\n{path}\n{content_type}\n{len(raw)}\n".encode())
    if len(raw) <= _WHOLE_HASH_LIMIT:
        digest.update(raw)
    else:
        digest.update(zlib.crc32(raw).to_bytes(4, "little"))
        digest.update(raw[: 1 << 16])
        digest.update(raw[-(1 << 16) :])
    return digest.hexdigest()[:32]  # 128 bits: ample to tell a client's two bodies apart, and half the bytes kept


_WHOLE_HASH_LIMIT = 1 << 20


def _step_json(r: StepResult, with_value: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if with_value and r.value is not None:
        out.update(tensor_json(r.value))
    out["step"], out["lr"] = r.step, r.lr
    if r.current_step is not None:
        out["current_step"] = r.current_step
    if r.staleness is not None:
        out["staleness"] = r.staleness
    return out


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
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    _one_key(request)
    received = await parse_tensor_body(request, schemas.StepRequest, settings, dtypes=wire.GRADIENT_DTYPES)
    idempotency = await off_the_loop(len(received.raw), _idempotency, idempotency_key, request, received.raw)
    body: schemas.StepOptions
    if received.parsed is not None:
        body = received.parsed
        grads = await arrays_of(received.parsed.gradients, "gradients", settings, len(received.raw))
    else:
        fields = metadata_fields(received.metadata, _STEP_OPTIONS, settings)
        body = validate(schemas.StepOptions, fields, ["body", "__metadata__"])
        grads = received.tensors
        if not grads:
            raise Problem(422, "invalid-request", "no gradients given", errors=[{"loc": ["body"], "msg": "empty"}])
    if body.expected_steps is not None:
        extra = sorted(set(body.expected_steps) - set(grads))
        if extra:
            raise invalid_request(
                [
                    {"loc": ["body", "expected_steps", n], "msg": f"expected_steps names {n!r}, which has no gradient"}
                    for n in extra
                ]
            )
    results = await server.step(
        model,
        grads,
        expected_steps=body.expected_steps,
        idempotency=idempotency,
        worker_id=body.worker_id,
        base_step=body.base_step,
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
        location = f"/v1/models/{model}/params?names={','.join(grads)}"
        return _json(pending, 202, headers={"Location": location, "Retry-After": "0"})
    replayed = any(r.replayed for r in results.values())
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    if wire.wants_safetensors(request.headers.get("accept")):
        tensors = {n: r.value for n, r in results.items() if body.return_params and r.value is not None}
        meta = {"params": {n: _step_json(r, False) for n, r in results.items()}}
        return _safetensors(wire.encode(tensors, meta), headers=headers)
    out = {n: _step_json(r, body.return_params) for n, r in results.items()}
    return _json({"params": out}, headers=headers)


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
