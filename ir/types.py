"""Tensor types of kiln's IR: a dtype name and a shape whose dims are ints or symbols.

A symbolic dim is a product of named factors and an integer coefficient (``N``,
``N*64``, ``2*B*S``); this is enough for the batch/sequence symbols that ONNX
models carry and for the reshapes and flattens applied to them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import reduce

import ml_dtypes
import numpy as np

# kiln dtype name -> numpy dtype. Names are short and ONNX-like.
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype(np.bool_),
    "i2": np.dtype(ml_dtypes.int2),
    "u2": np.dtype(ml_dtypes.uint2),
    "i4": np.dtype(ml_dtypes.int4),
    "u4": np.dtype(ml_dtypes.uint4),
    "i8": np.dtype(np.int8),
    "u8": np.dtype(np.uint8),
    "i16": np.dtype(np.int16),
    "u16": np.dtype(np.uint16),
    "i32": np.dtype(np.int32),
    "u32": np.dtype(np.uint32),
    "i64": np.dtype(np.int64),
    "u64": np.dtype(np.uint64),
    "f16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    # Narrow floats (ONNX FLOAT8*, FLOAT4E2M1, FLOAT6*): storage types for Cast, BitCast and QDQ.
    "f8e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "f8e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "f8e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "f8e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "f8e8m0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "f4e2m1": np.dtype(ml_dtypes.float4_e2m1fn),
    "f6e2m3": np.dtype(ml_dtypes.float6_e2m3fn),
    "f6e3m2": np.dtype(ml_dtypes.float6_e3m2fn),
}
_BY_NUMPY = {v: k for k, v in DTYPES.items()}
# Floats that ops compute in; the narrow floats below are only converted to and from.
FLOAT_DTYPES = frozenset({"f16", "bf16", "f32", "f64"})
FLOAT8_DTYPES = frozenset({"f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"})
NARROW_FLOAT_DTYPES = FLOAT8_DTYPES | {"f8e8m0", "f4e2m1", "f6e2m3", "f6e3m2"}
SUBBYTE_INT_DTYPES = frozenset({"i2", "u2", "i4", "u4"})
INT_DTYPES = frozenset({"i2", "u2", "i4", "u4", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"})
# Storage width in bits (numpy stores the sub-byte types one per byte).
BITS: dict[str, int] = {
    "bool": 8, "i2": 2, "u2": 2, "i4": 4, "u4": 4, "f4e2m1": 4, "f6e2m3": 6, "f6e3m2": 6,
    **{d: 8 for d in ("i8", "u8", "f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f8e8m0")},
    "i16": 16, "u16": 16, "f16": 16, "bf16": 16, "i32": 32, "u32": 32, "f32": 32,
    "i64": 64, "u64": 64, "f64": 64,
}


def is_float(dtype: str) -> bool:
    """Whether a kiln dtype is a floating-point type, narrow ones included."""
    return dtype in FLOAT_DTYPES or dtype in NARROW_FLOAT_DTYPES


def to_numpy_dtype(dtype: str) -> np.dtype:
    """numpy dtype of a kiln dtype name; KeyError names the unknown dtype."""
    try:
        return DTYPES[dtype]
    except KeyError:
        raise KeyError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def from_numpy_dtype(dtype: np.dtype) -> str:
    """kiln dtype name of a numpy dtype."""
    try:
        return _BY_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise KeyError(f"numpy dtype {np.dtype(dtype)} has no kiln dtype") from None


# ---------------------------------------------------------------- symbolic dims

Dim = int | str
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIM = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)(?:\*(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+))*")


def _factors(d: Dim) -> tuple[int, Counter]:
    if isinstance(d, (int, np.integer)):
        return int(d), Counter()
    coef, syms = 1, Counter()
    for part in str(d).split("*"):
        if part.isdigit():
            coef *= int(part)
        else:
            syms[part] += 1
    return coef, syms


def _make(coef: int, syms: Counter) -> Dim:
    names = sorted(syms.elements())
    if not names or coef == 0:
        return coef
    return "*".join(([str(coef)] if coef != 1 else []) + names)


def normalize_dim(d: Dim) -> Dim:
    """Canonical spelling of a dim: ints stay ints, products are sorted (``64*N``)."""
    if isinstance(d, (int, np.integer)):
        return int(d)
    if not isinstance(d, str) or not _DIM.fullmatch(d):
        raise ValueError(f"bad dim {d!r}: expected an int or a product of symbols like 'N*64'")
    return _make(*_factors(d))


def dim_mul(*dims: Dim) -> Dim:
    """Product of dims, symbolic where any factor is."""
    def mul(a: tuple[int, Counter], b: tuple[int, Counter]) -> tuple[int, Counter]:
        return a[0] * b[0], a[1] + b[1]
    return _make(*reduce(mul, (_factors(d) for d in dims), (1, Counter())))


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """Exact quotient a/b, or None when it is not an exact product of a's factors."""
    ca, sa = _factors(a)
    cb, sb = _factors(b)
    if cb == 0 or ca % cb or any(sa[k] < v for k, v in sb.items()):
        return None
    return _make(ca // cb, sa - sb)


def is_static_dim(d: Dim) -> bool:
    return isinstance(d, int)


# ---------------------------------------------------------------- tensor type

@dataclass(frozen=True)
class TensorType:
    """dtype and shape of a value; dims are ints or symbolic products."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        to_numpy_dtype(self.dtype)
        object.__setattr__(self, "shape", tuple(normalize_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> Dim:
        return dim_mul(*self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return to_numpy_dtype(self.dtype)

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        array = np.asarray(array)
        return TensorType(from_numpy_dtype(array.dtype), tuple(int(d) for d in array.shape))


def bind_shape(expected: tuple[Dim, ...], actual: tuple[int, ...], env: dict[str, int]) -> str | None:
    """Match a concrete shape against a possibly symbolic one, binding symbols in ``env``.

    Returns None on success, else a sentence saying what did not match.
    """
    if len(expected) != len(actual):
        return f"rank {len(actual)} but expected rank {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        if isinstance(e, int):
            if e != a:
                return f"dim {i} is {a} but expected {e}"
            continue
        coef, syms = _factors(e)
        if len(syms) == 1 and sum(syms.values()) == 1:
            (sym,) = syms
            if a % coef:
                return f"dim {i} is {a}, not a multiple of {coef} as {e} requires"
            val = a // coef
            if sym in env and env[sym] != val:
                return f"dim {i} ({e}) is {a} but {sym}={env[sym]} elsewhere"
            env[sym] = val
        else:
            known = 1
            unknown = []
            for s, n in syms.items():
                if s in env:
                    known *= env[s] ** n
                else:
                    unknown.append(s)
            if not unknown and coef * known != a:
                return f"dim {i} ({e}) is {a} but evaluates to {coef * known}"
    return None


def eval_shape(shape: tuple[Dim, ...], env: dict[str, int]) -> tuple[int, ...]:
    """Concrete shape under a symbol binding; KeyError names an unbound symbol."""
    out = []
    for d in shape:
        coef, syms = _factors(d)
        for s, n in syms.items():
            if s not in env:
                raise KeyError(f"symbol {s!r} is not bound")
            coef *= env[s] ** n
        out.append(coef)
    return tuple(out)
