"""ONNX element types <-> kiln dtype names."""

from __future__ import annotations

from onnx import TensorProto

ONNX_TO_KILN: dict[int, str] = {
    TensorProto.BOOL: "bool",
    TensorProto.INT4: "i4",
    TensorProto.UINT4: "u4",
    TensorProto.INT8: "i8",
    TensorProto.UINT8: "u8",
    TensorProto.INT16: "i16",
    TensorProto.UINT16: "u16",
    TensorProto.INT32: "i32",
    TensorProto.UINT32: "u32",
    TensorProto.INT64: "i64",
    TensorProto.UINT64: "u64",
    TensorProto.FLOAT16: "f16",
    TensorProto.BFLOAT16: "bf16",
    TensorProto.FLOAT: "f32",
    TensorProto.DOUBLE: "f64",
    TensorProto.INT2: "i2",
    TensorProto.UINT2: "u2",
    TensorProto.FLOAT8E4M3FN: "f8e4m3fn",
    TensorProto.FLOAT8E4M3FNUZ: "f8e4m3fnuz",
    TensorProto.FLOAT8E5M2: "f8e5m2",
    TensorProto.FLOAT8E5M2FNUZ: "f8e5m2fnuz",
    TensorProto.FLOAT8E8M0: "f8e8m0",
    TensorProto.FLOAT4E2M1: "f4e2m1",
    TensorProto.FLOAT6E2M3: "f6e2m3",
    TensorProto.FLOAT6E3M2: "f6e3m2",
}
KILN_TO_ONNX: dict[str, int] = {v: k for k, v in ONNX_TO_KILN.items()}


def kiln_dtype(elem_type: int) -> str:
    """kiln dtype of an ONNX element type; ValueError names the ONNX type."""
    try:
        return ONNX_TO_KILN[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise ValueError(f"ONNX element type {name} is not supported by kiln "
                         f"(supported: {sorted(TensorProto.DataType.Name(k) for k in ONNX_TO_KILN)})") from None


def onnx_dtype(dtype: str) -> int:
    """ONNX element type of a kiln dtype."""
    return KILN_TO_ONNX[dtype]
