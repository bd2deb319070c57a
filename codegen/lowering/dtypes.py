"""TVM lowerings of the ops in ir/ops/dtypes.py (``bitcast``) and the dtype checks ``cast`` shares.

TVM 0.27 on CPU cannot be trusted with the narrow types: its LLVM code for sub-byte buffers
(int2/uint2/int4/uint4, float4e2m1, float6) writes out of bounds or fails to build, and its
float8 conversions neither saturate nor keep NaN, inf, subnormals or the fnuz encodings (measured:
float32 500 -> float8_e4m3fn 0.0, NaN -> 1.5). So float8 conversions use kiln's own bit-level codec
(``convert`` in elementwise.py), sub-byte types are refused with a NotImplementedError naming the
dtype, and a float8 ``bitcast`` to or from an 8-bit integer only reinterprets the byte.
"""

from __future__ import annotations

from tvm import te, tirx

from kiln.ir.types import SUBBYTE_INT_DTYPES, to_numpy_dtype

from . import LowerCtx, lowers, tvm_dtype

_SUBBYTE = frozenset(str(to_numpy_dtype(d)) for d in SUBBYTE_INT_DTYPES | {"f4e2m1", "f6e2m3", "f6e3m2"})


def refuse_subbyte(dtype: str, op: str) -> None:
    """NotImplementedError for a sub-byte TVM dtype (their buffers are miscompiled)."""
    if dtype in _SUBBYTE:
        raise NotImplementedError(f"{op} of {dtype} tensors: TVM 0.27's LLVM code for sub-byte buffers "
                                  f"is wrong; kiln runs {dtype} only in the interpreter")


@lowers("bitcast")
def bitcast(ctx: LowerCtx, x: te.Tensor, *, to: str) -> te.Tensor:
    """Reinterpret each element's bits (bool <-> 8-bit: 0/1 and != 0)."""
    src, dst = str(x.dtype), tvm_dtype(to)
    refuse_subbyte(src, "bitcast")
    refuse_subbyte(dst, "bitcast")
    if src == "bool":
        return te.compute(x.shape, lambda *i: tirx.reinterpret(dst, x(*i).astype("uint8")), name="T_bitcast")
    if dst == "bool":
        zero = tirx.const(0, "uint8")
        return te.compute(x.shape, lambda *i: tirx.reinterpret("uint8", x(*i)) != zero, name="T_bitcast")
    return te.compute(x.shape, lambda *i: tirx.reinterpret(dst, x(*i)), name="T_bitcast")
