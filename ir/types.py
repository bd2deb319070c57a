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
}
_BY_NUMPY = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"f16", "bf16", "f32", "f64"})
INT_DTYPES = frozenset({"i4", "u4", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"})


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
