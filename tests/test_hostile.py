"""Hostile input against a real server process (Redis store, API keys, an admin key).

Every hostile request must get a 4xx ``application/problem+json`` answer (never a 5xx, never a
hang: every client call has a timeout), must change nothing (the models, their parameters and
velocities as read through the API, and every Redis key of the server's prefix, compared before
and after each case), and the server's memory must stay bounded: its RSS is read from
``/proc/<pid>/status`` before and after the whole battery (``RSS_GROWTH_BOUND_MB``), and the peak
(VmHWM, reset through ``/proc/<pid>/clear_refs``) around the 200 MB bodies and the oversized head.

The safetensors bodies of tests/test_wire.py (``HOSTILE``, run there in-process) are sent here
over real HTTP too, with more of them: non-finite half-precision data, huge and deep headers,
duplicate names, more tensors than allowed, every truncation of a valid body.

The last test caps concurrent requests at 4 on a second server whose Redis is frozen (SIGSTOP):
the 5th and later requests get 503 with Retry-After at once, and the 4 stuck ones a 503 within
about 3 x ``MOMENTUM_REDIS_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import safetensors.numpy
from momentum_service.auth import hash_key, new_key

from .helpers import RedisProcess, ServerProcess
from .test_wire import GOOD, HOSTILE, STEP_METADATA

KEY = new_key()
AUTH = {"authorization": f"Bearer {KEY}"}
PREFIX = "hostile"
MAX_PARAMS = 64  # MOMENTUM_MAX_PARAMS_PER_REQUEST for the battery (the default is 10,000)
MAX_DEPTH = 32  # the default MOMENTUM_MAX_JSON_DEPTH
MAX_BODY = 64 * 1024 * 1024  # the default MOMENTUM_MAX_BODY_BYTES
MAX_HEAD = 1 << 20  # momentum_service.cli.MAX_HEAD_BYTES
TIMEOUT = httpx.Timeout(20.0)

# The documented bound: RSS growth of the server over the whole battery. Measured: about 65 MB,
# the 64 MiB read of a chunked body before its 413, which glibc keeps mapped for reuse (the peak
# of each large body is asserted separately below).
RSS_GROWTH_BOUND_MB = 150

PROBLEM = "application/problem+json"
JSON = "application/json"
ST = "application/x-safetensors"

STEP = ("POST", "/v1/models/m/step")
PARAMS = ("PUT", "/v1/models/m/params")
PARAM = ("PUT", "/v1/models/m/params/w")
MODEL = ("PUT", "/v1/models/m")
NEW_MODEL = ("PUT", "/v1/models/new")
PATCH = ("PATCH", "/v1/models/m")
TENSOR_ENDPOINTS = (STEP, PARAMS, PARAM)
MODEL_ENDPOINTS = (MODEL, NEW_MODEL, PATCH)
JSON_ENDPOINTS = TENSOR_ENDPOINTS + MODEL_ENDPOINTS

MEASURED: dict[str, str] = {}  # printed at the end of the battery, for the README


# --------------------------------------------------------------------------------------------
# The live server
# --------------------------------------------------------------------------------------------


@dataclass
class Live:
    server: ServerProcess
    redis: RedisProcess
    api: httpx.Client
    store: redis.Redis
    baseline: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the server process, in KiB."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
        return out

    def reset_peak(self) -> bool:
        """Set VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def snapshot(self) -> dict[str, Any]:
        """The state as the API shows it, and every Redis key of the prefix with its content (but the
        leases and the replicas' heartbeats, which change as time passes, and the training series, whose
        points of earlier steps are written in the background)."""
        state: dict[str, Any] = {}
        for model in ("m", "s"):
            state[f"{model} model"] = self.api.get(f"/v1/models/{model}").json()
            state[f"{model} params"] = self.api.get(f"/v1/models/{model}/params", params={"include": "velocity"}).json()
        state["new"] = self.api.get("/v1/models/new").status_code
        keys: dict[bytes, Any] = {}
        for key in self.store.scan_iter(match=f"{PREFIX}:*", count=1000):
            if key.endswith((b":lease", b":points")) or b"{replicas}" in key:
                continue  # the training series' points are appended in the background, from earlier steps
            kind = self.store.type(key)
            if kind == b"string":
                keys[key] = self.store.get(key)
            elif kind == b"hash":
                keys[key] = self.store.hgetall(key)
            elif kind == b"zset":
                keys[key] = self.store.zrange(key, 0, -1, withscores=True)
            else:
                keys[key] = self.store.smembers(key)
        state["redis"] = keys
        state["redis other"] = sorted(k for k in self.store.scan_iter(count=1000) if not k.startswith(b"hostile:"))
        return state


def tensor(shape: list[int], data: str, dtype: str = "float32") -> str:
    return f'{{"shape":{json.dumps(shape)},"dtype":"{dtype}","data":[{data}]}}'


W = tensor([2, 3], "0.5,0.5,0.5,0.5,0.5,0.5")  # a valid gradient or value for m.w


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    redis_proc = RedisProcess(directory=str(tmp_path_factory.mktemp("redis"))).start()
    env = {
        "MOMENTUM_API_KEYS": f"{hash_key(KEY)} admin:*",
        "MOMENTUM_MAX_PARAMS_PER_REQUEST": str(MAX_PARAMS),
        "MOMENTUM_REDIS_PREFIX": PREFIX,
        "MOMENTUM_LOG_LEVEL": "info",
    }
    server = ServerProcess(redis_url=redis_proc.url, env=env).start()
    api = httpx.Client(base_url=server.url, headers=AUTH, timeout=TIMEOUT)
    live = Live(server, redis_proc, api, redis_proc.client())
    try:
        opt = {"optimizer": {"lr": 0.1, "momentum": 0.9}}
        assert api.put("/v1/models/m", json=opt).status_code == 201
        w = {"shape": [2, 3], "dtype": "float32", "data": [1, 2, 3, 4, 5, 6]}
        b = {"shape": [4], "dtype": "float64", "data": [0.25, 0.5, 0.75, 1.0]}
        assert api.put("/v1/models/m/params", json={"params": {"w": w, "b": b}}).status_code == 201
        assert api.put("/v1/models/s", json={**opt, "mode": "sync", "workers": 2}).status_code == 201
        assert api.put("/v1/models/s/params/w", json=w).status_code == 201
        # Warm every code path (imports, first Redis connections, script loading) before the baseline.
        for _ in range(3):
            r = api.post("/v1/models/m/step", content=f'{{"gradients":{{"w":{W}}}}}', headers={"content-type": JSON})
            assert r.status_code == 200, r.text
            body = safetensors.numpy.save({"b": np.ones(4)})
            assert api.post("/v1/models/m/step", content=body, headers={"content-type": ST}).status_code == 200
            assert api.post("/v1/models/m/step", content=b"{", headers={"content-type": JSON}).status_code == 422
        live.baseline = live.memory()
        yield live
    finally:
        api.close()
        live.store.close()
        server.stop()
        redis_proc.stop()


def assert_problem(r: httpx.Response, expected: Iterable[int] = ()) -> dict[str, Any]:
    """A 4xx problem+json (of one of the ``expected`` statuses, when given)."""
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    allowed = set(expected)
    assert not allowed or r.status_code in allowed, f"{r.status_code} not in {allowed}: {r.text[:500]}"
    assert r.headers["content-type"] == PROBLEM, r.headers
    body = r.json()
    assert body["status"] == r.status_code and body["detail"]
    assert body["type"].startswith("urn:momentum-service:problem:")
    return body


# --------------------------------------------------------------------------------------------
# First (before the battery grows the heap, so that the peak is measured from a small one):
# bodies too large, streamed; lying Content-Length; an endless head
# --------------------------------------------------------------------------------------------

BIG = 200 * 1024 * 1024
CHUNK = b"0" * (1 << 20)


def _big_body(sent: list[int]) -> Iterator[bytes]:
    for _ in range(BIG // len(CHUNK)):
        sent[0] += len(CHUNK)
        yield CHUNK


@pytest.mark.parametrize(
    ("label", "ctype", "declared"),
    [
        ("JSON, Content-Length", JSON, True),
        ("safetensors, Content-Length", ST, True),
        ("JSON, chunked", JSON, False),
        ("safetensors, chunked", ST, False),
    ],
)
def test_a_200_mb_body_gets_413_without_being_read(live: Live, label: str, ctype: str, declared: bool) -> None:
    before = live.snapshot()
    peak_measured = live.reset_peak()
    start = live.memory()
    sent = [0]
    headers = {"content-type": ctype, **({"content-length": str(BIG)} if declared else {})}
    t = time.monotonic()
    try:
        r = live.api.post("/v1/models/m/step", content=_big_body(sent), headers=headers)
    except httpx.TransportError as exc:  # the server may close while the client still writes
        pytest.fail(f"no answer: {exc!r} after {sent[0] >> 20} MB")
    elapsed = time.monotonic() - t
    body = assert_problem(r, [413])
    assert body["limit"] == MAX_BODY
    assert elapsed < 10, elapsed
    peak = (live.memory()["VmHWM"] - start["VmRSS"]) >> 10
    MEASURED[f"200 MB body, {label}"] = (
        f"413 in {elapsed:.2f} s after the client wrote {sent[0] >> 20} MB; peak RSS +{peak} MB"
        if peak_measured
        else f"413 in {elapsed:.2f} s after the client wrote {sent[0] >> 20} MB"
    )
    if peak_measured:
        # With a Content-Length the 413 comes before any byte is read; without one, the body is read
        # up to the 64 MiB limit, never past it.
        assert peak < (16 if declared else (MAX_BODY >> 20) + 48), MEASURED[f"200 MB body, {label}"]
    assert live.snapshot() == before


def raw_exchange(port: int, parts: Iterable[bytes], *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as given (no client-side HTTP checks), stop writing once the server answers, and
    read until it closes the connection or ``timeout`` passes. (bytes written, bytes received)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent, received = 0, b""
    try:
        for part in parts:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(part)
            except OSError:
                break
            sent += len(part)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([sock], [], [], 0.2)[0]:
                if received and _complete(received):
                    break
                continue
            try:
                data = sock.recv(1 << 16)
            except OSError:
                break
            if not data:
                break
            received += data
    finally:
        sock.close()
    return sent, received


def _complete(data: bytes) -> bool:
    try:
        responses = parse_responses(data)
    except ValueError:
        return False
    return bool(responses)


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in ``data`` (each with a Content-Length), in order."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("incomplete head")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            raise ValueError("incomplete body")
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", f"authorization: Bearer {KEY}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


STEP_BODY = f'{{"gradients":{{"w":{W}}}}}'.encode()


@pytest.mark.parametrize(
    ("label", "head", "body"),
    [
        # Content-Length smaller than the body: the server reads a truncated (invalid) body and
        # then the rest as the next request, which it refuses with a 400 problem+json.
        ("Content-Length smaller", {"content-type": JSON, "content-length": "10"}, STEP_BODY),
        ("Content-Length 0", {"content-type": JSON, "content-length": "0"}, STEP_BODY),
        ("Content-Length not a number", {"content-type": JSON, "content-length": "ten"}, STEP_BODY),
        ("Content-Length negative", {"content-type": JSON, "content-length": "-5"}, STEP_BODY),
        ("Content-Length 10^30", {"content-type": JSON, "content-length": "1" + "0" * 30}, STEP_BODY),
        (
            "Content-Length and chunked (smuggling)",
            {"content-type": JSON, "content-length": "4", "transfer-encoding": "chunked"},
            b"0\r\n\r\n" + STEP_BODY,
        ),
        ("chunk size lies", {"content-type": JSON, "transfer-encoding": "chunked"}, b"ffff\r\n{}\r\n0\r\n\r\n"),
    ],
)
def test_lying_framing_gets_4xx_and_changes_nothing(live: Live, label: str, head: dict[str, str], body: bytes) -> None:
    before = live.snapshot()
    _, received = raw_exchange(live.server.port, [request_head("POST", "/v1/models/m/step", head), body], timeout=1.5)
    responses = parse_responses(received)
    statuses = [status for status, _, _ in responses]
    if label != "chunk size lies":  # that one waits for the promised bytes, like a larger Content-Length
        assert statuses, f"no answer to {label}"
    assert all(400 <= s < 500 for s in statuses), statuses
    for status, headers, content in responses:  # the HTTP parser's refusals too are problem+json
        assert headers.get("content-type") == PROBLEM and json.loads(content)["status"] == status
    assert live.snapshot() == before


def test_a_body_shorter_than_its_content_length_waits_then_leaves_no_trace(live: Live) -> None:
    """The server waits for the promised bytes (correctly: there is no answer to give yet); when the
    client gives up and closes, the request ends quietly: no 5xx, no traceback in the log."""
    before = live.snapshot()
    log_before = live.server.log()
    head = request_head(
        "POST", "/v1/models/m/step", {"content-type": JSON, "content-length": str(len(STEP_BODY) + 100)}
    )
    t = time.monotonic()
    sent, received = raw_exchange(live.server.port, [head, STEP_BODY], timeout=1.0)
    assert received == b"" and time.monotonic() - t >= 1.0
    assert sent == len(head) + len(STEP_BODY)
    wait_for_log_quiet(live)
    assert live.snapshot() == before
    new_log = live.server.log()[len(log_before) :]
    assert "Traceback" not in new_log and "ERROR" not in new_log, new_log[-3000:]


def wait_for_log_quiet(live: Live) -> None:
    """Give the server a moment to notice the disconnect (and, before the fix, to log it)."""
    time.sleep(0.3)
    assert live.api.get("/healthz").status_code == 200


def test_an_endless_head_gets_431_without_being_buffered(live: Live) -> None:
    """httptools buffers headers of any length; the server caps the request head at 1 MiB."""
    peak_measured = live.reset_peak()
    start = live.memory()
    chunk = b"x" * (1 << 20)
    head = b"GET /v1/models/m HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: "
    t = time.monotonic()
    sent, received = raw_exchange(live.server.port, [head, *([chunk] * 200), b"\r\n\r\n"])
    elapsed = time.monotonic() - t
    [(status, headers, content)] = parse_responses(received)
    assert status == 431 and headers["content-type"] == PROBLEM and json.loads(content)["status"] == 431
    assert sent < 64 << 20 and elapsed < 5
    peak = (live.memory()["VmHWM"] - start["VmRSS"]) >> 10
    MEASURED["200 MB header"] = f"431 in {elapsed:.2f} s after the client wrote {sent >> 20} MB; peak RSS +{peak} MB"
    if peak_measured:
        assert peak < 16, MEASURED["200 MB header"]
    # A long but reasonable head is fine; so is a long URL under the cap.
    assert live.api.get("/v1/models/m", headers={"x-pad": "y" * 100_000}).status_code == 200
    names = ",".join(f"n{i}" for i in range(MAX_PARAMS))
    r = live.api.get("/v1/models/m/params", params={"names": names})
    assert_problem(r, [404])  # param-not-found: the names were read and looked up
    r = live.api.get("/v1/models/m/params", params={"names": names + ",one-more"})
    assert assert_problem(r, [413])["limit"] == MAX_PARAMS  # every list of names has the request's limit
    # httptools cannot parse a URL over 64 KiB (a 400); past 1 MiB, the head cap. Both problem+json.
    for size, expected in ((100_000, 400), (2 * MAX_HEAD, 431)):
        head = request_head("GET", "/v1/models/m/params?names=" + "n," * (size // 2), {})
        _, received = raw_exchange(live.server.port, [head], timeout=10)
        [(status, headers, content)] = parse_responses(received)
        assert status == expected and headers["content-type"] == PROBLEM and json.loads(content)["status"] == status


# --------------------------------------------------------------------------------------------
# The battery: (endpoint, body, content type) -> 4xx problem, nothing changed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    content: bytes
    headers: dict[str, str]
    expect: frozenset[int] = frozenset()  # empty: any 4xx


CASES: list[Case] = []


def add(
    name: str,
    endpoints: Iterable[tuple[str, str]],
    body: bytes | str | Callable[[tuple[str, str]], bytes | str],
    content_type: str | None = JSON,
    expect: Iterable[int] = (),
    headers: dict[str, str] | None = None,
) -> None:
    for endpoint in endpoints:
        method, path = endpoint
        raw = body(endpoint) if callable(body) else body
        content = raw.encode() if isinstance(raw, str) else raw
        hdrs = {**({"content-type": content_type} if content_type is not None else {}), **(headers or {})}
        CASES.append(Case(f"{name} -> {method} {path}", method, path, content, hdrs, frozenset(expect)))


def wrap(t: str) -> Callable[[tuple[str, str]], str]:
    """The body that carries tensor ``t`` as parameter w, on each tensor endpoint."""

    def body(endpoint: tuple[str, str]) -> str:
        return {STEP: f'{{"gradients":{{"w":{t}}}}}', PARAMS: f'{{"params":{{"w":{t}}}}}', PARAM: t}[endpoint]

    return body


def hyper(fields: str) -> Callable[[tuple[str, str]], str]:
    """A model body whose optimizer holds ``fields`` (a fragment of JSON text)."""

    def body(endpoint: tuple[str, str]) -> str:
        return f'{{"optimizer":{{{fields}}}}}'

    return body


def nested(depth: int, kind: str = "list") -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


DIGITS = "9" * 5000
SIX = "0.5,0.5,0.5,0.5,0.5"

# -- NaN / Infinity / overflowing numbers in tensor data (orjson refuses them; 1e39 overflows float32)
for label, bad in [
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
    ("-Infinity", "-Infinity"),
    ("1e400", "1e400"),
    ("-1e400", "-1e400"),
    ("float32 overflow 1e39", "1e39"),
    ("5,000-digit integer", DIGITS),
    ("5,000-digit float", f"{DIGITS}.5"),
    ("5,000-digit negative integer", f"-{DIGITS}"),
    ("string", '"0.5"'),
    ("null", "null"),
    ("true", "true"),
]:
    add(f"data {label}", TENSOR_ENDPOINTS, wrap(tensor([2, 3], f"{bad},{SIX}")), expect=[422])

# -- huge or malformed declared shapes (nothing may be allocated for them)
for label, shape, expect in [
    ("[2^40, 2^40]", [2**40, 2**40], [413]),
    ("[2^31]*8", [2**31] * 8, [413]),
    ("33 dimensions", [1] * 33, [422]),
    ("1000 dimensions", [1] * 1000, [422]),
    ("[2^70] (past int64)", [2**70], [422]),
    ("[-1]", [-1], [422]),
    ("[2^63-1]", [2**63 - 1], [413]),
]:
    add(f"shape {label}", TENSOR_ENDPOINTS, wrap(tensor(shape, "0.5")), expect=expect)
add("shape 5,000-digit", TENSOR_ENDPOINTS, wrap(f'{{"shape":[{DIGITS}],"dtype":"float32","data":[0.5]}}'), expect=[422])
add("shape [1e30]", TENSOR_ENDPOINTS, wrap('{"shape":[1e30],"dtype":"float32","data":[0.5]}'), expect=[413, 422])
add("shape float", TENSOR_ENDPOINTS, wrap('{"shape":[6.0],"dtype":"float32","data":[0.5]}'), expect=[422])
add("data/shape mismatch", TENSOR_ENDPOINTS, wrap(tensor([2, 3], "0.5")), expect=[422])
add("dtype int64", TENSOR_ENDPOINTS, wrap(tensor([2, 3], f"1,{SIX}", "int64")), expect=[422])
add("data a string", TENSOR_ENDPOINTS, wrap('{"shape":[2,3],"dtype":"float32","data":"AAAA"}'), expect=[422])
add("tensor extra field", TENSOR_ENDPOINTS, wrap(f'{{"shape":[1],"dtype":"float32","data":[1],"x":{W}}}'), expect=[422])

# -- nesting: 100k deep (orjson's own limit), just above max_json_depth, and hidden in tensor data
for kind in ("list", "object"):
    add(f"100k-deep {kind}", JSON_ENDPOINTS, nested(100_000, kind), expect=[422])
    add(f"depth {MAX_DEPTH + 1} {kind}", JSON_ENDPOINTS, nested(MAX_DEPTH + 1, kind), expect=[422])
add(
    f"data nested {MAX_DEPTH + 8} deep",
    TENSOR_ENDPOINTS,
    wrap(tensor([1], nested(MAX_DEPTH + 8))),
    expect=[422],
)
# A list whose first element is a number is a tensor's data, a leaf the depth check skips; what
# hides behind the number is still refused, by the schema (data: list[float]).
add("nesting behind a number", TENSOR_ENDPOINTS, wrap(tensor([2], f"0.5,{nested(900)}")), expect=[422])
add(
    "deep schedule",
    MODEL_ENDPOINTS,
    '{"optimizer":{"lr":0.1},"schedule":' + '{"type":"sequential","schedulers":[' * 40 + "]}" * 40 + "}",
    expect=[422],
)

# -- hyperparameters: non-finite, 5,000 digits, wrong types
for label, fields in [
    ("lr NaN", '"lr":NaN'),
    ("lr Infinity", '"lr":Infinity'),
    ("lr -Infinity", '"lr":-Infinity'),
    ("lr 1e400", '"lr":1e400'),
    ("lr 5,000-digit integer", f'"lr":{DIGITS}'),
    ("lr 5,000-digit float", f'"lr":{DIGITS}.5'),
    ("lr negative", '"lr":-0.1'),
    ("lr a string", '"lr":"0.1"'),
    ("lr a list", '"lr":[0.1]'),
    ("momentum NaN", '"lr":0.1,"momentum":NaN'),
    ("momentum 5,000 digits", f'"lr":0.1,"momentum":{DIGITS}'),
    ("unknown rule", '"lr":0.1,"rule":"adam"'),
    ("unknown field", '"lr":0.1,"betas":[0.9,0.99]'),
]:
    add(f"hyperparameter {label}", MODEL_ENDPOINTS, hyper(fields), expect=[409, 422])
for label, schedule in [
    ("step_size 5,000 digits", f'{{"type":"step","step_size":{DIGITS}}}'),
    ("step_size 2^64", '{"type":"step","step_size":18446744073709551616}'),
    ("gamma NaN", '{"type":"exponential","gamma":NaN}'),
    ("T_max 1e400", '{"type":"cosine","T_max":1e400}'),
    ("step_size 1e30", '{"type":"step","step_size":1e30}'),
    ("total_iters 2^63", '{"type":"linear","total_iters":9223372036854775808}'),
    ("milestones [1e19]", '{"type":"multistep","milestones":[1e19]}'),
    ("2,000 milestones", '{"type":"multistep","milestones":[' + ",".join(["5"] * 2000) + "]}"),
    ("unknown type", '{"type":"warp"}'),
]:
    add(f"schedule {label}", MODEL_ENDPOINTS, f'{{"optimizer":{{"lr":0.1}},"schedule":{schedule}}}', expect=[422])
add(
    "workers 5,000 digits",
    MODEL_ENDPOINTS,
    f'{{"optimizer":{{"lr":0.1}},"mode":"sync","workers":{DIGITS}}}',
    expect=[422],
)
add("mode unknown", MODEL_ENDPOINTS, '{"optimizer":{"lr":0.1},"mode":"chaos"}', expect=[422])

# -- step options
for label, options in [
    ("expected_steps 5,000 digits", f'"expected_steps":{{"w":{DIGITS}}}'),
    ("expected_steps negative", '"expected_steps":{"w":-1}'),
    ("expected_steps names no gradient", '"expected_steps":{"b":0}'),
    ("worker_id NaN", '"worker_id":NaN'),
    ("worker_id 2^63", '"worker_id":9223372036854775808'),
    ("expected_steps 1e19", '"expected_steps":{"w":1e19}'),
    ("worker_id 1e300", '"worker_id":1e300'),
    ("base_step 2^64", '"base_step":18446744073709551615'),
    ("base_step 5,000 digits", f'"base_step":{DIGITS}'),
    ("return_params a string", '"return_params":"no"'),
]:
    add(f"step {label}", [STEP], f'{{"gradients":{{"w":{W}}},{options}}}', expect=[422])

# -- not an object, empty, not UTF-8, trailing garbage
for label, body in [
    ("bare array", "[1,2,3]"),
    ("bare string", '"gradients"'),
    ("bare number", "42"),
    ("bare null", "null"),
    ("bare true", "true"),
    ("empty", ""),
    ("whitespace", "   \n"),
    ("trailing garbage", f'{{"gradients":{{"w":{W}}}}} x'),
    ("two documents", f'{{"gradients":{{"w":{W}}}}}{{"gradients":{{"w":{W}}}}}'),
    ("invalid UTF-8", b'{"gradients":{"\xff\xfe":1}}'),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + f'{{"gradients":{{"w":{W}}}}}'.encode()),
    ("NUL byte", b'{"gradients":\x00}'),
]:
    add(label, JSON_ENDPOINTS, body, expect=[422])

# -- duplicate keys: the last one wins (as in orjson, json and the safetensors reference reader),
#    so a duplicate that is invalid is refused whatever came before it
add(
    "duplicate key, last invalid",
    [STEP],
    f'{{"gradients":{{"w":{W},"w":{tensor([2, 3], f"NaN,{SIX}")}}}}}',
    expect=[422],
)
add("duplicate key, last invalid", [PARAMS], f'{{"params":{{"w":{W},"w":{tensor([2], "1,2,3")}}}}}', expect=[422])
add(
    "duplicate key, last invalid",
    [PARAM],
    f'{{"shape":[2,3],"dtype":"float32","data":[{SIX},1],"dtype":"x"}}',
    expect=[422],
)
add("duplicate key, last invalid", MODEL_ENDPOINTS, '{"optimizer":{"lr":0.1},"optimizer":{"lr":-1}}', expect=[422])
add("duplicate section", [STEP], f'{{"gradients":{{"w":{W}}},"gradients":"x"}}', expect=[422])

# -- more tensors than max_params_per_request, and names that violate the pattern
many = ",".join(f'"p{i}":{tensor([1], "0.5")}' for i in range(MAX_PARAMS + 1))
add("too many tensors", [STEP], f'{{"gradients":{{{many}}}}}', expect=[413])
add("too many tensors", [PARAMS], f'{{"params":{{{many}}}}}', expect=[413])
for label, name in [
    ("space", "a b"),
    ("slash", "a/b"),
    ("dot-dot", ".."),
    ("braces", "w{x}"),
    ("empty", ""),
    ("257 characters", "a" * 257),
    ("unicode", "wé"),
    ("leading dash", "-w"),
]:
    add(f"param name {label}", [STEP], f'{{"gradients":{{{json.dumps(name)}:{W}}}}}', expect=[422])
    add(f"param name {label}", [PARAMS], f'{{"params":{{{json.dumps(name)}:{W}}}}}', expect=[422])
    add(
        f"expected_steps name {label}",
        [STEP],
        f'{{"gradients":{{"w":{W}}},"expected_steps":{{{json.dumps(name)}:0}}}}',
        expect=[422],
    )
for path in [
    "/v1/models/bad%20name",
    "/v1/models/-m",
    "/v1/models/%7Bm%7D",
    "/v1/models/" + "a" * 129,
    "/v1/models/m%00",
    "/v1/models/%C3%A9",
    "/v1/models/..",
    "/v1/models/m*",
]:
    add("model name", [("PUT", path), ("PATCH", path)], '{"optimizer":{"lr":0.1}}', expect=[404, 405, 422])
    add("model name", [("POST", path + "/step")], f'{{"gradients":{{"w":{W}}}}}', expect=[404, 405, 422])
for path in [
    "/v1/models/m/params/bad%20name",
    "/v1/models/m/params/..",
    "/v1/models/m/params/%2e%2e",
    "/v1/models/m/params/" + "a" * 257,
    "/v1/models/m/params/w%7Bx%7D",
    "/v1/models/m/params/w%00",
]:
    add("param name in the path", [("PUT", path)], W, expect=[404, 405, 422])

# -- content types
valid = {STEP: f'{{"gradients":{{"w":{W}}}}}', PARAMS: f'{{"params":{{"w":{W}}}}}', PARAM: W}
valid |= {endpoint: '{"optimizer":{"lr":0.1}}' for endpoint in MODEL_ENDPOINTS}
multipart = (
    '--XyZ\r\nContent-Disposition: form-data; name="body"\r\n'
    "Content-Type: application/json\r\n\r\n{body}\r\n--XyZ--\r\n"
)
for label, ctype in [
    ("text/plain", "text/plain"),
    ("form", "application/x-www-form-urlencoded"),
    ("multipart", "multipart/form-data; boundary=XyZ"),
    ("octet-stream", "application/octet-stream"),
    ("two types", "application/json, text/plain"),
    ("10 kB type", "application/" + "x" * 10_000),
    ("json without subtype", "application/"),
]:
    add(
        f"content type {label}",
        JSON_ENDPOINTS,
        lambda e, ctype=ctype: multipart.format(body=valid[e]) if ctype.startswith("multipart") else valid[e],
        content_type=ctype,
        expect=[415],
    )
add("content type missing", JSON_ENDPOINTS, lambda e: valid[e], content_type=None, expect=[415])
add(
    "charset=utf-16",
    JSON_ENDPOINTS,
    lambda e: valid[e].encode("utf-16"),
    content_type="application/json; charset=utf-16",
    expect=[415, 422],
)
st_w = safetensors.numpy.save({"w": np.ones((2, 3), np.float32)})
add("safetensors labelled JSON", JSON_ENDPOINTS, st_w, content_type=JSON, expect=[422])
add("JSON labelled safetensors", TENSOR_ENDPOINTS, lambda e: valid[e], content_type=ST, expect=[422])
add("JSON labelled safetensors", MODEL_ENDPOINTS, lambda e: valid[e], content_type=ST, expect=[415])
add("safetensors to a JSON-only route", MODEL_ENDPOINTS, st_w, content_type=ST, expect=[415])

# -- safetensors: test_wire's hostile bodies, over HTTP, and more
ST_ENDPOINTS = (STEP, PARAMS)
for label, raw in HOSTILE.items():
    add(f"safetensors {label}", [STEP] if label in STEP_METADATA else ST_ENDPOINTS, raw, content_type=ST)


def st_header(header: Any, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def spec(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


for label, dtype, data in [
    ("F64 NaN", "F64", np.float64([np.nan, 1]).tobytes()),
    ("F64 -inf", "F64", np.float64([-np.inf, 1]).tobytes()),
    ("F16 NaN", "F16", np.float16([np.nan, 1, 1, 1]).tobytes()),
    ("F16 inf", "F16", np.float16([np.inf, 1, 1, 1]).tobytes()),
    ("BF16 NaN", "BF16", struct.pack("<4H", 0x7FC0, 0x3F80, 0x3F80, 0x3F80)),
    ("BF16 -inf", "BF16", struct.pack("<4H", 0xFF80, 0x3F80, 0x3F80, 0x3F80)),
]:
    count = 16 // {"F64": 8, "F16": 2, "BF16": 2}[dtype]
    shape = [count] if dtype == "F64" else [2, 2]
    add(f"safetensors {label}", ST_ENDPOINTS, st_header({"w": spec(dtype, shape, 0, len(data))}, data), ST, [422])
for label, shape in [("[2^31]*8", [2**31] * 8), ("33 dimensions", [1] * 33), ("[2^63]", [2**63])]:
    add(
        f"safetensors shape {label}",
        ST_ENDPOINTS,
        st_header({"w": spec("F32", shape, 0, 8)}, b"\0" * 8),
        ST,
        [413, 422],
    )
add("safetensors header 100k deep", ST_ENDPOINTS, st_header(nested(100_000).encode()), ST, [422])
add(
    "safetensors header with a 5,000-digit shape",
    ST_ENDPOINTS,
    st_header(f'{{"w":{{"dtype":"F32","shape":[{DIGITS}],"data_offsets":[0,8]}}}}'.encode(), b"\0" * 8),
    ST,
    [422],
)
add(
    "safetensors header with a 5,000-digit offset",
    ST_ENDPOINTS,
    st_header(f'{{"w":{{"dtype":"F32","shape":[2],"data_offsets":[0,{DIGITS}]}}}}'.encode(), b"\0" * 8),
    ST,
    [422],
)
add(
    "safetensors NaN header literal",
    ST_ENDPOINTS,
    st_header(b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', b"\0" * 8),
    ST,
    [422],
)
add(
    "safetensors duplicate names",
    ST_ENDPOINTS,
    st_header(
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        np.float32([1, 2, 3, 4]).tobytes(),
    ),
    ST,
    [422],
)
many_st = {f"p{i}": spec("F32", [1], 4 * i, 4 * i + 4) for i in range(MAX_PARAMS + 1)}
add("safetensors too many tensors", ST_ENDPOINTS, st_header(many_st, b"\0" * 4 * (MAX_PARAMS + 1)), ST, [413])
add("safetensors 257-character name", ST_ENDPOINTS, st_header({"a" * 257: GOOD["w"]}, b"\0" * 8), ST, [422])
add(
    "safetensors metadata nested deep",
    [STEP],
    st_header({"__metadata__": {"expected_steps": nested(900, "object")}, **GOOD}, b"\0" * 8),
    ST,
    [422],
)
add(
    "safetensors metadata 5,000 digits",
    [STEP],
    st_header({"__metadata__": {"base_step": DIGITS}, **GOOD}, b"\0" * 8),
    ST,
    [422],
)
add("safetensors metadata NaN", [STEP], st_header({"__metadata__": {"worker_id": "NaN"}, **GOOD}, b"\0" * 8), ST, [422])
# 10 MB headers: a huge metadata string before a NaN tensor; 100k tensor entries (over the
# per-request limit); a length that promises 10 MB the body does not hold; one over 16 MiB.
ten_mb = st_header(
    {"__metadata__": {"pad": "x" * 10_000_000}, "w": spec("F32", [2], 0, 8)}, np.float32([np.nan, 1]).tobytes()
)
add("safetensors 10 MB header, NaN data", ST_ENDPOINTS, ten_mb, ST, [422])
lots = {f"p{i}": spec("F32", [0], 0, 0) for i in range(150_000)}
add("safetensors 10 MB header, 150k tensors", ST_ENDPOINTS, st_header(lots), ST, [413])
add("safetensors header length 10 MB, 1 kB sent", ST_ENDPOINTS, struct.pack("<Q", 10_000_000) + b"{" * 1000, ST, [422])
add("safetensors 17 MB header", ST_ENDPOINTS, st_header({"__metadata__": {"pad": "x" * (17 << 20)}}), ST, [422])

# -- other headers
add("Idempotency-Key 10 kB", [STEP], valid[STEP], headers={"idempotency-key": "k" * 10_000}, expect=[422])
add("Idempotency-Key with spaces", [STEP], valid[STEP], headers={"idempotency-key": "a b"}, expect=[422])
add("If-None-Match not *", [PARAMS, PARAM], lambda e: valid[e], headers={"if-none-match": '"abc"'}, expect=[422])
add("no API key", JSON_ENDPOINTS, nested(100_000), headers={"authorization": ""}, expect=[401])
add("unknown API key", JSON_ENDPOINTS, lambda e: valid[e], headers={"authorization": "Bearer msk_nope"}, expect=[401])
add("Basic instead of Bearer", [STEP], valid[STEP], headers={"authorization": "Basic YTpi"}, expect=[401])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_gets_a_4xx_problem_and_changes_nothing(live: Live, case: Case) -> None:
    before = live.snapshot()
    r = live.api.request(case.method, case.path, content=case.content, headers=case.headers)
    assert_problem(r, case.expect)
    assert live.snapshot() == before


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/models/m/params", {"names": "a b"}),
        ("/v1/models/m/params", {"names": ",,,"}),
        ("/v1/models/m/params", {"names": "x" * 300}),
        ("/v1/models/m/params", {"include": "everything"}),
        ("/v1/models/m/params/w", {"include": "velocity,secrets"}),
    ],
)
def test_hostile_queries_get_4xx_problems(live: Live, path: str, params: dict[str, str]) -> None:
    assert_problem(live.api.get(path, params=params), [422])


def test_every_truncation_of_a_valid_safetensors_body_is_refused(live: Live) -> None:
    grads = safetensors.numpy.save({"w": np.ones((2, 3), np.float32), "b": np.ones(4, np.float64)})
    values = safetensors.numpy.save({"w": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float64)})
    before = live.snapshot()
    for (method, path), full in ((STEP, grads), (PARAMS, values)):
        for n in range(len(full)):
            r = live.api.request(method, path, content=full[:n], headers={"content-type": ST})
            assert_problem(r, [422])
    assert live.snapshot() == before
    MEASURED["truncations"] = f"{len(grads) + len(values)} truncated safetensors bodies"


def test_duplicate_json_keys_the_last_one_wins(live: Live) -> None:
    """Not refused: like orjson (and json, and JavaScript), the server reads the last duplicate."""
    api = live.api
    assert api.put("/v1/models/dup", json={"optimizer": {"lr": 1.0}}).status_code == 201
    try:
        body = '{"shape":[1],"dtype":"float32","data":[1.0],"data":[5.0]}'
        assert api.put("/v1/models/dup/params/w", content=body, headers={"content-type": JSON}).status_code == 201
        assert api.get("/v1/models/dup/params/w").json()["data"] == [5.0]
    finally:
        assert api.delete("/v1/models/dup").status_code == 204


def test_memory_growth_over_the_battery_is_bounded(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the battery above (pytest keeps the file's order)."""
    now = live.memory()
    growth_mb = (now["VmRSS"] - live.baseline["VmRSS"]) / 1024
    MEASURED["battery"] = (
        f"{len(CASES)} hostile requests and the tests above: RSS {live.baseline['VmRSS'] >> 10} -> "
        f"{now['VmRSS'] >> 10} MB (growth {growth_mb:+.1f} MB; bound {RSS_GROWTH_BOUND_MB} MB)"
    )
    with capsys.disabled():
        print("\n[test_hostile] measured:")
        for key, value in MEASURED.items():
            print(f"  {key}: {value}")
    assert growth_mb < RSS_GROWTH_BOUND_MB, MEASURED["battery"]
    assert live.api.get("/readyz").status_code == 200
    log = live.server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-5000:]


# --------------------------------------------------------------------------------------------
# The concurrent-request cap, and a frozen Redis
# --------------------------------------------------------------------------------------------

CAP = 4
REDIS_TIMEOUT_S = 1.0
GRAD = {"gradients": {"w": {"shape": [2], "dtype": "float32", "data": [0.5, 0.5]}}}


@contextlib.contextmanager
def frozen_setup(tmp: Path, env: dict[str, str], models: list[str]) -> Iterator[tuple[ServerProcess, RedisProcess]]:
    """A server on its own Redis, with ``models`` (each with a parameter w); Redis is unfrozen and
    both processes are stopped on the way out."""
    redis_proc = RedisProcess(directory=str(tmp)).start()
    server = ServerProcess(redis_url=redis_proc.url, env={"MOMENTUM_API_KEYS": f"{hash_key(KEY)} admin:*", **env})
    try:
        server.start()
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=TIMEOUT) as api:
            for model in models:
                assert api.put(f"/v1/models/{model}", json={"optimizer": {"lr": 0.1}}).status_code == 201
                w = {"shape": [2], "dtype": "float32", "data": [1.0, 2.0]}
                assert api.put(f"/v1/models/{model}/params/w", json=w).status_code == 201
        yield server, redis_proc
    finally:
        if redis_proc.proc is not None:
            os.kill(redis_proc.proc.pid, signal.SIGCONT)
        server.stop()
        redis_proc.stop()


def timed_steps(url: str, models: list[str]) -> list[tuple[httpx.Response, float]]:
    """One step on each of ``models`` at once, each on its own connection and with the Idempotency-Key
    ``key-<i>``: (response, seconds)."""

    def step(i: int, model: str) -> tuple[httpx.Response, float]:
        t = time.monotonic()
        with httpx.Client(base_url=url, headers=AUTH, timeout=TIMEOUT) as own:
            r = own.post(f"/v1/models/{model}/step", json=GRAD, headers={"Idempotency-Key": f"key-{i}"})
        return r, time.monotonic() - t

    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(step, range(len(models)), models))


def test_concurrent_cap_and_frozen_redis_answer_503_in_bounded_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [f"m{i}" for i in range(CAP)]
    env = {"MOMENTUM_MAX_CONCURRENT_REQUESTS": str(CAP), "MOMENTUM_REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S)}
    with (
        frozen_setup(tmp_path, env, models) as (server, redis_proc),
        httpx.Client(base_url=server.url, headers=AUTH, timeout=TIMEOUT) as api,
    ):
        before = api.get("/v1/models/m0/params", params={"include": "velocity"}).json()
        assert redis_proc.proc is not None
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            stuck_future = pool.submit(timed_steps, server.url, models)
            time.sleep(0.4)  # the four steps are in the server, each waiting on the frozen Redis
            overflow = []
            for _ in range(4):
                t = time.monotonic()
                r = api.post("/v1/models/m0/step", json=GRAD)
                overflow.append(time.monotonic() - t)
                body = assert_problem_5xx(r, 503)
                assert body["type"].endswith(":overloaded") and r.headers["retry-after"] == "1"
            t = time.monotonic()
            assert api.get("/healthz").status_code == 200  # never counted against the cap
            healthz = time.monotonic() - t
            stuck = stuck_future.result(timeout=60)
        bound = 3 * REDIS_TIMEOUT_S + 1.5
        for r, _ in stuck:
            body = assert_problem_5xx(r, 503)
            assert body["type"].endswith(":store-unavailable") and r.headers["retry-after"] == "1"
        t = time.monotonic()
        assert api.get("/readyz").status_code == 503
        readyz = time.monotonic() - t
        os.kill(redis_proc.proc.pid, signal.SIGCONT)
        # A 503 changed nothing, unless its detail says the commit may have reached the frozen Redis (which
        # applies it once thawed); either way a retry with the same key applies the step exactly once.
        for i, (r, _) in enumerate(stuck):
            if "may or may not have been applied" not in r.json()["detail"]:
                got = api.get(f"/v1/models/{models[i]}/params", params={"include": "velocity"}).json()
                assert got["params"]["w"]["step"] == 0 and (i or got == before), r.json()["detail"]
        for i, model in enumerate(models):
            r = api.post(f"/v1/models/{model}/step", json=GRAD, headers={"Idempotency-Key": f"key-{i}"})
            while r.status_code == 503:
                time.sleep(0.2)
                r = api.post(f"/v1/models/{model}/step", json=GRAD, headers={"Idempotency-Key": f"key-{i}"})
            assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1, r.text
        after = api.get("/v1/models/m0/params", params={"include": "velocity"}).json()
        assert after["params"]["w"]["step"] == 1 and after != before
        r = api.post("/v1/models/m0/step", json=GRAD)
        assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 2
    times = sorted(elapsed for _, elapsed in stuck)
    with capsys.disabled():
        print(
            f"\n[test_hostile] cap {CAP}, MOMENTUM_REDIS_TIMEOUT_S={REDIS_TIMEOUT_S}: over-cap 503 in "
            f"{max(overflow) * 1000:.0f} ms at most; /healthz {healthz * 1000:.0f} ms while saturated; "
            f"frozen Redis: steps 503 in {times[0]:.2f}-{times[-1]:.2f} s, /readyz in {readyz:.2f} s "
            f"(bound {bound:.1f} s)"
        )
    assert max(overflow) < 0.5, overflow
    assert times[-1] < bound and readyz < bound, (times, readyz)
    log = server.log()
    assert "Traceback" not in log, log[-5000:]


def test_steps_queued_on_one_model_get_503_in_bounded_time(tmp_path: Path) -> None:
    timeout_s = 0.5
    with frozen_setup(tmp_path, {"MOMENTUM_REDIS_TIMEOUT_S": str(timeout_s)}, ["m"]) as (server, redis_proc):
        assert redis_proc.proc is not None
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        stuck = timed_steps(server.url, ["m"] * 3)
    assert all(r.status_code == 503 for r, _ in stuck)
    assert max(elapsed for _, elapsed in stuck) < 3 * timeout_s + 1.5, [round(e, 2) for _, e in stuck]


def assert_problem_5xx(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["detail"]
    return body
