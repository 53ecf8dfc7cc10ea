"""Learning-rate schedules against torch.optim.lr_scheduler itself, and rules and schedules through the API."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from momentum_service.config import ModelConfig
from momentum_service.kernels import rule_from_dict, schedule_from_dict
from momentum_service.kernels.schedules import LRTable
from momentum_service.store import Journal, Lease, Replica
from torch.optim import lr_scheduler as L

from .test_http import array, assert_problem, make_client, tensor

# -- the reference: torch's schedulers, driven as a training loop drives them ------------------


def torch_scheduler(opt: torch.optim.Optimizer, spec: dict[str, Any]) -> L.LRScheduler:
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "constant":
        return L.LambdaLR(opt, lambda epoch: 1.0)
    if kind == "step":
        return L.StepLR(opt, **args)
    if kind == "multistep":
        return L.MultiStepLR(opt, **args)
    if kind == "exponential":
        return L.ExponentialLR(opt, **args)
    if kind == "cosine":
        return L.CosineAnnealingLR(opt, **args)
    if kind == "linear":
        return L.LinearLR(opt, **args)
    assert kind == "sequential"
    children = [torch_scheduler(opt, child) for child in spec["schedulers"]]
    return L.SequentialLR(opt, children, milestones=spec["milestones"])


def torch_lrs(spec: dict[str, Any], base_lr: float, n: int) -> list[float]:
    """The lr of each of n optimizer steps: ``param_groups[0]["lr"]`` before step k."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's milestone jump uses a deprecated code path
        sched = torch_scheduler(opt, spec)
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def our_lrs(spec: dict[str, Any], base_lr: float, n: int) -> list[float]:
    table, schedule = LRTable(), schedule_from_dict(spec)
    return [table.lr(schedule, base_lr, k) for k in range(n)]


SPECS: list[dict[str, Any]] = [
    {"type": "constant"},
    {"type": "step", "step_size": 7, "gamma": 0.7},
    {"type": "step", "step_size": 1},
    {"type": "multistep", "milestones": [3, 3, 10, 40], "gamma": 0.3},
    {"type": "exponential", "gamma": 0.97},
    {"type": "cosine", "T_max": 13, "eta_min": 0.001},
    {"type": "cosine", "T_max": 1},
    {"type": "linear", "start_factor": 0.1, "end_factor": 0.9, "total_iters": 17},
    {"type": "linear", "start_factor": 1.0, "end_factor": 0.0, "total_iters": 3},
    {
        "type": "sequential",
        "schedulers": [
            {"type": "linear", "start_factor": 0.01, "total_iters": 10},
            {"type": "cosine", "T_max": 30, "eta_min": 1e-4},
        ],
        "milestones": [10],
    },
    {
        "type": "sequential",
        "schedulers": [
            {"type": "exponential", "gamma": 0.9},
            {"type": "step", "step_size": 5, "gamma": 0.5},
            {"type": "cosine", "T_max": 7},
            {"type": "constant"},
        ],
        "milestones": [4, 20, 33],
    },
    {
        "type": "sequential",
        "schedulers": [{"type": "cosine", "T_max": 5}, {"type": "multistep", "milestones": [2, 6]}, {"type": "linear"}],
        "milestones": [1, 9],
    },
]


@pytest.mark.parametrize("base_lr", [0.1, 0.037, 1.0, 3e-4])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_lr_bitwise_equal_to_torch(spec: dict[str, Any], base_lr: float) -> None:
    """Stronger than the float32 equality asked for: the float64 lr is torch's, so float64 steps match too."""
    assert our_lrs(spec, base_lr, 150) == torch_lrs(spec, base_lr, 150)


def test_the_recursion_matters() -> None:
    """A negative control: the closed forms in torch's docs are not what its schedulers compute."""
    spec = {"type": "cosine", "T_max": 100, "eta_min": 0.0}
    ref = torch_lrs(spec, 0.1, 100)
    closed = [0.0 + (0.1 - 0.0) * (1 + math.cos(math.pi * k / 100)) / 2 for k in range(100)]
    assert ref != closed
    assert our_lrs(spec, 0.1, 100) == ref


_factor = st.floats(0.05, 1.0).map(lambda x: round(x, 3))
_basic = st.one_of(
    st.just({"type": "constant"}),
    st.builds(lambda n, g: {"type": "step", "step_size": n, "gamma": g}, st.integers(1, 20), st.floats(0.0, 1.5)),
    st.builds(
        lambda ms, g: {"type": "multistep", "milestones": sorted(ms), "gamma": g},
        st.lists(st.integers(1, 60), max_size=5),
        st.floats(0.0, 1.0),
    ),
    st.builds(lambda g: {"type": "exponential", "gamma": g}, st.floats(0.5, 1.0)),
    st.builds(lambda t, e: {"type": "cosine", "T_max": t, "eta_min": e}, st.integers(1, 40), st.floats(0.0, 0.01)),
    st.builds(
        lambda s, e, n: {"type": "linear", "start_factor": s, "end_factor": e, "total_iters": n},
        _factor,
        _factor,
        st.integers(1, 30),
    ),
)
_sequential = st.lists(_basic, min_size=2, max_size=4).flatmap(
    lambda children: (
        st.lists(st.integers(1, 60), min_size=len(children) - 1, max_size=len(children) - 1, unique=True)
        .map(sorted)
        .map(lambda ms: {"type": "sequential", "schedulers": children, "milestones": ms})
    )
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.one_of(_basic, _sequential), base_lr=st.floats(1e-5, 2.0))
def test_any_schedule_matches_torch(spec: dict[str, Any], base_lr: float) -> None:
    assert our_lrs(spec, base_lr, 90) == torch_lrs(spec, base_lr, 90)


def test_lr_table_costs_o1_per_new_step_and_is_bounded() -> None:
    table = LRTable(max_entries=2)
    cosine = schedule_from_dict({"type": "cosine", "T_max": 1000})
    assert table.lr(cosine, 0.1, 20_000) == torch_lrs({"type": "cosine", "T_max": 1000}, 0.1, 20_001)[-1]
    for base in (0.2, 0.3, 0.4):
        table.lr(cosine, base, 10)
    assert len(table._entries) == 2  # least recently used entries are dropped
    # Asking for earlier steps reads the table (the same object), never recomputes.
    assert table.lr(cosine, 0.4, 5) == table.lr(cosine, 0.4, 5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "nope"}, "type must be one of"),
        ({}, "type must be one of"),
        ({"type": "step"}, "requires step_size"),
        ({"type": "step", "step_size": 0}, "step_size must be >= 1"),
        ({"type": "step", "step_size": 2.5}, "step_size must be an integer"),
        ({"type": "step", "step_size": True}, "step_size must be an integer"),
        ({"type": "exponential", "gamma": -1}, "gamma must be in"),
        ({"type": "exponential", "gamma": float("nan")}, "gamma must be finite"),
        ({"type": "cosine", "T_max": 10, "bogus": 1}, "has no field bogus"),
        ({"type": "multistep", "milestones": [5, 3]}, "non-decreasing"),
        ({"type": "multistep", "milestones": [0]}, ">= 1"),
        ({"type": "linear", "start_factor": 0}, "start_factor must be in (0, 1]"),
        ({"type": "linear", "end_factor": 1.5}, "end_factor must be in [0, 1]"),
        ({"type": "sequential", "schedulers": [], "milestones": []}, "non-empty"),
        ({"type": "sequential", "schedulers": [{"type": "constant"}] * 2, "milestones": []}, "one entry fewer"),
        ({"type": "sequential", "schedulers": [{"type": "constant"}] * 2, "milestones": [3, 4]}, "one entry fewer"),
        (
            {"type": "sequential", "schedulers": [{"type": "constant"}] * 3, "milestones": [3, 3]},
            "must be increasing",
        ),
        (
            {
                "type": "sequential",
                "schedulers": [{"type": "constant"}, {"type": "sequential", "schedulers": [{"type": "constant"}]}],
                "milestones": [2],
            },
            "cannot contain another",
        ),
        ({"type": "sequential", "schedulers": [{"type": "x"}], "milestones": []}, "schedulers[0].type"),
    ],
)
def test_invalid_schedules_say_what_is_wrong(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        schedule_from_dict(spec)


def test_schedules_round_trip() -> None:
    for spec in SPECS:
        schedule = schedule_from_dict(spec)
        assert schedule_from_dict(schedule.to_dict()) == schedule


# -- through the API ---------------------------------------------------------------------------


@pytest.fixture
async def api(store: Journal) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(store) as client:
        yield client


WARMUP_COSINE = {
    "type": "sequential",
    "schedulers": [
        {"type": "linear", "start_factor": 0.1, "total_iters": 5},
        {"type": "cosine", "T_max": 20, "eta_min": 0.001},
    ],
    "milestones": [5],
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
async def test_scheduled_training_equals_torch_bitwise(api: httpx.AsyncClient, dtype: str) -> None:
    """torch.optim.SGD + SequentialLR(LinearLR, CosineAnnealingLR) against the service, step by step."""
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal((3, 5)).astype(dtype)
    r = await api.put(
        "/v1/models/m",
        json={
            "optimizer": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
            "schedule": WARMUP_COSINE,
        },
    )
    assert r.status_code == 201 and r.json()["schedule"] == schedule_from_dict(WARMUP_COSINE).to_dict()
    assert (await api.put("/v1/models/m/params/w", json=tensor(p0, dtype))).status_code == 201
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.SGD([tp], lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch_scheduler(opt, WARMUP_COSINE)
        for k in range(40):
            g = rng.standard_normal((3, 5)).astype(dtype)
            torch_lr = opt.param_groups[0]["lr"]
            tp.grad = torch.from_numpy(g.copy())
            opt.step()
            sched.step()
            r = await api.post("/v1/models/m/step", json={"gradients": {"w": tensor(g, dtype)}})
            out = r.json()["params"]["w"]
            assert out["step"] == k + 1 and out["lr"] == torch_lr
            assert array(out).tobytes() == tp.detach().numpy().tobytes(), f"step {k}"


async def test_each_parameter_follows_its_own_step_count(api: httpx.AsyncClient) -> None:
    await api.put("/v1/models/m", json={"optimizer": {"lr": 1.0}, "schedule": {"type": "exponential", "gamma": 0.5}})
    await api.put("/v1/models/m/params", json={"params": {"a": tensor([0.0]), "b": tensor([0.0])}})
    for _ in range(3):
        await api.post("/v1/models/m/step", json={"gradients": {"a": tensor([1.0])}})
    r = await api.post("/v1/models/m/step", json={"gradients": {"a": tensor([1.0]), "b": tensor([1.0])}})
    out = r.json()["params"]
    assert (out["a"]["step"], out["a"]["lr"]) == (4, 0.125)
    assert (out["b"]["step"], out["b"]["lr"]) == (1, 1.0)
    # a = -(1 + 0.5 + 0.25 + 0.125), b = -1
    assert array(out["a"]).tolist() == [-1.875] and array(out["b"]).tolist() == [-1.0]


async def test_patch_lr_rescales_the_schedule_and_patch_replaces_it(api: httpx.AsyncClient) -> None:
    spec = {"type": "step", "step_size": 2, "gamma": 0.5}
    await api.put("/v1/models/m", json={"optimizer": {"lr": 0.8}, "schedule": spec})
    await api.put("/v1/models/m/params/w", json=tensor([0.0]))

    async def lr_of_next_step() -> float:
        r = await api.post("/v1/models/m/step", json={"gradients": {"w": tensor([0.0])}, "return_params": False})
        lr: float = r.json()["params"]["w"]["lr"]
        return lr

    assert [await lr_of_next_step() for _ in range(3)] == [0.8, 0.8, 0.4]
    r = await api.patch("/v1/models/m", json={"optimizer": {"lr": 0.1}})
    assert r.status_code == 200 and r.json()["schedule"] == spec
    assert [await lr_of_next_step() for _ in range(3)] == torch_lrs(spec, 0.1, 6)[3:]
    r = await api.patch("/v1/models/m", json={"schedule": {"type": "constant"}})
    assert r.status_code == 200 and r.json()["optimizer"]["lr"] == 0.1
    assert await lr_of_next_step() == 0.1


async def test_rules_through_the_api_equal_the_kernels(api: httpx.AsyncClient) -> None:
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(9).astype(np.float32)
    grads = rng.standard_normal((12, 9)).astype(np.float32)
    configs = {
        "keras": {"rule": "keras", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        "tf1": {"rule": "tf1", "lr": 0.05, "momentum": 0.9},
        "ema": {"rule": "ema", "lr": 0.05, "momentum": 0.8},
        "previous_delta": {"rule": "previous_delta", "lr": 0.05, "momentum": 0.5},
    }
    for name, optimizer in configs.items():
        r = await api.put(
            f"/v1/models/{name}", json={"optimizer": optimizer, "schedule": {"type": "exponential", "gamma": 0.9}}
        )
        assert r.status_code == 201 and r.json()["optimizer"] == rule_from_dict(optimizer).to_dict()
        await api.put(f"/v1/models/{name}/params/w", json=tensor(p0))
        rule, value, velocity, lr = rule_from_dict(optimizer), p0, None, 0.05
        for g in grads:
            value, velocity = rule.update(value, velocity, g, lr)
            lr *= 0.9
            r = await api.post(f"/v1/models/{name}/step", json={"gradients": {"w": tensor(g)}})
        assert array(r.json()["params"]["w"]).tobytes() == value.tobytes(), name
        r = await api.get(f"/v1/models/{name}/params/w", params={"include": "velocity"})
        assert array(r.json()["velocity"]).tobytes() == velocity.tobytes(), name


async def test_rule_and_schedule_errors(api: httpx.AsyncClient) -> None:
    await api.put("/v1/models/k", json={"optimizer": {"rule": "keras", "lr": 0.1, "momentum": 0.9}})
    # A rule cannot change: its velocity would mean something else.
    body = assert_problem(await api.put("/v1/models/k", json={"optimizer": {"lr": 0.1}}), 409, "rule-change")
    assert body["current"] == "keras" and body["requested"] == "pytorch"
    assert_problem(await api.patch("/v1/models/k", json={"optimizer": {"rule": "ema"}}), 409, "rule-change")
    assert (await api.patch("/v1/models/k", json={"optimizer": {"rule": "keras", "lr": 0.2}})).status_code == 200
    # Hyperparameters the rule does not have, or values it refuses.
    body = assert_problem(
        await api.patch("/v1/models/k", json={"optimizer": {"dampening": 0.1}}), 422, "invalid-config"
    )
    assert "lr, momentum, nesterov, weight_decay" in body["detail"]
    assert_problem(await api.patch("/v1/models/k", json={"optimizer": {"momentum": 1.5}}), 422, "invalid-config")
    assert_problem(await api.put("/v1/models/x", json={"optimizer": {"rule": "keras", "lr": 0.1, "momentum": 2}}), 422)
    assert_problem(await api.put("/v1/models/x", json={"optimizer": {"rule": "adam", "lr": 0.1}}), 422)
    assert_problem(await api.put("/v1/models/x", json={"optimizer": {"rule": "tf1", "lr": 0.1, "maximize": True}}), 422)
    # Schedules: structure (pydantic) and meaning (the domain) both answer 422 and write nothing.
    bad_schedules: list[Any] = [
        {"type": "cosine"},
        {"type": "cosine", "T_max": 0},
        {"type": "step", "step_size": 1, "gamma": "big"},
        {"type": "sequential", "schedulers": [{"type": "constant"}], "milestones": [4]},
        {"type": "sequential", "schedulers": [{"type": "constant"}] * 3, "milestones": [5, 2]},
        {"type": "linear", "start_factor": 0.0},
        "cosine",
    ]
    for schedule in bad_schedules:
        body = assert_problem(await api.patch("/v1/models/k", json={"schedule": schedule}), 422)
    assert body["errors"]
    assert (await api.get("/v1/models/k")).json()["schedule"] == {"type": "constant"}
    assert_problem(await api.patch("/v1/models/k", json={}), 422, "invalid-request")
    assert_problem(await api.patch("/v1/models/nope", json={"schedule": {"type": "constant"}}), 404)
    # The step that follows still works.
    await api.put("/v1/models/k/params/w", json=tensor([1.0]))
    r = await api.post("/v1/models/k/step", json={"gradients": {"w": tensor([1.0])}})
    assert r.status_code == 200 and r.json()["params"]["w"]["lr"] == 0.2


async def test_a_config_stored_before_rules_reads_as_pytorch(store: Journal) -> None:
    """A model whose journal holds a config from before rules, schedules, modes and durability."""
    legacy = {
        "optimizer": {
            "lr": 0.1,
            "momentum": 0.9,
            "dampening": 0.0,
            "nesterov": False,
            "weight_decay": 0.0,
            "maximize": False,
        }
    }
    config = ModelConfig.from_dict(legacy)
    assert config.rule.name == "pytorch" and config.mode.kind == "async" and config.durability.flush_ms is None
    if not store.durable:
        return
    got = await store.acquire("old", Replica("r", "http://r"), 5000)
    assert isinstance(got, Lease)
    await store.create(got, "old", legacy, "rev", "inc")
    await store.release(got)
    async with make_client(store) as api:
        body = (await api.get("/v1/models/old")).json()
        assert body["optimizer"]["rule"] == "pytorch" and body["schedule"] == {"type": "constant"}
        assert body["mode"] == "async" and body["durability"] == "step"
