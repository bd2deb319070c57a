"""TVM lowerings of the ops in ir/ops/math.py.

float32 inverse trigonometric, hyperbolic and ``tan`` kernels are branch-free
polynomials (Cephes' single-precision coefficients, ~1-2 ulp on their
reduced ranges) built from arithmetic, ``Select`` and ``sqrt``, so they
vectorize; TVM 0.27 lowers ``tirx.acos`` & co. on LLVM to one scalar libm call
per lane (``acosf``...), and ``tirx.sinh``/``cosh`` not at all.  The log-based
ones (acosh, asinh, atanh) use a vectorizable ``logf`` built from the float's
bits (``reinterpret``) and the rearrangements that keep them accurate near 0
and 1; sinh, cosh, mish, celu, selu and swish build on the vectorized
``exp`` of the elementwise family.  float64 calls libm (exact to an ulp);
float16/bfloat16 compute in float32 and round once, as the references do.

``tan`` (f32) reduces its argument exactly for every float32, in vectorized
float64 (see :func:`tan_f32`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tvm import te, tirx, topi

from . import LowerCtx, lowers
from .elementwise import (
    Expr,
    _float_to_int,
    _k,
    _libm,
    _via_f32,
    bcast,
    bits_of,
    dtype_of,
    exp,
    fmax,
    fmin,
    is_float,
    sigmoid,
    unary,
)

F32 = "float32"


def _poly(z: Expr, coeffs: Sequence[float]) -> Expr:
    """Horner: coeffs[0]*z**(n-1) + ... + coeffs[-1]."""
    acc = _k(coeffs[0], z)
    for c in coeffs[1:]:
        acc = acc * z + _k(c, z)
    return acc


def _copysign(mag: Expr, v: Expr) -> Expr:
    """mag (>= 0) with v's sign bit, for float32 (TVM 0.27 does not vectorize the Select form)."""
    i32 = "int32"
    sign = tirx.reinterpret(i32, v) & tirx.const(-(1 << 31), i32)
    return tirx.reinterpret(F32, tirx.reinterpret(i32, mag) | sign)


def _narrow(fn: Callable[[Expr], Expr]) -> Callable[[Expr], Expr]:
    """fn applied to f32/f64 as they are, to f16/bf16 in float32 and rounded once."""
    def apply(v: Expr) -> Expr:
        dt = dtype_of(v)
        return fn(v) if dt in (F32, "float64") else fn(v.astype(F32)).astype(dt)
    return apply


# ------------------------------------------------------------------ float32 kernels (Cephes)

_ASIN_P = (4.2163199048e-2, 2.4181311049e-2, 4.5470025998e-2, 7.4953002686e-2, 1.6666752422e-1)
_ATAN_P = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)
_TAN_P = (9.38540185543e-3, 3.11992232697e-3, 2.44301354525e-2, 5.34112807005e-2, 1.33387994085e-1,
          3.33331568548e-1)
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
# 2/pi in 29-bit parts (232 bits): x*part is exact in float64 for any float32 x
_TWO_OVER_PI = (0.636619770899415, 1.4681663246252086e-09, 2.2760100671971816e-18, 5.8812147387730434e-27,
                1.0346868700836215e-35, 3.783256351091319e-45, 3.720474878517739e-53, 4.227114694466663e-62)


def _asin_core(s: Expr, z: Expr) -> Expr:
    """asin(s) for |s| <= 0.5 given z = s*s."""
    return s + s * z * _poly(z, _ASIN_P)


def asin_f32(v: Expr) -> Expr:
    a = tirx.abs(v)
    big = a > _k(0.5, v)
    z = tirx.Select(big, _k(0.5, v) * (_k(1.0, v) - a), a * a)
    s = tirx.Select(big, tirx.sqrt(z), a)
    p = _asin_core(s, z)
    return _copysign(tirx.Select(big, _k(math.pi / 2, v) - (p + p), p), v)


def acos_f32(v: Expr) -> Expr:
    """pi/2 - asin(x) for |x| <= 0.5, else 2*asin(sqrt((1 -+ x)/2)) (no cancellation near +-1)."""
    big = tirx.abs(v) > _k(0.5, v)
    z = tirx.Select(big, _k(0.5, v) * (_k(1.0, v) - tirx.abs(v)), v * v)
    s = tirx.Select(big, tirx.sqrt(z), v)
    p = _asin_core(s, z)
    far = tirx.Select(v > _k(0.0, v), p + p, _k(math.pi, v) - (p + p))
    return tirx.Select(big, far, _k(math.pi / 2, v) - p)


def atan_f32(v: Expr) -> Expr:
    a = tirx.abs(v)
    big = a > _k(2.414213562373095, v)
    mid = a > _k(0.4142135623730950, v)
    t = tirx.Select(big, _k(-1.0, v) / a, tirx.Select(mid, (a - _k(1.0, v)) / (a + _k(1.0, v)), a))
    base = tirx.Select(big, _k(math.pi / 2, v), tirx.Select(mid, _k(math.pi / 4, v), _k(0.0, v)))
    z = t * t
    return _copysign(base + (_poly(z, _ATAN_P) * z * t + t), v)


def tan_f32(v: Expr) -> Expr:
    """tan(r) by polynomial (|r| <= pi/4) after an exact reduction x = j*pi/2 + r, -1/tan(r) for odd j.

    The reduction runs in float64 with 2/pi split into 29-bit parts C_i: x*C_i is exact (24 + 29
    bits), so are its integer and fractional parts, and the fractional parts summed give x*2/pi
    mod 1 to 2**-53 for every float32 x (a vectorizable Payne-Hanek reduction).
    """
    f64 = "float64"
    x = v.astype(f64)
    frac, odd = tirx.const(0.0, f64), tirx.const(0.0, f64)
    for c in _TWO_OVER_PI:
        p = x * tirx.const(c, f64)
        n = tirx.nearbyint(p)
        frac = frac + (p - n)
        odd = odd + (n - tirx.const(2.0, f64) * tirx.floor(n * tirx.const(0.5, f64)))
    n = tirx.nearbyint(frac)
    r = ((frac - n) * tirx.const(math.pi / 2, f64)).astype(F32)
    odd = odd + n
    odd = (odd - tirx.const(2.0, f64) * tirx.floor(odd * tirx.const(0.5, f64))) != tirx.const(0.0, f64)
    zz = r * r
    t = _poly(zz, _TAN_P) * zz * r + r
    return tirx.Select(odd, _k(-1.0, t) / t, tirx.Select(tirx.isinf(v), _k(math.nan, t), t))


def log_f32(v: Expr) -> Expr:
    """Natural log from the float's exponent and a polynomial in its mantissa (Cephes logf);
    subnormals are scaled first; log(0) = -inf, log(x < 0) = NaN, log(inf) = inf."""
    sub = v < _k(1.1754943508222875e-38, v)
    w = tirx.Select(sub, v * _k(8388608.0, v), v)
    bits = tirx.reinterpret("int32", w)
    i32 = "int32"
    e = ((bits >> tirx.const(23, i32)) & tirx.const(0xFF, i32)) - tirx.Select(
        sub, tirx.const(149, i32), tirx.const(126, i32))
    m = tirx.reinterpret(F32, (bits & tirx.const(-2139095041, i32)) | tirx.const(0x3F000000, i32))  # 0x807fffff
    low = m < _k(0.7071067811865476, v)
    e = e - tirx.Select(low, tirx.const(1, i32), tirx.const(0, i32))
    m = tirx.Select(low, m + m, m) - _k(1.0, v)
    ef = e.astype(F32)
    z = m * m
    y = _poly(m, _LOG_P) * m * z + _k(-2.12194440e-4, v) * ef - _k(0.5, v) * z
    r = m + y + _k(0.693359375, v) * ef
    r = tirx.Select(v == _k(0.0, v), _k(-math.inf, v), r)
    r = tirx.Select(v == _k(math.inf, v), v, r)
    return tirx.Select(tirx.Or(v < _k(0.0, v), tirx.isnan(v)), _k(math.nan, v), r)


def log1p_f32(u: Expr) -> Expr:
    """log(1 + u): for 1 + u in [sqrt(1/2), sqrt(2)] as 2*atanh(s), s = u/(2 + u) (|s| <= 0.172, series to
    s**9), where log(1 + u) would lose u's low bits; log(1 + u) beyond."""
    s = u / (_k(2.0, u) + u)
    z = s * s
    series = (s + s) * _poly(z, (1 / 9, 1 / 7, 1 / 5, 1 / 3, 1.0))
    near = tirx.And(u > _k(-0.2928932188134524, u), u < _k(0.41421356237309503, u))
    return tirx.Select(near, series, log_f32(_k(1.0, u) + u))


_LN2 = math.log(2.0)
_HUGE = 4096.0  # beyond it asinh(a) = log(2a) and acosh(a) = log(2a) to within 3e-8 relative


def asinh_f32(v: Expr) -> Expr:
    a = tirx.abs(v)
    near = log1p_f32(a + a * a / (_k(1.0, v) + tirx.sqrt(_k(1.0, v) + a * a)))
    return _copysign(tirx.Select(a > _k(_HUGE, v), log_f32(a) + _k(_LN2, v), near), v)


def acosh_f32(v: Expr) -> Expr:
    d = v - _k(1.0, v)
    near = log1p_f32(d + tirx.sqrt(d * (v + _k(1.0, v))))
    return tirx.Select(v > _k(_HUGE, v), log_f32(v) + _k(_LN2, v), near)


def atanh_f32(v: Expr) -> Expr:
    """sign(x)/2 * log1p(2|x|/(1-|x|)): +-inf at +-1, NaN beyond."""
    a = tirx.abs(v)
    y = _k(0.5, v) * log1p_f32((a + a) / (_k(1.0, v) - a))
    y = tirx.Select(a == _k(1.0, v), _k(math.inf, v), y)
    return _copysign(y, v)


# ------------------------------------------------------------------ trigonometric and hyperbolic


def _by_dtype(name: str, f32: Callable[[Expr], Expr]) -> None:
    """Lower ``name`` by the float32 kernel (f16/bf16 through it) and by libm for float64."""
    narrow = _narrow(f32)

    def lower(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
        return unary(lambda v: _libm(name, v) if dtype_of(v) == "float64" else narrow(v), x, name=f"T_{name}")
    lowers(name)(lower)


for _name, _f32 in (("acos", acos_f32), ("asin", asin_f32), ("atan", atan_f32), ("tan", tan_f32),
                    ("acosh", acosh_f32), ("asinh", asinh_f32), ("atanh", atanh_f32)):
    _by_dtype(_name, _f32)


def _hyperbolic(x: te.Tensor, odd: bool, name: str) -> te.Tensor:
    """sinh/cosh from h = exp(|x|/2): (h/2)*h -+ (1/2)/h/h, so e**|x| never overflows before the
    result does; sinh of |x| < 1 is Cephes' polynomial (no cancellation)."""
    if dtype_of(x) == "float64":
        return unary(lambda v: _libm("sinh" if odd else "cosh", v), x, name=name)
    if dtype_of(x) != F32:
        return _via_f32(lambda t: _hyperbolic(t, odd, name), x)
    h = exp(unary(lambda v: tirx.abs(v) * _k(0.5, v), x, name=f"{name}_half"), name=f"{name}_exp")

    def body(v: Expr, hv: Expr) -> Expr:
        big = (_k(0.5, v) * hv) * hv
        small = _k(0.5, v) / hv / hv
        if not odd:
            return big + small
        z = v * v
        poly = _poly(z, (2.03721912945e-4, 8.33028376239e-3, 1.66667160211e-1)) * z * v + v
        return tirx.Select(tirx.abs(v) < _k(1.0, v), poly, _copysign(big - small, v))
    return bcast(body, x, h, name=name)


@lowers("sinh")
def sinh(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _hyperbolic(x, True, "T_sinh")


@lowers("cosh")
def cosh(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _hyperbolic(x, False, "T_cosh")


# ------------------------------------------------------------------ predicates


@lowers("is_nan")
def is_nan(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return unary(lambda v: tirx.isnan(v.astype(F32) if bits_of(v) == 16 else v), x, name="T_is_nan")


@lowers("is_inf")
def is_inf(ctx: LowerCtx, x: te.Tensor, *, detect_negative: int, detect_positive: int) -> te.Tensor:
    def fn(v: Expr) -> Expr:
        v = v.astype(F32) if bits_of(v) == 16 else v
        hit = tirx.const(False, "bool")
        if detect_positive:
            hit = tirx.Or(hit, v == _k(math.inf, v))
        if detect_negative:
            hit = tirx.Or(hit, v == _k(-math.inf, v))
        return hit
    return unary(fn, x, name="T_is_inf")


# ------------------------------------------------------------------ activations


def expm1(u: te.Tensor, name: str) -> te.Tensor:
    """e**u - 1: libm for float64; for float32 a degree-7 Taylor polynomial where |u| < 0.5 (e - 1
    would cancel there) and the vectorized exp beyond."""
    if dtype_of(u) == "float64":
        return unary(lambda v: _libm("expm1", v), u, name=name)
    e = exp(u, name=f"{name}_exp")

    def body(v: Expr, ev: Expr) -> Expr:
        taylor = _poly(v, (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0)) * v
        return tirx.Select(tirx.abs(v) < _k(0.5, v), taylor, ev - _k(1.0, v))
    return bcast(body, u, e, name=name)


def _wide(x: te.Tensor, fn: Callable[[te.Tensor], te.Tensor]) -> te.Tensor:
    """fn in float32 for f16/bf16 (rounded once), directly for f32/f64."""
    return _via_f32(fn, x) if dtype_of(x) not in (F32, "float64") else fn(x)


@lowers("celu")
def celu(ctx: LowerCtx, x: te.Tensor, *, alpha: float) -> te.Tensor:
    def f(t: te.Tensor) -> te.Tensor:
        em1 = expm1(unary(lambda v: v / _k(alpha, v), t, name="T_celu_in"), "T_celu_expm1")

        def body(v: Expr, m: Expr) -> Expr:
            return fmax(_k(0.0, v), v) + fmin(_k(0.0, v), _k(alpha, v) * m)
        return bcast(body, t, em1, name="T_celu")
    return _wide(x, f)


@lowers("selu")
def selu(ctx: LowerCtx, x: te.Tensor, *, alpha: float, gamma: float) -> te.Tensor:
    def f(t: te.Tensor) -> te.Tensor:
        em1 = expm1(t, "T_selu_expm1")

        def body(v: Expr, m: Expr) -> Expr:
            return _k(gamma, v) * tirx.Select(v > _k(0.0, v), v, _k(alpha, v) * m)
        return bcast(body, t, em1, name="T_selu")
    return _wide(x, f)


@lowers("mish")
def mish(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    """x*tanh(softplus(x)) = x*(n*n + 2n)/(n*n + 2n + 2) with n = e**x (1 beyond x = 20)."""
    def f(t: te.Tensor) -> te.Tensor:
        e = exp(t, name="T_mish_exp")

        def body(v: Expr, n: Expr) -> Expr:
            q = n * n + (n + n)
            return v * tirx.Select(v > _k(20.0, v), _k(1.0, v), q / (q + _k(2.0, v)))
        return bcast(body, t, e, name="T_mish")
    return _wide(x, f)


@lowers("swish")
def swish(ctx: LowerCtx, x: te.Tensor, *, alpha: float) -> te.Tensor:
    def f(t: te.Tensor) -> te.Tensor:
        s = sigmoid(unary(lambda v: v * _k(alpha, v), t, name="T_swish_in"), name="T_swish_sig")
        return bcast(lambda v, sv: v * sv, t, s, name="T_swish")
    return _wide(x, f)


@lowers("softsign")
def softsign(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    fn = _narrow(lambda v: v / (_k(1.0, v) + tirx.abs(v)))
    return unary(fn, x, name="T_softsign")


@lowers("thresholded_relu")
def thresholded_relu(ctx: LowerCtx, x: te.Tensor, *, alpha: float) -> te.Tensor:
    """x > alpha ? x : 0, compared in float32 for f16/bf16 (alpha is not rounded to them)."""
    def fn(v: Expr) -> Expr:
        w = v.astype(F32) if bits_of(v) == 16 else v
        return tirx.Select(w > _k(alpha, w), v, _k(0.0, v))
    return unary(fn, x, name="T_thresholded_relu")


@lowers("shrink")
def shrink(ctx: LowerCtx, x: te.Tensor, *, bias: float, lambd: float) -> te.Tensor:
    """Floats in float32 (f64 for f64); integers in float64, truncated back as a cast does."""
    dt = dtype_of(x)
    ct = "float64" if dt == "float64" or not is_float(dt) else F32

    def fn(v: Expr) -> Expr:
        w = v.astype(ct)
        y = tirx.Select(w < _k(-lambd, w), w + _k(bias, w),
                        tirx.Select(w > _k(lambd, w), w - _k(bias, w), _k(0.0, w)))
        return y.astype(dt) if is_float(dt) else _float_to_int(tirx.trunc(y), dt)
    return unary(fn, x, name="T_shrink")


# ------------------------------------------------------------------ logic and bitwise


@lowers("xor")
def xor(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.logical_xor(a, b)


@lowers("bitwise_and")
def bitwise_and(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return bcast(lambda p, q: p & q, a, b, name="T_bitwise_and")


@lowers("bitwise_or")
def bitwise_or(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return bcast(lambda p, q: p | q, a, b, name="T_bitwise_or")


@lowers("bitwise_xor")
def bitwise_xor(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return bcast(lambda p, q: p ^ q, a, b, name="T_bitwise_xor")


@lowers("bitwise_not")
def bitwise_not(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return unary(tirx.bitwise_not, x, name="T_bitwise_not")


@lowers("bit_shift")
def bit_shift(ctx: LowerCtx, x: te.Tensor, y: te.Tensor, *, direction: str) -> te.Tensor:
    """Shifts by 0 <= y < bits; others give the sign fill. Left shifts of signed values run on the
    unsigned type (they wrap; a signed shl past the sign bit would be undefined)."""
    dt = dtype_of(x)
    signed = dt.startswith("int")
    udt = "u" + dt if signed else dt

    def fn(v: Expr, s: Expr) -> Expr:
        zero = _k(0, v)
        bad = s >= _k(bits_of(v), s)
        if signed:
            bad = tirx.Or(bad, s < zero)
        s = tirx.Select(bad, zero, s)
        if direction == "LEFT":
            shifted = (v.astype(udt) << s.astype(udt)).astype(dt)
            return tirx.Select(bad, zero, shifted)
        fill = tirx.Select(v < zero, _k(-1, v), zero) if signed else zero
        return tirx.Select(bad, fill, v >> s)
    return bcast(fn, x, y, name="T_bit_shift")
