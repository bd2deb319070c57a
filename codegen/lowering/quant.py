"""TVM lowerings of the ops in ir/ops/quant.py (ONNX QuantizeLinear / DequantizeLinear).

The scale and zero point are read per tensor (rank 0 or one element), per axis
(1-D along ``axis``) or per block (``block_size`` > 0: index ``i // block_size``
along ``axis``), matching the reference's ``_expand``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from tvm import te, tirx
from tvm.target import Target

from kiln.ir.ops.quant import RANGES, _centered
from kiln.ir.types import from_numpy_dtype

from ..intrin import has_avx2
from ..schedules import QCONV_MR_WIDE, QMATMUL_MR, QMATMUL_NV
from ..target import vector_width_bits
from . import LowerCtx, lowers, shape_of, tvm_dtype
from .dtypes import refuse_subbyte
from .elementwise import F8_FORMATS, Expr, bits_of, convert, decode_f8
from .nn import _unravel


def _param(p: te.Tensor, idx: tuple, axis: int, block_size: int) -> Expr:
    """Scale / zero point ``p`` at the input's index ``idx``."""
    ax = axis % len(idx) if idx else 0
    if block_size:
        return p[tuple(i // block_size if d == ax else i for d, i in enumerate(idx))]
    if len(p.shape) == 0:
        return p[()]
    if int(p.shape[0]) == 1:
        return p[0]
    return p[idx[ax]]


@lowers("quantize")
def quantize(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None = None, *,
             axis: int, block_size: int, dtype: str, saturate: int | None = None) -> te.Tensor:
    """saturate(round_half_even(x / scale) + zero_point), divided in float32; NaN gives 0.

    float8 outputs: x / scale + zero_point in float32 (float64 for f64 x), rounded by ONNX Cast's
    rules (``saturate``) through kiln's float8 codec (elementwise.py)."""
    out = tvm_dtype(dtype)
    refuse_subbyte(out, "quantize")
    if out in F8_FORMATS:
        return _quantize_f8(x, scale, zero_point, axis, block_size, out, saturate)
    lo, hi = (tirx.const(b, "float32") for b in RANGES[dtype])

    def body(*i):
        q = tirx.nearbyint(x(*i).astype("float32") / _param(scale, i, axis, block_size).astype("float32"))
        if zero_point is not None:
            q = q + _param(zero_point, i, axis, block_size).astype("float32")
        q = tirx.Select(q < lo, lo, tirx.Select(q > hi, hi, q))
        return tirx.Select(tirx.isnan(q), tirx.const(0, "int32"), q.astype("int32")).astype(out)

    return te.compute(x.shape, body, name="T_quantize")


def _quantize_f8(x: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None, axis: int, block_size: int,
                 out: str, saturate: int | None) -> te.Tensor:
    ct = "float64" if str(x.dtype) == "float64" else "float32"

    def wide(v: Expr) -> Expr:
        return decode_f8(v).astype(ct) if str(v.dtype) in F8_FORMATS else v.astype(ct)

    def body(*i):
        q = x(*i).astype(ct) / wide(_param(scale, i, axis, block_size))
        if zero_point is not None:
            q = q + wide(_param(zero_point, i, axis, block_size))
        return convert(q.astype("float32"), out, saturate)

    return te.compute(x.shape, body, name="T_quantize")


@lowers("dequantize")
def dequantize(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None = None, *,
               axis: int, block_size: int) -> te.Tensor:
    """(x - zero_point) * scale: the difference in int32 (int64 for int32 inputs), the product in float32;
    float8 codes are decoded exactly and computed in float64, as the reference does."""
    src = str(x.dtype)
    refuse_subbyte(src, "dequantize")
    out = str(scale.dtype)
    if src in F8_FORMATS:
        def body_f8(*i):
            d = decode_f8(x(*i)).astype("float64")
            if zero_point is not None:
                d = d - decode_f8(_param(zero_point, i, axis, block_size)).astype("float64")
            return (d * _param(scale, i, axis, block_size).astype("float64")).astype(out)

        return te.compute(x.shape, body_f8, name="T_dequantize")
    acc = "int64" if bits_of(x) >= 32 else "int32"

    def body(*i):
        d = x(*i).astype(acc)
        if zero_point is not None:
            d = d - _param(zero_point, i, axis, block_size).astype(acc)
        s = _param(scale, i, axis, block_size).astype("float32")
        return (d.astype("float32") * s).astype(out)

    return te.compute(x.shape, body, name="T_dequantize")


# ------------------------------------------------------------------ integer kernels (fuse-qlinear)
#
# Codes are centered (code - zero point) and widened to int16 before the
# reduction, so the products are int16 x int16 -> int32 (exact: |code - zp| <=
# 255) and a zero-padded conv input pads with the dequantized 0.  Constant
# weights are centered and packed at compile time: on x86 AVX2 a qmatmul runs
# on int16 pairs ([N/8, K/2, 8, 2], one vpmaddwd = 16 multiply-adds, see
# codegen/intrin.py), elsewhere on [N/bn, K, bn] int16 in int32 lanes; dq_matmul
# packs two 4-bit codes per byte.  The f32 epilogue multiplies by a_scale *
# w_scale, folded into one [N] constant when both are constants.


def _scalar(ctx: LowerCtx, i: int, t: te.Tensor | None, dtype: str) -> Expr:
    """A per-tensor operand as an expression: an immediate when constant, else a load."""
    if t is None:
        return tirx.const(0, dtype)
    c = ctx.const(i)
    if c is not None:
        ctx.drop_const(i)
        v = c.reshape(-1)[0]
        return tirx.const(float(v) if dtype.startswith("float") else int(v), dtype)
    return (t[()] if len(t.shape) == 0 else t[0]).astype(dtype)


def _centered_codes(x: te.Tensor, zp: Expr, axis_zp: te.Tensor | None = None, axis: int = -1,
                    name: str = "T_centered") -> te.Tensor:
    """int16(x - zp), zp an expression (per tensor) or ``axis_zp`` indexed along ``axis``."""
    rank = len(x.shape)

    def body(*i):
        z = zp if axis_zp is None else _param(axis_zp, i, axis % rank, 0).astype("int16")
        return x(*i).astype("int16") - z

    return te.compute(x.shape, body, name=name)


def _centered_np(q: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """int16(q - zp) at compile time, zp per tensor or along ``axis`` (8-bit codes: the difference fits)."""
    return _centered(q, zp, axis).astype(np.int16)


def _out_scale(ctx: LowerCtx, sa: te.Tensor, sb: te.Tensor, ib: int, n: int) -> Callable[[Expr], Expr]:
    """c -> a_scale * b_scale[c] in f32 (one folded [n] constant when both scales are constants)."""
    ca, cb = ctx.const(1), ctx.const(ib)
    if ca is not None and cb is not None:
        folded = (np.float32(ca.reshape(-1)[0]) * np.broadcast_to(cb.astype(np.float32).reshape(-1), (n,))).astype(np.float32)
        ctx.drop_const(1)
        s = ctx.replace_const(ib, np.ascontiguousarray(folded), name="q_scale")
        return lambda c: s[c]
    a = sa[()] if len(sa.shape) == 0 else sa[0]
    if len(sb.shape) == 0 or int(sb.shape[0]) == 1:
        b = sb[()] if len(sb.shape) == 0 else sb[0]
        return lambda c: a * b
    return lambda c: a * sb[c]


def _requant(acc: te.Tensor, bias: te.Tensor | None, scale: Callable[[Expr], Expr], axis: int,
             name: str) -> te.Tensor:
    """f32(acc + bias[c]) * scale(c), c the index along ``axis``."""
    def body(*i):
        v = acc(*i)
        if bias is not None:
            v = v + bias[i[axis]]
        return v.astype("float32") * scale(i[axis])

    return te.compute(acc.shape, body, name=name)


@lowers("qmatmul")
def qmatmul(ctx: LowerCtx, a: te.Tensor, a_scale: te.Tensor, a_zp: te.Tensor, b: te.Tensor, b_scale: te.Tensor,
            b_zp: te.Tensor | None = None, bias: te.Tensor | None = None) -> te.Tensor:
    """int16-widened products accumulated in int32; a constant 2-D b is centered and packed at compile time."""
    from ..schedules import MATMUL_NR_VECTORS, batch_matmul_te, pack_weight, packed_matmul_te
    from ..target import vector_lanes

    n = int(b.shape[-1])
    weight = ctx.const(3)
    const_weight = weight is not None and weight.ndim == 2 and (b_zp is None or ctx.const(5) is not None)
    if const_weight and has_avx2(ctx.target):
        return _qmatmul_pairs(ctx, a, a_zp, weight, b_zp, bias, _out_scale(ctx, a_scale, b_scale, 4, n))
    a16 = _centered_codes(a, _scalar(ctx, 2, a_zp, "int16"), name="T_qa")
    if const_weight:
        bn = MATMUL_NR_VECTORS * vector_lanes(ctx.target, "int32")
        zb = ctx.const(5)
        if b_zp is not None:
            ctx.drop_const(5)
        w16 = _centered_np(weight, zb, 1)
        mm = packed_matmul_te(a16, w16.shape, bn=bn, prepacked=ctx.replace_const(3, pack_weight(w16, bn), "w_q"),
                              out_dtype="int32", name="qmatmul")
        ctx.kind, ctx.block = "matmul", mm.block
        acc = mm.output
    else:
        if len(b_scale.shape) == 1 and int(b_scale.shape[0]) > 1:
            b16 = _centered_codes(b, tirx.const(0, "int16"), b_zp, -1, name="T_qb")
        else:
            b16 = _centered_codes(b, _scalar(ctx, 5, b_zp, "int16"), name="T_qb")
        if shape_of(a16)[:-2] != shape_of(b16)[:-2]:
            raise NotImplementedError(f"qmatmul with broadcast batch dims {list(a.shape)} x {list(b.shape)}")
        mm = batch_matmul_te(a16, b16, out_dtype="int32", name="qmatmul")
        ctx.kind, ctx.block = "batch_matmul", mm.block
        acc = mm.output
    return _requant(acc, bias, _out_scale(ctx, a_scale, b_scale, 4, n), -1, "T_qmatmul")


def pack_int16_pairs(w16: np.ndarray, lanes: int = 8, tile: int = QMATMUL_NV) -> np.ndarray:
    """[K, N] int16 -> [ceil(N/(lanes*tile))*tile, ceil(K/2), lanes, 2]: 8 columns' (k, k+1) pairs contiguous."""
    k, n = w16.shape
    kp, jo = -(-k // 2), -(-n // (lanes * tile)) * tile
    padded = np.zeros((2 * kp, jo * lanes), np.int16)
    padded[:k, :n] = w16
    return np.ascontiguousarray(padded.reshape(kp, 2, jo, lanes).transpose(2, 0, 3, 1))


def _qmatmul_pairs(ctx: LowerCtx, a: te.Tensor, a_zp: te.Tensor, weight: np.ndarray, b_zp: te.Tensor | None,
                   bias: te.Tensor | None, scale: Callable[[Expr], Expr]) -> te.Tensor:
    """The vpmaddwd kernel: rows of centered int16 activation pairs x the packed int16 weight, int32 sums.

    Batch dims are flattened into rows (padded to the register tile); the [rows, N] result is viewed back.
    """
    from .tensor import out_shape, view

    *lead, m, k = shape_of(a)
    n = weight.shape[1]
    rows = math.prod(lead) * m
    rows_p = rows if rows <= QMATMUL_MR else -(-rows // QMATMUL_MR) * QMATMUL_MR
    kp = -(-k // 2)
    zb = ctx.const(5)
    if b_zp is not None:
        ctx.drop_const(5)
    packed = pack_int16_pairs(_centered_np(weight, zb, 1))
    w = ctx.replace_const(3, packed, name="w_pairs")
    za = _scalar(ctx, 2, a_zp, "int16")

    def pairs(r, p, h):
        kk = p * 2 + h
        idx = [r % m] if not lead else [*_unravel(r // m, tuple(lead)), r % m]
        inside = tirx.all(r < rows, kk < k) if (rows_p != rows or 2 * kp != k) else None
        v = a(*idx, tirx.min(kk, k - 1)).astype("int16") - za
        return v if inside is None else tirx.if_then_else(inside, v, tirx.const(0, "int16"))

    a2 = te.compute((rows_p, kp, 2), pairs, name="qmatmul_pairs")
    rp = te.reduce_axis((0, kp), name="kp")
    rh = te.reduce_axis((0, 2), name="kk")
    c = te.compute((rows_p, packed.shape[0], 8),
                   lambda r, jo, ji: te.sum(a2[r, rp, rh].astype("int32") * w[jo, rp, ji, rh].astype("int32"),
                                            axis=[rp, rh]), name="qmatmul")

    def body(r, j):
        v = c[r, j // 8, j % 8]
        if bias is not None:
            v = v + bias[j]
        return v.astype("float32") * scale(j)

    ctx.kind, ctx.block = "matmul", "qmatmul"
    ctx.schedule_kwargs = {"int16_pairs": True}
    y = te.compute((rows, n), body, name="T_qmatmul")
    shape = out_shape(ctx)
    return y if shape_of(y) == shape else view(y, shape, name="T_qmatmul_view")


@lowers("qconv")
def qconv(ctx: LowerCtx, x: te.Tensor, x_scale: te.Tensor, x_zp: te.Tensor, w: te.Tensor, w_scale: te.Tensor,
          w_zp: te.Tensor | None = None, bias: te.Tensor | None = None, *,
          strides, pads, dilations, group) -> te.Tensor:
    """Direct conv of int16-centered codes, int32 accumulation; a constant weight centered at compile time."""
    from ..schedules import conv2d_nchw_te
    from .nn import _spatial
    from .tensor import out_shape, view

    nsp = len(x.shape) - 2
    if nsp > 2:
        raise NotImplementedError(f"qconv: {nsp}-D convolution has no integer kernel")
    strides, pads, dil = _spatial(nsp, strides, pads, dilations)
    m = int(w.shape[0])
    const_weight = ctx.const(3) is not None and (w_zp is None or ctx.const(5) is not None)
    if group == 1 and const_weight and int(x.shape[1]) <= QCONV_FLOAT_MAX_CHANNELS:
        w16 = _centered_np(ctx.const(3), ctx.const(5), 0)
        if _exact_in_float(w16, str(x.dtype)):
            return _qconv_float_exact(ctx, x, x_zp, w_zp, w16, bias, _out_scale(ctx, x_scale, w_scale, 4, m),
                                      strides, pads, dil)
    if group == 1 and const_weight and has_avx2(ctx.target):
        return _qconv_pairs(ctx, x, x_zp, w_zp, bias, _out_scale(ctx, x_scale, w_scale, 4, m),
                            strides, pads, dil)
    x16 = _centered_codes(x, _scalar(ctx, 2, x_zp, "int16"), name="T_qx")
    w_np = ctx.const(3)
    if w_np is not None and (w_zp is None or ctx.const(5) is not None):
        zw = ctx.const(5)
        if w_zp is not None:
            ctx.drop_const(5)
        w16_np = _centered_np(w_np, zw, 0)
        if nsp == 1:
            w16_np = w16_np[:, :, None, :]
        w16 = ctx.replace_const(3, np.ascontiguousarray(w16_np), name="w_q")
    else:
        per_channel = w_zp is not None and len(w_zp.shape) == 1 and int(w_zp.shape[0]) > 1
        w16 = (_centered_codes(w, tirx.const(0, "int16"), w_zp, 0, name="T_qw") if per_channel
               else _centered_codes(w, _scalar(ctx, 5, w_zp, "int16"), name="T_qw"))
        if nsp == 1:
            w16 = view(w16, (*shape_of(w16)[:2], 1, shape_of(w16)[2]), name="T_qw_as_2d")
    if nsp == 1:
        nb, c, width = shape_of(x16)
        x16 = view(x16, (nb, c, 1, width), name="T_qx_as_2d")
        strides, pads, dil = [1, *strides], [0, pads[0], 0, pads[1]], [1, *dil]
    res = conv2d_nchw_te(x16, w16, stride=strides, padding=(pads[0], pads[1], pads[2], pads[3]),
                         dilation=dil, groups=group, target=ctx.target, out_dtype="int32", name="qconv")
    ctx.kind, ctx.block = "conv2d", res.block
    y = _requant(res.output, bias, _out_scale(ctx, x_scale, w_scale, 4, m), 1, "T_qconv")
    shape = out_shape(ctx)
    return y if shape_of(y) == shape else view(y, shape, name="T_qconv_view")


# float32 adds integers exactly while every partial sum stays below 2^24.
F32_EXACT = 1 << 24
# Input channels up to which an integer conv runs as float32 arithmetic on the centered codes (exact, see
# _exact_in_float): the int16-pair kernel's reduction, ceil(C/2) x KH x KW steps, is then too short for its
# tile (cnn-qdq's 3-channel stem, 2 threads: 21 -> 13 us; its 16-channel conv stays faster on pairs, 19 vs 31).
QCONV_FLOAT_MAX_CHANNELS = 4


def _exact_in_float(w16: np.ndarray, x_dtype: str) -> bool:
    """Does every output's sum of centered products, at the input codes' widest, stay below 2^24?"""
    lo, hi = RANGES[from_numpy_dtype(np.dtype(x_dtype))]
    per_output = np.abs(w16.astype(np.int64)).reshape(w16.shape[0], -1).sum(axis=1)
    return int(per_output.max(initial=0)) * (hi - lo) < F32_EXACT


def _qconv_float_exact(ctx: LowerCtx, x: te.Tensor, x_zp: te.Tensor, w_zp: te.Tensor | None, w16: np.ndarray,
                       bias: te.Tensor | None, scale: Callable[[Expr], Expr], strides, pads, dil) -> te.Tensor:
    """An integer conv as float32 arithmetic on the centered codes: each product and partial sum is an
    integer below 2^24 (checked from the weights), so the f32 sums equal the int32 ones exactly; the
    float conv kernel then runs it.  The sum goes back to int32 before the bias, as in the integer kernel."""
    from ..schedules import conv2d_nchw_te
    from .tensor import out_shape, view

    nsp = len(x.shape) - 2
    if w_zp is not None:
        ctx.drop_const(5)
    if nsp == 1:
        w16 = w16[:, :, None, :]
    wf = ctx.replace_const(3, np.ascontiguousarray(w16.astype(np.float32)), name="w_f")
    zx = _scalar(ctx, 2, x_zp, "int16")
    xf = te.compute(x.shape, lambda *i: (x(*i).astype("int16") - zx).astype("float32"), name="T_qx_f")
    if nsp == 1:
        nb, c, width = shape_of(xf)
        xf = view(xf, (nb, c, 1, width), name="T_qx_as_2d")
        strides, pads, dil = [1, *strides], [0, pads[0], 0, pads[1]], [1, *dil]
    res = conv2d_nchw_te(xf, wf, stride=strides, padding=tuple(pads), dilation=dil, target=ctx.target,
                         out_dtype="float32", name="qconv")
    ctx.kind, ctx.block = "conv2d", res.block
    acc = te.compute(shape_of(res.output), lambda *i: res.output(*i).astype("int32"), name="T_qconv_i32")
    y = _requant(acc, bias, scale, 1, "T_qconv")
    shape = out_shape(ctx)
    return y if shape_of(y) == shape else view(y, shape, name="T_qconv_view")


def pack_conv_int16_pairs(w16: np.ndarray, lanes: int = 8, tile: int = QMATMUL_NV) -> np.ndarray:
    """[O, C, KH, KW] int16 -> [ceil(O/(lanes*tile))*tile, ceil(C/2), KH, KW, lanes, 2]: channel pairs contiguous."""
    o, c, kh, kw = w16.shape
    cp, jo = -(-c // 2), -(-o // (lanes * tile)) * tile
    padded = np.zeros((jo * lanes, 2 * cp, kh, kw), np.int16)
    padded[:o, :c] = w16
    return np.ascontiguousarray(padded.reshape(jo, lanes, cp, 2, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def qconv_ow_tile(ow: int, target: Target | None = None) -> int:
    """Output columns per register tile of the int16-pair conv: the tile in ``most``..3 padding ``ow`` least
    (``most``: 6, or 8 with 32 vector registers)."""
    most = QCONV_MR_WIDE if target is not None and vector_width_bits(target) >= 512 else QMATMUL_MR
    if ow <= most:
        return ow
    return min(range(most, 2, -1), key=lambda t: (-(-ow // t) * t, -t))


def _qconv_pairs(ctx: LowerCtx, x: te.Tensor, x_zp: te.Tensor, w_zp: te.Tensor | None, bias: te.Tensor | None,
                 scale: Callable[[Expr], Expr], strides, pads, dil) -> te.Tensor:
    """groups=1 conv on the vpmaddwd kernel: input channel pairs x the packed int16 weight, int32 sums.

    The input codes are centered, zero-padded (0 = the zero point) and laid out ``[N, C/2, Hp, Wp*2]``
    (channels 2c, 2c+1 of a pixel adjacent; an odd C padded with a zero channel); the weight is packed
    ``[O/8, C/2, KH, KW, 8, 2]``.  Block ``qconv`` computes ``[N, OH, OWp, O/8, 8]`` (OWp: OW padded to the
    register tile), the epilogue writes NCHW.
    """
    from .tensor import out_shape, view

    w_np = ctx.const(3)
    nsp = len(x.shape) - 2
    zw = ctx.const(5)
    if w_zp is not None:
        ctx.drop_const(5)
    w16 = _centered_np(w_np, zw, 0)
    if nsp == 1:
        w16 = w16[:, :, None, :]
        strides, pads, dil = [1, *strides], [0, pads[0], 0, pads[1]], [1, *dil]
    o, c, kh, kw = w16.shape
    packed = pack_conv_int16_pairs(w16)
    wp = ctx.replace_const(3, packed, name="w_pairs")
    zx = _scalar(ctx, 2, x_zp, "int16")
    nb, h, wd = int(x.shape[0]), (1 if nsp == 1 else int(x.shape[2])), int(x.shape[-1])
    sh, sw = strides
    dh, dw = dil
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    mr = qconv_ow_tile(ow, ctx.target)
    owp = -(-ow // mr) * mr
    hp = (oh - 1) * sh + dh * (kh - 1) + 1
    wpad = (owp - 1) * sw + dw * (kw - 1) + 1
    cp = packed.shape[1]

    def xin(n, ch, y, xx):
        return x[n, ch, xx] if nsp == 1 else x[n, ch, y, xx]

    def centered(n, q, y, v):
        ch, xx, yy = q * 2 + v % 2, v // 2 - pl, y - pt
        inside = tirx.all(ch < c, yy >= 0, yy < h, xx >= 0, xx < wd)
        val = xin(n, tirx.min(ch, c - 1), tirx.max(tirx.min(yy, h - 1), 0),
                  tirx.max(tirx.min(xx, wd - 1), 0)).astype("int16") - zx
        return tirx.if_then_else(inside, val, tirx.const(0, "int16"))

    xp = te.compute((nb, cp, hp, 2 * wpad), centered, name="qconv_pairs")
    rc = te.reduce_axis((0, cp), name="cp")
    rh = te.reduce_axis((0, kh), name="kh")
    rw = te.reduce_axis((0, kw), name="kw")
    rk = te.reduce_axis((0, 2), name="kk")
    acc = te.compute(
        (nb, oh, owp, packed.shape[0], 8),
        lambda n, y, xx, jo, ji: te.sum(
            xp[n, rc, y * sh + rh * dh, (xx * sw + rw * dw) * 2 + rk].astype("int32")
            * wp[jo, rc, rh, rw, ji, rk].astype("int32"), axis=[rc, rh, rw, rk]),
        name="qconv")

    def body(n, ch, y, xx):
        v = acc[n, y, xx, ch // 8, ch % 8]
        if bias is not None:
            v = v + bias[ch]
        return v.astype("float32") * scale(ch)

    ctx.kind, ctx.block = "conv2d", "qconv"
    ctx.schedule_kwargs = {"int16_pairs": True, "mr": mr}
    yv = te.compute((nb, o, oh, ow), body, name="T_qconv")
    shape = out_shape(ctx)
    return yv if shape_of(yv) == shape else view(yv, shape, name="T_qconv_view")


def pack_int4(codes: np.ndarray, bn: int) -> np.ndarray:
    """[K, N] 4-bit codes -> uint8 [ceil(N/bn), ceil(K/2), bn]: row 2r in the low nibble, 2r+1 in the high one."""
    k, n = codes.shape
    nib = np.zeros((k + k % 2, -(-n // bn) * bn), np.uint8)
    nib[:k, :n] = codes.astype(np.int16) & 0xF
    packed = nib[0::2] | (nib[1::2] << 4)
    return np.ascontiguousarray(packed.reshape(packed.shape[0], -1, bn).transpose(1, 0, 2))


def _full(p: np.ndarray, k: int, n: int, axis: int, block_size: int) -> np.ndarray:
    """A dequantize scale / zero point expanded to the weight's [k, n]."""
    from kiln.ir.ops.quant import _expand

    return np.broadcast_to(_expand(p, np.empty((k, n), np.int8), axis, block_size), (k, n))


def _rows_per_group(scale: np.ndarray, k: int, axis: int, block_size: int) -> int:
    """How many consecutive weight rows share one scale row."""
    along_k = axis % 2 == 0
    if block_size:
        return block_size if along_k else 1
    return 1 if along_k and scale.size > 1 else k


def _table(full: np.ndarray, rows: int, n_pad: int) -> np.ndarray:
    """Rows 0, rows, 2*rows, ... of ``full`` as f32, zero-padded to ``n_pad`` columns."""
    t = np.zeros((-(-full.shape[0] // rows), n_pad), np.float32)
    t[:, :full.shape[1]] = full[::rows]
    return t


@lowers("dq_matmul")
def dq_matmul(ctx: LowerCtx, a: te.Tensor, w: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None = None, *,
              axis: int, block_size: int) -> te.Tensor:
    """a @ dequantize(w) with the weight dequantized inside the matmul loop from compile-time packed codes."""
    from ..schedules import MATMUL_NR_VECTORS, pack_weight
    from ..target import vector_lanes
    from .tensor import out_shape, view

    codes, s_np = ctx.const(1), ctx.const(2)
    z_np = ctx.const(3) if zero_point is not None else None
    if codes is None or s_np is None or (zero_point is not None and z_np is None):
        raise NotImplementedError("dq_matmul: the weight codes, scale and zero point must be constants")
    k, n = codes.shape
    bn = MATMUL_NR_VECTORS * vector_lanes(ctx.target, "float32")
    no = -(-n // bn)
    four_bit = str(w.dtype) in ("int4", "uint4")
    rows = _rows_per_group(s_np, k, axis, block_size)
    S = _table(_full(s_np, k, n, axis, block_size), rows, no * bn)
    Z = None if z_np is None else _full(z_np, k, n, axis, block_size)
    if not four_bit:  # 8-bit codes: centered at compile time
        centered = codes.astype(np.int16) - (0 if Z is None else Z.astype(np.int16))
        P = ctx.replace_const(1, pack_weight(centered, bn), name="w_q")
        Z = None
    else:
        P = ctx.replace_const(1, pack_int4(codes, bn), name="w_q4")
        Z = None if Z is None else _table(Z.astype(np.float32), rows, no * bn)
    Sp = ctx.replace_const(2, S, name="w_scale")
    Zp = ctx.replace_const(3, Z, name="w_zp") if Z is not None else None
    if zero_point is not None and Zp is None:
        ctx.drop_const(3)
    signed = str(w.dtype) == "int4"
    A = view(a, (1, int(a.shape[0])), name="T_as_row") if len(a.shape) == 1 else a
    *lead, m, _ = shape_of(A)
    kr = te.reduce_axis((0, k), name="k")

    def weight(kk, j):
        if four_bit:
            nib = (P[j // bn, kk // 2, j % bn].astype("int32") >> ((kk % 2) * 4)) & 15
            if signed:
                nib = (nib ^ 8) - 8
            q = nib.astype("float32")
        else:
            q = P[j // bn, kk, j % bn].astype("float32")
        if Zp is not None:
            q = q - Zp[kk // rows, j]
        return q * Sp[kk // rows, j]

    cp = te.compute((*lead, m, no * bn), lambda *i: te.sum(A[(*i[:-1], kr)] * weight(kr, i[-1]), axis=kr),
                    name="dq_matmul")
    out = te.compute((*lead, m, n), lambda *i: cp(*i), name="dq_matmul_unpad") if no * bn != n else cp
    ctx.kind, ctx.block = "matmul", "dq_matmul"
    if four_bit:
        ctx.schedule_kwargs = {"kf": 2}
    shape = out_shape(ctx)
    return out if shape_of(out) == shape else view(out, shape, name="T_dq_matmul_view")
