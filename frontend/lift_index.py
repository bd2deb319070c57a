"""ONNX converters for the ops of family 'index' that the generic registry lifting cannot express.

* Range: folded when start/limit/delta are constants (or shape expressions kiln resolves); with a
  run-time start of an integer type and ``limit = start + c`` (constant c and delta) it becomes
  kiln's ``arange`` (static length, run-time values); otherwise its length is only known at run
  time and it is refused as a dynamic shape.
* TopK before opset 10 (K an attribute), OneHot before opset 11 (no negative indices) and Scatter
  (opset 9/10, the old name of ScatterElements without reduction).
* Hardmax = one_hot(argmax(x)) over the axis (opset 13), or over the flattened dims from ``axis``
  on (before 13, as Softmax then).
* Compress with a constant condition = gather of the selected positions (of the flattened input
  when there is no axis); CenterCropPad with a constant shape = slice then pad.
* NonZero, Unique and Compress with a run-time condition have output shapes that depend on the
  input *values*; kiln compiles graphs whose shapes are known before they run, so these are
  folded when their inputs are constant and refused otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.ops.index import ARANGE_DTYPES

from .lift import (
    _check_only,
    _Ctx,
    _describe,
    _node_label,
    _Refuse,
    _special,
    reshape_target,
    shape_expr,
)

INT_RANGE = ("i16", "i32", "i64")


def _dynamic(ctx: _Ctx, which: list[tuple[int, str]]) -> _Refuse:
    """One dynamic-shape refusal naming every run-time input in ``which`` (index, what)."""
    refusals = [ctx.dynamic(i, what) for i, what in which]
    first = refusals[0]
    first.reason = "; ".join(r.reason for r in refusals)
    for key, val in vars(first).items():
        if isinstance(val, list):
            val.extend(x for r in refusals[1:] for x in getattr(r, key, []) if x not in val)
    return first


def _known(ctx: _Ctx, i: int) -> np.ndarray | None:
    """Input i's value when kiln knows it at compile time (a constant or a resolved shape), else None."""
    v = ctx.input(i)
    if v is None:
        return None
    if v.is_const:
        return v.const
    sym = shape_expr(v)
    if sym is not None and all(isinstance(d, int) for d in sym):
        return np.array(sym, dtype=v.type.np_dtype).reshape([d if isinstance(d, int) else 1 for d in v.type.shape])
    return None


def _scalar(a: np.ndarray, what: str) -> np.generic:
    a = np.asarray(a)
    if a.size != 1:
        raise _Refuse(f"{what} must hold one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


# ====================================================================== Range

def _range_values(start: np.generic, limit: np.generic, delta: np.generic, dtype: np.dtype,
                  check: Callable[[int], None] | None = None) -> np.ndarray:
    """ONNX Range: start + i * delta for i < max(ceil((limit - start) / delta), 0); f16/bf16 in f32.
    ``check(length)`` runs before the values are allocated (the constant-size limit)."""
    wide = np.dtype(np.float32) if dtype.kind == "V" or dtype == np.float16 or dtype.name == "bfloat16" \
        else dtype
    s, lim, d = (np.asarray(v).astype(wide) for v in (start, limit, delta))
    if d == 0:
        raise _Refuse("delta is 0")
    if wide.kind in "iu":
        n = max(-(-(int(lim) - int(s)) // int(d)), 0)
    else:
        span = float(lim - s) / float(d)
        if not math.isfinite(span):
            raise _Refuse(f"start={s}, limit={lim}, delta={d} give no finite sequence")
        n = max(int(math.ceil(span)), 0)
    if check is not None:
        check(n)
    return (s + np.arange(n).astype(wide) * d).astype(dtype)


def _offset_from(limit: Value, start: Value) -> int | None:
    """c when ``limit`` is ``add(start, c)`` / ``add(c, start)`` with a known c (integer types)."""
    p = limit.producer
    if p is None or p.op != "add":
        return None
    a, b = p.inputs[0], p.inputs[1]
    other = b if a is start else a if b is start else None
    if other is None or other.type.rank > 1:
        return None
    sym = shape_expr(other)
    if sym is None or len(sym) != 1 or not isinstance(sym[0], int):
        return None
    return int(sym[0])


@_special("Range", needs=("arange",), since=27)
def _range(ctx: _Ctx) -> list[Value | None]:
    start, limit, _ = ctx.x(0), ctx.x(1), ctx.x(2)
    dtype = start.type.dtype
    if dtype not in ARANGE_DTYPES:
        raise _Refuse(f"Range of {dtype} (ONNX allows {list(ARANGE_DTYPES)})")
    if dtype in ("f16", "bf16") and int(ctx.attr("stash_type", 1)) != 1:
        raise _Refuse(f"stash_type={ctx.attr('stash_type')} (kiln computes {dtype} ranges in float32, "
                      f"stash_type=1)")
    known = [_known(ctx, i) for i in range(3)]
    if all(k is not None for k in known):
        vals = [_scalar(k, n) for k, n in zip(known, ("start", "limit", "delta"))]
        np_dtype = start.type.np_dtype
        what = f"the result of {_node_label(ctx.node)}"
        return [ctx.const(_range_values(*vals, np_dtype, lambda n: ctx.lifter.check_constant((n,), np_dtype, what)),
                          out=0)]
    run_time = [(i, n) for i, n in enumerate(("start", "limit", "delta")) if known[i] is None]
    offset = _offset_from(limit, start) if known[2] is not None and dtype in INT_RANGE else None
    if offset is None:
        raise _dynamic(ctx, run_time)
    d = int(_scalar(known[2], "delta"))
    if d == 0:
        raise _Refuse("delta is 0")
    length = max(-(-offset // d), 0)
    step = ctx.const(np.asarray(d).astype(start.type.np_dtype).reshape(()))
    s = start if start.type.rank == 0 else ctx.op("reshape", [start], {"shape": []})
    return [ctx.op("arange", [s, step], {"length": length}, out=0)]


# ====================================================================== TopK, OneHot, Scatter

@_special("TopK", needs=("top_k",))
def _top_k(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    if ctx.opset < 10:
        k = ctx.attrs.get("k")
        if k is None:
            raise _Refuse("TopK-1 without its k attribute")
    else:
        k = _scalar(ctx.const_input(1, "K"), "K")
    _check_only(ctx, ("k", "axis", "largest", "sorted"))
    attrs = {"k": [int(k)], "axis": int(ctx.attr("axis", -1)), "largest": int(ctx.attr("largest", 1)),
             "sorted": int(ctx.attr("sorted", 1))}
    return ctx.op_multi("top_k", [x], attrs, outs=[0, 1])


@_special("OneHot", needs=("one_hot", "where", "less"))
def _one_hot(ctx: _Ctx) -> list[Value | None]:
    idx, values = ctx.x(0), ctx.x(2)
    depth = int(_scalar(ctx.const_input(1, "depth"), "depth"))
    _check_only(ctx, ("axis",))
    if ctx.opset < 11 and not (idx.is_const and (np.asarray(idx.const) >= 0).all()):
        # OneHot-9 has no negative indices: they select nothing, as indices >= depth do
        zero = ctx.const(np.zeros((), idx.type.np_dtype))
        idx = ctx.op("where", [ctx.op("less", [idx, zero]), ctx.const(np.asarray(depth), like=idx), idx])
    return [ctx.op("one_hot", [idx, values], {"depth": depth, "axis": int(ctx.attr("axis", -1))}, out=0)]


@_special("Scatter", needs=("scatter_elements",), since=11)
def _scatter(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("axis",))
    attrs = {"axis": int(ctx.attr("axis", 0)), "reduction": "none"}
    return [ctx.op("scatter_elements", [ctx.x(0), ctx.x(1), ctx.x(2)], attrs, out=0)]


# ====================================================================== Hardmax

@_special("Hardmax", needs=("argmax", "one_hot", "flatten", "reshape"), since=13)
def _hardmax(ctx: _Ctx) -> list[Value | None]:
    """one_hot(argmax(x, axis), depth=dim, axis) with values [0, 1]: the first maximum wins, as ONNX's."""
    x = ctx.x()
    r = x.type.rank
    _check_only(ctx, ("axis",))
    if ctx.opset >= 13:
        return [_hardmax_axis(ctx, x, int(ctx.attr("axis", -1)), out=0)]
    axis = int(ctx.attr("axis", 1))
    a = axis + r if axis < 0 else axis
    if not 0 <= a < max(r, 1):
        raise _Refuse(f"axis {axis} is out of range for rank {r}")
    # Before opset 13 the input is coerced to 2-D [prod(d<a), prod(d>=a)] (see lift's Softmax).
    non_one = [a + i for i, d in enumerate(x.type.shape[a:]) if d != 1]
    if len(non_one) <= 1:
        return [_hardmax_axis(ctx, x, non_one[0] if non_one else a, out=0)]
    flat = ctx.op("flatten", [x], {"axis": a})
    target = reshape_target(flat.type.shape, x.type.shape)
    if target is None:
        raise _Refuse(f"hardmax over the flattened dims {a}.. of {x.type} needs a static shape", dynamic=True)
    return [ctx.op("reshape", [_hardmax_axis(ctx, flat, 1)], {"shape": target}, out=0)]


def _hardmax_axis(ctx: _Ctx, x: Value, axis: int, out: int | None = None) -> Value:
    r = x.type.rank
    if not -r <= axis < r:
        raise _Refuse(f"axis {axis} is out of range for rank {r}")
    ax = axis % r
    depth = x.type.shape[ax]
    if not isinstance(depth, int):
        raise _Refuse(f"Hardmax over the symbolic dim {ax} of {x.type}: kiln needs its size", dynamic=True)
    arg = ctx.op("argmax", [x], {"axis": ax, "keepdims": 0, "select_last_index": 0})
    values = ctx.const(np.array([0, 1], dtype=x.type.np_dtype))
    return ctx.op("one_hot", [arg, values], {"depth": depth, "axis": ax}, out=out)


# ====================================================================== Compress, CenterCropPad

@_special("Compress", needs=("gather", "reshape"))
def _compress(ctx: _Ctx) -> list[Value | None]:
    x, cond = ctx.x(0), ctx.x(1)
    _check_only(ctx, ("axis",))
    known = _known(ctx, 1)
    if known is None:
        r = ctx.dynamic(1, "condition")
        r.reason = (f"its output length is the number of true entries of the condition, which is computed "
                    f"at run time ({_describe(cond)}); kiln compiles graphs whose shapes are known before "
                    f"they run, so it lifts Compress only with a constant condition")
        raise r
    axis = ctx.attrs.get("axis")
    if axis is None:
        if not x.type.is_static:
            raise _Refuse(f"Compress without an axis flattens {x.type}, which needs a static shape", dynamic=True)
        x = ctx.op("reshape", [x], {"shape": [-1]})
        ax = 0
    else:
        r = x.type.rank
        if not -r <= int(axis) < r:
            raise _Refuse(f"axis {axis} is out of range for rank {r}")
        ax = int(axis) % r
    dim = x.type.shape[ax]
    picked = np.flatnonzero(np.asarray(known).reshape(-1).astype(bool))
    if isinstance(dim, int) and picked.size and picked[-1] >= dim:
        raise _Refuse(f"the condition selects position {int(picked[-1])} of an axis of size {dim}")
    return [ctx.op("gather", [x, ctx.const(picked.astype(np.int64))], {"axis": ax}, out=0)]


@_special("CenterCropPad", needs=("slice", "pad"))
def _center_crop_pad(ctx: _Ctx) -> list[Value | None]:
    """Centered crop (slice) where the target is smaller, zero padding split evenly where it is larger
    (the extra element of an odd difference goes to the end in both cases, as ONNX's reference)."""
    x = ctx.x()
    _check_only(ctx, ("axes",))
    shape = [int(s) for s in np.asarray(ctx.const_input(1, "shape")).reshape(-1)]
    r = x.type.rank
    axes = ctx.attrs.get("axes")
    axes = list(range(r)) if axes is None else [int(a) for a in axes]
    if len(axes) != len(shape) or any(not -r <= a < r for a in axes) or len({a % r for a in axes}) != len(axes):
        raise _Refuse(f"shape {shape} and axes {axes} do not fit rank {r}")
    starts, ends, slice_axes, pads = [], [], [], [0] * (2 * r)
    for a, target in zip((a % r for a in axes), shape):
        dim = x.type.shape[a]
        if not isinstance(dim, int):
            raise _Refuse(f"CenterCropPad of the symbolic dim {a} of {x.type}", dynamic=True)
        if target < 0:
            raise _Refuse(f"negative target size {target}")
        if target < dim:
            begin = (dim - target) // 2
            starts.append(begin)
            ends.append(begin + target)
            slice_axes.append(a)
        elif target > dim:
            pads[a] = (target - dim) // 2
            pads[a + r] = target - dim - pads[a]
    y = x
    if slice_axes:
        y = ctx.op("slice", [y], {"starts": starts, "ends": ends, "axes": slice_axes},
                   out=None if any(pads) else 0)
    if any(pads):
        y = ctx.op("pad", [y], {"pads": pads, "mode": "constant", "value": 0.0}, out=0)
    if y is x:
        y = ctx.op("identity", [x], out=0)
    return [y]


# ====================================================================== data-dependent output shapes

def _value_dependent(what: str) -> _Refuse:
    return _Refuse(f"{what} depends on the input's values; kiln compiles graphs whose shapes are known "
                   f"before they run, so it lifts this op only when its input is a constant (then it is "
                   f"folded)")


@_special("NonZero")
def _non_zero(ctx: _Ctx) -> list[Value | None]:
    raise _value_dependent(f"NonZero's output shape [{ctx.x().type.rank}, number of non-zero entries]")


@_special("Unique")
def _unique(ctx: _Ctx) -> list[Value | None]:
    raise _value_dependent("Unique's output shape (the number of distinct entries or slices)")
