"""The momentum experiments in examples/, in tiny settings, and the claim each one illustrates.

Every optimizer step runs on a real server process (``ServerProcess``, embedded store); the
examples only compute gradients. Pictures and tables go to pytest's ``tmp_path``. The examples
need the ``examples`` extra (scikit-learn, matplotlib, tqdm); without it these tests are skipped.
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import momentum_client as mc
import numpy as np
import pytest

from .helpers import ROOT, ServerProcess

EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[mc.Client]:
    with mc.Client(server.url) as c:
        yield c


def _import_example(name: str, *requirements: str) -> ModuleType:
    for requirement in requirements:
        pytest.importorskip(requirement, reason=f"examples/{name}.py needs the examples extra")
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the scripts import their sibling _common, as when run directly
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def ravine() -> ModuleType:
    return _import_example("ravine", "matplotlib")


@pytest.fixture(scope="module")
def sweep() -> ModuleType:
    return _import_example("momentum_sweep", "matplotlib", "sklearn", "tqdm")


def _name(what: str) -> str:
    return f"t-{what}-{uuid.uuid4().hex[:8]}"


def _local_heavy_ball(
    grad: Callable[[np.ndarray], np.ndarray], start: np.ndarray, lr: float, momentum: float, steps: int
) -> np.ndarray:
    """The same recurrence as the service, x_{k+1} = x_k - lr*g_k + m*(x_k - x_{k-1}), in numpy."""
    points = [start]
    prev = p = start
    for _ in range(steps):
        p, prev = p - lr * grad(p) + momentum * (p - prev), p
        points.append(p)
    return np.stack(points)


# --- ravine ------------------------------------------------------------------------------------


def test_ravine_momentum_reaches_the_threshold_in_fewer_steps(ravine: ModuleType, client: mc.Client) -> None:
    q = ravine.Quadratic(mu=1.0, L=100.0)
    lr, steps, threshold = 1.9 / q.L, 250, 1e-3
    start = np.array([-10.0, 1.0])
    f0 = q.loss(start)
    reached: dict[float, int] = {}
    for momentum in (0.0, 0.9):
        model = _name(f"ravine-m{momentum:g}")
        points = ravine.run_trajectory(client, model, q, start, lr=lr, momentum=momentum, steps=steps)
        state = client.get_param_state(model, "xy")
        # Every one of those points came from the server: it counted each step, kept the velocity.
        assert state.step == steps
        assert (state.velocity is None) == (momentum == 0.0)
        np.testing.assert_array_equal(state.value, points[-1])
        np.testing.assert_allclose(points, _local_heavy_ball(q.grad, start, lr, momentum, steps), rtol=1e-9, atol=1e-12)
        hit = ravine._common.steps_to_threshold(list(q.losses(points) / f0), threshold)
        assert hit is not None, f"momentum {momentum} did not reach {threshold} in {steps} steps"
        reached[momentum] = hit
        client.delete_model(model)
    # Theory: GD contracts by 1 - lr*mu = 0.981 per step, momentum 0.9 by sqrt(0.9) = 0.949.
    assert reached[0.9] < 0.6 * reached[0.0], reached


def test_optimal_heavy_ball_converges_at_the_theoretical_rate(ravine: ModuleType, client: mc.Client) -> None:
    kappa = 100.0
    q = ravine.Quadratic(mu=1.0, L=kappa)
    lr, momentum = ravine.optimal_heavy_ball(q)
    assert lr == pytest.approx(4 / (math.sqrt(q.L) + math.sqrt(q.mu)) ** 2)
    assert momentum == pytest.approx(((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2)
    theory = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)  # 9/11
    assert ravine.heavy_ball_rate(q, lr, momentum) == pytest.approx(theory, rel=1e-6)

    model = _name("ravine-hb")
    start = np.array([-10.0, 1.0])  # components along both eigen-directions
    points = ravine.run_trajectory(client, model, q, start, lr=lr, momentum=momentum, steps=400)
    assert client.get_param_state(model, "xy").step == 400
    client.delete_model(model)
    # A double eigenvalue: the error behaves like k * rho^k, so measure over a long window.
    measured = ravine.measured_rate(points, 100, 400)
    assert measured == pytest.approx(theory, rel=0.10)
    assert abs(measured / theory - 1) < 0.02  # in fact much closer: the k factor adds (400/100)^(1/300)
    # ... and far below what gradient descent can do on the same problem, (kappa-1)/(kappa+1).
    assert measured < 0.9 * (kappa - 1) / (kappa + 1)


def test_ravine_script_runs_end_to_end_with_its_own_server(ravine: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "ravine.png"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ravine.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert out.stat().st_size > 20_000
    runs = [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert runs == [
        "| gradient descent (m = 0)",
        "| momentum 0.9, same lr",
        "| heavy ball, optimal (lr=0.0331, m=0.6694)",
    ]
    assert "server up on http://127.0.0.1:" in result.stderr


# --- momentum sweep ----------------------------------------------------------------------------


def _parse_table(text: str) -> dict[float, list[str]]:
    rows = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    return {float(cells[0]): cells for cells in rows[1:]}


def test_momentum_sweep_quick(sweep: ModuleType, server: ServerProcess, client: mc.Client, tmp_path: Path) -> None:
    prefix = _name("sweep")
    argv = ["--quick", "--url", server.url, "--out-dir", str(tmp_path), "--prefix", prefix, "--keep-models"]
    assert sweep.main([*argv, "--no-progress"]) == 0

    png, md = tmp_path / "momentum_sweep.png", tmp_path / "momentum_sweep.md"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_size > 20_000
    table = _parse_table(md.read_text())
    assert sorted(table) == sorted(sweep.MOMENTA)

    steps = sweep.QUICK["steps"]
    for momentum, cells in table.items():
        model = sweep.model_name(prefix, momentum)
        for name in sweep.PARAM_NAMES:
            state = client.get_param_state(model, name)
            assert state.step == steps, (model, name)
            assert (state.velocity is None) == (momentum == 0.0), (model, name)
        assert int(cells[4]) == steps
        client.delete_model(model)

    final_loss = {m: float(cells[1]) for m, cells in table.items()}
    test_accuracy = {m: float(cells[2]) for m, cells in table.items()}
    assert all(math.isfinite(v) for v in final_loss.values())
    assert test_accuracy[0.9] > 0.5  # chance is 0.1
    assert test_accuracy[0.5] > 0.5
    # At the same lr and step budget, momentum 0.9 gets much further than plain SGD.
    assert final_loss[0.9] < 0.5 * final_loss[0.0], final_loss


@pytest.mark.parametrize(("mode", "workers"), [("sync", 3), ("bounded", 3), ("async", 3)])
def test_momentum_sweep_modes_and_staleness(
    sweep: ModuleType, server: ServerProcess, client: mc.Client, tmp_path: Path, mode: str, workers: int
) -> None:
    """Sync steps are the mean of one push per worker (staleness 0); async workers see stale steps."""
    prefix = _name(f"sweep-{mode}")
    argv = ["--url", server.url, "--out-dir", str(tmp_path), "--prefix", prefix, "--no-progress", "--keep-models"]
    # Two models: the workers, spawned for the first, run the second's pushes side by side (the async
    # case needs them to overlap, which a fast server and a slow process start could prevent).
    steps = 30 if mode == "sync" else 300
    argv += ["--steps", str(steps), "--workers", str(workers), "--momenta", "0.5", "0.9", "--mode", mode]
    assert sweep.main(argv) == 0
    cells = _parse_table((tmp_path / "momentum_sweep.md").read_text())[0.9]
    assert int(cells[4]) == steps  # server steps, whatever the mode
    staleness = float(cells[5])
    info = client.get_model(sweep.model_name(prefix, 0.9))
    assert info.mode == mode
    if mode == "sync":
        assert staleness == 0.0 and info.workers == workers
    elif mode == "bounded":
        assert staleness <= 1.0  # the limit: a push more than 1 step stale was refused and recomputed
    else:
        assert staleness > 0.0
    for momentum in (0.5, 0.9):
        client.delete_model(sweep.model_name(prefix, momentum))


def test_an_example_run_writes_no_tracked_file(tmp_path: Path) -> None:
    """Without --out-dir, outputs go to build/examples/ under the working directory (git-ignored)."""
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ravine.py"), "--quick"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert (ROOT / "build" / "examples" / "ravine.png").read_bytes().startswith(PNG_MAGIC)
    after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    assert after == before
