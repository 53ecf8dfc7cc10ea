"""httpx transports that send a body's parts and read a response without copying the tensors.

httpx stays the SDK's HTTP library (its clients, timeouts, event hooks, proxies for other
mounts); these are its transports for plain ``http://``, plugged in where httpx's default one
would be. The default transport copies a body several times on each side: httpx/h11 join a
request's chunks into one bytes object, and a response's chunks are read into bytes, buffered
by h11 and joined again. Here:

- a request is sent with one scatter-gather ``sendmsg`` of its head and its parts (the
  safetensors header, then the arrays' own buffers), so a gradient goes from its array to the
  kernel, with no copy in Python;
- a response of known length is read with ``recv_into`` straight into one preallocated buffer,
  from which the SDK takes its arrays as views (``response.extensions["momentum.body"]``).

A request made by the SDK carries its parts in ``extensions["momentum.parts"]`` (its
``Content-Length`` counts them); any other request is sent with its own body. The SDK calls its
transport directly, with an ``httpx.Request``: ``httpx.Client.send`` (its URL merging, cookie
jar, auth and redirect handling, none of which the SDK uses) costs about 60 µs a request here, a
sixth of a small step's client time. It goes through ``httpx.Client`` when it was given a client
or a transport, and for a URL that the environment's proxy settings route through a proxy. Connections are
kept alive and reused (one pool per host); a failed connect is retried ``retries`` times, and a
request on a pooled connection that the server had closed meanwhile is sent again on a fresh one
(it never reached the server). ``https://`` goes to httpx's own transport.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence

import httpx
import numpy as np
import numpy.typing as npt

from ._http11 import ProtocolError, ResponseReader, request_head

Buffer = bytes | memoryview
PARTS = "momentum.parts"
BODY = "momentum.body"
_CONNECT_BACKOFF = 0.05


def _parts(request: httpx.Request) -> tuple[Sequence[Buffer], int]:
    parts = request.extensions.get(PARTS)
    if parts is None:
        body = request.read()
        parts = (body,) if body else ()
    return parts, sum(memoryview(p).nbytes for p in parts)


def _timeouts(request: httpx.Request) -> dict[str, float | None]:
    timeout: dict[str, float | None] = request.extensions.get("timeout") or {}
    return timeout


def _target(url: httpx.URL) -> str:
    return url.raw_path.decode("ascii")


def _host(url: httpx.URL) -> str:
    default = 80
    return url.host if url.port in (None, default) else f"{url.host}:{url.port}"


class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body already read into one buffer (``response.extensions["momentum.body"]``).

    The SDK :meth:`take` s the buffer (a numpy uint8 array): the stream lets go of it, so that once
    the SDK's arrays are dropped, nothing holds the buffer (httpx keeps a response and its stream
    in a reference cycle, which only the garbage collector would break) and it is recycled at
    once. Read as an ordinary stream, it yields the bytes once.
    """

    def __init__(self, body: npt.NDArray[np.uint8] | None) -> None:
        self.body = body

    def take(self) -> npt.NDArray[np.uint8]:
        body, self.body = self.body, None
        if body is None:
            raise RuntimeError("the response body was taken already")
        return body

    def __iter__(self) -> Iterator[bytes]:
        if self.body is not None and self.body.size:
            yield self.body.data  # type: ignore[misc]  # a bytes-like view: httpx joins it

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.body is not None and self.body.size:
            yield self.body.data  # type: ignore[misc]


def _response(request: httpx.Request, reader: ResponseReader) -> httpx.Response:
    head = reader.head
    assert head is not None
    stream = Body(reader.content())
    extensions = {"http_version": b"HTTP/1.1", "reason_phrase": head.reason.encode("latin-1"), BODY: stream}
    return httpx.Response(head.status, headers=head.headers, stream=stream, request=request, extensions=extensions)


def _gone(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection was closed by the server (it is readable: EOF, or junk)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _error(exc: BaseException, phase: str, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception for a socket error in ``phase`` (connect, write or read)."""
    timeout = isinstance(exc, socket.timeout | TimeoutError)
    kinds: dict[tuple[str, bool], type[httpx.TransportError]] = {
        ("connect", True): httpx.ConnectTimeout,
        ("connect", False): httpx.ConnectError,
        ("write", True): httpx.WriteTimeout,
        ("write", False): httpx.WriteError,
        ("read", True): httpx.ReadTimeout,
        ("read", False): httpx.ReadError,
    }
    if isinstance(exc, ProtocolError):
        return httpx.RemoteProtocolError(str(exc), request=request)
    return kinds[(phase, timeout)](f"{type(exc).__name__}: {exc}", request=request)


def _resent(request: httpx.Request, length: int) -> bytes:
    """The head of a request sent again on a fresh connection: the server may have seen the first one
    after all (a connection can die after the request reached it), so its key is no longer fresh."""
    if "momentum-fresh-key" in request.headers:
        del request.headers["momentum-fresh-key"]
    return request_head(request.method, _target(request.url), _host(request.url), request.headers.raw, length)


class _Unanswered(Exception):
    """A pooled connection the server had closed: the request never reached it (send it again)."""


class ZeroCopyTransport(httpx.BaseTransport):
    def __init__(self, retries: int = 2) -> None:
        self.retries = retries
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._fallback: httpx.HTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.HTTPTransport(retries=self.retries)
            return self._fallback.handle_request(request)
        parts, length = _parts(request)
        head = request_head(request.method, _target(request.url), _host(request.url), request.headers.raw, length)
        timeouts = _timeouts(request)
        key = (request.url.host, request.url.port or 80)
        for _ in range(2):
            sock, pooled = self._acquire(key, timeouts.get("connect"), request)
            try:
                reader = self._exchange(sock, [head, *parts], request, timeouts, pooled)
            except _Unanswered:
                sock.close()
                head = _resent(request, length)
                continue
            except BaseException:
                sock.close()
                raise
            assert reader.head is not None
            if reader.head.keep_alive:
                with self._lock:
                    self._idle.setdefault(key, []).append(sock)
            else:
                sock.close()
            return _response(request, reader)
        raise httpx.RemoteProtocolError("the server closed the connection twice without answering", request=request)

    def _acquire(
        self, key: tuple[str, int], timeout: float | None, request: httpx.Request
    ) -> tuple[socket.socket, bool]:
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                sock = idle.pop()
                if not _gone(sock):
                    return sock, True
                sock.close()
        for attempt in range(self.retries + 1):
            try:
                sock = socket.create_connection(key, timeout=timeout)
            except OSError as exc:
                if attempt == self.retries:
                    raise _error(exc, "connect", request) from exc
                time.sleep(_CONNECT_BACKOFF * 2**attempt)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, False
        raise AssertionError("unreachable")

    def _exchange(
        self,
        sock: socket.socket,
        buffers: list[Buffer],
        request: httpx.Request,
        timeouts: dict[str, float | None],
        pooled: bool,
    ) -> ResponseReader:
        sock.settimeout(timeouts.get("write"))
        views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
        try:
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            if pooled and isinstance(exc, BrokenPipeError | ConnectionResetError):
                raise _Unanswered from exc
            raise _error(exc, "write", request) from exc
        sock.settimeout(timeouts.get("read"))
        reader = ResponseReader(request.method)
        chunk = bytearray(64 * 1024)
        try:
            while reader.head is None:
                n = sock.recv_into(chunk)
                if n == 0 and pooled and not reader.head_buf:
                    raise _Unanswered
                if n == 0:
                    raise ProtocolError("the server closed the connection without a complete response head")
                reader.feed_head(memoryview(chunk)[:n])
            while not reader.done:
                into = reader.into()
                reader.got(sock.recv_into(into))
        except ConnectionResetError as exc:
            if pooled and not reader.head_buf:
                raise _Unanswered from exc
            raise _error(exc, "read", request) from exc
        except (OSError, ProtocolError) as exc:
            raise _error(exc, "read", request) from exc
        return reader

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for sock in socks:
                    sock.close()
            self._idle.clear()
        if self._fallback is not None:
            self._fallback.close()


class AsyncZeroCopyTransport(httpx.AsyncBaseTransport):
    """The same for :class:`~momentum_client.AsyncClient`, on asyncio's socket operations."""

    def __init__(self, retries: int = 2) -> None:
        self.retries = retries
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._fallback: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(retries=self.retries)
            return await self._fallback.handle_async_request(request)
        if PARTS in request.extensions:
            parts: Sequence[Buffer] = request.extensions[PARTS]
        else:
            body = await request.aread()
            parts = (body,) if body else ()
        length = sum(memoryview(p).nbytes for p in parts)
        head = request_head(request.method, _target(request.url), _host(request.url), request.headers.raw, length)
        timeouts = _timeouts(request)
        key = (request.url.host, request.url.port or 80)
        for _ in range(2):
            sock, pooled = await self._acquire(key, timeouts.get("connect"), request)
            try:
                reader = await self._exchange(sock, [head, *parts], request, timeouts, pooled)
            except _Unanswered:
                sock.close()
                head = _resent(request, length)
                continue
            except BaseException:
                sock.close()
                raise
            assert reader.head is not None
            if reader.head.keep_alive:
                self._idle.setdefault(key, []).append(sock)
            else:
                sock.close()
            return _response(request, reader)
        raise httpx.RemoteProtocolError("the server closed the connection twice without answering", request=request)

    async def _acquire(
        self, key: tuple[str, int], connect_timeout: float | None, request: httpx.Request
    ) -> tuple[socket.socket, bool]:
        idle = self._idle.get(key, [])
        while idle:
            pooled = idle.pop()
            if not _gone(pooled):
                return pooled, True
            pooled.close()
        loop = asyncio.get_running_loop()
        for attempt in range(self.retries + 1):
            sock: socket.socket | None = None
            try:
                async with asyncio.timeout(connect_timeout):
                    infos = await loop.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
                    family, kind, proto, _, address = infos[0]
                    sock = socket.socket(family, kind, proto)
                    sock.setblocking(False)
                    await loop.sock_connect(sock, address)
            except (OSError, TimeoutError) as exc:
                if sock is not None:
                    sock.close()
                if attempt == self.retries:
                    raise _error(exc, "connect", request) from exc
                await asyncio.sleep(_CONNECT_BACKOFF * 2**attempt)
                continue
            assert sock is not None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, False
        raise AssertionError("unreachable")

    async def _exchange(
        self,
        sock: socket.socket,
        buffers: list[Buffer],
        request: httpx.Request,
        timeouts: dict[str, float | None],
        pooled: bool,
    ) -> ResponseReader:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeouts.get("write")):
                for buffer in buffers:
                    if memoryview(buffer).nbytes:
                        await loop.sock_sendall(sock, buffer)
        except (OSError, TimeoutError) as exc:
            if pooled and isinstance(exc, BrokenPipeError | ConnectionResetError):
                raise _Unanswered from exc
            raise _error(exc, "write", request) from exc
        reader = ResponseReader(request.method)
        chunk = bytearray(64 * 1024)
        read_timeout = timeouts.get("read")
        try:
            while reader.head is None:
                async with asyncio.timeout(read_timeout):
                    n = await loop.sock_recv_into(sock, chunk)
                if n == 0 and pooled and not reader.head_buf:
                    raise _Unanswered
                if n == 0:
                    raise ProtocolError("the server closed the connection without a complete response head")
                reader.feed_head(memoryview(chunk)[:n])
            while not reader.done:
                async with asyncio.timeout(read_timeout):
                    reader.got(await loop.sock_recv_into(sock, reader.into()))
        except ConnectionResetError as exc:
            if pooled and not reader.head_buf:
                raise _Unanswered from exc
            raise _error(exc, "read", request) from exc
        except (OSError, TimeoutError, ProtocolError) as exc:
            raise _error(exc, "read", request) from exc
        return reader

    async def aclose(self) -> None:
        for socks in self._idle.values():
            for sock in socks:
                sock.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()


def proxied(url: str) -> bool:
    """Whether the environment routes ``url`` through a proxy (``HTTP_PROXY``/``ALL_PROXY``, unless
    ``NO_PROXY`` names the host), which httpx's client, not these transports, must handle."""
    split = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(split.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(split.hostname or "")


__all__ = ["BODY", "PARTS", "AsyncZeroCopyTransport", "Body", "ZeroCopyTransport", "proxied"]
