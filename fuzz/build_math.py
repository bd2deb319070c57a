"""Fuzz builders for the ops of family 'math' (ops the generic builders do not cover).

The attribute-free float ones (acos ... tan, mish, softsign, is_nan) and xor get the
registry-driven builders of :mod:`kiln.fuzz.generate` from their ``domain``/``group``; these
pick attributes, and the integer ops make an integer input when the pool has none. Each builds what ONNX Runtime, the fuzzer's third oracle, accepts at the opset
``lower_to_onnx`` writes (23): ``celu`` on float32 only (Celu-12), ``bit_shift`` on unsigned
integers only (signed BitShift needs opset 28), reached through casts from the pool's i32/i64.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import TensorType

from .generate import Builder, _is_float, _is_int, builder


def _int_operand(b: Builder, x: Value | None) -> Value:
    """``x``, an i32/i64 pool value, or a new integer input (the pool is mostly float)."""
    return b.primary(x, _is_int, lambda: b.input(TensorType(b.choice(("i32", "i64")), b.rand_shape()), "n"))


@builder("bitwise_and", "bitwise_or", "bitwise_xor")
def _b_bitwise(b: Builder, x: Value | None, op: str) -> Value:
    a = _int_operand(b, x)
    return b.node(op, [a, b.partner(a)])


@builder("bitwise_not")
def _b_bitwise_not(b: Builder, x: Value | None) -> Value:
    return b.node("bitwise_not", [_int_operand(b, x)])


@builder("is_inf")
def _b_is_inf(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, _is_float)
    flags = b.choice(((1, 1), (1, 0), (0, 1), (0, 0)))
    return b.node("is_inf", [a], detect_negative=flags[0], detect_positive=flags[1])


@builder("celu")
def _b_celu(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.dtype == "f32")
    return b.node("celu", [a], alpha=b.choice((1.0, 0.5, 2.0, 3.0)))


@builder("selu")
def _b_selu(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, _is_float)
    if b.chance(0.5):
        return b.node("selu", [a])
    return b.node("selu", [a], alpha=b.choice((1.0, 0.5, 2.0)), gamma=b.choice((1.0, 0.5, 2.0)))


@builder("thresholded_relu")
def _b_thresholded_relu(b: Builder, x: Value | None) -> Value:
    return b.node("thresholded_relu", [b.primary(x, _is_float)], alpha=b.choice((1.0, 0.0, -1.0, 0.5, 2.0)))


@builder("swish")
def _b_swish(b: Builder, x: Value | None) -> Value:
    return b.node("swish", [b.primary(x, _is_float)], alpha=b.choice((1.0, 0.5, 1.702, -1.0, 0.0)))


@builder("shrink")
def _b_shrink(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: _is_float(v) or _is_int(v))
    if _is_int(a):
        return b.node("shrink", [a], bias=float(b.randint(0, 2)), lambd=float(b.randint(0, 3)))
    return b.node("shrink", [a], bias=b.choice((0.0, 0.5, 1.0, -1.0)), lambd=b.choice((0.5, 0.0, 1.0, 2.0)))


@builder("bit_shift")
def _b_bit_shift(b: Builder, x: Value | None) -> Value:
    """An i32/i64 value as u32/u64 (|a|, so the bits are the value's), shifted by a constant in range
    (left by at most 3 bits while that keeps it below 2**20), and cast back."""
    a = _int_operand(b, x)
    src = a.type.dtype
    udt = {"i32": "u32", "i64": "u64"}[src]
    bits = 32 if udt == "u32" else 64
    left = b.bound(a) < 2 ** 17 and b.chance(0.5)
    hi = 3 if left else bits - 1
    k = b.randint(0, a.type.rank)
    shape = [1 if b.chance(0.5) else d for d in a.type.shape[a.type.rank - k:]]
    amount = b.const(b.rng.integers(0, hi + 1, shape).astype(np.uint32 if udt == "u32" else np.uint64), "shift")
    u = b.node("cast", [b.node("abs", [a])], to=udt)
    y = b.node("bit_shift", [u, amount], direction="LEFT" if left else "RIGHT")
    return b.node("cast", [y], to=src)
