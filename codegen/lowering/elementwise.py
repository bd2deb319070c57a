"""TVM lowerings of the ops in ir/ops/elementwise.py (numpy broadcasting, ONNX semantics).

float32 exp, tanh and erf use TVM's vectorizable polynomial forms
(``topi.fast_exp``/``fast_tanh``/``fast_erf``, a few ulp) instead of one scalar
libm call per vector lane; other dtypes and functions call libm.  Float
max/min/clip/relu propagate NaN like numpy's ``maximum``/``minimum``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


@lowers("cast")
def cast(ctx: LowerCtx, x: te.Tensor, *, to: str, saturate: int | None = None,
         round_mode: str | None = None) -> te.Tensor:
    """float -> int truncates toward zero; anything -> bool is x != 0 (NaN -> True).

    Conversions to or from the narrow types are refused (``codegen/lowering/dtypes.py``), so
    ``saturate`` and ``round_mode``, which only concern float8 targets, need no code here.
    """
    from .dtypes import refuse_narrow_conversion

    dt = tvm_dtype(to)
    refuse_narrow_conversion(dtype_of(x), dt)
    if dt == "bool":
        nonzero = (lambda v: tirx.Or(v != _k(0, v), tirx.isnan(v))) if is_float(x) else (lambda v: v != _k(0, v))
        return unary(nonzero, x, name="T_cast")
    if is_float(x) and not is_float(dt):
        return unary(lambda v: _float_to_int(v, dt), x, name="T_cast")
    return unary(lambda v: v.astype(dt), x, name="T_cast")
