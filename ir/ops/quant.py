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
from .common import norm_axis, require_dtype

QUANT_DTYPES = frozenset({"i4", "u4", "i8", "u8", "i16", "u16"})
SCALE_DTYPES = frozenset({"f16", "bf16", "f32"})
RANGES = {"i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255),
          "i16": (-32768, 32767), "u16": (0, 65535)}


def _check_granularity(what: str, x: TensorType, scale: TensorType, zp: TensorType | None,
                       axis: int, block_size: int) -> None:
    if zp is not None and zp.shape != scale.shape:
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


@op("quantize", inputs=("x", "scale", "zero_point?"),
    attrs={"axis": Attr("int", 1), "block_size": Attr("int", 0), "dtype": Attr("dtype", "u8")},
    infer=_quantize_infer, fusion=FusionKind.INJECTIVE,
    onnx=OnnxSpec("QuantizeLinear", attr_names={"dtype": "output_dtype"}))
def quantize(x, scale, zero_point=None, *, axis, block_size, dtype):
    """y = saturate(round_half_to_even(x / scale) + zero_point) in ``dtype`` (ONNX QuantizeLinear).

    x / scale is divided in float32 (float64 for f64), like ONNX's reference. ONNX spells
    ``dtype`` as ``output_dtype`` and wants it only when there is no zero point (whose dtype
    then decides); kiln always carries it and requires it to match the zero point's.
    """
    ct = np.float64 if x.dtype == np.float64 else np.float32
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


@op("dequantize", inputs=("x", "scale", "zero_point?"),
    attrs={"axis": Attr("int", 1), "block_size": Attr("int", 0)},
    infer=_dequantize_infer, fusion=FusionKind.INJECTIVE, onnx="DequantizeLinear")
def dequantize(x, scale, zero_point=None, *, axis, block_size):
    """y = (x - zero_point) * scale in the scale's dtype (ONNX DequantizeLinear)."""
    d = x.astype(np.int64)
    if zero_point is not None:
        d = d - _expand(zero_point, x, axis, block_size).astype(np.int64)
    return (d.astype(np.float64) * _expand(scale, x, axis, block_size).astype(np.float64)).astype(scale.dtype)
