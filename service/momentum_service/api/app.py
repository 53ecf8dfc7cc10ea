"""The app factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..auth import KeyRing
from ..engine import ParameterServer
from ..kernels.buffers import POOL
from ..settings import Settings
from ..store import MemoryStore, Store
from . import problems
from .admission import Admission
from .codecs import Limits
from .routes import BODY_MODELS, health, router
from .schemas import ProblemDetails
from .step import serve_step

log = logging.getLogger("momentum_service")

DOCS_ASSETS = "/docs/assets"  # Swagger UI's and ReDoc's files (public: they hold nothing of the server's)

DESCRIPTION = """
Optimizer as a service: the server keeps every parameter and its momentum velocity and
applies pushed gradients under `torch.optim.SGD`'s momentum rule, bitwise as torch 2.13
does on CPU. Tensors travel as `{"shape": [...], "dtype": "float32"|"float64", "data": [...]}`;
numbers are sent with full float64 precision, so float32 values survive the trip exactly.
Errors are RFC 9457 `application/problem+json`.
"""


def make_store(settings: Settings) -> Store:
    if settings.redis_url:
        from ..store.redis import RedisStore

        return RedisStore.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout_s,
            cache_bytes=settings.cache_bytes,
        )
    return MemoryStore()


def create_app(settings: Settings | None = None, *, store: Store | None = None) -> FastAPI:
    """Build the application. Without ``store``, one is made from ``settings``."""
    settings = settings or Settings()
    store = store or make_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store.kind == "memory":
            log.warning("using the embedded in-memory store: state is lost when the process stops")
        else:
            log.info("using the %s store (prefix %r)", store.kind, settings.redis_prefix)
        try:
            yield
        finally:
            await store.close()

    # /docs and /redoc with their assets served from the package (fastapi-offline), not a CDN: the
    # docs work on a cluster without internet access.
    app = FastAPIOffline(
        title="momentum-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
    )
    app.state.keys = keys = KeyRing.load(settings.keys_file, settings.api_keys)
    app.add_middleware(
        Admission,
        ring=keys,
        public_docs=settings.public_docs,
        max_concurrent=settings.max_concurrent_requests,
        max_concurrent_per_key=settings.max_concurrent_per_key,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        bodies_in_flight=settings.bodies_in_flight,
        fast_step=serve_step,
    )
    app.state.settings = settings
    POOL.max_bytes = settings.buffer_pool_bytes
    app.state.limits = Limits.of(settings)
    app.state.server = ParameterServer(
        store,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        idempotency_lease_s=settings.idempotency_lease_s,
        sync_timeout_s=settings.sync_timeout_s,
        sync_ttl_s=settings.sync_ttl_s,
    )
    problems.install(app)
    app.include_router(health)
    app.include_router(router)
    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    """Add the schemas of the bodies that handlers parse themselves, and of problem details, to the document."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        models: list[type[BaseModel]] = [*BODY_MODELS, ProblemDetails]
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
