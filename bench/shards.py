"""What a step costs against the number of parameter shards of one model, over 3 replicas on one Redis.

Run: .venv/bin/python -m bench.shards [--shards 1,2,4,8] [--params 8] [--size 1000000] [--steps 20] [--hashed]

Starts a redis-server (AOF on, ``appendfsync everysec``) and 3 momentum-service replicas on free
loopback ports, then for each shard count creates a model of ``--params`` float32 parameters of
``--size`` floats each (``"shards": n``; their names chosen so that each shard holds as many, unless
``--hashed``), and times ``--steps`` steps (after 3 warm-up steps) sent
by the SDK (safetensors) to the model's owner (shard 0, which fans the step out to the other
shards' owners and merges their answers): the mean and median ms per step, with the updated
values returned (``return_params``) and without. It prints a Markdown table and where the shards
landed (which replica owns each, and how many parameters each holds).

On one host, the replicas share its cores: more shards spread the update over more processes but
add a hop (and, with values returned, a copy of the shard's values) per remote shard.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx
import momentum_client as mc
import numpy as np
import redis as redis_lib
from momentum_service.engine.shards import shard_name, shard_of, split

from .procs import RedisServer, ServiceServer, wait_until


def _owner(port: int, model: str) -> str:
    client = redis_lib.Redis(port=port)
    try:
        url = client.hget(f"momentum:{{{model}}}:lease", "url")
    finally:
        client.close()
    return "" if url is None else url.decode()


def balanced(count: int, shards: int) -> list[str]:
    """``count`` parameter names spread as evenly as they can be over ``shards`` shards (names hash to their
    shard: a handful of arbitrary names rarely split evenly, which would measure the placement, not the spread)."""
    quota = [count // shards + (1 if i < count % shards else 0) for i in range(shards)]
    names: list[str] = []
    j = 0
    while len(names) < count:
        name = f"layer{j}.weight"
        i = shard_of(name, shards)
        if quota[i]:
            quota[i] -= 1
            names.append(name)
        j += 1
    return names


def _timed(client: mc.Client, model: str, grads: dict[str, np.ndarray], steps: int, values: bool) -> list[float]:
    for _ in range(3):
        client.step_results(model, grads, return_params=values)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        client.step_results(model, grads, return_params=values)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="1,2,4,8")
    parser.add_argument("--params", type=int, default=8)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--hashed", action="store_true", help="names layer0..: as they hash (else balanced)")
    args = parser.parse_args()
    counts = [int(c) for c in args.shards.split(",")]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(args.size).astype(np.float32) for _ in range(args.params)]
    steps = [rng.standard_normal(args.size).astype(np.float32) * np.float32(1e-3) for _ in range(args.params)]

    redis = RedisServer("everysec").start()
    servers = [ServiceServer(redis_url=redis.url).launch() for _ in range(args.replicas)]
    rows: list[dict[str, Any]] = []
    try:
        for s in servers:
            s.wait_ready()
        probe = redis_lib.Redis(port=redis.port)
        wait_until(lambda: probe.zcard("momentum:{replicas}:live") == args.replicas, "every replica live")
        probe.close()
        time.sleep(1.0)  # every replica has seen the others (heartbeats)
        urls = {s.url: f"r{i}" for i, s in enumerate(servers)}
        for n in counts:
            model = f"bench-shards-{n}"
            names = [f"layer{i}.weight" for i in range(args.params)] if args.hashed else balanced(args.params, n)
            values, grads = dict(zip(names, arrays, strict=True)), dict(zip(names, steps, strict=True))
            config: dict[str, Any] = {"optimizer": {"lr": 0.01, "momentum": 0.9}}
            if n > 1:
                config["shards"] = n
            r = httpx.put(f"{servers[0].url}/v1/models/{model}", json=config, timeout=60)
            assert r.status_code == 201, r.text
            owner = _owner(redis.port, model)
            with mc.Client(owner, timeout=120) as client:
                client.init_params(model, values)
                placement = [urls.get(_owner(redis.port, shard_name(model, i)), "?") for i in range(n)]
                per_shard = [len(split(names, n).get(i, [])) for i in range(n)]
                with_values = _timed(client, model, grads, args.steps, True)
                without = _timed(client, model, grads, args.steps, False)
            rows.append(
                {
                    "shards": n,
                    "placement": ",".join(placement),
                    "params per shard": ",".join(map(str, per_shard)),
                    "mean ms": statistics.fmean(with_values),
                    "median ms": statistics.median(with_values),
                    "mean ms, no values back": statistics.fmean(without),
                    "median ms, no values back": statistics.median(without),
                }
            )
            httpx.delete(f"{owner}/v1/models/{model}", timeout=60)
    finally:
        for s in servers:
            s.stop()
        redis.stop()
    floats = args.params * args.size
    print(
        f"\n{args.params} x {args.size:,} float32 parameters ({floats * 4 / 1e6:.0f} MB of gradients per step), "
        f"{args.replicas} replicas on one Redis, {args.steps} timed steps each\n"
    )
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
