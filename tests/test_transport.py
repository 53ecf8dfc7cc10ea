"""The SDK's own HTTP transports (sync and async) and what a step's bytes cost on each side.

Against a real server process: every call of both clients over both wires, one kept-alive
connection reused, and the memory a 1M-float step takes: in the SDK (tracemalloc) and in the
server (its peak RSS), a small multiple of the tensor, where httpx's own transport and the old
server copied the body several times. Against canned answers from a socket: chunked bodies,
``Connection: close``, a kept-alive connection the server closed meanwhile, a server that never
answers, one that is not there, and answers that are not HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_client._transport import AsyncZeroCopyTransport, ZeroCopyTransport
from momentum_service.kernels import SGDConfig, sgd_update

from .helpers import Api, ServerProcess, free_port

N = 1 << 20  # a 1M-float tensor: 4 MB each way


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(env={"MOMENTUM_LOG_LEVEL": "warning"}).start()
    yield proc
    proc.stop()


@contextlib.asynccontextmanager
async def _client(kind: str, url: str, wire: str = "safetensors", **options: Any) -> AsyncIterator[Api]:
    if kind == "sync":
        with mc.Client(url, wire=wire, **options) as c:
            yield Api(c)
    else:
        async with mc.AsyncClient(url, wire=wire, **options) as ac:
            yield Api(ac)


@pytest.mark.parametrize("wire", ["safetensors", "json"])
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_call_over_the_transport(server: ServerProcess, kind: str, wire: str) -> None:
    model = f"t-{kind}-{wire}"
    async with _client(kind, server.url, wire) as api:
        await api("create_model", model, lr=0.1, momentum=0.9, exist_ok=True)
        value = np.linspace(-1, 1, N if wire == "safetensors" else 1000, dtype=np.float32)
        await api("init_params", model, {"w": value, "b": np.float64(0.5)})
        grad = np.full(value.shape, 0.25, np.float32)
        cfg = SGDConfig(lr=0.1, momentum=0.9)
        want, velocity = value, None
        for _ in range(3):
            got = await api("step", model, {"w": grad})
            want, velocity = sgd_update(cfg, want, velocity, grad)
            assert got["w"].tobytes() == want.tobytes()
        assert got["w"].flags.writeable  # a view of the answer's buffer, the caller's to use
        state = await api("get_param_state", model, "w")
        assert state.step == 3 and state.velocity is not None and state.velocity.tobytes() == velocity.tobytes()
        params = await api("get_params", model)
        assert params["b"].shape == () and float(params["b"]) == 0.5
        assert (await api("get_model", model)).params["w"].step == 3
        await api("delete_param", model, "b")
        await api("delete_model", model)
        with pytest.raises(mc.NotFound):
            await api("get_model", model)
        transport = api.client._http._transport
        assert isinstance(transport, ZeroCopyTransport | AsyncZeroCopyTransport)
        assert sum(len(s) for s in transport._idle.values()) == 1  # one connection, kept alive throughout


def test_a_step_costs_the_sdk_no_copy_of_its_tensors(server: ServerProcess) -> None:
    """tracemalloc in the worker: the request's parts are the gradient's own buffer, and the answer
    lands in one recycled buffer. httpx's transport, in the same step, allocates several copies."""
    grad = np.full(N, 0.5, np.float32)
    tensor = grad.nbytes

    def peak(client: mc.Client) -> int:
        client.create_model("copies", lr=0.1, exist_ok=True)
        client.init_params("copies", {"w": np.zeros(N, np.float32)})
        for _ in range(3):  # warm: connections, the pool's buffers
            client.step("copies", {"w": grad})
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        result = client.step("copies", {"w": grad})
        top = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert result["w"].shape == (N,)
        client.delete_model("copies")
        return top

    with mc.Client(server.url) as ours:
        ours_peak = peak(ours)
    with mc.Client(server.url, transport=httpx.HTTPTransport()) as theirs:
        theirs_peak = peak(theirs)
    assert ours_peak < 0.25 * tensor, ours_peak  # headers and bookkeeping only
    assert theirs_peak > 2 * tensor, theirs_peak  # the negative control: body copies on both ways


def test_a_step_costs_the_server_a_small_multiple_of_its_tensors(server: ServerProcess) -> None:
    """The server's peak RSS over 20 steps of 4 MB each way, after a warm-up: the body is read once
    into a recycled buffer, the outputs go to recycled arrays, the answer is sent from them."""
    assert server.proc is not None
    pid = server.proc.pid
    with mc.Client(server.url) as client:
        client.create_model("rss", lr=0.1, momentum=0.9, exist_ok=True)
        client.init_params("rss", {"w": np.zeros(N, np.float32)})
        grad = np.full(N, 0.5, np.float32)
        for _ in range(5):
            client.step("rss", {"w": grad})
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            pytest.skip("this kernel does not reset the peak RSS")
        start = _status(pid)["VmRSS"]
        for _ in range(20):
            client.step("rss", {"w": grad})
        peak = _status(pid)["VmHWM"] - start
        client.delete_model("rss")
    assert peak < 3 * (grad.nbytes >> 10), f"peak +{peak} KiB over 20 steps"


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


# -- canned answers --------------------------------------------------------------------------------

Handler = Callable[[socket.socket, int], None]


class Canned:
    """A socket server on a free port: ``handler(connection, index)`` answers each connection."""

    def __init__(self, handler: Handler) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.handler, args=(conn, self.connections), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = (h.partition(b":") for h in head.split(b"\r\n"))
    length = next((int(v) for k, _, v in fields if k.lower() == b"content-length"), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head


MODEL_JSON = (
    b'{"name":"m","optimizer":{"rule":"pytorch","lr":0.1,"momentum":0.0,"dampening":0.0,"nesterov":false,'
    b'"weight_decay":0.0,"maximize":false},"schedule":{"type":"constant"},"mode":"async","params":{}}'
)


def _chunked(conn: socket.socket, _: int) -> None:
    with conn:
        while _read_request(conn):
            pieces = [MODEL_JSON[i : i + 7] for i in range(0, len(MODEL_JSON), 7)]
            body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nx-trailer: 1\r\n\r\n"
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            conn.sendall(head + body)


def _close_each(conn: socket.socket, _: int) -> None:
    with conn:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + MODEL_JSON)


def _close_when_idle(conn: socket.socket, _: int) -> None:
    """Answers one request, then closes the kept-alive connection (as a server's idle timeout does)."""
    with conn:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(MODEL_JSON), MODEL_JSON))
        time.sleep(0.05)


def _silent(conn: socket.socket, _: int) -> None:
    with conn:
        _read_request(conn)
        time.sleep(3)


def _not_http(conn: socket.socket, _: int) -> None:
    with conn:
        _read_request(conn)
        conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n\r\n")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_chunked_answers_and_closing_servers(kind: str) -> None:
    for handler, connections in ((_chunked, 1), (_close_each, 3), (_close_when_idle, 3)):
        canned = Canned(handler)
        try:
            async with _client(kind, canned.url, "safetensors") as api:
                for _ in range(3):
                    info = await api("get_model", "m")
                    assert info.name == "m" and info.optimizer.lr == 0.1
                    await asyncio.sleep(0.1)  # _close_when_idle closes meanwhile: the next call reconnects
            assert canned.connections == connections, handler.__name__
        finally:
            canned.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_no_answer_a_missing_server_and_an_answer_that_is_not_http(kind: str) -> None:
    silent = Canned(_silent)
    garbage = Canned(_not_http)
    try:
        async with _client(kind, silent.url, timeout=0.5) as api:
            t = time.monotonic()
            with pytest.raises(mc.RequestTimeout):
                await api("get_model", "m")
            assert time.monotonic() - t < 2
        for url in (f"http://127.0.0.1:{free_port()}", garbage.url):
            async with _client(kind, url, timeout=2) as api:
                with pytest.raises(mc.TransportError):
                    await api("get_model", "m")
    finally:
        silent.close()
        garbage.close()


# -- how a body may arrive ----------------------------------------------------------------------------


def _raw_step(port: int, head: bytes, pieces: list[bytes], pause: float = 0.0) -> tuple[int, bytes]:
    """Send a step's head and body pieces one by one (``pause`` between), then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(piece)
            if pause:
                time.sleep(pause)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(
                v for k, _, v in (h.partition(b":") for h in head_part.split(b"\r\n")) if k.lower() == b"content-length"
            )
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        return int(head_part.split()[1]), rest


def test_a_body_chunked_byte_by_byte_or_cut_short(server: ServerProcess) -> None:
    """The same step sent whole, chunked, and one byte per write: the same answers; cut short: no change."""
    body = b'{"gradients":{"w":{"shape":[2],"dtype":"float32","data":[0.5,0.5]}}}'
    with mc.Client(server.url) as client:
        client.create_model("arrive", lr=0.1, exist_ok=True)
        client.init_params("arrive", {"w": np.zeros(2, np.float32)})
        path = b"POST /v1/models/arrive/step HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        answers = []
        whole = path + b"content-length: %d\r\n\r\n" % len(body)
        answers.append(_raw_step(server.port, whole, [body]))
        chunks = [b"%x\r\n%s\r\n" % (len(body[i : i + 5]), body[i : i + 5]) for i in range(0, len(body), 5)] + [
            b"0\r\n\r\n"
        ]
        answers.append(_raw_step(server.port, path + b"transfer-encoding: chunked\r\n\r\n", chunks))
        answers.append(_raw_step(server.port, whole, [body[i : i + 1] for i in range(len(body))], pause=0.001))
        steps = [json.loads(content)["params"]["w"]["step"] for status, content in answers if status == 200]
        assert steps == [1, 2, 3], answers
        # Cut short: the client leaves after half its body; nothing is applied, and the server carries on.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(whole + body[: len(body) // 2])
        time.sleep(0.3)
        assert client.get_param_state("arrive", "w").step == 3
        assert "Traceback" not in server.log()
        client.delete_model("arrive")


def test_a_proxied_url_goes_through_the_httpx_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK calls its transport directly only where no proxy of the environment applies."""
    from momentum_client._transport import proxied

    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not proxied("http://10.0.0.5:8000")
    with mc.Client("http://10.0.0.5:8000") as direct:
        assert direct._direct is not None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert proxied("http://10.0.0.5:8000")
    with mc.Client("http://10.0.0.5:8000") as through:
        assert through._direct is None  # httpx.Client.send, which routes through the proxy
    monkeypatch.setenv("NO_PROXY", "10.0.0.5")
    assert not proxied("http://10.0.0.5:8000")
