"""The docker-compose topology, as processes: Redis with appendonly/appendfsync always, and
the service configured through its environment. Crashing either loses nothing."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from .helpers import RedisProcess, ServerProcess

OPT = {"lr": 0.05, "momentum": 0.9}


@pytest.mark.slow
def test_state_survives_killing_redis_and_the_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    redis_proc = RedisProcess(appendonly=True, directory=str(tmp_path)).start()
    server = ServerProcess(env={"MOMENTUM_REDIS_URL": redis_proc.url, "MOMENTUM_REDIS_PREFIX": "prod"}).start()
    try:
        url = server.url
        assert httpx.get(url + "/readyz").json() == {"status": "ok", "store": "redis"}
        assert httpx.put(f"{url}/v1/models/net", json={"optimizer": OPT}).status_code == 201
        w0 = {"shape": [3], "dtype": "float32", "data": [1.0, 2.0, 3.0]}
        assert httpx.put(f"{url}/v1/models/net/params/w", json=w0).status_code == 201
        grad = {"gradients": {"w": {"shape": [3], "dtype": "float32", "data": [0.5, -0.25, 1.0]}}}
        for _ in range(5):
            last = httpx.post(f"{url}/v1/models/net/step", json=grad).json()["params"]["w"]
        before = httpx.get(f"{url}/v1/models/net/params/w", params={"include": "velocity"}).json()
        assert before["step"] == 5 and before["data"] == last["data"]

        # SIGKILL Redis: every acknowledged write was fsynced to the AOF before the reply.
        redis_proc.kill()
        r = httpx.post(f"{url}/v1/models/net/step", json=grad)
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        assert httpx.get(url + "/readyz").status_code == 503
        assert httpx.get(url + "/healthz").status_code == 200
        redis_proc.start()  # same port, same directory: replays the AOF
        assert httpx.get(f"{url}/v1/models/net/params/w", params={"include": "velocity"}).json() == before

        # SIGKILL the service; a new process serves the same state, once the dead one's lease on the
        # model has expired (until then it answers 503 owner-unreachable, with Retry-After).
        server.kill()
        server = ServerProcess(env={"MOMENTUM_REDIS_URL": redis_proc.url, "MOMENTUM_REDIS_PREFIX": "prod"}).start()
        deadline = time.monotonic() + 5 + 5  # the lease (MOMENTUM_LEASE_MS 5000), and some slack
        while True:
            r = httpx.get(f"{server.url}/v1/models/net/params/w", params={"include": "velocity"})
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            assert r.json()["type"].endswith(":owner-unreachable")
            time.sleep(0.2)
        assert r.json() == before
        after = httpx.post(f"{server.url}/v1/models/net/step", json=grad).json()["params"]["w"]
        assert after["step"] == 6
        assert redis_proc.client().config_get("appendfsync") == {"appendfsync": "always"}
        assert any(tmp_path.rglob("*.aof*"))
    finally:
        server.stop()
        redis_proc.stop()


def test_serve_defaults_to_the_embedded_store_and_says_so() -> None:
    server = ServerProcess(env={"MOMENTUM_REDIS_URL": ""}).start()
    try:
        assert httpx.get(server.url + "/readyz").json() == {"status": "ok", "store": "memory"}
        r = httpx.put(f"{server.url}/v1/models/m", json={"optimizer": {"lr": 0.1}})
        assert r.status_code == 201
    finally:
        server.stop()
    log = server.log()
    assert "embedded in-memory store" in log


def test_invalid_setting_is_refused_at_start() -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "momentum_service", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "port" in r.stderr


def test_redacted_url_in_logs() -> None:
    from momentum_service.cli import _redact

    assert _redact("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert "s3cret" not in _redact("redis://:s3cret@redis/0")
    assert _redact("redis://redis:6379/0") == "redis://redis:6379/0"


def test_store_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from momentum_service.api.app import make_journal
    from momentum_service.settings import Settings

    monkeypatch.setenv("MOMENTUM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("MOMENTUM_MAX_BODY_BYTES", "1234")
    s = Settings()
    assert s.redis_url == "redis://127.0.0.1:1/0" and s.max_body_bytes == 1234
    assert make_journal(s).kind == "redis"
    monkeypatch.delenv("MOMENTUM_REDIS_URL")
    assert make_journal(Settings()).kind == "memory"
    np.testing.assert_equal(Settings().max_tensor_elements, 1 << 25)


async def test_frozen_redis_gives_503_in_bounded_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A SIGSTOP'd Redis accepts connections but never answers: requests must not hang."""
    import os
    import signal
    import time

    from momentum_service.api import create_app
    from momentum_service.settings import Settings
    from momentum_service.store.redis import RedisJournal

    redis_proc = RedisProcess(directory=str(tmp_path)).start()
    store = RedisJournal.from_url(redis_proc.url, prefix="frozen", timeout=0.3)
    app = create_app(Settings(), journal=store)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as api:
            assert (await api.put("/v1/models/m", json={"optimizer": OPT})).status_code == 201
            w = {"shape": [1], "dtype": "float32", "data": [1.0]}
            assert (await api.put("/v1/models/m/params/w", json=w)).status_code == 201
            assert redis_proc.proc is not None
            os.kill(redis_proc.proc.pid, signal.SIGSTOP)
            try:
                for call in (api.get("/readyz"), api.post("/v1/models/m/step", json={"gradients": {"w": w}})):
                    t = time.monotonic()
                    r = await call
                    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
                    assert time.monotonic() - t < 3 * 0.3 + 1.5
            finally:
                os.kill(redis_proc.proc.pid, signal.SIGCONT)
            r = await api.post("/v1/models/m/step", json={"gradients": {"w": w}})
            assert r.status_code == 200 and r.json()["params"]["w"]["step"] == 1
    finally:
        await store.close()
        redis_proc.stop()
