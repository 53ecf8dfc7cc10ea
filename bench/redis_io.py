"""What moving one mlp step's state (8 MB: value and velocity of 1M float32) costs Redis itself.

Usage: .venv/bin/python -m bench.redis_io
Starts its own redis-server (no AOF, then AOF with appendfsync everysec) and times SET and GET
of 8 MB with redis-py, reporting wall time and Redis's own CPU time (INFO cpu) per command.
"""

from __future__ import annotations

import time

import numpy as np
import redis

from tests.helpers import RedisProcess

PAYLOAD = memoryview(np.zeros(2 << 20, np.float32)).cast("B")  # 8 MB


def measure(appendonly: bool, n: int = 30) -> None:
    proc = RedisProcess(appendonly=appendonly).start()
    try:
        r = redis.Redis.from_url(proc.url)
        if appendonly:
            r.config_set("appendfsync", "everysec")

        def cpu() -> float:
            info = r.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

        for label, op in (("SET 8 MB", lambda k: r.set(f"b{k % 2}", PAYLOAD)), ("GET 8 MB", lambda k: r.get("b0"))):
            op(0)
            c0, t0 = cpu(), time.perf_counter()
            for k in range(1, n + 1):
                op(k)
            wall, used = (time.perf_counter() - t0) / n, (cpu() - c0) / n
            aof = "AOF everysec" if appendonly else "no AOF"
            print(f"{aof:12} {label}: {wall * 1e3:6.2f} ms wall, {used * 1e3:6.2f} ms of Redis CPU")
    finally:
        proc.stop()


if __name__ == "__main__":
    measure(False)
    measure(True)
