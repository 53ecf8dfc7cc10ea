"""A training worker for the concurrency tests: pushes the same gradient N times.

Usage: python -m tests.push_worker URL[,URL...] MODEL PARAM N SIZE GRAD
Alternates between the given server URLs and prints the steps it was given, as JSON.
A 503 means nothing was applied (the server says so), so it is retried; anything else
unexpected fails the worker.
"""

from __future__ import annotations

import json
import sys
import time

import httpx


def main() -> None:
    urls, model, name, n, size, grad = sys.argv[1].split(","), sys.argv[2], sys.argv[3], *sys.argv[4:7]
    body = {"gradients": {name: {"shape": [int(size)], "dtype": "float32", "data": [float(grad)] * int(size)}}}
    body["return_params"] = False  # type: ignore[assignment]
    steps = []
    with httpx.Client(timeout=60) as client:
        for i in range(int(n)):
            url = f"{urls[i % len(urls)]}/v1/models/{model}/step"
            while True:
                r = client.post(url, json=body)
                if r.status_code == 503:
                    time.sleep(0.01)
                    continue
                r.raise_for_status()
                steps.append(r.json()["params"][name]["step"])
                break
    print(json.dumps(steps))


if __name__ == "__main__":
    main()
