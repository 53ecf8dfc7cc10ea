"""Momentum sweep: data-parallel asynchronous workers train a small MLP on scikit-learn's digits through the service.

For each momentum value the script creates one model on the server (same learning rate, same
initial weights) and starts several worker processes. Each worker owns one shard of the
training set, computes minibatch gradients of a one-hidden-layer MLP (64-32-10, tanh, softmax
cross-entropy) in numpy, pushes them with ``step`` and carries on from the parameters the
server returns, without waiting for the other workers (asynchronous SGD). After every step
the worker records the training loss (whole training set) at the parameters it got back, and
reports it with its next push, whose gradient it computes from them (``metrics={"loss": ...}``):
the server keeps it as the model's training metrics, which ``/dashboard`` draws live.

Outputs: a PNG of the loss curves and of the final test accuracy per momentum, and a Markdown
table (momentum, final loss, test accuracy, steps to reach a loss threshold), printed and
written to a .md file. Run ``python examples/momentum_sweep.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import momentum_client as mc
import numpy as np
import numpy.typing as npt
from tqdm import tqdm  # type: ignore[import-untyped]

MOMENTA = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
PARAM_NAMES = ("w1", "b1", "w2", "b2")

F32 = npt.NDArray[np.float32]
Array = npt.NDArray[np.floating[Any]]
Labels = npt.NDArray[np.int64]
Params = Mapping[str, Array]


@dataclass(frozen=True)
class Config:
    """One sweep's settings. ``steps`` is the number of optimizer steps per model, shared by the workers."""

    momenta: tuple[float, ...] = MOMENTA
    steps: int = 1200
    workers: int = 3
    batch_size: int = 32
    lr: float = 0.1
    hidden: int = 32
    seed: int = 0
    threshold: float = 0.1
    prefix: str = "sweep"
    mode: str = "async"
    max_staleness: int = 1

    def model(self, momentum: float) -> str:
        return model_name(self.prefix, momentum)

    def worker_steps(self) -> list[int]:
        """How many steps each worker pushes: ``steps`` split as evenly as possible (async, bounded),
        or ``steps`` each (sync: every server step is the mean of one push per worker)."""
        if self.mode == "sync":
            return [self.steps] * self.workers
        base, extra = divmod(self.steps, self.workers)
        return [base + (i < extra) for i in range(self.workers)]

    def mode_fields(self) -> dict[str, Any]:
        """The ``create_model`` arguments of the mode."""
        if self.mode == "sync":
            return {"mode": "sync", "workers": self.workers}
        if self.mode == "bounded":
            return {"mode": "bounded", "max_staleness": self.max_staleness}
        return {}


QUICK = {"steps": 60, "workers": 2}
"""What ``--quick`` changes."""


def model_name(prefix: str, momentum: float) -> str:
    """The server-side model name for one momentum value, e.g. ``sweep-m0.9``."""
    return f"{prefix}-m{momentum:g}"


# --- data and model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    x_train: F32
    y_train: Labels
    x_test: F32
    y_test: Labels


def load_data(seed: int) -> Data:
    """Digits (1797 8x8 images, 10 classes), a stratified 75/25 split, standardized with the training statistics."""
    # scikit-learn and matplotlib are imported where they are used: the worker processes import this
    # module again (multiprocessing's spawn) and need neither.
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64)
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    return Data(
        ((x_tr - mean) / std).astype(np.float32),
        np.asarray(y_tr, dtype=np.int64),
        ((x_te - mean) / std).astype(np.float32),
        np.asarray(y_te, dtype=np.int64),
    )


def init_params(n_in: int, hidden: int, n_out: int, seed: int) -> dict[str, F32]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32),
        "b2": np.zeros(n_out, np.float32),
    }


def _forward(params: Params, x: F32) -> tuple[Array, Array]:
    """Hidden activations and log-probabilities."""
    h = np.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return h, logp


def loss(params: Params, x: F32, y: Labels) -> float:
    """Mean softmax cross-entropy."""
    _, logp = _forward(params, x)
    return float(-logp[np.arange(len(y)), y].mean())


def accuracy(params: Params, x: F32, y: Labels) -> float:
    _, logp = _forward(params, x)
    return float((logp.argmax(axis=1) == y).mean())


def gradients(params: Params, x: F32, y: Labels) -> dict[str, F32]:
    """The gradient of :func:`loss` with respect to each parameter (backpropagation, in numpy)."""
    h, logp = _forward(params, x)
    d_logits = np.exp(logp)
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits /= len(y)
    d_h = (d_logits @ params["w2"].T) * (1.0 - h**2)
    grads = {"w1": x.T @ d_h, "b1": d_h.sum(axis=0), "w2": h.T @ d_logits, "b2": d_logits.sum(axis=0)}
    return {name: np.ascontiguousarray(g, dtype=np.float32) for name, g in grads.items()}


# --- the workers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerTask:
    url: str
    model: str
    worker: int
    steps: int
    batch_size: int
    seed: int
    x_shard: F32
    y_shard: Labels
    x_train: F32  # the whole training set, only to record the loss after each step
    y_train: Labels
    mode: str = "async"


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker saw after one push: when, the server step, the training loss, the push's staleness."""

    time: float
    step: int
    loss: float
    staleness: int


_progress: Any = None  # the worker processes' end of the progress queue


def _init_worker(progress: Any) -> None:
    global _progress
    _progress = progress


def train_worker(task: WorkerTask) -> list[WorkerRecord]:
    """Push ``task.steps`` minibatch gradients from this worker's shard; returns what it saw after each push.

    The minibatches are epochs of a seeded permutation of the shard. The worker always continues
    from the values the server returns, which include the other workers' updates. Each push says
    which step its gradient was computed from (``base_step``), so the server reports its staleness:
    the updates other workers applied in between. In sync mode the push is this worker's share of
    that step; in bounded mode a push that is too stale is refused, and the worker reads the
    current values and computes its gradient again.
    """
    rng = np.random.default_rng([task.seed, task.worker])
    n = len(task.y_shard)
    order = rng.permutation(n)
    pos = 0
    records: list[WorkerRecord] = []
    with mc.Client(task.url) as client:
        params: Params = client.get_params(task.model)
        base = min(p.step for p in client.get_model(task.model).params.values())
        current = loss(params, task.x_train, task.y_train)  # the training loss at ``params``, sent with the push
        i = 0
        while i < task.steps:
            if pos + task.batch_size > n:
                order, pos = rng.permutation(n), 0
            batch = order[pos : pos + task.batch_size]
            grads = gradients(params, task.x_shard[batch], task.y_shard[batch])
            if not all(np.isfinite(g).all() for g in grads.values()):
                raise FloatingPointError(f"{task.model}: non-finite gradient at worker {task.worker}, step {i}")
            worker_id = task.worker if task.mode == "sync" else None
            try:
                results = client.step_results(
                    task.model, grads, base_step=base, worker_id=worker_id, metrics={"loss": current}
                )
            except mc.Conflict as exc:
                if exc.code != "stale-gradient" or task.mode != "bounded":
                    raise
                params = client.get_params(task.model)  # too stale: start again from the current values
                base = min(exc.current_steps.values())
                current = loss(params, task.x_train, task.y_train)
                continue
            pos += task.batch_size
            params = {name: r.value for name, r in results.items() if r.value is not None}
            base = results["w1"].step
            staleness = results["w1"].staleness or 0
            current = loss(params, task.x_train, task.y_train)
            records.append(WorkerRecord(time.monotonic(), base, current, staleness))
            i += 1
            if _progress is not None and (i % 10 == 0 or i == task.steps):
                _progress.put((task.model, i % 10 or 10))
    return records


# --- the sweep ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    momentum: float
    model: str
    losses: list[float]  # training loss after each server step, index 0 = the initial parameters
    final_loss: float
    test_accuracy: float
    server_steps: int
    steps_to_threshold: int | None
    mean_staleness: float = 0.0


def run_sweep(url: str, cfg: Config, *, progress: bool = True) -> list[Result]:
    """Train one model per momentum value through the server at ``url``."""
    data = load_data(cfg.seed)
    start = init_params(data.x_train.shape[1], cfg.hidden, 10, cfg.seed)
    shards = np.array_split(np.random.default_rng(cfg.seed).permutation(len(data.y_train)), cfg.workers)
    shard_data = [(data.x_train[s], data.y_train[s]) for s in shards]
    initial_loss = loss(start, data.x_train, data.y_train)
    ctx = mp.get_context("spawn")
    ticks: Any = ctx.Queue()
    results: list[Result] = []
    with (
        _single_threaded_blas(),
        mc.Client(url) as client,
        cf.ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(ticks,)) as pool,
        tqdm(
            total=len(cfg.momenta) * sum(cfg.worker_steps()), unit="push", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        for momentum in cfg.momenta:
            model = cfg.model(momentum)
            bar.set_description(f"momentum {momentum:<4g}")
            client.replace_model(model, lr=cfg.lr, momentum=momentum, **cfg.mode_fields())
            client.init_params(model, start)  # exist_ok=False: step 0 and no velocity, also on a rerun
            tasks = [
                WorkerTask(url, model, w, n, cfg.batch_size, cfg.seed, *shard, data.x_train, data.y_train, cfg.mode)
                for w, (shard, n) in enumerate(zip(shard_data, cfg.worker_steps(), strict=True))
            ]
            futures = [pool.submit(train_worker, task) for task in tasks]
            shown = 0
            while True:
                done, _ = cf.wait(futures, timeout=0.1)
                shown += _drain(ticks, model, bar)
                if len(done) == len(futures):
                    break
            bar.update(sum(cfg.worker_steps()) - shown)  # ticks in flight; late ones carry this model's name
            per_worker = [f.result() for f in futures]
            # One record per server step: in sync mode every worker saw the same step, keep worker 0's.
            records = sorted(per_worker[0] if cfg.mode == "sync" else [r for rs in per_worker for r in rs], key=_when)
            final = client.get_params(model)
            server_steps = min(p.step for p in client.get_model(model).params.values())
            losses = [initial_loss, *(r.loss for r in records)]
            pushes = [r for rs in per_worker for r in rs]
            results.append(
                Result(
                    momentum,
                    model,
                    losses,
                    loss(final, data.x_train, data.y_train),
                    accuracy(final, data.x_test, data.y_test),
                    server_steps,
                    _common.steps_to_threshold(losses, cfg.threshold),
                    float(np.mean([r.staleness for r in pushes])),
                )
            )
    return results


def _when(record: WorkerRecord) -> float:
    return record.time


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """One BLAS thread in the worker processes started inside the block (they inherit the environment).

    Several workers (and the server) share the machine's cores; a BLAS thread pool in each of them
    oversubscribes the cores: here (2 cores) that made the full sweep five times slower.
    """
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _drain(ticks: Any, model: str, bar: Any) -> int:
    count = 0
    while True:
        try:
            name, n = ticks.get_nowait()
        except queue_module.Empty:
            return count
        if name == model:
            bar.update(n)
            count += n


# --- outputs -----------------------------------------------------------------------------------


def table(results: Sequence[Result], cfg: Config) -> str:
    header = [
        "momentum",
        "final train loss",
        "test accuracy",
        f"steps to loss <= {cfg.threshold:g}",
        "server steps",
        "mean staleness",
    ]
    rows = [
        [
            f"{r.momentum:g}",
            f"{r.final_loss:.4f}",
            f"{r.test_accuracy:.3f}",
            "not reached" if r.steps_to_threshold is None else str(r.steps_to_threshold),
            str(r.server_steps),
            f"{r.mean_staleness:.2f}",
        ]
        for r in results
    ]
    return _common.markdown_table(header, rows)


def plot(results: Sequence[Result], cfg: Config, path: Path) -> None:
    """Left: training loss vs server step per momentum (log y). Right: final test accuracy per momentum."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 4.6), dpi=100, layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[2.3, 1.0])
    viridis = mpl.colormaps["viridis"]
    colors = [viridis(0.9 * i / max(len(results) - 1, 1)) for i in range(len(results))]
    for r, color in zip(results, colors, strict=True):
        ax.semilogy(np.arange(len(r.losses)), r.losses, color=color, lw=1.3, label=f"m = {r.momentum:g}")
    ax.axhline(cfg.threshold, color="0.3", ls=":", lw=1)
    ax.annotate(
        f"threshold {cfg.threshold:g}",
        (cfg.steps, cfg.threshold),
        ha="right",
        textcoords="offset points",
        xytext=(-4, 3),
        fontsize=8,
    )
    ax.set_xlim(0, cfg.steps)
    ax.set_xlabel("server step (all workers)")
    ax.set_ylabel("training loss (cross-entropy, whole training set)")
    ax.set_title(
        f"digits, MLP 64-{cfg.hidden}-10, {cfg.workers} {cfg.mode} workers, "
        f"batch {cfg.batch_size}, lr {cfg.lr:g} for all"
    )
    ax.grid(True, which="both", alpha=0.25)
    fig.legend(loc="outside lower center", ncols=len(results), fontsize=9)

    xs = np.arange(len(results))
    ax2.bar(xs, [r.test_accuracy for r in results], color=colors)
    for x, r in zip(xs, results, strict=True):
        ax2.annotate(
            f"{r.test_accuracy:.2f}",
            (x, r.test_accuracy),
            ha="center",
            xytext=(0, 2),
            fontsize=8,
            textcoords="offset points",
        )
    ax2.set_xticks(xs, [f"{r.momentum:g}" for r in results])
    ax2.set_ylim(0, 1.08)
    ax2.axhline(0.1, color="0.3", ls=":", lw=1)
    ax2.annotate("chance", (len(results) - 0.5, 0.1), ha="right", xytext=(0, 2), textcoords="offset points", fontsize=8)
    ax2.set_xlabel("momentum")
    ax2.set_ylabel("test accuracy")
    ax2.set_title(f"after {cfg.steps} steps")
    fig.savefig(path, pil_kwargs={"optimize": True})


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    d = Config()
    p = _common.parser("Momentum sweep on digits, trained through the service.", default_prefix=d.prefix)
    p.add_argument("--steps", type=int, help=f"optimizer steps per model, over all workers (default {d.steps})")
    p.add_argument("--workers", type=int, help=f"worker processes (default {d.workers})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"minibatch per worker step (default {d.batch_size})"
    )
    p.add_argument(
        "--lr", type=float, default=d.lr, help=f"learning rate, the same for every momentum (default {d.lr:g})"
    )
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden units (default {d.hidden})")
    p.add_argument(
        "--momenta",
        type=float,
        nargs="+",
        default=list(d.momenta),
        help="momentum values (default " + " ".join(f"{m:g}" for m in d.momenta) + ")",
    )
    p.add_argument(
        "--threshold", type=float, default=d.threshold, help=f"loss threshold for the table (default {d.threshold:g})"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"seed of the split, the initial weights, the batches (default {d.seed})",
    )
    p.add_argument(
        "--mode",
        choices=("async", "sync", "bounded"),
        default=d.mode,
        help="how the workers' pushes combine (default async; sync: each step is the mean of one push per worker)",
    )
    p.add_argument(
        "--max-staleness", type=int, default=d.max_staleness, help="bounded mode's limit (default %(default)s)"
    )
    p.add_argument("--png", type=Path, help="PNG path (default OUT_DIR/momentum_sweep.png)")
    p.add_argument("--md", type=Path, help="Markdown table path (default OUT_DIR/momentum_sweep.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quick: dict[str, int] = QUICK if args.quick else {}
    cfg = Config(
        momenta=tuple(args.momenta),
        steps=args.steps or quick.get("steps", d.steps),
        workers=args.workers or quick.get("workers", d.workers),
        batch_size=args.batch_size,
        lr=args.lr,
        hidden=args.hidden,
        seed=args.seed,
        threshold=args.threshold,
        prefix=args.prefix,
        mode=args.mode,
        max_staleness=args.max_staleness,
    )
    if cfg.steps < cfg.workers or cfg.workers < 1:
        p.error("need at least one worker and at least one step per worker")
    return args, cfg


_MODE_WORDS = {"async": "asynchronous", "sync": "synchronous", "bounded": "bounded-staleness"}


def main(argv: Sequence[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    png: Path = args.png or _common.out_dir(args) / "momentum_sweep.png"
    md: Path = args.md or _common.out_dir(args) / "momentum_sweep.md"
    t0 = time.perf_counter()
    with _common.service(args.url) as url:
        results = run_sweep(url, cfg, progress=not args.no_progress)
        if not args.keep_models:
            with mc.Client(url) as client:
                for r in results:
                    client.delete_model(r.model)
    elapsed = time.perf_counter() - t0
    text = table(results, cfg)
    for path in (png, md):
        path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, cfg, png)
    intro = (
        f"Digits, MLP 64-{cfg.hidden}-10, {cfg.workers} {_MODE_WORDS[cfg.mode]} workers, batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, {cfg.steps} server steps per model, seed {cfg.seed}.\n\n"
    )
    md.write_text(intro + text)
    print(intro + text)
    print(f"{len(cfg.momenta) * cfg.steps} service steps in {elapsed:.1f} s; wrote {png} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
