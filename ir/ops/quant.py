"""Linear quantization (ONNX opset-21 QuantizeLinear / DequantizeLinear).

Granularity follows the scale's shape: a scalar (or 1-element 1-D) scale is
per-tensor; a 1-D scale of length x.shape[axis] is per-axis; with ``block_size``
B > 0 the scale has x's shape except ceil(D/B) along ``axis`` (blocked). The
zero point, when present, has the scale's shape and the quantized dtype.
"""

from __future__ import annotations

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import TensorType, to_numpy_dtype
from .common import broadcast_shapes, norm_axis, require_dtype

INT_QUANT_DTYPES = frozenset({"i2", "u2", "i4", "u4", "i8", "u8", "i16", "u16"})
# ONNX 19+ quantizes to float8 (zero point 0, rounding by the float8 cast) and 23+ to float4
FLOAT_QUANT_DTYPES = frozenset({"f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f4e2m1"})
QUANT_DTYPES = INT_QUANT_DTYPES | FLOAT_QUANT_DTYPES
SCALE_DTYPES = frozenset({"f16", "bf16", "f32"})
RANGES = {"i2": (-2, 1), "u2": (0, 3), "i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255),
          "i16": (-32768, 32767), "u16": (0, 65535)}


def _check_granularity(what: str, x: TensorType, scale: TensorType, zp: TensorType | None,
                       axis: int, block_size: int) -> None:
    one = ((), (1,))
    if zp is not None and zp.shape != scale.shape and not (zp.shape in one and scale.shape in one):
        # [] against [1] is per tensor either way (onnxruntime's quantize_static writes bias scales so)
        raise OpTypeError(f"{what}: zero point {zp} must have the scale's shape {scale}")
    if block_size < 0:
        raise OpTypeError(f"{what}: block_size must be >= 0, got {block_size}")
    if block_size == 0:
        if scale.rank == 0 or scale.shape == (1,):
            return
        if scale.rank != 1:
            raise OpTypeError(f"{what}: scale {scale} must be a scalar (per-tensor) or 1-D (per-axis) "
                              f"when block_size is 0")
        ax = norm_axis(axis, x.rank)
        if scale.shape[0] != x.shape[ax]:
            raise OpTypeError(f"{what}: per-axis scale has {scale.shape[0]} entries but axis {ax} of {x} "
                              f"has {x.shape[ax]}")
        return
    ax = norm_axis(axis, x.rank)
    if scale.rank != x.rank:
        raise OpTypeError(f"{what}: blocked scale {scale} must have the input's rank ({x})")
    for i, (d, s) in enumerate(zip(x.shape, scale.shape)):
        if i == ax:
            if not isinstance(d, int):
                raise OpTypeError(f"{what}: blocked axis {ax} needs a static size; it is {d}")
            if s != -(-d // block_size):
                raise OpTypeError(f"{what}: blocked scale has {s} blocks on axis {ax} but {d} / "
                                  f"block_size {block_size} needs {-(-d // block_size)}")
        elif d != s:
            raise OpTypeError(f"{what}: blocked scale {scale} differs from the input {x} in dim {i}")


def _expand(p: np.ndarray, x: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """A scale or zero point broadcastable against x."""
    if block_size == 0:
        if p.ndim == 0 or p.shape == (1,):
            return p.reshape(())
        ax = axis % x.ndim
        return p.reshape([-1 if i == ax else 1 for i in range(x.ndim)])
    ax = axis % x.ndim
    return np.take(np.repeat(p, block_size, axis=ax), range(x.shape[ax]), axis=ax)


def _quantize_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, scale = ts[0], ts[1]
    zp = ts[2] if len(ts) > 2 else None
    require_dtype(x, SCALE_DTYPES, "quantize: input")
    if scale.dtype != x.dtype:
        raise OpTypeError(f"quantize: scale has dtype {scale.dtype}, the input {x.dtype}")
    dtype = attrs.get("dtype", "u8")
    if dtype not in QUANT_DTYPES:
        raise OpTypeError(f"quantize: output dtype {dtype} is not one of {sorted(QUANT_DTYPES)}")
    if zp is not None and zp.dtype != dtype:
        raise OpTypeError(f"quantize: zero point has dtype {zp.dtype} but the output dtype attribute is {dtype}")
    _check_granularity("quantize", x, scale, zp, attrs.get("axis", 1), attrs.get("block_size", 0))
    return [x.with_dtype(dtype)]


@op("quantize", bound=lambda node, ib, n: 65535.0, inputs=("x", "scale", "zero_point?"),
    attrs={"axis": Attr("int", 1), "block_size": Attr("int", 0), "dtype": Attr("dtype", "u8"),
           "saturate": Attr("int", None)},
    infer=_quantize_infer, fusion=FusionKind.INJECTIVE,
    onnx=OnnxSpec("QuantizeLinear", attr_names={"dtype": "output_dtype"}))
def quantize(x, scale, zero_point=None, *, axis, block_size, dtype, saturate=None):
    """y = saturate(round_half_to_even(x / scale) + zero_point) in ``dtype`` (ONNX QuantizeLinear).

    x / scale is divided in float32 (float64 for f64), like ONNX's reference. ONNX spells
    ``dtype`` as ``output_dtype`` and wants it only when there is no zero point (whose dtype
    then decides); kiln always carries it and requires it to match the zero point's. Float8/float4
    outputs round by ONNX's Cast rules (``saturate`` as in Cast; float4 always saturates).
    """
    ct = np.float64 if x.dtype == np.float64 else np.float32
    if dtype in FLOAT_QUANT_DTYPES:
        from .dtypes import convert

        q = x.astype(ct) / _expand(scale, x, axis, block_size).astype(ct)
        if zero_point is not None:
            q = q + _expand(zero_point, x, axis, block_size).astype(ct)
        return convert(q.astype(np.float32), dtype, saturate)
    q = np.rint(x.astype(ct) / _expand(scale, x, axis, block_size).astype(ct)).astype(np.float64)
    if zero_point is not None:
        q = q + _expand(zero_point, x, axis, block_size).astype(np.float64)
    lo, hi = RANGES[dtype]
    with np.errstate(invalid="ignore"):
        return np.clip(q, lo, hi).astype(np.int32).astype(to_numpy_dtype(dtype))


def _dequantize_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, scale = ts[0], ts[1]
    zp = ts[2] if len(ts) > 2 else None
    require_dtype(x, QUANT_DTYPES | {"i32"}, "dequantize: input")
    require_dtype(scale, SCALE_DTYPES, "dequantize: scale")
    if zp is not None and zp.dtype != x.dtype:
        raise OpTypeError(f"dequantize: zero point has dtype {zp.dtype}, the input {x.dtype}")
    _check_granularity("dequantize", x, scale, zp, attrs.get("axis", 1), attrs.get("block_size", 0))
    return [x.with_dtype(scale.dtype)]


@op("dequantize", fold=False, bound=lambda node, ib, n: 65535.0 * ib[1], inputs=("x", "scale", "zero_point?"),
    attrs={"axis": Attr("int", 1), "block_size": Attr("int", 0)},
    infer=_dequantize_infer, fusion=FusionKind.INJECTIVE, onnx="DequantizeLinear")
def dequantize(x, scale, zero_point=None, *, axis, block_size):
    """y = (x - zero_point) * scale in the scale's dtype (ONNX DequantizeLinear)."""
    wide = np.float64 if x.dtype.kind not in "iub" else np.int64  # float8/float4 codes widen exactly
    d = x.astype(wide)
    if zero_point is not None:
        d = d - _expand(zero_point, x, axis, block_size).astype(wide)
    return (d.astype(np.float64) * _expand(scale, x, axis, block_size).astype(np.float64)).astype(scale.dtype)


# ================================================================== integer kernels (fuse-qlinear)
#
# What ``fuse-qlinear`` turns the QDQ form into. None has an ONNX spelling: each
# ``decompose``s back into the dequantize -> float op form it came from (so
# ``lower_to_onnx`` writes plain QDQ again).

CODE_DTYPES = frozenset({"i8", "u8"})
WEIGHT_ONLY_DTYPES = frozenset({"i4", "u4", "i8", "u8"})


def _per_tensor(t: TensorType) -> bool:
    return t.rank == 0 or t.shape == (1,)


def _check_scale_zp(what: str, scale: TensorType, zp: TensorType | None, code: TensorType,
                    n: object | None) -> None:
    """``scale`` f32 per tensor (or [n] per output column when ``n`` is given); ``zp`` its shape, ``code``'s dtype."""
    if scale.dtype != "f32":
        raise OpTypeError(f"{what}: scale must be f32, got {scale}")
    if not (_per_tensor(scale) or (n is not None and scale.rank == 1 and scale.shape[0] == n)):
        want = "a scalar" + (f" or [{n}] (one per output column)" if n is not None else "")
        raise OpTypeError(f"{what}: scale {scale} must be {want}")
    if zp is not None and ((zp.shape != scale.shape and not (_per_tensor(zp) and _per_tensor(scale)))
                           or zp.dtype != code.dtype):
        raise OpTypeError(f"{what}: zero point {zp} must have the scale's shape {list(scale.shape)} and the "
                          f"codes' dtype {code.dtype}")


def _qmatmul_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    a, sa, za, b, sb = ts[:5]
    zb = ts[5] if len(ts) > 5 else None
    bias = ts[6] if len(ts) > 6 else None
    require_dtype(a, CODE_DTYPES, "qmatmul: a")
    require_dtype(b, CODE_DTYPES, "qmatmul: b")
    if a.rank < 2 or b.rank < 2:
        raise OpTypeError(f"qmatmul: operands must have rank >= 2, got {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise OpTypeError(f"qmatmul: inner dims differ: {a} has {a.shape[-1]} columns, {b} has {b.shape[-2]} rows")
    n = b.shape[-1]
    _check_scale_zp("qmatmul: a", sa, za, a, None)
    if za is None:
        raise OpTypeError("qmatmul: a needs a zero point")
    _check_scale_zp("qmatmul: b", sb, zb, b, n if b.rank == 2 else None)
    if bias is not None and (bias.dtype != "i32" or bias.shape != (n,)):
        raise OpTypeError(f"qmatmul: bias must be i32 [{n}], got {bias}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType("f32", (*batch, a.shape[-2], n))]


def _centered(q: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """q - zp in int64 (zp per tensor, or per index along ``axis``)."""
    d = q.astype(np.int64)
    return d if zp is None else d - _expand(zp, q, axis, 0).astype(np.int64)


def _requant(acc: np.ndarray, bias: np.ndarray | None, sa: np.ndarray, sb: np.ndarray, axis: int) -> np.ndarray:
    """(acc + bias) * sa * sb in float64, rounded once to f32."""
    if bias is not None:
        acc = acc + _expand(bias, acc, axis, 0).astype(np.int64)
    s = _expand(sb, acc, axis, 0).astype(np.float64)
    return (acc.astype(np.float64) * np.float64(sa.reshape(())) * s).astype(np.float32)


def _qmatmul_decompose(g, node):
    a, sa, za, b, sb, zb, bias = (*node.inputs, None, None)[:7]
    ad = g.op("dequantize", a, sa, za, before=node)
    bd = g.op("dequantize", b, sb, zb, before=node, axis=-1)
    y = g.op("matmul", ad, bd, before=node)
    if bias is None:
        return [y]
    bs = g.op("mul", sa, sb, before=node)
    return [g.op("add", y, g.op("dequantize", bias, bs, before=node, axis=0), before=node)]


@op("qmatmul", inputs=("a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point?", "bias?"),
    infer=_qmatmul_infer, fusion=FusionKind.OUT_EWISE_FUSABLE, decompose=_qmatmul_decompose)
def qmatmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point=None, bias=None):
    """Integer matmul: ((a - a_zp) @ (b - b_zp) + bias) * a_scale * b_scale, an f32 result.

    a, b are 8-bit codes ([..., M, K], [..., K, N], batch dims broadcast); a per tensor, b per
    tensor or per output column (scale/zero point [N], 2-D b only); bias i32 [N] with scale
    a_scale * b_scale (ONNX's int32 bias). The products accumulate exactly (int64 here; int32 in
    the kernels, exact for K * 255 * 255 < 2^31). What fuse-qlinear makes of the QDQ form
    dequantize(a) @ dequantize(b) (+ dequantize(bias)); decomposes back to it for ONNX.
    """
    acc = np.matmul(_centered(a, a_zero_point, -1), _centered(b, b_zero_point, -1))
    return _requant(acc, bias, a_scale, b_scale, -1)


def _qconv_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    from .nn import _conv_infer

    x, sx, zx, w, sw = ts[:5]
    zw = ts[5] if len(ts) > 5 else None
    bias = ts[6] if len(ts) > 6 else None
    require_dtype(x, CODE_DTYPES, "qconv: x")
    require_dtype(w, CODE_DTYPES, "qconv: w")
    if zx is None:
        raise OpTypeError("qconv: x needs a zero point")
    _check_scale_zp("qconv: x", sx, zx, x, None)
    _check_scale_zp("qconv: w", sw, zw, w, w.shape[0])
    if bias is not None and (bias.dtype != "i32" or bias.shape != (w.shape[0],)):
        raise OpTypeError(f"qconv: bias must be i32 [{w.shape[0]}], got {bias}")
    (y,) = _conv_infer([x.with_dtype("f32"), w.with_dtype("f32")], attrs)
    return [y]


def _qconv_decompose(g, node):
    x, sx, zx, w, sw, zw, bias = (*node.inputs, None, None)[:7]
    xd = g.op("dequantize", x, sx, zx, before=node)
    wd = g.op("dequantize", w, sw, zw, before=node, axis=0)
    bd = None
    if bias is not None:
        bd = g.op("dequantize", bias, g.op("mul", sx, sw, before=node), before=node, axis=0)
    return [g.op("conv", xd, wd, bd, before=node, **node.attrs)]


@op("qconv", inputs=("x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point?", "bias?"),
    attrs={"strides": Attr("ints", []), "pads": Attr("ints", []), "dilations": Attr("ints", []),
           "group": Attr("int", 1)},
    infer=_qconv_infer, fusion=FusionKind.OUT_EWISE_FUSABLE, decompose=_qconv_decompose)
def qconv(x, x_scale, x_zero_point, w, w_scale, w_zero_point=None, bias=None, *, strides, pads, dilations, group):
    """Integer convolution: (conv(x - x_zp, w - w_zp) + bias) * x_scale * w_scale, an f32 result.

    ONNX Conv attributes; x per tensor, w per tensor or per output channel (axis 0), bias i32 [M]
    with scale x_scale * w_scale. Padding pads the *dequantized* input with 0, i.e. the codes with
    x_zp. Exact int64 accumulation (int32 in the kernels). Decomposes back to QDQ + conv for ONNX.
    """
    from .nn import conv

    acc = conv(_centered(x, x_zero_point, 1), _centered(w, w_zero_point, 0),
               strides=strides, pads=pads, dilations=dilations, group=group)
    return _requant(acc, bias, x_scale, w_scale, 1)


def _dq_matmul_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    a, w, scale = ts[:3]
    zp = ts[3] if len(ts) > 3 else None
    require_dtype(a, {"f32"}, "dq_matmul: a")
    require_dtype(w, WEIGHT_ONLY_DTYPES, "dq_matmul: weight codes")
    if w.rank != 2 or a.rank < 1:
        raise OpTypeError(f"dq_matmul: weight codes must be 2-D [K, N] and a of rank >= 1, got {w} and {a}")
    if a.shape[-1] != w.shape[0]:
        raise OpTypeError(f"dq_matmul: inner dims differ: {a} has {a.shape[-1]} columns, {w} has {w.shape[0]} rows")
    (wd,) = _dequantize_infer([w, scale, zp], attrs)
    if wd.dtype != "f32":
        raise OpTypeError(f"dq_matmul: scale must be f32, got {scale}")
    return [TensorType("f32", (*a.shape[:-1], w.shape[1]))]


def _dq_matmul_decompose(g, node):
    a, w, scale, zp = (*node.inputs, None)[:4]
    wd = g.op("dequantize", w, scale, zp, before=node, **node.attrs)
    return [g.op("matmul", a, wd, before=node)]


@op("dq_matmul", inputs=("a", "w", "scale", "zero_point?"),
    attrs={"axis": Attr("int", 1), "block_size": Attr("int", 0)},
    infer=_dq_matmul_infer, fusion=FusionKind.OUT_EWISE_FUSABLE, decompose=_dq_matmul_decompose)
def dq_matmul(a, w, scale, zero_point=None, *, axis, block_size):
    """Weight-only matmul: a @ dequantize(w, scale, zero_point; axis, block_size), f32 a.

    w holds 4- or 8-bit codes [K, N]; granularity as dequantize's (per tensor, per axis, or blocked:
    GPTQ/AWQ groups are axis 0, block_size g, scale [K/g, N]). The kernels dequantize the weight
    inside the matmul loop (int4 codes packed two per byte); the reference is exactly the
    dequantize -> matmul pair fuse-qlinear replaced.
    """
    from .nn import matmul

    return matmul(a, dequantize(w, scale, zero_point, axis=axis, block_size=block_size))
