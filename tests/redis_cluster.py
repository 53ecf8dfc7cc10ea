"""A real Redis Cluster for the tests: ``n`` redis-server processes this suite started itself
(3 primaries and 3 replicas by default), joined by ``redis-cli --cluster create``.

Nodes listen on free ports of 127.0.0.1 with a short ``cluster-node-timeout``, so that a killed
primary is replaced by its replica within a few seconds. :meth:`RedisCluster.kill_primary_of`
SIGKILLs the primary holding a key's slot; :meth:`RedisCluster.wait_ok` waits until every slot is
served again.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis
from redis.cluster import RedisCluster as SyncCluster

from .helpers import terminate, wait_until

NODE_TIMEOUT_MS = 1000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, both below the kernel's ephemeral range:
    a port the kernel may hand to an outgoing connection meanwhile could be taken by the time the node
    binds it (the README test chooses its ports minutes before it starts the cluster)."""
    high = max(10001, _ephemeral_low() - 10000)
    for _ in range(1000):
        port = random.randrange(10000, high)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


@dataclass
class Node:
    port: int
    dir: str
    proc: subprocess.Popen[bytes] | None = None
    args: list[str] = field(default_factory=list)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        try:
            wait_until(lambda: client.ping(), what=f"redis cluster node on port {self.port}")
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP: the node keeps its sockets but answers nothing (its peers fail it over after the node timeout)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class RedisCluster:
    def __init__(self, nodes: int = 6, replicas: int = 1, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server/redis-cli are not on PATH; scripts/install installs them")
        self.cli, self.replicas = cli, replicas
        self.nodes: list[Node] = []
        for _ in range(nodes):
            port = cluster_port()
            directory = tempfile.mkdtemp(prefix="momentum-cluster-")
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory, "--save", ""]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-replica-validity-factor", "0"]
            args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
            self.nodes.append(Node(port, directory, args=args))

    @property
    def url(self) -> str:
        """A seed node's URL (what ``MOMENTUM_REDIS_URL`` names, with ``MOMENTUM_REDIS_CLUSTER=true``)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def seeds(self) -> str:
        """Every node as ``host:port,...`` (``MOMENTUM_REDIS_CLUSTER_NODES``)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def env(self) -> dict[str, str]:
        return {
            "MOMENTUM_REDIS_URL": self.url,
            "MOMENTUM_REDIS_CLUSTER": "true",
            "MOMENTUM_REDIS_CLUSTER_NODES": self.seeds,
        }

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        self.wait_ok()
        return self

    def client(self) -> SyncCluster:
        live = next(n for n in self.nodes if n.proc is not None)
        return SyncCluster(host="127.0.0.1", port=live.port, socket_timeout=2)

    def _info(self, node: Node) -> dict[str, str]:
        client = node.client()
        try:
            text = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        text = text.decode() if isinstance(text, bytes) else str(text)
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def _linked(self, node: Node) -> bool:
        """A primary, or a replica whose link to its primary is up (its first sync done)."""
        client = node.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def ok(self) -> bool:
        """Every live node sees every slot served (cluster_state:ok), and every replica is in sync with its primary."""
        live = [n for n in self.nodes if n.proc is not None]
        return all(self._info(n).get("cluster_state") == "ok" and self._linked(n) for n in live)

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Seconds until the cluster serves every slot again."""
        start = time.monotonic()
        wait_until(self.ok, timeout=timeout, what="the redis cluster to serve every slot")
        return time.monotonic() - start

    def primaries(self) -> list[Node]:
        """The live nodes that are primaries (by their own ``ROLE``)."""
        out = []
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.client()
            try:
                role = client.execute_command("ROLE")[0]
            except redis.RedisError:
                continue
            finally:
                client.close()
            if (role.decode() if isinstance(role, bytes) else role) == "master":
                out.append(node)
        return out

    def node_of(self, key: str) -> Node:
        """The live primary serving ``key``'s slot."""
        client = self.client()
        try:
            slot = client.keyslot(key)
            node = client.get_node_from_key(key)
        finally:
            client.close()
        found = next((n for n in self.nodes if n.port == node.port), None)
        assert found is not None, f"no node of this cluster serves slot {slot}"
        return found

    def replica_of(self, primary: Node) -> Node:
        """A live replica of ``primary`` (by its ``INFO replication``)."""
        client = primary.client()
        try:
            info = client.info("replication")
        finally:
            client.close()
        ports = {int(v["port"]) for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)}
        found = [n for n in self.nodes if n.port in ports and n.proc is not None]
        assert found, f"primary on port {primary.port} has no live replica ({info})"
        return found[0]

    def node_id(self, node: Node) -> str:
        client = node.client()
        try:
            return str(client.execute_command("CLUSTER", "MYID").decode())
        finally:
            client.close()

    def migrate_slot(self, key: str, to: Node, batch: int = 2, pause: float = 0.05) -> int:
        """Move ``key``'s slot to the primary ``to`` as ``redis-cli --cluster reshard`` does (IMPORTING and
        MIGRATING, ``MIGRATE`` of ``batch`` keys at a time with ``pause`` seconds between, then the slot
        given to ``to`` on every node), while clients go on: they meet ASK and TRYAGAIN meanwhile, and MOVED
        after. Returns the number of keys moved."""
        source = self.node_of(key)
        assert source.port != to.port, "the slot is on that node already"
        src_id, dst_id = self.node_id(source), self.node_id(to)
        src, dst = source.client(), to.client()
        moved = 0
        try:
            slot = int(src.execute_command("CLUSTER", "KEYSLOT", key))
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
            for node in self.nodes:
                if node.proc is None:
                    continue
                c = node.client()
                try:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                except redis.ResponseError:
                    pass  # a replica: it learns the owner from its primary
                finally:
                    c.close()
        finally:
            src.close()
            dst.close()
        return moved

    def kill_primary_of(self, key: str) -> Node:
        node = self.node_of(key)
        node.kill()
        return node

    def restart(self, node: Node) -> None:
        """Start a killed node again (it rejoins as a replica of whoever took its slots)."""
        node.start()

    def stop(self) -> None:
        for node in self.nodes:
            terminate(node.proc)
            node.proc = None
