"""``--profile``: where the service's time goes, sampled with py-spy.

After the timed repetitions, the tiny and mlp workloads run once more per service system
(1 worker, and the most workers of the run) for ``--profile-seconds``, with ``py-spy record``
attached to the server process and to the first worker process (the SDK side). These runs are
not part of the timed results: sampling slows the sampled processes (``--native`` more so).

py-spy writes collapsed stacks (``--format raw``: ``frame;frame;... count``), which speedscope
(https://www.speedscope.app) and flamegraph.pl open as they are. ``--native`` is used when py-spy
can unwind C stacks here (checked first with ``py-spy dump --native``): it shows what the C code
under a Python frame is doing, which is what tells uvloop's socket work from its wait in
``epoll_wait``, and a thread at work from one waiting for the GIL or a lock. py-spy's own idle
detection misses many of those waits, so samples that wait (``classify``) are counted apart and left
out of the shares. ``busy`` is the remaining samples / (rate x seconds), in threads; the CPU time
that /proc reports for the same run is kept beside it as the ground truth. Time in C is charged to
the innermost Python frame, which is what the area breakdown needs.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .suite import Fleet, Settings

RATE = 200

# With --native, a stack whose C frames (below its innermost Python frame) include one of these is
# waiting, not working: its samples are counted per kind and left out of the shares.
NATIVE_WAITS: tuple[tuple[str, str], ...] = (
    ("take_gil", "waiting for the GIL"),
    ("epoll_wait", "event loop idle (epoll)"),
    ("epoll_pwait", "event loop idle (epoll)"),
    ("PyThread_acquire_lock_timed", "waiting on a lock or queue"),
    ("pthread_cond_wait", "waiting on a lock or queue"),
    ("pthread_cond_timedwait", "waiting on a lock or queue"),
    ("sem_wait", "waiting on a lock or queue"),
    ("sem_timedwait", "waiting on a lock or queue"),
    ("sem_clockwait", "waiting on a lock or queue"),
    ("select", "waiting in select/poll"),
    ("poll", "waiting in select/poll"),
)

# Without --native (or where a stack has no C frames), innermost Python frames that only wait. py-spy's
# own idle detection misses some. Per function, as ``_function`` writes it.
PYTHON_WAITS: dict[str, str] = {
    "Condition.wait (threading.py)": "waiting on a lock or queue",
    "Event.wait (threading.py)": "waiting on a lock or queue",
    "Thread._wait_for_tstate_lock (threading.py)": "waiting on a lock or queue",
    "_worker (concurrent/futures/thread.py)": "waiting on a lock or queue",
    "EpollSelector.select (selectors.py)": "waiting in select/poll",
    "_poll (multiprocessing/connection.py)": "waiting in select/poll",
}

# Innermost Python frames whose samples are C work of a kind worth its own name (or, without --native,
# C work mixed with waiting: ``Runner.run`` is then uvloop's C code *or* its epoll wait).
MIXED: dict[str, str] = {
    "Runner.run (asyncio/runners.py)": "event loop: uvloop's C code (socket I/O, scheduling)",
    "SyncStream.read (httpcore/_backends/sync.py)": "socket recv (client: also waiting for the server)",
    "SyncStream.write (httpcore/_backends/sync.py)": "socket send",
    "StreamWriter.writelines (asyncio/streams.py)": "socket send",
}

# Otherwise, the first match on the file of the innermost Python frame wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("momentum_service/kernels", "kernel (the momentum update)"),
    ("momentum_service/store/redis", "store: Redis (service side)"),
    ("momentum_service/store/scripts", "store: Redis (service side)"),
    ("momentum_service/store", "store: embedded"),
    ("momentum_service/api/wire", "wire codec (safetensors)"),
    ("momentum_service/api/body", "request body parsing"),
    ("momentum_service/api/schemas", "request body parsing"),
    ("momentum_service/api", "API handlers"),
    ("momentum_service/engine", "engine"),
    ("momentum_service", "service, other"),
    ("momentum_client/_tensors", "SDK tensors / codec"),
    ("momentum_client", "SDK"),
    ("safetensors", "wire codec (safetensors)"),
    ("orjson", "JSON"),
    ("json/", "JSON"),
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("pydantic", "pydantic"),
    ("fastapi", "FastAPI / Starlette"),
    ("starlette", "FastAPI / Starlette"),
    ("uvicorn", "uvicorn (HTTP server)"),
    ("httptools", "uvicorn (HTTP server)"),
    ("h11", "h11 (HTTP)"),
    ("httpx", "httpx (HTTP client)"),
    ("httpcore", "httpx (HTTP client)"),
    ("uuid", "uuid"),
    ("anyio", "anyio (hand-off to worker threads)"),
    ("copy.py", "copy / deepcopy"),
    ("copyreg", "copy / deepcopy"),
    ("asyncio", "event loop"),
    ("uvloop", "event loop"),
    ("logging", "logging"),
    ("numpy", "numpy"),
    ("concurrent/futures", "threads"),
    ("threading", "threads"),
    ("socket", "sockets"),
    ("selectors", "sockets"),
)


def area(frame: str) -> str:
    """The area of an innermost Python frame."""
    mixed = MIXED.get(_function(frame))
    if mixed is not None:
        return mixed
    path = _file(frame)
    for needle, name in AREAS:
        if needle in path:
            return name
    return "other"


def _file(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``path/file.py``; ``0x7f.. (libc.so.6)`` -> ``libc.so.6``."""
    if frame.endswith(")") and " (" in frame:
        inner = frame.rsplit(" (", 1)[1][:-1]
        return inner.rsplit(":", 1)[0]
    return frame


def _function(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (path/file.py)``: per function, not per line."""
    if frame.endswith(")") and " (" in frame:
        name, inner = frame.rsplit(" (", 1)
        return f"{name} ({inner[:-1].rsplit(':', 1)[0]})"
    return frame


def _name(frame: str) -> str:
    return frame.rsplit(" (", 1)[0] if frame.endswith(")") and " (" in frame else frame


def is_python(frame: str) -> bool:
    """Whether a frame is Python code (``--native`` stacks also have C frames: ``.c``, ``.so``, addresses)."""
    path = _file(frame)
    return path.endswith(".py") or path.startswith("<")


def classify(frames: list[str]) -> tuple[str | None, str, str | None]:
    """(the kind of wait, or None for work; the area; the innermost C function, if any) of one stack."""
    py = [i for i, f in enumerate(frames) if is_python(f)]
    if not py:
        return None, "native only (no Python frame)", _name(frames[-1]) if frames else None
    inner = frames[py[-1]]
    natives = [_name(f) for f in frames[py[-1] + 1 :]]
    for native in natives:
        for needle, kind in NATIVE_WAITS:
            if native == needle:
                return kind, area(inner), None
    if not natives:
        wait = PYTHON_WAITS.get(_function(inner))
        if wait is not None:
            return wait, area(inner), None
        if _function(inner) == "Runner.run (asyncio/runners.py)":
            return None, "event loop: uvloop's C code, or its wait in epoll (no --native to tell)", None
    return None, area(inner), natives[-1] if natives else None


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(path: Path, seconds: float, top: int = 12) -> dict[str, Any]:
    """Samples, busy fraction, self time per area, and the top functions by self and by total time.

    Samples that wait (see ``classify``) are counted per kind in ``waiting`` and left out of the rest.
    Functions are Python functions: time in C is charged to the innermost Python frame (``top_native``
    lists the innermost C functions of the working samples, when sampled with ``--native``)."""
    waiting: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    native: Counter[str] = Counter()
    total = 0
    for frames, count in read_collapsed(path):
        if not frames:
            continue
        wait, where, c_leaf = classify(frames)
        if wait is not None:
            waiting[wait] += count
            continue
        total += count
        areas[where] += count
        python = [f for f in frames if is_python(f)]
        if python:
            self_time[_function(python[-1])] += count
        for f in {_function(f) for f in python}:
            inclusive[f] += count
        if c_leaf is not None:
            native[c_leaf] += count

    def share(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in c.most_common(n)] if total else []

    return {
        "samples": total,
        "waiting": dict(waiting.most_common()),
        "waiting_samples_dropped": sum(waiting.values()),
        "busy": total / (RATE * seconds) if seconds > 0 else None,
        "areas": share(areas, len(areas)),
        "top_self": share(self_time, top),
        "top_total": share(inclusive, top),
        "top_native": share(native, top // 2),
    }


class PySpy:
    """``py-spy record`` on one process until stopped (SIGINT makes it write its output)."""

    def __init__(self, pid: int, output: Path, native: bool) -> None:
        self.pid = pid
        self.output = output
        self.native = native
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = output.with_suffix(".log")

    def start(self) -> None:
        binary = py_spy_binary()
        assert binary is not None
        args = [
            binary,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "-o",
            str(self.output),
            *(["--native"] if self.native else ["--nonblocking"]),
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        ok = self.proc.returncode == 0 and self.output.exists()
        self.proc = None
        if ok:
            self.log.unlink(missing_ok=True)
        return ok


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def native_works(pid: int) -> bool:
    """Whether ``py-spy --native`` can unwind this process's C stacks here."""
    binary = py_spy_binary()
    if binary is None:
        return False
    try:
        proc = subprocess.run([binary, "dump", "--native", "--pid", str(pid)], capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def profile_servers(fleet: Fleet, settings: Settings, log: IO[str]) -> dict[str, Any]:
    from .suite import Cell, run_one
    from .workloads import MAIN

    out_dir = settings.out / "profiles"
    if py_spy_binary() is None:
        print("profile: py-spy is not installed (.venv/bin/pip install py-spy); skipped", file=log)
        return {"error": "py-spy not installed"}
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    prof_settings = replace(settings, seconds=settings.profile_seconds, min_steps=1)
    native = all(native_works(s.pid) for s in fleet.servers.values())
    print(f"profile: py-spy record {'--native' if native else '(without --native: it fails here)'}", file=log)
    entries = []
    worker_counts = sorted({1, max(settings.workers)})
    for system in fleet.servers:
        for workload in ("tiny", "mlp"):
            for workers in worker_counts:
                cell = Cell(MAIN[workload], workers, (system,))
                stem = f"{system}-{workload}-w{workers}"
                spies = {
                    "server": PySpy(fleet.servers[system].pid, out_dir / f"{stem}-server.txt", native),
                    # The worker process has TensorPipe's many threads, which --native would unwind at every
                    # sample, slowing it several-fold: its Python frames, sampled without pausing it, suffice.
                    "client": PySpy(fleet.workers[0].pid, out_dir / f"{stem}-client.txt", native=False),
                }

                def start(spies: dict[str, PySpy] = spies) -> None:
                    for spy in spies.values():
                        spy.start()
                    time.sleep(0.5)  # let py-spy attach before the timed steps

                def stop(spies: dict[str, PySpy] = spies) -> dict[str, bool]:
                    return {k: spy.stop() for k, spy in spies.items()}

                rec = run_one(fleet, prof_settings, cell, system, rep=0, order=0, around_go=(start, stop))
                entry: dict[str, Any] = {
                    "system": system,
                    "workload": workload,
                    "workers": workers,
                    "steps_per_s": rec.steps_per_s,
                    "seconds": rec.seconds,
                    "cpu_ms_per_step": rec.cpu_ms_per_step,
                    "server_cpu_cores": rec.cpu_ms_per_step.get("server", 0.0) * rec.steps_per_s / 1e3,
                    "error": rec.error,
                }
                for role, spy in spies.items():
                    if spy.output.exists():
                        entry[role] = {"file": str(spy.output.relative_to(settings.out))} | summarize(
                            spy.output, rec.seconds
                        )
                    else:
                        log_text = spy.log.read_text(errors="replace") if spy.log.exists() else ""
                        entry[role] = {"error": log_text.strip()[-500:] or "no output"}
                entries.append(entry)
                busy = entry.get("server", {}).get("busy")
                print(f"  profiled {stem}: server busy {busy if busy is None else f'{busy:.0%}'}", file=log, flush=True)
    summary_path = out_dir / "summary.md"
    summary_path.write_text(render(entries, native))
    return {
        "tool": "py-spy record --format raw" + (" --native" if native else ""),
        "native": native,
        "rate_hz": RATE,
        "seconds": settings.profile_seconds,
        "runs": entries,
        "summary_path": _shown(summary_path),
        "headline": headline(entries),
    }


def _shown(path: Path) -> str:
    from .procs import ROOT

    path = path.resolve()
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def headline(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        for role in ("server", "client"):
            p = e.get(role) or {}
            if "areas" not in p:
                continue
            areas = ", ".join(f"{name} {share:.0%}" for name, share in p["areas"][:5])
            busy = f"sampled busy {p['busy']:.0%}; " if p.get("busy") is not None else ""
            if role == "server":
                busy += f"CPU {e['server_cpu_cores']:.0%} (/proc); "
            lines.append(f"{e['system']} {e['workload']} x{e['workers']} {role}: {busy}{areas}")
    return lines


def render(entries: list[dict[str, Any]], native: bool) -> str:
    how = "with --native (C frames too)" if native else "without --native (it failed here)"
    how += " on the server process, and without it (--nonblocking) on worker 0 (the SDK side)"
    out = [
        "# Where the time goes (py-spy)",
        "",
        f"py-spy record at {RATE} Hz {how}, while the workload ran. These runs are not in the timed",
        "results: sampling slows the sampled processes (compare the steps/s while sampled with latest.md).",
        "Samples that wait (for the GIL, on a lock or queue, in epoll: py-spy's idle detection misses many)",
        "are counted apart and left out of the shares. 'busy' is the remaining samples / (rate x seconds), in",
        "threads; the server's CPU time from /proc over the same run is the ground truth. 'self': the innermost",
        "Python frame (time in C is charged to the Python line that called it); 'total': any frame on the stack;",
        "'C, self': the innermost C function of a working sample. Open the .txt files (collapsed stacks) in",
        "https://www.speedscope.app or with flamegraph.pl.",
        "",
    ]
    for e in entries:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in (e.get("cpu_ms_per_step") or {}).items())
        out.append(
            f"## {e['system']}, {e['workload']}, {e['workers']} worker(s): {e['steps_per_s']:.1f} steps/s while "
            f"sampled; server CPU {e['server_cpu_cores']:.0%} of a core (/proc); CPU ms per step: {cpu}"
        )
        if e.get("error"):
            out.append(f"error: {e['error']}")
        for role in ("server", "client"):
            p = e.get(role) or {}
            out.append("")
            if "areas" not in p:
                out.append(f"### {role}: no profile ({p.get('error', '?')})")
                continue
            busy = f", busy {p['busy']:.0%} of the time" if p.get("busy") is not None else ""
            out.append(f"### {role} ({p['samples']} working samples{busy}; {p['file']})")
            out.append("")
            waits = ", ".join(f"{k} {v}" for k, v in (p.get("waiting") or {}).items()) or "none"
            out.append(f"samples left out as waiting: {waits}")
            for title, key in (
                ("self time by area", "areas"),
                ("top functions, self", "top_self"),
                ("top functions, total", "top_total"),
                ("top C functions, self", "top_native"),
            ):
                if p.get(key):
                    out += ["", f"{title}:", *[f"  {share:6.1%}  {name}" for name, share in p[key]]]
        out.append("")
    return "\n".join(out) + "\n"
