"""The safetensors wire format: the same numbers as JSON, half-precision gradients, and hostile bodies."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from momentum_service.api.codecs import BodyError, Limits
from momentum_service.api.codecs import safetensors as wire
from momentum_service.kernels import SGDConfig, sgd_update
from momentum_service.settings import Settings
from momentum_service.store import Journal

from .test_http import array, assert_problem, make_client, tensor

ST = "application/x-safetensors"
OPT = {"lr": 0.1, "momentum": 0.9, "nesterov": True}


def st_body(tensors: dict[str, np.ndarray], **metadata: Any) -> bytes:
    text = {k: json.dumps(v) for k, v in metadata.items()}
    out: bytes = safetensors.numpy.save(tensors, metadata=text or None)
    return out


def read_st(content: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    n = int.from_bytes(content[:8], "little")
    meta = json.loads(content[8 : 8 + n]).get("__metadata__", {})
    return safetensors.numpy.load(content), {k: json.loads(v) for k, v in meta.items()}


@pytest.fixture
async def api(store: Journal) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store) as client:
        yield client


async def make_model(api: httpx.AsyncClient, value: np.ndarray) -> None:
    assert (await api.put("/v1/models/m", json={"optimizer": OPT})).status_code == 201
    r = await api.put("/v1/models/m/params", content=st_body({"w": value}), headers={"content-type": ST})
    assert r.status_code == 201, r.text


async def snapshot(api: httpx.AsyncClient) -> Any:
    return (await api.get("/v1/models/m/params", params={"include": "velocity"})).json()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
async def test_binary_steps_give_the_json_numbers(api: httpx.AsyncClient, dtype: type) -> None:
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((3, 4)).astype(dtype)
    await make_model(api, p0)
    await api.put("/v1/models/j", json={"optimizer": OPT})
    await api.put("/v1/models/j/params/w", json=tensor(p0, np.dtype(dtype).name))
    value, velocity = p0, None
    for k in range(5):
        g = rng.standard_normal((3, 4)).astype(dtype)
        value, velocity = sgd_update(SGDConfig(**OPT), value, velocity, g)  # type: ignore[arg-type]
        r = await api.post("/v1/models/m/step", content=st_body({"w": g}), headers={"content-type": ST, "accept": ST})
        assert r.status_code == 200 and r.headers["content-type"] == ST
        tensors, meta = read_st(r.content)
        assert tensors["w"].tobytes() == value.tobytes() and tensors["w"].dtype == dtype
        assert meta["params"] == {"w": {"step": k + 1, "lr": 0.1}}
        j = await api.post("/v1/models/j/step", json={"gradients": {"w": tensor(g, np.dtype(dtype).name)}})
        assert array(j.json()["params"]["w"]).tobytes() == value.tobytes()
    # Binary in, JSON out (no Accept), and options in the metadata.
    g = np.ones((3, 4), dtype)
    body = st_body({"w": g}, return_params=False, expected_steps={"w": 5})
    r = await api.post("/v1/models/m/step", content=body, headers={"content-type": ST})
    assert r.headers["content-type"] == "application/json" and r.json() == {"params": {"w": {"step": 6, "lr": 0.1}}}
    body = st_body({"w": g}, expected_steps={"w": 5})
    assert_problem(
        await api.post("/v1/models/m/step", content=body, headers={"content-type": ST}), 409, "step-mismatch"
    )
    # return_params false with Accept: no tensors, only the metadata.
    body = st_body({"w": g}, return_params=False)
    r = await api.post("/v1/models/m/step", content=body, headers={"content-type": ST, "accept": ST})
    tensors, meta = read_st(r.content)
    assert tensors == {} and meta["params"]["w"]["step"] == 7


async def test_params_read_and_written_in_safetensors(api: httpx.AsyncClient) -> None:
    p = np.arange(6, dtype=np.float32).reshape(2, 3)
    await make_model(api, p)
    r = await api.put("/v1/models/m/params/b", content=st_body({"b": np.zeros(2)}), headers={"content-type": ST})
    assert r.status_code == 201 and r.json()["dtype"] == "float64"
    assert_problem(
        await api.put("/v1/models/m/params/c", content=st_body({"x": np.zeros(2)}), headers={"content-type": ST}), 422
    )
    await api.post(
        "/v1/models/m/step", content=st_body({"w": np.ones((2, 3), np.float32)}), headers={"content-type": ST}
    )
    r = await api.get("/v1/models/m/params", params={"include": "velocity"}, headers={"accept": ST})
    tensors, meta = read_st(r.content)
    assert sorted(tensors) == ["b", "w", "w@velocity"]  # b has no velocity yet
    assert meta["params"] == {"b": {"step": 0}, "w": {"step": 1}}
    assert tensors["w@velocity"].tolist() == [[1.0] * 3] * 2
    r = await api.get("/v1/models/m/params/w", headers={"accept": f"{ST};q=1, application/json;q=0.5"})
    tensors, meta = read_st(r.content)
    assert list(tensors) == ["w"] and meta["params"]["w"]["step"] == 1
    assert (await api.get("/v1/models/m/params/w")).headers["content-type"] == "application/json"


@pytest.mark.parametrize("wire_dtype", ["F16", "BF16"])
async def test_half_precision_gradients_apply_to_float32_state(api: httpx.AsyncClient, wire_dtype: str) -> None:
    p0 = np.linspace(-1, 1, 7, dtype=np.float32)
    await make_model(api, p0)
    g32 = np.linspace(-3, 5, 7, dtype=np.float32)
    if wire_dtype == "F16":
        g_wire = g32.astype(np.float16)
        body = st_body({"w": g_wire})
        widened = g_wire.astype(np.float32)
    else:  # bfloat16: the top 16 bits of a float32 (truncated here; any bf16 value is exact in float32)
        bits = (g32.view(np.uint32) >> 16).astype(np.uint16)
        header = json.dumps({"w": {"dtype": "BF16", "shape": [7], "data_offsets": [0, 14]}}).encode()
        header += b" " * (-len(header) % 8)
        body = struct.pack("<Q", len(header)) + header + bits.tobytes()
        widened = (bits.astype(np.uint32) << 16).view(np.float32)
    r = await api.post("/v1/models/m/step", content=body, headers={"content-type": ST, "accept": ST})
    assert r.status_code == 200, r.text
    expected, _ = sgd_update(SGDConfig(**OPT), p0, None, widened)  # type: ignore[arg-type]
    assert read_st(r.content)[0]["w"].tobytes() == expected.tobytes()
    # Parameter values are state: float32 or float64 only.
    r = await api.put(
        "/v1/models/m/params", content=st_body({"h": np.zeros(2, np.float16)}), headers={"content-type": ST}
    )
    assert_problem(r, 422, "malformed-safetensors")


def header_body(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
HOSTILE = {
    "empty": b"",
    "short": b"\x01\x02\x03",
    "truncated header": header_body(GOOD, b"\0" * 8)[:20],
    "header longer than the body": header_body(GOOD, b"\0" * 8, length=10_000),
    "header length 2^64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "header not JSON": header_body(b"{nope", b""),
    "header not an object": header_body([1, 2]),
    "unknown dtype": header_body({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "lying dtype": header_body({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "offsets out of range": header_body({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
    "negative offset": header_body({"w": {"dtype": "F32", "shape": [0], "data_offsets": [-4, -4]}}),
    "reversed offsets": header_body({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8),
    "huge declared shape": header_body(
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "negative dimension": header_body({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "float dimension": header_body({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8),
    "gap": header_body({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
    "overlap": header_body(
        {
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    ),
    "trailing bytes": header_body(GOOD, b"\0" * 12),
    "extra key": header_body({"w": {**GOOD["w"], "x": 1}}, b"\0" * 8),
    "bad metadata": header_body({"__metadata__": {"a": 1}, **GOOD}, b"\0" * 8),
    "NaN": header_body(GOOD, np.float32([np.nan, 1]).tobytes()),
    "infinity": header_body(GOOD, np.float32([np.inf, 1]).tobytes()),
    "bad name": header_body({"w/../x": GOOD["w"]}, b"\0" * 8),
    "metadata not JSON": header_body({"__metadata__": {"return_params": "maybe"}, **GOOD}, b"\0" * 8),
    "metadata of the wrong type": header_body({"__metadata__": {"base_step": '"3"'}, **GOOD}, b"\0" * 8),
    "no tensors": header_body({}),
    "a 2^40-element tensor": header_body({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}),
}


STEP_METADATA = {"metadata not JSON", "metadata of the wrong type"}  # a PUT of values reads no metadata


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_bodies_get_4xx_problems_and_change_nothing(api: httpx.AsyncClient, name: str) -> None:
    await make_model(api, np.float32([1.0, 2.0]))
    before = await snapshot(api)
    paths = ["/v1/models/m/step"] if name in STEP_METADATA else ["/v1/models/m/step", "/v1/models/m/params"]
    for path in paths:
        method = api.post if path.endswith("step") else api.put
        r = await method(path, content=HOSTILE[name], headers={"content-type": ST})
        body = assert_problem(r, r.status_code)
        assert 400 <= r.status_code < 500 and body["detail"]
    assert await snapshot(api) == before


def test_parsing_allocates_nothing_beyond_the_body() -> None:
    """Arrays are views of the body: a valid 8 MB gradient costs no second copy."""
    g = np.arange(2_000_000, dtype=np.float32)
    raw = st_body({"g": g})
    tensors, _ = wire.read(raw, Limits())
    assert tensors["g"].base is not None and not tensors["g"].flags.owndata
    assert tensors["g"].tobytes() == g.tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_bodies_never_crash_the_parser(data: st.DataObject) -> None:
    """Random byte mutations of valid bodies: a result the library agrees with, or a 4xx Problem."""
    shapes = data.draw(st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=3))
    tensors = {f"t{i}": np.ones(s, np.float32) for i, s in enumerate(shapes)}
    raw = bytearray(st_body(tensors))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        ours, _ = wire.read(bytes(raw), Limits())
    except BodyError as exc:
        status = exc.status
    else:
        status = 200
    if status != 200:
        assert 400 <= status < 500
        return
    theirs = dict(safetensors.deserialize(bytes(raw)))  # what we accept, the reference accepts too
    assert sorted(ours) == sorted(theirs)
    for name, spec in theirs.items():
        assert list(ours[name].shape) == spec["shape"]


async def test_the_sdk_speaks_safetensors_by_default(store: Journal) -> None:
    import momentum_client as mc
    from momentum_service.api import create_app

    seen: list[httpx.Request] = []
    app = create_app(Settings(), journal=store)

    class Spy(httpx.ASGITransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return await super().handle_async_request(request)

    async with mc.AsyncClient("http://test", transport=Spy(app=app)) as client:
        await client.create_model("m", lr=0.5)
        await client.init_params("m", {"w": np.float32([1.0, 2.0])})
        out = await client.step("m", {"w": np.float16([1.0, 0.5])})  # half-precision gradients are sent as F16
        assert out["w"].tolist() == [0.5, 1.75] and out["w"].dtype == np.float32
        state = await client.get_param_state("m", "w")
        assert state.step == 1 and state.velocity is None
    step = next(r for r in seen if r.url.path.endswith("/step"))
    assert step.headers["content-type"] == ST and ST in step.headers["accept"]
    tensors, _ = read_st(step.content)
    assert tensors["w"].dtype == np.float16
    assert all(r.headers.get("content-type") != "application/json" for r in seen if r.url.path.endswith("/params"))
