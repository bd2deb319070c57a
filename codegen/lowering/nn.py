"""TVM lowerings of the ops in ir/ops/nn.py (ONNX semantics).

Anchors use the TE builders codegen/schedules.py is tuned for: a matmul with a
constant 2-D right operand packs it at compile time (``pack_weight``) and
uses ``packed_matmul_te``; other matmuls ``batch_matmul_te`` (or the same
compute with broadcast batch dims); 1-D and 2-D convs ``conv2d_nchw_te`` (a
1-D conv is a 2-D conv of height 1; conv_transpose is a conv of the
zero-upsampled input with the flipped, transposed kernel).  f16/bf16 operands
accumulate in float32 and round once; integers accumulate in their own dtype
(wrapping, as the reference does).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx, topi

from ..schedules import (
    MATMUL_NR_VECTORS,
    batch_matmul_te,
    conv2d_nchw_te,
    conv2d_ocvec_te,
    depthwise_channels,
    depthwise_conv2d_te,
    ocvec_block,
    pack_conv_ocvec,
    pack_weight,
    packed_matmul_te,
)
from ..target import vector_lanes
from . import LowerCtx, lowers, shape_of
from .elementwise import is_float
from .tensor import broadcast_read, out_shape, view


def _acc(dtype) -> str:
    """Accumulation dtype (``dtype`` may be a str or a TE tensor's PrimType)."""
    dtype = str(dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _cast(t: te.Tensor, dtype: str, name: str = "T_cast") -> te.Tensor:
    return t if t.dtype == dtype else te.compute(t.shape, lambda *i: t(*i).astype(dtype), name=name)


def _spatial(nsp: int, strides, pads, dilations=None) -> tuple[list[int], list[int], list[int]]:
    """ONNX defaults: strides and dilations 1, pads 0 (begins then ends)."""
    return (list(strides or [1] * nsp), list(pads or [0] * (2 * nsp)), list(dilations or [1] * nsp))


def _unravel(r, dims: tuple[int, ...]) -> list:
    """Coordinates of flat index ``r`` in a row-major block of ``dims``."""
    out = []
    for d in reversed(dims):
        out.append(r % d if d != 1 else 0)
        r = r // d
    return out[::-1]


# ------------------------------------------------------------------ matmul


@lowers("matmul")
def matmul(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    weight = ctx.const(1)
    if weight is not None and weight.ndim == 2:
        return _packed_matmul(ctx, a, weight)
    return _batch_matmul(ctx, a, b)


def _packed_matmul(ctx: LowerCtx, a: te.Tensor, weight: np.ndarray) -> te.Tensor:
    """``a @ W`` with ``W`` packed as ``[N/bn, K, bn]`` at compile time (the schedule's register tile)."""
    A = view(a, (1, int(a.shape[0])), name="T_as_row") if len(a.shape) == 1 else a
    return _finish(ctx, _packed_matmul_te(ctx, A, weight), a.dtype)


def _packed_matmul_te(ctx: LowerCtx, a: te.Tensor, weight: np.ndarray) -> te.Tensor:
    """The packed-weight matmul kernel on ``a[..., K]`` and the constant ``weight[K, N]`` (replacing operand 1)."""
    acc = _acc(a.dtype)
    bn = MATMUL_NR_VECTORS * vector_lanes(ctx.target, acc)
    mm = packed_matmul_te(a, weight.shape, bn=bn, prepacked=ctx.replace_const(1, pack_weight(weight, bn)),
                          out_dtype=acc)
    ctx.kind, ctx.block = "matmul", mm.block
    return mm.output


def _finish(ctx: LowerCtx, c: te.Tensor, dtype: str) -> te.Tensor:
    """Round to the operands' dtype and drop the dims a 1-D operand added."""
    c = _cast(c, dtype)
    shape = out_shape(ctx)
    return c if shape_of(c) == shape else view(c, shape, name="T_matmul_view")


def _batch_matmul(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    dtype, acc = a.dtype, _acc(a.dtype)
    ctx.kind, ctx.block = "batch_matmul", "batch_matmul"
    if len(a.shape) >= 2 and shape_of(a)[:-2] == shape_of(b)[:-2] and len(b.shape) >= 2:
        return _finish(ctx, batch_matmul_te(a, b, out_dtype=acc).output, dtype)
    *ba, M, K = (1, *shape_of(a)) if len(a.shape) == 1 else shape_of(a)
    *bb, _, N = (*shape_of(b), 1) if len(b.shape) == 1 else shape_of(b)
    rank = max(len(ba), len(bb))
    batch = tuple(max(x, y) for x, y in zip((1,) * (rank - len(ba)) + tuple(ba), (1,) * (rank - len(bb)) + tuple(bb)))
    k = te.reduce_axis((0, K), name="k")

    def read(t: te.Tensor, lead: list[int], idx: tuple, row, col):
        if len(t.shape) == 1:
            return t(row if col is None else col)
        off = rank - len(lead)
        bidx = [0 if d == 1 else idx[off + n] for n, d in enumerate(lead)]
        return t(*bidx, row, col)

    def body(*idx):
        i, j = idx[-2], idx[-1]
        x = a(k) if len(a.shape) == 1 else read(a, ba, idx, i, k)
        y = b(k) if len(b.shape) == 1 else read(b, bb, idx, k, j)
        return te.sum(x.astype(acc) * y.astype(acc), axis=k)

    return _finish(ctx, te.compute((*batch, M, N), body, name="batch_matmul"), dtype)


# ------------------------------------------------------------------ convolution


@lowers("conv")
def conv(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, b: te.Tensor | None = None, *,
         strides, pads, dilations, group) -> te.Tensor:
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    return _conv(ctx, x, w, None, b, strides, pads, dil, group)


def _conv(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, w_np: np.ndarray | None, b: te.Tensor | None,
          strides, pads, dil, group) -> te.Tensor:
    """Conv of ``x`` with weight ``w`` (or ``w_np``: a compile-time replacement of operand 1)."""
    nsp = len(x.shape) - 2
    dtype = x.dtype
    if nsp == 1:
        n, c, width = shape_of(x)
        x = view(x, (n, c, 1, width), name="T_as_2d")
        if w_np is not None:
            w_np = w_np[:, :, None, :]
        else:
            w = view(w, (*shape_of(w)[:2], 1, shape_of(w)[2]), name="T_w_as_2d")
        strides, pads, dil = [1, *strides], [0, pads[0], 0, pads[1]], [1, *dil]
    if nsp == 2 and w_np is None and _channels_last_depthwise(ctx, x, w, group):
        y = _depthwise(ctx, x, w, b, strides, pads, dil)
    elif nsp == 2 and w_np is None and _pointwise_as_matmul(ctx, x, group, strides, pads):
        y = _pointwise(ctx, x, ctx.const(1), b)
    elif nsp == 2 and w_np is None and _ocvec(ctx, x, group):
        y = _conv_ocvec(ctx, x, b, strides, pads, dil)
    else:
        if w_np is not None:
            w = ctx.replace_const(1, w_np, name="w")
        if nsp > 2:
            y = _conv_nd(ctx, x, w, b, strides, pads, dil, group)
        else:
            res = conv2d_nchw_te(x, w, stride=strides, padding=pads, dilation=dil, groups=group, bias=b,
                                 target=ctx.target, out_dtype=_acc(dtype))
            ctx.kind, ctx.block = "conv2d", res.block
            y = res.output
    y = _cast(y, dtype)
    shape = out_shape(ctx)
    return y if shape_of(y) == shape else view(y, shape, name="T_conv_view")


# Output pixels up to which a depthwise conv runs channels-last (:func:`depthwise_conv2d_te`); 2 threads,
# 3x3 pad 1, kiln pool, NCHW -> channels-last: 336x1x1 13.8 -> 0.2 us, 96x4x4 8.5 -> 1.1, 48x8x8 9.2 -> 2.2,
# 144x16x16 stride 2 108 -> 32, but 96x14x14 23 -> 28, 96x32x32 stride 2 31 -> 67, 32x56x56 83 -> 99.
DEPTHWISE_CHANNELS_LAST_PIXELS = 64


def _channels_last_depthwise(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, group: int) -> bool:
    """A float depthwise conv (one input and one output channel per group) with channels enough to fill vectors."""
    n, c, *_ = shape_of(x)
    oc, icg = shape_of(w)[:2]
    if not (group == c == oc and icg == 1) or not is_float(str(x.dtype)):
        return False
    _, _, oh, ow = out_shape(ctx)
    return oh * ow <= DEPTHWISE_CHANNELS_LAST_PIXELS and depthwise_channels(c, vector_lanes(ctx.target, x.dtype)) > 0


# Output pixels up to which a 1x1 conv runs as ``x^T @ W^T`` (rows = pixels, vectorized over output
# channels with the packed matmul kernel); 2 threads, kiln pool: 112->1280 at 1x1 17 -> 6 us.
POINTWISE_MATMUL_PIXELS = 16


def _pointwise_as_matmul(ctx: LowerCtx, x: te.Tensor, group: int, strides, pads) -> bool:
    """A float 1x1 conv (stride 1, no padding, one group, constant weight) on a small map."""
    w = ctx.const(1)
    if w is None or group != 1 or w.shape[2:] != (1, 1) or any(s != 1 for s in strides) or any(pads):
        return False
    _, _, h, wd = shape_of(x)
    return is_float(str(x.dtype)) and h * wd <= POINTWISE_MATMUL_PIXELS


def _pointwise(ctx: LowerCtx, x: te.Tensor, w_np: np.ndarray, b: te.Tensor | None) -> te.Tensor:
    """1x1 conv as the packed matmul ``[N, H*W, C] @ [C, OC]`` (a transposing read of ``x``), written back NCHW."""
    n, c, h, wd = shape_of(x)
    oc = w_np.shape[0]
    acc = _acc(x.dtype)
    a = te.compute((n, h * wd, c), lambda i, p, k: x[i, k, p // wd, p % wd], name="T_pixels")
    y = _packed_matmul_te(ctx, a, np.ascontiguousarray(w_np[:, :, 0, 0].T))
    if b is None:
        return te.compute((n, oc, h, wd), lambda i, o, r, q: y[i, r * wd + q, o], name="T_conv_nchw")
    return te.compute((n, oc, h, wd), lambda i, o, r, q: y[i, r * wd + q, o] + b[o].astype(acc), name="T_conv_nchw")


def _ocvec(ctx: LowerCtx, x: te.Tensor, group: int) -> bool:
    """A float conv with one group, a constant weight and output channels filling whole vectors."""
    w = ctx.const(1)
    if w is None or group != 1 or not is_float(str(x.dtype)):
        return False
    return ocvec_block(w.shape[0], ctx.target, str(x.dtype)) > 0


def _conv_ocvec(ctx: LowerCtx, x: te.Tensor, b: te.Tensor | None, strides, pads, dil) -> te.Tensor:
    """conv2d vectorized over output channels, the weight packed ``[OC/vb, C, KH, KW, vb]`` at compile time."""
    w_np = ctx.const(1)
    vb = ocvec_block(w_np.shape[0], ctx.target, str(x.dtype))
    wp = ctx.replace_const(1, pack_conv_ocvec(w_np, vb), name="w_ocvec")
    res = conv2d_ocvec_te(x, wp, w_np.shape[0], stride=strides, padding=pads, dilation=dil, bias=b,
                          out_dtype=_acc(x.dtype))
    ctx.kind, ctx.block = "conv2d_ocvec", res.block
    return res.output


def _depthwise(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, b: te.Tensor | None, strides, pads, dil) -> te.Tensor:
    """Depthwise conv, channels-last inside the kernel; the weight ``[C, 1, KH, KW]`` read as ``[KH, KW, C]``."""
    w_np = ctx.const(1)
    if w_np is not None:
        w_hwc = ctx.replace_const(1, np.ascontiguousarray(w_np[:, 0].transpose(1, 2, 0)), name="w_hwc")
    else:
        c, _, kh, kw = shape_of(w)
        w_hwc = te.compute((kh, kw, c), lambda i, j, k: w[k, 0, i, j], name="w_hwc")
    res = depthwise_conv2d_te(x, w_hwc, stride=strides, padding=pads, dilation=dil, bias=b, out_dtype=_acc(x.dtype))
    ctx.kind, ctx.block = "depthwise_conv2d_cl", res.block
    return res.output


def _conv_nd(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, b: te.Tensor | None, strides, pads, dil,
             group) -> te.Tensor:
    """Direct N-d convolution (3-D and up), zero padding read through a guard."""
    nsp = len(x.shape) - 2
    sizes = shape_of(x)[2:]
    m, cg, *kernel = shape_of(w)
    acc = _acc(x.dtype)
    mg = m // group
    rc = te.reduce_axis((0, cg), name="rc")
    rk = [te.reduce_axis((0, k), name=f"rk{n}") for n, k in enumerate(kernel)]

    def body(nb, oc, *o):
        pos = [o[i] * strides[i] + rk[i] * dil[i] - pads[i] for i in range(nsp)]
        inside = tirx.all(*(tirx.all(p >= 0, p < s) for p, s in zip(pos, sizes)))
        cin = rc if group == 1 else (oc // mg) * cg + rc
        val = tirx.if_then_else(inside, x(nb, cin, *pos), tirx.const(0, x.dtype)).astype(acc)
        return te.sum(val * w(oc, rc, *rk).astype(acc), axis=[rc, *rk])

    shape = out_shape(ctx)
    y = te.compute(shape, body, name="conv_nd")
    if b is not None:
        y = te.compute(shape, lambda nb, oc, *o: y(nb, oc, *o) + b(oc).astype(acc), name="conv_nd_bias")
    ctx.kind = "reduction"
    return y


@lowers("conv_transpose")
def conv_transpose(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, b: te.Tensor | None = None, *,
                   strides, pads, dilations, group, output_padding) -> te.Tensor:
    """Stride-1 conv of the zero-upsampled, re-padded input with the flipped kernel."""
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    opad = list(output_padding or [0] * nsp)
    kernel = shape_of(w)[2:]
    lo = [dil[i] * (kernel[i] - 1) - pads[i] for i in range(nsp)]
    hi = [dil[i] * (kernel[i] - 1) - pads[nsp + i] + opad[i] for i in range(nsp)]
    xu = _upsample(x, strides, lo, hi)
    w_np = ctx.const(1)
    if w_np is not None:
        w_np = _flip_weight_np(w_np, group)
    else:
        w = _flip_weight(w, group)
    return _conv(ctx, xu, w, w_np, b, [1] * nsp, [0] * (2 * nsp), dil, group)


def _upsample(x: te.Tensor, strides, lo, hi) -> te.Tensor:
    """``x`` with ``stride - 1`` zeros between entries, ``lo``/``hi`` zeros (or a crop, if negative) around."""
    n, c, *sizes = shape_of(x)
    if all(s == 1 for s in strides) and not any(lo) and not any(hi):
        return x
    shape = [s * (d - 1) + 1 + a + e for d, s, a, e in zip(sizes, strides, lo, hi)]

    def f(nb, ch, *j):
        src = [j[i] - lo[i] for i in range(len(sizes))]
        conds = [tirx.all(p >= 0, p < s * (d - 1) + 1) for p, s, d in zip(src, strides, sizes)]
        conds += [p % s == 0 for p, s in zip(src, strides) if s > 1]
        idx = [p // s if s > 1 else p for p, s in zip(src, strides)]
        return tirx.if_then_else(tirx.all(*conds), x(nb, ch, *idx), tirx.const(0, x.dtype))

    return te.compute((n, c, *shape), f, name="T_upsample")


def _flip_weight_np(w: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight (C, M/g, *K) -> Conv weight (M, C/g, *K), kernel flipped."""
    c, mg, *kernel = w.shape
    cg = c // group
    wt = w.reshape(group, cg, mg, *kernel).swapaxes(1, 2).reshape(group * mg, cg, *kernel)
    return np.ascontiguousarray(np.flip(wt, axis=tuple(range(2, wt.ndim))))


def _flip_weight(w: te.Tensor, group: int) -> te.Tensor:
    c, mg, *kernel = shape_of(w)
    cg = c // group

    def f(oc, ic, *k):
        return w((oc // mg) * cg + ic, oc % mg, *(kk - 1 - t for kk, t in zip(kernel, k)))

    return te.compute((group * mg, cg, *kernel), f, name="T_flip_weight")


# ------------------------------------------------------------------ pooling


def _window(o, k, stride: int, dil: int, begin: int):
    return o * stride + k * dil - begin


@lowers("max_pool")
def max_pool(ctx: LowerCtx, x: te.Tensor, *, kernel_shape, strides, pads, dilations, ceil_mode) -> te.Tensor:
    """Padding never wins: out-of-input taps read the dtype's lowest value."""
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    sizes = shape_of(x)[2:]
    low = tirx.const(-math.inf, x.dtype) if is_float(x.dtype) else tirx.const(int(np.iinfo(str(x.dtype)).min), x.dtype)
    rk = [te.reduce_axis((0, k), name=f"rk{n}") for n, k in enumerate(kernel_shape)]

    def body(nb, c, *o):
        pos = [_window(o[i], rk[i], strides[i], dil[i], pads[i]) for i in range(nsp)]
        inside = tirx.all(*(tirx.all(p >= 0, p < s) for p, s in zip(pos, sizes)))
        return te.max(tirx.if_then_else(inside, x(nb, c, *pos), low), axis=rk)

    ctx.kind = "reduction"
    return te.compute(out_shape(ctx), body, name="max_pool")


@lowers("max_pool_with_indices")
def max_pool_with_indices(ctx: LowerCtx, x: te.Tensor, *, kernel_shape, strides, pads, dilations, ceil_mode,
                          storage_order) -> tuple[te.Tensor, te.Tensor]:
    """One (index, value) reduction over the window: the larger value wins, a tie the earlier tap.

    Taps outside the input carry the dtype's lowest value and an index past every real one, so they
    lose every tie; a NaN tap wins (as numpy's max, so y matches max_pool)."""
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    n, c, *sizes = shape_of(x)
    total = math.prod(sizes)
    low = tirx.const(-math.inf, x.dtype) if is_float(x.dtype) else tirx.const(int(np.iinfo(str(x.dtype)).min), x.dtype)
    outside = tirx.const(total, "int64")
    rk = [te.reduce_axis((0, k), name=f"rk{i}") for i, k in enumerate(kernel_shape)]

    def combine(lhs, rhs):
        (i0, v0), (i1, v1) = lhs, rhs
        if is_float(x.dtype):
            better = tirx.any(tirx.all(tirx.isnan(v1), tirx.Not(tirx.isnan(v0))), v1 > v0)
            tie = tirx.any(v1 == v0, tirx.all(tirx.isnan(v1), tirx.isnan(v0)))
        else:
            better, tie = v1 > v0, v1 == v0
        take = tirx.any(better, tirx.all(tie, i1 < i0))
        return tirx.Select(take, i1, i0), tirx.Select(take, v1, v0)

    def identity(t0, t1):
        return tirx.const(total + 1, t0), low

    reducer = te.comm_reducer(combine, identity, name="argmax_pool")

    def body(nb, ch, *o):
        pos = [_window(o[i], rk[i], strides[i], dil[i], pads[i]) for i in range(nsp)]
        inside = tirx.all(*(tirx.all(p >= 0, p < s) for p, s in zip(pos, sizes)))
        flat = 0
        for p, s in zip(pos, sizes):
            flat = flat * s + p
        idx = tirx.Select(inside, flat.astype("int64"), outside)
        return reducer((idx, tirx.if_then_else(inside, x(nb, ch, *pos), low)), axis=rk)

    shape = out_shape(ctx)
    best_idx, best = te.compute(shape, body, name="max_pool_argmax")

    def index(nb, ch, *o):
        r = best_idx(nb, ch, *o)
        spatial = _column_major(r, tuple(sizes)) if storage_order else r
        base = (nb.astype("int64") * c + ch.astype("int64")) * total
        return tirx.Select(r >= outside, tirx.const(-1, "int64"), base + spatial)

    ctx.kind = "reduction"
    y = te.compute(shape, lambda *i: best(*i), name="max_pool")
    return y, te.compute(shape, index, name="max_pool_indices")


def _column_major(r, dims: tuple[int, ...]):
    """The column-major flat index of the element whose row-major flat index is ``r``."""
    out, stride = 0, 1
    for coord, d in zip(_unravel(r, dims), dims):
        out = out + coord * stride
        stride *= d
    return out


@lowers("avg_pool")
def avg_pool(ctx: LowerCtx, x: te.Tensor, *, kernel_shape, strides, pads, ceil_mode, count_include_pad,
             dilations=()) -> te.Tensor:
    """The divisor counts the window's taps inside the input (or the explicitly padded input)."""
    nsp = len(x.shape) - 2
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    sizes = shape_of(x)[2:]
    acc = _acc(x.dtype)
    rk = [te.reduce_axis((0, k), name=f"rk{n}") for n, k in enumerate(kernel_shape)]

    def body(nb, c, *o):
        pos = [_window(o[i], rk[i], strides[i], dil[i], pads[i]) for i in range(nsp)]
        inside = tirx.all(*(tirx.all(p >= 0, p < s) for p, s in zip(pos, sizes)))
        return te.sum(tirx.if_then_else(inside, x(nb, c, *pos), tirx.const(0, x.dtype)).astype(acc), axis=rk)

    def count(o, i: int):
        lo, hi = (0, sizes[i] + pads[i] + pads[nsp + i]) if count_include_pad else (pads[i], pads[i] + sizes[i])
        start = o * strides[i]
        if dil[i] == 1:
            return tirx.max(tirx.min(start + kernel_shape[i], hi) - tirx.max(start, lo), 0)
        # taps start + j*d (0 <= j < k) inside [lo, hi): j from ceil((lo - start)/d) to ceil((hi - start)/d)
        d = dil[i]
        first = tirx.max(tirx.floordiv(lo - start + d - 1, d), 0)
        last = tirx.min(tirx.floordiv(hi - start + d - 1, d), kernel_shape[i])
        return tirx.max(last - first, 0)

    def mean(nb, c, *o):
        n = math.prod(count(o[i], i) for i in range(nsp))
        return (s(nb, c, *o) / n.astype(acc)).astype(x.dtype)

    shape = out_shape(ctx)
    s = te.compute(shape, body, name="avg_pool_sum")
    ctx.kind = "reduction"
    return te.compute(shape, mean, name="avg_pool")


def _global_pool(ctx: LowerCtx, x: te.Tensor, mean: bool) -> te.Tensor:
    """One flattened reduction axis over all spatial dims (vectorizable by rfactor)."""
    n, c, *sizes = shape_of(x)
    acc = _acc(x.dtype)
    r = te.reduce_axis((0, math.prod(sizes)), name="r")
    shape = out_shape(ctx)
    ctx.kind = "reduction"
    if not mean:
        return te.compute(shape, lambda nb, ch, *_: te.max(x(nb, ch, *_unravel(r, tuple(sizes))), axis=r),
                          name="global_max_pool")
    s = te.compute(shape, lambda nb, ch, *_: te.sum(x(nb, ch, *_unravel(r, tuple(sizes))).astype(acc), axis=r),
                   name="global_pool_sum")
    inv = tirx.const(1.0 / math.prod(sizes), acc)
    return te.compute(shape, lambda *i: (s(*i) * inv).astype(x.dtype), name="global_avg_pool")


@lowers("global_avg_pool")
def global_avg_pool(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _global_pool(ctx, x, mean=True)


@lowers("global_max_pool")
def global_max_pool(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return _global_pool(ctx, x, mean=False)


# ------------------------------------------------------------------ normalization


@lowers("batch_norm")
def batch_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, bias: te.Tensor, mean: te.Tensor, var: te.Tensor,
               *, epsilon) -> te.Tensor:
    acc = _acc(x.dtype)
    eps = tirx.const(epsilon, acc)
    params = [ctx.const(i) for i in range(1, 5)]
    if all(p is not None for p in params):
        # constant statistics: one multiply-add per element with the per-channel
        # factors computed once here in float64 (a sqrt and a divide per element otherwise)
        g, b, m, v = (np.asarray(p, np.float64) for p in params)
        inv = g / np.sqrt(v + epsilon)
        mul = ctx.replace_const(1, (inv).astype(str(scale.dtype)), name="bn_mul")
        add = ctx.replace_const(2, (b - m * inv).astype(str(bias.dtype)), name="bn_add")
        ctx.drop_const(3)
        ctx.drop_const(4)
        return te.compute(x.shape, lambda *i: (x(*i).astype(acc) * mul(i[1]).astype(acc)
                                               + add(i[1]).astype(acc)).astype(x.dtype), name="T_batch_norm")

    def f(*i):
        c = i[1]
        inv = scale(c).astype(acc) / tirx.sqrt(var(c).astype(acc) + eps)
        return ((x(*i).astype(acc) - mean(c).astype(acc)) * inv + bias(c).astype(acc)).astype(x.dtype)

    return te.compute(x.shape, f, name="T_batch_norm")


def _normalize(ctx: LowerCtx, x: te.Tensor, ax: int, epsilon: float, rms: bool, affine) -> te.Tensor:
    """(x - mean) / sqrt(var + eps) (or x / sqrt(mean(x^2) + eps)) over dims ``ax:``, then ``affine``.

    Each reduction runs over one flattened axis so the schedule can vectorize it.
    """
    dims = shape_of(x)
    rows, inner = dims[:ax] or (1,), dims[ax:]
    n = math.prod(inner)
    acc = _acc(x.dtype)
    inv_n = tirx.const(1.0 / n, acc)

    def at(i, r):
        return x(*i[:ax], *_unravel(r, inner)).astype(acc)

    mean = None
    if not rms:
        r1 = te.reduce_axis((0, n), name="r1")
        s1 = te.compute(rows, lambda *i: te.sum(at(i, r1), axis=r1), name="norm_sum")
        mean = te.compute(rows, lambda *i: s1(*i) * inv_n, name="norm_mean")

    def centered(i, v):
        return v if mean is None else v - mean(*i)

    r2 = te.reduce_axis((0, n), name="r2")
    s2 = te.compute(rows, lambda *i: te.sum(centered(i, at(i, r2)) * centered(i, at(i, r2)), axis=r2),
                    name="norm_sqsum")
    eps = tirx.const(epsilon, acc)

    def out(*i):
        row = i[:ax] or (0,)
        y = centered(row, x(*i).astype(acc)) / tirx.sqrt(s2(*row) * inv_n + eps)
        return affine(i, y).astype(x.dtype)

    ctx.kind = "reduction"
    return te.compute(dims, out, name="T_norm")


@lowers("layer_norm")
def layer_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, bias: te.Tensor | None = None, *,
               axis, epsilon) -> te.Tensor:
    ax = axis % len(x.shape)
    acc = _acc(x.dtype)

    def affine(i, y):
        y = y * broadcast_read(scale, i[ax:]).astype(acc)
        return y if bias is None else y + broadcast_read(bias, i[ax:]).astype(acc)

    return _normalize(ctx, x, ax, epsilon, False, affine)


@lowers("rms_norm")
def rms_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, *, axis, epsilon) -> te.Tensor:
    ax = axis % len(x.shape)
    acc = _acc(x.dtype)
    return _normalize(ctx, x, ax, epsilon, True, lambda i, y: y * broadcast_read(scale, i[ax:]).astype(acc))


@lowers("crms_norm")
def crms_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, *, axis, epsilon) -> te.Tensor:
    """x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * scale over the last axis, d = last dim + 1.

    Two independent row reductions (sum and sum of squares), so both vectorize alike.
    """
    dims = shape_of(x)
    ax = len(dims) - 1
    rows, n = dims[:ax] or (1,), dims[ax]
    acc = _acc(x.dtype)

    def at(i, r):
        return x(*i[:ax], r).astype(acc)

    r1, r2 = te.reduce_axis((0, n), name="r1"), te.reduce_axis((0, n), name="r2")
    s1 = te.compute(rows, lambda *i: te.sum(at(i, r1), axis=r1), name="crms_sum")
    s2 = te.compute(rows, lambda *i: te.sum(at(i, r2) * at(i, r2), axis=r2), name="crms_sqsum")
    inv_d, eps = tirx.const(1.0 / (n + 1), acc), tirx.const(epsilon, acc)

    def out(*i):
        row = i[:ax] or (0,)
        ms = (s2(*row) + s1(*row) * s1(*row)) * inv_d
        y = x(*i).astype(acc) / tirx.sqrt(ms + eps)
        return (y * broadcast_read(scale, i[ax:]).astype(acc)).astype(x.dtype)

    ctx.kind = "reduction"
    return te.compute(dims, out, name="T_crms_norm")


@lowers("instance_norm")
def instance_norm(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, bias: te.Tensor, *, epsilon) -> te.Tensor:
    acc = _acc(x.dtype)
    return _normalize(ctx, x, 2, epsilon, False,
                      lambda i, y: y * scale(i[1]).astype(acc) + bias(i[1]).astype(acc))


@lowers("lrn")
def lrn(ctx: LowerCtx, x: te.Tensor, *, size, alpha, beta, bias) -> te.Tensor:
    channels = int(x.shape[1])
    lo = (size - 1) // 2
    acc = _acc(x.dtype)
    r = te.reduce_axis((0, size), name="r")

    def sqsum(nb, c, *s):
        ch = c - lo + r
        v = tirx.if_then_else(tirx.all(ch >= 0, ch < channels), x(nb, ch, *s), tirx.const(0, x.dtype)).astype(acc)
        return te.sum(v * v, axis=r)

    ss = te.compute(x.shape, sqsum, name="lrn_sqsum")

    def f(*i):
        base = tirx.const(bias, acc) + tirx.const(alpha / size, acc) * ss(*i)
        return (x(*i).astype(acc) / tirx.power(base, tirx.const(beta, acc))).astype(x.dtype)

    ctx.kind = "reduction"
    return te.compute(x.shape, f, name="T_lrn")


# ------------------------------------------------------------------ softmax


def _exp(t: te.Tensor) -> te.Tensor:
    return topi.fast_exp(t) if str(t.dtype) == "float32" else te.compute(t.shape, lambda *i: tirx.exp(t(*i)), name="exp")


def _softmax_parts(ctx: LowerCtx, x: te.Tensor, axis: int):
    """(x - max) and the row sums of its exp, along ``axis``; rows keep a unit dim at ``axis``."""
    dims = shape_of(x)
    ax = axis % len(dims)
    acc = _acc(x.dtype)
    rows = dims[:ax] + (1,) + dims[ax + 1:]
    k1, k2 = te.reduce_axis((0, dims[ax]), name="k1"), te.reduce_axis((0, dims[ax]), name="k2")

    def along(i, k):
        return (*i[:ax], k, *i[ax + 1:])

    mx = te.compute(rows, lambda *i: te.max(x(*along(i, k1)).astype(acc), axis=k1), name="softmax_max")
    d = te.compute(dims, lambda *i: x(*i).astype(acc) - mx(*along(i, 0)), name="softmax_shift")
    e = _exp(d)
    s = te.compute(rows, lambda *i: te.sum(e(*along(i, k2)), axis=k2), name="softmax_sum")
    ctx.kind = "reduction"
    return ax, d, e, s


@lowers("softmax")
def softmax(ctx: LowerCtx, x: te.Tensor, *, axis) -> te.Tensor:
    ax, _, e, s = _softmax_parts(ctx, x, axis)
    return te.compute(x.shape, lambda *i: (e(*i) / s(*i[:ax], 0, *i[ax + 1:])).astype(x.dtype), name="T_softmax")


@lowers("log_softmax")
def log_softmax(ctx: LowerCtx, x: te.Tensor, *, axis) -> te.Tensor:
    ax, d, _, s = _softmax_parts(ctx, x, axis)
    return te.compute(x.shape, lambda *i: (d(*i) - tirx.log(s(*i[:ax], 0, *i[ax + 1:]))).astype(x.dtype),
                      name="T_log_softmax")
