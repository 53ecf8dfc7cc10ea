"""Golden trajectories of the momentum rules, produced by the real frameworks (never by our code).

``tests/test_rules.py`` replays every case with ``momentum_service.kernels.rules`` and
requires bitwise equality, so CI needs neither TensorFlow nor JAX: only these files.

Recreate the side venv (Python 3.11, x86-64 Linux; never install these into the project's
``.venv``) and rerun::

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install -r tests/golden/requirements.txt
    /tmp/tfvenv/bin/python tests/golden/generate.py      # from the repository root

It rewrites ``tests/golden/cases.json`` (metadata) and ``tests/golden/trajectories.npz``
(arrays; loads with ``allow_pickle=False``). Then run ``pytest tests/test_rules.py``.

Every case runs 1,000 steps in float32 and in float64 on three parameters at once: a
vector of 131 elements (vector loops up to AVX-512 width plus a tail), an (11, 13)
matrix and a 0-d scalar. The learning rate changes every step (warm-up, two sine
modulations, a jump up and a drop; always > 0) and is handed to the framework as a
Python float each step:

* ``keras``: Keras 3 ``SGD`` on the TensorFlow backend, eager; ``opt.learning_rate = lr``.
* ``tf1``: ``tf.compat.v1.train.MomentumOptimizer(learning_rate=lambda: lr_holder[0])``, eager.
* ``ema``: ``optax.inject_hyperparams`` over ``optax.chain(optax.ema(m, debias=False),
  optax.scale_by_learning_rate(lr))`` then ``optax.apply_updates``, eager (no ``jax.jit``:
  XLA fuses multiply-adds, the rule matches the op-by-op numbers); ``jax_enable_x64``.

The inputs come from a seed (the test regenerates them the same way)::

    rng = np.random.default_rng(seed)
    init = rng.standard_normal(275, dtype=dtype)          # 131 + 11*13 + 1, split in that order
    grads = rng.standard_normal((1000, 275), dtype=dtype)  # row k = the gradients of step k

``cases.json`` records the SHA-256 of ``init`` and ``grads`` (their bytes, C order), so a
change of numpy's random stream fails loudly instead of comparing different inputs.

Per case, ``trajectories.npz`` holds ``<id>/value/<param>`` (after the last step),
``<id>/velocity/<param>`` (Keras's momentum slot, TF1's accumulator, optax's ema state;
absent for Keras with momentum 0, which has no slot) and ``<id>/step_sha256``: for each
step, the first 8 bytes of the SHA-256 of the three values' bytes concatenated (vector,
matrix, scalar) after that step, which locates the first divergent step in 8 KB per case.
The per-step learning rates (float64) are ``lrs/<schedule>``, named by the case's ``"lrs"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS = 1000
BASE_LR = 0.01
PARAMS: list[tuple[str, tuple[int, ...]]] = [("vector", (131,)), ("matrix", (11, 13)), ("scalar", ())]
DTYPES = ["float32", "float64"]
HASH_BYTES = 8

# (framework, hyperparameters as the rule dict takes them, minus "rule" and "lr")
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("keras", {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0}),
    ("keras", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0}),
    ("keras", {"momentum": 0.9, "nesterov": False, "weight_decay": 0.01}),
    ("keras", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.004}),
    ("keras", {"momentum": 0.0, "nesterov": False, "weight_decay": 0.01}),
    ("keras", {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}),
    ("keras", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.0}),
    ("tf1", {"momentum": 0.9, "nesterov": False}),
    ("tf1", {"momentum": 0.9, "nesterov": True}),
    ("tf1", {"momentum": 0.0, "nesterov": False}),
    ("tf1", {"momentum": 0.99, "nesterov": False}),
    ("ema", {"momentum": 0.9}),
    ("ema", {"momentum": 0.5}),
    ("ema", {"momentum": 0.0}),
]

Arrays = list[np.ndarray]
Runner = Callable[[dict[str, Any], Arrays, Sequence[Arrays], np.ndarray, Callable[[Arrays], None]], Arrays | None]


def learning_rates(steps: int = STEPS) -> np.ndarray:
    """float64, different at every step, always > 0: warm-up, sine modulations, a jump up (x4), a drop (x0.1)."""
    k = np.arange(steps, dtype=np.float64)
    warm = np.minimum(1.0, (k + 1.0) / 100.0)
    wave = 1.0 + 0.5 * np.sin(k / 13.0) + 0.1 * np.sin(0.7 * k)
    jumps = np.where((k >= 400) & (k < 450), 4.0, 1.0) * np.where(k >= 750, 0.1, 1.0)
    lrs = BASE_LR * warm * wave * jumps
    assert np.all(lrs > 0) and np.all(np.diff(lrs) != 0)
    # float64 learning rates that float32 cannot hold, or rounding lr through float32 would go unnoticed
    assert np.all(lrs.astype(np.float32).astype(np.float64) != lrs)
    return lrs


def inputs(seed: int, dtype: str) -> tuple[Arrays, list[Arrays], str, str]:
    """The initial values and the per-step gradients of the three parameters, and the SHA-256 of both."""
    total = sum(int(np.prod(shape)) for _, shape in PARAMS)
    rng = np.random.default_rng(seed)
    init = rng.standard_normal(total, dtype=dtype)
    grads = rng.standard_normal((STEPS, total), dtype=dtype)
    sha_init = hashlib.sha256(init.tobytes()).hexdigest()
    sha_grads = hashlib.sha256(grads.tobytes()).hexdigest()
    return split(init), [split(row) for row in grads], sha_init, sha_grads


def split(flat: np.ndarray) -> Arrays:
    out, start = [], 0
    for _, shape in PARAMS:
        size = int(np.prod(shape))
        out.append(flat[start : start + size].reshape(shape).copy())
        start += size
    return out


def step_digest(values: Arrays) -> bytes:
    h = hashlib.sha256()
    for v in values:
        h.update(np.ascontiguousarray(v).tobytes())
    return h.digest()[:HASH_BYTES]


def run_keras(hp: dict[str, Any], init: Arrays, grads: Sequence[Arrays], lrs: np.ndarray, record: Any) -> Arrays | None:
    import keras
    import tensorflow as tf

    variables = [keras.Variable(v.copy(), dtype=v.dtype.name) for v in init]
    opt = keras.optimizers.SGD(
        learning_rate=float(lrs[0]),
        momentum=hp["momentum"],
        nesterov=hp["nesterov"],
        weight_decay=hp["weight_decay"] or None,
    )
    opt.build(variables)
    for g, lr in zip(grads, lrs, strict=True):
        opt.learning_rate = float(lr)
        opt.apply_gradients([(tf.constant(gi), var) for gi, var in zip(g, variables, strict=True)])
        record([var.numpy() for var in variables])
    if hp["momentum"] == 0:
        assert not opt.momentums, "Keras SGD with momentum 0 is expected to have no momentum slot"
        return None
    slots = [opt.momentums[opt._get_variable_index(var)] for var in variables]
    return [np.asarray(s.numpy()) for s in slots]


def run_tf1(hp: dict[str, Any], init: Arrays, grads: Sequence[Arrays], lrs: np.ndarray, record: Any) -> Arrays | None:
    import tensorflow as tf

    variables = [tf.Variable(v.copy()) for v in init]
    lr_holder = [float(lrs[0])]
    opt = tf.compat.v1.train.MomentumOptimizer(
        learning_rate=lambda: lr_holder[0], momentum=hp["momentum"], use_nesterov=hp["nesterov"]
    )
    for g, lr in zip(grads, lrs, strict=True):
        lr_holder[0] = float(lr)
        opt.apply_gradients([(tf.constant(gi), var) for gi, var in zip(g, variables, strict=True)])
        record([var.numpy() for var in variables])
    return [np.asarray(opt.get_slot(var, "momentum").numpy()) for var in variables]


def run_ema(hp: dict[str, Any], init: Arrays, grads: Sequence[Arrays], lrs: np.ndarray, record: Any) -> Arrays | None:
    import jax
    import jax.numpy as jnp
    import optax

    jax.config.update("jax_enable_x64", True)
    m = hp["momentum"]
    tx = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.ema(m, debias=False), optax.scale_by_learning_rate(learning_rate))
    )(learning_rate=float(lrs[0]))
    params = {name: jnp.asarray(v) for (name, _), v in zip(PARAMS, init, strict=True)}
    for p, v in zip(params.values(), init, strict=True):
        assert p.dtype == v.dtype, (p.dtype, v.dtype)
    state = tx.init(params)
    for g, lr in zip(grads, lrs, strict=True):
        state.hyperparams["learning_rate"] = float(lr)
        updates, state = tx.update(
            {name: jnp.asarray(gi) for (name, _), gi in zip(PARAMS, g, strict=True)}, state, params
        )
        params = optax.apply_updates(params, updates)
        record([np.asarray(params[name]) for name, _ in PARAMS])
    ema = state.inner_state[0].ema
    return [np.asarray(ema[name]) for name, _ in PARAMS]


RUNNERS: dict[str, Runner] = {"keras": run_keras, "tf1": run_tf1, "ema": run_ema}
REFERENCES = {
    "keras": "keras.optimizers.SGD(learning_rate, momentum, nesterov, weight_decay or None), TF backend, eager",
    "tf1": "tf.compat.v1.train.MomentumOptimizer(learning_rate=lambda: lr, momentum, use_nesterov), eager",
    "ema": "optax.inject_hyperparams(chain(ema(m, debias=False), scale_by_learning_rate(lr))), no jit, x64",
}


def case_id(framework: str, hp: dict[str, Any], dtype: str) -> str:
    parts = [framework, f"m{hp['momentum']:g}"]
    if hp.get("nesterov"):
        parts.append("nesterov")
    if hp.get("weight_decay"):
        parts.append(f"wd{hp['weight_decay']:g}")
    return "-".join([*parts, dtype])


def versions() -> dict[str, str]:
    import jax
    import jaxlib
    import keras
    import optax
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
    }


def cpu() -> dict[str, Any]:
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx", "avx2", "fma", "avx512f") if f in have]
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "flags": flags}


def main() -> None:
    lrs = learning_rates()
    arrays: dict[str, np.ndarray] = {"lrs/main": lrs}
    cases = []
    for index, (framework, hp) in enumerate(CONFIGS):
        for dtype in DTYPES:
            cid = case_id(framework, hp, dtype)
            seed = 1000 + 2 * index + DTYPES.index(dtype)
            init, grads, sha_init, sha_grads = inputs(seed, dtype)
            digests: list[bytes] = []
            last: list[Arrays] = []

            def record(values: Arrays, dtype: str = dtype, digests: list[bytes] = digests, last: list = last) -> None:
                assert all(v.dtype == np.dtype(dtype) for v in values)
                digests.append(step_digest(values))
                last[:] = [[np.array(v, copy=True) for v in values]]

            velocity = RUNNERS[framework](hp, init, grads, lrs, record)
            assert len(digests) == STEPS
            final = last[0]
            for (name, shape), v in zip(PARAMS, final, strict=True):
                assert v.shape == shape and v.dtype == np.dtype(dtype)
                arrays[f"{cid}/value/{name}"] = v
            if velocity is not None:
                for (name, shape), v in zip(PARAMS, velocity, strict=True):
                    assert v.shape == shape and v.dtype == np.dtype(dtype), (cid, name, v.shape, v.dtype)
                    arrays[f"{cid}/velocity/{name}"] = v
            arrays[f"{cid}/step_sha256"] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(STEPS, HASH_BYTES)
            cases.append(
                {
                    "id": cid,
                    "framework": framework,
                    "reference": REFERENCES[framework],
                    "rule": {"rule": framework, "lr": BASE_LR, **hp},
                    "dtype": dtype,
                    "seed": seed,
                    "sha256_init": sha_init,
                    "sha256_grads": sha_grads,
                    "lrs": "lrs/main",
                    "has_velocity": velocity is not None,
                }
            )
            print(f"{cid}: done", file=sys.stderr)
    meta = {
        "format": 1,
        "generator": "tests/golden/generate.py (run with the side venv of tests/golden/requirements.txt)",
        "versions": versions(),
        "cpu": cpu(),
        "env": {name: os.environ.get(name, "") for name in ("TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS", "JAX_ENABLE_X64")},
        "steps": STEPS,
        "params": [{"name": name, "shape": list(shape)} for name, shape in PARAMS],
        "inputs": "rng = np.random.default_rng(seed); init = rng.standard_normal(275, dtype=dtype); "
        "grads = rng.standard_normal((1000, 275), dtype=dtype); flat arrays split into the params in order",
        "step_sha256": f"first {HASH_BYTES} bytes of sha256(vector.tobytes() + matrix.tobytes() + scalar.tobytes()) "
        "after each step",
        "cases": cases,
    }
    (HERE / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    np.savez_compressed(HERE / "trajectories.npz", **arrays)


if __name__ == "__main__":
    main()
