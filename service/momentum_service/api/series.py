"""``GET /v1/models/{model}/metrics``: the model's training series (what the dashboard draws)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from .deps import ModelName, ServerDep
from .problems import json_response
from .schemas import PointsOut, problem_responses
from .security import READ

router = APIRouter(prefix="/v1", responses=problem_responses(401, 403, 422, 503))

MAX_POINTS = 10_000

Since = Annotated[int, Query(ge=0, le=2**63 - 1, description="Return the points after this id (the last `next`).")]
Limit = Annotated[int, Query(ge=1, le=MAX_POINTS, description=f"At most this many points (1 to {MAX_POINTS}).")]


@router.get(
    "/models/{model}/metrics",
    dependencies=[READ],
    response_model=PointsOut,
    responses=problem_responses(404),
    summary="The model's training series: one point per applied push, with the scalars its worker sent",
)
async def get_points(model: ModelName, server: ServerDep, since: Since = 0, limit: Limit = 1000) -> Response:
    points = await server.points(model, since, limit)
    body = {"model": model, "points": [p.to_json() for p in points], "next": points[-1].id if points else since}
    return json_response(body)
