"""Responses whose body is a list of parts (a header, then arrays' buffers), sent as they are.

The ASGI server writes each part to the socket in turn (uvicorn hands each to its transport, which
sends from the buffer or keeps a reference to it until it can): the body is never joined into one
bytes object, and the arrays are never copied into one. Content-Length is the parts' total.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .codecs import Encoded


class PartsResponse(Response):
    def __init__(self, encoded: Encoded, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status
        self.media_type = encoded.media_type
        self.parts = encoded.parts
        self.background = None
        raw = [(b"content-type", encoded.media_type.encode()), (b"content-length", str(encoded.length).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        if last < 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
