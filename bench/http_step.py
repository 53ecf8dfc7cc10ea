"""Steps per second through the real HTTP stack (uvicorn subprocess), JSON wire format.

Run: .venv/bin/python bench/http_step.py [--seconds 5]
One worker (the SDK's sync Client) pushes one gradient per parameter and receives the
updated parameters, against the embedded store and against Redis (a redis-server this
script starts on a free port, appendonly off), for a 1,000-float and a 1M-float
parameter. Prints steps/s and p50/p99 latency per case; systems interleaved per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from momentum_client import Client

from tests.helpers import RedisProcess, ServerProcess


def run(url: str, size: int, seconds: float) -> list[float]:
    with Client(url, timeout=60) as c:
        c.create_model("bench", lr=0.01, momentum=0.9)
        c.init_params("bench", {"w": np.zeros(size, np.float32)})
        g = {"w": np.full(size, 0.001, np.float32)}
        c.step("bench", g)
        lat = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            c.step("bench", g)
            lat.append(time.perf_counter() - t)
        c.delete_model("bench")
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    redis = RedisProcess().start()
    servers = {"embedded": ServerProcess().start(), "redis": ServerProcess(redis_url=redis.url).start()}
    try:
        results: dict[tuple[str, int], list[list[float]]] = {}
        for _ in range(args.rounds):
            for size in (1_000, 1_000_000):
                for name, server in servers.items():
                    results.setdefault((name, size), []).append(run(server.url, size, args.seconds))
        print(
            f"{'store':9} {'floats':>9} {'steps/s':>8} {'p50 ms':>8} {'p99 ms':>8}   (median over {args.rounds} rounds)"
        )
        for (name, size), rounds in results.items():
            rate = statistics.median(len(r) / sum(r) for r in rounds)
            lat = sorted(x for r in rounds for x in r)
            p50, p99 = lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3
            print(f"{name:9} {size:9,} {rate:8.1f} {p50:8.2f} {p99:8.2f}")
    finally:
        for s in servers.values():
            s.stop()
        redis.stop()


if __name__ == "__main__":
    main()
