"""Hostile request bodies and what the server answers them (``hostile.json``).

Run ``.venv/bin/python clients/typescript/tests/vectors/hostile.py clients/typescript/tests/vectors/hostile.json``
to write the file. Both SDKs' tests send each body as it is to a real server, and check the status,
the problem's slug and the error class their SDK makes of it (``tests/test_vectors.py``,
``clients/typescript/tests/hostile.test.mjs``): the same errors, whichever SDK a worker uses.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import sys

import httpx
from momentum_client._exceptions import api_error
from momentum_service.api import create_app
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal

J, ST = "application/json", "application/x-safetensors"


def st(header: dict, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32x4 = struct.pack("<4f", 1, 1, 1, 1)
CASES = [
    ("json: not JSON", "step", J, b'{"gradients": '),
    ("json: not an object", "step", J, b"[1, 2]"),
    ("json: no gradients", "step", J, b"{}"),
    (
        "json: data length does not match the shape",
        "step",
        J,
        b'{"gradients":{"w":{"shape":[2,2],"dtype":"float32","data":[1,2,3]}}}',
    ),
    ("json: unknown dtype", "step", J, b'{"gradients":{"w":{"shape":[2,2],"dtype":"int8","data":[1,2,3,4]}}}'),
    ("json: negative dimension", "step", J, b'{"gradients":{"w":{"shape":[-2,2],"dtype":"float32","data":[1,2,3,4]}}}'),
    ("json: NaN", "step", J, b'{"gradients":{"w":{"shape":[2,2],"dtype":"float32","data":[NaN,1,1,1]}}}'),
    (
        "json: a number too big for float32",
        "step",
        J,
        b'{"gradients":{"w":{"shape":[2,2],"dtype":"float32","data":[1e39,1,1,1]}}}',
    ),
    (
        "json: another shape than the parameter's",
        "step",
        J,
        b'{"gradients":{"w":{"shape":[4],"dtype":"float32","data":[1,2,3,4]}}}',
    ),
    (
        "json: a parameter that does not exist",
        "step",
        J,
        b'{"gradients":{"x":{"shape":[1],"dtype":"float32","data":[1]}}}',
    ),
    ("json: an invalid parameter name", "step", J, b'{"gradients":{"a b":{"shape":[1],"dtype":"float32","data":[1]}}}'),
    (
        "json: expected_steps not a map",
        "step",
        J,
        b'{"gradients":{"w":{"shape":[2,2],"dtype":"float32","data":[1,1,1,1]}},"expected_steps":3}',
    ),
    ("json: nested too deep", "step", J, b'{"gradients":' + b"[" * 40 + b"]" * 40 + b"}"),
    ("media type: text/plain", "step", "text/plain", b"hello"),
    ("safetensors: header length beyond the body", "step", ST, st({}, b"", length=10_000)),
    ("safetensors: header not JSON", "step", ST, struct.pack("<Q", 5) + b"{oops"),
    (
        "safetensors: unknown dtype",
        "step",
        ST,
        st({"w": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16),
    ),
    (
        "safetensors: offsets overlap",
        "step",
        ST,
        st(
            {
                "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            F32x4,
        ),
    ),
    (
        "safetensors: bytes do not match the shape",
        "step",
        ST,
        st({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, F32x4[:12]),
    ),
    (
        "safetensors: trailing bytes",
        "step",
        ST,
        st({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, F32x4 + b"xxxx"),
    ),
    (
        "safetensors: truncated",
        "step",
        ST,
        st({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, F32x4)[:-3],
    ),
    (
        "safetensors: metadata not JSON",
        "step",
        ST,
        st(
            {"__metadata__": {"base_step": "three"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
            F32x4,
        ),
    ),
    (
        "safetensors: a 16-bit value (only gradients may be)",
        "params",
        ST,
        st({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    ),
]


async def answers() -> list[dict[str, object]]:
    """Each hostile body, sent to a fresh in-process server, with its answer."""
    app = create_app(Settings(), journal=MemoryJournal())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as api:
        await api.put("/v1/models/m", json={"optimizer": {"lr": 0.1, "momentum": 0.9}})
        await api.put("/v1/models/m/params/w", json={"shape": [2, 2], "dtype": "float32", "data": [1, 1, 1, 1]})
        vectors = []
        for name, kind, ctype, body in CASES:
            method, path = ("POST", "/v1/models/m/step") if kind == "step" else ("PUT", "/v1/models/m/params")
            r = await api.request(method, path, content=body, headers={"Content-Type": ctype})
            problem = r.json()
            assert r.status_code >= 400, (name, r.text)
            assert problem["type"].startswith("urn:momentum-service:problem:"), (name, r.text)
            vectors.append(
                {
                    "name": name,
                    "method": method,
                    "path": path,
                    "content_type": ctype,
                    "body": base64.b64encode(body).decode(),
                    "status": r.status_code,
                    "code": problem["type"].rsplit(":", 1)[1],
                    "class": type(api_error(r.status_code, problem, headers=r.headers)).__name__,
                }
            )
        assert (await api.get("/v1/models/m/params/w")).json()["step"] == 0
    return vectors


if __name__ == "__main__":
    found = asyncio.run(answers())
    with open(sys.argv[1], "w") as f:
        json.dump(found, f, indent=1)
        f.write("\n")
    for v in found:
        print(v["status"], v["code"], v["class"], v["name"])
