"""Prometheus metrics and logs, against real server processes (a real Redis frozen with SIGSTOP).

After a scripted run (steps, a replay, a step-mismatch 409, a 404, a 422, a 503 from a frozen
Redis), the exposition, parsed with Prometheus' own text parser, has the expected counts; the
model label stays within its cap under 10,000 model names; the logs have a line per model created,
reconfigured and deleted, per refused key, per store failure and recovery and per slow step, with
request ids, in text and JSON; and no API key or Redis password appears in any log line.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import httpx
import pytest
from momentum_service.api import create_app
from momentum_service.auth import hash_key
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal
from prometheus_client.parser import text_string_to_metric_families

from .helpers import RedisProcess, ServerProcess

W = {"shape": [2], "dtype": "float32", "data": [1.0, 2.0]}
G = {"gradients": {"w": W}}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def redis() -> Any:
    proc = RedisProcess().start()
    yield proc
    proc.stop()


def test_a_scripted_run_is_counted_and_logged(redis: RedisProcess) -> None:
    key, password_like = "key-telemetry-root-0123456789", "s3cr3t-pw"
    env = {
        "MOMENTUM_API_KEYS": f"{hash_key(key)} admin:*",
        "MOMENTUM_REDIS_TIMEOUT_S": "0.5",
        "MOMENTUM_SLOW_STEP_MS": "1200",
        "MOMENTUM_LOG_FORMAT": "json",
    }
    # The URL carries a password the server must never log (Redis here has none, and ignores it).
    server = ServerProcess(redis_url=redis.url.replace("redis://", f"redis://:{password_like}@"), env=env)
    server.start()
    auth = {"Authorization": f"Bearer {key}"}
    api = httpx.Client(base_url=server.url, headers=auth, timeout=30)
    try:
        assert api.put("/v1/models/m", json={"optimizer": {"lr": 0.1, "momentum": 0.9}}).status_code == 201
        assert api.put("/v1/models/m/params/w", json=W).status_code == 201
        for _ in range(3):
            assert api.post("/v1/models/m/step", json=G).status_code == 200
        replay = {"Idempotency-Key": "once"}
        assert api.post("/v1/models/m/step", json=G, headers=replay).status_code == 200
        r = api.post("/v1/models/m/step", json=G, headers=replay)
        assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true"
        r = api.post("/v1/models/m/step", json={**G, "expected_steps": {"w": 0}})
        assert r.status_code == 409
        assert api.post("/v1/models/m/step", json={**G, "base_step": 2}).status_code == 200  # at step 4: staleness 2
        assert api.get("/v1/models/nope").status_code == 404
        assert api.patch("/v1/models/m", json={"optimizer": {"lr": -1}}).status_code == 422
        assert api.patch("/v1/models/m", json={"optimizer": {"lr": 0.05}}).status_code == 200
        r = httpx.get(f"{server.url}/v1/models/m", headers={"Authorization": "Bearer not-the-key"})
        assert r.status_code == 401
        assert r.headers["x-request-id"]
        # A frozen Redis: the step is a 503 (store-unavailable) within the store timeout's bound.
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            r = api.post("/v1/models/m/step", json=G, headers={"X-Request-ID": "frozen-step-1"})
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert r.status_code == 503 and r.headers["x-request-id"] == "frozen-step-1"
        deadline = time.monotonic() + 20
        while api.post("/v1/models/m/step", json=G).status_code != 200:  # served again once Redis is back
            assert time.monotonic() < deadline
            time.sleep(0.2)
        applied = 3 + 1 + 1 + 1  # the loop's, the keyed one, the staleness one, the one after Redis came back
        assert api.delete("/v1/models/m").status_code == 204

        # Who may read /metrics: a key on every model (here the only key), not anyone.
        assert httpx.get(f"{server.url}/metrics").status_code == 401
        r = api.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        found = samples(r.text)
        assert value(found, "momentum_steps_total", model="m") == applied
        assert value(found, "momentum_pushes_total", model="m", outcome="applied") == applied
        assert value(found, "momentum_pushes_total", model="m", outcome="replayed") == 1
        assert value(found, "momentum_problems_total", status="409", type="step-mismatch") == 1
        assert value(found, "momentum_problems_total", status="404", type="model-not-found") == 1
        assert value(found, "momentum_problems_total", status="422", type="invalid-config") == 1
        assert value(found, "momentum_problems_total", status="401", type="unauthorized") >= 2
        assert value(found, "momentum_problems_total", status="503", type="store-unavailable") >= 1
        assert value(found, "momentum_push_staleness_steps_count", model="m") == 1
        assert value(found, "momentum_push_staleness_steps_sum", model="m") == 2
        assert value(found, "momentum_step_duration_seconds_count", model="m") >= applied
        assert value(found, "momentum_http_requests_total", route="step", status="200") >= applied + 1
        assert value(found, "momentum_http_request_bytes_total", route="step") > 0
        assert value(found, "momentum_store_errors_total", op="commit", error="StoreUnavailable") >= 1
        assert value(found, "momentum_store_duration_seconds_count", op="commit") >= 1
        assert value(found, "momentum_owner_changes_total", event="took") >= 1
        assert value(found, "momentum_journal_written_bytes_total", model="m", kind="log") > 0
    finally:
        api.close()
        server.stop()

    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    text = server.log()
    assert key not in text and password_like not in text  # no API key, no Redis password
    assert any(m == "model 'm' created: rule pytorch, mode async" for m in messages), messages
    assert any(m == "model 'm' reconfigured: optimizer.lr" for m in messages)
    assert any(m == "model 'm' deleted" for m in messages)
    assert any(m.startswith("refused GET /v1/models/m: unauthorized") for m in messages)
    assert any(m.startswith("store failing: redis") for m in messages)
    assert any(m.startswith("store recovered: redis answers again") for m in messages)
    frozen = [e for e in lines if e.get("request_id") == "frozen-step-1"]
    assert frozen and any("store" in e["message"] for e in frozen), lines[-10:]
    created = next(e for e in lines if e["message"].startswith("model 'm' created"))
    assert created["model"] == "m" and created["request_id"] and created["level"] == "INFO"


def test_a_slow_step_is_logged_with_its_request_id() -> None:
    server = ServerProcess(env={"MOMENTUM_SLOW_STEP_MS": "0.001"}).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            api.put("/v1/models/m", json={"optimizer": {"lr": 0.1}})
            api.put("/v1/models/m/params/w", json=W)
            r = api.post("/v1/models/m/step", json=G, headers={"X-Request-ID": "slow-1"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "slow-1"
            for offered in ("x" * 65, "a b", "a%0a"):  # too long, or characters not echoed into logs
                r = api.post("/v1/models/m/step", json=G, headers={"X-Request-ID": offered})
                assert r.status_code == 200 and r.headers["x-request-id"] != offered  # a fresh one instead
    finally:
        server.stop()
    slow = [line for line in server.log().splitlines() if "slow step: model 'm'" in line]
    assert slow and "[req slow-1]" in slow[0], server.log()[-2000:]


async def test_the_model_label_stays_within_its_cap_under_10000_models() -> None:
    app = create_app(Settings(metrics_max_models=50), journal=MemoryJournal())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
        for i in range(10_000):  # each a 404 step on a model name never seen: every name a label candidate
            app.state.telemetry.pushed(f"model-{i}", "applied")
        assert (await api.put("/v1/models/late", json={"optimizer": {"lr": 0.1}})).status_code == 201
        await api.put("/v1/models/late/params/w", json=W)
        assert (await api.post("/v1/models/late/step", json=G)).status_code == 200
        found = samples((await api.get("/metrics")).text)
    models = {dict(labels).get("model") for (_, labels) in found if dict(labels).get("model")}
    assert len(models) <= 51 and "_other" in models, len(models)
    assert value(found, "momentum_pushes_total", model="_other", outcome="applied") == 10_000 - 50 + 1
    assert value(found, "momentum_steps_total", model="_other") == 1  # "late" came after the cap
