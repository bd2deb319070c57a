"""TVM lowerings of the ops in ir/ops/elementwise.py (numpy broadcasting, ONNX semantics).

float32 exp, tanh and erf use TVM's vectorizable polynomial forms
(``topi.fast_exp``/``fast_tanh``/``fast_erf``, a few ulp) instead of one scalar
libm call per vector lane; other dtypes and functions call libm.  Float
max/min/clip/relu propagate NaN like numpy's ``maximum``/``minimum``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tvm import DataType, te, tirx, topi
from tvm.ir.expr import ExprWithOp

from . import LowerCtx, lowers, tvm_dtype

Expr = ExprWithOp
Fn = Callable[..., Expr]


def _c(value: float, dtype: str) -> Expr:
    return tirx.const(value, dtype)


def _k(value: float, like) -> Expr:
    """A constant of ``like``'s dtype."""
    return tirx.const(value, dtype_of(like))


def dtype_of(v) -> str:
    """The dtype of a dtype name, tensor, tensor element or PrimExpr (which carries it as ``ty``)."""
    if isinstance(v, str):
        return v
    return str(v.dtype if hasattr(v, "dtype") else v.ty)


def is_float(v) -> bool:
    return dtype_of(v).startswith(("float", "bfloat"))


def _signed(v) -> bool:
    return dtype_of(v).startswith("int")


def _wide(v) -> str:
    """float64 for f64, else float32 (f16/bf16 compute in f32)."""
    return "float64" if dtype_of(v) == "float64" else "float32"


def bits_of(v) -> int:
    return DataType(dtype_of(v)).bits


def broadcast_shape(*shapes) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {int(s[i - rank + len(s)]) for s in shapes if i - rank + len(s) >= 0}
        dims.discard(1)
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _index(t: te.Tensor, idx: tuple, rank: int) -> Expr:
    """``t`` read at output index ``idx`` under numpy broadcasting."""
    off = rank - len(t.shape)
    return t[tuple(0 if int(d) == 1 else idx[off + i] for i, d in enumerate(t.shape))]


def bcast(fn: Fn, *ts: te.Tensor, name: str = "T_elemwise") -> te.Tensor:
    """``fn`` of the operands' elements, broadcast numpy-style."""
    shape = broadcast_shape(*(t.shape for t in ts))
    return te.compute(shape, lambda *i: fn(*(_index(t, i, len(shape)) for t in ts)), name=name)


def unary(fn: Fn, x: te.Tensor, name: str = "T_unary") -> te.Tensor:
    return te.compute(x.shape, lambda *i: fn(x(*i)), name=name)


def fmax(a: Expr, b: Expr) -> Expr:
    """max(a, b); a NaN operand wins for floats (numpy maximum)."""
    if not is_float(a):
        return tirx.max(a, b)
    return tirx.Select(tirx.isnan(b), b, tirx.Select(b > a, b, a))


def fmin(a: Expr, b: Expr) -> Expr:
    if not is_float(a):
        return tirx.min(a, b)
    return tirx.Select(tirx.isnan(b), b, tirx.Select(b < a, b, a))


def _keep_nan(x: te.Tensor, y: te.Tensor, name: str) -> te.Tensor:
    """y, but NaN where x is NaN (the fast polynomials clamp NaN to a finite value)."""
    return bcast(lambda v, r: tirx.Select(tirx.isnan(v), v, r), x, y, name=name)


def _via_f32(fn: Callable[[te.Tensor], te.Tensor], x: te.Tensor) -> te.Tensor:
    """fn computed in float32 for f16/bf16 (as numpy does), directly otherwise."""
    if dtype_of(x) in ("float16", "bfloat16"):
        return topi.cast(fn(topi.cast(x, "float32")), dtype_of(x))
    return fn(x)


def _libm(name: str, *args: Expr) -> Expr:
    """A scalar libm call (``name`` for f64, ``name + "f"`` for f32)."""
    dt = dtype_of(args[0])
    return tirx.call_pure_extern(dt, name if dt == "float64" else name + "f", *args)


def exp(x: te.Tensor, name: str = "T_exp") -> te.Tensor:
    """e**x; float32 as fast_exp(x/2)**2, which over/underflows where expf does (fast_exp clamps)."""
    if dtype_of(x) == "float64":
        return topi.exp(x)
    if dtype_of(x) != "float32":
        return _via_f32(lambda t: exp(t, name), x)
    half = topi.fast_exp(unary(lambda v: v * _k(0.5, v), x, name=f"{name}_half"))
    return bcast(lambda v, h: tirx.Select(tirx.isnan(v), v, h * h), x, half, name=name)


def tanh(x: te.Tensor) -> te.Tensor:
    return topi.tanh(x) if dtype_of(x) == "float64" else _via_f32(topi.fast_tanh, x)


def erf(x: te.Tensor) -> te.Tensor:
    if dtype_of(x) == "float64":
        return unary(lambda v: _libm("erf", v), x, name="T_erf")
    return _via_f32(topi.fast_erf, x)


def sigmoid(x: te.Tensor, name: str = "T_sigmoid") -> te.Tensor:
    e = exp(unary(lambda v: -v, x, name=f"{name}_neg"), name=f"{name}_exp")
    return unary(lambda v: _k(1.0, v) / (_k(1.0, v) + v), e, name=name)


# ------------------------------------------------------------------ binary / variadic


@lowers("add")
def add(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.logical_or(a, b) if dtype_of(a) == "bool" else topi.add(a, b)


@lowers("sub")
def sub(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.subtract(a, b)


@lowers("mul")
def mul(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.multiply(a, b)


def _safe_divisor(y: Expr) -> Expr:
    """y, or 1 where integer division by y would trap (0; -1, whose INT_MIN quotient overflows)."""
    bad = y == _k(0, y)
    if _signed(y):
        bad = tirx.Or(bad, y == _k(-1, y))
    return tirx.Select(bad, _k(1, y), y)


def _int_div(x: Expr, y: Expr) -> Expr:
    """Truncating quotient; x/0 is 0 and x/-1 is -x (wrapping), as the reference."""
    zero = _k(0, x)
    q = tirx.truncdiv(x, _safe_divisor(y))
    if _signed(x):
        q = tirx.Select(y == _k(-1, y), zero - x, q)
    return tirx.Select(y == zero, zero, q)


@lowers("div")
def div(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """Floats divide; integers truncate toward zero (ONNX, C)."""
    if is_float(a):
        return topi.divide(a, b)
    return bcast(_int_div, a, b, name="T_div")


def _float_mod(x: Expr, y: Expr) -> Expr:
    """a - floor(a/b)*b as numpy's mod: fmod, moved into the divisor's sign; a zero takes b's sign."""
    ct = _wide(x)
    a, b = x.astype(ct), y.astype(ct)
    r = _libm("fmod", a, b)
    zero = _k(0.0, r)
    flip = tirx.any(tirx.all(r < zero, b > zero), tirx.all(r > zero, b < zero))
    signed_zero = tirx.call_pure_extern(ct, "copysign" if ct == "float64" else "copysignf", zero, b)
    out = tirx.Select(r == zero, signed_zero, tirx.Select(flip, r + b, r))
    return out.astype(dtype_of(x))


@lowers("mod")
def mod(ctx: LowerCtx, a: te.Tensor, b: te.Tensor, *, fmod: int) -> te.Tensor:
    """fmod=1: the dividend's sign (C fmod); fmod=0: the divisor's (numpy mod). Integer x mod 0 is 0."""
    if is_float(a):
        if fmod:
            return bcast(lambda x, y: _libm("fmod", x.astype(_wide(x)), y.astype(_wide(x))).astype(dtype_of(x)),
                         a, b, name="T_mod")
        return bcast(_float_mod, a, b, name="T_mod")
    fn = tirx.truncmod if fmod else tirx.floormod
    return bcast(lambda x, y: fn(x, _safe_divisor(y)), a, b, name="T_mod")


@lowers("pow")
def pow_(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """Float bases in f32 (f64 for f64); integer bases in f64, exact while |a**b| < 2**53
    (numpy's integer power wraps beyond the dtype; an exact squaring loop needs TIR Lets,
    which TVM 0.27's vectorizer rejects)."""
    if is_float(a):
        ct = _wide(a)
        return bcast(lambda x, y: tirx.power(x.astype(ct), y.astype(ct)).astype(dtype_of(a)), a, b, name="T_pow")
    return bcast(lambda x, y: _float_to_int(tirx.power(x.astype("float64"), y.astype("float64")), dtype_of(a)),
                 a, b, name="T_pow")


def _fold(fn: Callable[[Expr, Expr], Expr], name: str) -> Callable[..., te.Tensor]:
    def lower(ctx: LowerCtx, *xs: te.Tensor) -> te.Tensor:
        def body(*vals: Expr) -> Expr:
            acc = vals[0]
            for v in vals[1:]:
                acc = fn(acc, v)
            return acc
        return bcast(body, *xs, name=name)
    return lower


lowers("max")(_fold(fmax, "T_max"))
lowers("min")(_fold(fmin, "T_min"))
lowers("sum")(_fold(lambda x, y: x + y, "T_sum"))


def _topi_binary(fn: Callable[[te.Tensor, te.Tensor], te.Tensor]) -> Callable[..., te.Tensor]:
    return lambda ctx, a, b: fn(a, b)


lowers("equal")(_topi_binary(topi.equal))
lowers("less")(_topi_binary(topi.less))
lowers("less_equal")(_topi_binary(topi.less_equal))
lowers("greater")(_topi_binary(topi.greater))
lowers("greater_equal")(_topi_binary(topi.greater_equal))
lowers("and")(_topi_binary(topi.logical_and))
lowers("or")(_topi_binary(topi.logical_or))


@lowers("not")
def not_(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return topi.logical_not(x)


@lowers("where")
def where(ctx: LowerCtx, cond: te.Tensor, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return bcast(tirx.Select, cond, a, b, name="T_where")


# ------------------------------------------------------------------ unary


def _unary(name: str, fn: Fn) -> None:
    lowers(name)(lambda ctx, x: unary(fn, x, name=f"T_{name}"))


def _sign(v: Expr) -> Expr:
    zero, one = _k(0, v), _k(1, v)
    if dtype_of(v).startswith("uint"):
        return tirx.Select(v > zero, one, zero)
    s = tirx.Select(v > zero, one, tirx.Select(v < zero, _k(-1, v), zero))
    return tirx.Select(tirx.isnan(v), v, s) if is_float(v) else s


def _softplus(v: Expr) -> Expr:
    """max(x, 0) + log1p(e**-|x|): log(1 + e**x) without overflow."""
    return fmax(v, _k(0.0, v)) + tirx.log1p(tirx.exp(-tirx.abs(v)))


_unary("neg", lambda v: _k(0, v) - v)
_unary("abs", tirx.abs)
_unary("sign", _sign)
_unary("log", tirx.log)
_unary("sqrt", tirx.sqrt)
_unary("reciprocal", lambda v: _k(1.0, v) / v)
_unary("floor", tirx.floor)
_unary("ceil", tirx.ceil)
_unary("round", tirx.nearbyint)  # half to even; tirx.round rounds ties away from zero
_unary("sin", tirx.sin)
_unary("cos", tirx.cos)
_unary("softplus", _softplus)
_unary("identity", lambda v: v)


@lowers("relu")
def relu(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    """max(x, 0) keeping NaN (topi.nn.relu maps NaN to 0)."""
    return unary(lambda v: tirx.Select(v < _k(0, v), _k(0, v), v), x, name="T_relu")


@lowers("exp")
def exp_(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return exp(x)


@lowers("tanh")
def tanh_(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _keep_nan(x, tanh(x), "T_tanh")


@lowers("erf")
def erf_(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _keep_nan(x, erf(x), "T_erf")


@lowers("sigmoid")
def sigmoid_(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return sigmoid(x)


@lowers("silu")
def silu(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return topi.multiply(x, sigmoid(x))


@lowers("gelu")
def gelu(ctx: LowerCtx, x: te.Tensor, *, approximate: str) -> te.Tensor:
    """0.5*x*(1 + erf(x/sqrt 2)), or with tanh(sqrt(2/pi)*(x + 0.044715*x**3)) for "tanh"."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = tanh(unary(lambda v: _k(k, v) * (v + _k(0.044715, v) * v * v * v), x, name="T_gelu_in"))
    elif approximate == "none":
        t = erf(unary(lambda v: v * _k(1.0 / math.sqrt(2.0), v), x, name="T_gelu_in"))
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return bcast(lambda v, s: _k(0.5, v) * v * (_k(1.0, v) + s), x, t, name="T_gelu")


@lowers("leaky_relu")
def leaky_relu(ctx: LowerCtx, x: te.Tensor, *, alpha: float) -> te.Tensor:
    return unary(lambda v: tirx.Select(v >= _k(0, v), v, v * _k(alpha, v)), x, name="T_leaky_relu")


def _clamp(v: Expr, lo: Expr | None, hi: Expr | None) -> Expr:
    """v limited to [lo, hi]; NaN stays NaN."""
    if lo is not None:
        v = tirx.Select(v < lo, lo, v)
    if hi is not None:
        v = tirx.Select(v > hi, hi, v)
    return v


@lowers("hard_sigmoid")
def hard_sigmoid(ctx: LowerCtx, x: te.Tensor, *, alpha: float, beta: float) -> te.Tensor:
    def fn(v: Expr) -> Expr:
        return _clamp(v * _k(alpha, v) + _k(beta, v), _k(0.0, v), _k(1.0, v))
    return unary(fn, x, name="T_hard_sigmoid")


def _int_bound(value: float | None, dtype: str) -> Expr | None:
    """A float bound for integers: truncated (same result as the reference's float compare then
    truncating cast), None when it lies outside the dtype's range."""
    if value is None:
        return None
    lo, hi = int(tirx.min_value(dtype).value), int(tirx.max_value(dtype).value)
    if math.isnan(value) or not lo < value < hi:
        return None
    return _c(int(value), dtype)


def _scalar(t: te.Tensor) -> Expr:
    """The one element of a [] or [1] tensor."""
    return t(*([0] * len(t.shape)))


@lowers("clip")
def clip(ctx: LowerCtx, x: te.Tensor, lo: te.Tensor | None = None, hi: te.Tensor | None = None, *,
         min: float | None = None, max: float | None = None) -> te.Tensor:
    """Attribute bounds are compile-time constants; operand bounds are read at run time (NaN-propagating,
    as the reference's maximum/minimum)."""
    dt = dtype_of(x)
    if is_float(dt):
        a_lo, a_hi = (None if b is None else _c(b, dt) for b in (min, max))
    else:
        a_lo, a_hi = _int_bound(min, dt), _int_bound(max, dt)

    def fn(v: Expr) -> Expr:
        v = fmax(v, _scalar(lo)) if lo is not None else _clamp(v, a_lo, None)
        return fmin(v, _scalar(hi)) if hi is not None else _clamp(v, None, a_hi)

    return unary(fn, x, name="T_clip")


def _float_to_int(v: Expr, dtype: str) -> Expr:
    """Truncate toward zero; narrow targets wrap (via int32/int64) like numpy's C casts on x86."""
    if bits_of(dtype) < 32:
        return v.astype("int32").astype(dtype)
    if dtype == "uint32":
        return v.astype("int64").astype(dtype)
    return v.astype(dtype)


# ------------------------------------------------------------------ cast, float8 codec
#
# TVM 0.27 converts float8 wrongly (codegen/lowering/dtypes.py), so kiln converts the bits itself:
# a float8 value is read as its uint8 code (tirx.reinterpret, which TVM compiles right) and
# decoded to float32 exactly; encoding rounds the float32/float64 bits to nearest even in integer
# arithmetic, then applies ONNX Cast's saturate rules. float8e8m0 follows
# onnx.numpy_helper.to_float8e8m0 (as ir/ops/dtypes.py's to_e8m0).


@dataclass(frozen=True)
class _F8:
    """A float8 format: exponent/mantissa bits, bias, largest finite code, NaN code, inf code (or None)."""

    mbits: int
    ebits: int
    bias: int
    max_code: int
    nan_code: int
    inf_code: int | None
    unsigned_zero: bool  # fnuz: no -0 (and 0x80 is NaN)


F8_FORMATS = {
    "float8_e4m3fn": _F8(3, 4, 7, 0x7E, 0x7F, None, False),
    "float8_e4m3fnuz": _F8(3, 4, 8, 0x7F, 0x80, None, True),
    "float8_e5m2": _F8(2, 5, 15, 0x7B, 0x7E, 0x7C, False),
    "float8_e5m2fnuz": _F8(2, 5, 16, 0x7F, 0x80, None, True),
}
E8M0 = "float8_e8m0fnu"
_SRC_BITS = {"float32": (32, 23, 127), "float64": (64, 52, 1023)}  # width, mantissa bits, bias


def _u(value: int, dtype: str) -> Expr:
    return tirx.const(value, dtype)


def _f32_of_bits(bits: Expr) -> Expr:
    return tirx.reinterpret("float32", bits)


def decode_f8(v: Expr) -> Expr:
    """A float8 value (any of the five ONNX formats) as the float32 it encodes, exactly."""
    dt = dtype_of(v)
    c = tirx.reinterpret("uint8", v).astype("uint32")
    nan = _f32_of_bits(_u(0x7FC00000, "uint32"))
    if dt == E8M0:  # 2**(c - 127); 0 is 2**-127 (a float32 subnormal); 0xFF is NaN
        pow2 = _f32_of_bits(tirx.Select(c == _u(0, "uint32"), _u(0x00400000, "uint32"), c << _u(23, "uint32")))
        return tirx.Select(c == _u(0xFF, "uint32"), nan, pow2)
    f = F8_FORMATS[dt]
    u32 = "uint32"
    sign = (c >> _u(7, u32)) << _u(31, u32)
    e = (c >> _u(f.mbits, u32)) & _u((1 << f.ebits) - 1, u32)
    m = c & _u((1 << f.mbits) - 1, u32)
    normal = ((e + _u(127 - f.bias, u32)) << _u(23, u32)) | (m << _u(23 - f.mbits, u32))
    subnormal = tirx.reinterpret(u32, m.astype("float32") * _c(2.0 ** (1 - f.bias - f.mbits), "float32"))
    value = _f32_of_bits(sign | tirx.Select(e == _u(0, u32), subnormal, normal))
    if f.unsigned_zero:
        return tirx.Select(c == _u(0x80, u32), nan, value)
    top = _u((1 << f.ebits) - 1, u32)
    if f.inf_code is None:  # e4m3fn: S.1111.111 is NaN, no inf
        return tirx.Select((c & _u(0x7F, u32)) == _u(0x7F, u32), nan, value)
    inf = _f32_of_bits(sign | _u(0x7F800000, u32))
    return tirx.Select(e == top, tirx.Select(m == _u(0, u32), inf, nan), value)


def _rne_shift(x: Expr, shift: Expr, dtype: str) -> Expr:
    """x >> shift rounded to nearest even (1 <= shift < width)."""
    one = _u(1, dtype)
    q = x >> shift
    rem = x & ((one << shift) - one)
    half = one << (shift - one)
    up = tirx.any(rem > half, tirx.all(rem == half, (q & one) == one))
    return q + up.astype(dtype)


def encode_f8(v: Expr, dt: str, saturate: bool) -> Expr:
    """The float8 code of a float32/float64 value, rounded once to nearest even (ONNX Cast).

    saturate: out-of-range values and infinities become +-max, else the format's overflow (inf for
    e5m2, NaN for the others); NaN stays NaN; fnuz formats have no -0.
    """
    f = F8_FORMATS[dt]
    width, fm, fbias = _SRC_BITS[dtype_of(v)]
    ut, it = f"uint{width}", f"int{width}"
    b = tirx.reinterpret(ut, v)
    neg = (b >> _u(width - 1, ut)) == _u(1, ut)
    a = b & _u((1 << (width - 1)) - 1, ut)
    inf_bits = _u(((1 << (width - fm - 1)) - 1) << fm, ut)
    exp_field = a >> _u(fm, ut)
    shift = fm - f.mbits
    rebias = fbias - f.bias
    normal = _rne_shift(a - _u(rebias << fm, ut), _u(shift, ut), ut)
    mant = (a & _u((1 << fm) - 1, ut)) | _u(1 << fm, ut)
    sub_shift = tirx.max(tirx.min(_u(shift + 1 + rebias, it) - exp_field.astype(it), _u(fm + 2, it)), _u(1, it))
    subnormal = _rne_shift(mant, sub_shift.astype(ut), ut)
    mag = tirx.Select(exp_field > _u(rebias, ut), normal, subnormal)
    max_code = _u(f.max_code, ut)
    if saturate:
        over = max_code
    else:
        over = _u(f.inf_code if f.inf_code is not None else f.nan_code, ut)
    mag = tirx.Select(tirx.any(mag > max_code, a == inf_bits), over, mag)
    code = tirx.Select(neg, mag | _u(0x80, ut), mag)
    if f.unsigned_zero:
        code = tirx.Select(tirx.any(mag == _u(0, ut), mag == _u(f.nan_code, ut)), mag, code)
    code = tirx.Select(a > inf_bits, _u(f.nan_code, ut), code)
    return tirx.reinterpret(dt, code.astype("uint8"))


def _f32_round_to_odd(v: Expr) -> Expr:
    """float64 -> the float32 toward zero with its last bit set when inexact (ir/ops/dtypes.py)."""
    y = v.astype("float32")
    yd = y.astype("float64")
    inexact = tirx.all(tirx.isfinite(v), yd != v)
    away = tirx.all(inexact, tirx.abs(yd) > tirx.abs(v))
    bits = tirx.reinterpret("uint32", y) - away.astype("uint32")
    return tirx.reinterpret("float32", bits | inexact.astype("uint32"))


def encode_e8m0(v: Expr, saturate: bool, round_mode: str) -> Expr:
    """float8e8m0 code of a float32 value: onnx.numpy_helper.to_float8e8m0's bit rules."""
    u32 = "uint32"
    bits = tirx.reinterpret(u32, v)
    exponent = (bits >> _u(23, u32)) & _u(0xFF, u32)
    special = exponent == _u(0xFF, u32)
    if round_mode == "nearest":
        g = (bits & _u(0x400000, u32)) != _u(0, u32)
        rest = tirx.any((bits & _u(0x200000, u32)) != _u(0, u32), (bits & _u(0x1FFFFF, u32)) != _u(0, u32),
                        exponent > _u(0, u32))
        up = tirx.all(g, rest)
    elif round_mode == "up":
        up = (bits & _u(0x7FFFFF, u32)) != _u(0, u32)
    else:
        up = tirx.const(False, "bool")
    if saturate:
        up = tirx.all(up, exponent != _u(0xFE, u32))
    code = tirx.Select(special, _u(0xFF, u32), exponent + up.astype(u32))
    return tirx.reinterpret(E8M0, code.astype("uint8"))


def _plain_cast(v: Expr, dt: str) -> Expr:
    """A conversion between types TVM converts right: float -> int truncates, -> bool is != 0."""
    if dt == "bool":
        return tirx.Or(v != _k(0, v), tirx.isnan(v)) if is_float(v) else v != _k(0, v)
    if is_float(v) and not is_float(dt):
        return _float_to_int(v, dt)
    return v.astype(dt)


def _is_f8(dt: str) -> bool:
    return dt in F8_FORMATS or dt == E8M0


def convert(v: Expr, dt: str, saturate: int | None = None, round_mode: str | None = None) -> Expr:
    """``v`` converted to TVM dtype ``dt`` with ONNX Cast's rules, float8 through kiln's codec."""
    src = dtype_of(v)
    if src == dt:
        return v
    if _is_f8(src):
        v, src = decode_f8(v), "float32"
        if src == dt:
            return v
    if not _is_f8(dt):
        return _plain_cast(v, dt)
    sat = saturate is None or bool(saturate)
    if dt == E8M0:
        v = _f32_round_to_odd(v.astype("float64")) if src not in ("float32", "float16", "bfloat16") \
            else v.astype("float32")
        return encode_e8m0(v, sat, round_mode or "up")
    wide = "float32" if src in ("float32", "float16", "bfloat16", "bool") else "float64"
    return encode_f8(v.astype(wide), dt, sat)


@lowers("cast")
def cast(ctx: LowerCtx, x: te.Tensor, *, to: str, saturate: int | None = None,
         round_mode: str | None = None) -> te.Tensor:
    """float -> int truncates toward zero; anything -> bool is x != 0 (NaN -> True); float8 by
    kiln's codec (saturate, round_mode as ONNX Cast). Sub-byte types (int4, float4) are refused."""
    from .dtypes import refuse_subbyte

    dt = tvm_dtype(to)
    refuse_subbyte(dtype_of(x), "cast")
    refuse_subbyte(dt, "cast")
    return unary(lambda v: convert(v, dt, saturate, round_mode), x, name="T_cast")
