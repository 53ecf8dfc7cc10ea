"""The benchmark suite (bench/): a --quick smoke run on the tiny workload, and its pure parts.

No speed thresholds here: the smoke run checks that every system ran and reported sane numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import report, suite
from bench.agent import Agent, AgentConfig
from bench.procs import AofMeter
from bench.profiling import summarize
from bench.workloads import MAIN, params_workload, singles_workload, size_workload

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("torch-local", "rpc-ps", "rpc-ps-tcp", "service-redis", "service-redis-flush", "service-embedded")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--quick", "--workloads", "tiny", "--out", str(out)]
    cmd += ["--plot", str(out / "bench.png")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "latest.json").read_text()), out


def test_quick_run_measures_every_system(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    assert result["systems"] == list(SYSTEMS)
    rows = {(r["system"], r["workers"]): r for r in result["results"] if r["workload"] == "tiny"}
    for system in SYSTEMS:
        for workers in (1, 4):
            r = rows[(system, workers)]
            assert r["errors"] == [], (system, workers, r["errors"])
            assert r["reps"] == r["reps_planned"] == 2
            assert r["steps_per_s"] > 0
            assert 0 < r["p50_ms"] <= r["p99_ms"]
            assert r["mb_per_s"] > 0
            assert r["steps_total"] >= 2 * workers
            if system.startswith("rpc-ps"):
                assert r["cpu_ms_per_step"]["ps"] > 0
            if system == "service-redis":
                # Redis received at least the gradients (4 kB) and appended to its AOF on every step.
                assert r["redis_in_bytes_per_step"] > 4_000
                assert r["redis_out_bytes_per_step"] > 0
                assert r["aof_bytes_per_step"] > 0 and r["aof_bytes_reps"] == 2
                assert r["cpu_ms_per_step"]["redis"] > 0 and r["cpu_ms_per_step"]["server"] > 0
            elif system == "service-redis-flush":
                assert r["redis_in_bytes_per_step"] > 0  # the log, flushed in batches (or snapshots)
                assert r["cpu_ms_per_step"]["redis"] >= 0
            else:
                assert "redis_in_bytes_per_step" not in r and "aof_bytes_per_step" not in r
    assert {r["workload"] for r in result["results"]} == {"tiny"}


def test_quick_run_records_the_setup(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, out = quick_run
    assert result["redis"]["config"]["appendonly"] == "yes"
    assert result["redis"]["config"]["appendfsync"] == "everysec"
    assert result["machine"]["cores"] >= 1
    assert result["versions"]["torch"]
    assert result["rpc"]["backend"] == "TensorPipe"
    groups = result["rpc"]["groups"]
    assert groups["rpc-ps"]["transport"] == "default" and groups["rpc-ps"]["backend_options"] == {}
    assert groups["rpc-ps-tcp"]["transport"] == "tcp"
    assert groups["rpc-ps-tcp"]["backend_options"] == {"_transports": ["uv"], "_channels": ["basic"]}
    assert not groups["rpc-ps"]["own_workers"] and groups["rpc-ps-tcp"]["own_workers"]
    assert all(g["ps_torch_threads"] >= 1 for g in groups.values())
    assert result["service"]["wire"]["tiny"]["request_content_type"]
    # Interleaving: each repetition ran every system once, in rotating order.
    for rep in range(2):
        recs = [r for r in result["records"] if r["rep"] == rep and r["workload"] == "tiny" and r["workers"] == 1]
        assert sorted(r["system"] for r in recs) == sorted(SYSTEMS)
    first = [r["system"] for r in result["records"] if r["workers"] == 1 and r["order"] == 0]
    assert len(set(first)) == 2
    targets = {t["id"]: t for t in result["targets"]}
    assert targets["tiny-1"]["system"] == "service-embedded" and targets["tiny-1"]["baseline"] == "rpc-ps"
    assert targets["tiny-1"]["met"] in (True, False)
    assert targets["mlp-1"]["met"] is None  # not measured in this run
    baselines = {(r["system"], r["baseline"]) for r in result["ratios"] if r["workers"] == 4}
    assert {("service-embedded", "rpc-ps"), ("service-embedded", "rpc-ps-tcp"), ("rpc-ps", "rpc-ps-tcp")} <= baselines
    md = (out / "latest.md").read_text()
    assert "## Targets" in md and "| tiny | 4 |" in md
    assert "| service-redis / rpc-ps | service-redis / rpc-ps-tcp |" in md
    assert "## Redis bytes per step" in md
    assert (out / "bench.png").stat().st_size > 10_000


def test_plan_covers_the_series_once() -> None:
    settings = suite.parse_args([])
    cells = suite.plan(settings)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    assert {"tiny/1", "tiny/4", "mlp/1", "mlp/4", "wide/1", "wide/4"} <= set(keys)
    assert size_workload(1_000) is MAIN["tiny"] and size_workload(10_000_000) is MAIN["wide"]
    assert {"size-10k/1", "size-100k/1", "size-1M/1", "params-1/1", "params-1000/1", "singles-1000/1"} <= set(keys)
    singles = next(c for c in cells if c.workload.singles)
    assert "torch-local" not in singles.systems
    mlp = MAIN["mlp"]
    assert len(mlp.params) == 8 and mlp.floats == 784 * 640 + 640 + 640 * 640 + 640 + 640 * 128 + 128 + 128 * 10 + 10
    assert params_workload(1000).floats == singles_workload(1000).floats == 100_000


def test_rotation_gives_each_system_each_position() -> None:
    systems = SYSTEMS
    firsts = {suite.rotated(systems, k)[0] for k in range(len(systems))}
    assert firsts == set(systems)
    assert sorted(suite.rotated(systems, 7)) == sorted(systems)


def _row(workload: str, workers: int, system: str, rate: float) -> dict[str, Any]:
    return {"workload": workload, "workers": workers, "system": system, "reps": 3, "steps_per_s": rate}


def test_targets_name_their_system_and_baseline() -> None:
    rows = [
        _row("tiny", 1, "rpc-ps", 1000.0),
        _row("tiny", 1, "rpc-ps-tcp", 500.0),
        _row("tiny", 1, "service-redis", 1200.0),
        _row("tiny", 1, "service-embedded", 900.0),
        _row("mlp", 1, "rpc-ps", 200.0),
        _row("mlp", 1, "rpc-ps-tcp", 100.0),
        _row("mlp", 1, "service-embedded", 60.0),
        _row("mlp", 4, "rpc-ps", 300.0),  # mlp-4 is against rpc-ps-tcp, which did not run
        _row("mlp", 4, "service-embedded", 60.0),
        _row("params-1000", 1, "service-redis", 10.0),
        _row("singles-1000", 1, "service-redis", 0.25),
    ]
    derived = report.derive(rows)
    targets = {t["id"]: t for t in derived["targets"]}
    assert list(targets) == [t.id for t in report.TARGETS] + ["batching"]
    assert list(targets)[:5] == ["tiny-1", "tiny-4", "mlp-1", "mlp-4", "wide-1"]
    assert targets["flush-mlp-1-embedded"]["baseline"] == "service-embedded"
    tiny = targets["tiny-1"]
    assert (tiny["system"], tiny["baseline"], tiny["workload"], tiny["workers"]) == (
        "service-embedded",
        "rpc-ps",
        "tiny",
        1,
    )
    assert tiny["measured"] == pytest.approx(0.9) and tiny["met"] is False and "stretch" not in tiny
    assert targets["mlp-1"]["baseline"] == "rpc-ps-tcp" and targets["mlp-1"]["measured"] == pytest.approx(0.6)
    assert targets["mlp-1"]["met"] is True and targets["mlp-1"]["stretch_met"] is False
    assert targets["mlp-4"]["measured"] is None and targets["mlp-4"]["met"] is None
    assert targets["wide-1"]["met"] is None
    assert targets["batching"]["system"] == "service-redis"
    assert targets["batching"]["measured"] == pytest.approx(40.0) and targets["batching"]["met"] is True
    # Every system against both RPC parameter servers, where they ran.
    ratios = {(r["workload"], r["workers"], r["system"], r["baseline"]): r["ratio"] for r in derived["ratios"]}
    assert ratios[("tiny", 1, "service-redis", "rpc-ps")] == pytest.approx(1.2)
    assert ratios[("tiny", 1, "service-redis", "rpc-ps-tcp")] == pytest.approx(2.4)
    assert ratios[("tiny", 1, "rpc-ps-tcp", "rpc-ps")] == pytest.approx(0.5)
    assert ("mlp", 4, "service-embedded", "rpc-ps-tcp") not in ratios
    # Targets are data: any system against any baseline on any main cell.
    custom = report.Target("x", "service-redis", "rpc-ps-tcp", "tiny", 1, needed=2.0, stretch=3.0)
    (t, _) = report.derive(rows, [custom])["targets"]
    assert t["measured"] == pytest.approx(2.4) and t["met"] is True and t["stretch_met"] is False


def test_redis_bytes_per_step() -> None:
    before = {"total_net_input_bytes": 1_000, "total_net_output_bytes": 500, "aof_enabled": 1, "aof_buffer_length": 0}
    after = before | {"total_net_input_bytes": 5_000, "total_net_output_bytes": 700}
    assert suite.redis_bytes(before, after, 8_000, 4) == (1_000.0, 50.0, 2_000.0)
    # bytes appended but not yet written to the files count too
    assert suite.redis_bytes(before, after | {"aof_buffer_length": 400}, 7_600, 4)[2] == 2_000.0
    assert suite.redis_bytes(before, after, None, 4) == (1_000.0, 50.0, None)
    off = after | {"aof_enabled": 0}
    assert suite.redis_bytes(before | {"aof_enabled": 0}, off, None, 1) == (4_000.0, 200.0, None)


def test_aof_meter_counts_across_rewrites(tmp_path: Path) -> None:
    """What Redis 7 does in a rewrite: a new incremental file, then the old one deleted."""
    old = tmp_path / "appendonly.aof.1.incr.aof"
    old.write_bytes(b"x" * 100)
    meter = AofMeter(tmp_path, poll=0.001).start()
    with old.open("ab") as f:
        f.write(b"x" * 10)
    new = tmp_path / "appendonly.aof.2.incr.aof"
    new.write_bytes(b"y" * 20)
    time.sleep(0.2)  # the meter sees the new file
    old.unlink()
    (tmp_path / "appendonly.aof.2.base.rdb").write_bytes(b"z" * 1_000)  # a rewrite's base: not appended
    with new.open("ab") as f:
        f.write(b"y" * 5)
    assert meter.stop() == 10 + 20 + 5
    # a file that came and went between two looks leaves a gap in the numbers: unknown
    meter = AofMeter(tmp_path, poll=60).start()
    (tmp_path / "appendonly.aof.4.incr.aof").write_bytes(b"w")
    assert meter.stop() is None


def test_a_worker_runs_only_the_rpc_system_whose_group_it_joined() -> None:
    agent = Agent(AgentConfig(index=0, service_urls={}, rpc_system="rpc-ps-tcp", rpc_port=1, rpc_world_size=2))
    agent.check_rpc("rpc-ps-tcp")
    agent.check_rpc("service-embedded")
    with pytest.raises(RuntimeError, match="joined the RPC group of rpc-ps-tcp"):
        agent.check_rpc("rpc-ps")


def test_profile_summary_drops_waits(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (m.py:1);step (momentum_service/engine.py:10);update (momentum_service/kernels/sgd.py:5) 30\n"
        "main (m.py:1);handle (starlette/routing.py:3) 10\n"
        "_bootstrap (threading.py:1);Condition.wait (threading.py:300) 60\n"
    )
    s = summarize(raw, seconds=1.0)
    assert s["samples"] == 40 and s["waiting_samples_dropped"] == 60
    areas = dict(s["areas"])
    assert areas["kernel (the momentum update)"] == pytest.approx(0.75)
    assert areas["FastAPI / Starlette"] == pytest.approx(0.25)
    assert s["busy"] == pytest.approx(40 / 200)


def test_profile_summary_reads_native_stacks(tmp_path: Path) -> None:
    loop = "main (m.py:1);Runner.run (asyncio/runners.py:118);uv_run (core.c:452)"
    raw = tmp_path / "p.txt"
    raw.write_text(
        f"{loop};uv__io_poll (linux.c:1452);epoll_pwait (libc.so.6) 50\n"
        f"{loop};uv__read (stream.c:1154);write (libc.so.6) 20\n"
        f"{loop};handle (starlette/routing.py:3);take_gil (ceval_gil.c:1) 5\n"
        f"{loop};handle (starlette/routing.py:3);sha256_block (libcrypto.so.3) 20\n"
    )
    s = summarize(raw, seconds=1.0)
    assert s["waiting"] == {"event loop idle (epoll)": 50, "waiting for the GIL": 5}
    assert dict(s["areas"]) == {
        "event loop: uvloop's C code (socket I/O, scheduling)": 0.5,
        "FastAPI / Starlette": 0.5,
    }
    assert dict(s["top_native"]) == {"write": 0.5, "sha256_block": 0.5}


@pytest.mark.slow
def test_the_scale_out_benchmarks_run(tmp_path: Path) -> None:
    """``bench.scaleout`` and ``bench.shards`` in small forms: every row measured, no speed thresholds."""
    out = tmp_path / "scaleout.json"
    cmd = [sys.executable, "-m", "bench.scaleout", "--replicas", "1,2", "--seconds", "1", "--workers", "4"]
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["replicas"], r["follow_owner"]) for r in rows] == [(1, True), (2, True), (2, False), (2, True)]
    assert rows[-1]["durability"] == {"replicas": 1}
    assert all(r["steps_per_s"] > 0 and len(r["cpu_per_replica"]) == r["replicas"] for r in rows)
    assert "| replicas | durability |" in proc.stdout
    cmd = [sys.executable, "-m", "bench.shards", "--shards", "1,2", "--size", "1000", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| 2 |" in proc.stdout
