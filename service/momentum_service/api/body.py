"""Request bodies in the routes: the body read once by admission, and work on it off the event loop.

Tensor bodies are decoded by their wire format's codec (:mod:`.codecs`); the JSON bodies that
carry no tensors (model configs) are parsed here with the JSON codec's reader and validated
by their schema, with the domain's own messages where it has them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from .admission import body_of
from .codecs import BodyError, Limits
from .codecs import json as json_codec

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# Work on a body bigger than this (parsing, validating, checking every number, fingerprinting) runs
# in a worker thread, so that one large or hostile request does not stall every other request.
OFFLOAD_BYTES = 1 << 20


async def off_the_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when ``size`` (the bytes it works on) is over OFFLOAD_BYTES."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def parse_json(
    request: Request, model: type[M], limits: Limits, *, explain: Callable[[Any], None] | None = None
) -> M:
    """A JSON body without tensors, validated by ``model`` (415 unless the body is JSON)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise BodyError(
            415,
            "unsupported-media-type",
            f"send the body as Content-Type: application/json (got {content_type or 'none'!r})",
            headers={"Accept-Post": "application/json"},
        )
    raw = body_of(request)
    return await off_the_loop(len(raw), partial(json_codec.parse, explain=explain), raw, model, limits)
