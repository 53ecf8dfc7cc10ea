"""The README runs as printed: every code block, in order, on a fresh copy of the repository.

``test_readme_runs_as_printed`` copies the tracked files to a temporary directory (a fresh
checkout), then runs the code blocks of README.md and of examples/README.md in order, as a new
user would in one terminal: the quick start's own ``python3 -m venv .venv && pip install ...``
first (a new virtualenv, installed from the package index), its server left running, then every
curl and Python block against it, comparing what each prints with the ``output`` block shown
after it. The only change is to ports, so that the test never touches a server it did not start:
8000 to 8004, Redis's 6379 and the Redis Cluster's 7001 to 7006 become free ports in the text,
and the terminal's environment has ``MOMENTUM_PORT`` set to the one that stands for 8000 (the
quick start serves on the default port). See ``readme_blocks.py`` for the conventions, and
``REASONS`` for the few blocks not run.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import ROOT
from .readme_blocks import REASONS, Block, blocks, output_matches
from .redis_cluster import cluster_port

DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md"]
PORTS = ("8000", "8001", "8002", "8003", "8004", "6379", "7001", "7002", "7003", "7004", "7005", "7006")


def test_every_block_is_run_or_skipped_for_a_known_reason() -> None:
    for path in DOCS:
        for block in blocks(path):
            if block.mode == "skip":
                assert block.reason in REASONS, f"{block.where}: unknown reason {block.reason!r}"
            if block.mode == "prose":
                assert block.lang in ("", "text"), f"{block.where}: a {block.lang!r} block must be runnable"
    skipped = [b for p in DOCS for b in blocks(p) if b.mode == "skip"]
    assert len(skipped) <= 4, [b.where for b in skipped]  # the exceptions stay exceptions


def test_output_matching() -> None:
    assert output_matches('{"a": 1, ...}', '{"a": 1, "b": 2}')
    assert output_matches("x ...\ny", "x 123 456\ny")
    assert not output_matches('{"a": 1, ...}', '{"a": 2, "b": 2}')
    assert not output_matches("1.5", "1.50")


class Session:
    """One shell, as in a terminal; servers started from blocks run beside it until the end."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.shell = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.servers: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.count = 0

    def _read(self) -> None:
        assert self.shell.stdout is not None
        for line in self.shell.stdout:
            self.lines.put(line)

    def run(self, block: Block, body: str, timeout: float) -> tuple[int, str, str]:
        """Run a block in the shell: (status of its first failing command or 0, stdout, stderr)."""
        self.count += 1
        n = self.count
        script = self.cwd / f".readme-block-{n}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(body)
        err = self.cwd / f".readme-block-{n}.err"
        marker = f"__README_BLOCK_{n}_DONE__"
        command = f".venv/bin/python {script.name}" if block.lang == "python" else f"source {script.name}"
        assert self.shell.stdin is not None
        self.shell.stdin.write(
            f"__failed=0; trap '__failed=$?' ERR; {command} 2>{err.name}; trap - ERR; echo; echo {marker} $__failed\n"
        )
        self.shell.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(
                    f"{block.where} did not finish within {timeout} s; output so far:\n{''.join(out)}"
                ) from None
            if line.startswith(marker):
                status = int(line.split()[-1])
                text = "".join(out)
                return status, text[:-1] if text.endswith("\n") else text, err.read_text()
            out.append(line)

    def start_server(self, block: Block, body: str, timeout: float, default_port: int) -> None:
        self.count += 1
        log = self.cwd / f".readme-server-{self.count}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                ["bash", "-c", body],
                cwd=self.cwd,
                env=self.env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append((proc, log))
        ports = [int(p) for p in re.findall(r"(?<![\d.])(\d{4,5})(?![\d.])", body) if int(p) > 1024]
        ports = ports or [default_port]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{block.where}: the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            if all(_listening(p) for p in ports):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{block.where}: nothing listens on {ports} after {timeout} s:\n{log.read_text()[-3000:]}")

    def close(self) -> None:
        for proc, _ in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.servers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.shell.pid, signal.SIGKILL)
        self.shell.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fresh_checkout(dest: Path) -> None:
    """The tracked files as they are in the working tree (what a clone of this commit would hold)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)


def _environment() -> dict[str, str]:
    """The environment of a new terminal: no virtualenv of ours on PATH, no setting of the service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOMENTUM_", "VIRTUAL_ENV", "PYTHON"))}
    ours = str(ROOT / ".venv")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(ours))
    return env


@pytest.fixture
def ports() -> dict[str, str]:
    """A free port for each port the README names (with its cluster bus port, +10000, free too: the Redis
    Cluster nodes of "Scaling out" use both)."""
    chosen: dict[str, str] = {}
    taken: set[int] = set()
    while len(chosen) < len(PORTS):
        port = cluster_port()
        if not {port, port + 10000} & taken:  # no port is another's bus port either
            taken |= {port, port + 10000}
            chosen[PORTS[len(chosen)]] = str(port)
    return chosen


@pytest.fixture
def session(tmp_path: Path, ports: dict[str, str]) -> Iterator[Session]:
    _fresh_checkout(tmp_path)
    s = Session(tmp_path, {**_environment(), "MOMENTUM_PORT": ports["8000"]})
    try:
        yield s
    finally:
        s.close()


@pytest.mark.slow
def test_readme_runs_as_printed(session: Session, ports: dict[str, str]) -> None:
    pattern = re.compile(r"(?<!\d)(" + "|".join(PORTS) + r")(?!\d)")

    def local(text: str) -> str:
        return pattern.sub(lambda m: ports[m.group(1)], text)

    ran = 0
    for path in DOCS:
        for block in blocks(path):
            if block.mode in ("prose", "skip"):
                continue
            body = local(block.body)
            if block.mode == "server":
                session.start_server(block, body, timeout=600, default_port=int(ports["8000"]))
                ran += 1
                continue
            status, out, err = session.run(block, body, timeout=600)
            assert status == 0, f"{block.where} failed ({status}):\n{body}\n--- stdout\n{out}\n--- stderr\n{err}"
            if block.output is not None:
                expected = local(block.output)
                assert output_matches(expected, out), (
                    f"{block.where} printed something else than the README shows:\n--- shown\n{expected}\n"
                    f"--- printed\n{out}\n--- stderr\n{err}"
                )
            ran += 1
    assert ran >= 15
