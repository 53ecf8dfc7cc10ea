"""API keys and scopes: the whole matrix of identities x models x endpoints, and the key tooling."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import momentum_client as mc
import pytest
from momentum_service.api import create_app
from momentum_service.auth import KeyRing, Scope, hash_key
from momentum_service.settings import Settings
from momentum_service.store import MemoryJournal

from .helpers import ROOT, free_port

KEYS = {
    "read": "key-read-own",
    "write": "key-write-own",
    "admin": "key-admin-own",
    "root": "key-admin-everything",
}
KEY_LINES = "\n".join(
    [
        f"{hash_key(KEYS['read'])} read:own-*",
        f"{hash_key(KEYS['write'])} write:own-*",
        f"# a comment\n{hash_key(KEYS['admin'])} admin:own-*  # trailing comment",
        f"{hash_key(KEYS['root'])} admin:*",
    ]
)
TENSOR = {"shape": [2], "dtype": "float32", "data": [1.0, 2.0]}

# (method, path, body, level): every /v1 endpoint.
ENDPOINTS: list[tuple[str, str, Any, str]] = [
    ("PUT", "/v1/models/{m}", {"optimizer": {"lr": 0.1}}, "admin"),
    ("GET", "/v1/models/{m}", None, "read"),
    ("PATCH", "/v1/models/{m}", {"optimizer": {"lr": 0.2}}, "admin"),
    ("DELETE", "/v1/models/{m}", None, "admin"),
    ("PUT", "/v1/models/{m}/params/w", TENSOR, "write"),
    ("PUT", "/v1/models/{m}/params", {"params": {"w": TENSOR}}, "write"),
    ("GET", "/v1/models/{m}/params/w", None, "read"),
    ("GET", "/v1/models/{m}/params", None, "read"),
    ("DELETE", "/v1/models/{m}/params/w", None, "admin"),
    ("POST", "/v1/models/{m}/step", {"gradients": {"w": TENSOR}}, "write"),
    ("GET", "/v1/models/{m}/checkpoint", None, "read"),
    ("PUT", "/v1/models/{m}/checkpoint", {"not": "a checkpoint"}, "admin"),
]
IDENTITIES = ["none", "unknown", "read", "write", "admin"]
RANK = {"read": 0, "write": 1, "admin": 2}


def headers_for(identity: str) -> dict[str, str]:
    if identity == "none":
        return {}
    key = "not-a-configured-key" if identity == "unknown" else KEYS[identity]
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(api_keys=KEY_LINES), journal=MemoryJournal())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        root = {"Authorization": f"Bearer {KEYS['root']}"}
        for model in ("own-m", "other-m"):
            assert (await client.put(f"/v1/models/{model}", json={"optimizer": {"lr": 0.1}}, headers=root)).is_success
            assert (await client.put(f"/v1/models/{model}/params/w", json=TENSOR, headers=root)).is_success
        yield client


async def state(api: httpx.AsyncClient, model: str) -> Any:
    root = {"Authorization": f"Bearer {KEYS['root']}"}
    model_body = (await api.get(f"/v1/models/{model}", headers=root)).json()
    params = (await api.get(f"/v1/models/{model}/params", params={"include": "velocity"}, headers=root)).json()
    return model_body, params


@pytest.mark.parametrize("model", ["own-m", "other-m"])
@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize(("method", "path", "body", "level"), ENDPOINTS, ids=[f"{e[0]} {e[1]}" for e in ENDPOINTS])
async def test_the_matrix(
    api: httpx.AsyncClient, identity: str, model: str, method: str, path: str, body: Any, level: str
) -> None:
    before = await state(api, model)
    r = await api.request(method, path.format(m=model), json=body, headers=headers_for(identity))
    if identity in ("none", "unknown"):
        expected = 401
    elif model == "own-m" and RANK[identity] >= RANK[level]:
        expected = 0  # allowed: whatever the endpoint answers, but not 401/403
    else:
        expected = 403
    if expected:
        assert r.status_code == expected, r.text
        assert r.headers["content-type"] == "application/problem+json"
        if expected == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
            if identity == "unknown":
                assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert await state(api, model) == before  # refused requests change nothing
    else:
        assert r.status_code not in (401, 403) and r.status_code < 500, r.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_need_no_key(api: httpx.AsyncClient, path: str) -> None:
    assert (await api.get(path)).status_code == 200


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
async def test_the_docs_need_any_valid_key(api: httpx.AsyncClient, path: str) -> None:
    assert (await api.get(path)).status_code == 401
    assert (await api.get(path, headers=headers_for("unknown"))).status_code == 401
    assert (await api.get(path, headers=headers_for("read"))).status_code == 200


async def test_malformed_authorization_headers(api: httpx.AsyncClient) -> None:
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", KEYS["root"], "bearer " + KEYS["root"] + "x"):
        r = await api.get("/v1/models/own-m", headers={"Authorization": value})
        assert r.status_code == 401, value
    r = await api.get("/v1/models/own-m", headers={"Authorization": "bearer " + KEYS["root"]})
    assert r.status_code == 200  # the scheme is case-insensitive


def test_scopes_nest_and_match_globs() -> None:
    ring = KeyRing.parse(KEY_LINES)
    admin = ring.authenticate(KEYS["admin"])
    assert admin is not None and admin.allows("read", "own-x") and admin.allows("write", "own-x")
    assert not admin.allows("read", "other") and not admin.allows("read", "xown-x")
    reader = ring.authenticate(KEYS["read"])
    assert reader is not None and reader.allows("read", "own-1") and not reader.allows("write", "own-1")
    assert ring.authenticate("nope") is None
    assert Scope.parse("write:mnist-[0-9]*").grants("read", "mnist-3b")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc read:*", "64 lowercase hex"),
        (f"{hash_key('k')}", "at least one scope"),
        (f"{hash_key('k')} delete:*", "read:PATTERN"),
        (f"{hash_key('k')} read:", "glob"),
        (f"{hash_key('k')} read:a/b", "glob"),
    ],
)
def test_bad_key_lines_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyRing.parse(text, "keys.txt")


def test_keys_create_prints_a_key_and_its_line(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "momentum_service", "keys", "create", "--scope", "write:mnist-*", "--scope", "read:*"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    key, line = out
    assert len(key) >= 40  # 256 random bits, base64url
    ring = KeyRing.parse(line)
    found = ring.authenticate(key)
    assert found is not None and found.allows("write", "mnist-a") and found.allows("read", "zzz")
    assert key not in line  # only the hash is written
    bad = subprocess.run(
        [sys.executable, "-m", "momentum_service", "keys", "create", "--scope", "root:*"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "read:PATTERN" in bad.stderr


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "momentum_service", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def test_an_open_server_may_only_bind_loopback() -> None:
    refused = serve("--host", "0.0.0.0")
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in refused.stderr


def test_an_unreadable_keys_file_stops_the_server(tmp_path: Any) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text("not a key line\n")
    out = serve("--keys-file", str(bad))
    assert out.returncode == 2 and "keys.txt line 1" in out.stderr


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_the_sdk_sends_its_key(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(api_keys=KEY_LINES), journal=MemoryJournal())

    async def call(**kwargs: Any) -> int:
        if kind == "sync":
            from starlette.testclient import TestClient

            with TestClient(app) as tc, mc.Client("http://testserver", client=tc, **kwargs) as client:
                client.create_model("own-x", lr=0.1, exist_ok=True)
                return 200
        async with mc.AsyncClient("http://test", transport=httpx.ASGITransport(app=app), **kwargs) as aclient:
            await aclient.create_model("own-x", lr=0.1, exist_ok=True)
            return 200

    assert await call(api_key=KEYS["admin"]) == 200
    with pytest.raises(mc.Forbidden) as forbidden:
        await call(api_key=KEYS["read"])
    assert forbidden.value.status == 403 and forbidden.value.required == "admin:own-x"
    assert "needs an admin: scope" in str(forbidden.value)
    monkeypatch.setenv("MOMENTUM_API_KEY", KEYS["admin"])
    assert await call() == 200
    monkeypatch.delenv("MOMENTUM_API_KEY")
    with pytest.raises(mc.Unauthorized) as unauthorized:
        await call()
    assert unauthorized.value.status == 401
