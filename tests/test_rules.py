"""The momentum rules of ``kernels/rules.py``: bitwise against the real frameworks, and their claims.

Keras, TF1 and optax are not installed here (nor in CI): ``tests/golden/`` holds 1,000-step
trajectories the frameworks themselves produced (see ``tests/golden/generate.py``), and the
rules must replay them bit for bit. ``previous_delta`` has no framework; it is checked
against exact rational arithmetic rounded to the dtype after every operation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from momentum_service.kernels import fma
from momentum_service.kernels.rules import (
    RULES,
    EMAMomentum,
    KerasSGD,
    PreviousDelta,
    Rule,
    SGDConfig,
    TF1Momentum,
    rule_from_dict,
)

GOLDEN = Path(__file__).parent / "golden"
META: dict[str, Any] = json.loads((GOLDEN / "cases.json").read_text())
with np.load(GOLDEN / "trajectories.npz", allow_pickle=False) as _npz:
    ARRAYS: dict[str, np.ndarray] = {key: _npz[key] for key in _npz.files}
CASES: list[dict[str, Any]] = META["cases"]
CASE_BY_ID = {case["id"]: case for case in CASES}
STEPS: int = META["steps"]
PARAM_NAMES: list[str] = [p["name"] for p in META["params"]]
PARAM_SHAPES: list[tuple[int, ...]] = [tuple(p["shape"]) for p in META["params"]]
HASH_BYTES = 8

Array = np.ndarray
AnyRule = Rule
Update = Callable[[Array, Array | None, Array, float], tuple[Array, Array | None]]


# ---------------------------------------------------------------------------------------------
# Replaying a golden case
# ---------------------------------------------------------------------------------------------


def split(flat: Array) -> list[Array]:
    out, start = [], 0
    for shape in PARAM_SHAPES:
        size = math.prod(shape)
        out.append(flat[start : start + size].reshape(shape).copy())
        start += size
    return out


def golden_inputs(case: dict[str, Any]) -> tuple[list[Array], Array]:
    """The case's initial values (split into the params) and its gradients (one flat row per step)."""
    total = sum(math.prod(shape) for shape in PARAM_SHAPES)
    rng = np.random.default_rng(case["seed"])
    init = rng.standard_normal(total, dtype=case["dtype"])
    grads = rng.standard_normal((STEPS, total), dtype=case["dtype"])
    for what, array, key in (("initial values", init, "sha256_init"), ("gradients", grads, "sha256_grads")):
        if hashlib.sha256(array.tobytes()).hexdigest() != case[key]:
            pytest.fail(
                f"{case['id']}: the {what} regenerated from seed {case['seed']} with numpy {np.__version__} "
                f"are not the ones the golden trajectories were made from (numpy {META['versions']['numpy']}): "
                "numpy's default_rng stream has changed. Regenerate the goldens (tests/golden/generate.py) "
                "rather than comparing different inputs."
            )
    return split(init), grads


def step_digest(values: list[Array]) -> bytes:
    h = hashlib.sha256()
    for v in values:
        h.update(np.ascontiguousarray(v).tobytes())
    return h.digest()[:HASH_BYTES]


@dataclass
class Replay:
    first_divergent_step: int | None
    values: list[Array]
    velocities: list[Array | None]


def replay(case: dict[str, Any], update: Update) -> Replay:
    """Run ``update`` over the case's inputs, comparing each step's values with the golden digest."""
    values, grads = golden_inputs(case)
    velocities: list[Array | None] = [None] * len(values)
    lrs = ARRAYS[case["lrs"]]
    digests = ARRAYS[f"{case['id']}/step_sha256"]
    first: int | None = None
    for k in range(STEPS):
        for i, g in enumerate(split(grads[k])):
            values[i], velocities[i] = update(values[i], velocities[i], g, float(lrs[k]))
        if first is None and step_digest(values) != digests[k].tobytes():
            first = k
    return Replay(first, values, velocities)


def bitwise_equal(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


def max_ulps(a: Array, b: Array) -> int:
    """The largest distance between ``a`` and ``b`` in units in the last place (same dtype, finite)."""
    ints = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}[np.asarray(a).dtype]
    sign_bit = 1 << (8 * np.dtype(ints).itemsize - 1)

    def line(x: Any) -> list[int]:  # sign-magnitude bit patterns onto a monotonic integer line
        return [int(i) if i >= 0 else -(int(i) + sign_bit) for i in np.asarray(x).reshape(-1).view(ints)]

    return max((abs(i - j) for i, j in zip(line(a), line(b), strict=True)), default=0)


def final_diffs(case: dict[str, Any], values: list[Array]) -> str:
    parts = []
    for name, ours in zip(PARAM_NAMES, values, strict=True):
        theirs = ARRAYS[f"{case['id']}/value/{name}"]
        ours = np.asarray(ours)
        diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)), initial=0.0))
        parts.append(f"{name}: max abs diff {diff:.3g} ({max_ulps(ours, theirs)} ulp)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The golden files themselves
# ---------------------------------------------------------------------------------------------


def test_golden_files_cover_every_case_and_record_their_provenance() -> None:
    expected: dict[str, list[tuple[Any, ...]]] = {
        "keras": [
            (0.9, False, 0.0),
            (0.9, True, 0.0),
            (0.9, False, 0.01),
            (0.9, True, 0.004),
            (0.0, False, 0.01),
            (0.0, False, 0.0),
            (0.5, True, 0.0),
        ],
        "tf1": [(0.9, False), (0.9, True), (0.0, False), (0.99, False)],
        "ema": [(0.9,), (0.5,), (0.0,)],
    }
    fields = {"keras": ("momentum", "nesterov", "weight_decay"), "tf1": ("momentum", "nesterov"), "ema": ("momentum",)}
    found = {(c["rule"]["rule"], tuple(c["rule"][f] for f in fields[c["rule"]["rule"]]), c["dtype"]) for c in CASES}
    want = {(rule, hp, dtype) for rule, hps in expected.items() for hp in hps for dtype in ("float32", "float64")}
    assert found == want
    assert len(CASES) == len(CASE_BY_ID) == 28
    assert STEPS == 1000
    assert PARAM_SHAPES == [(131,), (11, 13), ()]
    for case in CASES:
        assert (f"{case['id']}/velocity/vector" in ARRAYS) == case["has_velocity"]
        assert case["has_velocity"] == (case["framework"] != "keras" or case["rule"]["momentum"] != 0)
        assert ARRAYS[f"{case['id']}/step_sha256"].shape == (STEPS, HASH_BYTES)

    # the pins of requirements.txt are the versions that made the files
    pins = dict(
        line.split("==")
        for line in (GOLDEN / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    pins["tensorflow"] = pins.pop("tensorflow-cpu")
    assert pins == {k: v for k, v in META["versions"].items() if k != "python"}

    # a learning rate that changes at every step, stays > 0, and is not a float32 number
    # (or rounding it through float32 in float64 would go unnoticed)
    for name in {c["lrs"] for c in CASES}:
        lrs = ARRAYS[name]
        assert lrs.dtype == np.float64 and lrs.shape == (STEPS,)
        assert np.all(lrs > 0) and np.all(np.diff(lrs) != 0)
        assert np.all(lrs.astype(np.float32).astype(np.float64) != lrs)


# ---------------------------------------------------------------------------------------------
# Bitwise against the frameworks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_rule_replays_the_framework_trajectory_bitwise(case: dict[str, Any]) -> None:
    rule = rule_from_dict(case["rule"])
    run = replay(case, rule.update)
    assert run.first_divergent_step is None, (
        f"{case['id']}: the values first differ from {case['reference']} after step {run.first_divergent_step} "
        f"(0-based, lr={float(ARRAYS[case['lrs']][run.first_divergent_step])!r}); "
        f"after step {STEPS - 1}: {final_diffs(case, run.values)}"
    )
    for name, ours, vel in zip(PARAM_NAMES, run.values, run.velocities, strict=True):
        theirs = ARRAYS[f"{case['id']}/value/{name}"]
        assert bitwise_equal(ours, theirs), f"{case['id']} {name}: {final_diffs(case, run.values)}"
        if case["has_velocity"]:
            golden_velocity = ARRAYS[f"{case['id']}/velocity/{name}"]
            assert vel is not None, f"{case['id']} {name}: no velocity, the framework has one"
            assert bitwise_equal(vel, golden_velocity), (
                f"{case['id']} {name}: final velocity differs, "
                f"max abs diff {float(np.max(np.abs(np.asarray(vel) - golden_velocity))):.3g}"
            )
        else:
            assert vel is None, f"{case['id']} {name}: Keras without momentum keeps no velocity"


# Variants that are the same rule in exact arithmetic but round differently: each must miss
# the goldens, or the goldens would not tell a faithful port from a plausible one.


def keras_momentum_in_dtype(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """Keras m=0.9 without rounding momentum through float32 (float64 params)."""
    dt = value.dtype.type
    v = np.zeros_like(value) if velocity is None else velocity
    v = v * dt(0.9) - grad * dt(np.float32(lr))
    return value + v, v


def keras_lr_in_dtype(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """Keras m=0.9 without rounding lr through float32 (float64 params)."""
    dt = value.dtype.type
    v = np.zeros_like(value) if velocity is None else velocity
    v = v * dt(np.float32(0.9)) - grad * dt(lr)
    return value + v, v


def keras_velocity_in_float64(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """Keras m=0.9 with ``v*m - g*lr`` fused (evaluated in float64, rounded once to float32)."""
    v = np.zeros_like(value) if velocity is None else velocity
    wide = v.astype(np.float64) * float(np.float32(0.9)) - grad.astype(np.float64) * float(np.float32(lr))
    v = wide.astype(value.dtype)
    return value + v, v


def tf1_fused_apply(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """TF1 m=0.9 with ``var - lr*accum`` as one fused multiply-add (torch's, XLA's style)."""
    m = value.dtype.type(np.float32(0.9))
    accum = grad.copy() if velocity is None else velocity * m + grad
    return fma(-float(np.float32(lr)), accum, value), accum


def tf1_lr_in_dtype(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """TF1 m=0.9 without rounding lr through float32 (float64 params)."""
    m = value.dtype.type(np.float32(0.9))
    accum = grad.copy() if velocity is None else velocity * m + grad
    return value - accum * value.dtype.type(lr), accum


def ema_reordered(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """EMA m=0.9 as ``v + (1-m)*(g - v)``: the same average, other roundings."""
    dt = value.dtype.type
    v = np.zeros_like(value) if velocity is None else velocity
    v = v + dt(1 - 0.9) * (grad - v)
    return value + v * dt(-lr), v


def ema_fused_apply(value: Array, velocity: Array | None, grad: Array, lr: float) -> tuple[Array, Array]:
    """EMA m=0.9 with ``p - lr*v`` fused, as ``jax.jit`` compiles it."""
    dt = value.dtype.type
    v = grad * dt(1 - 0.9) if velocity is None else grad * dt(1 - 0.9) + velocity * dt(0.9)
    return fma(-lr, v, value), v


NEGATIVE_CONTROLS = [
    ("keras-m0.9-float64", keras_momentum_in_dtype),
    ("keras-m0.9-float64", keras_lr_in_dtype),
    ("keras-m0.9-float32", keras_velocity_in_float64),
    ("tf1-m0.9-float32", tf1_fused_apply),
    ("tf1-m0.9-float64", tf1_lr_in_dtype),
    ("ema-m0.9-float32", ema_reordered),
    ("ema-m0.9-float64", ema_reordered),
    ("ema-m0.9-float32", ema_fused_apply),
    ("ema-m0.9-float64", ema_fused_apply),
]


@pytest.mark.parametrize(
    ("case_id", "variant"), NEGATIVE_CONTROLS, ids=[f"{c}-{v.__name__}" for c, v in NEGATIVE_CONTROLS]
)
def test_goldens_reject_a_differently_rounded_variant(case_id: str, variant: Update) -> None:
    case = CASE_BY_ID[case_id]
    assert rule_from_dict(case["rule"]).to_dict()["momentum"] == 0.9
    run = replay(case, variant)
    assert run.first_divergent_step is not None, f"{variant.__name__} matches {case_id}: the golden has no teeth"
    assert not all(
        bitwise_equal(v, ARRAYS[f"{case_id}/value/{n}"]) for n, v in zip(PARAM_NAMES, run.values, strict=True)
    )


def test_textbook_momentum_is_keras_with_the_velocity_negated() -> None:
    """``v = beta*v + eta*g; theta = theta - v``, written out here op by op in float32, is Keras SGD."""
    case = CASE_BY_ID["keras-m0.9-float32"]
    rule = KerasSGD(lr=0.01, momentum=0.9)
    values, grads = golden_inputs(case)
    lrs = ARRAYS[case["lrs"]]
    beta = np.float32(0.9)
    theta = [v.copy() for v in values]
    v_text: list[Array] = [np.zeros_like(v) for v in values]
    v_ours: list[Array | None] = [None] * len(values)
    for k in range(STEPS):
        eta = np.float32(lrs[k])
        for i, g in enumerate(split(grads[k])):
            v_text[i] = beta * v_text[i] + eta * g
            theta[i] = theta[i] - v_text[i]
            values[i], v_ours[i] = rule.update(values[i], v_ours[i], g, float(lrs[k]))
            assert bitwise_equal(theta[i], values[i]), f"step {k}, {PARAM_NAMES[i]}"
            assert bitwise_equal(v_text[i], -np.asarray(v_ours[i])), f"step {k}, {PARAM_NAMES[i]}"
    for name, t in zip(PARAM_NAMES, theta, strict=True):
        assert bitwise_equal(t, ARRAYS[f"{case['id']}/value/{name}"])


# ---------------------------------------------------------------------------------------------
# previous_delta against exact arithmetic
# ---------------------------------------------------------------------------------------------

_FORMATS = {np.dtype(np.float32): (24, -126), np.dtype(np.float64): (53, -1022)}  # significand bits, min exponent


def round_to(x: Fraction, dtype: Any) -> Fraction:
    """``x`` rounded to the nearest number of ``dtype``, ties to even (subnormals included, no overflow)."""
    digits, emin = _FORMATS[np.dtype(dtype)]
    if x == 0:
        return Fraction(0)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2**(e-1) < a < 2**(e+1)
    if a < Fraction(2) ** e:
        e -= 1  # now 2**e <= a < 2**(e+1)
    ulp = Fraction(2) ** (max(e, emin) - digits + 1)
    q, r = divmod(a, ulp)
    if 2 * r > ulp or (2 * r == ulp and q % 2 == 1):
        q += 1
    result = q * ulp
    assert result < Fraction(2) ** (2 ** (np.finfo(dtype).nexp - 1)), "overflow"
    return result if x > 0 else -result


def exact(x: Any) -> Fraction:
    return Fraction(float(x))  # float32 and float64 numbers are exactly Python floats


def to_array(xs: list[Fraction], dtype: Any, shape: tuple[int, ...]) -> Array:
    return np.array([float(x) for x in xs], dtype=dtype).reshape(shape)  # exact: xs are dtype numbers


def test_round_to_agrees_with_the_hardware_on_single_operations() -> None:
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        a = (rng.standard_normal(200) * 1e3).astype(dtype)
        b = rng.standard_normal(200).astype(dtype)
        for x, y in zip(a, b, strict=True):
            assert round_to(exact(x) * exact(y), dtype) == exact(x * y)
            assert round_to(exact(x) - exact(y), dtype) == exact(x - y)
    tiny = np.float32(3e-39)  # subnormal results round at a fixed exponent
    for k in range(1, 50):
        assert round_to(exact(tiny) / k, np.float32) == exact(tiny / np.float32(k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.9, 0.37, 1.25])
def test_previous_delta_matches_exact_arithmetic_rounded_per_operation(dtype: Any, momentum: float) -> None:
    """``delta = RN(lr*g); p = RN(RN(p - delta) - RN(m*delta_prev))``, element by element, 300 steps."""
    steps, shape = 300, (7,)
    rng = np.random.default_rng(11)
    value = rng.standard_normal(shape).astype(dtype)
    lrs = ARRAYS["lrs/main"][:steps] * 10
    rule = PreviousDelta(lr=0.1, momentum=momentum)
    velocity: Array | None = None
    p_ref = [exact(x) for x in value]
    prev_ref: list[Fraction] | None = None
    m = round_to(Fraction(momentum), dtype)
    for k in range(steps):
        grad = rng.standard_normal(shape).astype(dtype)
        lr = round_to(Fraction(float(lrs[k])), dtype)
        delta = [round_to(exact(g) * lr, dtype) for g in grad]
        p_ref = [round_to(p - d, dtype) for p, d in zip(p_ref, delta, strict=True)]
        if prev_ref is not None:
            p_ref = [round_to(p - round_to(m * d, dtype), dtype) for p, d in zip(p_ref, prev_ref, strict=True)]
        prev_ref = delta
        value, velocity = rule.update(value, velocity, grad, float(lrs[k]))
        assert bitwise_equal(value, to_array(p_ref, dtype, shape)), f"step {k}"
        assert bitwise_equal(velocity, to_array(prev_ref, dtype, shape)), f"step {k}"


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def small_arrays(dtype: Any, shape: tuple[int, ...]) -> st.SearchStrategy[Array]:
    elements = st.floats(-1e3, 1e3, width=32) if dtype == np.float32 else st.floats(-1e3, 1e3)
    return hnp.arrays(dtype, shape, elements=elements)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.sampled_from([(), (1,), (5,), (2, 3)]),
    data=st.data(),
)
def test_without_momentum_every_rule_is_plain_sgd(dtype: Any, shape: tuple[int, ...], data: st.DataObject) -> None:
    """With momentum 0 (and no weight decay) each rule is ``p - lr*g``, rounded as its framework rounds:

    * ``pytorch``: ``RN(p - lr*g)``, one rounding (torch's fused multiply-add).
    * ``tf1``, ``keras``: ``RN(p - RN(lr32*g))``, two roundings, with lr first rounded to float32.
    * ``ema``, ``previous_delta``: ``RN(p - RN(lr*g))``, two roundings, lr rounded to the dtype.

    The velocity they carry (tf1's accumulator is the last gradient, ema's too, previous_delta's
    the last ``lr*g``) is multiplied by 0 and drops out. Compared as numbers, not bits: a zero's
    sign may differ (e.g. ema adds ``0*v`` to ``1*g``, which turns ``g = -0.0`` into ``+0.0``).
    """
    rules: list[AnyRule] = [
        SGDConfig(lr=0.1),
        TF1Momentum(lr=0.1),
        KerasSGD(lr=0.1),
        EMAMomentum(lr=0.1),
        PreviousDelta(lr=0.1),
    ]
    value0 = data.draw(small_arrays(dtype, shape), label="value")
    steps = [
        (data.draw(small_arrays(dtype, shape), label="grad"), data.draw(st.floats(1e-6, 10.0), label="lr"))
        for _ in range(3)
    ]
    for rule in rules:
        value, velocity = value0, None
        for grad, lr in steps:
            if rule.name == "pytorch":
                lr_seen = round_to(Fraction(lr), dtype)
                expected = [round_to(exact(p) - lr_seen * exact(g), dtype) for p, g in pairs(value, grad)]
            else:
                lr_seen = round_to(Fraction(float(np.float32(lr)) if rule.name in ("tf1", "keras") else lr), dtype)
                expected = [
                    round_to(exact(p) - round_to(lr_seen * exact(g), dtype), dtype) for p, g in pairs(value, grad)
                ]
            value, velocity = rule.update(value, velocity, grad, lr)
            assert np.asarray(value).dtype == dtype and np.shape(value) == shape
            assert np.array_equal(value, to_array(expected, dtype, shape)), rule.name


def pairs(a: Any, b: Any) -> list[tuple[Any, Any]]:
    return list(zip(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1), strict=True))


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    m=st.floats(0.05, 0.8),
    lr=st.floats(1e-3, 0.1),
)
def test_constant_gradient_speeds(dtype: Any, m: float, lr: float) -> None:
    """On a steady slope: momentum builds up to ``lr*g/(1-m)`` per step (pytorch, tf1, keras), the
    ema moves ``lr*g``, and previous_delta only ``lr*g*(1+m)`` (after its first step, ``lr*g``).

    tf1 and keras see lr and m rounded to float32, which shows at float64's tolerance.
    """
    steps = 160  # m**160 < 4e-16: the geometric series has converged
    grad = np.array([0.1, -1.0, 3.0, 7.5], dtype=dtype)
    rtol = 2e-4 if dtype == np.float32 else 1e-10
    lr32, m32 = float(np.float32(lr)), float(np.float32(m))
    speeds: list[tuple[AnyRule, Array]] = [
        (SGDConfig(lr=lr, momentum=m), lr * grad / (1 - m)),
        (TF1Momentum(lr=lr, momentum=m), lr32 * grad / (1 - m32)),
        (KerasSGD(lr=lr, momentum=m), lr32 * grad / (1 - m32)),
        (EMAMomentum(lr=lr, momentum=m), lr * grad),
        (PreviousDelta(lr=lr, momentum=m), lr * grad * (1 + m)),
    ]
    for rule, speed in speeds:
        values = [np.zeros_like(grad)]
        velocity = None
        for _ in range(steps):
            value, velocity = rule.update(values[-1], velocity, grad, lr)
            values.append(value)
        moves = -np.diff(np.array(values, dtype=np.float64), axis=0)  # exact: differences of dtype numbers
        np.testing.assert_allclose(moves[-1], speed, rtol=rtol, err_msg=rule.name)
        if rule.name == "previous_delta":
            np.testing.assert_allclose(moves[0], lr * grad, rtol=rtol)
            np.testing.assert_allclose(moves[1:], np.broadcast_to(speed, moves[1:].shape), rtol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_zero_stops_lr_outside_rules_at_once_and_lets_keras_coast(dtype: Any) -> None:
    """Where lr sits decides what ``lr -> 0`` does: outside the velocity (pytorch, tf1, ema) the
    value stops at once; keras keeps moving by ``m*v``; previous_delta echoes its last step once."""
    m = 0.9
    rng = np.random.default_rng(3)
    warm = [rng.standard_normal(17).astype(dtype) for _ in range(20)]
    after = [rng.standard_normal(17).astype(dtype) for _ in range(3)]  # nonzero gradients keep coming
    rules: list[AnyRule] = [
        SGDConfig(lr=0.05, momentum=m),
        TF1Momentum(lr=0.05, momentum=m),
        EMAMomentum(lr=0.05, momentum=m),
        KerasSGD(lr=0.05, momentum=m),
        PreviousDelta(lr=0.05, momentum=m),
    ]
    for rule in rules:
        value, velocity = np.ones(17, dtype=dtype), None
        for g in warm:
            value, velocity = rule.update(value, velocity, g, 0.05)
        for k, g in enumerate(after):
            assert velocity is not None
            new, new_velocity = rule.update(value, velocity, g, 0.0)
            if rule.name in ("pytorch", "tf1", "ema"):
                assert bitwise_equal(new, value), f"{rule.name} moved at lr 0"
            elif rule.name == "keras":
                coast = velocity * dtype(np.float32(m))
                assert not np.array_equal(new, value)
                assert bitwise_equal(new_velocity, coast) and bitwise_equal(new, value + coast)
            else:
                echo = velocity * dtype(m)
                if k == 0:
                    assert not np.array_equal(new, value)
                    assert bitwise_equal(new, value - echo)
                else:
                    assert bitwise_equal(new, value), "previous_delta echoes only once"
                assert not np.any(new_velocity)
            value, velocity = new, new_velocity


ALL_RULES: list[AnyRule] = [
    SGDConfig(0.1, 0.9),
    KerasSGD(0.1, 0.9, True, 0.01),
    TF1Momentum(0.1, 0.9, True),
    EMAMomentum(0.1, 0.9),
    PreviousDelta(0.1, 0.9),
]


@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
def test_update_keeps_dtype_and_shape_and_leaves_inputs_alone(rule: Any, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        value, grad = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        velocity = None
        for _ in range(2):
            before = (value.copy(), None if velocity is None else np.array(velocity, copy=True), grad.copy())
            new, new_velocity = rule.update(value, velocity, grad, 0.01)
            assert bitwise_equal(value, before[0]) and bitwise_equal(grad, before[2])
            if velocity is not None:
                assert bitwise_equal(velocity, before[1])
            assert np.asarray(new).dtype == dtype and np.shape(new) == shape
            assert new_velocity is not None
            assert np.asarray(new_velocity).dtype == dtype and np.shape(new_velocity) == shape
            value, velocity = np.asarray(new), new_velocity


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

VALID = [
    {
        "rule": "pytorch",
        "lr": 0.1,
        "momentum": 0.9,
        "dampening": 0.0,
        "nesterov": True,
        "weight_decay": 1e-4,
        "maximize": False,
    },
    {"rule": "keras", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.004},
    {"rule": "tf1", "lr": 0.1, "momentum": 0.99, "nesterov": False},
    {"rule": "ema", "lr": 0.1, "momentum": 0.5},
    {"rule": "previous_delta", "lr": 0.1, "momentum": 0.9},
]
NUMBER_FIELDS = [(d["rule"], f) for d in VALID for f, v in d.items() if isinstance(v, float)]
BOOL_FIELDS = [(d["rule"], f) for d in VALID for f, v in d.items() if isinstance(v, bool)]


def valid(rule: str) -> dict[str, Any]:
    return dict(next(d for d in VALID if d["rule"] == rule))


def test_every_rule_is_covered() -> None:
    assert {d["rule"] for d in VALID} == set(RULES)


@pytest.mark.parametrize("data", VALID, ids=[str(d["rule"]) for d in VALID])
def test_to_dict_round_trips(data: dict[str, Any]) -> None:
    rule = rule_from_dict(data)
    assert rule.to_dict() == data
    again = rule_from_dict(json.loads(json.dumps(rule.to_dict())))
    assert again == rule and type(again) is type(rule)


def test_rule_defaults_to_pytorch_and_ints_become_floats() -> None:
    default = rule_from_dict({"lr": 1})
    assert isinstance(default, SGDConfig) and default.to_dict() == SGDConfig(lr=1.0).to_dict()
    d = rule_from_dict({"rule": "tf1", "lr": 1, "momentum": 0}).to_dict()
    assert d == {"rule": "tf1", "lr": 1.0, "momentum": 0.0, "nesterov": False}
    assert type(d["lr"]) is float and type(d["momentum"]) is float
    # the frameworks' own bounds are inclusive: Keras accepts momentum 1, and so do we
    assert rule_from_dict({"rule": "keras", "lr": 0.1, "momentum": 1}).to_dict()["momentum"] == 1.0


@pytest.mark.parametrize("name", ["adam", "Keras", "", 3, None])
def test_unknown_rule(name: Any) -> None:
    with pytest.raises(ValueError, match=r"unknown rule .*; the rules are: pytorch, keras, tf1, ema, previous_delta"):
        rule_from_dict({"rule": name, "lr": 0.1})


@pytest.mark.parametrize(
    ("rule", "field", "fields"),
    [
        ("keras", "dampening", "lr, momentum, nesterov, weight_decay"),
        ("tf1", "weight_decay", "lr, momentum, nesterov"),
        ("ema", "nesterov", "lr, momentum"),
        ("previous_delta", "beta", "lr, momentum"),
        ("pytorch", "learning_rate", "lr, momentum, dampening, nesterov, weight_decay, maximize"),
    ],
)
def test_unknown_field_names_the_rules_fields(rule: str, field: str, fields: str) -> None:
    with pytest.raises(
        ValueError, match=rf"rule '{rule}' has no hyperparameter {field}; its hyperparameters are: {fields}$"
    ):
        rule_from_dict({**valid(rule), field: 0.1})


@pytest.mark.parametrize("rule", sorted(RULES))
def test_lr_is_required(rule: str) -> None:
    data = valid(rule)
    del data["lr"]
    with pytest.raises(ValueError, match="lr is required"):
        rule_from_dict(data)


@pytest.mark.parametrize(("rule", "field"), NUMBER_FIELDS, ids=[f"{r}.{f}" for r, f in NUMBER_FIELDS])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (-0.5, "must be >= 0"),
        (float("nan"), "must be finite"),
        (float("inf"), "must be finite"),
        (float("-inf"), "must be finite"),
        (True, "must be a number"),
        ("0.1", "must be a number"),
        (None, "must be a number"),
    ],
    ids=["negative", "nan", "inf", "-inf", "bool", "str", "none"],
)
def test_bad_numbers(rule: str, field: str, bad: Any, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} {message}, got "):
        rule_from_dict({**valid(rule), field: bad})


@pytest.mark.parametrize(("rule", "field"), BOOL_FIELDS, ids=[f"{r}.{f}" for r, f in BOOL_FIELDS])
@pytest.mark.parametrize("bad", [1, 0, 1.0, "true", None])
def test_bad_booleans(rule: str, field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be a boolean, got "):
        rule_from_dict({**valid(rule), field: bad})


@pytest.mark.parametrize("rule", ["keras", "ema"])
def test_momentum_above_one_is_rejected_where_the_rule_averages(rule: str) -> None:
    with pytest.raises(ValueError, match=r"^momentum must be between 0 and 1, got 1\.5$"):
        rule_from_dict({**valid(rule), "momentum": 1.5})


def test_pytorch_nesterov_needs_momentum() -> None:
    with pytest.raises(ValueError, match="nesterov momentum requires momentum > 0"):
        rule_from_dict({"rule": "pytorch", "lr": 0.1, "nesterov": True})


@pytest.mark.parametrize("data", VALID, ids=[str(d["rule"]) for d in VALID])
def test_updated_validates(data: dict[str, Any]) -> None:
    rule = rule_from_dict(data)
    changed = rule.updated(lr=0.5, momentum=0.25)
    assert changed.to_dict() == {**data, "lr": 0.5, "momentum": 0.25}
    assert rule.to_dict() == data  # the original is untouched
    for bad in ({"lr": -1.0}, {"momentum": float("nan")}, {"lr": True}):
        with pytest.raises(ValueError, match="must be"):
            rule.updated(**bad)
    if "nesterov" in data:
        with pytest.raises(ValueError, match="nesterov must be a boolean"):
            rule.updated(nesterov=1)


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_a_0d_parameter_stays_a_0d_array(rule: Rule) -> None:
    value, velocity = np.array(1.5, np.float32), None
    for _ in range(2):
        value, velocity = rule.update(value, velocity, np.array(0.25, np.float32), 0.1)
        assert isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.float32
        assert velocity is None or (isinstance(velocity, np.ndarray) and velocity.shape == ())
