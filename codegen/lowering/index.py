"""TVM lowerings of the ops in ir/ops/index.py.

Pointwise index ops (one_hot, eye_like, arange, tensor_scatter, depth_to_space, space_to_depth,
reverse_sequence) are TE computes that map each output index to the input index it reads, and
get the "injective" schedule (parallel rows, vectorized last axis). top_k and cumprod are TE
reductions ("reduction" schedule).

The scatters are written as a copy plus a scatter loop in one TIR extern stage (TE cannot express
writes at computed positions); its loops are parallel and vectorized by construction:

* the copy of ``data`` into the output: a parallel loop over vectors;
* scatter_elements: a parallel loop over the update positions *off* the axis, each running its
  updates along the axis in order (two updates can hit the same output element only when they
  differ in the axis coordinate alone, so no two threads ever write the same element);
* scatter_nd: a parallel loop over vector chunks of the updated slice, each running the index
  tuples in order. When the slice is shorter than two vectors (element-wise indices, as in
  ``scatter_nd`` with q = rank) the loop over index tuples is serial: two tuples may address the
  same element, and ONNX applies reductions (and, for ``none``, the last write) in order.

Out-of-range indices are skipped by the kernels (the reference raises), so a bad index never
writes outside the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tvm import te, tirx
from tvm.ir.expr import ExprWithOp

from kiln.codegen.schedules import PARALLEL_MIN_WORK
from kiln.codegen.target import vector_lanes

from . import LowerCtx, lowers, shape_of, tvm_dtype
from .tensor import _lowest, out_shape

Expr = ExprWithOp
# top_k makes k selection passes (k argmax reductions, k*n work per row) up to this k when the row
# is longer than 4k; otherwise it ranks every entry against every other (n*n work per row, a fixed
# number of stages: each pass adds ~0.5 s of TVM compile time).
TOP_K_CHAIN_MAX = 8


def _is_float(dtype: str) -> bool:
    return str(dtype).startswith(("float", "bfloat"))


def _const(value, dtype: str) -> Expr:
    return tirx.const(bool(value) if str(dtype) == "bool" else value, dtype)


# ====================================================================== pointwise index ops

@lowers("arange")
def arange(ctx: LowerCtx, start: te.Tensor, delta: te.Tensor, *, length) -> te.Tensor:
    """start + i * delta in the operands' dtype (f16/bf16 in f32, rounded once, as the reference)."""
    dt = str(start.dtype)
    wide = "float32" if dt in ("float16", "bfloat16") else dt
    return te.compute((length,), lambda i: (start().astype(wide) + i.astype(wide) * delta().astype(wide)).astype(dt),
                      name="T_arange")


@lowers("one_hot")
def one_hot(ctx: LowerCtx, indices: te.Tensor, values: te.Tensor, *, depth, axis) -> te.Tensor:
    ax = axis % (len(indices.shape) + 1)

    it = "float64" if _is_float(indices.dtype) else "int64"  # a fractional index matches nothing

    def f(*i):
        v = indices(*i[:ax], *i[ax + 1:]).astype(it)
        v = tirx.Select(v < tirx.const(0, it), v + tirx.const(depth, it), v)
        return tirx.Select(v == i[ax].astype(it), values[1], values[0])

    return te.compute(out_shape(ctx), f, name="T_one_hot")


@lowers("eye_like")
def eye_like(ctx: LowerCtx, x: te.Tensor, *, k, dtype=None) -> te.Tensor:
    dt = str(x.dtype) if dtype is None else tvm_dtype(dtype)
    one, zero = _const(1, dt), _const(0, dt)
    return te.compute(out_shape(ctx), lambda i, j: tirx.Select(j - i == k, one, zero), name="T_eye_like")


@lowers("tensor_scatter")
def tensor_scatter(ctx: LowerCtx, past: te.Tensor, update: te.Tensor, write_indices: te.Tensor | None = None,
                   *, axis, mode) -> te.Tensor:
    """Gather form: out[.., s, ..] = update[.., s - w[b], ..] where that is inside the update, else
    past[.., s, ..]; s - w[b] is taken mod the cache length in circular mode."""
    dims = shape_of(past)
    ax = axis % len(dims)
    length, n = dims[ax], int(update.shape[ax])

    def f(*i):
        w = write_indices(i[0]) if write_indices is not None else tirx.const(0, "int64")
        off = i[ax].astype("int64") - w
        if mode == "circular":
            off = tirx.floormod(off, length)
        inside = tirx.all(off >= 0, off < n)
        src = tirx.max(tirx.min(off, n - 1), 0).astype("int32")
        return tirx.Select(inside, update(*i[:ax], src, *i[ax + 1:]), past(*i))

    return te.compute(dims, f, name="T_tensor_scatter")


@lowers("depth_to_space")
def depth_to_space(ctx: LowerCtx, x: te.Tensor, *, blocksize, mode) -> te.Tensor:
    b = blocksize
    c_out = int(x.shape[1]) // (b * b)

    def f(n, c, y, z):
        bh, bw = y % b, z % b
        ch = (bh * b + bw) * c_out + c if mode == "DCR" else c * b * b + bh * b + bw
        return x(n, ch, y // b, z // b)

    return te.compute(out_shape(ctx), f, name="T_depth_to_space")


@lowers("space_to_depth")
def space_to_depth(ctx: LowerCtx, x: te.Tensor, *, blocksize, mode) -> te.Tensor:
    b = blocksize
    c_in = int(x.shape[1])

    def f(n, ch, h, w):
        if mode == "DCR":
            blk, c = ch // c_in, ch % c_in
        else:
            c, blk = ch // (b * b), ch % (b * b)
        return x(n, c, h * b + blk // b, w * b + blk % b)

    return te.compute(out_shape(ctx), f, name="T_space_to_depth")


@lowers("reverse_sequence")
def reverse_sequence(ctx: LowerCtx, x: te.Tensor, sequence_lens: te.Tensor, *, time_axis, batch_axis) -> te.Tensor:
    steps = int(x.shape[time_axis])

    def f(*i):
        t = i[time_axis].astype("int64")
        n = tirx.max(tirx.min(sequence_lens(i[batch_axis]), steps), 0)
        src = tirx.Select(t < n, n - 1 - t, t).astype("int32")
        return x(*(src if a == time_axis else i[a] for a in range(len(i))))

    return te.compute(shape_of(x), f, name="T_reverse_sequence")


# ====================================================================== reductions

@lowers("cumprod")
def cumprod(ctx: LowerCtx, x: te.Tensor, *, axis, exclusive, reverse) -> te.Tensor:
    """Each output multiplies a masked row of the input (as cumsum: order-free, exact for ints)."""
    dims = shape_of(x)
    ax = axis % len(dims)
    k = te.reduce_axis((0, dims[ax]), name="k")
    one = _const(1, x.dtype)
    prod = te.comm_reducer(lambda a, b: a * b, lambda t: tirx.const(1, t), name="prod")

    def f(*i):
        pos = i[ax]
        if reverse:
            cond = k > pos if exclusive else k >= pos
        else:
            cond = k < pos if exclusive else k <= pos
        return prod(tirx.Select(cond, x(*i[:ax], k, *i[ax + 1:]), one), axis=k)

    ctx.kind = "reduction"
    return te.compute(dims, f, name="T_cumprod")


def _argbest(largest: int) -> Callable:
    """(index, value) reducer keeping the best value, the lower index on ties."""
    def better(a: Expr, b: Expr) -> Expr:
        return a > b if largest else a < b

    def combine(lhs, rhs):
        (i0, v0), (i1, v1) = (lhs[0], lhs[1]), (rhs[0], rhs[1])
        take = tirx.any(better(v1, v0), tirx.all(v1 == v0, i1 < i0))
        return tirx.Select(take, i1, i0), tirx.Select(take, v1, v0)

    def identity(t0, t1):
        return tirx.const(2 ** 31 - 1, t0), _lowest(t1, highest=not largest)

    return te.comm_reducer(combine, identity, name="argbest")


def _argbest_eligible(largest: int) -> Callable:
    """(eligible, index, value) reducer: the best eligible entry, the lower index on ties.

    ``eligible`` is an int32 flag: a bool reduction buffer gave wrong results once scheduled.
    """
    def combine(lhs, rhs):
        (e0, i0, v0), (e1, i1, v1) = lhs, rhs
        better = v1 > v0 if largest else v1 < v0
        take = tirx.all(e1 != 0, tirx.any(e0 == 0, better, tirx.all(v1 == v0, i1 < i0)))
        return tirx.Select(take, e1, e0), tirx.Select(take, i1, i0), tirx.Select(take, v1, v0)

    def identity(t0, t1, t2):
        return tirx.const(0, t0), tirx.const(2 ** 31 - 1, t1), _lowest(t2, highest=not largest)

    return te.comm_reducer(combine, identity, name="argbest_eligible")


@lowers("top_k")
def top_k(ctx: LowerCtx, x: te.Tensor, *, k, axis, largest, sorted) -> tuple[te.Tensor, te.Tensor]:  # noqa: A002
    """Values and i64 indices best first, ties to the lower index (sorted=0 is sorted too)."""
    dims = shape_of(x)
    ax = axis % len(dims)
    kk = int(k[0])
    if kk == 0:
        raise NotImplementedError("top_k with k=0 (an empty output) has no kernel")
    ctx.kind = "reduction"
    if kk <= TOP_K_CHAIN_MAX and 4 * kk < dims[ax]:
        return _top_k_chain(ctx, x, ax, kk, largest)
    return _top_k_rank(ctx, x, ax, kk, largest)


def _before(largest: int, va: Expr, ia: Expr, vb: Expr, ib: Expr) -> Expr:
    """Does (va at ia) come before (vb at ib) in top_k's order?"""
    better = va > vb if largest else va < vb
    return tirx.any(better, tirx.all(va == vb, ia < ib))


def _top_k_chain(ctx: LowerCtx, x: te.Tensor, ax: int, k: int, largest: int) -> tuple[te.Tensor, te.Tensor]:
    """k argbest passes over each row; pass j takes the best entry after pass j-1's in the order.

    The passes after the first reduce (eligible, index, value) triples: TE drops a ``where`` on
    tuple reductions, and masking the operands with selects made TVM's buffer-region analysis
    take seconds per pass.
    """
    dims = shape_of(x)
    rows = dims[:ax] + dims[ax + 1:]
    first = _argbest(largest)
    rest = _argbest_eligible(largest)
    passes: list[tuple[te.Tensor, te.Tensor]] = []

    def pass_body(r: te.IterVar, prev: tuple[te.Tensor, te.Tensor] | None) -> Callable:
        def body(*i):
            xi = x(*i[:ax], r, *i[ax:])
            if prev is None:
                return first((r.var, xi), axis=r)
            after = _before(largest, prev[1](*i), prev[0](*i), xi, r.var)
            return rest((after.astype("int32"), r.var, xi), axis=r)  # an int flag: see _argbest_eligible
        return body

    for j in range(k):
        r = te.reduce_axis((0, dims[ax]), name=f"r{j}")
        res = te.compute(rows, pass_body(r, passes[-1] if passes else None), name=f"T_top_k_pass{j}")
        passes.append((res[-2], res[-1]))

    def pick(which: int) -> Callable:
        def f(*i):
            row = i[:ax] + i[ax + 1:]
            out = passes[-1][which](*row)
            for j in range(k - 2, -1, -1):
                # not Select: a vectorized Select with a scalar condition over intermediate
                # buffers reads garbage in TVM 0.27 (if_then_else is correct)
                out = tirx.if_then_else(i[ax] == j, passes[j][which](*row), out)
            return out.astype("int64") if which == 0 else out
        return f

    shape = out_shape(ctx)
    return te.compute(shape, pick(1), name="T_top_k_values"), te.compute(shape, pick(0), name="T_top_k_indices")


def _top_k_rank(ctx: LowerCtx, x: te.Tensor, ax: int, k: int, largest: int) -> tuple[te.Tensor, te.Tensor]:
    """rank[i] = #entries before entry i; the j-th output is the entry of rank j."""
    dims = shape_of(x)
    n = dims[ax]
    m = te.reduce_axis((0, n), name="m")

    def rank(*i):
        other = x(*i[:ax], m, *i[ax + 1:])
        return te.sum(_before(largest, other, m, x(*i), i[ax]).astype("int32"), axis=m)

    ranks = te.compute(dims, rank, name="T_top_k_rank")
    t = te.reduce_axis((0, n), name="t")
    zero = tirx.const(0, "int32")
    idx = te.compute(out_shape(ctx), lambda *i: te.sum(
        tirx.Select(ranks(*i[:ax], t, *i[ax + 1:]) == i[ax], t, zero), axis=t), name="T_top_k_pick")
    values = te.compute(out_shape(ctx), lambda *i: x(*i[:ax], idx(*i), *i[ax + 1:]), name="T_top_k_values")
    indices = te.compute(out_shape(ctx), lambda *i: idx(*i).astype("int64"), name="T_top_k_indices")
    return values, indices


# ====================================================================== scatters (TIR extern)

def _i(n: int) -> tirx.IntImm:
    return tirx.IntImm("int32", n)


def _loop(n: int, body: Callable[[tirx.Var], tirx.Stmt], kind=tirx.ForKind.SERIAL, name: str = "i") -> tirx.Stmt:
    v = tirx.Var(name, "int32")
    return tirx.For(v, _i(0), _i(n), kind, body(v))


def _flat(buf: tirx.Buffer, name: str) -> tuple[tirx.Buffer, tirx.Stmt]:
    """A 1-D view of ``buf`` (same data) and its declaration."""
    n = math.prod(int(d) for d in buf.shape)
    view = tirx.decl_buffer((n,), buf.dtype, name, data=buf.data)
    return view, tirx.DeclBuffer(view, data=buf.data)


def _lanes(ctx: LowerCtx, dtype: str) -> int:
    return 1 if str(dtype) == "bool" else vector_lanes(ctx.target, str(dtype))


def _copy(ctx: LowerCtx, dst: tirx.Buffer, src: tirx.Buffer, n: int) -> list[tirx.Stmt]:
    """dst[:n] = src[:n]: a parallel loop over vectors (parallel only when it is worth a launch)."""
    vec = _lanes(ctx, dst.dtype)
    main = n - n % vec
    out = []
    if main:
        kind = tirx.ForKind.PARALLEL if n >= PARALLEL_MIN_WORK else tirx.ForKind.SERIAL
        out.append(_loop(main // vec, lambda o: _loop(
            vec, lambda i: tirx.BufferStore(dst, tirx.BufferLoad(src, [o * vec + i]), [o * vec + i]),
            tirx.ForKind.VECTORIZED if vec > 1 else tirx.ForKind.SERIAL, "v"), kind, "o"))
    if n - main:
        out.append(_loop(n - main, lambda i: tirx.BufferStore(dst, tirx.BufferLoad(src, [main + i]), [main + i]),
                         name="t"))
    return out


def _combine(reduction: str, old: Expr, new: Expr) -> Expr:
    if reduction == "add":
        return old + new
    if reduction == "mul":
        return old * new
    if reduction == "max":
        return tirx.max(old, new)
    if reduction == "min":
        return tirx.min(old, new)
    return new


def _decompose(flat: Expr, dims: list[int], dtype: str) -> list[Expr]:
    """Row-major coordinates of ``flat`` (of ``dtype``) in ``dims``."""
    coords: list[Expr] = []
    for d in reversed(dims):
        coords.append(flat % d if d != 1 else tirx.const(0, dtype))
        flat = flat // d
    return coords[::-1]


def _index_dtype(*shapes) -> str:
    return "int64" if max(math.prod(s) for s in shapes) >= 2 ** 31 else "int32"


@lowers("scatter_elements")
def scatter_elements(ctx: LowerCtx, data: te.Tensor, indices: te.Tensor, updates: te.Tensor, *,
                     axis, reduction) -> te.Tensor:
    dshape, ishape = list(shape_of(data)), list(shape_of(indices))
    ax = axis % len(dshape)
    dim = dshape[ax]
    it = _index_dtype(dshape, ishape)
    # wrapped index, or -1 when out of range (that update is skipped)
    pos = te.compute(ishape, lambda *i: _wrapped(indices(*i), dim, it), name="T_scatter_pos")
    others = ishape[:ax] + ishape[ax + 1:]
    n_other = math.prod(others)
    dstrides = [math.prod(dshape[a + 1:]) for a in range(len(dshape))]
    istrides = [math.prod(ishape[a + 1:]) for a in range(len(ishape))]

    def body(ins, outs):
        d, p, u = ins
        o = outs[0]
        (df, ddecl), (of, odecl), (pf, pdecl), (uf, udecl) = (_flat(d, "df"), _flat(o, "of"), _flat(p, "pf"),
                                                              _flat(u, "uf"))

        def per_row(r):
            c = _decompose(r.astype(it), others, it)
            coords = c[:ax] + [None] + c[ax:]

            def one(a):
                a = a.astype(it)
                uflat = sum((coords[b] if b != ax else a) * istrides[b] for b in range(len(ishape)))
                t = tirx.BufferLoad(pf, [uflat])
                oflat = sum((coords[b] if b != ax else t) * dstrides[b] for b in range(len(dshape)))
                new = _combine(reduction, tirx.BufferLoad(of, [oflat]), tirx.BufferLoad(uf, [uflat]))
                return tirx.IfThenElse(t >= 0, tirx.BufferStore(of, new, [oflat]), None)

            return _loop(ishape[ax], one, name="a")

        kind = tirx.ForKind.PARALLEL if math.prod(ishape) >= PARALLEL_MIN_WORK and n_other > 1 else tirx.ForKind.SERIAL
        scatter = _loop(n_other, per_row, kind, "r")
        return tirx.SeqStmt([ddecl, odecl, pdecl, udecl, *_copy(ctx, of, df, math.prod(dshape)), scatter])

    return te.extern(dshape, [data, pos, updates], body, dtype=str(data.dtype), name="T_scatter_elements")


def _wrapped(i: Expr, dim: int, dtype: str) -> Expr:
    """i counted from the end when negative; -1 when outside [-dim, dim)."""
    i = i.astype(dtype)
    w = tirx.Select(i < 0, i + dim, i)
    return tirx.Select(tirx.all(w >= 0, w < dim), w, tirx.const(-1, dtype))


@lowers("scatter_nd")
def scatter_nd(ctx: LowerCtx, data: te.Tensor, indices: te.Tensor, updates: te.Tensor, *, reduction) -> te.Tensor:
    dshape, ishape = list(shape_of(data)), list(shape_of(indices))
    q = ishape[-1]
    lead, inner = dshape[:q], math.prod(dshape[q:])
    n_upd = math.prod(ishape[:-1])
    it = _index_dtype(dshape, ishape)
    strides = [math.prod(lead[j + 1:]) for j in range(q)]

    def row(*u):
        parts = [_wrapped(indices(*u, j), lead[j], it) for j in range(q)]
        valid = tirx.all(*(p >= 0 for p in parts)) if q > 1 else parts[0] >= 0
        flat = sum((p * strides[j] for j, p in enumerate(parts)), tirx.const(0, it))
        return tirx.Select(valid, flat, tirx.const(-1, it))

    rows = te.compute(ishape[:-1] or [1], row if ishape[:-1] else lambda _: row(), name="T_scatter_row")
    vec = _lanes(ctx, data.dtype)
    chunks = inner // vec

    def body(ins, outs):
        d, rw, u = ins
        o = outs[0]
        (df, ddecl), (of, odecl), (rf, rdecl), (uf, udecl) = (_flat(d, "df"), _flat(o, "of"), _flat(rw, "rf"),
                                                              _flat(u, "uf"))

        def write(uidx, s):
            r = tirx.BufferLoad(rf, [uidx]).astype(it)
            at = r * inner + s.astype(it)
            src = uidx.astype(it) * inner + s.astype(it)
            new = _combine(reduction, tirx.BufferLoad(of, [at]), tirx.BufferLoad(uf, [src]))
            return tirx.BufferStore(of, new, [at])

        def guarded(uidx, inner_loop):
            return tirx.IfThenElse(tirx.BufferLoad(rf, [uidx]) >= 0, inner_loop, None)

        stmts = [ddecl, odecl, rdecl, udecl, *_copy(ctx, of, df, math.prod(dshape))]
        if chunks >= 2:  # parallel over vector chunks of the slice, index tuples in order inside
            kind = tirx.ForKind.PARALLEL if n_upd * inner >= PARALLEL_MIN_WORK else tirx.ForKind.SERIAL
            stmts.append(_loop(chunks, lambda c: _loop(n_upd, lambda ui: guarded(ui, _loop(
                vec, lambda v: write(ui, c * vec + v), tirx.ForKind.VECTORIZED if vec > 1 else tirx.ForKind.SERIAL,
                "v")), name="u"), kind, "c"))
            start = chunks * vec
        else:
            start = 0
        if inner - start:  # the rest of each slice (all of it for short slices): serial, in order
            stmts.append(_loop(n_upd, lambda ui: guarded(ui, _loop(inner - start, lambda s: write(ui, s + start),
                                                                     name="s")), name="u"))
        return tirx.SeqStmt(stmts)

    return te.extern(dshape, [data, rows, updates], body, dtype=str(data.dtype), name="T_scatter_nd")

