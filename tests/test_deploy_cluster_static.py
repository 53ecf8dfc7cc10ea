"""Static checks of the scaled-out deployment: docker-compose.cluster.yml and deploy/haproxy.cfg.

No Docker daemon is needed. The compose file is validated against the Compose Specification JSON
schema vendored in check-jsonschema (as docker-compose.yml is, by tests/test_deploy_static.py,
whose parsing helpers this file reuses), and the properties the topology relies on are asserted:
6 Redis Cluster nodes (AOF with fsync always, announced by service name, passwords and ACL users
like docker-compose.yml's plus what the cluster client needs), an init service that makes them 3
primaries with a replica each, once, 3 server replicas on the cluster with distinct advertised URLs,
and HAProxy (pinned) balancing over exactly those replicas, checking GET /readyz, never re-sending
a request that reached a replica. ``haproxy -c`` checks the configuration's syntax when haproxy is
installed (scripts/install installs it).

One test runs processes: the compose file's Redis command line on 6 real redis-servers, the
cluster created as the compose's admin user, the replicas replicating as it, and the service's
user driving redis-py's asyncio RedisCluster (slot map, scripts, transactions, WAIT) and refused
everything else. tests/test_balancer.py runs deploy/haproxy.cfg itself in front of three replicas.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml
from momentum_service.store import Batch, KeyRecord, Lease, Record, Replica
from momentum_service.store.redis import RedisJournal
from redis.asyncio.cluster import RedisCluster

from .balancer import BACKENDS, HAPROXY_CFG, haproxy_binary
from .helpers import free_port, terminate, wait_until
from .test_deploy_static import (
    COMPOSE_FILE,
    DOCKERFILE,
    ENV_EXAMPLE,
    KEYS_SECRET,
    PASSWORD_VARIABLE,
    REDIS_ACL_COMMANDS,
    REPO_ROOT,
    _command_words,
    _environment,
    _has_option,
    _published_container_ports,
    _strings,
    acl_users,
    interpolate,
    variables,
)
from .test_deploy_static import compose_validator as compose_validator  # the schema fixture, shared

CLUSTER_FILE = REPO_ROOT / "docker-compose.cluster.yml"
ROUTES = REPO_ROOT / "service" / "momentum_service" / "api" / "routes.py"
ADMIN_VARIABLE = "REDIS_ADMIN_PASSWORD"
SERVICE_USER, ADMIN_USER = "momentum", "admin"
NODES, REPLICAS_PER_PRIMARY, SERVICE_REPLICAS = 6, 1, 3
REDIS_PORT, APP_PORT = 6379, 8000
HAPROXY_CFG_TARGET = "/usr/local/etc/haproxy/haproxy.cfg"

# What the service's user needs on a cluster beyond docker-compose.yml's grants (REDIS_ACL_COMMANDS):
# what redis-py 8's asyncio RedisCluster sends (redis/asyncio/cluster.py) and the durability's WAIT.
CLUSTER_ACL_COMMANDS = {
    "cluster|slots": "NodesManager.initialize: the slot map, at start and after MOVED redirections",
    "command": "AsyncCommandsParser.initialize: COMMAND, the key positions of every command, read once",
    "asking": "a slot being migrated answers ASK: the command is re-sent after ASKING to the new node",
    "wait": 'a model\'s {"replicas": n} durability: the step is acknowledged once n replicas have it',
}
# The admin user: `redis-cli --cluster create` (CLUSTER MEET/ADDSLOTS/REPLICATE/INFO/NODES..., INFO),
# the init's CLUSTER INFO, and replication as masteruser (PING, REPLCONF, PSYNC). No keys.
ADMIN_ACL_COMMANDS = {"cluster", "info", "ping", "psync", "replconf"}


def _services(compose: dict[str, Any], pattern: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in (compose.get("services") or {}).items() if re.fullmatch(pattern, k)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(CLUSTER_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{CLUSTER_FILE.name} is not a mapping"
    return data


@pytest.fixture(scope="module")
def nodes(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return _services(compose, r"redis-\d+")


@pytest.fixture(scope="module")
def replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return _services(compose, r"momentum-\d+")


def node_options(node: dict[str, Any]) -> list[str]:
    """The redis-server options of a node: its command is ``sh -c 'exec docker-entrypoint.sh
    redis-server "$@" --cluster-announce-hostname "$(hostname)"' redis-server OPTION...``."""
    words = _command_words(node["command"])
    assert words[:2] == ["sh", "-c"] and words[3] == "redis-server", words[:4]
    script = shlex.split(words[2])
    assert script[:4] == ["exec", "docker-entrypoint.sh", "redis-server", "$$@"], script
    assert script[4:] == ["--cluster-announce-hostname", "$$(hostname)"], script
    return words[4:]


def haproxy_lines() -> list[list[str]]:
    """deploy/haproxy.cfg's statements, each as its words (comments dropped)."""
    out = []
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append(shlex.split(line))
    return out


def haproxy_default(word: str) -> str:
    """``${NAME-default}`` -> default (what the container sees: none of those variables is set)."""
    match = re.fullmatch(r"\$\{(\w+)-([^}]*)\}", word)
    assert match, f"expected ${{NAME-default}}, got {word!r}"
    return match.group(2)


# -- schema --------------------------------------------------------------------------------------


def test_cluster_compose_matches_compose_spec(
    compose: dict[str, Any], compose_validator: jsonschema.protocols.Validator
) -> None:
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    messages = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    assert not messages, f"{CLUSTER_FILE.name} violates the Compose Specification:\n" + "\n".join(messages)


# -- the Redis Cluster nodes ---------------------------------------------------------------------


def test_six_pinned_cluster_nodes_with_aof_fsync_always(nodes: dict[str, dict[str, Any]]) -> None:
    assert sorted(nodes) == [f"redis-{i}" for i in range(1, NODES + 1)], sorted(nodes)
    options = {name: node_options(node) for name, node in nodes.items()}
    assert len({tuple(o) for o in options.values()}) == 1, "every node runs the same options"
    for name, node in nodes.items():
        assert node["image"] == "redis:7.2-alpine", node["image"]
        words = options[name]
        assert _has_option(words, "--cluster-enabled", "yes"), words
        assert _has_option(words, "--appendonly", "yes") and _has_option(words, "--appendfsync", "always")
        assert _has_option(words, "--cluster-config-file", "nodes.conf")
        timeout = int(words[words.index("--cluster-node-timeout") + 1])
        assert 1000 <= timeout <= 5000, f"a failed primary should be replaced within seconds: {timeout} ms"
        assert _has_option(words, "--cluster-preferred-endpoint-type", "hostname")
        assert node.get("hostname") == name, "the node announces $(hostname): its service name"
        assert not node.get("ports") and node.get("network_mode") != "host", f"{name} must not be published"
        assert node.get("restart") == "unless-stopped"


def test_each_node_has_its_own_declared_data_volume(compose: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
    declared = compose.get("volumes") or {}
    sources = []
    for name, node in nodes.items():
        [mount] = node.get("volumes") or [None]
        source, _, target = str(mount).partition(":")
        assert target == "/data", f"{name}: {mount}"
        assert source in declared and not source.startswith((".", "/", "~")), f"{name}: a named volume: {mount}"
        sources.append(source)
    assert len(set(sources)) == NODES, sources


def test_nodes_healthcheck_pings_as_the_service_user(nodes: dict[str, dict[str, Any]]) -> None:
    for node in nodes.values():
        test = node["healthcheck"]["test"]
        words = shlex.split(test[1] if test[0] == "CMD-SHELL" else " ".join(test[1:]))
        assert words[0] == "redis-cli" and "ping" in words and _has_option(words, "--user", SERVICE_USER), words
        assert "-a" not in words and "--pass" not in words, "the password comes from REDISCLI_AUTH, not argv"
        assert variables(_environment(node)["REDISCLI_AUTH"] or "") == {PASSWORD_VARIABLE}


def _users(nodes: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return acl_users(node_options(next(iter(nodes.values()))))


def _granted(rules: list[str]) -> set[str]:
    commands = [r for r in rules if r[0] in "+-" and r != "-@all"]
    assert rules.index("-@all") < min(rules.index(c) for c in commands), "-@all must come before the grants"
    assert all(c.startswith("+") and "@" not in c for c in commands), f"single commands, not categories: {commands}"
    return {c[1:].lower() for c in commands}


def _password(rules: list[str]) -> str:
    [password] = [r for r in rules if r.startswith((">", "#"))]
    return password


def test_acl_users_default_off_service_and_admin(nodes: dict[str, dict[str, Any]]) -> None:
    users = _users(nodes)
    assert set(users) == {"default", SERVICE_USER, ADMIN_USER}, sorted(users)
    assert users["default"] == ["off"]
    words = node_options(next(iter(nodes.values())))
    for option in ("--requirepass", "--protected-mode", "--aclfile", "--rename-command"):
        assert option not in words, f"{option}: the ACL users are the only access control"
    for name, rules in users.items():
        for open_rule in ("nopass", "allkeys", "~*", "%RW~*", "allchannels", "&*", "+@all", "allcommands"):
            assert open_rule not in rules, f"{open_rule} opens {name!r}: {rules}"


def test_service_user_is_the_single_redis_acl_plus_the_cluster_client(nodes: dict[str, dict[str, Any]]) -> None:
    rules = _users(nodes)[SERVICE_USER]
    assert "on" in rules and [r for r in rules if r.startswith(("~", "%"))] == ["~momentum:*"], rules
    assert "resetchannels" in rules and not [r for r in rules if r.startswith("&")]
    granted = _granted(rules)
    expected = set(REDIS_ACL_COMMANDS) | set(CLUSTER_ACL_COMMANDS)
    assert granted == expected, f"missing: {sorted(expected - granted)}, not needed: {sorted(granted - expected)}"
    # docker-compose.yml's user, command for command: the two files do not drift apart.
    single = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    single_users = acl_users(_command_words(single["services"]["redis"]["command"]))
    assert _granted(single_users[SERVICE_USER]) == set(REDIS_ACL_COMMANDS)
    assert re.fullmatch(rf">\$\{{{PASSWORD_VARIABLE}:\?[^}}]+\}}", _password(rules)), _password(rules)
    dangerous = {"flushall", "flushdb", "config", "keys", "scan", "debug", "shutdown", "eval", "acl", "module"}
    dangerous |= {"cluster", "readonly", "replicaof", "monitor", "migrate", "script|flush", "psync", "sync"}
    assert not granted & dangerous


def test_admin_user_touches_no_keys_and_replicas_sync_as_it(nodes: dict[str, dict[str, Any]]) -> None:
    rules = _users(nodes)[ADMIN_USER]
    assert "on" in rules and "resetkeys" in rules and "resetchannels" in rules, rules
    assert not [r for r in rules if r.startswith(("~", "%", "&"))], f"no keys, no channels: {rules}"
    assert _granted(rules) == ADMIN_ACL_COMMANDS, rules
    password = _password(rules)
    assert re.fullmatch(rf">\$\{{{ADMIN_VARIABLE}:\?[^}}]+\}}", password), password
    words = node_options(next(iter(nodes.values())))
    assert _has_option(words, "--masteruser", ADMIN_USER)
    assert "--masterauth" in words and ">" + words[words.index("--masterauth") + 1] == password
    with pytest.raises(KeyError, match=ADMIN_VARIABLE):
        interpolate(password, {})


def test_no_literal_passwords_and_every_variable_documented(compose: dict[str, Any]) -> None:
    used = {name for s in _strings(compose) for name in variables(s)}
    assert used == {PASSWORD_VARIABLE, ADMIN_VARIABLE}, used
    for text in _strings(compose):
        if text.startswith(">") and len(text) > 1:
            assert variables(text) in ({PASSWORD_VARIABLE}, {ADMIN_VARIABLE}), f"a literal password: {text!r}"
        for url in re.findall(r"rediss?://[^\s\"']+", text):
            userinfo = urlsplit(url).netloc.rpartition("@")[0]
            assert not userinfo or variables(userinfo) == {PASSWORD_VARIABLE}, f"a literal password in {url!r}"
    header = CLUSTER_FILE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    for name in used:
        assert re.search(rf"^{name}=$", example, flags=re.MULTILINE) or name in header, f"{name} is not documented"


# -- the init ------------------------------------------------------------------------------------


def test_init_creates_three_primaries_with_a_replica_each_once(
    compose: dict[str, Any], nodes: dict[str, dict[str, Any]]
) -> None:
    init = compose["services"]["redis-init"]
    assert init["image"] == "redis:7.2-alpine" and init.get("restart") == "no"
    script = " ".join(_command_words(init.get("entrypoint") or []) + _command_words(init["command"]))
    create = re.search(r"redis-cli (.*)--cluster create (.*)", script)
    assert create, script
    args = shlex.split(create.group(1) + create.group(2))
    assert _has_option(args, "--user", ADMIN_USER) and "--cluster-yes" in args
    assert _has_option(args, "--cluster-replicas", str(REPLICAS_PER_PRIMARY)), args
    primaries = NODES // (1 + REPLICAS_PER_PRIMARY)
    assert primaries * (1 + REPLICAS_PER_PRIMARY) == NODES and primaries >= 3, "Redis Cluster needs 3 primaries"
    [listed] = re.findall(r'nodes="([^"]*)"', script)
    assert sorted(listed.split()) == sorted(nodes), "the init joins exactly the compose's nodes"
    # Idempotent: an ok cluster is left alone, one already created is only waited for.
    assert script.index("cluster_state:ok") < script.index("--cluster create")
    assert "cluster_known_nodes" in script
    assert variables(_environment(init)["REDISCLI_AUTH"] or "") == {ADMIN_VARIABLE}
    depends = init["depends_on"]
    assert set(depends) == set(nodes) and all(d["condition"] == "service_healthy" for d in depends.values())


INIT_STUBS = {
    # redis-cli: CLUSTER INFO says ok once the cluster was created (or was created before: $STATE/ok).
    "redis-cli": """#!/bin/sh
echo "$*" >> "$STATE/calls"
case "$*" in
  *"--cluster create"*) touch "$STATE/ok" ;;
  *"cluster info"*)
    if [ -e "$STATE/ok" ]; then printf 'cluster_state:ok\\r\\ncluster_known_nodes:6\\r\\n'
    else printf 'cluster_state:fail\\r\\ncluster_known_nodes:1\\r\\n'; fi ;;
esac
""",
    # getent hosts redis-N -> 10.0.0.N
    "getent": '#!/bin/sh\necho "10.0.0.${2#redis-}      $2"\n',
}


def test_init_script_creates_the_cluster_once(compose: dict[str, Any], tmp_path: Path) -> None:
    """The init's shell script (compose-interpolated, run by sh with stub redis-cli and getent): a
    fresh set of nodes is created as a cluster, a cluster already ok is left alone."""
    init = compose["services"]["redis-init"]
    entrypoint, [script] = _command_words(init["entrypoint"]), _command_words(init["command"])
    assert entrypoint == ["sh", "-c"]
    script = interpolate(script, {})
    subprocess.run(["sh", "-n", "-c", script], check=True, timeout=10)
    for name, body in INIT_STUBS.items():
        (tmp_path / name).write_text(body)
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "STATE": str(tmp_path)}

    def run() -> list[str]:
        (tmp_path / "calls").unlink(missing_ok=True)
        subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30, capture_output=True)
        return (tmp_path / "calls").read_text().splitlines()

    creates = [c for c in run() if "--cluster create" in c]
    addresses = " ".join(f"10.0.0.{i}:{REDIS_PORT}" for i in range(1, NODES + 1))
    assert creates == [f"--user admin --cluster create {addresses} --cluster-replicas 1 --cluster-yes"], creates
    assert not [c for c in run() if "--cluster create" in c], "a second run must not create it again"


# -- the service replicas ------------------------------------------------------------------------


def test_three_replicas_on_the_cluster_with_distinct_advertised_urls(
    compose: dict[str, Any], nodes: dict[str, dict[str, Any]], replicas: dict[str, dict[str, Any]]
) -> None:
    assert sorted(replicas) == [f"momentum-{i}" for i in range(1, SERVICE_REPLICAS + 1)], sorted(replicas)
    advertised = set()
    for name, svc in replicas.items():
        build = svc["build"]
        assert (CLUSTER_FILE.parent / build["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        env = _environment(svc)
        assert env.get("MOMENTUM_REDIS_CLUSTER") == "true", f"{name} must use the cluster client"
        url = urlsplit(interpolate(env["MOMENTUM_REDIS_URL"] or "", {PASSWORD_VARIABLE: "0123abcd"}))
        assert (url.scheme, url.username, url.password) == ("redis", SERVICE_USER, "0123abcd"), url
        seeds = [url.netloc.rpartition("@")[2], *(env.get("MOMENTUM_REDIS_CLUSTER_NODES") or "").split(",")]
        assert sorted(seeds) == sorted(f"{n}:{REDIS_PORT}" for n in nodes), f"{name}: every node is a seed: {seeds}"
        assert env.get("MOMENTUM_REDIS_PREFIX") == "momentum"
        assert env.get("MOMENTUM_ADVERTISE_URL") == f"http://{name}:{APP_PORT}", env.get("MOMENTUM_ADVERTISE_URL")
        advertised.add(env["MOMENTUM_ADVERTISE_URL"])
        assert env.get("MOMENTUM_KEYS_FILE") == f"/run/secrets/{KEYS_SECRET}" and KEYS_SECRET in svc["secrets"]
        assert "MOMENTUM_INSECURE" not in env and "MOMENTUM_API_KEYS" not in env
        assert svc["depends_on"] == {"redis-init": {"condition": "service_completed_successfully"}}
        assert not svc.get("ports"), f"{name} is reached through haproxy only"
        assert svc.get("restart") == "unless-stopped"
        assert not (svc.get("healthcheck") or {}).get("disable")
    assert len(advertised) == SERVICE_REPLICAS
    assert (compose["secrets"][KEYS_SECRET] or {}).get("file") == "./secrets/momentum_keys.txt"


# -- HAProxy -------------------------------------------------------------------------------------


def test_haproxy_is_pinned_mounts_the_config_and_publishes_8000(compose: dict[str, Any]) -> None:
    svc = compose["services"]["haproxy"]
    name, _, tag = svc["image"].rpartition(":")
    assert name == "haproxy" and re.fullmatch(r"\d+\.\d+(\.\d+)?(-\w+)?", tag), f"pin haproxy: {svc['image']}"
    source, target, *mode = svc["volumes"][0].split(":")
    assert (CLUSTER_FILE.parent / source).resolve() == HAPROXY_CFG and target == HAPROXY_CFG_TARGET and mode == ["ro"]
    assert _published_container_ports(svc) == [("8000", APP_PORT)]
    assert set(svc["depends_on"]) == set(_services(compose, r"momentum-\d+"))


def test_haproxy_balances_over_exactly_the_compose_replicas(replicas: dict[str, dict[str, Any]]) -> None:
    lines = haproxy_lines()
    servers = [words for words in lines if words[0] == "server"]
    assert len(servers) == BACKENDS == len(replicas)
    targets = {}
    for i, words in enumerate(servers, start=1):
        assert re.fullmatch(rf"\$\{{MOMENTUM_{i}-[^}}]+\}}", words[2]), "tests/balancer.py sets MOMENTUM_<i>"
        host, _, port = haproxy_default(words[2]).rpartition(":")
        targets[words[1]] = (host, int(port))
    assert targets == {name: (name, APP_PORT) for name in replicas}, targets
    [bind] = [words for words in lines if words[0] == "bind"]
    assert haproxy_default(bind[1]) == f":{APP_PORT}" and "MOMENTUM_BIND" in bind[1]


def test_haproxy_checks_readyz_round_robin_and_never_resends_a_request() -> None:
    lines = haproxy_lines()
    statements = [" ".join(words) for words in lines]
    assert "balance roundrobin" in statements
    assert "option httpchk" in statements and "http-check send meth GET uri /readyz" in statements
    assert "http-check expect status 200" in statements
    assert re.search(r'@health\.get\("/readyz"', ROUTES.read_text(encoding="utf-8")), "GET /readyz is gone"
    [default_server] = [words for words in lines if words[0] == "default-server"]
    assert "check" in default_server
    # Retries only of connections that could not be made (nothing was sent), elsewhere.
    assert [words for words in lines if words[0] == "retry-on"] == [["retry-on", "conn-failure"]]
    assert any(words[:2] == ["option", "redispatch"] for words in lines)
    assert not any("http-buffer-request" in s or "l7-retries" in s for s in statements)
    timeouts = {words[1]: words[2] for words in lines if words[0] == "timeout"}
    for name in ("client", "server"):
        assert int(timeouts[name].rstrip("s")) >= 30, f"steps may take seconds: timeout {name} {timeouts[name]}"
    assert "connect" in timeouts and "check" in timeouts


def test_haproxy_config_is_valid() -> None:
    binary = haproxy_binary()
    if binary is None:
        pytest.skip("haproxy is not installed (scripts/install installs it)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # none of the MOMENTUM_* addresses: the defaults
    result = subprocess.run(
        [binary, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Offline, the replicas' names do not resolve: that must be a warning (resolved later), never an alert.
    assert "ALERT" not in result.stdout + result.stderr


# -- the compose's Redis command line, on 6 real redis-servers -------------------------------------


def _cluster_state(port: int, password: str) -> str:
    client = redis.Redis(port=port, username=ADMIN_USER, password=password, socket_timeout=2)
    try:
        return str(client.cluster("info").get("cluster_state"))
    finally:
        client.close()


async def the_journal_through_the_acl(url: str) -> None:
    """Every operation of the store (store/redis.py and its scripts) as the service user: Redis denies it nothing."""
    journal = RedisJournal.from_url(url, cluster=True)
    try:
        me = Replica("r1", "http://r1:8000")
        assert await journal.heartbeat(me, 5000) == [me]
        for model in ("a", "b", "c"):  # on different slots
            lease = await journal.acquire(model, me, 5000)
            assert isinstance(lease, Lease)
            await journal.create(lease, model, {"optimizer": {"rule": "pytorch", "lr": 0.1}}, "rev", "inc")
            small = Record({"kind": "step"}, (b"abcd",))
            big = Record({"kind": "step"}, (bytes(1 << 19),))  # staged and renamed in a MULTI
            keys = [KeyRecord("k1", "fp", "summary")]
            await journal.commit(lease, model, Batch("inc", 0, 1, [small], keys=keys, replicas=1))
            await journal.commit(lease, model, Batch("inc", 1, 2, [big]))
            await journal.commit(lease, model, Batch("inc", 2, 3, snapshot=Record({"s": 1}, (b"x",))))
            assert await journal.renew([lease], 5000) == [True]
            loaded = await journal.load(model)
            assert loaded is not None and loaded.head.seq == 3
            assert await journal.lookup(model, "inc", "k1") is not None
            await journal.append_points(model, "inc", [b"{}"], 10)
            assert await journal.load_points(model, "inc", 10) == [b"{}"]
            holder = await journal.holder(model)
            assert holder is not None and holder.replica == me.id
        assert await journal.model_names("", 10) == ["a", "b", "c"]
        await journal.delete(lease, "c")
        await journal.release(lease)
        assert await journal.model_names("", 10) == ["a", "b"]
    finally:
        await journal.close()


def test_cluster_acl_on_six_real_redis_servers(nodes: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    assert binary and cli, "redis-server/redis-cli not on PATH (scripts/install installs them)"
    env = {PASSWORD_VARIABLE: os.urandom(16).hex(), ADMIN_VARIABLE: os.urandom(16).hex()}
    options = [interpolate(w, env) for w in node_options(next(iter(nodes.values())))]
    ports: list[int] = []
    while len(ports) < NODES:
        port = free_port()
        if port <= 55535 and port not in ports:  # the cluster bus listens on port + 10000
            ports.append(port)
    procs = []
    try:
        for port in ports:
            directory = tempfile.mkdtemp(prefix="momentum-acl-", dir=tmp_path)
            local = ["--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""]
            local += ["--cluster-announce-hostname", "localhost", "--repl-diskless-sync-delay", "0"]
            procs.append(subprocess.Popen([binary, *options, *local], stdout=subprocess.DEVNULL))
        for port in ports:
            client = redis.Redis(port=port, username=SERVICE_USER, password=env[PASSWORD_VARIABLE])
            wait_until(client.ping, what=f"node {port}")
            client.close()
        create_options = ["--cluster-replicas", str(REPLICAS_PER_PRIMARY), "--cluster-yes"]
        subprocess.run(
            [cli, "--user", ADMIN_USER, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), *create_options],
            env={**os.environ, "REDISCLI_AUTH": env[ADMIN_VARIABLE]},
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(lambda: _cluster_state(ports[0], env[ADMIN_VARIABLE]) == "ok", timeout=30, what="cluster_state:ok")

        def linked() -> bool:
            up = 0
            for port in ports:
                client = redis.Redis(port=port, username=ADMIN_USER, password=env[ADMIN_VARIABLE])
                info = client.info("replication")
                client.close()
                up += info.get("master_link_status") == "up"
            return up == NODES - NODES // (1 + REPLICAS_PER_PRIMARY)

        wait_until(linked, timeout=30, what="every replica replicating as the admin user")

        async def as_the_service() -> None:
            url = f"redis://{SERVICE_USER}:{env[PASSWORD_VARIABLE]}@127.0.0.1:{ports[0]}"
            client = RedisCluster.from_url(url)
            try:
                await client.initialize()  # CLUSTER SLOTS, COMMAND
                slots = await client.execute_command("CLUSTER SLOTS")
                assert {node["primary"][0] for node in slots.values()} == {"localhost"}, "nodes by hostname"
                await client.set("momentum:{m}:x", b"1")
                assert await client.get("momentum:{m}:x") == b"1"
                body = "return redis.call('hset', KEYS[1], 'a', ARGV[1])"
                node = client.get_node_from_key("momentum:{m}:h")
                sha = await client.execute_command("SCRIPT LOAD", body, target_nodes=node)
                assert await client.evalsha(sha, 1, "momentum:{m}:h", "v") == 1
                async with client.pipeline(transaction=True) as pipe:
                    pipe.set("momentum:{m}:y", b"2")
                    pipe.hset("momentum:{m}:h", "b", "c")
                    assert await pipe.execute() == [True, 1]
                assert await client.execute_command("WAIT", 1, 5000, target_nodes=node) == 1
                refused = [("KEYS", "*"), ("GET", "other:{m}"), ("CLUSTER", "NODES"), ("CONFIG", "GET", "x")]
                refused += [("EVAL", "return 1", "0"), ("PSYNC", "?", "-1"), ("FLUSHALL",)]
                for command in refused:
                    with pytest.raises(redis.exceptions.ResponseError, match="permission"):
                        await client.execute_command(*command, target_nodes=node)
            finally:
                await client.aclose()
            await the_journal_through_the_acl(url)

        asyncio.run(as_the_service())
        anonymous = redis.Redis(port=ports[0], socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.get("momentum:{m}:x")
        anonymous.close()
    finally:
        for proc in procs:
            terminate(proc)
