"""TVM lowerings of the ops in ir/ops/reduce.py.

Floats accumulate in their own dtype (the reference uses float64: within
codegen/tolerance.py); integers wrap in their dtype as the reference does,
except integer mean, which sums 8/16-bit inputs in int64.  Float max/min
propagate NaN like numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from tvm import te, tirx, topi

from . import LowerCtx, lowers
from .elementwise import Expr, bits_of, dtype_of, is_float


def _axes(x: te.Tensor, axes: Sequence[int]) -> list[int]:
    rank = len(x.shape)
    return sorted({a % rank for a in axes}) if axes else list(range(rank))


def _reduce(fn: Callable, x: te.Tensor, axes: Sequence[int], keepdims: int) -> te.Tensor:
    """topi reduction ``fn`` over ``axes`` (all when empty)."""
    return fn(x, axis=_axes(x, axes), keepdims=bool(keepdims))


def _count(x: te.Tensor, axes: Sequence[int]) -> int:
    return math.prod(int(x.shape[a]) for a in _axes(x, axes))


def _square(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x(*i) * x(*i), name="T_square")


def _reduction(name: str, fn: Callable, pre: Callable[[te.Tensor], te.Tensor] = lambda x: x) -> None:
    def lower(ctx: LowerCtx, x: te.Tensor, *, axes, keepdims) -> te.Tensor:
        ctx.kind = "reduction"
        return _reduce(fn, pre(x), axes, keepdims)
    lowers(name)(lower)


_reduction("reduce_sum", topi.sum)
_reduction("reduce_prod", topi.prod)
_reduction("reduce_sum_square", topi.sum, _square)


_QNAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000, "float64": 0x7FF8000000000000}


def _to_key(v: Expr, nan_key: int) -> Expr:
    """An integer with the float order of v (sign-magnitude bits -> two's complement); NaN -> nan_key."""
    kt = f"int{bits_of(v)}"
    b = tirx.reinterpret(kt, v)
    k = b ^ ((b >> tirx.const(bits_of(v) - 1, kt)) & tirx.max_value(kt))
    return tirx.Select(tirx.isnan(v), tirx.const(nan_key, kt), k)


def _from_key(k: Expr, dtype: str) -> Expr:
    return tirx.reinterpret(dtype, k ^ ((k >> tirx.const(bits_of(k) - 1, dtype_of(k))) & tirx.max_value(dtype_of(k))))


def _filled(x: te.Tensor, axes: Sequence[int], keepdims: int, value: Expr, name: str) -> te.Tensor:
    """The result of reducing ``x`` over ``axes`` when they are empty: ``value`` everywhere."""
    red = set(_axes(x, axes))
    shape = [1 if a in red else int(d) for a, d in enumerate(x.shape) if keepdims or a not in red]
    return te.compute(shape, lambda *i: value, name=name)


def _max_min(name: str, reducer, largest: bool) -> None:
    """Floats reduce an order-preserving integer key (a NaN-propagating float reducer defeats rfactor);
    f16/bf16 take the float32 key (the result is one of the inputs, so the round trip is exact);
    bool reduces as uint8; an empty reduction is the identity (-inf / +inf, the dtype's min / max)."""
    def lower(ctx: LowerCtx, x: te.Tensor, *, axes, keepdims) -> te.Tensor:
        ctx.kind = "reduction"
        dt = dtype_of(x)
        if _count(x, axes) == 0:
            if dt == "bool":
                ident = tirx.const(not largest, "bool")
            elif is_float(x):
                ident = tirx.const(-math.inf if largest else math.inf, dt)
            else:
                ident = tirx.min_value(dt) if largest else tirx.max_value(dt)
            ctx.kind = "injective"
            return _filled(x, axes, keepdims, ident, f"T_{name}")
        if dt == "bool":
            r = _reduce(reducer, topi.cast(x, "uint8"), axes, keepdims)
            return te.compute(r.shape, lambda *i: r(*i) != tirx.const(0, "uint8"), name=f"T_{name}")
        if not is_float(x):
            return _reduce(reducer, x, axes, keepdims)
        wide = "float32" if dt in ("float16", "bfloat16") else dt  # TVM has no bf16 isnan; exact both ways
        qnan = _QNAN_BITS[wide]
        nan_key = qnan if largest else ~qnan  # keys of +NaN / -NaN: above +inf / below -inf
        keys = te.compute(x.shape, lambda *i: _to_key(x(*i).astype(wide), nan_key), name=f"T_{name}_key")
        if not keepdims and len(set(_axes(x, axes))) == len(x.shape):
            # a rank-0 integer min buffer followed by a float min epilogue is miscompiled by TVM 0.27
            # (fuzz/tvm-findings/rank0-min-epilogue): reduce into [1, ..., 1] and read its one element
            k1 = _reduce(reducer, keys, axes, 1)
            zero = (0,) * len(k1.shape)
            return te.compute((), lambda: _from_key(k1(*zero), wide).astype(dt), name=f"T_{name}")
        k = _reduce(reducer, keys, axes, keepdims)
        return te.compute(k.shape, lambda *i: _from_key(k(*i), wide).astype(dt), name=f"T_{name}")
    lowers(name)(lower)


_max_min("reduce_max", topi.max, True)
_max_min("reduce_min", topi.min, False)


@lowers("reduce_mean")
def reduce_mean(ctx: LowerCtx, x: te.Tensor, *, axes, keepdims) -> te.Tensor:
    """Float mean; integers divide the sum (int64 for 8/16-bit inputs) truncating toward zero."""
    ctx.kind = "reduction"
    dt, n = dtype_of(x), _count(x, axes)
    if is_float(x):
        s = _reduce(topi.sum, x, axes, keepdims)
        return te.compute(s.shape, lambda *i: s(*i) / tirx.const(n, dt), name="T_reduce_mean")
    acc = dt if bits_of(dt) >= 32 else "int64"
    s = _reduce(topi.sum, topi.cast(x, acc), axes, keepdims)
    count = tirx.const(max(n, 1), "int64")
    return te.compute(s.shape, lambda *i: tirx.truncdiv(s(*i).astype("int64"), count).astype(dt),
                      name="T_reduce_mean")


@lowers("reduce_l2")
def reduce_l2(ctx: LowerCtx, x: te.Tensor, *, axes, keepdims) -> te.Tensor:
    ctx.kind = "reduction"
    s = _reduce(topi.sum, _square(x), axes, keepdims)
    return te.compute(s.shape, lambda *i: tirx.sqrt(s(*i)), name="T_reduce_l2")
