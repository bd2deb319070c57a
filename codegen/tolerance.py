"""How close compiled kernels must come to the reference interpreter: one table, used by every test.

The interpreter computes in float64 where it can and rounds once; compiled
kernels compute in the tensor's dtype, reassociate sums (tiling, vector lanes,
rfactor) and use TVM's fast approximations of exp/tanh/erf.  The bounds:

========  ========  ========  =====================================================
dtype     rtol      atol      why
========  ========  ========  =====================================================
f64       1e-9      1e-12     reassociation only
f32       1e-4      1e-5      reassociated f32 sums over K <= 4096, fast exp/erf
f16/bf16  1e-2      1e-2      one rounding of the result, 8-11 bit mantissa
integers  0         0         integer kernels are exact (int32 accumulate)
========  ========  ========  =====================================================

Whole models compound errors through many layers: :data:`MODEL_F32` is the f32
bound for a model's outputs against the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tolerance", "MODEL_F32", "for_dtype", "assert_close"]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


_BY_KIND = {
    "float64": Tolerance(1e-9, 1e-12),
    "float32": Tolerance(1e-4, 1e-5),
    "float16": Tolerance(1e-2, 1e-2),
    "bfloat16": Tolerance(1e-2, 1e-2),
}
EXACT = Tolerance(0.0, 0.0)
MODEL_F32 = Tolerance(1e-3, 1e-4)


def for_dtype(dtype: np.dtype | str) -> Tolerance:
    """The kernel tolerance for results of ``dtype``."""
    return _BY_KIND.get(str(np.dtype(dtype)) if str(dtype) != "bfloat16" else "bfloat16", EXACT)


def assert_close(actual: np.ndarray, expected: np.ndarray, tol: Tolerance | None = None, what: str = "output") -> None:
    """numpy's assert_allclose with kiln's tolerance for the expected dtype, and shapes/dtypes checked."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    tol = tol or for_dtype(expected.dtype)
    if expected.dtype.kind in "fc" or str(expected.dtype) == "bfloat16":
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=tol.rtol, atol=tol.atol, err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
