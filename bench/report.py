"""Derived numbers (ratios to the RPC parameter servers, targets, the batching speedup) and the Markdown report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .agent import FLUSH_MS
from .workloads import BATCH_PARAMS, MAIN, PARAM_SERIES, SIZE_SERIES, params_workload, singles_workload, size_workload

SYSTEM_ORDER = ("torch-local", "rpc-ps", "rpc-ps-tcp", "service-redis", "service-redis-flush", "service-embedded")
BASELINES = ("rpc-ps", "rpc-ps-tcp")
"""The RPC parameter servers every system's steps/s is compared with: over shared memory and over TCP."""


@dataclass(frozen=True, slots=True)
class Target:
    """Steps/s of ``system`` divided by those of ``baseline`` on one main cell: at least ``needed``, and
    ``stretch`` if given (the report says whether each is met)."""

    id: str
    system: str
    baseline: str
    workload: str
    workers: int
    needed: float
    stretch: float | None = None


TARGETS = (
    # rpc-ps-tcp is the fair peer for workers on other hosts; rpc-ps, over shared memory, the stretch.
    Target("tiny-1", "service-embedded", "rpc-ps", "tiny", 1, needed=1.0),
    Target("tiny-4", "service-embedded", "rpc-ps", "tiny", 4, needed=1.0),
    Target("mlp-1", "service-embedded", "rpc-ps-tcp", "mlp", 1, needed=0.5, stretch=1.0),
    Target("mlp-4", "service-embedded", "rpc-ps-tcp", "mlp", 4, needed=0.5, stretch=1.0),
    Target("wide-1", "service-embedded", "rpc-ps-tcp", "wide", 1, needed=1.0),
    # Through Redis: "step" durability (acknowledged once logged in Redis) and flush_ms (from memory).
    Target("step-tiny-1", "service-redis", "rpc-ps-tcp", "tiny", 1, needed=1.0),
    Target("step-tiny-4", "service-redis", "rpc-ps-tcp", "tiny", 4, needed=1.0),
    Target("step-mlp-1", "service-redis", "rpc-ps-tcp", "mlp", 1, needed=0.3),
    Target("step-mlp-4", "service-redis", "rpc-ps-tcp", "mlp", 4, needed=0.3),
    Target("step-wide-1", "service-redis", "rpc-ps-tcp", "wide", 1, needed=0.5),
    Target("flush-tiny-1", "service-redis-flush", "rpc-ps-tcp", "tiny", 1, needed=1.0),
    Target("flush-tiny-4", "service-redis-flush", "rpc-ps-tcp", "tiny", 4, needed=1.0),
    Target("flush-mlp-1", "service-redis-flush", "rpc-ps-tcp", "mlp", 1, needed=0.5, stretch=1.0),
    Target("flush-mlp-4", "service-redis-flush", "rpc-ps-tcp", "mlp", 4, needed=0.5, stretch=1.0),
    Target("flush-wide-1", "service-redis-flush", "rpc-ps-tcp", "wide", 1, needed=1.0),
    Target("flush-tiny-1-embedded", "service-redis-flush", "service-embedded", "tiny", 1, needed=1.0),
    Target("flush-tiny-4-embedded", "service-redis-flush", "service-embedded", "tiny", 4, needed=1.0),
    Target("flush-mlp-1-embedded", "service-redis-flush", "service-embedded", "mlp", 1, needed=0.9),
    Target("flush-mlp-4-embedded", "service-redis-flush", "service-embedded", "mlp", 4, needed=0.9),
)
BATCH_TARGET: dict[str, Any] = {"id": "batching", "system": "service-redis", "needed": 20.0}
"""The speedup of one request carrying 1,000 parameters over 1,000 requests of one, for ``system``."""

Index = dict[tuple[str, int, str], dict[str, Any]]


def index(results: Iterable[dict[str, Any]]) -> Index:
    return {(r["workload"], r["workers"], r["system"]): r for r in results}


def rate(idx: Index, workload: str, workers: int, system: str) -> float | None:
    r = idx.get((workload, workers, system))
    if r is None or not r.get("reps"):
        return None
    value: float = r["steps_per_s"]
    return value


def derive(results: list[dict[str, Any]], targets: Iterable[Target] = TARGETS) -> dict[str, Any]:
    """Ratios to each RPC parameter server per main cell, the targets (met or not), the batching comparison."""
    idx = index(results)
    ratios = []
    for workload, workers, system in sorted({k for k in idx if k[0] in MAIN}):
        value = rate(idx, workload, workers, system)
        for baseline in BASELINES:
            base = rate(idx, workload, workers, baseline)
            if system != baseline and base and value is not None:
                ratios.append(
                    {
                        "workload": workload,
                        "workers": workers,
                        "system": system,
                        "baseline": baseline,
                        "ratio": value / base,
                    }
                )
    batching: list[dict[str, Any]] = []
    batched, singles = params_workload(BATCH_PARAMS).name, singles_workload(BATCH_PARAMS).name
    for system in SYSTEM_ORDER:
        one, many = rate(idx, batched, 1, system), rate(idx, singles, 1, system)
        if one is not None and many is not None:
            batching.append(
                {
                    "system": system,
                    "params": BATCH_PARAMS,
                    "one_request_ms": 1e3 / one,
                    "single_requests_ms": 1e3 / many,
                    "speedup": one / many,
                }
            )
    out = []
    for t in targets:
        value = rate(idx, t.workload, t.workers, t.system)
        base = rate(idx, t.workload, t.workers, t.baseline)
        measured = _div(value, base)
        entry = {k: v for k, v in asdict(t).items() if v is not None} | {
            "what": f"{t.workload}, {t.workers} worker{'s' if t.workers > 1 else ''}: steps/s",
            "subject_steps_per_s": value,
            "baseline_steps_per_s": base,
            "measured": measured,
            "met": None if measured is None else measured >= t.needed,
        }
        if t.stretch is not None:
            entry["stretch_met"] = None if measured is None else measured >= t.stretch
        out.append(entry)
    speedup = next((b["speedup"] for b in batching if b["system"] == BATCH_TARGET["system"]), None)
    out.append(
        BATCH_TARGET
        | {
            "what": f"{BATCH_PARAMS:,} params in one request vs {BATCH_PARAMS:,} single-param requests",
            "measured": speedup,
            "met": None if speedup is None else speedup >= BATCH_TARGET["needed"],
        }
    )
    return {"ratios": ratios, "batching": batching, "targets": out}


# -- formatting -----------------------------------------------------------------------------------


def num(x: float | None) -> str:
    if x is None:
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2g}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**not met**")


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def markdown(result: dict[str, Any]) -> str:
    results: list[dict[str, Any]] = result["results"]
    idx = index(results)
    systems = [s for s in SYSTEM_ORDER if s in result["systems"]]
    s = result["settings"]
    redis = result.get("redis") or {}
    cfg = redis.get("config", {})
    wire = result["service"]["wire"]
    wire_types = sorted({str(w.get("request_content_type")) for w in wire.values()})
    m, v = result["machine"], result["versions"]
    out = [
        "# momentum-service benchmark",
        "",
        f"Run {result['created']} with `{' '.join(result['command'])}`: {result['duration_s']['total'] / 60:.1f} min "
        f"in all ({result['duration_s']['startup']:.0f} s of process startup, not timed). "
        f"Medians over {_reps(result)}; in each, every system ran each cell once, in rotating order. "
        f"Each run: {s['warmup']:g} s warm-up, then {s['seconds']:g} s of timed steps "
        f"(at least {s['min_steps']} per worker).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}; Python {m['python']}.",
        f"- Versions: torch {v.get('torch')}, numpy {v.get('numpy')}, httpx {v.get('httpx')}, "
        f"uvicorn {v.get('uvicorn')}, "
        f"fastapi {v.get('fastapi')}, redis-py {v.get('redis')}, {v.get('redis-server') or 'redis-server ?'}; "
        f"git {str((result.get('git') or {}).get('commit'))[:10]}"
        f" ({(result.get('git') or {}).get('dirty_files', 0)} files changed).",
        _load_line(m.get("load_during_timed_runs") or {}),
        f"- Rule: torch.optim.SGD, lr {result['rule']['lr']}, momentum {result['rule']['momentum']}, float32.",
        f"- service-redis, service-redis-flush: Redis started by the bench, appendonly {cfg.get('appendonly', '?')}, "
        f'appendfsync {cfg.get("appendfsync", "?")}; models with durability "step" (acknowledged once logged in '
        f'Redis) and {{"flush_ms": {s.get("flush_ms", FLUSH_MS)}}} (acknowledged from the owner\'s memory), '
        "a server process each. "
        "SDK wire format (request Content-Type): "
        f"{', '.join(f'`{t}`' for t in wire_types) or '?'}.",
        *_rpc_lines(result["rpc"]),
        "",
        "## Targets",
        "",
        "Steps/s of a service system divided by an RPC parameter server's (rpc-ps-tcp, over TCP, is the fair "
        "peer for workers on other hosts; rpc-ps, over shared memory, is the stretch), and the batching speedup.",
        "",
    ]
    rows = []
    for t in result["targets"]:
        needed = f">= {t['needed']:g}x"
        if "stretch" in t:
            needed += f" (stretch {t['stretch']:g}x: {met(t.get('stretch_met'))})"
        if "baseline" in t:
            versus = f"{t['system']} / {t['baseline']}"
            detail = f"{num(t['subject_steps_per_s'])} vs {num(t['baseline_steps_per_s'])}"
        else:
            versus, detail = f"{t['system']}: speedup", "-"
        rows.append([t["what"], versus, detail, ratio(t["measured"]), needed, met(t["met"])])
    out += table(["target", "measured as", "steps/s", "ratio", "needed", ""], rows, "llrrll")
    main_rows = sorted({(r["workload"], r["workers"]) for r in results if r["workload"] in MAIN}, key=_main_key)

    def grid(title: str, note: str, cell: Any) -> None:
        out.extend(["", f"## {title}", "", note, ""])
        rows = [[w, str(n)] + [cell(idx.get((w, n, x))) for x in systems] for w, n in main_rows]
        out.extend(table(["workload", "workers", *systems], rows, "lr" + "r" * len(systems)))

    grid(
        "Throughput: steps/s",
        "Aggregate over the workers (4 workers push concurrently to the same model; torch-local's workers each "
        "have their own model). tiny: 1 parameter of 1,000 floats; mlp: 8 parameters, ~1M floats; wide: 1 "
        "parameter of 10M floats.",
        lambda r: _get(r, "steps_per_s"),
    )
    pairs = [(x, b) for x in systems if x.startswith("service-") for b in BASELINES if b in systems]
    if pairs:
        out += ["", "## Ratios to the RPC parameter servers", ""]
        out.append("Steps/s of each service system divided by that of rpc-ps (shared memory) and rpc-ps-tcp (TCP).")
        out.append("")
        rows = [
            [w, str(n)] + [ratio(_div(rate(idx, w, n, x), rate(idx, w, n, b))) for x, b in pairs] for w, n in main_rows
        ]
        out += table(["workload", "workers", *[f"{x} / {b}" for x, b in pairs]], rows)
    grid(
        "Latency per step: p50 / p99 ms",
        "Per worker step, from the worker's call to its return with the updated parameters.",
        lambda r: f"{_get(r, 'p50_ms')} / {_get(r, 'p99_ms')}",
    )
    grid(
        "Payload throughput: MB/s",
        "Gradient bytes up plus parameter bytes down (float32, 8 bytes per float per step), not wire bytes.",
        lambda r: _get(r, "mb_per_s"),
    )
    out += ["", "## CPU per step (ms)", ""]
    out.append(
        "CPU time per step of the worker processes (all of them, SDK or RPC client), of the server process, and "
        "of redis-server (service-redis) or the PS process (rpc-ps, rpc-ps-tcp), measured from /proc over the "
        "timed run."
    )
    out.append("")
    rows = []
    for w, n in main_rows:
        for x in systems:
            r = idx.get((w, n, x))
            cpu = (r or {}).get("cpu_ms_per_step") or {}
            if cpu:
                server = cpu.get("server", cpu.get("ps"))
                rows.append([w, str(n), x, num(cpu.get("workers")), num(server), num(cpu.get("redis"))])
    out += table(["workload", "workers", "system", "workers", "server / PS", "redis"], rows, "lrlrrr")
    redis_rows = []
    for w, n in main_rows:
        for x in systems:
            r = idx.get((w, n, x)) or {}
            if "redis_in_bytes_per_step" in r:
                aof = _kb(r.get("aof_bytes_per_step"))
                if r["aof_bytes_reps"] < r["reps"]:
                    aof += f" ({r['aof_bytes_reps']} of {r['reps']} reps)"
                grads = r["payload_bytes_per_step"] / 2  # the gradients: half the payload (up, not down)
                received, sent = r["redis_in_bytes_per_step"], r["redis_out_bytes_per_step"]
                redis_rows.append([w, str(n), x, _kb(grads), _kb(received), _kb(sent), aof])
    if redis_rows:
        out += ["", "## Redis bytes per step (kB)", ""]
        out.append(
            "What redis-server received and sent (INFO stats: total_net_input_bytes, total_net_output_bytes) and "
            "appended to its AOF per step over the timed run, beside the gradient bytes a step carries. The AOF "
            "figure is the growth of its incremental AOF files, read from the files (INFO's aof_current_size is "
            "reset by every rewrite), plus aof_buffer_length; rewrites' own base files are not in it."
        )
        out.append("")
        header = ["workload", "workers", "system", "gradients", "Redis in", "Redis out", "AOF"]
        out += table(header, redis_rows, "lrlrrrr")
    _series(
        out,
        idx,
        systems,
        "Scaling with tensor size",
        "1 worker, 1 parameter; p50 ms per step (payload MB/s). 1k is tiny and 10M is wide.",
        "floats",
        [(f"{n:,}", size_workload(n).name) for n in SIZE_SERIES],
    )
    _series(
        out,
        idx,
        systems,
        "Scaling with parameters per request",
        "1 worker; parameters of 100 floats each, all in ONE request; p50 ms per step (payload MB/s).",
        "parameters",
        [(f"{n:,}", params_workload(n).name) for n in PARAM_SERIES],
    )
    if result["batching"]:
        out += ["", f"## Batching: {BATCH_PARAMS:,} parameters in one request vs {BATCH_PARAMS:,} requests", ""]
        out.append(
            f"1 worker; {BATCH_PARAMS:,} parameters of 100 floats. Time to update them all: one request carrying "
            "every gradient, or one request per parameter, sequentially. "
            f"Target for {BATCH_TARGET['system']}: >= {BATCH_TARGET['needed']:g}x."
        )
        out.append("")
        rows = [
            [b["system"], num(b["one_request_ms"]), num(b["single_requests_ms"]), ratio(b["speedup"])]
            for b in result["batching"]
        ]
        out += table(["system", "1 request (ms)", f"{BATCH_PARAMS:,} requests (ms)", "speedup"], rows)
    notes = []
    for r in results:
        if r["reps"] < r["reps_planned"]:
            why = "; ".join(r["errors"]) if r["errors"] else "slow: its runs used up the cell budget"
            cell = f"{r['workload']} x{r['workers']}"
            notes.append(f"- {r['system']} on {cell}: {r['reps']} of {r['reps_planned']} repetitions ({why})")
    if notes:
        out += ["", "## Fewer repetitions, errors", "", *notes]
    profiles = result.get("profiles") or {}
    if profiles.get("summary_path"):
        out += ["", "## Profiles", "", f"py-spy profiles of the servers: `{profiles['summary_path']}`."]
        out += ["", *[f"    {line}" for line in profiles.get("headline", [])]]
    return "\n".join(out) + "\n"


def _series(
    out: list[str], idx: Index, systems: list[str], title: str, note: str, label: str, points: list[tuple[str, str]]
) -> None:
    present = [(a, w) for a, w in points if any((w, 1, x) in idx for x in systems)]
    if not present:
        return
    out += ["", f"## {title}", "", note, ""]
    rows = []
    for shown, w in present:
        row = [shown]
        for x in systems:
            r = idx.get((w, 1, x))
            row.append(f"{_get(r, 'p50_ms')} ({_get(r, 'mb_per_s')})" if r and r.get("reps") else _get(r, "p50_ms"))
        rows.append(row)
    out += table([label, *systems], rows)


def _rpc_lines(rpc: dict[str, Any]) -> list[str]:
    lines = []
    for system, g in rpc["groups"].items():
        options = ", ".join(f"{k}={v}" for k, v in g["backend_options"].items()) or "TensorPipe's own choice"
        workers = "its own worker processes" if g["own_workers"] else "the main worker processes"
        lines.append(
            f"- {system}: TensorPipe, transport `{g['transport']}` ({options}), PS torch threads "
            f"{g['ps_torch_threads']}, {workers}; workers use {rpc['worker_torch_threads']} torch thread."
        )
    return lines


def _kb(x: float | None) -> str:
    return "-" if x is None else num(x / 1e3)


def _reps(result: dict[str, Any]) -> str:
    planned, done = result["settings"]["reps"], result.get("reps_completed", result["settings"]["reps"])
    if done < planned:
        return f"{done} repetitions ({planned} asked; --max-minutes stopped the run)"
    return f"{done} repetitions"


def _load_line(load: dict[str, Any]) -> str:
    if "other_processes_cores" not in load:
        return "- Load: not recorded."
    before = ", ".join(f"{x:.1f}" for x in load["loadavg_before"])
    after = ", ".join(f"{x:.1f}" for x in load["loadavg_after"])
    return (
        f"- Load: other processes used {load['other_processes_cores']:.2f} cores on average during the timed runs "
        f"(load average {before} before, {after} after)."
    )


def _main_key(k: tuple[str, int]) -> tuple[int, int]:
    return (list(MAIN).index(k[0]), k[1])


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _get(r: dict[str, Any] | None, key: str) -> str:
    if r is None:
        return "-"
    if not r.get("reps"):
        return "failed" if r.get("errors") else "-"
    return num(r.get(key))
