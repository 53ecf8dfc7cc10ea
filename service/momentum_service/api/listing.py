"""``GET /v1/models``: the models the caller may read, a page at a time, in name order.

Each model's summary comes from its owner: this replica's, or the owning replica's over HTTP
(with the caller's key), so that the steps shown are the served ones.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import StringConstraints
from pydantic.json_schema import SkipJsonSchema

from ..engine import ModelOwner, ParameterServer, Remote
from ..errors import ModelNotFound
from . import shards
from .deps import ServerDep
from .forward import Forwarder, RemoteProblem
from .problems import json_response
from .schemas import MODEL_NAME_PATTERN, ModelList, problem_responses
from .security import CallerDep

router = APIRouter(prefix="/v1", responses=problem_responses(401, 422, 503))

MAX_PAGE = 1000
_CONCURRENT = 16

Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"Models per page (1 to {MAX_PAGE}).")]
After = Annotated[
    Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)] | SkipJsonSchema[None],
    Query(description="Start after this model name: the previous page's `next`."),
]


@router.get(
    "/models",
    response_model=ModelList,
    summary="List the models the caller may read, with their rule, parameter count and steps, in name order",
)
async def list_models(
    request: Request, server: ServerDep, caller: CallerDep, limit: Limit = 100, after: After = None
) -> Response:
    names: list[str] = []
    cursor, batch = after or "", max(limit + 1, 100)
    while len(names) <= limit:  # one more than a page tells whether there is a next one
        found = await server.store.model_names(cursor, batch)
        names += [n for n in found if "~" not in n and (caller is None or caller.allows("read", n))]  # no shards
        if len(found) < batch:
            break
        cursor = found[-1]
    page, more = names[:limit], len(names) > limit
    forwarder: Forwarder = request.app.state.forwarder
    authorization = request.headers.get("authorization")
    gate = asyncio.Semaphore(_CONCURRENT)

    async def one(name: str) -> dict[str, Any] | None:
        async with gate:
            return await _summary(server, forwarder, name, authorization)

    try:
        summaries = await asyncio.gather(*(one(n) for n in page))
    except RemoteProblem as exc:
        return Response(exc.content, exc.status, media_type=exc.content_type or None)
    models = [s for s in summaries if s is not None]
    return json_response({"models": models, "next": page[-1] if more and page else None})


async def _summary(
    server: ParameterServer, forwarder: Forwarder, name: str, authorization: str | None
) -> dict[str, Any] | None:
    """A model's summary from its owner; None if it was deleted meanwhile."""
    try:
        routed = await server.route(name)
        if isinstance(routed, Remote):
            auth = None if authorization is None else authorization.encode("latin-1")
            body = await forwarder.get_json(routed, name, f"/v1/models/{name}", auth)
            config, params = body, body["params"]
        else:
            config, params = await _local(routed)
            if config.get("shards", 1) > 1:  # a sharded model: every shard's parameters
                per_shard = await shards.metas(server, name, config["shards"], authorization)
                params = {p.name: {"step": p.step} for ps in per_shard for p in ps}
    except ModelNotFound:
        return None
    except RemoteProblem as exc:
        if exc.status == 404:
            return None
        raise
    steps = [int(p["step"]) for p in params.values()]
    return {
        "name": name,
        "rule": config["optimizer"]["rule"],
        "mode": config["mode"],
        "params": len(params),
        "steps": max(steps, default=0),
    }


async def _local(owner: ModelOwner) -> tuple[dict[str, Any], dict[str, Any]]:
    record, metas = await owner.get_model()
    return record.config, {p.name: {"step": p.step} for p in metas}
