"""HTTP/1.1 for the SDK's transports, without I/O: the request head, and reading a response.

:class:`ResponseReader` is fed bytes and says how many it wants next and where to put them: the
head is read into a small buffer; a body of known length straight into one preallocated buffer
(the socket reads into it, nothing is copied after); a chunked body chunk by chunk into a
growing one. The sync and async transports drive it with their own sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._buffers import POOL

MAX_HEAD = 64 * 1024
_GROW = 1 << 16


def request_head(method: str, target: str, host: str, headers: list[tuple[bytes, bytes]], length: int) -> bytes:
    """The request line and headers; ``Content-Length`` is ``length`` (whatever the headers said)."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1"), b"Host: " + host.encode("latin-1")]
    for name, value in headers:
        lowered = name.lower()
        if lowered in (b"host", b"content-length", b"transfer-encoding", b"connection"):
            continue
        lines.append(name + b": " + value)
    if length or method not in ("GET", "HEAD", "DELETE"):
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class ProtocolError(Exception):
    """The server's answer is not valid HTTP/1.1."""


@dataclass
class Head:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        return (self.get(b"connection") or b"").lower() != b"close"


@dataclass
class ResponseReader:
    """Reads one response. Call :meth:`feed_head` with bytes until it returns a :class:`Head`, then
    :meth:`into` / :meth:`got` until :attr:`done`. ``method`` matters for HEAD (no body)."""

    method: str
    head_buf: bytearray = field(default_factory=bytearray)
    head: Head | None = None
    body: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint8))
    size: int = 0  # body bytes received
    length: int | None = None  # Content-Length, or None (chunked, or until the connection closes)
    chunked: bool = False
    done: bool = False
    _chunk_left: int = 0  # data bytes of the current chunk still to read
    _pending: bytearray = field(default_factory=bytearray)  # chunked bytes not parsed yet

    def feed_head(self, data: bytes | memoryview) -> Head | None:
        """Add bytes of the head; the head once it is complete (the bytes after it are the body's)."""
        self.head_buf += data
        end = self.head_buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head_buf) > MAX_HEAD:
                raise ProtocolError(f"the response head is over {MAX_HEAD} bytes")
            return None
        lines = bytes(self.head_buf[:end]).split(b"\r\n")
        rest = bytes(self.head_buf[end + 4 :])
        try:
            version, status, *reason = lines[0].split(b" ", 2)
            if not version.startswith(b"HTTP/1."):
                raise ValueError(version)
            code = int(status)
        except ValueError as exc:
            raise ProtocolError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}") from exc
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"not a header line: {line[:100]!r}")
            headers.append((name.strip(), value.strip()))
        self.head = Head(code, reason[0].decode("latin-1") if reason else "", headers)
        if code in (204, 304) or 100 <= code < 200 or self.method == "HEAD":
            self.done = True
            return self.head
        encoding = (self.head.get(b"transfer-encoding") or b"").lower()
        if encoding:
            if encoding != b"chunked":
                raise ProtocolError(f"unsupported Transfer-Encoding {encoding!r}")
            self.chunked = True
            self._pending += rest
            self._parse_chunks()
            return self.head
        declared = self.head.get(b"content-length")
        if declared is not None:
            try:
                self.length = int(declared)
            except ValueError:
                raise ProtocolError(f"bad Content-Length {declared!r}") from None
            if self.length < 0:
                raise ProtocolError(f"bad Content-Length {declared!r}")
            self.body = POOL.empty(self.length)  # recycled memory when it can be: no page faults
        self._take(rest)
        return self.head

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        """Body bytes that arrived with the head, or read into the scratch buffer."""
        if self.length is not None:
            data = memoryview(data)[: self.length - self.size]
        if len(data):
            self._append(data)
        if self.length is not None and self.size >= self.length:
            self.done = True

    def _grow(self, end: int) -> None:
        grown = np.empty(max(end, 2 * len(self.body), _GROW), np.uint8)
        grown[: self.size] = self.body[: self.size]
        self.body = grown

    def into(self) -> memoryview:
        """Where the next bytes go: for a body of known length, the rest of its buffer (the socket reads
        straight into it); else a scratch buffer, whose bytes :meth:`got` takes in."""
        if self.length is not None:
            return self.body[self.size : self.length].data
        if self._scratch is None:
            self._scratch = bytearray(_GROW)
        return memoryview(self._scratch)

    _scratch: bytearray | None = None

    def got(self, n: int) -> None:
        """``n`` bytes were written into what :meth:`into` returned (0: the connection closed)."""
        if n == 0:
            if self.length is None and not self.chunked:
                self.done = True  # a body that runs until the connection closes: it closed
                return
            raise ProtocolError("the connection closed before the end of the response")
        if self.length is not None:
            self.size += n
            self.done = self.size >= self.length
        elif self.chunked:
            assert self._scratch is not None
            self._pending += self._scratch[:n]
            self._parse_chunks()
        else:
            assert self._scratch is not None
            self._take(self._scratch[:n])

    _expect_crlf: bool = False

    def _parse_chunks(self) -> None:
        """Parse chunked framing from :attr:`_pending`; each chunk's data goes to the body."""
        while not self.done:
            if self._expect_crlf:
                if len(self._pending) < 2:
                    return
                if self._pending[:2] != b"\r\n":
                    raise ProtocolError("a chunk does not end with CRLF")
                del self._pending[:2]
                self._expect_crlf = False
            if self._chunk_left:
                take = min(self._chunk_left, len(self._pending))
                self._append(memoryview(self._pending)[:take])
                del self._pending[:take]
                self._chunk_left -= take
                if self._chunk_left:
                    return
                self._expect_crlf = True
                continue
            line_end = self._pending.find(b"\r\n")
            if line_end < 0:
                if len(self._pending) > 4096:
                    raise ProtocolError("a chunk size line is too long")
                return
            size_text = bytes(self._pending[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text!r}") from None
            del self._pending[: line_end + 2]
            if size == 0:  # the last chunk: trailers (ignored), then an empty line
                if self._pending.find(b"\r\n") >= 0:
                    self.done = True
                return
            self._chunk_left = size

    def _append(self, data: bytes | bytearray | memoryview) -> None:
        end = self.size + len(data)
        if end > len(self.body):
            self._grow(end)
        self.body[self.size : end] = np.frombuffer(data, np.uint8)
        self.size = end

    def content(self) -> np.ndarray:
        """The body received, as a view of its buffer."""
        return self.body[: self.size]
