"""``GET /metrics``: the Prometheus exposition of this replica (see :mod:`..telemetry`).

Who may read it: anyone with ``MOMENTUM_PUBLIC_METRICS=true`` (a scraper inside the cluster's
network), else a key whose scope covers every model (``read:*``, ``write:*`` or ``admin:*``):
the labels name models, so a key limited to some models may not see them all. Without keys
configured, anyone who can reach the server (by default, bound to loopback).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..telemetry import CONTENT_TYPE, Telemetry
from .problems import Problem
from .security import CallerDep

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, caller: CallerDep) -> Response:
    if caller is not None and not caller.allows("read", "*"):
        raise Problem(
            403,
            "forbidden",
            "/metrics names every model: it needs a key whose scope covers all models (read:*, write:* or admin:*), "
            "or MOMENTUM_PUBLIC_METRICS=true",
            required="read:*",
        )
    telemetry: Telemetry = request.app.state.telemetry
    telemetry.owned.set(len(request.app.state.server.owners))
    return Response(telemetry.exposition(), media_type=CONTENT_TYPE)
