"""The benchmark suite: every system on every workload, interleaved, in one run.

Run: ``.venv/bin/python -m bench`` (see ``--help`` and bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from . import environment
from .agent import FLUSH_MS, RPC_TRANSPORTS, SYSTEMS, AgentConfig, LoopSpec, agent_main
from .procs import ROOT, RedisServer, ServiceServer, cpu_seconds, free_port
from .workloads import (
    BATCH_PARAMS,
    GROUPS,
    LR,
    MAIN,
    MOMENTUM,
    PARAM_SERIES,
    SIZE_SERIES,
    Workload,
    params_workload,
    singles_workload,
    size_workload,
)

DEFAULT_OUT = ROOT / "bench" / "results"
DEFAULT_PLOT = ROOT / "docs" / "img" / "bench.png"
SERVER_ENV = {"MOMENTUM_MAX_BODY_BYTES": str(512 * 1024 * 1024)}
"""Overrides for the service's servers: the default 64 MiB body limit is raised so that a 10M-float step
fits in any wire format (in JSON it takes ~200 MB). Nothing else differs from the defaults."""


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Settings:
    reps: int = 5
    seconds: float = 0.75
    warmup: float = 0.25
    min_steps: int = 3
    max_steps: int = 100_000
    workers: tuple[int, ...] = (1, 4)
    systems: tuple[str, ...] = SYSTEMS
    groups: tuple[str, ...] = GROUPS
    appendfsync: str = "everysec"
    flush_ms: int = FLUSH_MS
    cell_budget: float = 40.0
    max_minutes: float = 12.0
    profile: bool = False
    profile_seconds: float = 5.0
    quick: bool = False
    out: Path = DEFAULT_OUT
    plot: Path | None = DEFAULT_PLOT

    @property
    def timed(self) -> LoopSpec:
        return LoopSpec(self.seconds, self.min_steps, self.max_steps, hard_cap=max(3 * self.seconds, 2.0))

    @property
    def warm(self) -> LoopSpec:
        return LoopSpec(self.warmup, 1, self.max_steps, hard_cap=self.warmup)


@dataclass(frozen=True, slots=True)
class Cell:
    workload: Workload
    workers: int
    systems: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.workload.name}/{self.workers}"


@dataclass
class Record:
    """One timed run of one system on one cell."""

    system: str
    workload: str
    workers: int
    rep: int
    order: int
    steps: int = 0
    seconds: float = 0.0
    steps_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mb_per_s: float = 0.0
    cpu_ms_per_step: dict[str, float] = field(default_factory=dict)
    redis_in_bytes_per_step: float | None = None
    redis_out_bytes_per_step: float | None = None
    aof_bytes_per_step: float | None = None
    warmup_steps: int = 0
    wall_s: float = 0.0
    wire: dict[str, Any] | None = None
    error: str | None = None


# -- the plan --------------------------------------------------------------------------------------


def plan(settings: Settings) -> list[Cell]:
    """The cells of one repetition, in run order (each runs every one of its systems)."""
    cells: dict[str, Cell] = {}
    systems = settings.systems

    def add(workload: Workload, workers: int, systems: tuple[str, ...] = systems) -> None:
        cell = Cell(workload, workers, systems)
        if systems and cell.key not in cells:
            cells[cell.key] = cell

    for name in ("tiny", "mlp", "wide"):
        if name in settings.groups:
            for workers in settings.workers:
                add(MAIN[name], workers)
    if "sizes" in settings.groups:
        for n in SIZE_SERIES:
            add(size_workload(n), 1)
    if "params" in settings.groups:
        for count in PARAM_SERIES:
            add(params_workload(count), 1)
    if "batching" in settings.groups:
        add(params_workload(BATCH_PARAMS), 1)
        add(singles_workload(BATCH_PARAMS), 1, tuple(s for s in systems if s != "torch-local"))
    return list(cells.values())


# -- the processes ------------------------------------------------------------------------------------


class Worker:
    """One worker process and its command pipe."""

    def __init__(self, proc: BaseProcess, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.pid = 0

    def send(self, command: str, **kwargs: Any) -> None:
        self.conn.send((command, kwargs))

    def recv(self, timeout: float) -> Any:
        reply = _await(self.conn, self.proc, timeout, f"worker process {self.proc.name}")
        if "error" in reply:
            raise AgentFailed(reply["error"])
        return reply["ok"]

    def call(self, command: str, timeout: float, **kwargs: Any) -> Any:
        self.send(command, **kwargs)
        return self.recv(timeout)


class AgentFailed(Exception):
    """A command failed in a worker process (the cell is recorded as failed; the run goes on)."""


@dataclass
class RpcGroup:
    """One RPC system's group: its PS process and the worker processes that joined it."""

    ps: BaseProcess
    ps_info: dict[str, Any] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    own_workers: bool = False
    """False for the first RPC system, whose group the main workers join; True for another, which needs
    worker processes of its own (a process can join one RPC group only)."""


@dataclass
class Fleet:
    """Everything the run started: Redis, the servers, a PS per RPC system and the worker processes."""

    workers: list[Worker] = field(default_factory=list)
    """The main workers: they run torch-local, the service systems and the first RPC system."""
    redis: RedisServer | None = None
    servers: dict[str, ServiceServer] = field(default_factory=dict)
    rpc: dict[str, RpcGroup] = field(default_factory=dict)

    def agents(self, system: str) -> list[Worker]:
        """The worker processes that run ``system``."""
        group = self.rpc.get(system)
        return group.workers if group is not None else self.workers

    def all_workers(self) -> list[Worker]:
        return self.workers + [w for g in self.rpc.values() if g.own_workers for w in g.workers]

    def all_pids(self) -> list[int]:
        pids = [w.proc.pid for w in self.all_workers() if w.proc.pid is not None]
        pids += [s.proc.pid for s in self.servers.values() if s.proc is not None]
        if self.redis is not None and self.redis.proc is not None:
            pids.append(self.redis.proc.pid)
        pids += [g.ps.pid for g in self.rpc.values() if g.ps.pid is not None]
        return pids

    def pids(self, system: str) -> dict[str, int]:
        """The server-side processes of a system, whose CPU time is counted per step."""
        if system in self.servers:
            out = {"server": self.servers[system].pid}
            if system.startswith("service-redis") and self.redis is not None:
                out["redis"] = self.redis.pid
            return out
        group = self.rpc.get(system)
        if group is not None and group.ps.pid is not None:
            return {"ps": group.ps.pid}
        return {}


@contextmanager
def started(settings: Settings) -> Iterator[Fleet]:
    fleet = Fleet()
    ctx = mp.get_context("spawn")
    n_workers = max(settings.workers)
    with ExitStack() as stack:
        redis_systems = [s for s in settings.systems if s.startswith("service-redis")]
        if redis_systems:
            fleet.redis = RedisServer(settings.appendfsync).start()
            stack.callback(fleet.redis.stop)
        for system in redis_systems:  # a server process each, on the one Redis: each one's CPU is its own
            assert fleet.redis is not None
            # Each under its own key prefix: two replicas of one deployment would share the models
            # (each owning some, forwarding the others' requests); here each system is one server.
            env = {**SERVER_ENV, "MOMENTUM_REDIS_PREFIX": system}
            fleet.servers[system] = ServiceServer(redis_url=fleet.redis.url, env=env)
        if "service-embedded" in settings.systems:
            fleet.servers["service-embedded"] = ServiceServer(env=SERVER_ENV)
        for server in fleet.servers.values():
            server.launch()
            stack.callback(server.stop)
        world = n_workers + 1
        ports: dict[str, int] = {}
        ps_pipes: dict[str, Connection] = {}
        for system in (s for s in settings.systems if s in RPC_TRANSPORTS):
            from .rpc_ps import ps_main

            ports[system] = free_port()
            parent, child = ctx.Pipe()
            ps = ctx.Process(
                target=ps_main,
                args=(ports[system], world, RPC_TRANSPORTS[system], 600.0, child),
                name=f"bench-{system}",
            )
            ps.start()
            stack.callback(_stop_process, ps)
            stack.callback(parent.close)
            fleet.rpc[system] = RpcGroup(ps, own_workers=bool(fleet.rpc))
            ps_pipes[system] = parent
        for system, group in fleet.rpc.items():
            group.ps_info = _await(ps_pipes[system], group.ps, 300, f"the RPC parameter server of {system}")
        # The main workers join the first RPC system's group; every other RPC system gets workers of its own.
        first_rpc = next(iter(fleet.rpc), None)
        if first_rpc is not None:
            fleet.rpc[first_rpc].workers = fleet.workers
        urls = {name: s.url for name, s in fleet.servers.items()}
        worker_sets: list[tuple[str | None, list[Worker]]] = [(first_rpc, fleet.workers)]
        worker_sets += [(system, group.workers) for system, group in fleet.rpc.items() if group.own_workers]
        for rpc_system, workers in worker_sets:
            main_set = workers is fleet.workers
            for i in range(n_workers):
                parent, child = ctx.Pipe()
                config = AgentConfig(
                    index=i,
                    service_urls=urls if main_set else {},
                    rpc_system=rpc_system,
                    rpc_port=ports[rpc_system] if rpc_system else 0,
                    rpc_world_size=world,
                    warm_torch=main_set and "torch-local" in settings.systems,
                    flush_ms=settings.flush_ms,
                )
                name = f"bench-worker{i}" if main_set else f"bench-{rpc_system}-worker{i}"
                proc = ctx.Process(target=agent_main, args=(config, child), name=name)
                proc.start()
                stack.callback(_stop_process, proc)
                workers.append(Worker(proc, parent))
        stack.callback(_stop_workers, fleet.all_workers())
        for server in fleet.servers.values():
            server.wait_ready()
        for w in fleet.all_workers():
            w.pid = w.recv(300)["pid"]
        yield fleet


def _await(conn: Connection, proc: BaseProcess, timeout: float, what: str) -> Any:
    """The next message from ``proc``; ``BenchError`` if it dies or says nothing within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.5):
        if not proc.is_alive():
            raise BenchError(f"{what} exited (code {proc.exitcode})")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not answer within {timeout:.0f} s")
    return conn.recv()


def _stop_workers(workers: list[Worker]) -> None:
    for w in workers:
        try:
            w.send("stop")
        except OSError:
            continue
    for w in workers:
        with suppress(BenchError, AgentFailed, EOFError, OSError):
            w.recv(120)
    for w in workers:
        w.proc.join(120)


def _stop_process(proc: BaseProcess) -> None:
    proc.join(120)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)


# -- running a cell -------------------------------------------------------------------------------


def command_timeout(settings: Settings) -> float:
    return max(900.0, 30 * settings.seconds)


def run_one(
    fleet: Fleet,
    settings: Settings,
    cell: Cell,
    system: str,
    rep: int,
    order: int,
    around_go: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> Record:
    """Set up the cell's model, prepare and warm up the workers, time them, tear down.

    ``around_go``: called just before the timed steps and just after them (the profiler).
    """
    rec = Record(system, cell.workload.name, cell.workers, rep, order)
    workers = fleet.agents(system)[: cell.workers]
    timeout = command_timeout(settings)
    model = f"bench-{cell.workload.name}-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    head = workers[0]
    try:
        head.call("setup", timeout, system=system, workload=cell.workload, model=model)
    except AgentFailed as exc:
        rec.error = _last_line(str(exc))
        rec.wall_s = time.monotonic() - t0
        return rec
    try:
        for w in workers:
            w.send(
                "prepare",
                system=system,
                workload=cell.workload,
                model=model,
                workers=cell.workers,
                warmup=settings.warm,
            )
        try:
            replies = gather(workers, timeout)
        except AgentFailed:
            for w in workers:
                w.call("cancel", timeout)
            raise
        rec.warmup_steps = max(r["warmup_steps"] for r in replies)
        rec.wire = replies[0].get("wire")
        pids = fleet.pids(system)
        redis = fleet.redis if "redis" in pids else None
        if around_go is not None:
            around_go[0]()
        redis0 = redis.counters() if redis is not None else None
        aof = redis.aof_meter().start() if redis is not None and redis0 is not None and redis0["aof_enabled"] else None
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        start_at = time.monotonic() + 0.05
        for w in workers:
            w.send("go", start_at=start_at, spec=settings.timed)
        try:
            results = gather(workers, timeout)
        finally:
            cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
            aof_written = aof.stop() if aof is not None else None
            redis1 = redis.counters() if redis is not None else None
            if around_go is not None:
                around_go[1]()
        latencies = np.concatenate([np.asarray(r["latencies"], dtype=np.float64) for r in results])
        rec.steps = int(latencies.size)
        rec.seconds = max(r["end"] for r in results) - start_at
        rec.steps_per_s = rec.steps / rec.seconds
        rec.p50_ms = float(np.percentile(latencies, 50) * 1e3)
        rec.p99_ms = float(np.percentile(latencies, 99) * 1e3)
        rec.mb_per_s = rec.steps_per_s * cell.workload.payload_bytes / 1e6
        rec.cpu_ms_per_step = {"workers": sum(r["cpu_s"] for r in results) / rec.steps * 1e3}
        rec.cpu_ms_per_step |= {k: (cpu1[k] - cpu0[k]) / rec.steps * 1e3 for k in pids}
        if redis0 is not None and redis1 is not None:
            rec.redis_in_bytes_per_step, rec.redis_out_bytes_per_step, rec.aof_bytes_per_step = redis_bytes(
                redis0, redis1, aof_written, rec.steps
            )
    except AgentFailed as exc:
        rec.error = _last_line(str(exc))
    finally:
        try:
            head.call("teardown", timeout, system=system, model=model)
        except AgentFailed as exc:
            rec.error = rec.error or f"teardown: {_last_line(str(exc))}"
    rec.wall_s = time.monotonic() - t0
    return rec


def redis_bytes(
    before: dict[str, int], after: dict[str, int], aof_written: int | None, steps: int
) -> tuple[float, float, float | None]:
    """Bytes per step that Redis received, sent and appended to its AOF, from its counters before and after
    and the bytes written to its AOF files in between (None if unknown or AOF is off). The AOF's figure adds
    what Redis holds appended but not yet written (``aof_buffer_length``) after, less before."""
    received = (after["total_net_input_bytes"] - before["total_net_input_bytes"]) / steps
    sent = (after["total_net_output_bytes"] - before["total_net_output_bytes"]) / steps
    if aof_written is None or not after["aof_enabled"]:
        return received, sent, None
    appended = aof_written + after["aof_buffer_length"] - before["aof_buffer_length"]
    return received, sent, appended / steps


def gather(workers: list[Worker], timeout: float) -> list[Any]:
    """Every worker's answer to the command just sent; then ``AgentFailed`` if any failed (the answers of
    the others are read first, so none is left in a pipe to be taken for the answer to a later command)."""
    replies: list[Any] = []
    failures: list[str] = []
    for w in workers:
        try:
            replies.append(w.recv(timeout))
        except AgentFailed as exc:
            failures.append(str(exc))
    if failures:
        raise AgentFailed(failures[0])
    return replies


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else text[:500]


def rotated(systems: tuple[str, ...], k: int) -> list[str]:
    if not systems:
        return []
    k %= len(systems)
    return list(systems[k:] + systems[:k])


def run_reps(fleet: Fleet, settings: Settings, cells: list[Cell], log: Any) -> tuple[list[Record], int]:
    """Every repetition runs every cell, and in each cell every system once, in rotating order.

    Returns the records and the number of repetitions run: fewer than asked when the next one would
    end past ``settings.max_minutes`` (judged by the last repetition's duration)."""
    records: list[Record] = []
    spent: dict[tuple[str, str], float] = {}
    t_start = time.monotonic()
    last = 0.0
    for rep in range(settings.reps):
        elapsed = time.monotonic() - t_start
        if rep > 0 and elapsed + last > settings.max_minutes * 60:
            print(
                f"stopping after {rep} repetitions: another would end past --max-minutes {settings.max_minutes:g}",
                file=log,
                flush=True,
            )
            return records, rep
        t_rep = time.monotonic()
        for i, cell in enumerate(cells):
            for order, system in enumerate(rotated(cell.systems, rep + i)):
                key = (cell.key, system)
                if rep > 0 and spent.get(key, 0.0) > settings.cell_budget:
                    continue  # a slow cell: its repetitions so far already took the cell budget
                rec = run_one(fleet, settings, cell, system, rep, order)
                spent[key] = spent.get(key, 0.0) + rec.wall_s
                records.append(rec)
                status = (
                    f"ERROR {rec.error}" if rec.error else f"{rec.steps_per_s:10.1f} steps/s  p50 {rec.p50_ms:8.2f} ms"
                )
                print(f"  rep {rep + 1}  {cell.key:16} {system:17} {status}", file=log, flush=True)
        last = time.monotonic() - t_rep
        print(f"repetition {rep + 1}/{settings.reps} took {last:.0f} s", file=log, flush=True)
    return records, settings.reps


# -- summaries ------------------------------------------------------------------------------------


def summarize(records: list[Record], cells: list[Cell], reps: int) -> list[dict[str, Any]]:
    """Per (workload, workers, system): medians over the repetitions, and each repetition's numbers."""
    out = []
    for cell in cells:
        for system in cell.systems:
            recs = [
                r
                for r in records
                if r.system == system and r.workload == cell.workload.name and r.workers == cell.workers
            ]
            good = [r for r in recs if r.error is None]
            entry: dict[str, Any] = {
                "system": system,
                "workload": cell.workload.name,
                "group": cell.workload.group,
                "description": cell.workload.description,
                "workers": cell.workers,
                "floats": cell.workload.floats,
                "params": len(cell.workload.params),
                "requests_per_step": len(cell.workload.params) if cell.workload.singles else 1,
                "payload_bytes_per_step": cell.workload.payload_bytes,
                "reps": len(good),
                "reps_planned": reps,
                "errors": sorted({r.error for r in recs if r.error}),
            }
            if good:
                for k in ("steps_per_s", "p50_ms", "p99_ms", "mb_per_s"):
                    entry[k] = statistics.median(getattr(r, k) for r in good)
                entry["steps_total"] = sum(r.steps for r in good)
                keys = sorted({k for r in good for k in r.cpu_ms_per_step})
                entry["cpu_ms_per_step"] = {
                    k: statistics.median(r.cpu_ms_per_step.get(k, 0.0) for r in good) for k in keys
                }
                for k in ("redis_in_bytes_per_step", "redis_out_bytes_per_step", "aof_bytes_per_step"):
                    values = [v for r in good if (v := getattr(r, k)) is not None]
                    if values:
                        entry[k] = statistics.median(values)
                if any(r.redis_in_bytes_per_step is not None for r in good):
                    entry["aof_bytes_reps"] = sum(r.aof_bytes_per_step is not None for r in good)
                entry["per_rep"] = [
                    {k: getattr(r, k) for k in ("rep", "order", "steps", "seconds", "steps_per_s", "p50_ms", "p99_ms")}
                    for r in good
                ]
            out.append(entry)
    return out


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare torch-local, an RPC parameter server and momentum-service (Redis and embedded) "
        "on the same workloads, interleaved, in one run. Writes <out>/latest.json, <out>/latest.md and a plot.",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 repetitions of short timings")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; --quick 2)")
    ap.add_argument("--seconds", type=float, help="timed seconds per run of a cell (default 0.75; --quick 0.2)")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per run of a cell (default 0.25; --quick 0.05)")
    ap.add_argument("--min-steps", type=int, help="timed steps per worker at least (default 3; --quick 2)")
    ap.add_argument(
        "--workloads", default=",".join(GROUPS), help=f"comma-separated, of {','.join(GROUPS)} (default all)"
    )
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {','.join(SYSTEMS)} (default all)"
    )
    ap.add_argument("--workers", default="1,4", help="worker counts for tiny, mlp and wide (default 1,4)")
    ap.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec", help="Redis AOF fsync policy")
    ap.add_argument(
        "--flush-ms", type=int, default=FLUSH_MS, help=f"service-redis-flush's flush_ms (default {FLUSH_MS})"
    )
    ap.add_argument(
        "--cell-budget",
        type=float,
        default=40.0,
        help="seconds: a system whose runs of a cell took this long in all is not repeated further (default 40)",
    )
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=12.0,
        help="no repetition is started that would end past this many minutes of timed runs (default 12)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="py-spy the service's servers during tiny and mlp (after the timed runs)"
    )
    ap.add_argument("--profile-seconds", type=float, default=5.0, help="seconds per profiled run (default 5)")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    ap.add_argument(
        "--plot", type=Path, default=DEFAULT_PLOT, help=f"plot file (default {DEFAULT_PLOT.relative_to(ROOT)})"
    )
    ap.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    a = ap.parse_args(argv)

    def names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            ap.error(f"{what}: unknown {bad or 'nothing given'}; choose from {', '.join(allowed)}")
        return tuple(x for x in allowed if x in items)  # canonical order

    try:
        workers = tuple(sorted({int(x) for x in a.workers.split(",")}))
    except ValueError:
        ap.error("--workers: comma-separated integers")
    if not workers or min(workers) < 1 or max(workers) > 16:
        ap.error("--workers: between 1 and 16")
    quick = bool(a.quick)
    settings = Settings(
        reps=a.reps if a.reps is not None else (2 if quick else 5),
        seconds=a.seconds if a.seconds is not None else (0.2 if quick else 0.75),
        warmup=a.warmup if a.warmup is not None else (0.05 if quick else 0.25),
        min_steps=a.min_steps if a.min_steps is not None else (2 if quick else 3),
        workers=workers,
        systems=names(a.systems, SYSTEMS, "--systems"),
        groups=names(a.workloads, GROUPS, "--workloads"),
        appendfsync=a.appendfsync,
        flush_ms=a.flush_ms,
        cell_budget=a.cell_budget,
        max_minutes=a.max_minutes,
        profile=bool(a.profile),
        profile_seconds=a.profile_seconds,
        quick=quick,
        out=a.out,
        plot=None if a.no_plot else a.plot,
    )
    if settings.reps < 1 or settings.seconds <= 0 or settings.warmup < 0 or settings.min_steps < 1:
        ap.error("--reps and --min-steps must be >= 1, --seconds > 0, --warmup >= 0")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    log = sys.stderr
    started_at = time.time()
    t0 = time.monotonic()
    cells = plan(settings)
    n_runs = sum(len(c.systems) for c in cells)
    print(
        f"bench: {len(cells)} cells, {n_runs} system runs per repetition, {settings.reps} repetitions; "
        f"{settings.seconds:g} s timed + {settings.warmup:g} s warm-up per run",
        file=log,
        flush=True,
    )
    profiles: dict[str, Any] = {}
    with started(settings) as fleet:
        startup_s = time.monotonic() - t0
        print(
            f"started Redis, servers, {len(fleet.rpc)} PS and {len(fleet.all_workers())} worker processes "
            f"in {startup_s:.1f} s",
            file=log,
            flush=True,
        )
        t_runs = time.monotonic()
        load: dict[str, Any] = {"loadavg_before": os.getloadavg()}
        busy0, ours0 = environment.system_busy_seconds(), _our_cpu(fleet)
        records, reps_done = run_reps(fleet, settings, cells, log)
        runs_s = time.monotonic() - t_runs
        other = (environment.system_busy_seconds() - busy0) - (_our_cpu(fleet) - ours0)
        load |= {"loadavg_after": os.getloadavg(), "other_processes_cores": max(0.0, other) / runs_s}
        if load["other_processes_cores"] > 0.2:
            print(
                f"warning: other processes used {load['other_processes_cores']:.1f} cores on average during the "
                "timed runs: the numbers are noisier than they need be",
                file=log,
            )
        redis_info = fleet.redis.info() | {"persistence": fleet.redis.persistence()} if fleet.redis else None
        if settings.profile:
            from .profiling import profile_servers

            profiles = profile_servers(fleet, settings, log)
        server_commands = {name: s.command for name, s in fleet.servers.items()}
        rpc_groups = {
            system: {
                "transport": g.ps_info.get("transport"),
                "backend_options": g.ps_info.get("backend_options"),
                "ps_torch_threads": g.ps_info.get("torch_threads"),
                "own_workers": g.own_workers,
            }
            for system, g in fleet.rpc.items()
        }
    summary = summarize(records, cells, reps_done)
    result: dict[str, Any] = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "command": [Path(sys.executable).name, "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "duration_s": {"total": time.monotonic() - t0, "startup": startup_s, "timed_repetitions": runs_s},
        "settings": _settings_json(settings),
        "reps_completed": reps_done,
        "rule": {"optimizer": "torch.optim.SGD", "lr": LR, "momentum": MOMENTUM, "dtype": "float32"},
        "machine": environment.machine() | {"load_during_timed_runs": load},
        "versions": environment.versions(),
        "git": environment.git(),
        "redis": redis_info,
        "service": {
            "server_env": SERVER_ENV,
            "commands": server_commands,
            "wire": _wire(records),
            "sdk_client": "momentum_client.Client(url, timeout=600) with the SDK's defaults otherwise",
        },
        "rpc": {"backend": "TensorPipe", "groups": rpc_groups, "worker_torch_threads": 1},
        "systems": list(settings.systems),
        "results": summary,
        "records": [asdict(r) for r in records],
        "profiles": profiles,
    }
    from .report import derive, markdown

    result |= derive(summary)
    settings.out.mkdir(parents=True, exist_ok=True)
    json_path = settings.out / "latest.json"
    md_path = settings.out / "latest.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    print(f"wrote {json_path} and {md_path}", file=log)
    if settings.plot is not None:
        from .plot import plot

        plot(result, settings.plot)
        print(f"wrote {settings.plot}", file=log)
    print(f"total {time.monotonic() - t0:.0f} s", file=log)
    print(md_path.read_text())
    return 0


def _our_cpu(fleet: Fleet) -> float:
    """CPU seconds used so far by this process and every process of the fleet."""
    t = os.times()
    total = t.user + t.system
    for pid in fleet.all_pids():
        with suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _settings_json(settings: Settings) -> dict[str, Any]:
    d = asdict(settings)
    d["out"] = str(settings.out)
    d["plot"] = str(settings.plot) if settings.plot else None
    d["timed_loop"] = asdict(settings.timed)
    d["warmup_loop"] = asdict(settings.warm)
    return d


def _wire(records: list[Record]) -> dict[str, Any]:
    """What the SDK sent and received (content types), as seen on one step of each service workload."""
    out: dict[str, Any] = {}
    for r in records:
        if r.wire and r.system.startswith("service-") and r.workload not in out:
            out[r.workload] = r.wire
    return out


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
