"""TVM lowerings of the ops in ir/ops/tensor.py (shape and data movement, ONNX semantics).

Output shapes are the node's static output types (the type rules already
resolved ``-1`` / ``0`` dims, clamping and broadcasting); the lowerings only map
output indices to input indices.  Data-dependent indices (gather) wrap negative
values; out-of-range indices are the caller's error, as in the reference.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx
from tvm.ir.expr import ExprWithOp

from kiln.ir.ops.tensor import _perm, _slice_params, _slice_range
from kiln.ir.types import to_numpy_dtype

from . import LowerCtx, lowers, shape_of, tvm_dtype

Expr = ExprWithOp


def out_shape(ctx: LowerCtx, i: int = 0) -> tuple[int, ...]:
    return tuple(int(d) for d in ctx.node.outputs[i].type.shape)


def view(x: te.Tensor, shape: tuple[int, ...], name: str = "T_reshape") -> te.Tensor:
    """Row-major reshape; a common trailing part of the shapes maps index to index."""
    src = shape_of(x)
    common = 0
    while common < min(len(src), len(shape)) and src[-1 - common] == shape[-1 - common]:
        common += 1
    head_in, head_out = src[: len(src) - common], shape[: len(shape) - common]

    def f(*idx):
        lead, tail = idx[: len(head_out)], idx[len(head_out):]
        flat: Expr | int = 0
        for i, d in zip(lead, head_out):
            flat = flat * d + i
        coords = []
        for d in reversed(head_in):
            coords.append(flat % d if d != 1 else 0)
            flat = flat // d
        return x(*reversed(coords), *tail)

    return te.compute(shape, f, name=name)


@lowers("reshape")
def reshape(ctx: LowerCtx, x: te.Tensor, *, shape, allowzero) -> te.Tensor:
    return view(x, out_shape(ctx))


@lowers("flatten")
def flatten(ctx: LowerCtx, x: te.Tensor, *, axis) -> te.Tensor:
    return view(x, out_shape(ctx), name="T_flatten")


@lowers("squeeze")
def squeeze(ctx: LowerCtx, x: te.Tensor, *, axes) -> te.Tensor:
    return view(x, out_shape(ctx), name="T_squeeze")


@lowers("unsqueeze")
def unsqueeze(ctx: LowerCtx, x: te.Tensor, *, axes) -> te.Tensor:
    return view(x, out_shape(ctx), name="T_unsqueeze")


@lowers("transpose")
def transpose(ctx: LowerCtx, x: te.Tensor, *, perm) -> te.Tensor:
    p = _perm(list(perm), len(x.shape))
    inv = [p.index(i) for i in range(len(p))]
    return te.compute(out_shape(ctx), lambda *idx: x(*(idx[inv[i]] for i in range(len(p)))), name="T_transpose")


@lowers("concat")
def concat(ctx: LowerCtx, *xs: te.Tensor, axis) -> te.Tensor:
    shape = out_shape(ctx)
    ax = axis % len(shape)
    parts, off = [], 0
    for x in xs:
        n = int(x.shape[ax])
        if n:
            parts.append((off, x))
        off += n

    def f(*idx):
        pos = idx[ax]

        def read(start: int, x: te.Tensor) -> Expr:
            return x(*idx[:ax], pos - start, *idx[ax + 1:])

        val = read(*parts[-1])
        for start, x in reversed(parts[:-1]):
            val = tirx.if_then_else(pos < start + int(x.shape[ax]), read(start, x), val)
        return val

    return te.compute(shape, f, name="T_concat")


@lowers("split")
def split(ctx: LowerCtx, x: te.Tensor, *, axis, split) -> tuple[te.Tensor, ...]:
    ax = axis % len(x.shape)
    offsets = np.cumsum([0, *split[:-1]])
    return tuple(te.compute(out_shape(ctx, n), _shifted(x, ax, int(off)), name=f"T_split{n}")
                 for n, off in enumerate(offsets))


def _shifted(x: te.Tensor, ax: int, off: int):
    return lambda *i: x(*i[:ax], i[ax] + off, *i[ax + 1:])


@lowers("slice")
def slice_(ctx: LowerCtx, x: te.Tensor, *, starts, ends, axes, steps) -> te.Tensor:
    rank = len(x.shape)
    begin, step = [0] * rank, [1] * rank
    attrs = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
    for ax, s, e, st in _slice_params(rank, attrs):
        begin[ax] = _slice_range(int(x.shape[ax]), s, e, st)[0]
        step[ax] = st
    return te.compute(out_shape(ctx), lambda *i: x(*(begin[a] + i[a] * step[a] for a in range(rank))),
                      name="T_slice")


def _wrap(i: Expr, dim: int) -> Expr:
    i = i.astype("int32")
    return tirx.Select(i < 0, i + dim, i)


@lowers("gather")
def gather(ctx: LowerCtx, x: te.Tensor, indices: te.Tensor, *, axis) -> te.Tensor:
    ax = axis % len(x.shape)
    r = len(indices.shape)
    dim = int(x.shape[ax])

    def f(*i):
        pos = _wrap(indices(*i[ax:ax + r]), dim)
        return x(*i[:ax], pos, *i[ax + r:])

    return te.compute(out_shape(ctx), f, name="T_gather")


@lowers("gather_elements")
def gather_elements(ctx: LowerCtx, x: te.Tensor, indices: te.Tensor, *, axis) -> te.Tensor:
    ax = axis % len(x.shape)
    dim = int(x.shape[ax])
    return te.compute(out_shape(ctx), lambda *i: x(*i[:ax], _wrap(indices(*i), dim), *i[ax + 1:]),
                      name="T_gather_elements")


def broadcast_read(t: te.Tensor, idx: tuple) -> Expr:
    """``t`` read at output index ``idx`` under numpy broadcasting (aligned on the right)."""
    off = len(idx) - len(t.shape)
    return t(*(0 if int(d) == 1 else idx[off + a] for a, d in enumerate(t.shape)))


@lowers("expand")
def expand(ctx: LowerCtx, x: te.Tensor, *, shape) -> te.Tensor:
    return te.compute(out_shape(ctx), lambda *i: broadcast_read(x, i), name="T_expand")


@lowers("tile")
def tile(ctx: LowerCtx, x: te.Tensor, *, repeats) -> te.Tensor:
    dims = shape_of(x)
    return te.compute(out_shape(ctx), lambda *i: x(*(0 if d == 1 else i[a] % d for a, d in enumerate(dims))),
                      name="T_tile")


def _pad_source(j: Expr, begin: int, dim: int, mode: str) -> Expr:
    """Input coordinate read at padded coordinate ``j`` (out-of-range for constant padding)."""
    src = j - begin
    if mode == "edge":
        return tirx.max(tirx.min(src, dim - 1), 0)
    if mode == "reflect":
        src = tirx.abs(src)
        return tirx.Select(src >= dim, 2 * (dim - 1) - src, src)
    if mode == "wrap":
        return tirx.floormod(src, dim)
    return src


@lowers("pad")
def pad(ctx: LowerCtx, x: te.Tensor, *, pads, mode, value) -> te.Tensor:
    dims, out = shape_of(x), out_shape(ctx)
    r = len(dims)
    begins = [pads[a] for a in range(r)]
    fill = tirx.const(np.asarray(value).astype(ctx.node.inputs[0].type.np_dtype).item(), x.dtype)

    def f(*j):
        src = [j[a] if begins[a] == 0 and out[a] <= dims[a] else _pad_source(j[a], begins[a], dims[a], mode)
               for a in range(r)]
        if mode != "constant":
            return x(*src)
        guarded = [a for a in range(r) if begins[a] > 0 or out[a] - begins[a] > dims[a]]
        if not guarded:
            return x(*src)
        inside = tirx.all(*(tirx.all(src[a] >= 0, src[a] < dims[a]) for a in guarded))
        if 0 in dims:
            return tirx.if_then_else(inside, x(*src), fill)
        # a clamped read and a select vectorize (and avoid TVM's bf16 if_then_else legalization bug)
        for a in guarded:
            src[a] = tirx.max(tirx.min(src[a], dims[a] - 1), 0)
        return tirx.Select(inside, x(*src), fill)

    return te.compute(out, f, name="T_pad")


def _select_table(i: Expr, values: list, dtype: str) -> Expr:
    val = tirx.const(values[-1] if values else 0, dtype)
    for k in range(len(values) - 2, -1, -1):
        val = tirx.Select(i == k, tirx.const(values[k], dtype), val)
    return val


@lowers("shape")
def shape(ctx: LowerCtx, x: te.Tensor, *, start=0, end=None) -> te.Tensor:
    dims = list(shape_of(x)[start:end])
    return te.compute((len(dims),), lambda i: _select_table(i, dims, "int64"), name="T_shape")


@lowers("trilu")
def trilu(ctx: LowerCtx, x: te.Tensor, k_operand: te.Tensor | None = None, *, upper, k) -> te.Tensor:
    """The diagonal offset is the attribute, or the k operand read at run time (compared in int64)."""
    zero = tirx.const(False if str(x.dtype) == "bool" else 0, x.dtype)

    def f(*i):
        if k_operand is None:
            d, kk = i[-1] - i[-2], k
        else:
            d, kk = (i[-1] - i[-2]).astype("int64"), k_operand(*([0] * len(k_operand.shape)))
        keep = d >= kk if upper else d <= kk
        return tirx.Select(keep, x(*i), zero)

    return te.compute(x.shape, f, name="T_trilu")


@lowers("range")
def range_(ctx: LowerCtx, *, start, limit, delta, dtype) -> te.Tensor:
    """start + i * delta (ints wrap as the reference's cumsum does; floats in float64, rounded once)."""
    dt = to_numpy_dtype(dtype)
    s, d = (np.asarray(v).astype(dt).item() for v in (start, delta))
    tdt = tvm_dtype(dtype)
    acc = "float64" if dt.kind == "f" else "int64"
    s_c, d_c = tirx.const(s, acc), tirx.const(d, acc)
    return te.compute(out_shape(ctx), lambda i: (s_c + i.astype(acc) * d_c).astype(tdt), name="T_range")


def _lowest(dtype, highest: bool = False) -> Expr:
    dtype = str(dtype)
    if dtype.startswith(("float", "bfloat")):
        return tirx.const(math.inf if highest else -math.inf, dtype)
    info = np.iinfo(np.dtype(dtype))
    return tirx.const(int(info.max if highest else info.min), dtype)


def _arg_reduce(ctx: LowerCtx, x: te.Tensor, axis: int, keepdims: int, last: int, largest: bool) -> te.Tensor:
    """Arg-max/min as a (index, value) reduction; ties go to the first (or ``last``) index.

    The identity's index loses every tie (INT_MAX for first, -1 for last), so an
    all -inf row still yields a real index.
    """
    dims = shape_of(x)
    ax = axis % len(dims)

    def better(a: Expr, b: Expr) -> Expr:
        return a > b if largest else a < b

    def combine(lhs, rhs):
        (i0, v0), (i1, v1) = (lhs[0], lhs[1]), (rhs[0], rhs[1])
        tie_ok = i1 > i0 if last else i1 < i0
        take = tirx.any(better(v1, v0), tirx.all(v1 == v0, tie_ok))
        return tirx.Select(take, i1, i0), tirx.Select(take, v1, v0)

    def identity(t0, t1):
        return tirx.const(-1 if last else 2 ** 31 - 1, t0), _lowest(t1, highest=not largest)

    reducer = te.comm_reducer(combine, identity, name="argreduce")
    k = te.reduce_axis((0, dims[ax]), name="k")
    red_shape = dims[:ax] + dims[ax + 1:]
    idx, _ = te.compute(red_shape, lambda *i: reducer((k.var, x(*i[:ax], k, *i[ax:])), axis=k), name="T_argreduce")

    def out(*i):
        j = i[:ax] + i[ax + 1:] if keepdims else i
        return idx(*j).astype("int64")

    return te.compute(out_shape(ctx), out, name="T_arg")


@lowers("argmax")
def argmax(ctx: LowerCtx, x: te.Tensor, *, axis, keepdims, select_last_index) -> te.Tensor:
    ctx.kind = "reduction"
    return _arg_reduce(ctx, x, axis, keepdims, select_last_index, largest=True)


@lowers("argmin")
def argmin(ctx: LowerCtx, x: te.Tensor, *, axis, keepdims, select_last_index) -> te.Tensor:
    ctx.kind = "reduction"
    return _arg_reduce(ctx, x, axis, keepdims, select_last_index, largest=False)


@lowers("cumsum")
def cumsum(ctx: LowerCtx, x: te.Tensor, *, axis, exclusive, reverse) -> te.Tensor:
    """Each output sums a masked row of the input (order-free: exact for ints, reassociated for floats)."""
    dims = shape_of(x)
    ax = axis % len(dims)
    k = te.reduce_axis((0, dims[ax]), name="k")
    zero = tirx.const(0, x.dtype)

    def f(*i):
        pos = i[ax]
        if reverse:
            cond = k > pos if exclusive else k >= pos
        else:
            cond = k < pos if exclusive else k <= pos
        return te.sum(tirx.Select(cond, x(*i[:ax], k, *i[ax + 1:]), zero), axis=k)

    ctx.kind = "reduction"
    return te.compute(dims, f, name="T_cumsum")
