"""``GET /dashboard``: a live training dashboard, served from the package (no CDN, no build step).

The page (``dashboard/index.html``, ``app.js``, ``style.css``) holds no data: its script reads the
models and their training metrics through the API, with the API key the user enters when the
server asks for one. So the page and its assets are served without a key (admission lets
``/dashboard`` through), and only the files of that directory are served.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from starlette.responses import Response

from .problems import Problem

__all__ = ["ASSETS", "router"]

_DIR: Traversable = files("momentum_service.dashboard")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSETS: frozenset[str] = frozenset(
    entry.name for entry in _DIR.iterdir() if entry.is_file() and any(entry.name.endswith(s) for s in _TYPES)
)
"""The files served under ``/dashboard/``: the directory's pages, scripts, styles and pictures."""

_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new version of the service serves its new page at once
    "X-Content-Type-Options": "nosniff",
    # Everything from this server; scripts only from files (no inline script, no eval).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}

router = APIRouter(include_in_schema=False)


def _serve(name: str) -> Response:
    media_type = next(t for suffix, t in _TYPES.items() if name.endswith(suffix))
    return Response(_DIR.joinpath(name).read_bytes(), media_type=media_type, headers=_HEADERS)


@router.get("/dashboard")
async def dashboard() -> Response:
    return _serve("index.html")


@router.get("/dashboard/{asset}")
async def dashboard_asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise Problem(404, "not-found", f"the dashboard has no file {asset!r}")
    return _serve(asset)
