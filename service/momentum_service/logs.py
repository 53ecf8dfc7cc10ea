"""The service's logs: one line per event worth reading, as text or JSON, each with its request id.

``configure(level, fmt)`` sets up the ``momentum_service`` logger (and uvicorn's) for the CLI:
``text`` (``2026-11-30 12:00:00 INFO momentum_service [req 3f2a...]: model 'm' created``) or
``json`` (one object per line: ``time``, ``level``, ``logger``, ``message``, ``request_id``, and
the record's ``model`` when it has one) for log collectors. The request id is the request's
``X-Request-ID`` when it sent a sane one (else a fresh one), echoed in the response, and set
for everything logged while the request is handled (a context variable).

Nothing secret is ever logged: API keys are never written (a refused key is logged by its
request id and the reason only), and the Redis URL's password is redacted.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import sys
import time

import orjson

__all__ = ["REQUEST_ID", "configure", "new_request_id", "request_id"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("momentum_request_id", default=None)
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Fresh request ids: this process's random prefix and a counter. Unique, and not secret (they are
# echoed to the client and logged); uuid4 read os.urandom on every request, 4% of a small step's
# server CPU (py-spy).
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)


def request_id() -> str | None:
    return REQUEST_ID.get()


def new_request_id(offered: str | None) -> str:
    """The client's ``X-Request-ID`` if it is 1 to 64 safe characters, else a fresh one (never echoing
    arbitrary bytes into logs)."""
    if offered and _SANE.match(offered):
        return offered
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [req {rid}]" if rid else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        for extra in ("model", "status", "slug", "elapsed_ms"):
            if hasattr(record, extra):
                out[extra] = getattr(record, extra)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as ``text`` or ``json``, with request ids (the CLI's ``serve``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_WithRequestId())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
