"""Command line: ``momentum-service serve``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="momentum-service", description="Optimizer as a service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to bind (env MOMENTUM_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env MOMENTUM_PORT, default 8000)")
    serve.add_argument("--redis-url", help="Redis URL (env MOMENTUM_REDIS_URL); unset: the embedded store")
    serve.add_argument("--log-level", help="debug, info, warning, error (env MOMENTUM_LOG_LEVEL)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return 2  # pragma: no cover - argparse enforces the subcommand


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from .api import create_app
    from .settings import Settings

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "redis_url": args.redis_url,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"momentum-service: invalid setting:\n{exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("momentum_service")
    store = "redis at " + _redact(settings.redis_url) if settings.redis_url else "the embedded in-memory store"
    log.info("momentum-service %s on http://%s:%d using %s", __version__, settings.host, settings.port, store)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        proxy_headers=False,
    )
    return 0


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


if __name__ == "__main__":
    sys.exit(main())
