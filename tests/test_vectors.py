"""The conformance vectors the TypeScript client's tests read (clients/typescript/tests/vectors/), checked
with the Python SDK's codecs and the server's: the bytes each side writes and the bits each side reads.

The TypeScript tests check the same files, byte for byte and bit for bit, so the two SDKs (and the server)
cannot drift apart: a change to either codec fails here or there. ``generate.py`` writes the files.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import pathlib
from typing import Any

import numpy as np
import pytest
from momentum_client import _safetensors as sdk_st
from momentum_client._exceptions import api_error
from momentum_client._tensors import decode_tensor, dumps, encode_tensor
from momentum_service.api.codecs import Limits
from momentum_service.api.codecs import json as server_json
from momentum_service.api.codecs import safetensors as server_st

VECTORS = pathlib.Path(__file__).resolve().parents[1] / "clients" / "typescript" / "tests" / "vectors"


def load(name: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = json.loads((VECTORS / f"{name}.json").read_text())
    return content


def array(case: dict[str, Any]) -> np.ndarray:
    dtype = {"bfloat16": "<u2", "float16": "<f2"}.get(case["dtype"], "<" + np.dtype(case["dtype"]).str[1:])
    return np.frombuffer(bytes.fromhex(case["hex"]), dtype=dtype).reshape(case["shape"])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_the_vectors_are_what_the_codecs_write_now() -> None:
    spec = importlib.util.spec_from_file_location("ts_vectors_generate", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, content in module.build().items():
        assert json.loads(json.dumps(content)) == load(name), f"{name}.json is stale: run generate.py"


@pytest.mark.parametrize("case", load("tensors"), ids=lambda c: c["name"])
def test_tensor_json(case: dict[str, Any]) -> None:
    a = array(case).astype(case["dtype"])
    assert server_json.dumps(server_json.tensor_json(a)).decode() == case["json"]
    assert same_bits(decode_tensor(json.loads(case["json"])), a)
    assert json.loads(dumps(encode_tensor(a, "t"))) == json.loads(case["json"])
    # signed zeros survive both ways
    assert np.array_equal(np.signbit(decode_tensor(json.loads(case["json"]))), np.signbit(a))


@pytest.mark.parametrize("case", load("requests"), ids=lambda c: c["name"])
def test_request_bodies(case: dict[str, Any]) -> None:
    body = base64.b64decode(case["safetensors"])
    tensors, metadata = server_st.read(body, Limits())
    assert {k: json.loads(v) for k, v in metadata.items()} == case["fields"]
    for name, c in (case.get("widened") or case["tensors"]).items():
        assert same_bits(np.asarray(tensors[name]), array(c).astype(c["dtype"])), name
    arrays, fields = sdk_st.decode(body)
    assert fields == case["fields"]
    for name, c in (case.get("widened") or case["tensors"]).items():
        got = np.asarray(arrays[name])
        got = got.astype(np.float32) if got.dtype == np.float16 else got  # the SDK reads F16 as float16
        assert same_bits(got, array(c).astype(c["dtype"])), name
    # the JSON body carries the same numbers
    key = "gradients" if case["kind"] == "gradients" else "params"
    sent = json.loads(case["json"])
    for name, c in (case.get("widened") or case["tensors"]).items():
        assert same_bits(decode_tensor(sent[key][name]), array(c).astype(c["dtype"])), name


@pytest.mark.parametrize("case", load("responses"), ids=lambda c: c["name"])
def test_response_bodies(case: dict[str, Any]) -> None:
    arrays, metadata = sdk_st.decode(base64.b64decode(case["safetensors"]))
    assert metadata == {"params": case["params"]}
    for name, c in case["tensors"].items():
        assert same_bits(np.asarray(arrays[name]), array(c).astype(c["dtype"])), name
    body = json.loads(case["json"])
    for name, p in body["params"].items():
        assert same_bits(decode_tensor(p), array(case["tensors"][name]).astype(p["dtype"]))


@pytest.mark.parametrize("case", load("problems"), ids=lambda c: f"{c['status']}-{c['code']}")
def test_problems(case: dict[str, Any]) -> None:
    import httpx

    error = api_error(case["status"], case["problem"], headers=httpx.Headers(case.get("headers", {})))
    assert type(error).__name__ == case["class"]
    assert error.code == case["code"]
    if "current_steps" in case:
        assert error.current_steps == case["current_steps"]  # type: ignore[attr-defined]
    if "existing" in case:
        assert error.existing == case["existing"]  # type: ignore[attr-defined]
    if "retry_after" in case:
        assert error.retry_after == case["retry_after"]


def test_hostile_bodies_get_the_answers_of_the_vectors() -> None:
    """The server answers each hostile body of ``hostile.json`` as recorded, and the Python SDK makes the
    recorded error class of it (the TypeScript client's tests check the same file against a real server)."""
    import asyncio

    spec = importlib.util.spec_from_file_location("hostile_vectors", VECTORS / "hostile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert asyncio.run(module.answers()) == load("hostile")
