"""Correctly rounded fused multiply-add over numpy arrays.

``torch.optim.SGD`` on CPU computes ``x.add(y, alpha=a)`` as ``fma(y, a, x)``: one
rounding for the product and the sum (AVX2/AVX-512 ``vfmadd``). numpy has no fma, and
the plain expression ``x + a * y`` rounds twice, which drifts away from torch by
1e-6..1e-5 over a thousand steps. This module computes the fused result exactly.

float32: the product of two float32 numbers is exact in float64 (24 + 24 bits < 53), so
``r = a*y + x`` in float64 has a single rounding error. Rounding ``r`` to float32 is
then correct except when ``r`` lies exactly halfway between two float32 numbers while
the true sum does not (double rounding). Such an ``r`` has at least 28 trailing zero
bits, which is rare for real data; for those candidates we recover the exact error of
the float64 sum (TwoSum) and move the result one float32 step towards it when needed.
Subnormal results and the overflow threshold are handled by the same test.

float64: emulated with error-free transformations and rounding to odd (Boldo and
Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
rounding to odd", IEEE TC 2008): ``a*y = uh + ul`` exactly (Dekker), ``x + ul = th + tl``
and ``uh + th = vh + vl`` exactly (TwoSum), then ``RN(vh + RO(tl + vl))``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

__all__ = ["fma"]

_F32_CANDIDATE_MASK = np.uint64(0x0FFFFFFF)
_SPLITTER = 134217729.0  # 2**27 + 1, Dekker's constant for float64
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
    a = np.float64(np.float32(alpha))
    prod = y.astype(np.float64)
    prod *= a  # exact: a product of two float32 fits in float64
    r = prod + x  # one float64 rounding
    with np.errstate(over="ignore"):  # beyond float32's range is +-inf, as in torch
        out = r.astype(np.float32)
    candidates = np.flatnonzero((r.view(np.uint64) & _F32_CANDIDATE_MASK) == 0)
    if candidates.size:
        _fix_double_rounding(out, r, prod, x, candidates)
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
    a = float(alpha)
    with np.errstate(invalid="ignore", over="ignore"):
        uh = y * a
        yh, yl = _split(y)
        ah, al = _split(np.asarray(a, dtype=np.float64))
        ul = ((yh * ah - uh) + yh * al + yl * ah) + yl * al  # Dekker: y*a == uh + ul exactly
        th, tl = _two_sum(x, ul)
        vh, vl = _two_sum(uh, th)
        s, e = _two_sum(tl, vl)
        # Round s to odd: if inexact and its last bit is even, step towards the exact value.
        even = (s.view(np.uint64) & np.uint64(1)) == 0
        step = (e != 0) & even & np.isfinite(e)
        if step.any():
            s = np.where(step, np.nextafter(s, np.copysign(np.inf, e)), s)
        out = vh + s
        # Products or sums that overflow or are non-finite: the plain result is the IEEE answer.
        bad = ~np.isfinite(out) | ~np.isfinite(uh)
        if bad.any():
            out = np.where(bad, uh + x, out)
    return out
