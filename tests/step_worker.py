"""Training workers for the exactly-once tests: THREADS threads, each pushing N distinct gradients.

Usage: python -m tests.step_worker URL[,URL...] MODEL FIRST_WORKER THREADS N SIZE [SECONDS TIMEOUT]

Worker ``w``'s push ``j`` carries the gradient :func:`gradient` ``(w, j, SIZE)`` and an
``Idempotency-Key``; the worker alternates between the server URLs and retries a push on
transient failures (no answer, 503, 409 idempotency-in-flight) with the same key and bytes,
as the SDK does, on the next URL. With N = 0 a worker pushes for SECONDS instead; TIMEOUT is the
client's timeout (default 30 s). Prints ``[[step, w, j], ...]`` as JSON: the step each push got.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import numpy.random  # eagerly: numpy's lazy submodule import is not safe from many threads at once


def gradient(worker: int, j: int, size: int) -> np.ndarray:
    return (np.random.default_rng([worker, j]).standard_normal(size) * 0.1).astype(np.float32)


def push(client: httpx.Client, url: str | list[str], body: bytes, key: str, deadline: float = 60.0) -> httpx.Response:
    """POST until an answer that is not transient, with the same key and bytes every time (to the
    next of several URLs after each failure)."""
    end = time.monotonic() + deadline
    headers = {"Idempotency-Key": key, "content-type": "application/json"}
    urls, attempt = ([url] if isinstance(url, str) else url), 0
    while True:
        target, attempt = urls[attempt % len(urls)], attempt + 1
        try:
            r = client.post(target, content=body, headers=headers)
            transient = r.status_code == 503 or (
                r.status_code == 409 and r.json().get("type", "").endswith("idempotency-in-flight")
            )
            if not transient:
                return r
        except httpx.TransportError:
            pass
        if time.monotonic() > end:
            raise TimeoutError(f"no final answer for key {key} within {deadline} s")
        time.sleep(0.02)


def run(
    urls: list[str], model: str, worker: int, n: int, size: int, out: list[list[int]], until: float, timeout: float
) -> None:
    with httpx.Client(timeout=timeout) as client:
        j = 0
        while j < n if n else time.monotonic() < until:
            g = gradient(worker, j, size)
            body = {
                "gradients": {"w": {"shape": [size], "dtype": "float32", "data": g.tolist()}},
                "return_params": False,
            }
            first = (worker + j) % len(urls)
            targets = [f"{u}/v1/models/{model}/step" for u in urls[first:] + urls[:first]]
            r = push(client, targets, json.dumps(body).encode(), uuid.uuid4().hex)
            r.raise_for_status()
            out.append([r.json()["params"]["w"]["step"], worker, j])
            j += 1


def main() -> None:
    urls, model = sys.argv[1].split(","), sys.argv[2]
    first, threads, n, size = (int(a) for a in sys.argv[3:7])
    until = time.monotonic() + (float(sys.argv[7]) if len(sys.argv) > 7 else 0.0)
    timeout = float(sys.argv[8]) if len(sys.argv) > 8 else 30.0
    out: list[list[int]] = []
    workers = [
        threading.Thread(target=run, args=(urls, model, first + t, n, size, out, until, timeout))
        for t in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
