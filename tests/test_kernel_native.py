"""The native kernel (kernels/_sgd.c): it is built, it is used, and it computes the same bits.

Nothing here is skipped when the extension is missing: every test that needs it imports it
and fails, so a CI run that did not build it cannot pass. Both paths are checked against
torch 2.13.0 (the numpy path is the reference and the fallback, so it keeps its own parity
run), and against each other on adversarial inputs. No test measures time.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from momentum_service.kernels import SGDConfig, sgd, sgd_update

assert torch.__version__.startswith("2.13.0"), f"parity is defined against torch 2.13.0, found {torch.__version__}"

DTYPES = [np.float32, np.float64]

COMBOS = [
    (m, nesterov, d, wd, maximize)
    for m, nesterov, d, wd, maximize in itertools.product(
        [0.0, 0.9], [False, True], [0.0, 0.1], [0.0, 1e-4], [False, True]
    )
    if not nesterov or (m > 0 and d == 0)
]


def native_module() -> Any:
    """The extension itself; an ImportError here fails the test (CI must build it)."""
    from momentum_service.kernels import _sgd

    return _sgd


def native_kernels() -> dict[np.dtype[Any], Callable[..., None]]:
    mod = native_module()
    return {np.dtype(np.float32): mod.sgd_float32, np.dtype(np.float64): mod.sgd_float64}


Update = Callable[[SGDConfig, float, np.ndarray, "np.ndarray | None", np.ndarray], tuple[np.ndarray, Any]]


def native_update(cfg: SGDConfig, lr: float, value: np.ndarray, velocity: np.ndarray | None, grad: np.ndarray) -> Any:
    return sgd._update_native(native_kernels()[value.dtype], cfg, lr, value, velocity, grad)


def numpy_update(cfg: SGDConfig, lr: float, value: np.ndarray, velocity: np.ndarray | None, grad: np.ndarray) -> Any:
    return sgd._update_numpy(cfg, lr, value, velocity, grad)


PATHS: dict[str, Update] = {"native": native_update, "numpy": numpy_update}


def assert_same_bits(native: np.ndarray, numpy_: np.ndarray, what: str) -> None:
    assert native.dtype == numpy_.dtype and native.shape == numpy_.shape, what
    assert native.tobytes() == numpy_.tobytes(), f"{what}: native {native!r} != numpy {numpy_!r}"


@pytest.fixture
def force_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route sgd_update to the native kernel, whatever MOMENTUM_PURE_KERNEL said at import."""
    monkeypatch.setattr(sgd, "_NATIVE", native_kernels())


# ============================================================================================
# The extension is built and is what sgd_update uses
# ============================================================================================


def test_extension_is_built_and_imported() -> None:
    assert sgd.NATIVE_IMPORT_ERROR is None, (
        f"momentum_service.kernels._sgd did not import ({sgd.NATIVE_IMPORT_ERROR}); "
        "it is built by `pip install -e .[dev]` (scripts/install), which needs a C compiler"
    )
    mod = native_module()
    assert isinstance(mod.__loader__, importlib.machinery.ExtensionFileLoader)
    assert mod.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), mod.__file__


def _backend_in_subprocess(**env_changes: str | None) -> str:
    env = dict(os.environ)
    for key, val in env_changes.items():
        if val is None:
            env.pop(key, None)
        else:
            env[key] = val
    code = (
        "from momentum_service.kernels import sgd\n"
        "print(sgd.BACKEND, sgd.PURE_KERNEL, sgd.NATIVE_IMPORT_ERROR, sep='|')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip()


def test_a_fresh_interpreter_uses_the_native_kernel() -> None:
    assert _backend_in_subprocess(MOMENTUM_PURE_KERNEL=None) == "native|False|None"


def test_pure_kernel_variable_forces_the_numpy_path() -> None:
    assert _backend_in_subprocess(MOMENTUM_PURE_KERNEL="1") == "numpy|True|None"
    assert _backend_in_subprocess(MOMENTUM_PURE_KERNEL="0") == "native|False|None"


def test_sgd_update_dispatches_float32_and_float64_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def spy(name: str, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            calls.append(name)
            fn(*args)

        return wrapped

    kernels = {dt: spy(dt.name, fn) for dt, fn in native_kernels().items()}
    monkeypatch.setattr(sgd, "_NATIVE", kernels)
    cfg = SGDConfig(lr=0.1, momentum=0.9)
    for dtype in DTYPES:
        x = np.arange(5, dtype=dtype)
        sgd_update(cfg, x, None, x)
    assert calls == ["float32", "float64"]
    with pytest.raises(TypeError, match="float16"):  # other dtypes go to the numpy path, which refuses them
        sgd_update(cfg, np.ones(3, np.float16), None, np.ones(3, np.float16))
    assert calls == ["float32", "float64"]


def test_hardware_fma_clone_is_selected_when_the_cpu_has_fma() -> None:
    mod = native_module()
    has_fma = mod.hardware_fma()
    assert isinstance(has_fma, bool)
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform == "linux" and cpuinfo.exists() and os.uname().machine in ("x86_64", "i686"):
        flags = next(
            (ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), []
        )
        assert has_fma == ("fma" in flags)


# ============================================================================================
# (a) Both paths against torch 2.13.0 over 1,000 steps
# ============================================================================================


def lr_at(k: int) -> float:
    """A learning rate that changes between steps (warm-up, then two decays)."""
    if k < 100:
        return 0.05 * (k + 1) / 100
    return 0.05 if k < 500 else (0.01 if k < 800 else 0.0037)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "nesterov", "d", "wd", "maximize"), COMBOS)
def test_1000_steps_bitwise_equal_to_torch_sgd(
    path: str, dtype: type, m: float, nesterov: bool, d: float, wd: float, maximize: bool
) -> None:
    update = PATHS[path]
    rng = np.random.default_rng(abs(hash((m, nesterov, d, wd, maximize))) % 2**32)
    # Sizes that exercise torch's vector loop, its tail and a 0-d scalar parameter.
    shapes = [(37, 29), (1031,), (8,), ()]
    values = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in values]
    opt = torch.optim.SGD(
        tparams, lr=lr_at(0), momentum=m, dampening=d, nesterov=nesterov, weight_decay=wd, maximize=maximize
    )
    velocities: list[np.ndarray | None] = [None] * len(shapes)
    for k in range(1000):
        lr = lr_at(k)
        for group in opt.param_groups:
            group["lr"] = lr
        cfg = SGDConfig(lr=lr, momentum=m, dampening=d, nesterov=nesterov, weight_decay=wd, maximize=maximize)
        for i, s in enumerate(shapes):
            g = (rng.standard_normal(s) * 0.1).astype(dtype)
            tparams[i].grad = torch.from_numpy(np.array(g))
            values[i], velocities[i] = update(cfg, lr, values[i], velocities[i], g)
        opt.step()
    for i, tp in enumerate(tparams):
        ours, theirs = values[i], tp.detach().numpy()
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert ours.tobytes() == theirs.tobytes(), f"param {i}: max diff {np.max(np.abs(ours - theirs))}"
        buf = opt.state[tp].get("momentum_buffer")
        if m == 0:
            assert buf is None and velocities[i] is None
        else:
            assert velocities[i] is not None and velocities[i].tobytes() == buf.numpy().tobytes()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_momentum_switched_on_and_off_keeps_the_buffer_like_torch(path: str) -> None:
    update = PATHS[path]
    rng = np.random.default_rng(3)
    p = rng.standard_normal(64).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.0)
    vel = None
    for k in range(30):
        m = 0.9 if 10 <= k < 20 else 0.0  # off, on (buffer starts), off again (buffer kept as is)
        opt.param_groups[0]["momentum"] = m
        g = rng.standard_normal(64).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        p, vel = update(SGDConfig(lr=0.1, momentum=m), 0.1, p, vel, g)
    assert p.tobytes() == tp.detach().numpy().tobytes()
    assert vel is not None and vel.tobytes() == opt.state[tp]["momentum_buffer"].numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "nesterov", "d", "wd", "maximize"), COMBOS)
def test_numpy_path_in_blocks_equals_native(
    dtype: type, m: float, nesterov: bool, d: float, wd: float, maximize: bool
) -> None:
    """Past sgd._BLOCK elements the numpy path works block by block; the seams change nothing."""
    rng = np.random.default_rng(17)
    n = 2 * sgd._BLOCK + 1031
    value, velocity = rng.standard_normal(n).astype(dtype), None
    cfg = SGDConfig(lr=0.05, momentum=m, dampening=d, nesterov=nesterov, weight_decay=wd, maximize=maximize)
    for _ in range(3):
        grad = rng.standard_normal(n).astype(dtype)
        nv, nb = native_update(cfg, cfg.lr, value, velocity, grad)
        rv, rb = numpy_update(cfg, cfg.lr, value, velocity, grad)
        assert_same_bits(nv, rv, "value")
        assert (nb is None) == (rb is None)
        if nb is not None:
            assert_same_bits(nb, rb, "velocity")
        value, velocity = nv, nb


# ============================================================================================
# (b) Native == numpy path, bit for bit, on adversarial inputs
# ============================================================================================


def special_values(dtype: type) -> list[float]:
    info = np.finfo(dtype)
    tiny_sub = float(np.nextafter(dtype(0), dtype(1)))
    return [
        0.0,
        -0.0,
        tiny_sub,
        -tiny_sub,
        float(info.smallest_normal),
        -float(info.smallest_normal),
        float(info.smallest_normal) - tiny_sub,  # largest subnormal
        float(info.max),
        -float(info.max),
        float(info.max) / 2,
        1.0,
        -1.0,
    ]


def elements(dtype: type) -> st.SearchStrategy[float]:
    width = 32 if dtype is np.float32 else 64
    return st.one_of(
        st.floats(width=width, allow_nan=False, allow_infinity=False),
        st.floats(width=width, min_value=-(2.0**-100), max_value=2.0**-100, allow_subnormal=True),  # tiny and subnormal
        st.sampled_from(special_values(dtype)),
    )


def hyper(max_value: float) -> st.SearchStrategy[float]:
    return st.one_of(
        st.just(0.0),
        st.sampled_from([0.5, 0.9, 1.0, 1e-4]),
        st.floats(min_value=0.0, max_value=max_value, allow_nan=False, allow_infinity=False),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_native_equals_numpy_path_bitwise(dtype: type, data: st.DataObject) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=40), label="shape")
    value = data.draw(hnp.arrays(dtype, shape, elements=elements(dtype)), label="value")
    grad = data.draw(hnp.arrays(dtype, shape, elements=elements(dtype)), label="grad")
    momentum = data.draw(hyper(1e3), label="momentum")
    dampening = data.draw(hyper(2.0), label="dampening")
    nesterov = momentum > 0 and dampening == 0 and data.draw(st.booleans(), label="nesterov")
    cfg = SGDConfig(
        lr=data.draw(hyper(1e6), label="lr"),
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=data.draw(hyper(1e3), label="weight_decay"),
        maximize=data.draw(st.booleans(), label="maximize"),
    )
    velocity = data.draw(st.none() | hnp.arrays(dtype, shape, elements=elements(dtype)), label="velocity")
    inputs = [a.tobytes() for a in (value, grad) + (() if velocity is None else (velocity,))]
    with np.errstate(all="ignore"):
        nv, nb = native_update(cfg, cfg.lr, value, velocity, grad)
        rv, rb = numpy_update(cfg, cfg.lr, value, velocity, grad)
    assert inputs == [a.tobytes() for a in (value, grad) + (() if velocity is None else (velocity,))]
    assert_same_bits(nv, rv, "value")
    if rb is None:
        assert nb is None
    else:
        assert nb is not None
        assert_same_bits(nb, rb, "velocity")


# ============================================================================================
# (c) Layouts, shapes and wrong calls
# ============================================================================================


@pytest.mark.usefixtures("force_native")
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_are_copied_not_misread(dtype: type) -> None:
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 64, 40)).astype(dtype)
    value = base[0, ::2, :].T  # strided and transposed: (40, 32)
    grad = np.asfortranarray(rng.standard_normal((40, 32)).astype(dtype))
    velocity = base[2, ::-2, ::-1].T[:, :]  # negative strides
    before = base.tobytes(), grad.tobytes()
    cfg = SGDConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    nv, nb = sgd_update(cfg, value, velocity, grad)
    rv, rb = numpy_update(cfg, cfg.lr, value.copy(), velocity.copy(), grad.copy())
    assert (base.tobytes(), grad.tobytes()) == before
    assert nv.shape == nb.shape == (40, 32)
    assert_same_bits(nv, rv, "value")
    assert_same_bits(nb, rb, "velocity")
    assert nv.flags.c_contiguous and nb.flags.c_contiguous


@pytest.mark.usefixtures("force_native")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 0, 3), (3, 1, 5)])
def test_shapes_and_zero_d_behave_as_before(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(11)
    value = np.asarray(rng.standard_normal(shape), dtype=dtype)
    grad = np.asarray(rng.standard_normal(shape), dtype=dtype)
    for cfg in (SGDConfig(lr=0.1), SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01)):
        for velocity in (None, np.ones(shape, dtype)):
            nv, nb = sgd_update(cfg, value, velocity, grad)
            rv, rb = numpy_update(cfg, cfg.lr, value, velocity, grad)
            assert isinstance(nv, np.ndarray) and nv.shape == shape and nv.dtype == dtype
            assert_same_bits(nv, rv, "value")
            if rb is None:
                assert nb is None
            else:
                assert isinstance(nb, np.ndarray) and nb.shape == shape
                assert_same_bits(nb, rb, "velocity")


@pytest.mark.usefixtures("force_native")
def test_read_only_inputs_work() -> None:
    raw = np.arange(16, dtype=np.float32).tobytes()
    value = np.frombuffer(raw, dtype=np.float32)  # what a store decodes: read-only
    assert not value.flags.writeable
    nv, nb = sgd_update(SGDConfig(lr=0.1, momentum=0.9), value, value, value)
    assert nv.flags.writeable and nb is not None and nb.flags.writeable


@pytest.mark.usefixtures("force_native")
def test_momentum_zero_leaves_the_velocity_as_it_is() -> None:
    velocity = np.full(5, 3.0, np.float32)
    nv, nb = sgd_update(SGDConfig(lr=0.1), np.ones(5, np.float32), velocity, np.ones(5, np.float32))
    assert nb is not None and nb.tobytes() == velocity.tobytes()
    assert nv.tobytes() == np.full(5, np.float32(0.9), np.float32).tobytes()


@pytest.mark.usefixtures("force_native")
@pytest.mark.parametrize(
    ("value", "velocity", "grad", "error", "match"),
    [
        (np.ones(4, np.float32), None, np.ones(5, np.float32), ValueError, r"grad has shape \(5,\)"),
        (np.ones((2, 2), np.float32), None, np.ones(4, np.float32), ValueError, "grad has shape"),
        (np.ones(4, np.float32), np.ones(3, np.float32), np.ones(4, np.float32), ValueError, "velocity has shape"),
        (np.ones(4, np.float32), None, np.ones(4, np.float64), TypeError, "grad has dtype float64"),
        (np.ones(4, np.float64), np.ones(4, np.float32), np.ones(4, np.float64), TypeError, "velocity has dtype"),
        (np.ones(4, ">f4"), None, np.ones(4, ">f4"), TypeError, "fma supports"),  # numpy path, as before
    ],
)
def test_sgd_update_rejects_mismatched_operands(
    value: np.ndarray, velocity: np.ndarray | None, grad: np.ndarray, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sgd_update(SGDConfig(lr=0.1, momentum=0.9), value, velocity, grad)


def _call(kernel: Callable[..., None], **overrides: Any) -> None:
    n = 8
    args: dict[str, Any] = {
        "value": np.ones(n, np.float32),
        "velocity": np.ones(n, np.float32),
        "grad": np.ones(n, np.float32),
        "out_value": np.empty(n, np.float32),
        "out_velocity": np.empty(n, np.float32),
        "lr": 0.1,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    args.update(overrides)
    kernel(*args.values())


def test_the_extension_accepts_a_correct_call() -> None:
    out_value, out_velocity = np.empty(8, np.float32), np.empty(8, np.float32)
    _call(native_module().sgd_float32, out_value=out_value, out_velocity=out_velocity)
    # b = 0.9*1 + 1 = 1.9 (rounded), p = 1 - 0.1*1.9 (one rounding)
    assert out_velocity.tobytes() == np.full(8, np.float32(1.9), np.float32).tobytes()
    expected = np.float32(np.float64(-np.float32(0.1)) * np.float64(np.float32(1.9)) + 1.0)
    assert out_value.tobytes() == np.full(8, expected, np.float32).tobytes()


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"grad": np.ones(7, np.float32)}, ValueError, "grad has 7 elements, value has 8"),
        ({"velocity": np.ones(9, np.float32)}, ValueError, "velocity has 9 elements"),
        ({"out_value": np.empty(4, np.float32)}, ValueError, "out_value has 4 elements"),
        ({"out_velocity": np.empty(16, np.float32)}, ValueError, "out_velocity has 16 elements"),
        ({"value": np.ones(8, np.float64)}, TypeError, "value must hold float32"),
        ({"grad": np.ones(8, np.int32)}, TypeError, "grad must hold float32"),
        ({"grad": np.ones(8, ">f4")}, TypeError, "grad must hold float32"),
        ({"grad": b"\0" * 32}, TypeError, "grad must hold float32"),
        ({"grad": np.ones(16, np.float32)[::2]}, TypeError, "grad must be a C-contiguous buffer"),
        ({"grad": [1.0] * 8}, TypeError, "grad must be a C-contiguous buffer of float32, got list"),
        ({"out_value": np.frombuffer(b"\0" * 32, np.float32)}, TypeError, "out_value must be a C-contiguous writable"),
        ({"momentum": 0.0}, ValueError, "momentum == 0"),
        ({"momentum": 0.0, "velocity": None, "out_velocity": None, "nesterov": True}, ValueError, "nesterov"),
        ({"out_velocity": None}, ValueError, "needs an out_velocity"),
        ({"lr": "0.1"}, TypeError, "must be real number"),
    ],
)
def test_the_extension_refuses_wrong_calls(overrides: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _call(native_module().sgd_float32, **overrides)


def test_the_extension_refuses_overlapping_outputs() -> None:
    kernel = native_module().sgd_float64
    buf = np.zeros(16, np.float64)
    value = np.ones(8, np.float64)
    with pytest.raises(ValueError, match="out_value overlaps value"):
        _call(kernel, value=value, velocity=None, grad=np.ones(8), out_value=value, out_velocity=np.empty(8))
    with pytest.raises(ValueError, match="out_value overlaps out_velocity"):
        _call(kernel, value=value, velocity=None, grad=np.ones(8), out_value=buf[:8], out_velocity=buf[4:12])
    _call(kernel, value=value, velocity=None, grad=value, out_value=buf[:8], out_velocity=buf[8:])  # adjacent is fine


def test_updates_run_in_parallel_threads_with_correct_results() -> None:
    """The loop releases the GIL; concurrent calls must still each compute their own result."""
    rng = np.random.default_rng(5)
    cfg = SGDConfig(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    jobs = [tuple(rng.standard_normal(200_003).astype(np.float32) for _ in range(3)) for _ in range(4)]
    expected = [numpy_update(cfg, cfg.lr, *job) for job in jobs]
    results: list[Any] = [None] * len(jobs)

    def work(i: int) -> None:
        results[i] = native_update(cfg, cfg.lr, *jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (rv, rb), (nv, nb) in zip(expected, results, strict=True):
        assert_same_bits(nv, rv, "value")
        assert_same_bits(nb, rb, "velocity")
