"""HTTP routes of checkpoints: ``GET`` a model's whole state as one safetensors file, ``PUT`` it back.

The file format is :mod:`.codecs.checkpoint`. A saved file streams out as the arrays' own
buffers (no copy); a restored one is read once into one buffer whose tensors become the
parameters' arrays (no second copy).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from . import shards
from .admission import body_of
from .body import off_the_loop
from .codecs import BodyError
from .codecs import checkpoint as codec
from .codecs.safetensors import MEDIA_TYPE as SAFETENSORS
from .deps import LimitsDep, ModelName, ServerDep
from .problems import json_response
from .responses import PartsResponse
from .routes import IfNoneMatchModel, _answer, _only_create
from .schemas import ModelOut, problem_responses
from .security import ADMIN, READ

log = logging.getLogger("momentum_service")
router = APIRouter(prefix="/v1", responses=problem_responses(401, 403, 422, 503))

_FILE = {
    SAFETENSORS: {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": "A safetensors file: `<name>` is a parameter's value and `<name>@<buffer>` each of its "
            "rule's state buffers (`w@velocity`); `__metadata__` holds, as JSON text, `format` "
            '(`"momentum-checkpoint/1"`), `model`, `config` (the model\'s config as `GET /v1/models/{model}` shows '
            'it) and `params` (`{name: {"step": n, "state": [buffer names]}}`).',
        }
    }
}


@router.get(
    "/models/{model}/checkpoint",
    dependencies=[READ],
    responses={200: {"content": _FILE, "description": "The checkpoint file"}, **problem_responses(404)},
    summary="Save the model: every value, every state buffer, each parameter's step and the config, as one file",
)
async def get_checkpoint(model: ModelName, request: Request, server: ServerDep) -> Response:
    n = await shards.count(server, model)
    auth = request.headers.get("authorization")
    saved = await (shards.checkpoint(server, model, n, auth) if n > 1 else server.checkpoint(model))
    encoded = codec.encode_checkpoint(model, saved)
    disposition = f'attachment; filename="{model}.safetensors"'
    return PartsResponse(encoded, headers={"Content-Disposition": disposition})


@router.put(
    "/models/{model}/checkpoint",
    dependencies=[ADMIN],
    status_code=201,
    response_model=ModelOut,
    responses={200: {"model": ModelOut, "description": "Model replaced"}, **problem_responses(409, 412, 413, 415)},
    openapi_extra={"requestBody": {"required": True, "content": _FILE}},
    summary="Restore a checkpoint: create the model from it, or replace the model whole (its rule cannot change: "
    "409); with If-None-Match: * only create",
)
async def put_checkpoint(
    model: ModelName, request: Request, server: ServerDep, limits: LimitsDep, if_none_match: IfNoneMatchModel = None
) -> Response:
    only_create = _only_create(if_none_match)
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != SAFETENSORS:
        raise BodyError(
            415,
            "unsupported-media-type",
            f"send the checkpoint as Content-Type: {SAFETENSORS} (got {content_type or 'none'!r})",
            headers={"Accept-Put": SAFETENSORS},
        )
    raw = body_of(request)
    checkpoint = await off_the_loop(len(raw), codec.decode, raw, limits)
    if max(checkpoint.config.shards, await shards.count(server, model)) > 1:
        auth = request.headers.get("authorization")
        record, created = await shards.restore(server, model, checkpoint, only_create, auth)
    else:
        record, created = await server.restore(model, checkpoint, only_create=only_create)
    log.info(
        "model %r %s from a checkpoint (%d parameters)",
        model,
        "created" if created else "restored",
        len(checkpoint.params),
        extra={"model": model},
    )
    headers = {"Location": f"/v1/models/{model}"} if created else None
    return json_response(await _answer(server, model, record, request), 201 if created else 200, headers)
