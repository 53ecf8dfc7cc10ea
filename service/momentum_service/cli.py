"""Command line: ``momentum-service serve`` and ``momentum-service keys create``."""

from __future__ import annotations

import argparse
import asyncio
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
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys_create(args.scope)
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
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
        access_log=settings.access_log,
        proxy_headers=False,
        http=_http_protocol(settings.header_timeout_s),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    return 0


# The request line and headers of one request. Ours are well under 8 KiB (a bearer key and a few
# short headers); the cap is generous so that no client is ever refused for a normal head.
MAX_HEAD_BYTES = 1 << 20


def _problem_response(status: int, reason: bytes, slug: str, title: str, detail: str) -> bytes:
    """A whole HTTP/1.1 problem+json response that closes the connection (for the protocol layer)."""
    body = b'{"type":"urn:momentum-service:problem:%s","title":"%s","status":%d,"detail":"%s"}' % (
        slug.encode(),
        title.encode(),
        status,
        detail.replace('"', "'").encode(),
    )
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


def _http_protocol(header_timeout_s: float = 10.0) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol with a bounded request head, answering in problem+json.

    - **Size**: 431 beyond MAX_HEAD_BYTES. h11 caps the head (``h11_max_incomplete_event_size``),
      httptools does not: it buffers a header of any length, so one connection streaming an endless
      header could make the process allocate without bound before the app (and its body limit,
      its API keys) ever sees the request.
    - **Time**: 408 when a connection has not sent a whole request line and headers within
      ``header_timeout_s`` of connecting (or of starting a request): a connection that trickles
      its head a byte at a time holds nothing for long.
    - **Malformed HTTP** (a bad chunk size, two Content-Lengths, CL and TE together, an obs-fold,
      a NUL in a header, an unknown method, ...): httptools refuses it, as uvicorn does, but the
      answer is a 400 problem+json rather than uvicorn's plain text; the connection is closed,
      so nothing after the malformed part is ever read as another request.

    Without httptools, uvicorn's h11 protocol is used, with the same size cap.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        return "h11"

    class BoundedHttpTools(HttpToolsProtocol):
        in_head = True  # between the first byte of a request (or the connection) and the end of its headers
        head_bytes = 0
        rejected = False
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def on_message_begin(self) -> None:
            self.in_head, self.head_bytes = True, 0
            if self.head_timer is None:
                self._arm()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._disarm()
            super().on_headers_complete()

        pending: bytes | None = None  # a refusal waiting for the response in progress to finish

        def on_response_complete(self) -> None:
            if self.pending is not None:  # a malformed request came after this one: answer it, then close
                self.transport.write(self.pending)
                self.transport.close()
                self.pending = None
                return
            super().on_response_complete()
            if not self.transport.is_closing():
                self.in_head = True  # the next request's head, on a kept-alive connection
                self._arm()

        def data_received(self, data: bytes) -> None:
            if self.rejected:
                return
            super().data_received(data)
            if self.in_head:  # counted only while a head is incomplete: bodies are not heads
                self.head_bytes += len(data)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._reject(
                        431,
                        b"Request Header Fields Too Large",
                        "header-too-large",
                        "Request header fields too large",
                        f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
                    )

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.in_head and not self.transport.is_closing():
                keep_alive = self.cycle is not None and self.head_bytes == 0
                if keep_alive:  # an idle kept-alive connection: close it, as uvicorn's keep-alive timeout does
                    self.transport.close()
                    return
                self._reject(
                    408,
                    b"Request Timeout",
                    "header-timeout",
                    "Request timeout",
                    f"the request line and headers did not arrive within {header_timeout_s:g} s",
                )

        def send_400_response(self, msg: str) -> None:
            self._reject(400, b"Bad Request", "malformed-http", "Bad request", f"malformed HTTP request: {msg}")

        def _reject(self, status: int, reason: bytes, slug: str, title: str, detail: str) -> None:
            self.rejected = True
            self._disarm()
            self.logger.warning("%d %s: %s; closing the connection", status, slug, detail)
            answer = _problem_response(status, reason, slug, title, detail)
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                self.transport.write(answer)
                self.transport.close()
            elif cycle.more_body:  # the malformed part is this request's own body: it can never complete
                self.transport.write(answer)
                self.transport.close()
                cycle.disconnected = True  # the application sees the client gone, and answers nothing
                cycle.message_event.set()
            else:  # a malformed request after one whose response is under way: answer it after that one
                self.pending = answer
                self.flow.pause_reading()

    return BoundedHttpTools


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
