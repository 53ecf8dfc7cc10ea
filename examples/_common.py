"""What the momentum experiments share: a local server process, the common options, small helpers.

Both scripts talk to a momentum-service server. Without ``--url`` they start their own
(``python -m momentum_service serve`` with the embedded in-memory store, on a free loopback
port) and stop it when they are done.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("build") / "examples"
"""Where the scripts write by default, relative to the working directory: never over a tracked file
(``build/`` is git-ignored). The pictures in ``docs/img`` are made with ``--out-dir docs/img``."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``python -m momentum_service serve`` on a free loopback port, for the duration of a ``with`` block."""

    def __init__(self, *, startup_timeout: float = 30.0) -> None:
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="momentum-example-server-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        args = [sys.executable, "-m", "momentum_service", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--log-level", "warning"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not answer on {self.url} within {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within 10 s."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def service(url: str | None) -> Iterator[str]:
    """Yield ``url``, or, when it is ``None``, the URL of a server started for the block and stopped after it."""
    if url is not None:
        yield url.rstrip("/")
        return
    print("starting a local momentum-service (embedded store) ...", file=sys.stderr)
    with LocalServer() as server:
        print(f"server up on {server.url}", file=sys.stderr)
        yield server.url


def parser(description: str, *, default_prefix: str) -> argparse.ArgumentParser:
    """An argument parser with the options both experiments have."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", help="a running server to use; default: start one on a free port (embedded store)")
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds (for tests, smoke runs)")
    p.add_argument(
        "--prefix",
        default=default_prefix,
        help=f"prefix of the model names created on the server (default {default_prefix})",
    )
    p.add_argument(
        "--keep-models",
        action="store_true",
        help="leave the models on the server (by default they are deleted at the end)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where to write the outputs (default {DEFAULT_OUT}/ in the working directory; the README's "
        "pictures come from --out-dir docs/img)",
    )
    return p


def out_dir(args: argparse.Namespace) -> Path:
    """The output directory the options ask for, created if missing."""
    path: Path = args.out_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


def steps_to_threshold(losses: Sequence[float], threshold: float) -> int | None:
    """The first step index whose loss is at or below ``threshold`` (``None`` if never)."""
    for i, loss in enumerate(losses):
        if loss <= threshold:
            return i
    return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
