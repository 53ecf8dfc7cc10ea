"""The picture: steps/s per workload and system, and the two scaling series (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from .report import SYSTEM_ORDER, index
from .workloads import MAIN, PARAM_SERIES, SIZE_SERIES, params_workload, size_workload

COLORS = {
    "torch-local": "#7f7f7f",
    "rpc-ps": "#1f77b4",
    "rpc-ps-tcp": "#17becf",
    "service-redis": "#d62728",
    "service-redis-flush": "#9467bd",
    "service-embedded": "#ff7f0e",
}
MARKERS = {
    "torch-local": "s",
    "rpc-ps": "o",
    "rpc-ps-tcp": "D",
    "service-redis": "^",
    "service-redis-flush": "P",
    "service-embedded": "v",
}


def plot(result: dict[str, Any], path: Path) -> None:
    idx = index(result["results"])
    systems = [s for s in SYSTEM_ORDER if s in result["systems"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), layout="constrained")
    ax = axes[0]
    cells = sorted({(w, n) for (w, n, _) in idx if w in MAIN}, key=lambda k: (list(MAIN).index(k[0]), k[1]))
    width = 0.8 / max(1, len(systems))
    # Service bars are labelled with their ratio to the fair peer, rpc-ps-tcp (to rpc-ps if it did not run).
    baseline = next((b for b in ("rpc-ps-tcp", "rpc-ps") if b in systems), None)
    for j, system in enumerate(systems):
        bars = []
        for i, (w, n) in enumerate(cells):
            r = idx.get((w, n, system))
            if r and r.get("reps"):
                bars.append((i + (j - (len(systems) - 1) / 2) * width, r["steps_per_s"], w, n))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], width, label=system, color=COLORS.get(system))
        if system.startswith("service-") and baseline is not None:
            for x, y, w, n in bars:
                base = idx.get((w, n, baseline))
                if base and base.get("reps"):
                    ax.annotate(
                        f"{y / base['steps_per_s']:.2f}x",
                        (x, y),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=6,
                        rotation=90,
                        color=COLORS.get(system),
                    )
    ax.set_xticks(range(len(cells)), [f"{w}\n{n} worker{'s' if n > 1 else ''}" for w, n in cells])
    ax.set_yscale("log")
    ax.set_ylabel("steps/s (aggregate, log scale)")
    ax.set_title("Throughput per workload" + (f" (labels: ratio to {baseline})" if baseline else ""))
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _series(axes[1], idx, systems, [(n, size_workload(n).name) for n in SIZE_SERIES], "floats in the one parameter")
    axes[1].set_title("Step time vs tensor size (1 worker)")
    _series(
        axes[2],
        idx,
        systems,
        [(n, params_workload(n).name) for n in PARAM_SERIES],
        "parameters of 100 floats, one request",
    )
    axes[2].set_title("Step time vs parameters per request (1 worker)")
    s = result["settings"]
    fig.suptitle(
        f"momentum-service vs torch.optim.SGD locally and a PyTorch RPC parameter server (shared memory, TCP) "
        f"(medians of {s['reps']}, {result['machine']['cores']} cores, {result['created'][:10]})",
        fontsize="medium",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(ax: Any, idx: Any, systems: list[str], points: list[tuple[int, str]], xlabel: str) -> None:
    for system in systems:
        xs, ys = [], []
        for n, name in points:
            r = idx.get((name, 1, system))
            if r and r.get("reps"):
                xs.append(n)
                ys.append(r["p50_ms"])
        if xs:
            ax.plot(xs, ys, marker=MARKERS.get(system), color=COLORS.get(system), label=system)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("p50 ms per step (log scale)")
    ax.grid(which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
