"""Command line: ``momentum-service serve``, ``keys create`` and ``checkpoint save|load|list``."""

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
    serve.add_argument("--log-format", choices=("text", "json"), help="text or json (env MOMENTUM_LOG_FORMAT)")
    serve.add_argument("--keys-file", help="file of API keys, from `keys create` (env MOMENTUM_KEYS_FILE)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve without API keys on a non-loopback address (refused otherwise)",
    )
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser(
        "create",
        help="print a new random key (first line) and its line for the keys file (second line)",
    )
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="read:PATTERN, write:PATTERN or admin:PATTERN (a glob over model names); repeatable",
    )
    ckpt = sub.add_parser(
        "checkpoint", help="save, restore or list models over the HTTP API (for operators; uses the SDK)"
    ).add_subparsers(dest="checkpoint_command", required=True)
    for name, text in (
        ("save", "write a model's checkpoint (values, state, steps, config) to a safetensors file"),
        ("load", "restore a checkpoint file as a model: created, or replaced whole (--no-replace: only create)"),
        ("list", "list the models the key may read"),
    ):
        cmd = ckpt.add_parser(name, help=text)
        cmd.add_argument("--url", default=None, help="server URL (env MOMENTUM_URL, default http://127.0.0.1:8000)")
        cmd.add_argument("--api-key", default=None, help="API key (env MOMENTUM_API_KEY)")
        if name != "list":
            cmd.add_argument("model", help="model name")
            cmd.add_argument("file", help="checkpoint file (.safetensors)")
        if name == "load":
            cmd.add_argument("--no-replace", action="store_true", help="only create: fail if the model exists")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys_create(args.scope)
    if args.command == "checkpoint":
        return _checkpoint(args)
    return 2  # pragma: no cover - argparse enforces the subcommand


def _keys_create(scopes: list[str]) -> int:
    from .auth import ApiKey, Scope, hash_key, new_key

    try:
        parsed = tuple(Scope.parse(s) for s in scopes)
    except ValueError as exc:
        print(f"momentum-service: {exc}", file=sys.stderr)
        return 2
    key = new_key()
    print(key)
    print(ApiKey(hash_key(key), parsed, "new").line())
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    import os

    import momentum_client as mc

    url = args.url or os.environ.get("MOMENTUM_URL") or "http://127.0.0.1:8000"
    try:
        with mc.Client(url, api_key=args.api_key) as client:
            if args.checkpoint_command == "save":
                client.save_checkpoint(args.model, args.file)
                info = client.get_model(args.model)
                print(f"saved model {args.model!r} ({len(info.params)} parameters) to {args.file}")
            elif args.checkpoint_command == "load":
                info = client.load_checkpoint(args.model, args.file, replace=not args.no_replace)
                steps = max((p.step for p in info.params.values()), default=0)
                print(f"restored model {args.model!r} from {args.file}: {len(info.params)} parameters, step {steps}")
            else:
                for m in client.list_models():
                    print(f"{m.name}\t{m.rule}\t{m.mode}\t{m.params} params\tstep {m.steps}")
    except (mc.MomentumError, OSError) as exc:
        print(f"momentum-service checkpoint {args.checkpoint_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from pydantic import ValidationError

        from .api import create_app
        from .api.protocol import MAX_HEAD_BYTES, http_protocol
        from .settings import Settings
    except ImportError as exc:  # a client-only install (pip install momentum-service, no extra)
        print(
            f"momentum-service: serving needs the server extra, which is not installed ({exc.name} is missing): "
            "pip install 'momentum-service[server]'",
            file=sys.stderr,
        )
        return 2

    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "redis_url": args.redis_url,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "keys_file": args.keys_file,
            "insecure": args.insecure,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"momentum-service: invalid setting:\n{exc}", file=sys.stderr)
        return 2
    from .auth import KeyRing

    try:
        ring = KeyRing.load(settings.keys_file, settings.api_keys)
    except (OSError, ValueError) as exc:
        print(f"momentum-service: cannot load the API keys: {exc}", file=sys.stderr)
        return 2
    if not ring and not _is_loopback(settings.host) and not settings.insecure:
        print(
            f"momentum-service: refusing to serve on {settings.host} without API keys: anyone who can reach it "
            "could read and overwrite every model. Configure keys (--keys-file, see `momentum-service keys "
            "create`), bind a loopback address, or pass --insecure.",
            file=sys.stderr,
        )
        return 2
    from .logs import configure

    configure(settings.log_level, settings.log_format)
    log = logging.getLogger("momentum_service")
    store = "redis at " + _redact(settings.redis_url) if settings.redis_url else "the embedded in-memory store"
    log.info("momentum-service %s on http://%s:%d using %s", __version__, settings.host, settings.port, store)
    if ring:
        log.info("API keys required: %d configured", len(ring.keys))
    elif settings.insecure and not _is_loopback(settings.host):
        log.warning(
            "--insecure: serving WITHOUT API keys on %s; anyone who can reach it has full access", settings.host
        )
    else:
        log.warning("no API keys configured: open to anyone on this machine (bound to %s only)", settings.host)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through configure()'s handler: the same format, request ids
        access_log=settings.access_log,
        proxy_headers=False,
        http=http_protocol(settings.header_timeout_s, settings.max_body_bytes),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
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
