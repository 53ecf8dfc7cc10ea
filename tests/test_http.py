"""HTTP API v1: every endpoint and every error status, on every store backend."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from momentum_service.api import create_app
from momentum_service.kernels import SGDConfig, sgd_update
from momentum_service.settings import Settings
from momentum_service.store import Journal
from momentum_service.store.redis import RedisJournal

from .helpers import free_port

PROBLEM = "application/problem+json"
OPT = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0, "maximize": False}
OPT_OUT = {"rule": "pytorch", **OPT}
CONSTANT = {"type": "constant"}


def tensor(values: Any, dtype: str = "float32") -> dict[str, Any]:
    a = np.asarray(values, dtype=dtype)
    return {"shape": list(a.shape), "dtype": dtype, "data": a.astype(np.float64).ravel().tolist()}


def array(t: dict[str, Any]) -> np.ndarray:
    return np.asarray(t["data"], dtype=np.float64).astype(t["dtype"]).reshape(t["shape"])


def make_client(store: Journal, **settings: Any) -> httpx.AsyncClient:
    app = create_app(Settings(**settings), journal=store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def api(store: Journal) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store) as client:
        yield client


@pytest.fixture
async def model(api: httpx.AsyncClient) -> str:
    r = await api.put("/v1/models/mnist", json={"optimizer": OPT})
    assert r.status_code == 201
    r = await api.put("/v1/models/mnist/params", json={"params": {"w": tensor([[1, 2], [3, 4]]), "b": tensor([0.5])}})
    assert r.status_code == 201
    return "mnist"


def assert_problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["type"].startswith("urn:momentum-service:problem:")
    if slug:
        assert body["type"].endswith(":" + slug), body["type"]
    return body


async def snapshot(api: httpx.AsyncClient, model: str) -> Any:
    r = await api.get(f"/v1/models/{model}/params", params={"include": "velocity"})
    m = await api.get(f"/v1/models/{model}")
    return r.json(), m.json()


# Models


async def test_put_model_creates_then_replaces(api: httpx.AsyncClient, model: str) -> None:
    r = await api.put("/v1/models/other", json={"optimizer": {"lr": 0.5}})
    assert r.status_code == 201 and r.headers["location"] == "/v1/models/other"
    assert r.json() == {
        "name": "other",
        "optimizer": {**OPT_OUT, "lr": 0.5, "momentum": 0.0},
        "schedule": CONSTANT,
        "mode": "async",
        "durability": "step",
        "params": {},
    }
    r = await api.put(f"/v1/models/{model}", json={"optimizer": {"lr": 0.2, "momentum": 0.5}})
    assert r.status_code == 200
    assert r.json()["optimizer"]["lr"] == 0.2
    assert set(r.json()["params"]) == {"b", "w"}  # parameters kept


async def test_put_model_if_none_match_only_creates(api: httpx.AsyncClient, model: str) -> None:
    """A restarted worker's create must never undo a trained model's config (412, nothing changed)."""
    grad = {"gradients": {"w": tensor([[1, 1], [1, 1]])}}
    for _ in range(3):
        assert (await api.post(f"/v1/models/{model}/step", json=grad)).status_code == 200
    before = await snapshot(api, model)
    r = await api.put(f"/v1/models/{model}", json={"optimizer": {"lr": 0.5}}, headers={"if-none-match": "*"})
    body = assert_problem(r, 412, "model-exists")
    assert body["existing"] == {"optimizer": OPT_OUT, "schedule": CONSTANT, "mode": "async", "durability": "step"}
    assert "PATCH" in body["detail"]
    assert await snapshot(api, model) == before  # momentum still 0.9, every step and velocity kept
    r = await api.put("/v1/models/fresh", json={"optimizer": {"lr": 0.5}}, headers={"if-none-match": "*"})
    assert r.status_code == 201 and r.json()["optimizer"]["lr"] == 0.5
    r = await api.put("/v1/models/fresh", json={"optimizer": {"lr": 0.5}}, headers={"if-none-match": '"x"'})
    assert_problem(r, 422)


async def test_get_model(api: httpx.AsyncClient, model: str) -> None:
    r = await api.get(f"/v1/models/{model}")
    assert r.status_code == 200
    assert r.json() == {
        "name": "mnist",
        "optimizer": OPT_OUT,
        "schedule": CONSTANT,
        "mode": "async",
        "durability": "step",
        "params": {
            "b": {"shape": [1], "dtype": "float32", "step": 0},
            "w": {"shape": [2, 2], "dtype": "float32", "step": 0},
        },
    }
    assert_problem(await api.get("/v1/models/nope"), 404, "model-not-found")


@pytest.mark.parametrize(
    "optimizer",
    [
        {"lr": -1},
        {"lr": 0.1, "momentum": -0.9},
        {"lr": 0.1, "dampening": -0.1},
        {"lr": 0.1, "weight_decay": -1},
        {"lr": 0.1, "nesterov": True},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "nesterov": True},
        {"lr": "0.1"},
        {"lr": True},
        {"momentum": 0.9},
        {"lr": 0.1, "betas": [0.9, 0.99]},
        {"lr": 1e300, "momentum": 1e300, "weight_decay": 1e-300, "nesterov": None},
        [],
    ],
)
async def test_put_model_rejects_invalid_hyperparameters(api: httpx.AsyncClient, optimizer: Any) -> None:
    body = assert_problem(await api.put("/v1/models/x", json={"optimizer": optimizer}), 422)
    assert body["errors"]
    raw = b'{"optimizer": {"lr": 1e309}}'
    body = assert_problem(await api.put("/v1/models/x", content=raw, headers={"content-type": "application/json"}), 422)
    assert body["errors"]
    assert_problem(await api.get("/v1/models/x"), 404)  # nothing was created


@pytest.mark.parametrize("name", ["-starts-with-dash", "has space", "a" * 129, "slash%2Fx", "ünïcode"])
async def test_invalid_model_names(api: httpx.AsyncClient, name: str) -> None:
    r = await api.put(f"/v1/models/{name}", json={"optimizer": {"lr": 0.1}})
    assert r.status_code in (404, 422), r.text  # 404 only when the name makes the path match no route
    assert r.headers["content-type"] == PROBLEM


async def test_patch_model_applies_from_next_step(api: httpx.AsyncClient, model: str) -> None:
    r = await api.patch(f"/v1/models/{model}", json={"optimizer": {"lr": 0.01, "nesterov": True}})
    assert r.status_code == 200
    assert r.json()["optimizer"] == {**OPT_OUT, "lr": 0.01, "nesterov": True}
    r = await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1.0])}})
    expected, _ = sgd_update(
        SGDConfig(lr=0.01, momentum=0.9, nesterov=True), np.float32([0.5]), None, np.float32([1.0])
    )
    assert array(r.json()["params"]["b"]).tobytes() == expected.tobytes()


async def test_patch_model_invalid_result_changes_nothing(api: httpx.AsyncClient, model: str) -> None:
    before = await snapshot(api, model)
    assert_problem(
        await api.patch(f"/v1/models/{model}", json={"optimizer": {"dampening": 0.3, "nesterov": True}}), 422
    )
    assert_problem(await api.patch(f"/v1/models/{model}", json={"optimizer": {"lr": -1}}), 422)
    assert_problem(await api.patch(f"/v1/models/{model}", json={"optimizer": {"bogus": 1}}), 422)
    assert_problem(await api.patch(f"/v1/models/{model}", json={"optimizer": {"lr": None}}), 422)
    assert_problem(await api.patch("/v1/models/nope", json={"optimizer": {"lr": 1}}), 404)
    assert await snapshot(api, model) == before


async def test_delete_model(api: httpx.AsyncClient, model: str) -> None:
    r = await api.delete(f"/v1/models/{model}")
    assert r.status_code == 204 and r.content == b""
    assert_problem(await api.get(f"/v1/models/{model}"), 404)
    assert_problem(await api.delete(f"/v1/models/{model}"), 404)
    await api.put(f"/v1/models/{model}", json={"optimizer": OPT})
    assert (await api.get(f"/v1/models/{model}")).json()["params"] == {}  # all state was gone


# Parameters


async def test_put_param_sets_and_resets(api: httpx.AsyncClient, model: str) -> None:
    await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1.0])}})
    r = await api.put(f"/v1/models/{model}/params/b", json=tensor([7.0]))
    assert r.status_code == 200
    assert r.json() == {"name": "b", "shape": [1], "dtype": "float32", "step": 0}
    r = await api.get(f"/v1/models/{model}/params/b", params={"include": "velocity"})
    assert r.json() == {"name": "b", "shape": [1], "dtype": "float32", "step": 0, "data": [7.0], "velocity": None}
    r = await api.put(f"/v1/models/{model}/params/layer1.0.conv1.weight", json=tensor(np.ones((2, 1, 3, 3)), "float64"))
    assert r.status_code == 201 and r.headers["location"] == f"/v1/models/{model}/params/layer1.0.conv1.weight"


async def test_put_param_if_none_match(api: httpx.AsyncClient, model: str) -> None:
    r = await api.put(f"/v1/models/{model}/params/new", json=tensor([1.0]), headers={"If-None-Match": "*"})
    assert r.status_code == 201
    await api.post(f"/v1/models/{model}/step", json={"gradients": {"new": tensor([1.0])}})
    before = await snapshot(api, model)
    body = assert_problem(
        await api.put(f"/v1/models/{model}/params/new", json=tensor([9.0]), headers={"If-None-Match": "*"}), 412
    )
    assert body["existing"] == ["new"]
    assert_problem(
        await api.put(f"/v1/models/{model}/params/new", json=tensor([9.0]), headers={"If-None-Match": '"x"'}), 422
    )
    assert await snapshot(api, model) == before


async def test_put_params_bulk(api: httpx.AsyncClient, model: str) -> None:
    r = await api.put(f"/v1/models/{model}/params", json={"params": {"w": tensor([[0, 0], [0, 0]]), "c": tensor(3.0)}})
    assert r.status_code == 200
    assert r.json()["params"] == {
        "w": {"shape": [2, 2], "dtype": "float32", "step": 0, "created": False},
        "c": {"shape": [], "dtype": "float32", "step": 0, "created": True},
    }
    before = await snapshot(api, model)
    body = assert_problem(
        await api.put(
            f"/v1/models/{model}/params",
            json={"params": {"d": tensor([1.0]), "c": tensor(1.0), "b": tensor([1.0])}},
            headers={"If-None-Match": "*"},
        ),
        412,
    )
    assert body["existing"] == ["b", "c"]
    assert await snapshot(api, model) == before  # d was not created either
    r = await api.put(
        f"/v1/models/{model}/params", json={"params": {"d": tensor([1.0])}}, headers={"If-None-Match": "*"}
    )
    assert r.status_code == 201


async def test_put_params_on_missing_model(api: httpx.AsyncClient) -> None:
    assert_problem(await api.put("/v1/models/nope/params/w", json=tensor([1.0])), 404, "model-not-found")
    assert_problem(await api.put("/v1/models/nope/params", json={"params": {"w": tensor([1.0])}}), 404)


async def test_get_params(api: httpx.AsyncClient, model: str) -> None:
    r = await api.get(f"/v1/models/{model}/params")
    assert r.status_code == 200
    assert r.json() == {
        "params": {
            "b": {"name": "b", "shape": [1], "dtype": "float32", "step": 0, "data": [0.5]},
            "w": {"name": "w", "shape": [2, 2], "dtype": "float32", "step": 0, "data": [1.0, 2.0, 3.0, 4.0]},
        }
    }
    r = await api.get(f"/v1/models/{model}/params", params={"names": "w"})
    assert list(r.json()["params"]) == ["w"]
    body = assert_problem(
        await api.get(f"/v1/models/{model}/params", params={"names": "w,x,y"}), 404, "param-not-found"
    )
    assert body["missing"] == ["x", "y"]
    assert_problem(await api.get(f"/v1/models/{model}/params", params={"names": "w,bad name"}), 422)
    assert_problem(await api.get(f"/v1/models/{model}/params", params={"names": ","}), 422)
    assert_problem(await api.get("/v1/models/nope/params"), 404)


async def test_get_param_with_velocity(api: httpx.AsyncClient, model: str) -> None:
    await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([0.25])}})
    r = await api.get(f"/v1/models/{model}/params/b", params={"include": "velocity"})
    assert r.json()["velocity"] == tensor([0.25])
    assert "velocity" not in (await api.get(f"/v1/models/{model}/params/b")).json()
    assert_problem(await api.get(f"/v1/models/{model}/params/b", params={"include": "gradients"}), 422)
    assert_problem(await api.get(f"/v1/models/{model}/params/zz"), 404, "param-not-found")


async def test_delete_param(api: httpx.AsyncClient, model: str) -> None:
    assert (await api.delete(f"/v1/models/{model}/params/b")).status_code == 204
    assert_problem(await api.delete(f"/v1/models/{model}/params/b"), 404)
    assert_problem(await api.get(f"/v1/models/{model}/params/b"), 404)
    assert_problem(await api.delete("/v1/models/nope/params/b"), 404, "model-not-found")


# Step


async def test_step_applies_the_momentum_rule(api: httpx.AsyncClient, model: str) -> None:
    cfg = SGDConfig(**OPT)
    w, vw = np.float32([[1, 2], [3, 4]]), None
    for k in range(3):
        g = np.float32([[0.1, -0.2], [0.3, k]])
        r = await api.post(f"/v1/models/{model}/step", json={"gradients": {"w": tensor(g)}})
        assert r.status_code == 200
        w, vw = sgd_update(cfg, w, vw, g)
        out = r.json()["params"]
        assert list(out) == ["w"] and out["w"]["step"] == k + 1
        assert out["w"]["shape"] == [2, 2] and out["w"]["dtype"] == "float32"
        assert array(out["w"]).tobytes() == w.tobytes()
    r = await api.post(
        f"/v1/models/{model}/step", json={"gradients": {"w": tensor(g), "b": tensor([1])}, "return_params": False}
    )
    assert r.json() == {"params": {"w": {"step": 4, "lr": 0.1}, "b": {"step": 1, "lr": 0.1}}}


async def test_step_float64(api: httpx.AsyncClient) -> None:
    await api.put("/v1/models/m64", json={"optimizer": {"lr": 0.3, "momentum": 0.5, "weight_decay": 0.01}})
    p = np.random.default_rng(0).standard_normal(10)
    await api.put("/v1/models/m64/params/p", json=tensor(p, "float64"))
    g = np.random.default_rng(1).standard_normal(10)
    r = await api.post("/v1/models/m64/step", json={"gradients": {"p": tensor(g, "float64")}})
    expected, _ = sgd_update(SGDConfig(lr=0.3, momentum=0.5, weight_decay=0.01), p, None, g)
    assert array(r.json()["params"]["p"]).tobytes() == expected.tobytes()


async def test_step_with_unknown_or_mismatched_params_applies_to_none(api: httpx.AsyncClient, model: str) -> None:
    before = await snapshot(api, model)
    body = assert_problem(
        await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1.0]), "nope": tensor([1.0])}}), 404
    )
    assert body["missing"] == ["nope"]
    body = assert_problem(
        await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1.0]), "w": tensor([1.0, 2.0])}}),
        409,
        "tensor-mismatch",
    )
    assert body["mismatches"]["w"] == {
        "expected": {"shape": [2, 2], "dtype": "float32"},
        "got": {"shape": [2], "dtype": "float32"},
    }
    assert_problem(await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1.0], "float64")}}), 409)
    assert_problem(await api.post("/v1/models/nope/step", json={"gradients": {"b": tensor([1.0])}}), 404)
    assert await snapshot(api, model) == before


async def test_step_that_overflows_applies_nothing(api: httpx.AsyncClient, model: str) -> None:
    await api.patch(f"/v1/models/{model}", json={"optimizer": {"lr": 1e38}})
    before = await snapshot(api, model)
    assert_problem(
        await api.post(f"/v1/models/{model}/step", json={"gradients": {"b": tensor([1e10])}}), 422, "non-finite-result"
    )
    assert await snapshot(api, model) == before


BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed", b'{"gradients": {', 422),
    ("nan literal", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [NaN]}}}', 422),
    ("infinity literal", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [Infinity]}}}', 422),
    ("overflow to inf", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [1e400]}}}', 422),
    ("float32 overflow", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [1e39]}}}', 422),
    ("length != prod(shape)", b'{"gradients": {"b": {"shape": [2], "dtype": "float32", "data": [1]}}}', 422),
    ("negative dim", b'{"gradients": {"b": {"shape": [-1], "dtype": "float32", "data": [1]}}}', 422),
    ("string number", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": ["1"]}}}', 422),
    ("bool number", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [true]}}}', 422),
    ("nested data", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [[1]]}}}', 422),
    ("bad dtype", b'{"gradients": {"b": {"shape": [1], "dtype": "int8", "data": [1]}}}', 422),
    ("bad name", b'{"gradients": {"b b": {"shape": [1], "dtype": "float32", "data": [1]}}}', 422),
    ("empty gradients", b'{"gradients": {}}', 422),
    ("not an object", b"[1, 2, 3]", 422),
    ("empty body", b"", 422),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 422),
    ("huge integer", b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [' + b"9" * 5000 + b"]}}}", 422),
    (
        "element cap",
        b'{"gradients": {"b": {"shape": [1099511627776, 1099511627776], "dtype": "float32", "data": []}}}',
        413,
    ),
    (
        "too many dims",
        b'{"gradients": {"b": {"shape": [' + b",".join([b"1"] * 33) + b'], "dtype": "float32", "data": [1]}}}',
        422,
    ),
    ("invalid utf-8", b'{"gradients": {"\xff": 1}}', 422),
]


@pytest.mark.parametrize(("case", "raw", "status"), BAD_BODIES, ids=[c for c, _, _ in BAD_BODIES])
async def test_bad_step_bodies_are_4xx_and_change_nothing(
    api: httpx.AsyncClient, model: str, case: str, raw: bytes, status: int
) -> None:
    before = await snapshot(api, model)
    r = await api.post(f"/v1/models/{model}/step", content=raw, headers={"content-type": "application/json"})
    assert_problem(r, status)
    assert await snapshot(api, model) == before


async def test_bad_param_bodies(api: httpx.AsyncClient, model: str) -> None:
    for raw in (
        b'{"shape": [2], "dtype": "float32", "data": [1]}',
        b'{"shape": [1], "dtype": "float32", "data": [NaN]}',
    ):
        r = await api.put(f"/v1/models/{model}/params/w", content=raw, headers={"content-type": "application/json"})
        assert_problem(r, 422)
    assert_problem(await api.put(f"/v1/models/{model}/params/bad name", json=tensor([1.0])), 422)


async def test_unsupported_media_type(api: httpx.AsyncClient, model: str) -> None:
    before = await snapshot(api, model)
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = await api.post(
            f"/v1/models/{model}/step",
            content=b'{"gradients": {"b": {"shape": [1], "dtype": "float32", "data": [1]}}}',
            headers=headers,
        )
        assert_problem(r, 415, "unsupported-media-type")
    r = await api.put("/v1/models/x", content=b'{"optimizer": {"lr": 1}}', headers={"content-type": "application/xml"})
    assert_problem(r, 415)
    assert await snapshot(api, model) == before
    r = await api.post(
        f"/v1/models/{model}/step",
        json={"gradients": {"b": tensor([1])}},
        headers={"content-type": "application/merge-patch+json"},
    )
    assert r.status_code == 200  # any +json media type is JSON


async def test_body_over_the_limit(store: Journal) -> None:
    async with make_client(store, max_body_bytes=1000) as api:
        await api.put("/v1/models/m", json={"optimizer": OPT})
        await api.put("/v1/models/m/params/w", json=tensor(np.zeros(10)))
        big = tensor(np.zeros(500))
        assert_problem(await api.post("/v1/models/m/step", json={"gradients": {"w": big}}), 413, "body-too-large")
        assert_problem(await api.put("/v1/models/m/params/w", json=big), 413)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(100):
                yield b" " * 100

        r = await api.post("/v1/models/m/step", content=chunks(), headers={"content-type": "application/json"})
        assert_problem(r, 413)
        assert (await api.get("/v1/models/m/params/w")).json()["step"] == 0


async def test_tensor_over_the_element_cap(store: Journal) -> None:
    async with make_client(store, max_tensor_elements=100) as api:
        await api.put("/v1/models/m", json={"optimizer": OPT})
        assert_problem(await api.put("/v1/models/m/params/w", json=tensor(np.zeros(101))), 413, "tensor-too-large")
        assert (await api.put("/v1/models/m/params/w", json=tensor(np.zeros(100)))).status_code == 201


# Service endpoints


async def test_health_ready_and_docs(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    r = await api.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    spec = (await api.get("/openapi.json")).json()
    assert {"/v1/models/{model}", "/v1/models/{model}/step", "/v1/models/{model}/params/{name}"} <= set(spec["paths"])
    step_body = spec["paths"]["/v1/models/{model}/step"]["post"]["requestBody"]["content"]["application/json"]
    assert step_body["schema"]["$ref"] == "#/components/schemas/StepRequest"
    assert "StepRequest" in spec["components"]["schemas"] and "Tensor" in spec["components"]["schemas"]
    assert (await api.get("/docs")).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_docs_need_no_network(api: httpx.AsyncClient, page: str) -> None:
    """Every script and stylesheet of the docs pages comes from the server itself (no CDN)."""
    html = (await api.get(page)).text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "http://" not in html and "https://" not in html
    for url in urls:
        r = await api.get(url)
        assert r.status_code == 200 and len(r.content) > 100, url


async def test_unknown_routes_and_methods_are_problems(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v2/nothing"), 404)
    assert_problem(await api.post("/v1/models/x"), 405)


async def test_store_unreachable_is_503(redis_prefix: str) -> None:
    dead = RedisJournal.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=redis_prefix, timeout=0.5)
    async with make_client(dead) as api:
        assert (await api.get("/healthz")).status_code == 200
        body = assert_problem(await api.get("/readyz"), 503, "store-unavailable")
        assert body["detail"]
        r = await api.post("/v1/models/m/step", json={"gradients": {"w": tensor([1.0])}})
        assert_problem(r, 503)
        assert r.headers["retry-after"] == "1"
        assert_problem(await api.put("/v1/models/m", json={"optimizer": OPT}), 503)


async def test_an_unexpected_error_before_the_routes_is_still_problem_json(
    api: httpx.AsyncClient, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in admission (here: the buffer pool raising) is a 500 problem+json, not a dropped connection."""
    from momentum_service.api import admission

    def broken(n: int, dtype: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(admission.POOL, "empty", broken)
    r = await api.post(f"/v1/models/{model}/step", json={"gradients": {"w": tensor([[1, 1], [1, 1]])}})
    assert_problem(r, 500, "internal")


async def test_replicated_durability_acknowledges_once_the_replicas_have_the_step(
    api: httpx.AsyncClient, store: Journal
) -> None:
    """``{"replicas": 1}``: on the cluster (a replica per primary) steps are acknowledged; a single Redis without
    replicas answers 503 (and the step replays once a retry can be confirmed); the embedded store refuses it."""
    r = await api.put("/v1/models/dur", json={"optimizer": OPT, "durability": {"replicas": 1}})
    if store.kind == "memory":
        body = assert_problem(r, 422)
        assert "durability" in body["detail"] and "embedded store" in body["detail"]
        assert (await api.get("/v1/models/dur")).status_code == 404  # nothing created
        return
    assert r.status_code == 201 and r.json()["durability"] == {"replicas": 1}
    assert (await api.put("/v1/models/dur/params/w", json=tensor([1.0, 2.0]))).status_code in (201, 503)
    step = {"gradients": {"w": tensor([0.5, 0.5])}}
    r = await api.post("/v1/models/dur/step", json=step, headers={"Idempotency-Key": "k1"})
    if isinstance(store, RedisJournal) and store.cluster:
        assert r.status_code == 200, r.text
        assert r.json()["params"]["w"]["step"] == 1
    else:
        body = assert_problem(r, 503)
        assert "replicas" in body["detail"]
    for bad in ({"replicas": 0}, {"replicas": 9}, {"replicas": 1, "flush_ms": 5}, {"replicas": "1"}):
        assert_problem(await api.patch("/v1/models/dur", json={"durability": bad}), 422)
