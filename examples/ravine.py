"""Ravine: gradient descent vs momentum on an ill-conditioned 2-D quadratic, every step computed by the service.

f(x, y) = 0.5 * (mu * x**2 + L * y**2), condition number kappa = L / mu. The client computes the
gradient (mu*x, L*y) and sends it; the server applies torch.optim.SGD's rule (b = m*b + g,
p -= lr*b, which is the heavy-ball method with alpha = lr, beta = momentum) and returns the new
point. One model per trajectory, the parameter is the point as a float64 2-vector.

Three trajectories from the same start:
  * gradient descent (momentum 0) at a learning rate close to the stability limit 2/L,
  * momentum 0.9 at the same learning rate,
  * heavy ball at its optimal setting, lr = 4/(sqrt(L)+sqrt(mu))^2 and
    momentum = ((sqrt(kappa)-1)/(sqrt(kappa)+1))^2, which contracts the error by
    (sqrt(kappa)-1)/(sqrt(kappa)+1) per step instead of gradient descent's ~(kappa-1)/(kappa+1).

Run ``python examples/ravine.py`` (``--help`` for the options).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import momentum_client as mc
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

Vector = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Quadratic:
    """f(x, y) = 0.5 * (mu * x**2 + L * y**2), minimum 0 at the origin."""

    mu: float = 1.0
    L: float = 100.0

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    def loss(self, p: Vector) -> float:
        return 0.5 * (self.mu * float(p[0]) ** 2 + self.L * float(p[1]) ** 2)

    def losses(self, points: Vector) -> Vector:
        """The loss at each row of an (n, 2) array."""
        result: Vector = 0.5 * (self.mu * points[:, 0] ** 2 + self.L * points[:, 1] ** 2)
        return result

    def grad(self, p: Vector) -> Vector:
        return np.array([self.mu * p[0], self.L * p[1]], dtype=np.float64)


def optimal_heavy_ball(q: Quadratic) -> tuple[float, float]:
    """Polyak's optimal heavy-ball (lr, momentum) for eigenvalues in [mu, L]."""
    lr = 4.0 / (math.sqrt(q.L) + math.sqrt(q.mu)) ** 2
    sk = math.sqrt(q.kappa)
    return lr, ((sk - 1.0) / (sk + 1.0)) ** 2


def heavy_ball_rate(q: Quadratic, lr: float, momentum: float) -> float:
    """The asymptotic per-step contraction of the error: the spectral radius of the heavy-ball iteration.

    Along an eigen-direction with eigenvalue h the error follows e' = (1 + m - lr*h) e - m e_prev,
    whose companion matrix has the roots of z^2 - (1 + m - lr*h) z + m.
    """
    radius = 0.0
    for h in (q.mu, q.L):
        roots = np.roots([1.0, -(1.0 + momentum - lr * h), momentum])
        radius = max(radius, float(np.max(np.abs(roots))))
    return radius


def measured_rate(trajectory: Vector, start: int, stop: int) -> float:
    """The geometric mean per-step contraction of the distance to the optimum over steps start..stop."""
    d0 = float(np.linalg.norm(trajectory[start]))
    d1 = float(np.linalg.norm(trajectory[stop]))
    rate: float = (d1 / d0) ** (1.0 / (stop - start))
    return rate


def run_trajectory(
    client: mc.Client, model: str, q: Quadratic, start: Sequence[float], *, lr: float, momentum: float, steps: int
) -> Vector:
    """``steps`` steps of the service's SGD on ``q`` from ``start``; returns the (steps + 1, 2) points."""
    client.create_model(model, lr=lr, momentum=momentum)
    p = np.asarray(start, dtype=np.float64)
    client.init_params(model, {"xy": p})  # exist_ok=False: a fresh parameter (step 0, no velocity)
    points = [p]
    for _ in range(steps):
        p = np.asarray(client.step(model, {"xy": q.grad(p)})["xy"], dtype=np.float64)
        points.append(p)
    return np.stack(points)


@dataclass(frozen=True)
class Run:
    label: str
    model: str
    lr: float
    momentum: float
    points: Vector
    losses: Vector
    rate_theory: float


def plot(q: Quadratic, runs: Sequence[Run], threshold: float, path: Path) -> None:
    """Left: the trajectories over the loss contours. Right: loss vs step, semilog."""
    fig = Figure(figsize=(11.5, 4.6), dpi=100, layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.35, 1.0])
    shown = 120
    x0, y0 = runs[0].points[0]
    y_extent = max(float(np.max(np.abs(run.points[: shown + 1, 1]))) for run in runs)
    xs = np.linspace(-1.25 * abs(x0), 1.25 * abs(x0), 400)
    ys = np.linspace(-1.1 * y_extent, 1.1 * y_extent, 300)
    gx, gy = np.meshgrid(xs, ys)
    f = 0.5 * (q.mu * gx**2 + q.L * gy**2)
    f0 = q.loss(runs[0].points[0])
    levels = np.geomspace(1e-3 * f0, float(f.max()), 16)
    ax.contourf(gx, gy, f, levels=levels, cmap="Greys", alpha=0.35, extend="min")
    ax.contour(gx, gy, f, levels=levels, colors="0.55", linewidths=0.5)
    colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange"]
    for run, color in zip(runs, colors, strict=False):
        pts = run.points[: shown + 1]
        ax.plot(pts[:, 0], pts[:, 1], "-o", color=color, lw=1.1, ms=2.2, label=run.label)
    ax.plot([x0], [y0], "k*", ms=11, zorder=5)
    ax.annotate("start", (x0, y0), textcoords="offset points", xytext=(6, 6))
    ax.plot([0], [0], "kx", ms=9, mew=2, zorder=5)
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.set_xlabel(f"x  (small curvature μ = {q.mu:g})")
    ax.set_ylabel(f"y  (large curvature L = {q.L:g})")
    ax.set_title(f"f = ½(μx² + Ly²), κ = {q.kappa:g}: the first {shown} steps")
    ax.legend(loc="upper right", fontsize=8.5, framealpha=0.9)

    top = 3.0
    for run, color in zip(runs, colors, strict=False):
        rel = np.maximum(run.losses / f0, 1e-300)
        top = max(top, 2.0 * float(rel.max()))
        ax2.semilogy(np.arange(len(rel)), rel, color=color, lw=1.4, label=run.label)
    ax2.axhline(threshold, color="0.3", ls=":", lw=1)
    ax2.annotate(f"threshold {threshold:g}", (0, threshold), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax2.set_ylim(max(threshold * 1e-6, 1e-16), top)
    ax2.set_xlim(0, len(runs[0].losses) - 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("f(x_k) / f(x_0)")
    ax2.set_title("loss vs step")
    ax2.grid(True, which="major", alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8.5)
    fig.savefig(path, pil_kwargs={"optimize": True})


def main(argv: Sequence[str] | None = None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0] if __doc__ else "ravine", default_prefix="ravine")
    p.add_argument("--kappa", type=float, default=100.0, help="condition number L/mu, mu = 1 (default 100)")
    p.add_argument("--steps", type=int, help="steps per trajectory (default 400, 150 with --quick)")
    p.add_argument("--lr", type=float, help="learning rate of the GD and momentum-0.9 runs (default 1.9/L)")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of the second trajectory (default 0.9)")
    p.add_argument(
        "--start", type=float, nargs=2, default=(-10.0, 1.0), metavar=("X", "Y"), help="start point (default -10 1)"
    )
    p.add_argument(
        "--threshold", type=float, default=1e-6, help="loss threshold, relative to the start's loss (default 1e-6)"
    )
    p.add_argument("--out", type=Path, help="PNG path (default OUT_DIR/ravine.png)")
    args = p.parse_args(argv)

    q = Quadratic(mu=1.0, L=args.kappa)
    steps: int = args.steps or (150 if args.quick else 400)
    lr: float = args.lr if args.lr is not None else 1.9 / q.L
    hb_lr, hb_m = optimal_heavy_ball(q)
    settings = [
        ("gradient descent (m = 0)", "gd", lr, 0.0),
        (f"momentum {args.momentum:g}, same lr", f"m{args.momentum:g}", lr, args.momentum),
        (f"heavy ball, optimal (lr={hb_lr:.4f}, m={hb_m:.4f})", "hb-opt", hb_lr, hb_m),
    ]
    out = args.out or _common.out_dir(args) / "ravine.png"
    t0 = time.perf_counter()
    runs: list[Run] = []
    with _common.service(args.url) as url, mc.Client(url) as client:
        for label, suffix, run_lr, m in settings:
            model = f"{args.prefix}-{suffix}"
            points = run_trajectory(client, model, q, args.start, lr=run_lr, momentum=m, steps=steps)
            runs.append(Run(label, model, run_lr, m, points, q.losses(points), heavy_ball_rate(q, run_lr, m)))
        if not args.keep_models:
            for run in runs:
                client.delete_model(run.model)
    elapsed = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(q, runs, args.threshold, out)

    f0 = q.loss(runs[0].points[0])
    window = (steps // 4, steps)
    rows: list[list[Any]] = []
    for run in runs:
        hit = _common.steps_to_threshold(list(run.losses / f0), args.threshold)
        rows.append(
            [
                run.label,
                f"{run.lr:.4g}",
                f"{run.momentum:.4g}",
                "not reached" if hit is None else str(hit),
                f"{run.losses[-1] / f0:.3g}",
                f"{measured_rate(run.points, *window):.4f}",
                f"{run.rate_theory:.4f}",
            ]
        )
    header = ["run", "lr", "momentum", f"steps to f/f0 <= {args.threshold:g}", f"f/f0 at step {steps}"]
    header += [f"rate, steps {window[0]}..{window[1]}", "rate, theory"]
    print(f"kappa = {q.kappa:g}, start = {tuple(args.start)}, {steps} steps per run\n")
    print(_common.markdown_table(header, rows))
    print(f"{len(runs) * steps} service steps in {elapsed:.1f} s; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
