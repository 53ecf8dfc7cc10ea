"""Test helpers: real redis-server and server processes on free loopback ports."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import momentum_client as mc
import redis

ROOT = Path(__file__).resolve().parent.parent


class Api:
    """Calls a method on either client and awaits it if needed, so one test covers both."""

    def __init__(self, client: mc.Client | mc.AsyncClient) -> None:
        self.client = client

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 10 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class RedisProcess:
    """A redis-server this test suite started itself (never one it did not start)."""

    def __init__(self, *, appendonly: bool = False, directory: str | None = None, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH; .ci/run installs it (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = directory or tempfile.mkdtemp(prefix="momentum-redis-")
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_until(lambda: client.ping(), what=f"redis on port {self.port}")
        client.close()
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def kill(self) -> None:
        """SIGKILL: no chance to write anything more to disk."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


class ServerProcess:
    """``momentum-service serve`` in a subprocess."""

    def __init__(
        self, *, redis_url: str | None = None, env: dict[str, str] | None = None, unsafe: str | None = None
    ) -> None:
        """``unsafe``: run ``tests.unsafe_server`` with that safety switched off (negative controls only)."""
        self.port = free_port()
        self.redis_url = redis_url
        self.unsafe = unsafe
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="momentum-server-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        module = ["tests.unsafe_server", self.unsafe] if self.unsafe else ["momentum_service"]
        args = [sys.executable, "-m", *module, "serve", "--port", str(self.port)]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        wait_until(lambda: httpx.get(self.url + "/healthz", timeout=1).status_code == 200, what="server")
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets (connections are accepted by the kernel) but runs nothing."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
