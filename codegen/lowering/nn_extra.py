"""TVM lowerings of the ops in ir/ops/nn_extra.py.

``group_norm`` and ``lp_pool`` are TE reductions (the ``reduction`` schedule); the general
``einsum`` is one TE reduction over its summed labels. ``max_unpool`` (a scatter) and ``det``
(Gaussian elimination) are sequential per element or per matrix, so they are ``te.extern``
stages written with TVM's IR builder: the unpool's zero fill runs parallel over vector-wide
chunks and its scatter serially (a repeated index keeps the last write, as the reference does);
``det`` eliminates each matrix on its own thread. Each extern reads a copy stage made by TE (the
kernel's schedulable root block, parallel and vectorized by the injective schedule; ``det``
eliminates in place in that float64 copy).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from kiln.ir.ops.nn_extra import einsum_dims, parse_einsum

from ..schedules import PARALLEL_MIN_WORK
from ..target import vector_lanes
from . import LowerCtx, lowers, shape_of
from .nn import _acc, _spatial, _unravel, _window
from .tensor import out_shape

# ------------------------------------------------------------------ group norm


@lowers("group_norm")
def group_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, bias: te.Tensor, *, num_groups,
               epsilon) -> te.Tensor:
    """Per-(sample, group) mean and variance over (channel in group, flattened spatial), then
    per-channel affine. The two reduction axes keep the reductions at (N, G) rows, computed once
    per group (the staged reduction schedule), not once per output row."""
    n, c, *sp = shape_of(x)
    cg, size = c // num_groups, math.prod(sp)
    acc = _acc(x.dtype)
    inv = tirx.const(1.0 / (cg * size), acc)

    def at(b, g, rc, rs):
        return x(b, g * cg + rc, *_unravel(rs, tuple(sp))).astype(acc)

    rc1, rs1 = te.reduce_axis((0, cg), name="rc1"), te.reduce_axis((0, size), name="rs1")
    s1 = te.compute((n, num_groups), lambda b, g: te.sum(at(b, g, rc1, rs1), axis=[rc1, rs1]), name="gn_sum")
    mean = te.compute((n, num_groups), lambda b, g: s1(b, g) * inv, name="gn_mean")
    rc2, rs2 = te.reduce_axis((0, cg), name="rc2"), te.reduce_axis((0, size), name="rs2")

    def sq(b, g):
        d = at(b, g, rc2, rs2) - mean(b, g)
        return te.sum(d * d, axis=[rc2, rs2])

    s2 = te.compute((n, num_groups), sq, name="gn_sqsum")
    eps = tirx.const(epsilon, acc)

    def out(b, ch, *s):
        g = ch // cg
        y = (x(b, ch, *s).astype(acc) - mean(b, g)) / tirx.sqrt(s2(b, g) * inv + eps)
        return (y * scale(ch).astype(acc) + bias(ch).astype(acc)).astype(x.dtype)

    ctx.kind = "reduction"
    return te.compute(x.shape, out, name="T_group_norm")


# ------------------------------------------------------------------ Lp pooling


def _int_power(a, p: int):
    """a ** p for an integer p >= 1 by repeated squaring (exact where pow's exp/log is not)."""
    out, base = None, a
    while p:
        if p & 1:
            out = base if out is None else out * base
        p >>= 1
        if p:
            base = base * base
    return out


@lowers("lp_pool")
def lp_pool(ctx: LowerCtx, x: te.Tensor, *, kernel_shape, strides, pads, dilations, ceil_mode, p) -> te.Tensor:
    """(sum of |x|^p over the window)^(1/p); taps outside the input (padding, ceil-mode overhang) add 0."""
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    sizes = shape_of(x)[2:]
    acc = _acc(x.dtype)
    rk = [te.reduce_axis((0, k), name=f"rk{i}") for i, k in enumerate(kernel_shape)]

    def power(v):
        return _int_power(tirx.abs(v), p)

    def body(nb, ch, *o):
        pos = [_window(o[i], rk[i], strides[i], dil[i], pads[i]) for i in range(nsp)]
        inside = tirx.all(*(tirx.all(q >= 0, q < s) for q, s in zip(pos, sizes)))
        v = tirx.if_then_else(inside, x(nb, ch, *pos), tirx.const(0, x.dtype)).astype(acc)
        return te.sum(power(v), axis=rk)

    def root(*i):
        s = total(*i)
        r = s if p == 1 else tirx.sqrt(s) if p == 2 else tirx.power(s, tirx.const(1.0 / p, acc))
        return r.astype(x.dtype)

    shape = out_shape(ctx)
    total = te.compute(shape, body, name="lp_pool_sum")
    ctx.kind = "reduction"
    return te.compute(shape, root, name="lp_pool")


# ------------------------------------------------------------------ einsum


@lowers("einsum")
def einsum(ctx: LowerCtx, *xs: te.Tensor, equation) -> te.Tensor:
    """One compute over the output labels, reducing over the summed ones; a label repeated in an
    operand reads its diagonal, a size-1 broadcast dim reads index 0."""
    terms, out = parse_einsum(equation, [len(x.shape) for x in xs])
    dims = einsum_dims(terms, [shape_of(x) for x in xs])
    dtype = str(xs[0].dtype)
    acc = _acc(dtype)
    summed = [c for c in dims if c not in out]
    red = {c: te.reduce_axis((0, int(dims[c])), name=f"r_{ord(c)}") for c in summed}

    def body(*idx):
        var = dict(zip(out, idx)) | red
        prod = None
        for x, term in zip(xs, terms):
            v = x(*(0 if d == 1 and dims[c] != 1 else var[c] for c, d in zip(term, shape_of(x)))).astype(acc)
            prod = v if prod is None else prod * v
        return te.sum(prod, axis=[red[c] for c in summed]) if summed else prod

    y = te.compute(tuple(int(dims[c]) for c in out), body, name="einsum")
    ctx.kind = "reduction" if summed else "injective"
    return y if acc == dtype else te.compute(y.shape, lambda *i: y(*i).astype(dtype), name="T_einsum")


# ------------------------------------------------------------------ extern helpers


@contextmanager
def _statements():
    """An IR builder whose statements run in sequence (inside an always-true ``if`` that TVM's
    simplifier removes: ``T.seq_scope`` would leave a pragma LLVM warns about)."""
    with IRBuilder() as builder, T.If(tirx.const(True)), T.Then():
        yield builder


def _flat(buf, n: int):
    """A 1-D proxy of an extern's buffer (declared inside the builder's current frame)."""
    return T.buffer_proxy(T.decl_buffer((n,), buf.dtype, data=buf.data))


def _zero_fill(out, n: int, dtype: str, lanes: int) -> None:
    """out[0:n] = 0: parallel over vector-wide chunks when big, then the scalar tail."""
    chunks = n // lanes
    zero = tirx.const(0, dtype)
    if chunks:
        loop = T.parallel if n >= PARALLEL_MIN_WORK else T.serial
        with loop(0, chunks) as q:
            with T.vectorized(0, lanes) as v:
                out[q * lanes + v] = zero
    if n % lanes:
        with T.serial(chunks * lanes, n) as t:
            out[t] = zero


# ------------------------------------------------------------------ max unpool


@lowers("max_unpool")
def max_unpool(ctx: LowerCtx, x: te.Tensor, indices: te.Tensor, *, kernel_shape, strides, pads,
               output_shape) -> te.Tensor:
    """Zero fill, then y.flat[indices[i]] = x.flat[i] in input order. An index outside the output
    is skipped (the interpreter raises; a kernel must not write out of bounds)."""
    shape = out_shape(ctx)
    n_in, n_out = math.prod(shape_of(x)), math.prod(shape)
    dtype = str(x.dtype)
    lanes = vector_lanes(ctx.target, dtype)
    src = te.compute(x.shape, lambda *i: x(*i), name="unpool_src")

    def gen(xb, ib, ob):
        with _statements() as builder:
            xs, idx, out = _flat(xb, n_in), _flat(ib, n_in), _flat(ob, n_out)
            _zero_fill(out, n_out, dtype, lanes)
            with T.serial(0, n_in) as t:
                j = idx[t]
                with T.If(tirx.all(j >= 0, j < n_out)), T.Then():
                    out[j] = xs[t]
        return builder.get()

    ctx.kind = "injective"
    return te.extern([shape], [src, indices], lambda ins, outs: gen(ins[0], ins[1], outs[0]),
                     dtype=dtype, name="max_unpool")


# ------------------------------------------------------------------ determinant


@lowers("det")
def det(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    """Gaussian elimination with partial pivoting in float64, one matrix per parallel iteration.

    The matrices are copied into a float64 work buffer with three scalar slots per matrix
    (determinant so far, pivot row, pivot magnitude) after the M*M entries.
    """
    *batch, m, _ = shape_of(x)
    nb, mm = math.prod(batch), m * m
    dtype = str(x.dtype)
    shape = out_shape(ctx)
    if m == 0:
        ctx.kind = "injective"
        return te.compute(shape, lambda *i: tirx.const(1, dtype), name="T_det_empty")
    xf = te.compute((nb, mm), lambda b, t: x(*_unravel(b, tuple(batch)), t // m, t % m), name="det_in") \
        if batch else te.compute((1, mm), lambda b, t: x(t // m, t % m), name="det_in")
    stride = mm + 3
    work = te.compute((nb, stride), lambda b, t: tirx.if_then_else(t < mm, xf(b, tirx.min(t, mm - 1)).astype("float64"),
                                                                    tirx.const(0.0, "float64")), name="det_work")
    f64 = "float64"

    def gen(wb, ob):
        with _statements() as builder:
            w, out = _flat(wb, nb * stride), _flat(ob, nb)
            loop = T.parallel if nb > 1 else T.serial
            with loop(0, nb) as b:
                base = b * stride
                d, piv_row, best = base + mm, base + mm + 1, base + mm + 2

                def a(i, j):
                    return base + i * m + j

                w[d] = tirx.const(1.0, f64)
                with T.serial(0, m) as k:
                    w[piv_row] = k.astype(f64)
                    w[best] = tirx.abs(w[a(k, k)])
                    with T.serial(k + 1, m) as i:
                        with T.If(tirx.abs(w[a(i, k)]) > w[best]):
                            with T.Then():
                                w[best] = tirx.abs(w[a(i, k)])
                                w[piv_row] = i.astype(f64)
                    p = w[piv_row].astype("int32")
                    with T.If(p != k):
                        with T.Then():
                            w[d] = -w[d]
                            with T.serial(k, m) as j:
                                w[best] = w[a(k, j)]
                                w[a(k, j)] = w[a(p, j)]
                                w[a(p, j)] = w[best]
                    w[d] = w[d] * w[a(k, k)]
                    with T.If(w[a(k, k)] != tirx.const(0.0, f64)):
                        with T.Then():
                            with T.serial(k + 1, m) as i:
                                w[best] = w[a(i, k)] / w[a(k, k)]
                                with T.serial(k + 1, m) as j:
                                    w[a(i, j)] = w[a(i, j)] - w[best] * w[a(k, j)]
                out[b] = w[d].astype(dtype)
        return builder.get()

    ctx.kind = "injective"
    return te.extern([shape], [work], lambda ins, outs: gen(ins[0], outs[0]), dtype=dtype, name="det")
