"""The benchmark suite (bench/): a --quick smoke run on the tiny workload, and its pure parts.

No speed thresholds here: the smoke run checks that every system ran and reported sane numbers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report, suite
from bench.profiling import summarize
from bench.workloads import MAIN, params_workload, singles_workload, size_workload

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("torch-local", "rpc-ps", "service-redis", "service-embedded")


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
    assert {r["workload"] for r in result["results"]} == {"tiny"}


def test_quick_run_records_the_setup(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, out = quick_run
    assert result["redis"]["config"]["appendonly"] == "yes"
    assert result["redis"]["config"]["appendfsync"] == "everysec"
    assert result["machine"]["cores"] >= 1
    assert result["versions"]["torch"]
    assert result["rpc"]["backend"] == "TensorPipe"
    assert result["service"]["wire"]["tiny"]["request_content_type"]
    # Interleaving: each repetition ran every system once, in rotating order.
    for rep in range(2):
        recs = [r for r in result["records"] if r["rep"] == rep and r["workload"] == "tiny" and r["workers"] == 1]
        assert sorted(r["system"] for r in recs) == sorted(SYSTEMS)
    first = [r["system"] for r in result["records"] if r["workers"] == 1 and r["order"] == 0]
    assert len(set(first)) == 2
    targets = {t["id"]: t for t in result["targets"]}
    assert targets["tiny-1"]["met"] in (True, False)
    assert targets["mlp-1"]["met"] is None  # not measured in this run
    md = (out / "latest.md").read_text()
    assert "## Targets" in md and "| tiny | 4 |" in md
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
    firsts = {suite.rotated(systems, k)[0] for k in range(4)}
    assert firsts == set(systems)
    assert sorted(suite.rotated(systems, 7)) == sorted(systems)


def _row(workload: str, workers: int, system: str, rate: float) -> dict[str, Any]:
    return {"workload": workload, "workers": workers, "system": system, "reps": 3, "steps_per_s": rate}


def test_targets_are_ratios_to_rpc_ps() -> None:
    rows = [
        _row("tiny", 1, "rpc-ps", 1000.0),
        _row("tiny", 1, "service-redis", 1200.0),
        _row("mlp", 1, "rpc-ps", 100.0),
        _row("mlp", 1, "service-redis", 60.0),
        _row("params-1000", 1, "service-redis", 10.0),
        _row("singles-1000", 1, "service-redis", 0.25),
    ]
    derived = report.derive(rows)
    targets = {t["id"]: t for t in derived["targets"]}
    assert targets["tiny-1"]["measured"] == pytest.approx(1.2) and targets["tiny-1"]["met"] is True
    assert targets["mlp-1"]["met"] is True and targets["mlp-1"]["stretch_met"] is False
    assert targets["wide-1"]["met"] is None
    assert targets["batching"]["measured"] == pytest.approx(40.0) and targets["batching"]["met"] is True


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
