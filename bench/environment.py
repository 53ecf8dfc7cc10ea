"""What the results were measured on: the machine, the versions, the source tree."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from .procs import ROOT

PACKAGES = (
    "torch",
    "numpy",
    "httpx",
    "uvicorn",
    "uvloop",
    "httptools",
    "fastapi",
    "starlette",
    "pydantic",
    "orjson",
    "safetensors",
    "redis",
    "hiredis",
    "momentum-service",
    "py-spy",
)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 1024**2, 1)
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import momentum_client

        out["momentum_client.__version__"] = momentum_client.__version__
    except (ImportError, AttributeError):
        out["momentum_client.__version__"] = None
    binary = shutil.which("redis-server")
    if binary:
        text = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
        out["redis-server"] = text.strip()
    return out


def git() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    status = run("status", "--porcelain")
    return {
        "commit": run("rev-parse", "HEAD") or None,
        "dirty_files": len(status.splitlines()) if status else 0,
    }


def system_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (every core), from /proc/stat."""
    from .procs import TICK

    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK
