"""The kernel against torch 2.13.0 itself: bitwise equality, never a transcription of torch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from momentum_service.kernels import SGDConfig, fma, sgd_update

assert torch.__version__.startswith("2.13.0"), f"parity is defined against torch 2.13.0, found {torch.__version__}"

COMBOS = [
    (m, nesterov, d, wd, maximize)
    for m, nesterov, d, wd, maximize in itertools.product(
        [0.0, 0.9], [False, True], [0.0, 0.1], [0.0, 1e-4], [False, True]
    )
    if not nesterov or (m > 0 and d == 0)
]


def lr_at(k: int) -> float:
    """A learning rate that changes between steps (warm-up, then two decays)."""
    if k < 100:
        return 0.05 * (k + 1) / 100
    return 0.05 if k < 500 else (0.01 if k < 800 else 0.0037)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("m", "nesterov", "d", "wd", "maximize"), COMBOS)
def test_1000_steps_bitwise_equal_to_torch_sgd(
    dtype: type, m: float, nesterov: bool, d: float, wd: float, maximize: bool
) -> None:
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
            values[i], velocities[i] = sgd_update(cfg, values[i], velocities[i], g)
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


def test_plain_numpy_would_not_be_bitwise() -> None:
    """The negative control: the unfused expression drifts from torch, so the test above has teeth."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(4096).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([tp], lr=0.01, momentum=0.9)
    buf = None
    for _ in range(100):
        g = rng.standard_normal(4096).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        buf = g.copy() if buf is None else buf * np.float32(0.9) + g
        p = p - np.float32(0.01) * buf
    assert p.tobytes() != tp.detach().numpy().tobytes()


def test_momentum_switched_on_later_starts_the_buffer_like_torch() -> None:
    rng = np.random.default_rng(3)
    p = rng.standard_normal(64).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.0)
    vel = None
    for k in range(20):
        m = 0.0 if k < 10 else 0.9
        opt.param_groups[0]["momentum"] = m
        g = rng.standard_normal(64).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        p, vel = sgd_update(SGDConfig(lr=0.1, momentum=m), p, vel, g)
    assert p.tobytes() == tp.detach().numpy().tobytes()


# fma against torch's x.add(y, alpha=a), the operation it reproduces.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fma_equals_torch(dtype: type, data: st.DataObject) -> None:
    finite = st.floats(width=32 if dtype is np.float32 else 64, allow_nan=False, allow_infinity=False)
    n = data.draw(st.integers(1, 40), label="n")
    a = data.draw(finite, label="alpha")
    x = data.draw(hnp.arrays(dtype, n, elements=finite), label="x")
    y = data.draw(hnp.arrays(dtype, n, elements=finite), label="y")
    ref = torch.from_numpy(x.copy()).add(torch.from_numpy(y.copy()), alpha=a).numpy()
    ours = fma(a, y, x)
    assert ours.dtype == ref.dtype
    assert np.array_equal(ours, ref, equal_nan=True)
    finite_ref = ~np.isnan(ref)
    assert ours[finite_ref].tobytes() == ref[finite_ref].tobytes()  # also tells -0.0 from 0.0


@pytest.mark.parametrize(
    ("a", "y", "x"),
    [
        # alpha*y = 1 - 2**-36: the float64 sum lands exactly on a float32 midpoint while the
        # true sum lies below it, so rounding float64 -> float32 would round the wrong way.
        (1 - 2**-18, 1 + 2**-18, 2.0**24 + 2),
        (1 - 2**-18, -(1 + 2**-18), -(2.0**24 + 2)),
        (1 - 2**-18, 2.0**-60 * (1 + 2**-18), 2.0**-36 + 2.0**-58),
        # At the overflow threshold: the true sum is just below FLT_MAX + half an ulp.
        (1 - 2**-18, 2.0**103 * (1 + 2**-18), float(np.finfo(np.float32).max)),
        # Subnormal results.
        (0.5, 2.0**-148, -(2.0**-149) * 3),
        (1e-30, 1e-10, 1e-45),
    ],
)
def test_fma32_double_rounding_cases(a: float, y: float, x: float) -> None:
    xs, ys = np.array([x], dtype=np.float32), np.array([y], dtype=np.float32)
    ref = torch.from_numpy(xs.copy()).add(torch.from_numpy(ys.copy()), alpha=a).numpy()
    assert fma(a, ys, xs).tobytes() == ref.tobytes()


def test_double_rounding_case_is_real() -> None:
    """The first case above really does go wrong without the correction."""
    a, y, x = np.float32(1 - 2**-18), np.float32(1 + 2**-18), np.float32(2.0**24 + 2)
    naive = np.float32(np.float64(a) * np.float64(y) + np.float64(x))
    assert naive != fma(float(a), np.array([y]), np.array([x]))[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": 0.1, "momentum": -0.5}, "momentum must be >= 0"),
        ({"lr": 0.1, "dampening": -1}, "dampening must be >= 0"),
        ({"lr": 0.1, "weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"lr": 0.1, "nesterov": True}, "nesterov momentum requires momentum > 0 and dampening = 0"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, "requires momentum > 0 and dampening = 0"),
        ({"lr": "0.1"}, "lr must be a number"),
        ({"lr": 0.1, "maximize": 1}, "maximize must be a boolean"),
    ],
)
def test_config_validation_says_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGDConfig(**kwargs)


def test_torch_rejects_the_same_configs() -> None:
    """Our validation agrees with torch's constructor on what is invalid."""
    p = [torch.nn.Parameter(torch.zeros(1))]
    for kwargs in (
        {"lr": -0.1},
        {"lr": 0.1, "momentum": -0.5},
        {"lr": 0.1, "weight_decay": -1.0},
        {"lr": 0.1, "nesterov": True},
    ):
        with pytest.raises(ValueError, match=r"Invalid|Nesterov"):
            torch.optim.SGD(p, **kwargs)
        with pytest.raises(ValueError, match=r"must be >= 0|requires momentum"):
            SGDConfig(**kwargs)


@pytest.mark.parametrize(
    ("a", "y", "x"),
    [
        # Near float64's top, where Dekker's split overflows (found by hypothesis).
        (-1.9, 1.68533731e307, 9.55024478e306),
        (2.0, 8.98846567e307, 0.0),
        (1.5, 1.7e308, -1e308),
        (1e300, 1e-300, 1.0),
        # Signed zeros: -0 + -0 is -0, an exact cancellation is +0 (found by hypothesis).
        (-1.0, 0.0, -0.0),
        (2.5, -0.0, -0.0),
        (0.5, 3.0, -1.5),
        (0.0, -3.3484644e299, -0.0),
        # A nonzero exact result that rounds to zero keeps its sign.
        (5.7251745367394237e-154, -5.59921351e-236, 0.0),
        (-1e-200, 1e-200, 0.0),
        # Subnormal products, whose exact error term Dekker's method cannot hold.
        (9.09969847603397e-05, 2.22507386e-309, 0.0),
        (3.0, 5e-324, -1e-323),
    ],
)
def test_fma64_overflow_range_cases(a: float, y: float, x: float) -> None:
    xs, ys = np.array([x]), np.array([y])
    ref = torch.from_numpy(xs.copy()).add(torch.from_numpy(ys.copy()), alpha=a).numpy()
    assert fma(a, ys, xs).tobytes() == ref.tobytes()
