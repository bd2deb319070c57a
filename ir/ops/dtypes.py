"""Op family 'dtypes': element-type conversions with ONNX semantics, and ``bitcast``.

:func:`convert` is the numpy semantics of ONNX ``Cast`` (opset 25/28), used by the ``cast`` op
(``ir/ops/elementwise.py``): float -> int truncates toward zero (narrow ints wrap), anything ->
bool is ``x != 0``, and conversions to bfloat16 and the narrow floats round to nearest even
*once*, from the exact value. ml_dtypes converts float64 (and wide ints) through float32, which
rounds twice (1 + 2**-4 + 2**-40 becomes 1.0 in float8_e4m3fn instead of 1.125); here the
float32 step rounds to odd, which makes the final rounding exact.

Saturation (ONNX ``saturate``, default 1) applies to the four float8 types: out-of-range values
and infinities clamp to +-FLT_MAX, NaN stays NaN. With ``saturate=0`` they follow the float8
type's own overflow (NaN for the fn/fnuz types, inf for e5m2). float4e2m1 and float6 have no
inf/NaN and always clamp (as ml_dtypes and onnx.reference do). float8e8m0 (powers of two) uses
``round_mode`` ("up", "down", "nearest") and ``saturate`` with onnx.numpy_helper.to_float8e8m0's
bit rules, applied to the (odd-rounded) float32 value.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import (
    BITS,
    FLOAT8_DTYPES,
    INT_DTYPES,
    NARROW_FLOAT_DTYPES,
    TensorType,
    from_numpy_dtype,
    to_numpy_dtype,
)

ROUND_MODES = ("up", "down", "nearest")
# Where ml_dtypes' float64 -> dtype conversion is not a single rounding (see the module docstring).
_ODD_ROUNDED = NARROW_FLOAT_DTYPES | {"bf16"}


def f32_round_to_odd(x: np.ndarray) -> np.ndarray:
    """float32 nearest to ``x`` toward zero, with its last bit set when inexact (round to odd).

    Rounding that value to any format with at most 21 significand bits gives the correctly
    rounded result of ``x`` itself; finite values beyond float32's range become +-FLT_MAX (odd).
    """
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x64.astype(np.float32)
        inexact = np.isfinite(x64) & (y.astype(np.float64) != x64)
        away = inexact & (np.abs(y.astype(np.float64)) > np.abs(x64))
    y = np.where(away, np.nextafter(y, np.float32(0)), y).astype(np.float32)
    bits = y.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32).reshape(x64.shape)


def to_e8m0(x: np.ndarray, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """float8e8m0 of float32 ``x``: the bit rules of onnx.numpy_helper.to_float8e8m0.

    The sign is ignored, and they read a float32 subnormal's exponent as 0, so under "up"
    every x below 2**-126 (2**-127 included) becomes 2**-126; kept, as ONNX's reference does it.
    """
    if round_mode not in ROUND_MODES:
        raise ValueError(f"round_mode must be one of {ROUND_MODES}, got {round_mode!r}")
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    special = exponent == 0xFF
    if round_mode == "nearest":
        g = (bits & 0x400000) > 0
        r = (bits & 0x200000) > 0
        s = (bits & 0x1FFFFF) > 0
        up = g & (r | s | (exponent > 0)) & ~special
    elif round_mode == "up":
        up = ((bits & 0x7FFFFF) > 0) & ~special
    else:
        up = np.zeros(bits.shape, dtype=bool)
    if saturate:
        up &= exponent != 0xFE
    exponent = np.where(special, 0xFF, exponent + up).astype(np.uint8)
    return exponent.view(ml_dtypes.float8_e8m0fnu)


def convert(x: np.ndarray, to: str, saturate: int | None = None, round_mode: str | None = None) -> np.ndarray:
    """``x`` converted to kiln dtype ``to`` as ONNX Cast does (see the module docstring)."""
    x = np.asarray(x)
    src = from_numpy_dtype(x.dtype)
    dt = to_numpy_dtype(to)
    if src == to:
        return x.copy()
    sat = saturate is None or bool(saturate)
    if src in _ODD_ROUNDED:
        x = x.astype(np.float32)  # exact
    with np.errstate(invalid="ignore", over="ignore"):
        if to == "bool":
            return x != 0
        if to == "f8e8m0":
            return to_e8m0(f32_round_to_odd(x), sat, round_mode or "up")
        if to in _ODD_ROUNDED:
            v = x.astype(np.float64)
            if to in FLOAT8_DTYPES and sat:
                fi = ml_dtypes.finfo(dt)
                v = np.clip(v, float(fi.min), float(fi.max))
            return f32_round_to_odd(v).astype(dt)
        if to in INT_DTYPES and x.dtype.kind == "f":
            return np.trunc(x).astype(dt)
        return x.astype(dt)


def cast_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    """Type rule of ``cast``: the input's shape in dtype ``to``; saturate and round_mode checked."""
    sat, mode = attrs.get("saturate"), attrs.get("round_mode")
    if sat not in (None, 0, 1):
        raise OpTypeError(f"cast: saturate must be 0 or 1, got {sat}")
    if sat is not None and attrs["to"] not in FLOAT8_DTYPES and attrs["to"] != "f8e8m0":
        raise OpTypeError(f"cast: saturate applies to float8 targets only (ONNX Cast), got it for "
                          f"a cast to {attrs['to']}")
    if mode is not None and mode not in ROUND_MODES:
        raise OpTypeError(f"cast: round_mode must be one of {list(ROUND_MODES)}, got {mode!r}")
    return [ts[0].with_dtype(attrs["to"])]


def _bitcast_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    src, to = ts[0].dtype, attrs["to"]
    if BITS[src] != BITS[to]:
        raise OpTypeError(f"bitcast: {src} has {BITS[src]} bits and {to} {BITS[to]}; "
                          f"BitCast needs equal bit widths")
    return [ts[0].with_dtype(to)]


@op("bitcast", inputs=("x",), attrs={"to": Attr("dtype")}, infer=_bitcast_infer,
    fusion=FusionKind.ELEMENTWISE, onnx=OnnxSpec("BitCast", since=26))
def bitcast(x, to):
    """The bits of x read as dtype ``to`` of the same width (ONNX BitCast); a byte read as bool is x != 0."""
    x = np.array(x, order="C")  # a copy that keeps 0-d arrays 0-d (ascontiguousarray makes them 1-d)
    width = BITS[from_numpy_dtype(x.dtype)]
    if width < 8:  # numpy keeps a sub-byte value in the low bits of its byte
        x = x.view(np.uint8) & np.uint8((1 << width) - 1)
    if to == "bool":
        return np.asarray(x.view(np.uint8) != 0)
    return x.view(to_numpy_dtype(to))
