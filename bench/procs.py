"""The processes the bench starts itself: a redis-server and momentum-service servers on free loopback ports.

The bench never talks to a Redis or a server it did not start, and stops what it started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.helpers import terminate

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], what: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}")
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used so far, from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15 of stat(5))


class RedisServer:
    """redis-server on a free port with AOF on (``appendfsync`` everysec or always), RDB snapshots off."""

    def __init__(self, appendfsync: str = "everysec") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        if appendfsync not in ("everysec", "always", "no"):
            raise ValueError(f"appendfsync must be everysec, always or no, got {appendfsync!r}")
        self.binary = binary
        self.appendfsync = appendfsync
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="momentum-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            wait_until(client.ping, f"redis-server on port {self.port}", proc=self.proc)
        finally:
            client.close()
        return self

    def info(self) -> dict[str, object]:
        """The configuration that matters for the results, as Redis reports it."""
        client = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)
        try:
            server = client.info("server")
            config: dict[str, Any] = {}
            for key in ("appendonly", "appendfsync", "save", "maxmemory", "auto-aof-rewrite-percentage"):
                config.update({str(k): v for k, v in client.config_get(key).items()})
            return {
                "version": server.get("redis_version"),
                "port": self.port,
                "config": config,
                "aof_dir": self.dir,
            }
        finally:
            client.close()

    def persistence(self) -> dict[str, object]:
        client = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)
        try:
            info = client.info("persistence")
            keys = ("aof_enabled", "aof_rewrites", "aof_current_size", "aof_last_write_status")
            return {k: info.get(k) for k in keys}
        finally:
            client.close()

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class ServiceServer:
    """``python -m momentum_service serve`` in a subprocess, on the embedded store or on ``redis_url``."""

    def __init__(self, *, redis_url: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.redis_url = redis_url
        self.env_overrides = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="momentum-bench-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def command(self) -> list[str]:
        args = [sys.executable, "-m", "momentum_service", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        return args

    def start(self) -> ServiceServer:
        return self.launch().wait_ready()

    def launch(self) -> ServiceServer:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        env = {**os.environ, **self.env_overrides}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def wait_ready(self) -> ServiceServer:
        try:
            wait_until(
                lambda: httpx.get(self.url + "/readyz", timeout=2).status_code == 200,
                f"momentum-service on port {self.port}",
                proc=self.proc,
            )
        except Exception as exc:
            raise RuntimeError(f"{exc}; its log:\n{self.log_tail()}") from exc
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        self.log_path.unlink(missing_ok=True)
