"""Every 422 says in plain words what is wrong and what is allowed, with ``loc`` at the user's field.

The README promises some of these messages; each one it quotes is checked here over HTTP, and
each one checked here must still be quoted in the README (so the two cannot drift apart).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from momentum_service.store import MemoryJournal

from .helpers import ROOT
from .test_http import assert_problem, make_client, tensor

README = (ROOT / "README.md").read_text()

# (method, path, body, loc, message): messages the README quotes.
QUOTED = [
    ("PUT", "/v1/models/m", {"optimizer": {"lr": -0.1}}, ["body", "optimizer", "lr"], "lr must be >= 0, got -0.1"),
    (
        "PUT",
        "/v1/models/m",
        {"optimizer": {"lr": 0.1}, "schedule": {"type": "step", "step_size": 0}},
        ["body", "schedule", "step_size"],
        "step_size must be >= 1, got 0",
    ),
    (
        "PUT",
        "/v1/models/m",
        {
            "optimizer": {"lr": 0.1},
            "schedule": {"type": "sequential", "milestones": [5, 2], "schedulers": [{"type": "constant"}] * 3},
        },
        ["body", "schedule", "milestones"],
        "milestones must be increasing, got [5, 2]",
    ),
    (
        "PUT",
        "/v1/models/m",
        {"optimizer": {"lr": 0.1}, "schedule": {"type": "cosine", "T_max": 10, "bogus": 1}},
        ["body", "schedule", "bogus"],
        "schedule 'cosine' has no field bogus; it has: T_max, eta_min",
    ),
    (
        "PUT",
        "/v1/models/m",
        {"optimizer": {"rule": "keras", "lr": 0.1, "dampening": 0.1}},
        ["body", "optimizer", "dampening"],
        "rule 'keras' has no hyperparameter dampening; its hyperparameters are: lr, momentum, nesterov, weight_decay",
    ),
]

# Messages not quoted in the README, checked all the same: (method, path, body, loc, message).
OTHERS = [
    ("PATCH", "/v1/models/existing", {"optimizer": {"lr": -1}}, ["body", "optimizer", "lr"], "lr must be >= 0, got -1"),
    (
        "PUT",
        "/v1/models/m",
        {"optimizer": {"lr": 0.1}, "bogus": 1},
        ["body", "bogus"],
        "the body has no field 'bogus'; it has: optimizer, schedule, mode, workers, max_staleness",
    ),
    ("PUT", "/v1/models/m", {}, ["body", "optimizer"], "optimizer is required"),
    (
        "PATCH",
        "/v1/models/existing",
        {"schedule": {"type": "nope"}},
        ["body", "schedule", "type"],
        "type must be one of constant, step, multistep, exponential, cosine, linear, sequential, got 'nope'",
    ),
    ("PATCH", "/v1/models/existing", {"optimizer": {"lr": "x"}}, ["body", "optimizer", "lr"], "lr must be a number"),
    (
        "PUT",
        "/v1/models/m",
        {"optimizer": {"lr": 0.1}, "mode": "syn"},
        ["body", "mode"],
        "mode must be one of async, sync, bounded, got 'syn'",
    ),
    (
        "PUT",
        "/v1/models/existing/params/w",
        {"shape": [2], "dtype": "float16", "data": [1, 2]},
        ["body", "dtype"],
        "dtype must be 'float32' or 'float64', got 'float16'",
    ),
    (
        "POST",
        "/v1/models/existing/step",
        {"gradients": {"w": {"shape": [2], "dtype": "float32", "data": [1, "a"]}}},
        ["body", "gradients", "w", "data", 1],
        "gradients.w.data[1] must be a number, got 'a'",
    ),
    (
        "POST",
        "/v1/models/existing/step",
        {"gradients": {"w": tensor([1.0])}, "expected_steps": {"w": -1}},
        ["body", "expected_steps", "w"],
        "expected_steps.w must be >= 0, got -1",
    ),
]

# Internals of pydantic that a message or loc must never show.
LEAKS = re.compile(r"Input should|Extra inputs|constrained-|tagged-union|OptimizerPatch|\bnone\b|\^\[|\{0,")


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(MemoryJournal()) as client:
        r = await client.put("/v1/models/existing", json={"optimizer": {"lr": 0.1}})
        assert r.status_code == 201
        yield client


def _check(r: httpx.Response, loc: list[Any], msg: str) -> None:
    body = assert_problem(r, 422)
    first = body["errors"][0]
    assert first["loc"] == loc and first["msg"].startswith(msg) and body["detail"].startswith(msg), body
    assert not LEAKS.search(r.text), r.text


@pytest.mark.parametrize(("method", "path", "body", "loc", "msg"), QUOTED + OTHERS)
async def test_messages_say_what_is_wrong(
    api: httpx.AsyncClient, method: str, path: str, body: Any, loc: list[Any], msg: str
) -> None:
    _check(await api.request(method, path, json=body), loc, msg)


@pytest.mark.parametrize("msg", [q[4] for q in QUOTED])
def test_the_readme_quotes_these_messages(msg: str) -> None:
    assert f"`{msg}`" in README


@pytest.mark.parametrize(
    ("query", "name", "allowed"),
    [("names=a,,b;c", "names", "comma-separated list of parameter names"), ("include=vel", "include", "'velocity'")],
)
async def test_query_errors_say_what_is_allowed_without_a_regex(
    api: httpx.AsyncClient, query: str, name: str, allowed: str
) -> None:
    r = await api.get(f"/v1/models/existing/params?{query}")
    body = assert_problem(r, 422, "invalid-request")
    assert body["errors"] == [
        {"loc": ["query", name], "msg": body["errors"][0]["msg"], "type": "string_pattern_mismatch"}
    ]
    assert allowed in body["detail"] and not LEAKS.search(r.text), r.text


async def test_a_bad_model_name_in_the_path_says_what_a_name_is(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/models/bad%20name", json={"optimizer": {"lr": 0.1}})
    body = assert_problem(r, 422)
    assert body["errors"][0]["loc"] == ["path", "model"]
    assert "letters, digits" in body["detail"] and not LEAKS.search(r.text)


async def test_an_error_lists_at_most_twenty_problems(api: httpx.AsyncClient) -> None:
    bad = {f"p{i}": {"shape": [1], "dtype": "float16", "data": [1]} for i in range(500)}
    r = await api.put("/v1/models/existing/params", json={"params": bad})
    body = assert_problem(r, 422)
    assert len(body["errors"]) == 20 and body["error_count"] == 500
    assert "and 497 more" in body["detail"]
