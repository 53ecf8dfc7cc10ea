"""The processes the bench starts itself: a redis-server and momentum-service servers on free loopback ports.

The bench never talks to a Redis or a server it did not start, and stops what it started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


COUNTERS = ("total_net_input_bytes", "total_net_output_bytes", "aof_enabled", "aof_buffer_length")
INCR_AOF = re.compile(r"\.(\d+)\.incr\.aof$")


class AofMeter:
    """Bytes Redis appends to its AOF files over an interval, whatever rewrites happen in it.

    Redis 7 appends to an incremental file (``appendonlydir/<name>.<n>.incr.aof``); a rewrite starts
    the next one and, when it completes, deletes those before and resets ``aof_current_size`` (INFO) to
    the new files' size. On mlp and wide a rewrite completes every step or two, so INFO cannot say what
    was appended. This meter holds each incremental file open from the moment it sees it (it looks every
    ``poll`` seconds, in a thread), so it can still read a file's final size after Redis deleted it.
    """

    def __init__(self, aof_dir: Path, poll: float = 0.01) -> None:
        self.aof_dir = aof_dir
        self.poll = poll
        self.files: dict[int, tuple[int, int]] = {}
        """Incremental file number: (its descriptor, its size when the interval began: 0 if created in it)."""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="bench-aof-meter", daemon=True)

    def start(self) -> AofMeter:
        self._scan(created_since=False)
        self.thread.start()
        return self

    def stop(self) -> int | None:
        """The bytes appended since :meth:`start`; None if an incremental file came and went unseen."""
        self.done.set()
        self.thread.join()
        self._scan(created_since=True)
        try:
            numbers = sorted(self.files)
            if not numbers or numbers != list(range(numbers[0], numbers[-1] + 1)):
                return None
            return sum(os.fstat(fd).st_size - size0 for fd, size0 in self.files.values())
        finally:
            for fd, _ in self.files.values():
                os.close(fd)

    def _watch(self) -> None:
        while not self.done.wait(self.poll):
            self._scan(created_since=True)

    def _scan(self, created_since: bool) -> None:
        for entry in os.scandir(self.aof_dir):
            m = INCR_AOF.search(entry.name)
            if m is None or int(m[1]) in self.files:
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:  # deleted meanwhile: a gap in the numbers, which stop() reports
                continue
            self.files[int(m[1])] = (fd, 0 if created_since else os.fstat(fd).st_size)


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
        self.client: redis.Redis | None = None

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

    def counters(self) -> dict[str, int]:
        """Redis's counters, read before and after a timed run: bytes received and sent (INFO stats), and
        whether AOF is on and what it holds appended but not yet written (INFO persistence). One INFO command
        on a connection kept open, so two reads add ~40 bytes in and ~3 kB out to what they measure."""
        if self.client is None:
            self.client = redis.Redis(port=self.port, socket_timeout=5)
        info = self.client.info("stats", "persistence")
        return {k: int(info.get(k, 0)) for k in COUNTERS}

    def aof_meter(self) -> AofMeter:
        return AofMeter(Path(self.dir) / "appendonlydir")  # Redis 7's default appenddirname

    def persistence(self) -> dict[str, object]:
        client = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)
        try:
            info = client.info("persistence")
            keys = ("aof_enabled", "aof_rewrites", "aof_current_size", "aof_last_write_status")
            return {k: info.get(k) for k in keys}
        finally:
            client.close()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
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
