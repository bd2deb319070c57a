"""Fuzz builders for the ops of family 'index' (ops the generic builders do not cover).

Index operands (scatter indices, write positions, sequence lengths) are constants drawn in range,
so the reference never raises on them; scatters with a ``mul`` reduction and cumprod read tamed
operands (|x| <= 1), so products stay bounded.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import TensorType

from .generate import MAX_NUMEL, Builder, GenFailed, _is_float, _is_int, _is_num, _numel, builder

NUM_DTYPES = ("f32", "f64", "i64", "i32")


def _static(v: Value) -> bool:
    return v.type.is_static


def _like(b: Builder, shape: tuple[int, ...], dtype: str, hint: str) -> Value:
    """A value of exactly this type: a pool value (not constant), else a new constant or input."""
    pool = [v for v in b.values(lambda v: v.type == TensorType(dtype, shape) and not v.is_const)]
    if pool and b.chance(0.4):
        return b.choice(pool)
    if b.chance(0.7):
        lo, hi = (-3, 3) if dtype in ("i64", "i32") else (-1.5, 1.5)
        return b.rand_const(shape, dtype, lo, hi, hint)
    return b.input(TensorType(dtype, shape), hint)


@builder("arange")
def _b_arange(b: Builder, x: Value | None) -> Value:
    def make() -> Value:
        return b.input(TensorType(b.choice(NUM_DTYPES), ()), "start")

    start = b.primary(x, lambda v: v.type.rank == 0 and v.type.dtype in NUM_DTYPES, make)
    dt = start.type.dtype
    delta = b.choice((1, 2, -1, 3)) if dt in ("i64", "i32") else b.choice((0.5, 1.0, -0.25))
    step = b.g.add_constant(np.array(delta, TensorType(dt, ()).np_dtype), b.g.fresh_name("delta"))  # 0-d
    return b.node("arange", [b.tame(start), step], length=b.randint(0, 12))


@builder("one_hot")
def _b_one_hot(b: Builder, x: Value | None) -> Value:
    depth = b.randint(1, 6)

    def make() -> Value:
        shape = b.rand_shape(b.randint(1, 2), max_numel=16)
        return b.rand_const(shape, b.choice(("i64", "i32")), -depth - 1, depth + 1, "idx")

    idx = b.primary(x, lambda v: (_is_int(v) or _is_float(v)) and v.type.rank <= 3 and _static(v)
                    and _numel(v.type.shape) * depth <= MAX_NUMEL, make)
    dt = b.choice(("f32", "f64", "i64"))
    values = b.const(np.array([b.choice((0, -1)), b.choice((1, 2))], TensorType(dt, ()).np_dtype), "onoff")
    return b.node("one_hot", [idx, values], depth=depth, axis=b.randint(-idx.type.rank - 1, idx.type.rank))


@builder("eye_like")
def _b_eye_like(b: Builder, x: Value | None) -> Value:
    def make() -> Value:
        return b.input(TensorType(b.choice(NUM_DTYPES), (b.randint(1, 6), b.randint(1, 6))), "m")

    a = b.primary(x, lambda v: v.type.rank == 2, make)
    attrs = {"k": b.randint(-2, 2)}
    if b.chance(0.5):
        attrs["dtype"] = b.choice(("f32", "f64", "i64", "i32", "bool"))
    return b.node("eye_like", [a], **attrs)


@builder("top_k")
def _b_top_k(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: _is_num(v) and v.type.rank >= 1 and _static(v))
    ax = b.randint(0, a.type.rank - 1)
    d = a.type.shape[ax]
    if d < 1:
        raise GenFailed("top_k needs a non-empty axis")
    return b.node("top_k", [a], k=[b.randint(1, d)], axis=ax - a.type.rank if b.chance(0.4) else ax,
                  largest=int(b.chance(0.7)), sorted=1)


def _scatter_operands(b: Builder, x: Value | None, reduction: str) -> Value:
    a = b.primary(x, lambda v: _is_num(v) and v.type.rank >= 1 and _static(v) and min(v.type.shape) >= 1)
    return b.tame(a, 2.0) if reduction == "mul" else a


@builder("scatter_elements")
def _b_scatter_elements(b: Builder, x: Value | None) -> Value:
    reduction = b.choice(("none", "none", "add", "mul", "max", "min"))
    data = _scatter_operands(b, x, reduction)
    ax = b.randint(0, data.type.rank - 1)
    shape = tuple(b.randint(1, 4) if i == ax else b.randint(1, d) for i, d in enumerate(data.type.shape))
    d = data.type.shape[ax]
    idx = b.const(b.rng.integers(-d, d, shape).astype(b.choice((np.int64, np.int32))), "idx")
    upd = _like(b, shape, data.type.dtype, "upd")
    if reduction == "mul":
        upd = b.tame(upd, 2.0)
    return b.node("scatter_elements", [data, idx, upd], axis=ax - data.type.rank if b.chance(0.3) else ax,
                  reduction=reduction)


@builder("scatter_nd")
def _b_scatter_nd(b: Builder, x: Value | None) -> Value:
    reduction = b.choice(("none", "none", "add", "mul", "max", "min"))
    data = _scatter_operands(b, x, reduction)
    q = b.randint(1, data.type.rank)
    n = b.randint(1, 4)
    cols = [b.rng.integers(-d, d, n) for d in data.type.shape[:q]]
    idx = b.const(np.stack(cols, axis=-1).astype(np.int64), "idx")
    upd = _like(b, (n, *data.type.shape[q:]), data.type.dtype, "upd")
    if reduction == "mul":
        upd = b.tame(upd, 2.0)
    return b.node("scatter_nd", [data, idx, upd], reduction=reduction)


@builder("tensor_scatter")
def _b_tensor_scatter(b: Builder, x: Value | None) -> Value:
    past = b.primary(x, lambda v: 2 <= v.type.rank <= 4 and _static(v) and min(v.type.shape) >= 1)
    r = past.type.rank
    ax = b.randint(1, r - 1)
    length = past.type.shape[ax]
    n = b.randint(1, length)
    shape = tuple(n if i == ax else dim for i, dim in enumerate(past.type.shape))
    upd = _like(b, shape, past.type.dtype, "upd")
    mode = b.choice(("linear", "circular"))
    hi = length - n if mode == "linear" else 2 * length - 1
    operands = [past, upd]
    if b.chance(0.8):
        operands.append(b.const(b.rng.integers(0, hi + 1, past.type.shape[0]).astype(np.int64), "pos"))
    return b.node("tensor_scatter", operands, axis=ax - r if b.chance(0.5) else ax, mode=mode)


def _image4(b: Builder, x: Value | None, fits) -> Value:
    def make() -> Value:
        bs = b.choice((1, 2))
        c = b.randint(1, 3) * bs * bs
        return b.input(TensorType(b.choice(("f32", "f64")), (1, c, bs * b.randint(1, 3), bs * b.randint(1, 3))),
                       "img")
    return b.primary(x, lambda v: v.type.rank == 4 and _static(v) and fits(v), make)


@builder("depth_to_space")
def _b_depth_to_space(b: Builder, x: Value | None) -> Value:
    bs = b.choice((1, 2))
    a = _image4(b, x, lambda v: v.type.shape[1] % (bs * bs) == 0)
    return b.node("depth_to_space", [a], blocksize=bs, mode=b.choice(("DCR", "CRD")))


@builder("space_to_depth")
def _b_space_to_depth(b: Builder, x: Value | None) -> Value:
    bs = b.choice((1, 2))
    a = _image4(b, x, lambda v: v.type.shape[2] % bs == 0 and v.type.shape[3] % bs == 0)
    return b.node("space_to_depth", [a], blocksize=bs, mode=b.choice(("DCR", "CRD")))


@builder("reverse_sequence")
def _b_reverse_sequence(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 2 and _static(v))
    t = b.randint(0, 1)
    steps, batch = a.type.shape[t], a.type.shape[1 - t]
    lens = b.const(b.rng.integers(0, steps + 1, batch).astype(np.int64), "lens")
    return b.node("reverse_sequence", [a, lens], time_axis=t, batch_axis=1 - t)


@builder("cumprod")
def _b_cumprod(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: _is_float(v) and v.type.rank >= 1)
    a = b.node("tanh", [a])  # |x| <= 1: every running product stays in [-1, 1]
    return b.node("cumprod", [a], axis=b.randint(-a.type.rank, a.type.rank - 1), exclusive=int(b.chance(0.3)),
                  reverse=int(b.chance(0.3)))
