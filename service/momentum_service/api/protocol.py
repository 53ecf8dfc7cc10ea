"""The HTTP/1.1 protocol the server runs: uvicorn's httptools protocol, bounded, answering in
problem+json, and reading a request body straight into one buffer.

- **The head, bounded in size**: 431 beyond :data:`MAX_HEAD_BYTES`. h11 caps the head
  (``h11_max_incomplete_event_size``), httptools does not: it buffers a header of any length, so
  one connection streaming an endless header could make the process allocate without bound before
  the app (and its body limit, its API keys) ever sees the request.
- **The head, bounded in time**: 408 when a connection has not sent a whole request line and
  headers within ``header_timeout_s`` of connecting (or of its previous response): a connection
  that trickles its head a byte at a time holds nothing for long.
- **Malformed HTTP** (a bad chunk size, two Content-Lengths, CL and TE together, an obs-fold,
  a NUL in a header, an unknown method, ...): httptools refuses it, as uvicorn does, but the
  answer is a 400 problem+json rather than uvicorn's plain text; the connection is closed, so
  nothing after the malformed part is ever read as another request.
- **The body, read once**: a request with a ``Content-Length`` (up to the body limit) is read by
  the parser's callback straight into one buffer of that size, from the recycling pool, handed to
  the application in the scope (``scope["extensions"]["momentum.body"]``, a :class:`BodyBuffer`).
  uvicorn itself would append each chunk to a bytearray (copying it) and hand it over as a new
  bytes object (copying it again) for the application to join (a third copy).

Without httptools, uvicorn's h11 protocol is used, with the same size cap (and the body read
through ``receive``).
"""

from __future__ import annotations

import asyncio

import numpy as np

from ..kernels.buffers import POOL

# The request line and headers of one request. Ours are well under 8 KiB (a bearer key and a few
# short headers); the cap is generous so that no client is ever refused for a normal head.
MAX_HEAD_BYTES = 1 << 20
BODY_BUFFER = "momentum.body"


class BodyBuffer:
    """A request body as the protocol reads it: into ``buffer``, until :attr:`arrived` is set (or the
    client left: ``error``)."""

    def __init__(self, size: int) -> None:
        self.buffer = POOL.empty(size, np.uint8)
        self.size = 0
        self.arrived = asyncio.Event()
        self.error: str | None = None

    def write(self, data: bytes) -> None:
        end = self.size + len(data)
        self.buffer[self.size : end] = np.frombuffer(data, np.uint8)
        self.size = end

    def view(self) -> memoryview:
        return self.buffer.data[: self.size].toreadonly()


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


def http_protocol(header_timeout_s: float = 10.0, max_body_bytes: int = 64 << 20) -> type[asyncio.Protocol] | str:
    """The protocol class for uvicorn's ``http=`` (see the module's docstring)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
        return "h11"

    class MomentumHttpTools(HttpToolsProtocol):
        in_head = True  # between the first byte of a request (or the connection) and the end of its headers
        head_bytes = 0
        rejected = False
        head_timer: asyncio.TimerHandle | None = None
        pending: bytes | None = None  # a refusal waiting for the response in progress to finish
        body: BodyBuffer | None = None  # the body of the request being parsed, when read into a buffer

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self.body is not None and not self.body.arrived.is_set():
                self.body.error = "the client disconnected before the end of the body"
                self.body.arrived.set()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def on_message_begin(self) -> None:
            self.in_head, self.head_bytes, self.body = True, 0, None
            if self.head_timer is None:
                self._arm()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.in_head = False
            self._disarm()
            super().on_headers_complete()
            if self.expect_100_continue:  # the client waits for "100 Continue", sent when the app reads
                return
            for name, value in self.headers:
                if name == b"content-length":
                    try:
                        size = int(value)
                    except ValueError:
                        return  # httptools refuses it anyway
                    if 0 < size <= max_body_bytes:  # larger ones are refused from the header (413)
                        self.body = BodyBuffer(size)
                        extensions: dict[str, object] = self.scope.setdefault("extensions", {})  # type: ignore[assignment]
                        extensions[BODY_BUFFER] = self.body
                    return

        def on_body(self, body: bytes) -> None:
            if self.body is None:
                super().on_body(body)
                return
            if self.cycle.response_complete:
                return
            self.body.write(body)

        def on_message_complete(self) -> None:
            if self.body is not None:
                self.body.arrived.set()
            super().on_message_complete()

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
                if self.cycle is not None and self.head_bytes == 0:  # an idle kept-alive connection: close it
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
                if self.body is not None and not self.body.arrived.is_set():
                    self.body.error = detail
                    self.body.arrived.set()
            else:  # a malformed request after one whose response is under way: answer it after that one
                self.pending = answer
                self.flow.pause_reading()

    return MomentumHttpTools
