"""docker-compose.yml's Redis credentials and ACL, on a real redis-server with a real server process.

redis-server runs with exactly the arguments of the compose file's ``redis`` command (parsed out
of docker-compose.yml, ``${REDIS_PASSWORD:?...}`` interpolated with a random password), plus a
port, a bind address and a directory, and one test-only user, ``inspector``, to see every key
(the compose file has no such user). The service connects as the compose file's ACL user, with
the URL built the compose way, and its prefix is the compose file's ``MOMENTUM_REDIS_PREFIX``.

Checked: the whole API works through the ACL (models, parameters, async/sync/bounded steps,
idempotent replays, deletes) and Redis denied it nothing; every key is under the prefix; a wrong
password and the default user are refused; the ACL user cannot touch other keys, cannot run
dangerous commands, and cannot escape either through a Lua script of its own.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import redis
import safetensors.numpy
import yaml
from momentum_service.auth import hash_key, new_key
from momentum_service.errors import StoreUnavailable
from momentum_service.store.redis import RedisJournal
from redis.backoff import NoBackoff
from redis.retry import Retry

from .helpers import ServerProcess, free_port, terminate, wait_until
from .test_deploy_static import (
    APP_SERVICE,
    COMPOSE_FILE,
    PASSWORD_VARIABLE,
    _environment,
    _service,
    interpolate,
    redis_prefix,
    redis_words,
    service_user,
)

PASSWORD = secrets.token_hex(32)  # as .env.example makes it
INSPECTOR = secrets.token_hex(16)
KEY = new_key()
AUTH = {"authorization": f"Bearer {KEY}"}
ST = "application/x-safetensors"
# What redis-py may try and have refused without harm: CLIENT SETINFO (its library name and
# version, sent at connect; Redis 7.2+), whose error it ignores.
HARMLESS_DENIALS = {"client|setinfo"}


@dataclass
class AclRedis:
    port: int
    user: str
    prefix: str
    url: str  # the service's URL, built as docker-compose.yml builds it
    proc: subprocess.Popen[bytes]

    def client(self, username: str | None, password: str | None) -> redis.Redis:
        # No retries: a refused login is final (redis-py would otherwise retry it with backoff).
        return redis.Redis(
            port=self.port, username=username, password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0)
        )

    def service_client(self) -> redis.Redis:
        return self.client(self.user, PASSWORD)

    def inspector(self) -> redis.Redis:
        return self.client("inspector", INSPECTOR)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def acl_redis(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH; .ci/run installs it (apt-get install redis-server)")
    env = {PASSWORD_VARIABLE: PASSWORD}
    words = [interpolate(w, env) for w in redis_words(compose)]
    assert words[0] == "redis-server"
    port, directory = free_port(), tmp_path_factory.mktemp("redis-acl")
    local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    test_only = ["--user", "inspector", "on", f">{INSPECTOR}", "~*", "&*", "+@all"]
    log = (directory / "redis.log").open("wb")
    proc = subprocess.Popen([binary, *words[1:], *local, *test_only], stdout=log, stderr=subprocess.STDOUT)
    user, _ = service_user(compose)
    url = interpolate(_environment(_service(compose, APP_SERVICE))["MOMENTUM_REDIS_URL"] or "", env)
    url = url.replace("@redis:6379/", f"@127.0.0.1:{port}/")  # the compose service name, here
    server = AclRedis(port, user, redis_prefix(compose), url, proc)
    try:
        inspector = server.inspector()
        wait_until(lambda: inspector.ping(), what=f"redis with the compose ACL on port {port}")
        inspector.close()
        yield server
    finally:
        terminate(proc)
        log.close()


@pytest.fixture(scope="module")
def service(acl_redis: AclRedis) -> Iterator[ServerProcess]:
    env = {
        "MOMENTUM_API_KEYS": f"{hash_key(KEY)} admin:*",
        "MOMENTUM_REDIS_PREFIX": acl_redis.prefix,
        "MOMENTUM_SYNC_TIMEOUT_S": "0.2",  # the first of two sync workers gets its 202 without waiting 5 s
        "MOMENTUM_SNAPSHOT_LOG_RATIO": "0.5",  # a 1.2 MB parameter is snapshotted at once (the log >= 1 MiB)
    }
    server = ServerProcess(redis_url=acl_redis.url, env=env).start()
    try:
        yield server
    finally:
        server.stop()


def acl_denials(acl_redis: AclRedis) -> set[str]:
    """What Redis refused the service's user since the last ``ACL LOG RESET``."""
    entries = acl_redis.inspector().acl_log()
    return {f"{e['reason']}:{e['object']}" for e in entries if e["username"] == acl_redis.user}


def tensor(values: list[float], dtype: str = "float32") -> dict[str, Any]:
    return {"shape": [len(values)], "dtype": dtype, "data": values}


def test_the_url_is_the_compose_one(acl_redis: AclRedis) -> None:
    parts = urlsplit(acl_redis.url)
    assert (parts.username, parts.password, parts.path) == (acl_redis.user, PASSWORD, "/0")


def test_the_whole_api_works_through_the_acl_user(acl_redis: AclRedis, service: ServerProcess) -> None:
    acl_redis.inspector().acl_log_reset()
    with httpx.Client(base_url=service.url, headers=AUTH, timeout=30) as api:

        def ok(r: httpx.Response, status: int) -> httpx.Response:
            assert r.status_code == status, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"
            return r

        assert ok(api.get("/readyz"), 200).json() == {"status": "ok", "store": "redis"}
        # async mode: create, initialise (JSON and safetensors), step (both), replace, patch
        ok(api.put("/v1/models/net", json={"optimizer": {"lr": 0.1, "momentum": 0.9}}), 201)
        ok(api.put("/v1/models/net/params", json={"params": {"w": tensor([1.0, 2.0])}}), 201)
        body = safetensors.numpy.save({"b": np.float64([0.5, 0.25, 0.125])})
        ok(api.put("/v1/models/net/params", content=body, headers={"content-type": ST}), 201)
        ok(api.put("/v1/models/net/params/w", json=tensor([1.0, 2.0]), headers={"if-none-match": "*"}), 412)
        grad = {"gradients": {"w": tensor([0.5, -0.5])}}
        assert ok(api.post("/v1/models/net/step", json=grad), 200).json()["params"]["w"]["step"] == 1
        body = safetensors.numpy.save({"w": np.float16([1, 1]), "b": np.float64([1, 1, 1])})
        r = ok(api.post("/v1/models/net/step", content=body, headers={"content-type": ST, "accept": ST}), 200)
        assert safetensors.numpy.load(r.content)["b"].shape == (3,)
        # idempotent replay: applied once, the retry gets the same answer
        first = ok(api.post("/v1/models/net/step", json=grad, headers={"idempotency-key": "push-7"}), 200)
        again = ok(api.post("/v1/models/net/step", json=grad, headers={"idempotency-key": "push-7"}), 200)
        assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
        other = {"gradients": {"b": tensor([1, 1, 1], "float64")}}
        ok(api.post("/v1/models/net/step", json=other, headers={"idempotency-key": "push-7"}), 422)  # key reused
        ok(api.put("/v1/models/net", json={"optimizer": {"lr": 0.1, "momentum": 0.9}}), 200)
        patch = {"optimizer": {"lr": 0.05}, "schedule": {"type": "step", "step_size": 2}}
        ok(api.patch("/v1/models/net", json=patch), 200)
        ok(api.post("/v1/models/net/step", json={**grad, "expected_steps": {"w": 0}}), 409)
        params = ok(api.get("/v1/models/net/params", params={"include": "velocity"}), 200).json()["params"]
        assert params["w"]["step"] == 3 and params["w"]["velocity"] is not None
        assert ok(api.get("/v1/models/net"), 200).json()["params"]["b"]["step"] == 1
        # sync mode: two workers, one applied step (a repeated push is not counted twice)
        ok(api.put("/v1/models/sync", json={"optimizer": {"lr": 1.0}, "mode": "sync", "workers": 2}), 201)
        ok(api.put("/v1/models/sync/params/w", json=tensor([0.0, 0.0])), 201)
        push = {"gradients": {"w": tensor([1.0, 3.0])}, "base_step": 0}
        assert ok(api.post("/v1/models/sync/step", json={**push, "worker_id": 0}), 202).json()["status"] == "pending"
        done = ok(api.post("/v1/models/sync/step", json={**push, "worker_id": 1}), 200).json()["params"]["w"]
        assert done["data"] == [-1.0, -3.0] and done["step"] == 1
        assert ok(api.post("/v1/models/sync/step", json={**push, "worker_id": 0}), 200).json()["params"]["w"] == done
        # bounded mode
        bounded = {"optimizer": {"lr": 0.1}, "mode": "bounded", "max_staleness": 1}
        ok(api.put("/v1/models/bounded", json=bounded), 201)
        ok(api.put("/v1/models/bounded/params/w", json=tensor([1.0])), 201)
        ok(api.post("/v1/models/bounded/step", json={"gradients": {"w": tensor([1.0])}, "base_step": 0}), 200)
        # a snapshot (staged buffers renamed into place by the commit script)
        big = safetensors.numpy.save({"w": np.ones(300_000, np.float32)})
        ok(api.put("/v1/models/bounded/params", content=big, headers={"content-type": ST}), 200)
        assert ok(api.get("/v1/models/bounded"), 200).json()["params"]["w"]["shape"] == [300_000]

        keys = [k.decode() for k in acl_redis.inspector().scan_iter(count=1000)]
        assert keys and all(k.startswith(f"{acl_redis.prefix}:") for k in keys), keys
        assert any(k.endswith(":idem") for k in keys) and any(":log:" in k for k in keys), keys
        assert any(k.endswith(":lease") for k in keys) and any(":snap:" in k for k in keys), keys

        # the list of models (an index, no SCAN), a checkpoint saved and restored, the training series
        listed = ok(api.get("/v1/models"), 200).json()["models"]
        assert [m["name"] for m in listed] == ["bounded", "net", "sync"]
        saved = ok(api.get("/v1/models/net/checkpoint"), 200).content
        ok(api.put("/v1/models/net/checkpoint", content=saved, headers={"content-type": ST}), 200)
        ok(api.post("/v1/models/net/step", json={**grad, "metrics": {"loss": 0.5}}), 200)
        assert ok(api.get("/v1/models/net/metrics"), 200).json()["points"][-1]["metrics"] == {"loss": 0.5}

        # deletes (a parameter: a log entry; models: a script)
        ok(api.delete("/v1/models/net/params/b"), 204)
        ok(api.get("/v1/models/net/params/b"), 404)
        for model in ("net", "sync", "bounded"):
            ok(api.delete(f"/v1/models/{model}"), 204)
            ok(api.get(f"/v1/models/{model}"), 404)
        assert ok(api.get("/readyz"), 200).json()["status"] == "ok"

    keys = [k.decode() for k in acl_redis.inspector().scan_iter(count=1000)]
    assert all(k.startswith(f"{acl_redis.prefix}:") for k in keys), keys
    assert {d.split(":", 1)[1] for d in acl_denials(acl_redis)} <= HARMLESS_DENIALS, acl_denials(acl_redis)
    assert "Traceback" not in service.log() and PASSWORD not in service.log().replace(acl_redis.url, "")


def test_wrong_password_and_default_user_are_refused(acl_redis: AclRedis) -> None:
    for username, password in [(acl_redis.user, "wrong"), (acl_redis.user, None), (None, None), ("default", "")]:
        with pytest.raises(redis.AuthenticationError):
            acl_redis.client(username, password).ping()
    with pytest.raises(redis.AuthenticationError):
        acl_redis.client("default", PASSWORD).ping()  # the default user is off, whatever the password
    with socket.create_connection(("127.0.0.1", acl_redis.port), timeout=5) as raw:  # no AUTH at all
        raw.sendall(b"PING\r\nGET x\r\n")
        assert raw.recv(1000).startswith(b"-NOAUTH")


async def test_the_service_with_a_wrong_password_gets_503s(acl_redis: AclRedis) -> None:
    store = RedisJournal.from_url(acl_redis.url.replace(PASSWORD, "0" * 64), prefix=acl_redis.prefix, timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)invalid username-password|WRONGPASS|authentication"):
            await store.ping()
    finally:
        await store.close()


OUTSIDE_THE_PREFIX = [
    ("SET", "other", "1"),
    ("HSET", "other", "f", "v"),
    ("HGET", "other", "f"),
    ("HMGET", "other", "f"),
    ("UNLINK", "other"),
    ("HEXISTS", "other", "f"),
    ("PEXPIRE", "other", "1000"),
    ("SADD", "other", "x"),
    ("ZADD", "other", "1", "x"),
    ("ZRANGE", "other", "0", "-1"),
    ("HSET", "momentumX:k", "f", "v"),  # the prefix without its separator
    ("HSET", "Momentum:k", "f", "v"),
]

DANGEROUS = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("CONFIG", "GET", "*"),
    ("CONFIG", "SET", "dir", "/tmp"),
    ("KEYS", "*"),
    ("SCAN", "0"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("ACL", "LIST"),
    ("ACL", "SETUSER", "momentum", "+@all"),
    ("ACL", "WHOAMI"),
    ("SCRIPT", "FLUSH"),
    ("EVAL", "return 1", "0"),
    ("CLIENT", "LIST"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("INFO",),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("REPLICAOF", "127.0.0.1", "1"),
    ("MODULE", "LIST"),
    ("MONITOR",),
    ("SELECT", "1"),
    ("SWAPDB", "0", "1"),
    ("PUBLISH", "channel", "x"),
    ("SUBSCRIBE", "channel"),
    ("RENAME", "momentum:x", "other"),  # out of the prefix (RENAME within it is the service's)
    ("DUMP", "momentum:x"),
    ("DEL", "momentum:x"),  # UNLINK is what the service uses
    ("WATCH", "momentum:x"),
    ("OBJECT", "ENCODING", "momentum:x"),
    ("GETDEL", "momentum:x"),
    ("APPEND", "momentum:x", "1"),
]


@pytest.mark.parametrize("command", OUTSIDE_THE_PREFIX + DANGEROUS, ids=" ".join)
def test_the_acl_user_is_refused(acl_redis: AclRedis, command: tuple[str, ...]) -> None:
    client = acl_redis.service_client()
    with pytest.raises(redis.exceptions.ResponseError) as refused:
        client.execute_command(*command)
    client.close()
    if command[0] == "DEBUG":  # off in Redis 7 whoever asks (enable-debug-command no), before the ACL
        assert "DEBUG command not allowed" in str(refused.value)
    else:
        assert isinstance(refused.value, redis.exceptions.NoPermissionError), refused.value


@pytest.mark.parametrize(
    "script",
    [
        "return redis.call('SET', 'other', '1')",
        "return redis.call('HSET', 'other', 'f', 'v')",
        "return redis.call('FLUSHALL')",
        "return redis.call('CONFIG', 'GET', '*')",
        "return redis.call('KEYS', '*')",
        "return redis.call('DEL', KEYS[1])",
        "return redis.call('GETDEL', KEYS[1])",
    ],
)
def test_a_script_of_its_own_runs_under_the_same_acl(acl_redis: AclRedis, script: str) -> None:
    """SCRIPT LOAD is allowed (redis-py needs it), so a script must not be a way around the ACL."""
    client = acl_redis.service_client()
    sha = client.script_load(script)
    with pytest.raises(
        redis.exceptions.ResponseError,
        match=r"(?i)NOPERM|no permissions|can't run this command|can't access|not allowed from script",
    ):
        client.evalsha(sha, 1, f"{acl_redis.prefix}:{{acl-test}}:x")
    # ...while what the ACL allows works from a script too.
    ok = client.script_load("return redis.call('HSET', KEYS[1], 'f', 'v') + redis.call('UNLINK', KEYS[1])")
    assert client.evalsha(ok, 1, f"{acl_redis.prefix}:{{acl-test}}:x") == 2
    client.close()


def test_nothing_was_written_outside_the_prefix(acl_redis: AclRedis) -> None:
    """After all of the above (runs last): no key but the service's, and Redis was never flushed."""
    inspector = acl_redis.inspector()
    keys = [k.decode() for k in inspector.scan_iter(count=1000)]
    assert all(k.startswith(f"{acl_redis.prefix}:") for k in keys), keys
    assert inspector.exists("other") == 0
    # The ACL log saw the refusals above (so its silence during the API run means something).
    assert {"command:flushall", "key:other"} <= acl_denials(acl_redis), acl_denials(acl_redis)
    assert inspector.config_get("appendfsync") == {"appendfsync": "always"}  # the compose flags, kept


def test_redis_loaded_the_acl(acl_redis: AclRedis) -> None:
    users = {u.decode() if isinstance(u, bytes) else u for u in acl_redis.inspector().acl_users()}
    assert users == {"default", acl_redis.user, "inspector"}, users
    default = acl_redis.inspector().acl_getuser("default")
    assert "off" in default["flags"], default
    user = acl_redis.inspector().acl_getuser(acl_redis.user)
    assert "on" in user["flags"] and "nopass" not in user["flags"], user
    assert user["keys"] in ([f"~{acl_redis.prefix}:*"], f"~{acl_redis.prefix}:*"), user["keys"]
