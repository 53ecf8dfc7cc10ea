"""Correctly rounded fused multiply-add over numpy arrays.

``torch.optim.SGD`` on CPU computes ``x.add(y, alpha=a)`` as ``fma(y, a, x)``: one
rounding for the product and the sum (AVX2/AVX-512 ``vfmadd``). numpy has no fma, and
the plain expression ``x + a * y`` rounds twice, which drifts away from torch by
1e-6..1e-5 over a thousand steps. This module computes the fused result exactly.

float32: the product of two float32 numbers is exact in float64 (24 + 24 bits < 53), so
``r = a*y + x`` in float64 has a single rounding error. Rounding ``r`` to float32 is
then correct except when ``r`` lies exactly halfway between two float32 numbers while
the true sum does not (double rounding). In the normal range such an ``r`` has the bit
pattern ``low 29 bits == 0x10000000`` (the test of musl's ``fmaf``), which random data
hits about once in 2**29 elements; for those candidates we recover the exact error of
the float64 sum (TwoSum) and move the result one float32 step towards it when needed.
A subnormal float32 result cannot be double rounded: the exact sum then spans fewer
than 53 bits, so ``r`` is exact. The overflow threshold matches the same bit test.
With ``a = +-1`` the product is exact in float32 and one float32 addition is already
correctly rounded, so no float64 detour is needed.

float64: emulated with error-free transformations and rounding to odd (Boldo and
Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
rounding to odd", IEEE TC 2008): ``a*y = uh + ul`` exactly (Dekker), ``x + ul = th + tl``
and ``uh + th = vh + vl`` exactly (TwoSum), then ``RN(vh + RO(tl + vl))``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import cast

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

__all__ = ["fma"]

_F32_LOW_BITS = np.uint64(0x1FFFFFFF)  # the 29 bits float64 has beyond float32's 24
_F32_HALFWAY = np.uint64(0x10000000)
_SPLITTER = 134217729.0  # 2**27 + 1, Dekker's constant for float64
_SPLIT_LIMIT = 2.0**995  # beyond this, y * _SPLITTER may overflow
_EXACT_PRODUCT_MIN = 2.0**-969  # below this, the product's error term may fall into the subnormals
_TWO_128 = 2.0**128  # where float32 rounds to infinity; stands in for +-inf below


def fma(alpha: float, y: npt.NDArray[np.floating], x: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """Return ``alpha * y + x`` rounded once to the dtype of ``x`` (like torch's ``x.add(y, alpha=alpha)``).

    ``alpha`` is first converted to that dtype, as torch converts its Python scalar.
    ``x`` and ``y`` must have the same dtype (float32 or float64) and shape.
    """
    if x.dtype == np.float32:
        return _fma32(alpha, cast(F32, y), cast(F32, x))
    if x.dtype == np.float64:
        return _fma64(alpha, cast(F64, y), cast(F64, x))
    raise TypeError(f"fma supports float32 and float64, not {x.dtype}")


def _fma32(alpha: float, y: npt.NDArray[np.float32], x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    a32 = np.float32(alpha)
    if a32 == 1 or a32 == -1:
        with np.errstate(over="ignore"):  # overflow is +-inf, as in torch
            return x + y if a32 == 1 else x - y
    prod = y.astype(np.float64)
    prod *= np.float64(a32)  # exact: a product of two float32 fits in float64
    r = np.add(prod, x, out=np.empty_like(prod))  # one float64 rounding
    with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as in torch
        out = r.astype(np.float32)
    low = r.view(np.uint64) & _F32_LOW_BITS
    halfway = low == _F32_HALFWAY
    if halfway.any():
        _fix_double_rounding(out, r, prod, x, np.flatnonzero(halfway))
    return out


def _fix_double_rounding(
    out: npt.NDArray[np.float32],
    r: npt.NDArray[np.float64],
    prod: npt.NDArray[np.float64],
    x: npt.NDArray[np.float32],
    idx: npt.NDArray[np.intp],
) -> None:
    """Correct the few elements where rounding float64 ``r`` to float32 rounded twice."""
    with np.errstate(invalid="ignore", over="ignore"):
        rs, ps, xs = r[idx], prod[idx], x[idx].astype(np.float64)
        # TwoSum: err is the exact rounding error of rs = ps + xs.
        bv = rs - ps
        err = (ps - (rs - bv)) + (xs - bv)
        f = out[idx]
        back = f.astype(np.float64)
        back = np.where(np.isinf(f) & np.isfinite(rs), np.copysign(_TWO_128, rs), back)
        d = rs - back
        other = np.nextafter(f, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)))
        halfway = (d != 0) & (2.0 * rs == back + other.astype(np.float64))
        # The true sum lies beyond the midpoint (away from f) when err points the same way as d.
        fix = halfway & (err != 0) & np.isfinite(err) & (np.sign(err) == np.sign(d))
    if fix.any():
        out[idx[fix]] = other[fix]


def _split(a: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    c = a * _SPLITTER
    hi = c - (c - a)
    return hi, a - hi


def _two_sum(
    a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    s = a + b
    bv = s - a
    return s, (a - (s - bv)) + (b - bv)


def _fma64(alpha: float, y: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    a = np.float64(alpha)
    if a == 1 or a == -1:
        with np.errstate(over="ignore"):  # overflow is +-inf, as in torch
            return x + y if a == 1 else x - y
    with np.errstate(invalid="ignore", over="ignore"):
        uh = y * a
        yh, yl = _split(y)
        ac = a * _SPLITTER
        ah = ac - (ac - a)
        al = a - ah
        ul = ((yh * ah - uh) + yh * al + yl * ah) + yl * al  # Dekker: y*a == uh + ul exactly
        th, tl = _two_sum(x, ul)
        vh, vl = _two_sum(uh, th)
        s, e = _two_sum(tl, vl)
        # Round s to odd: when inexact with an even last bit, step one ulp towards the exact
        # value (up in magnitude when e has s's sign, down otherwise); as integers, +-1.
        bits = s.view(np.int64)
        step = (e != 0) & ((bits & 1) == 0)
        if step.any():
            direction = np.where(np.signbit(s) == np.signbit(e), 1, -1)
            s = (bits + direction * step).view(np.float64)
        out = vh + s
        # The parts above lose the sign of a zero result. With a zero product (common: zero
        # gradients or parameters), IEEE's zero-sum rule gives it: the sign of uh + x.
        zero = out == 0
        if zero.any():
            out[zero] = np.copysign(0.0, uh[zero] + x[zero])
        product_nonzero = (y != 0) & (a != 0)
    # Exact slow path, for rare elements: near the top of the range, where Dekker's split
    # (y * 2**27) overflows; products below 2**-969, whose error term is not exact; anything
    # non-finite; and zero results of a nonzero product (exact cancellation, or underflow,
    # which keeps the sign of the exact value).
    slow = np.flatnonzero(
        ~np.isfinite(out)
        | (np.abs(y) > _SPLIT_LIMIT)
        | (np.abs(a) > _SPLIT_LIMIT)
        | (product_nonzero & ((np.abs(uh) < _EXACT_PRODUCT_MIN) | zero))
    )
    if slow.size:
        out[slow] = [_exact_fma(float(a), float(yi), float(xi)) for yi, xi in zip(y[slow], x[slow], strict=True)]
    return out


def _exact_fma(a: float, y: float, x: float) -> float:
    """Correctly rounded ``a*y + x`` by exact rational arithmetic (CPython rounds int/int correctly)."""
    if not (math.isfinite(a) and math.isfinite(y) and math.isfinite(x)):
        return a * y + x  # inf/nan propagate exactly as in a hardware fma
    exact = Fraction(a) * Fraction(y) + Fraction(x)
    if exact == 0:
        return math.copysign(0.0, a * y + x)  # Fractions have no signed zero; IEEE's zero-sum rule
    try:
        return float(exact)
    except OverflowError:
        return math.inf if exact > 0 else -math.inf
