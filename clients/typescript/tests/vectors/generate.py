"""Write the conformance vectors (tensors.json, requests.json, responses.json, problems.json) shared by the
TypeScript client's tests and tests/test_vectors.py: the Python SDK writes the requests, the server's codecs
write the responses, so what both SDKs read and write is pinned to one set of bytes.

Run from the repository root: .venv/bin/python clients/typescript/tests/vectors/generate.py
"""

from __future__ import annotations

import base64
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT / "clients" / "python"), str(ROOT / "service")]

from momentum_client import _safetensors as sdk_st  # noqa: E402
from momentum_client._tensors import dumps as sdk_dumps  # noqa: E402
from momentum_client._tensors import encode_tensor  # noqa: E402
from momentum_service.api.codecs import json as server_json  # noqa: E402
from momentum_service.api.codecs import safetensors as server_st  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY_SUB = float(np.float32(1e-45))
F32_MIN_NORMAL = float(np.finfo(np.float32).tiny)
F64_TINY_SUB = 5e-324


def arr(values, dtype, shape):
    return np.array(values, dtype=dtype).reshape(shape)


# name -> array: the edge values
TENSORS = {
    "f32-simple": arr([0.1, 0.2, 0.3, 0.4], np.float32, [2, 2]),
    "f32-edges": arr(
        [0.0, -0.0, F32_TINY_SUB, -F32_TINY_SUB, F32_MIN_NORMAL, F32_MAX, -F32_MAX, 1.0, -1.5, 1e-40], np.float32, [10]
    ),
    "f32-scalar": arr(3.25, np.float32, []),
    "f32-negzero-scalar": arr(-0.0, np.float32, []),
    "f32-empty": arr([], np.float32, [0, 3]),
    "f32-3d": arr(np.arange(24) / 7.0, np.float32, [2, 3, 4]),
    "f64-edges": arr(
        [0.0, -0.0, F64_TINY_SUB, -F64_TINY_SUB, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1 / 3],
        np.float64,
        [8],
    ),
    "f64-scalar": arr(-2.5e-300, np.float64, []),
}


def hexbytes(a: np.ndarray) -> str:
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes().hex()


def tensor_case(a: np.ndarray) -> dict:
    return {"dtype": a.dtype.name, "shape": list(a.shape), "hex": hexbytes(a)}


def b64(parts) -> str:
    return base64.b64encode(b"".join(bytes(p) for p in parts)).decode()


def build() -> dict[str, list[dict]]:
    """Every vector file's content, by file name (without .json)."""
    tensors = [
        {"name": name, **tensor_case(a), "json": server_json.dumps(server_json.tensor_json(a)).decode()}
        for name, a in TENSORS.items()
    ]

    # Requests, as the Python SDK writes them.
    bf16_bits = np.array(
        [0x3F80, 0xBF80, 0x0001, 0x8000, 0x7F7F, 0x3DCD], dtype=np.uint16
    )  # 1, -1, tiny, -0, max, ~0.1
    f16 = np.array([1.0, -0.0, 6e-8, 65504.0, 0.1], dtype=np.float16)
    requests = []
    step_cases = [
        ("step-f32", {"w": TENSORS["f32-simple"]}, {"return_params": True}),
        (
            "step-edges-metadata",
            {"w": TENSORS["f32-edges"], "b": TENSORS["f32-scalar"], "d": TENSORS["f64-edges"]},
            {"return_params": False, "expected_steps": {"w": 3, "b": 0}, "worker_id": 1, "base_step": 7},
        ),
        (
            "step-empty-and-scalar",
            {"e": TENSORS["f32-empty"], "s": TENSORS["f32-negzero-scalar"]},
            {"return_params": True},
        ),
    ]
    for name, grads, fields in step_cases:
        requests.append(
            {
                "name": name,
                "kind": "gradients",
                "tensors": {n: tensor_case(a) for n, a in grads.items()},
                "fields": fields,
                "safetensors": b64(sdk_st.encode(grads, fields)),
                "json": sdk_dumps({"gradients": {n: encode_tensor(a, n) for n, a in grads.items()}, **fields}).decode(),
            }
        )
    requests.append(
        {
            "name": "step-half",
            "kind": "gradients",
            "tensors": {
                "h": {"dtype": "bfloat16", "shape": [2, 3], "hex": bf16_bits.astype("<u2").tobytes().hex()},
                "f": {"dtype": "float16", "shape": [5], "hex": f16.astype("<f2").tobytes().hex()},
            },
            "widened": {
                "h": tensor_case((bf16_bits.astype(np.uint32) << 16).view(np.float32).reshape(2, 3)),
                "f": tensor_case(f16.astype(np.float32)),
            },
            "fields": {"return_params": True},
            "safetensors": b64(
                sdk_st.encode({"h": sdk_st.Bfloat16(bf16_bits.reshape(2, 3)), "f": f16}, {"return_params": True})
            ),
            "json": sdk_dumps(
                {
                    "gradients": {
                        "h": encode_tensor((bf16_bits.astype(np.uint32) << 16).view(np.float32).reshape(2, 3), "h"),
                        "f": encode_tensor(f16, "f", half=True),
                    },
                    "return_params": True,
                }
            ).decode(),
        }
    )
    params = {"fc.weight": TENSORS["f32-3d"], "fc.bias": TENSORS["f64-scalar"]}
    requests.append(
        {
            "name": "init-params",
            "kind": "params",
            "tensors": {n: tensor_case(a) for n, a in params.items()},
            "fields": {},
            "safetensors": b64(sdk_st.encode(params, {})),
            "json": sdk_dumps({"params": {n: encode_tensor(a, n) for n, a in params.items()}}).decode(),
        }
    )

    # Responses, as the server writes them.
    w = TENSORS["f32-edges"]
    v = TENSORS["f32-simple"]
    responses = [
        {
            "name": "step-result",
            "tensors": {"w": tensor_case(w), "s": tensor_case(TENSORS["f32-scalar"])},
            "params": {"w": {"step": 3, "lr": 0.1}, "s": {"step": 1, "lr": 0.1, "staleness": 2, "current_step": 4}},
        },
        {
            "name": "params-with-velocity",
            "tensors": {
                "fc.weight": tensor_case(v),
                "fc.weight@velocity": tensor_case(v * 2),
                "d": tensor_case(TENSORS["f64-edges"]),
            },
            "params": {"fc.weight": {"step": 5}, "d": {"step": 0}},
        },
    ]
    for r in responses:
        arrays = {
            n: np.frombuffer(bytes.fromhex(c["hex"]), dtype=np.dtype(c["dtype"]).newbyteorder("<"))
            .astype(c["dtype"])
            .reshape(c["shape"])
            for n, c in r["tensors"].items()
        }
        r["safetensors"] = b64(server_st.encode(arrays, {"params": r["params"]}).parts)
        body = {}
        for n, p in r["params"].items():
            entry = {**server_json.tensor_json(arrays[n]), **p}
            if f"{n}@velocity" in arrays:
                entry["velocity"] = server_json.tensor_json(arrays[f"{n}@velocity"])
            body[n] = entry
        r["json"] = server_json.dumps({"params": body}).decode()

    prefix = "urn:momentum-service:problem:"
    problems = [
        {
            "status": 409,
            "problem": {
                "type": prefix + "step-mismatch",
                "title": "Conflict",
                "status": 409,
                "detail": "expected steps differ",
                "instance": "/v1/models/m/step",
                "current_steps": {"w": 4, "b": 2},
            },
            "class": "Conflict",
            "code": "step-mismatch",
            "current_steps": {"w": 4, "b": 2},
        },
        {
            "status": 409,
            "problem": {
                "type": prefix + "tensor-mismatch",
                "title": "Conflict",
                "status": 409,
                "mismatches": {
                    "w": {"expected": {"shape": [2], "dtype": "float32"}, "got": {"shape": [2], "dtype": "float64"}}
                },
            },
            "class": "TensorMismatch",
            "code": "tensor-mismatch",
            "current_steps": {},
        },
        {
            "status": 409,
            "problem": {"type": prefix + "idempotency-in-flight", "title": "Conflict", "status": 409},
            "headers": {"retry-after": "1"},
            "class": "Conflict",
            "code": "idempotency-in-flight",
            "retry_after": 1.0,
            "transient": True,
        },
        {
            "status": 412,
            "problem": {
                "type": prefix + "model-exists",
                "title": "Precondition Failed",
                "status": 412,
                "existing": {"name": "m", "optimizer": {"rule": "pytorch", "lr": 0.1}},
            },
            "class": "ModelExists",
            "code": "model-exists",
        },
        {
            "status": 412,
            "problem": {
                "type": prefix + "param-exists",
                "title": "Precondition Failed",
                "status": 412,
                "existing": ["w"],
            },
            "class": "PreconditionFailed",
            "code": "param-exists",
            "existing": ["w"],
        },
        {
            "status": 422,
            "problem": {
                "type": prefix + "invalid-config",
                "title": "Invalid request",
                "status": 422,
                "detail": "lr must be >= 0, got -0.1",
                "instance": "/v1/models/mnist",
                "errors": [{"loc": ["body", "optimizer", "lr"], "msg": "lr must be >= 0, got -0.1"}],
            },
            "class": "InvalidRequest",
            "code": "invalid-config",
        },
        {
            "status": 400,
            "problem": {"type": prefix + "malformed-http", "title": "Bad Request", "status": 400},
            "class": "InvalidRequest",
            "code": "malformed-http",
        },
        {
            "status": 401,
            "problem": {"type": prefix + "unauthorized", "title": "Unauthorized", "status": 401},
            "class": "Unauthorized",
            "code": "unauthorized",
        },
        {
            "status": 403,
            "problem": {"type": prefix + "forbidden", "title": "Forbidden", "status": 403, "required": "admin:mnist"},
            "class": "Forbidden",
            "code": "forbidden",
        },
        {
            "status": 404,
            "problem": {"type": prefix + "model-not-found", "title": "Not Found", "status": 404, "model": "m"},
            "class": "NotFound",
            "code": "model-not-found",
        },
        {
            "status": 413,
            "problem": {
                "type": prefix + "payload-too-large",
                "title": "Payload Too Large",
                "status": 413,
                "limit": 67108864,
            },
            "class": "PayloadTooLarge",
            "code": "payload-too-large",
        },
        {
            "status": 415,
            "problem": {"type": prefix + "unsupported-media-type", "title": "Unsupported Media Type", "status": 415},
            "class": "UnsupportedMediaType",
            "code": "unsupported-media-type",
        },
        {
            "status": 503,
            "problem": {"type": prefix + "store-unavailable", "title": "Service Unavailable", "status": 503},
            "headers": {"retry-after": "2"},
            "class": "ServiceUnavailable",
            "code": "store-unavailable",
            "retry_after": 2.0,
            "transient": True,
        },
        {
            "status": 500,
            "problem": {"type": prefix + "store-error", "title": "Internal Server Error", "status": 500},
            "class": "ServerError",
            "code": "store-error",
        },
        {"status": 502, "problem": {}, "class": "ServerError", "code": None, "transient": True},
        {
            "status": 429,
            "problem": {"type": "about:blank", "title": "Too Many Requests", "status": 429},
            "class": "APIError",
            "code": None,
        },
    ]

    return {"tensors": tensors, "requests": requests, "responses": responses, "problems": problems}


def main() -> None:
    for name, content in build().items():
        (HERE / f"{name}.json").write_text(json.dumps(content, indent=1) + "\n")


if __name__ == "__main__":
    main()
