"""The app factory."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..auth import KeyRing
from ..engine import EngineOptions, ParameterServer, Remote
from ..engine.writer import SnapshotPolicy
from ..kernels.buffers import POOL
from ..settings import Settings
from ..store import Journal, MemoryJournal
from ..telemetry import Telemetry, timed_journal
from . import problems
from .admission import Admission
from .checkpoints import router as checkpoints_router
from .codecs import Limits
from .dashboard import router as dashboard_router
from .forward import Forwarder, hops, model_of
from .listing import router as listing_router
from .metrics import router as metrics_router
from .routes import BODY_MODELS, health, router
from .schemas import ProblemDetails
from .series import router as series_router
from .step import serve_step

log = logging.getLogger("momentum_service")

DOCS_ASSETS = "/docs/assets"  # Swagger UI's and ReDoc's files (public: they hold nothing of the server's)

DESCRIPTION = """
Optimizer as a service: the server keeps every parameter and its momentum state and
applies pushed gradients under `torch.optim.SGD`'s momentum rule, bitwise as torch 2.13
does on CPU. Tensors travel as `{"shape": [...], "dtype": "float32"|"float64", "data": [...]}`;
numbers are sent with full float64 precision, so float32 values survive the trip exactly.
Errors are RFC 9457 `application/problem+json`.
"""


def make_journal(settings: Settings) -> Journal:
    if settings.redis_url:
        from ..store.redis import RedisJournal

        seeds = [s for s in (settings.redis_cluster_nodes or "").split(",") if s.strip()]
        return RedisJournal.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout_s,
            cluster=settings.redis_cluster,
            seeds=seeds,
        )
    return MemoryJournal()


def advertised_url(settings: Settings) -> str:
    """The URL other replicas forward requests to this one at."""
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def make_server(journal: Journal, settings: Settings, telemetry: Telemetry | None = None) -> ParameterServer:
    telemetry = telemetry or Telemetry(settings.metrics_max_models, settings.slow_step_ms)
    options = EngineOptions(
        idempotency_ttl_s=settings.idempotency_ttl_s,
        idempotency_memory_keys=settings.idempotency_memory_keys,
        sync_timeout_s=settings.sync_timeout_s,
        sync_ttl_s=settings.sync_ttl_s,
        snapshots=SnapshotPolicy(ratio=settings.snapshot_log_ratio),
        max_pending_bytes=settings.flush_max_pending_bytes,
        idle_s=settings.owner_idle_s,
        series_points=settings.series_points,
        events=telemetry,
    )
    journal = timed_journal(journal, telemetry)
    return ParameterServer(journal, url=advertised_url(settings), lease_ms=settings.lease_ms, options=options)


class MomentumAPI(FastAPI):
    """FastAPI for the routes and the OpenAPI document, with :class:`.admission.Admission` as the outermost
    layer (before Starlette's and FastAPI's own middleware, which a step served straight from admission
    never passes through), and the API docs served from the package."""

    def __init__(self, admission: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(docs_url=None, redoc_url=None, **kwargs)
        self.admission = admission
        _offline_docs(self)

    def build_middleware_stack(self) -> ASGIApp:
        return Admission(super().build_middleware_stack(), **self.admission)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # FastAPI's own __call__ asks OpenTelemetry for a tracer provider on every request (5% of a
        # tiny step's server time, profiled); the service exports no traces, so HTTP goes straight in.
        if scope["type"] == "http" and not self.root_path:
            await Starlette.__call__(self, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts and styles from the ``fastapi-offline`` package,
    not a CDN: the docs work on a cluster without internet access."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="momentum-service - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="momentum-service - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None, *, journal: Journal | None = None) -> FastAPI:
    """Build the application. Without ``journal``, one is made from ``settings``."""
    settings = settings or Settings()
    journal = journal or make_journal(settings)
    telemetry = Telemetry(settings.metrics_max_models, settings.slow_step_ms)
    server = make_server(journal, settings, telemetry)
    forwarder = Forwarder(server)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if journal.kind == "memory":
            log.warning("using the embedded in-memory store: state is lost when the process stops")
        else:
            log.info(
                "using the %s store (prefix %r); this replica is %s at %s",
                journal.kind,
                settings.redis_prefix,
                server.cluster.me.id,
                server.cluster.me.url,
            )
        await server.start()
        try:
            yield
        finally:
            await server.close()
            await forwarder.aclose()
            await journal.close()

    async def route(scope: Scope, receive: Receive, send: Send, body: memoryview) -> bool:
        model = model_of(scope["path"])
        if model is None:
            return False
        routed = await server.route(model, forwarded=hops(scope) > 0)
        if isinstance(routed, Remote):
            await forwarder(scope, receive, send, model, body, routed)
            return True
        return False

    keys = KeyRing.load(settings.keys_file, settings.api_keys)
    admission = {
        "ring": keys,
        "public_docs": settings.public_docs,
        "max_concurrent": settings.max_concurrent_requests,
        "max_concurrent_per_key": settings.max_concurrent_per_key,
        "max_body_bytes": settings.max_body_bytes,
        "body_timeout_s": settings.body_timeout_s,
        "bodies_in_flight": settings.bodies_in_flight,
        "fast_step": serve_step,
        "router": None if server.cluster.single else route,
        "telemetry": telemetry,
        "public_metrics": settings.public_metrics,
    }
    app = MomentumAPI(
        admission, title="momentum-service", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.keys = keys
    app.state.settings = settings
    POOL.max_bytes = settings.buffer_pool_bytes
    app.state.limits = Limits.of(settings)
    app.state.server = server
    app.state.forwarder = forwarder
    app.state.telemetry = telemetry
    problems.install(app)
    app.include_router(health)
    app.include_router(listing_router)
    app.include_router(router)
    app.include_router(checkpoints_router)
    app.include_router(series_router)
    app.include_router(metrics_router)
    app.include_router(dashboard_router)
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
