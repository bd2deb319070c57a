"""TVM lowerings of the ops in ir/ops/quant.py (ONNX QuantizeLinear / DequantizeLinear).

The scale and zero point are read per tensor (rank 0 or one element), per axis
(1-D along ``axis``) or per block (``block_size`` > 0: index ``i // block_size``
along ``axis``), matching the reference's ``_expand``.
"""

from __future__ import annotations

from tvm import te, tirx

from . import LowerCtx, lowers, tvm_dtype
from .elementwise import Expr, bits_of

RANGES = {"i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255),
          "i16": (-32768, 32767), "u16": (0, 65535)}


def _no_int4(dtype: str) -> None:
    if dtype in ("int4", "uint4"):
        raise NotImplementedError(f"{dtype} tensors: TVM 0.27's LLVM code for sub-byte buffers writes out of "
                                  f"bounds; store them as 8-bit in the graph")


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
             axis: int, block_size: int, dtype: str) -> te.Tensor:
    """saturate(round_half_even(x / scale) + zero_point), divided in float32; NaN gives 0."""
    lo, hi = (tirx.const(b, "float32") for b in RANGES[dtype])
    out = tvm_dtype(dtype)
    _no_int4(out)

    def body(*i):
        q = tirx.nearbyint(x(*i).astype("float32") / _param(scale, i, axis, block_size).astype("float32"))
        if zero_point is not None:
            q = q + _param(zero_point, i, axis, block_size).astype("float32")
        q = tirx.Select(q < lo, lo, tirx.Select(q > hi, hi, q))
        return tirx.Select(tirx.isnan(q), tirx.const(0, "int32"), q.astype("int32")).astype(out)

    return te.compute(x.shape, body, name="T_quantize")


@lowers("dequantize")
def dequantize(ctx: LowerCtx, x: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None = None, *,
               axis: int, block_size: int) -> te.Tensor:
    """(x - zero_point) * scale: the difference in int32 (int64 for int32 inputs), the product in float32."""
    _no_int4(str(x.dtype))
    acc = "int64" if bits_of(x) >= 32 else "int32"
    out = str(scale.dtype)

    def body(*i):
        d = x(*i).astype(acc)
        if zero_point is not None:
            d = d - _param(zero_point, i, axis, block_size).astype(acc)
        s = _param(scale, i, axis, block_size).astype("float32")
        return (d.astype("float32") * s).astype(out)

    return te.compute(x.shape, body, name="T_dequantize")
