"""Aggregate steps/s of 12 models and 12 workers with 1, 2 and 3 service replicas on a 6-node Redis
Cluster (3 primaries, 3 replicas), and the CPU each process used.

Run: .venv/bin/python -m bench.scaleout [--replicas 1,2,3] [--seconds 6] [--size 4096] [--workers 12]

Starts the cluster and the replicas itself on free loopback ports (tests/redis_cluster.py, the same
servers the tests run). Model ``mK`` has one float32 parameter of ``--size`` floats; worker ``K``
pushes to ``mK`` with the Python SDK (safetensors, an Idempotency-Key per push, values not
returned) and ``follow_owner=True``: its first request goes to replica ``K % replicas``, which
forwards it to the model's owner and names it, and the next ones go to the owner directly. The
workers run in 3 processes of 4 threads. Each configuration is measured after a warm-up of 1.5 s,
for ``--seconds``; then, with the most replicas, once with workers that keep sending to any replica
(every request forwarded but a third), and once with every model's durability ``{"replicas": 1}``
(WAIT). It prints a Markdown table: steps/s, the ratio to one replica, the CPU of each replica, of
all Redis nodes and of the workers (in cores: CPU seconds per second), and the models per replica.

On this 2-core machine the replicas, six Redis nodes and the workers share two cores: the ratio
levels off once they are busy (the CPU columns show where the time goes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import httpx
import momentum_client as mc
import numpy as np

from tests.helpers import ServerProcess
from tests.redis_cluster import RedisCluster

from .procs import ROOT, cpu_seconds

THREADS_PER_PROCESS = 4


def worker_main(urls: list[str], models: list[str], first: int, seconds: float, size: int, follow: bool) -> None:
    """One worker process: a thread per model, pushing for ``seconds``; prints how many steps each made."""
    counts = [0] * len(models)
    start = time.monotonic() + 1.5  # after the warm-up
    end = start + seconds

    def run(i: int) -> None:
        url = urls[(first + i) % len(urls)]
        grads = {"w": np.full(size, 0.001, dtype=np.float32)}
        with mc.Client(url, timeout=30, follow_owner=follow) as client:
            while True:
                client.push_gradients(models[i], grads)
                now = time.monotonic()
                if now >= end:
                    return
                if now >= start:
                    counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts))


def owners(cluster: RedisCluster, models: list[str]) -> dict[str, str | None]:
    client = cluster.client()
    try:
        raw = {m: client.hget(f"momentum:{{{m}}}:lease", "url") for m in models}
    finally:
        client.close()
    return {m: u if u is None or isinstance(u, str) else u.decode() for m, u in raw.items()}


def settle(
    cluster: RedisCluster, models: list[str], stable_s: float = 3.0, timeout: float = 60.0
) -> dict[str, str | None]:
    """Wait until no model has changed owner for ``stable_s`` (the replicas found each other and the
    models moved to the replicas rendezvous hashing gives them)."""
    last, since, end = owners(cluster, models), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.5)
        now = owners(cluster, models)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= stable_s:
            return now
    raise TimeoutError("the models kept changing owners")


def measure(
    cluster: RedisCluster, replicas: int, args: argparse.Namespace, durability: object, follow: bool = True
) -> dict[str, object]:
    servers = [ServerProcess(env={**cluster.env(), "MOMENTUM_LEASE_MS": "1000"}).start() for _ in range(replicas)]
    try:
        urls = [s.url for s in servers]
        models = [f"m{i}" for i in range(args.workers)]
        with httpx.Client(timeout=30) as client:
            for m in models:
                client.delete(f"{urls[0]}/v1/models/{m}")
                r = client.put(
                    f"{urls[0]}/v1/models/{m}",
                    json={"optimizer": {"rule": "pytorch", "lr": 0.01, "momentum": 0.9}, "durability": durability},
                )
                r.raise_for_status()
                w = {"shape": [args.size], "dtype": "float32", "data": [0.0] * args.size}
                client.put(f"{urls[0]}/v1/models/{m}/params/w", json=w).raise_for_status()
            for m in models:  # each model's first request from each replica: the owners are taken
                for u in urls:
                    client.get(f"{u}/v1/models/{m}").raise_for_status()
        placed = settle(cluster, models)
        procs = []
        for first in range(0, args.workers, THREADS_PER_PROCESS):
            chunk = models[first : first + THREADS_PER_PROCESS]
            cmd = [sys.executable, "-m", "bench.scaleout", "--worker", ",".join(urls), ",".join(chunk)]
            cmd += [str(first), str(args.seconds), str(args.size), "1" if follow else "0"]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE))
        time.sleep(1.5)
        pids = {
            "replicas": [s.proc.pid for s in servers if s.proc],
            "redis": [n.proc.pid for n in cluster.nodes if n.proc],
            "workers": [p.pid for p in procs],
        }
        before = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        after = {k: [cpu_seconds(p) for p in v] for k, v in pids.items()}
        elapsed = time.monotonic() - t0
        counts = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, "a worker failed"
            counts += json.loads(out)
        cores = {k: [(a - b) / elapsed for a, b in zip(after[k], before[k], strict=True)] for k in pids}
        return {
            "replicas": replicas,
            "durability": durability,
            "follow_owner": follow,
            "steps_per_s": sum(counts) / args.seconds,
            "cpu_per_replica": [round(c, 2) for c in cores["replicas"]],
            "cpu_redis": round(sum(cores["redis"]), 2),
            "cpu_workers": round(sum(cores["workers"]), 2),
            "models_per_replica": [sum(1 for u in placed.values() if u == s.url) for s in servers],
        }
    finally:
        for s in servers:
            s.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        urls, models, first, seconds, size, follow = sys.argv[2:8]
        worker_main(urls.split(","), models.split(","), int(first), float(seconds), int(size), follow == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    counts = [int(n) for n in args.replicas.split(",")]
    cluster = RedisCluster().start()
    rows = []
    try:
        for n in counts:
            rows.append(measure(cluster, n, args, "step"))
        if max(counts) > 1:
            rows.append(measure(cluster, max(counts), args, "step", follow=False))
        rows.append(measure(cluster, max(counts), args, {"replicas": 1}))
    finally:
        cluster.stop()
    base = rows[0]["steps_per_s"]
    print(f"{args.workers} models, {args.workers} workers, {args.size} float32 per step, {args.seconds:.0f} s each\n")
    print(
        "| replicas | durability | workers send to | steps/s | vs 1 replica | CPU per replica (cores) "
        "| Redis (6 nodes) | workers | models per replica |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["steps_per_s"] / base  # type: ignore[operator]
        durability = json.dumps(r["durability"])
        print(
            f"| {r['replicas']} | `{durability}` | {'the owner' if r['follow_owner'] else 'any replica'} | "
            f"{r['steps_per_s']:.0f} | {ratio:.2f}x | "
            f"{', '.join(f'{c:.2f}' for c in r['cpu_per_replica'])} | {r['cpu_redis']:.2f} | {r['cpu_workers']:.2f} | "  # type: ignore[attr-defined]
            f"{', '.join(map(str, r['models_per_replica']))} |"  # type: ignore[call-overload]
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
