"""Unit tests of the Python SDK against ``httpx.MockTransport``: requests built, responses parsed,
errors mapped. Every API test runs on both ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import email.utils
import inspect
import json
import pickle
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import pytest
from momentum_client import _exceptions, _tensors

from .helpers import Api

BASE = "http://momentum.test:8000"
PROBLEM = "application/problem+json"

Handler = Callable[[httpx.Request], httpx.Response]


def ok(body: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def problem(status: int, slug: str = "x", detail: str = "it went wrong", **ext: Any) -> httpx.Response:
    body = {
        "type": f"urn:momentum-service:problem:{slug}",
        "title": slug.replace("-", " "),
        "status": status,
        "detail": detail,
        "instance": "/v1/models/m",
        **ext,
    }
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": PROBLEM})


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


def tensor(arr: np.ndarray) -> dict[str, Any]:
    """How the server sends a tensor: float64 digits, flat, row-major."""
    return {"shape": list(arr.shape), "dtype": arr.dtype.name, "data": arr.astype(np.float64).ravel().tolist()}


MODEL_JSON = {
    "name": "m",
    "optimizer": {
        "lr": 0.01,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": True,
        "weight_decay": 0.0001,
        "maximize": False,
    },
    "params": {
        "w": {"shape": [2, 3], "dtype": "float32", "step": 7},
        "b": {"shape": [], "dtype": "float64", "step": 0},
    },
}

EXPECTED_MODEL = mc.ModelInfo(
    name="m",
    optimizer=mc.OptimizerConfig(
        lr=0.01, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0001, maximize=False
    ),
    params={"w": mc.ParamInfo((2, 3), "float32", 7), "b": mc.ParamInfo((), "float64", 0)},
)


class Server:
    """Answers requests from a queue of responses (or handlers) and records them."""

    def __init__(self, *answers: httpx.Response | Handler | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if not self.answers:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer(request) if callable(answer) else answer

    @property
    def only(self) -> httpx.Request:
        assert len(self.requests) == 1, self.requests
        return self.requests[0]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., tuple[Api, Server]]]:
    """``connect(*answers)`` -> (api, server): a client of the parametrized kind over a mock server."""
    clients: list[mc.Client | mc.AsyncClient] = []

    def make(*answers: httpx.Response | Handler | Exception, base_url: str = BASE) -> tuple[Api, Server]:
        server = Server(*answers)
        transport = httpx.MockTransport(server)
        client: mc.Client | mc.AsyncClient
        # These tests read the JSON bodies; the binary wire format has its own tests (test_client_wire.py).
        if request.param == "sync":
            client = mc.Client(base_url, transport=transport, wire="json")
        else:
            client = mc.AsyncClient(base_url, transport=transport, wire="json")
        clients.append(client)
        return Api(client), server

    yield make
    for c in clients:
        if isinstance(c, mc.AsyncClient):
            await c.aclose()
        else:
            c.close()


# -- the two clients mirror each other -------------------------------------------------------------


def public_methods(cls: type) -> dict[str, Any]:
    return {n: f for n, f in vars(cls).items() if not n.startswith("_") and inspect.isfunction(f)}


def test_clients_expose_the_same_methods_and_signatures() -> None:
    sync, aio = public_methods(mc.Client), public_methods(mc.AsyncClient)
    assert sync.keys() == aio.keys() - {"aclose"}  # AsyncClient closes with aclose (as httpx's), close its alias
    assert {"create_model", "update_model", "get_model", "delete_model", "init_params", "get_params"} <= sync.keys()
    assert {"get_param_state", "delete_param", "step", "push_gradients", "health", "ready", "close"} <= sync.keys()
    for name in sync:
        assert inspect.signature(sync[name]) == inspect.signature(aio[name]), name
        assert not inspect.iscoroutinefunction(sync[name]), name
        assert inspect.iscoroutinefunction(aio[name]), name


async def test_async_client_aclose_and_its_alias_close() -> None:
    for close in ("aclose", "close"):
        client = mc.AsyncClient(BASE, transport=httpx.MockTransport(Server()))
        await getattr(client, close)()
        assert client._http.is_closed, close
    async with mc.AsyncClient(BASE, transport=httpx.MockTransport(Server())) as client:
        pass
    assert client._http.is_closed
    http = httpx.AsyncClient(transport=httpx.MockTransport(Server()))
    async with mc.AsyncClient(BASE, client=http) as client:
        await client.close()
    assert not http.is_closed  # a client passed in is left open
    await http.aclose()


def test_constructors_take_the_same_arguments() -> None:
    sync = inspect.signature(mc.Client.__init__).parameters
    aio = inspect.signature(mc.AsyncClient.__init__).parameters
    expected = [
        "self",
        "base_url",
        "timeout",
        "transport",
        "client",
        "headers",
        "max_retries",
        "sync_wait",
        "wire",
        "api_key",
        "cast_gradients",
        "on_step_back",
        "follow_owner",
    ]
    assert list(sync) == list(aio) == expected
    for name in sync:
        assert (sync[name].kind, sync[name].default) == (aio[name].kind, aio[name].default)


def test_public_names() -> None:
    assert mc.__version__ == "0.1.0"
    for name in mc.__all__:
        assert hasattr(mc, name), name
    assert mc.Client.__module__ == "momentum_client"
    assert mc.StepTimeout.__module__ == "momentum_client"
    assert not [n for n in mc.__all__ if n.startswith("_") and n != "__version__"]
    assert {"StepTimeout", "Conflict", "StepResult", "ModelInfo"} <= set(mc.__all__)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_retries": -1}, ValueError),
        ({"max_retries": 1.5}, TypeError),
        ({"max_retries": True}, TypeError),
        ({"sync_wait": -0.1}, ValueError),
        ({"sync_wait": float("nan")}, ValueError),
        ({"sync_wait": "5"}, TypeError),
    ],
)
def test_retry_settings_are_checked(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        mc.Client(BASE, **kwargs)
    with pytest.raises(error, match=next(iter(kwargs))):
        mc.AsyncClient(BASE, **kwargs)


# -- models ----------------------------------------------------------------------------------------


async def test_create_model(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(MODEL_JSON, 201))
    info = await api("create_model", "m", lr=0.01, momentum=np.float32(0.5), nesterov=np.bool_(True))
    assert info == EXPECTED_MODEL
    req = server.only
    assert (req.method, str(req.url)) == ("PUT", f"{BASE}/v1/models/m")
    assert req.headers["content-type"] == "application/json"
    assert "application/problem+json" in req.headers["accept"]
    assert req.headers["user-agent"] == f"momentum-client/{mc.__version__}"
    # Fields at their neutral value are left out, so that rules without them are not sent them.
    assert body_of(req) == {"optimizer": {"rule": "pytorch", "lr": 0.01, "momentum": 0.5, "nesterov": True}}


async def test_create_model_with_a_rule_and_a_schedule(connect: Callable[..., tuple[Api, Server]]) -> None:
    schedule = {"type": "cosine", "T_max": 100, "eta_min": 0.0}
    reply = {**MODEL_JSON, "optimizer": {"rule": "keras", "lr": 0.1, "momentum": 0.9}, "schedule": schedule}
    api, server = connect(ok(reply, 201))
    info = await api("create_model", "m", lr=0.1, momentum=0.9, rule="keras", weight_decay=0.01, schedule=schedule)
    assert body_of(server.only) == {
        "optimizer": {"rule": "keras", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        "schedule": schedule,
    }
    assert info.optimizer == mc.OptimizerConfig(lr=0.1, momentum=0.9, rule="keras")
    assert info.schedule == schedule


async def test_update_model_schedule_only(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(MODEL_JSON))
    await api("update_model", "m", schedule={"type": "exponential", "gamma": 0.9})
    assert body_of(server.only) == {"schedule": {"type": "exponential", "gamma": 0.9}}
    with pytest.raises(TypeError, match="at least one"):
        await api("update_model", "m")
    with pytest.raises(TypeError, match="schedule must be a mapping"):
        await api("update_model", "m", schedule="cosine")


async def test_create_model_with_a_mode(connect: Callable[..., tuple[Api, Server]]) -> None:
    reply = {**MODEL_JSON, "mode": "sync", "workers": 4}
    api, server = connect(ok(reply, 201), ok({**MODEL_JSON, "mode": "bounded", "max_staleness": 2}), ok(MODEL_JSON))
    info = await api("create_model", "m", lr=0.01, mode="sync", workers=np.int64(4))
    assert body_of(server.requests[0]) == {
        "optimizer": {"rule": "pytorch", "lr": 0.01, "momentum": 0.0},
        "mode": "sync",
        "workers": 4,
    }
    assert (info.mode, info.workers, info.max_staleness) == ("sync", 4, None)
    info = await api("create_model", "m", lr=0.01, mode="bounded", max_staleness=2)
    assert body_of(server.requests[1]) == {
        "optimizer": {"rule": "pytorch", "lr": 0.01, "momentum": 0.0},
        "mode": "bounded",
        "max_staleness": 2,
    }
    assert (info.mode, info.workers, info.max_staleness) == ("bounded", None, 2)
    await api("create_model", "m", lr=0.01, mode="async")  # the default: not sent
    assert body_of(server.requests[2]) == {"optimizer": {"rule": "pytorch", "lr": 0.01, "momentum": 0.0}}
    with pytest.raises(TypeError, match="workers must be an int"):
        await api("create_model", "m", lr=0.01, mode="sync", workers=2.5)
    with pytest.raises(TypeError, match="mode must be a str"):
        await api("create_model", "m", lr=0.01, mode=None)
    assert len(server.requests) == 3


def test_model_info_mode_fields_come_last_with_defaults() -> None:
    info = mc.ModelInfo("m", mc.OptimizerConfig(lr=0.1), {}, {"type": "constant"})
    assert (info.mode, info.workers, info.max_staleness) == ("async", None, None)
    assert EXPECTED_MODEL.mode == "async"  # parsed from a representation without mode fields
    sync = mc.ModelInfo("m", mc.OptimizerConfig(lr=0.1), {}, {"type": "constant"}, "sync", 3)
    assert (sync.mode, sync.workers) == ("sync", 3)


async def test_durability_is_sent_when_given_and_parsed(connect: Callable[..., tuple[Api, Server]]) -> None:
    flush = {**MODEL_JSON, "durability": {"flush_ms": 50}}
    api, server = connect(ok(flush, 201), ok(flush), ok(MODEL_JSON))
    info = await api("create_model", "m", lr=0.1, durability={"flush_ms": 50})
    assert info.durability == {"flush_ms": 50} and body_of(server.requests[0])["durability"] == {"flush_ms": 50}
    await api("update_model", "m", durability={"flush_ms": 50})
    assert body_of(server.requests[1]) == {"durability": {"flush_ms": 50}}
    assert (await api("update_model", "m", durability="step")).durability == "step"
    assert body_of(server.requests[2]) == {"durability": "step"}
    for bad in ("always", {"flush_ms": 1.5}, {"flush": 5}, {"replicas": 1, "flush_ms": 5}):
        with pytest.raises((ValueError, TypeError), match="durability"):
            await api("update_model", "m", durability=bad)
    assert len(server.requests) == 3


async def test_replicated_durability_is_sent_and_parsed(connect: Callable[..., tuple[Api, Server]]) -> None:
    replicated = {**MODEL_JSON, "durability": {"replicas": 1}}
    api, server = connect(ok(replicated, 201))
    info = await api("create_model", "m", lr=0.1, durability={"replicas": 1})
    assert info.durability == {"replicas": 1} and body_of(server.requests[0])["durability"] == {"replicas": 1}


async def test_update_model_mode_fields(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(MODEL_JSON), ok(MODEL_JSON), ok(MODEL_JSON))
    await api("update_model", "m", mode="sync", workers=2)
    assert body_of(server.requests[0]) == {"mode": "sync", "workers": 2}
    await api("update_model", "m", max_staleness=0)  # 0 is a value, not "nothing"
    assert body_of(server.requests[1]) == {"max_staleness": 0}
    await api("update_model", "m", lr=0.2, schedule={"type": "constant"}, mode="async")
    assert body_of(server.requests[2]) == {"optimizer": {"lr": 0.2}, "schedule": {"type": "constant"}, "mode": "async"}
    with pytest.raises(
        TypeError, match="at least one hyperparameter, a schedule, mode, workers, max_staleness, durability or groups"
    ):
        await api("update_model", "m", mode=None, workers=None)
    assert len(server.requests) == 3


async def test_create_model_rejects_non_finite_hyperparameters(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect()
    with pytest.raises(ValueError, match="lr must be finite"):
        await api("create_model", "m", lr=float("nan"))
    with pytest.raises(ValueError, match="momentum must be finite"):
        await api("update_model", "m", momentum=float("inf"))
    assert server.requests == []


async def test_update_model_sends_only_the_given_fields(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(MODEL_JSON))
    assert await api("update_model", "m", lr=0.5, maximize=True) == EXPECTED_MODEL
    assert server.only.method == "PATCH"
    assert body_of(server.only) == {"optimizer": {"lr": 0.5, "maximize": True}}


async def test_update_model_rejects_unknown_names_before_sending(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect()
    with pytest.raises(TypeError, match=r"'learning_rate'.*valid names are lr, momentum, dampening, nesterov"):
        await api("update_model", "m", learning_rate=0.1)
    assert server.requests == []


async def test_get_and_delete_model(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(MODEL_JSON), httpx.Response(204))
    assert await api("get_model", "m") == EXPECTED_MODEL
    assert await api("delete_model", "m") is None
    assert [(r.method, r.url.path) for r in server.requests] == [("GET", "/v1/models/m"), ("DELETE", "/v1/models/m")]


async def test_base_url_prefix_and_path_encoding(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(httpx.Response(204), base_url=BASE + "/momentum/")
    await api("delete_param", "m", "layer1:0/weight")
    assert server.only.url.raw_path == b"/momentum/v1/models/m/params/layer1%3A0%2Fweight"


@pytest.mark.parametrize("bad", ["", ".", ".."])
async def test_names_that_cannot_be_path_segments(connect: Callable[..., tuple[Api, Server]], bad: str) -> None:
    api, server = connect()
    with pytest.raises(ValueError, match="URL path segment"):
        await api("get_model", bad)
    with pytest.raises(ValueError, match="URL path segment"):
        await api("step", "m", {bad: np.zeros(1)})
    assert server.requests == []


# -- parameters ------------------------------------------------------------------------------------


def created_body(flags: dict[str, bool], shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "params": {n: {"shape": shape or [2], "dtype": "float32", "step": 0, "created": c} for n, c in flags.items()}
    }


async def test_init_params_overwrites_with_a_plain_put(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok(created_body({"w": False, "b": True})))
    w = np.array([[1.5, -2.0]], dtype=np.float32)
    flags = await api("init_params", "m", {"w": w, "b": 3.0})
    assert flags == {"w": False, "b": True}
    req = server.only
    assert (req.method, req.url.path) == ("PUT", "/v1/models/m/params")
    assert "if-none-match" not in req.headers
    assert body_of(req) == {
        "params": {
            "w": {"shape": [1, 2], "dtype": "float32", "data": [1.5, -2.0]},
            "b": {"shape": [], "dtype": "float64", "data": [3.0]},
        }
    }


async def test_init_params_exist_ok_resends_only_missing_names(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(
        problem(412, "param-exists", existing=["b"]),
        problem(412, "param-exists", existing=["c", "not-requested"]),
        ok(created_body({"a": True, "d": True}), 201),
    )
    values = {name: np.zeros(2, np.float32) for name in "abcd"}
    flags = await api("init_params", "m", values, exist_ok=True)
    assert flags == {"a": True, "b": False, "c": False, "d": True}
    assert list(flags) == ["a", "b", "c", "d"]
    sent = [sorted(body_of(r)["params"]) for r in server.requests]
    assert sent == [["a", "b", "c", "d"], ["a", "c", "d"], ["a", "d"]]
    assert all(r.headers["if-none-match"] == "*" for r in server.requests)


async def test_init_params_exist_ok_when_everything_exists(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(problem(412, "param-exists", existing=["a", "b"]))
    flags = await api("init_params", "m", {"a": np.ones(2), "b": np.ones(2)}, exist_ok=True)
    assert flags == {"a": False, "b": False}
    assert len(server.requests) == 1


async def test_init_params_exist_ok_stops_when_412_names_nothing(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(problem(412, "param-exists", existing=["zzz"]))
    with pytest.raises(mc.PreconditionFailed) as info:
        await api("init_params", "m", {"a": np.ones(2)}, exist_ok=True)
    assert info.value.existing == ["zzz"]
    assert len(server.requests) == 1


async def test_init_params_with_nothing_sends_nothing(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect()
    assert await api("init_params", "m", {}, exist_ok=True) == {}
    assert await api("init_params", "m", {}) == {}
    assert server.requests == []


async def test_init_params_missing_result_is_unexpected(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, _ = connect(ok(created_body({"a": True})))
    with pytest.raises(mc.UnexpectedResponse, match=r"\['b'\]"):
        await api("init_params", "m", {"a": np.ones(2), "b": np.ones(2)})


async def test_get_params(connect: Callable[..., tuple[Api, Server]]) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(3)
    b = np.array(0.1)
    param = {"name": "w", "step": 3, **tensor(w)}
    api, server = connect(
        ok({"params": {"w": param, "b": {"name": "b", "step": 3, **tensor(b)}}}),
        ok({"params": {"w": param}}),
    )
    everything = await api("get_params", "m")
    assert everything.keys() == {"w", "b"}
    assert everything["w"].dtype == np.float32
    assert everything["w"].shape == (2, 3)
    np.testing.assert_array_equal(everything["w"], w)
    assert everything["b"].dtype == np.float64
    assert everything["b"].shape == ()
    assert everything["b"] == b
    some = await api("get_params", "m", ["w", "w"])
    assert list(some) == ["w"]
    assert "names" not in server.requests[0].url.params
    assert server.requests[1].url.params["names"] == "w"


async def test_get_params_names_handling(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok({"params": {}}))
    assert await api("get_params", "m", []) == {}
    with pytest.raises(TypeError, match="not a single str"):
        await api("get_params", "m", "w")
    with pytest.raises(ValueError, match="contains ','"):
        await api("get_params", "m", ["a,b"])
    assert server.requests == []
    await api("get_params", "m", iter(["a", "b:c"]))
    assert server.only.url.params["names"] == "a,b:c"


async def test_get_param_state(connect: Callable[..., tuple[Api, Server]]) -> None:
    value = np.array([1.25, -0.5], dtype=np.float32)
    velocity = np.array([1e-40, 3.0], dtype=np.float32)
    api, server = connect(
        ok({"name": "w", "step": 0, **tensor(value), "state": {}}),
        ok({"name": "w", "step": 4, **tensor(value), "state": {"velocity": tensor(velocity)}}),
    )
    fresh = await api("get_param_state", "m", "w")
    assert (fresh.name, fresh.step, fresh.velocity, dict(fresh.state)) == ("w", 0, None, {})
    trained = await api("get_param_state", "m", "w")
    assert trained.step == 4
    assert trained.velocity is not None
    assert trained.velocity.dtype == np.float32
    assert trained.velocity.tobytes() == velocity.tobytes()
    assert list(trained.state) == ["velocity"] and trained.state["velocity"] is trained.velocity
    assert trained.value.tobytes() == value.tobytes()
    assert all(r.url.params["include"] == "state" for r in server.requests)
    assert server.requests[0].url.path == "/v1/models/m/params/w"


async def test_step_returns_params(connect: Callable[..., tuple[Api, Server]]) -> None:
    new = np.array([[0.25, 0.5]], dtype=np.float32)
    api, server = connect(ok({"params": {"w": {"step": 1, **tensor(new)}}}))
    grad = np.array([[1.0, 2.0]], dtype=np.float32)
    result = await api("step", "m", {"w": grad})
    assert result["w"].dtype == np.float32
    assert result["w"].tobytes() == new.tobytes()
    req = server.only
    assert (req.method, req.url.path) == ("POST", "/v1/models/m/step")
    assert body_of(req) == {
        "gradients": {"w": {"shape": [1, 2], "dtype": "float32", "data": [1.0, 2.0]}},
        "return_params": True,
    }
    assert re.fullmatch("[0-9a-f]{32}", req.headers["idempotency-key"])


@pytest.mark.parametrize("method", ["step", "step_results", "push_gradients"])
async def test_step_options_are_sent_when_given(connect: Callable[..., tuple[Api, Server]], method: str) -> None:
    reply = {"params": {"w": {"step": 5, "lr": 0.1, **tensor(np.zeros(2, np.float32))}}}
    api, server = connect(ok(reply), ok({"params": {"w": {**reply["params"]["w"], "step": 6}}}))
    grads = {"w": np.ones(2, np.float32)}
    await api(method, "m", grads, expected_steps={"w": np.int32(4)}, worker_id=3, base_step=4, idempotency_key="k-1")
    body = body_of(server.requests[0])
    assert {k: v for k, v in body.items() if k != "gradients"} == {
        "return_params": method != "push_gradients",
        "expected_steps": {"w": 4},
        "worker_id": 3,
        "base_step": 4,
    }
    assert server.requests[0].headers["idempotency-key"] == "k-1"
    await api(method, "m", grads, base_step=0)  # 0 is sent; the fields not given are not
    assert {k for k in body_of(server.requests[1]) if k != "gradients"} == {"return_params", "base_step"}
    assert body_of(server.requests[1])["base_step"] == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"worker_id": True}, TypeError, "worker_id must be an int"),
        ({"base_step": 1.0}, TypeError, "base_step must be an int"),
        ({"expected_steps": {"w": "3"}}, TypeError, r"expected_steps\['w'\] must be an int"),
        ({"expected_steps": [("w", 3)]}, TypeError, "expected_steps must be a mapping"),
        ({"idempotency_key": ""}, ValueError, "visible ASCII"),
        ({"idempotency_key": "with space"}, ValueError, "visible ASCII"),
        ({"idempotency_key": "caf\u00e9"}, ValueError, "visible ASCII"),
        ({"idempotency_key": "k" * 256}, ValueError, "visible ASCII"),
        ({"idempotency_key": b"bytes"}, TypeError, "idempotency_key must be a str"),
        ({"idempotency": "k"}, TypeError, r"step\(\) got an unexpected keyword argument 'idempotency'"),
        ({"return_params": False}, TypeError, "unexpected keyword argument 'return_params'"),
    ],
)
async def test_step_options_are_checked_before_sending(
    connect: Callable[..., tuple[Api, Server]], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    api, server = connect()
    with pytest.raises(error, match=match):
        await api("step", "m", {"w": np.zeros(1)}, **kwargs)
    assert server.requests == []


async def test_step_results_of_a_replay(connect: Callable[..., tuple[Api, Server]]) -> None:
    now = np.array([0.5], dtype=np.float32)
    reply = {"params": {"w": {"step": 3, "lr": 0.1, "current_step": 5, **tensor(now)}, "b": {"step": 1, "lr": 0.1}}}
    api, _ = connect(httpx.Response(200, json=reply, headers={"Idempotent-Replayed": "true"}))
    results = await api("step_results", "m", {"w": np.ones(1, np.float32), "b": np.ones(1)}, return_params=False)
    assert (results["w"].step, results["w"].current_step, results["w"].replayed) == (3, 5, True)
    assert (results["b"].current_step, results["b"].replayed) == (None, True)
    api, _ = connect(ok({"params": {"w": {"step": 1, "lr": 0.1}}}))
    fresh = await api("step_results", "m", {"w": np.ones(1)}, return_params=False)
    assert (fresh["w"].current_step, fresh["w"].replayed) == (None, False)


async def test_step_results_carry_step_and_lr(connect: Callable[..., tuple[Api, Server]]) -> None:
    new = np.array([0.25], dtype=np.float32)
    api, server = connect(ok({"params": {"w": {"step": 3, "lr": 0.05, **tensor(new)}}}))
    results = await api("step_results", "m", {"w": np.ones(1, np.float32)})
    assert results["w"].step == 3 and results["w"].lr == 0.05
    assert results["w"].value is not None and results["w"].value.tobytes() == new.tobytes()
    assert body_of(server.only)["return_params"] is True
    api, server = connect(ok({"params": {"w": {"step": 4, "lr": 0.025}}}))
    results = await api("step_results", "m", {"w": np.ones(1, np.float32)}, return_params=False)
    assert (results["w"].value, results["w"].step, results["w"].lr) == (None, 4, 0.025)
    assert body_of(server.only)["return_params"] is False


async def test_push_gradients_returns_step_counts(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(ok({"params": {"w": {"step": 12}, "b": {"step": 3}}}))
    steps = await api("push_gradients", "m", {"w": np.zeros(2), "b": np.zeros(())})
    assert steps == {"w": 12, "b": 3}
    assert body_of(server.only)["return_params"] is False


def steps_reply(**steps: int) -> httpx.Response:
    return ok({"params": {n: {"step": s, "lr": 0.1, **tensor(np.zeros(1, np.float32))} for n, s in steps.items()}})


@pytest.mark.parametrize("method", ["step", "step_results", "push_gradients"])
async def test_a_step_that_went_back_is_told(connect: Callable[..., tuple[Api, Server]], method: str) -> None:
    """Steps only grow: an answer whose step is not past one seen before means acknowledged steps were
    lost (a flush_ms owner crashed). The step was applied; the error carries its result."""
    api, _ = connect(steps_reply(w=5, b=2), steps_reply(w=6, b=3), steps_reply(w=4, b=4), steps_reply(w=5, b=5))
    grads = {"w": np.ones(1, np.float32), "b": np.ones(1, np.float32)}
    await api(method, "m", grads)
    await api(method, "m", grads)
    with pytest.raises(mc.StepWentBack, match=r"'w' is at step 4 after step 6") as info:
        await api(method, "m", grads)
    assert info.value.model == "m" and info.value.regressions == {"w": (4, 6)}
    assert info.value.result is not None and set(info.value.result) == {"w", "b"}
    await api(method, "m", grads)  # from the state as it is now, steps grow again: nothing to tell


async def test_going_back_warns_when_asked(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, _ = connect(steps_reply(w=5), steps_reply(w=5))
    api.client._seen.on_back = "warn"
    await api("push_gradients", "m", {"w": np.ones(1)})
    with pytest.warns(mc.StepWentBackWarning, match="went back"):
        assert await api("push_gradients", "m", {"w": np.ones(1)}) == {"w": 5}


async def test_going_back_is_judged_against_what_was_known_when_sent(
    connect: Callable[..., tuple[Api, Server]],
) -> None:
    """Concurrent steps of one client may be answered out of order; only an answer below what the
    client knew when it sent the step means a loss. So do a replayed old key, and a re-created model."""
    api, _ = connect(steps_reply(w=9))
    seen = api.client._seen
    known = seen.known("m", ["w"])  # a step sent before the others were answered...
    seen.saw("m", {"w": 10}, {}, None)
    seen.saw("m", {"w": 8}, known, None)  # ...answered after them, with a lower step: fine
    r = httpx.Response(200, json={"params": {"w": {"step": 3, "lr": 0.1}}}, headers={"Idempotent-Replayed": "true"})
    api, _ = connect(steps_reply(w=7), r, steps_reply(w=1), httpx.Response(204), steps_reply(w=1))
    await api("push_gradients", "m", {"w": np.ones(1)})
    assert await api("push_gradients", "m", {"w": np.ones(1)}, idempotency_key="old") == {"w": 3}  # caller's key
    with pytest.raises(mc.StepWentBack):
        await api("push_gradients", "m", {"w": np.ones(1)})  # someone else re-created the model
    await api("delete_model", "m")  # this client re-creates it: it starts over
    assert await api("push_gradients", "m", {"w": np.ones(1)}) == {"w": 1}


def test_on_step_back_is_checked() -> None:
    with pytest.raises(ValueError, match="on_step_back must be one of raise, warn"):
        mc.Client(BASE, on_step_back="ignore")  # type: ignore[arg-type]


async def test_delete_param(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(httpx.Response(204))
    assert await api("delete_param", "m", "w") is None
    assert (server.only.method, server.only.url.path) == ("DELETE", "/v1/models/m/params/w")


async def test_non_finite_values_are_refused_before_sending(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect()
    grad = np.zeros((2, 2), np.float32)
    grad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"gradient 'w' contains nan at flat index 2.*JSON cannot carry NaN"):
        await api("step", "m", {"w": grad})
    with pytest.raises(ValueError, match="parameter 'b' contains -inf"):
        await api("init_params", "m", {"b": [1.0, -np.inf]})
    assert server.requests == []


@pytest.mark.parametrize("bad", [np.zeros(3, np.int32), np.array([True]), [True, False], np.zeros(3, np.complex64)])
async def test_unsupported_dtypes_are_refused(connect: Callable[..., tuple[Api, Server]], bad: Any) -> None:
    api, server = connect()
    with pytest.raises(TypeError, match="only float32 and float64 are supported"):
        await api("step", "m", {"w": bad})
    assert server.requests == []


# -- health ----------------------------------------------------------------------------------------


async def test_health_and_ready(connect: Callable[..., tuple[Api, Server]]) -> None:
    api, server = connect(
        ok({"status": "ok"}),
        problem(503, "store-unavailable"),
        ok({"status": "ok"}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    )
    assert await api("health") is True
    assert await api("ready") is False
    assert await api("ready") is True
    assert await api("health") is False
    assert await api("ready") is False
    assert [r.url.path for r in server.requests] == ["/healthz", "/readyz", "/readyz", "/healthz", "/readyz"]


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, mc.InvalidRequest),
        (401, mc.Unauthorized),
        (403, mc.Forbidden),
        (404, mc.NotFound),
        (405, mc.APIError),
        (409, mc.Conflict),
        (412, mc.PreconditionFailed),
        (413, mc.PayloadTooLarge),
        (415, mc.UnsupportedMediaType),
        (422, mc.InvalidRequest),
        (429, mc.APIError),
        (500, mc.ServerError),
        (502, mc.ServerError),
        (503, mc.ServiceUnavailable),
    ],
)
@pytest.mark.parametrize("as_problem", [True, False])
async def test_error_statuses_map_to_exceptions(
    connect: Callable[..., tuple[Api, Server]], status: int, cls: type[mc.APIError], as_problem: bool
) -> None:
    answer = problem(status, "some-slug", "details here") if as_problem else httpx.Response(status, text="oops")
    api, _ = connect(answer)
    with pytest.raises(mc.APIError) as info:
        await api("get_model", "m")
    err = info.value
    assert type(err) is cls
    assert isinstance(err, mc.MomentumError)
    assert err.status == status
    assert (err.method, err.url) == ("GET", f"{BASE}/v1/models/m")
    if as_problem:
        assert err.type == "urn:momentum-service:problem:some-slug"
        assert (err.title, err.detail, err.instance) == ("some slug", "details here", "/v1/models/m")
        assert str(err) == f"{status} some slug: details here (GET {BASE}/v1/models/m)"
    else:
        assert (err.type, err.title, err.detail) == (None, None, "oops")
        assert str(err).startswith(f"{status} ")


def test_exception_tree() -> None:
    assert issubclass(mc.StepTimeout, mc.MomentumError)
    assert issubclass(mc.StepTimeout, TimeoutError)
    assert not issubclass(mc.StepTimeout, mc.TransportError)
    assert issubclass(mc.PreconditionFailed, mc.Conflict)
    assert issubclass(mc.ServiceUnavailable, mc.ServerError)
    assert issubclass(mc.RequestTimeout, mc.TransportError)
    assert issubclass(mc.RequestTimeout, TimeoutError)
    for cls in (mc.TransportError, mc.UnexpectedResponse, mc.APIError):
        assert issubclass(cls, mc.MomentumError)
    for cls in (mc.InvalidRequest, mc.NotFound, mc.Conflict, mc.PayloadTooLarge, mc.UnsupportedMediaType):
        assert issubclass(cls, mc.APIError)
    for cls in (mc.Unauthorized, mc.Forbidden):
        assert issubclass(cls, mc.APIError) and not issubclass(cls, mc.Conflict)
    assert issubclass(mc.TensorMismatch, mc.Conflict)
    assert issubclass(mc.ModelExists, mc.PreconditionFailed)
    assert issubclass(mc.ModelConfigWarning, UserWarning)
    assert issubclass(mc.StepWentBack, mc.MomentumError) and not issubclass(mc.StepWentBack, mc.APIError)
    assert issubclass(mc.StepWentBackWarning, UserWarning)


def test_exceptions_survive_pickling() -> None:
    headers = httpx.Headers({"Retry-After": "3"})
    errors: list[mc.MomentumError] = [
        _exceptions.api_error(503, {"title": "busy"}, headers=headers, method="GET", url=BASE),
        _exceptions.api_error(412, {"existing": ["w"]}),
        mc.RequestTimeout("slow", method="GET", url=BASE),
        mc.UnexpectedResponse("odd", status=200, method="GET", url=BASE),
        mc.StepTimeout("waited", base_step=4, workers=3, contributions={"w": 2}, method="POST", url=BASE),
        _exceptions.api_error(409, {"type": "urn:momentum-service:problem:step-mismatch", "current_steps": {"w": 2}}),
        mc.StepWentBack("lost", model="m", regressions={"w": (3, 5)}, result={"w": 3}),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert vars(copy).keys() == vars(error).keys()
    assert pickle.loads(pickle.dumps(errors[0])).retry_after == 3.0
    assert pickle.loads(pickle.dumps(errors[1])).existing == ["w"]
    timeout = pickle.loads(pickle.dumps(errors[4]))
    assert (timeout.base_step, timeout.workers, timeout.contributions) == (4, 3, {"w": 2})
    conflict = pickle.loads(pickle.dumps(errors[5]))
    assert (conflict.code, conflict.current_steps) == ("step-mismatch", {"w": 2})


@pytest.mark.parametrize("slug", ["step-mismatch", "stale-gradient", "step-already-applied"])
async def test_step_conflicts_carry_current_steps(connect: Callable[..., tuple[Api, Server]], slug: str) -> None:
    api, server = connect(problem(409, slug, current_steps={"w": 7, "b": 6}))
    with pytest.raises(mc.Conflict) as info:
        await api("step", "m", {"w": np.zeros(1), "b": np.zeros(1)}, expected_steps={"w": 6, "b": 6})
    assert type(info.value) is mc.Conflict
    assert info.value.code == slug
    assert info.value.current_steps == {"w": 7, "b": 6}
    assert len(server.requests) == 1  # a conflict is an answer: not retried


def test_problem_codes_and_missing_extensions() -> None:
    assert _exceptions.api_error(404, {"type": "urn:momentum-service:problem:model-not-found"}).code == (
        "model-not-found"
    )
    assert _exceptions.api_error(404, {"type": "about:blank"}).code is None
    assert _exceptions.api_error(404, {}).code is None
    plain = _exceptions.api_error(409, {"type": "urn:momentum-service:problem:tensor-mismatch"})
    assert isinstance(plain, mc.Conflict)
    assert plain.current_steps == {}
    odd = _exceptions.api_error(409, {"current_steps": {"w": "3", "b": True, "c": 2}})
    assert isinstance(odd, mc.Conflict)
    assert odd.current_steps == {"c": 2}
    in_flight = _exceptions.api_error(409, {}, headers=httpx.Headers({"Retry-After": "1"}))
    assert in_flight.retry_after == 1.0


async def test_validation_errors_are_exposed(connect: Callable[..., tuple[Api, Server]]) -> None:
    errors = [{"loc": ["body", "gradients", "w", "data"], "msg": "non-finite number"}]
    api, _ = connect(problem(422, "non-finite", "every number must be finite", errors=errors))
    with pytest.raises(mc.InvalidRequest) as info:
        await api("step", "m", {"w": np.zeros(1)})
    assert info.value.errors == errors
    assert "body.gradients.w.data: non-finite number" in str(info.value)
    assert info.value.problem["errors"] == errors


async def test_retry_after(connect: Callable[..., tuple[Api, Server]]) -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    api, _ = connect(
        httpx.Response(503, headers={"Retry-After": "7"}),
        httpx.Response(503, headers={"Retry-After": later}),
        httpx.Response(503),
    )
    retry_afters = []
    for _ in range(3):
        with pytest.raises(mc.ServiceUnavailable) as info:
            await api("get_model", "m")
        retry_afters.append(info.value.retry_after)
    assert retry_afters[0] == 7.0
    assert retry_afters[1] is not None
    assert 100 < retry_afters[1] <= 120
    assert retry_afters[2] is None


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (httpx.ConnectError("connection refused"), mc.TransportError),
        (httpx.RemoteProtocolError("peer closed"), mc.TransportError),
        (httpx.ConnectTimeout("connect"), mc.RequestTimeout),
        (httpx.ReadTimeout("read"), mc.RequestTimeout),
    ],
)
async def test_transport_errors(
    connect: Callable[..., tuple[Api, Server]], error: httpx.RequestError, cls: type[mc.TransportError]
) -> None:
    api, _ = connect(error)
    with pytest.raises(mc.TransportError) as info:
        await api("get_model", "m")
    assert type(info.value) is cls
    assert info.value.__cause__ is error
    assert info.value.url == f"{BASE}/v1/models/m"


@pytest.mark.parametrize(
    ("method", "status", "content"),
    [
        ("get_model", 200, b"<html>not json</html>"),
        ("get_model", 200, b"[1, 2, 3]"),
        ("get_model", 200, json.dumps({**MODEL_JSON, "optimizer": {"lr": "fast"}}).encode()),
        ("get_params", 200, b'{"params": {"w": {"shape": [3], "dtype": "float32", "data": [1.0]}}}'),
        ("get_params", 200, b'{"params": {"w": {"shape": [1], "dtype": "float16", "data": [1.0]}}}'),
        ("get_params", 200, b'{"params": {"w": {"shape": [1], "dtype": "float32", "data": [[1.0]]}}}'),
        ("get_params", 200, b'{"params": {"w": {"shape": [-1], "dtype": "float32", "data": [1.0]}}}'),
        ("get_params", 200, b'{"params": {"w": {"shape": [1], "dtype": "float32", "data": ["1.0"]}}}'),
        ("push_gradients", 200, b'{"params": {"w": {"step": 1.5}}}'),
        ("delete_param", 204, b""),
    ],
)
async def test_malformed_success_bodies(
    connect: Callable[..., tuple[Api, Server]], method: str, status: int, content: bytes
) -> None:
    api, _ = connect(httpx.Response(status, content=content))
    args: tuple[Any, ...] = {
        "get_model": ("m",),
        "get_params": ("m",),
        "push_gradients": ("m", {"w": np.zeros(1)}),
    }.get(method, ("m", "w"))
    if method == "delete_param":  # a 204 without a body is the expected answer: no error
        assert await api(method, *args) is None
        return
    with pytest.raises(mc.UnexpectedResponse) as info:
        await api(method, *args)
    assert info.value.status == 200
    assert isinstance(info.value.__cause__, (KeyError, TypeError, ValueError))


# -- tensor encoding -------------------------------------------------------------------------------


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with orjson (when installed) and with the standard library encoder."""
    if request.param == "json":
        monkeypatch.setattr(_tensors, "_orjson", None)
    elif _tensors._orjson is None:
        pytest.skip("orjson is not installed")
    return str(request.param)


def awkward_values(dtype: type[np.floating[Any]], n: int = 20_000) -> np.ndarray:
    """Random bit patterns (all finite) plus extremes: subnormals, -0.0, max, min normal."""
    info = np.finfo(dtype)
    uint = np.uint32 if info.bits == 32 else np.uint64
    values = np.random.default_rng(0).integers(0, 2**info.bits, size=n, dtype=uint).view(dtype)
    values = values[np.isfinite(values)]
    special = [0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.max, -info.max]
    special += [info.smallest_normal, info.eps, 1 / 3, 0.1]
    return np.concatenate([np.array(special, dtype=dtype), values])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_round_trip_is_bit_exact(codec: str, dtype: type[np.floating[Any]]) -> None:
    values = awkward_values(dtype)
    values = values[: values.size // 4 * 4].reshape(2, 2, -1)
    wire = _tensors.dumps({"t": _tensors.encode_tensor(values, "t")})
    decoded = _tensors.decode_tensor(_tensors.loads(wire)["t"])
    assert decoded.dtype == dtype
    assert decoded.shape == values.shape
    assert decoded.tobytes() == values.tobytes()
    # the server's decoder: float64 parse, cast to dtype
    server_side = np.asarray(json.loads(wire)["t"]["data"], dtype=np.float64).astype(dtype).reshape(values.shape)
    assert server_side.tobytes() == values.tobytes()


def test_float32_is_sent_as_its_exact_float64_value(codec: str) -> None:
    wire = _tensors.dumps(_tensors.encode_tensor(np.array([0.1, 1 / 3], np.float32), "t"))
    assert b"0.10000000149011612" in wire
    assert json.loads(wire)["data"] == [0.10000000149011612, 0.3333333432674408]


def test_tensor_encoding_is_row_major_for_any_layout(codec: str) -> None:
    c = np.arange(12, dtype=np.float32).reshape(3, 4)
    for arr in (np.asfortranarray(c), c.T.copy().T, c.astype(">f4"), c[:, ::-1][:, ::-1]):
        obj = json.loads(_tensors.dumps(_tensors.encode_tensor(arr, "t")))
        assert obj == {"shape": [3, 4], "dtype": "float32", "data": [float(x) for x in range(12)]}


def test_tensor_shapes_scalars_and_empty(codec: str) -> None:
    for arr in (np.float32(2.5), np.zeros((0, 3)), np.ones((1, 1, 1), np.float32)):
        back = _tensors.decode_tensor(_tensors.loads(_tensors.dumps(_tensors.encode_tensor(arr, "t"))))
        assert back.shape == np.shape(arr)
        assert back.dtype == np.asarray(arr).dtype
        np.testing.assert_array_equal(back, arr)


def test_python_inputs_become_float64() -> None:
    assert _tensors.encode_tensor([[1, 2], [3, 4]], "t")["dtype"] == "float64"
    assert _tensors.encode_tensor(3, "t")["shape"] == []
    assert _tensors.encode_tensor([0.5], "t")["dtype"] == "float64"
    with pytest.raises(TypeError, match="only float32 and float64"):
        _tensors.encode_tensor(np.arange(3), "t")


def test_stdlib_encoder_refuses_nan_even_if_it_slips_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tensors, "_orjson", None)
    with pytest.raises(ValueError, match="not JSON compliant"):
        _tensors.dumps({"data": np.array([np.nan])})


# -- construction and lifetime ---------------------------------------------------------------------


def test_timeout_and_headers_apply_to_every_request() -> None:
    server = Server(ok(MODEL_JSON))
    with mc.Client(BASE, transport=httpx.MockTransport(server), timeout=3.5, headers={"X-Team": "a"}) as client:
        client.get_model("m")
    req = server.only
    assert req.extensions["timeout"] == httpx.Timeout(3.5).as_dict()
    assert req.headers["x-team"] == "a"


def test_a_given_httpx_client_is_used_and_left_open() -> None:
    server = Server(ok(MODEL_JSON))
    with httpx.Client(transport=httpx.MockTransport(server), timeout=2.0) as http:
        with mc.Client(BASE, client=http, headers={"X-Team": "a"}) as client:
            assert client.get_model("m") == EXPECTED_MODEL
        assert not http.is_closed
    assert server.only.extensions["timeout"] == httpx.Timeout(2.0).as_dict()
    assert server.only.headers["x-team"] == "a"
    assert server.only.headers["user-agent"].startswith("momentum-client/")


async def test_a_given_httpx_async_client_is_used_and_left_open() -> None:
    server = Server(ok(MODEL_JSON))
    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        async with mc.AsyncClient(BASE, client=http) as client:
            assert await client.get_model("m") == EXPECTED_MODEL
        assert not http.is_closed
    assert len(server.requests) == 1


async def test_own_httpx_clients_are_closed_and_retry_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[str, int]] = []

    def spy(kind: type) -> Callable[..., Any]:
        def make(*, retries: int) -> Any:
            made.append((kind.__name__, retries))
            return kind(retries=retries)

        return make

    from momentum_client import _async_client, _client, _transport

    monkeypatch.setattr(_client, "ZeroCopyTransport", spy(_transport.ZeroCopyTransport))
    monkeypatch.setattr(_async_client, "AsyncZeroCopyTransport", spy(_transport.AsyncZeroCopyTransport))
    with mc.Client(BASE) as client:
        pass
    assert client._http.is_closed
    async with mc.AsyncClient(BASE) as aclient:
        pass
    assert aclient._http.is_closed
    assert made == [("ZeroCopyTransport", 2), ("AsyncZeroCopyTransport", 2)]


@pytest.mark.parametrize("url", ["momentum.test:8000", "/v1", "ftp://x", "http://x/?q=1"])
def test_bad_base_urls(url: str) -> None:
    with pytest.raises(ValueError, match="base_url"):
        mc.Client(url)


def test_client_and_transport_are_exclusive() -> None:
    with httpx.Client() as http, pytest.raises(ValueError, match="either client or transport"):
        mc.Client(BASE, client=http, transport=httpx.MockTransport(Server()))
    with mc.Client(BASE + "/") as client:
        assert client.base_url == BASE


def test_owner_routes_follow_the_momentum_owner_header_per_model() -> None:
    from momentum_client._routing import OwnerRoutes

    routes = OwnerRoutes("http://lb:8000", enabled=True)
    assert routes.url("/v1/models/a/step") == "http://lb:8000/v1/models/a/step"
    routes.learn("/v1/models/a/step", {"momentum-owner": "http://r2:8000/"})
    assert routes.url("/v1/models/a/params") == "http://r2:8000/v1/models/a/params"
    assert routes.url("/v1/models/b/step") == "http://lb:8000/v1/models/b/step"  # per model
    assert routes.url("/v1/models") == "http://lb:8000/v1/models"
    for bad in ("ftp://r3", "http://r3/x", "http://r3?q", "not a url"):
        routes.learn("/v1/models/a/step", {"momentum-owner": bad})  # ignored
    assert routes.url("/v1/models/a/step") == "http://r2:8000/v1/models/a/step"
    routes.forget("/v1/models/a/step")
    assert routes.url("/v1/models/a/step") == "http://lb:8000/v1/models/a/step"
    off = OwnerRoutes("http://lb:8000", enabled=False)  # the default: never leaves the base URL
    off.learn("/v1/models/a/step", {"momentum-owner": "http://r2:8000"})
    assert off.url("/v1/models/a/step") == "http://lb:8000/v1/models/a/step"
