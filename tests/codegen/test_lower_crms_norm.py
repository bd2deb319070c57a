"""Lowering of crms_norm (ir/ops/nn.py): one scheduled kernel against the reference interpreter."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.codegen.test_lower_tensor import Const, check_op, rnd


@pytest.mark.parametrize("shape", [(4, 31), (2, 5, 63), (3, 64), (2, 2, 2, 7), (9,)])
def test_crms_norm(shape):
    check_op("crms_norm", [rnd(*shape) * 3, Const(rnd(shape[-1]))], {"epsilon": 1e-5}, kind="reduction")


def test_crms_norm_scale_as_input_and_broadcast():
    check_op("crms_norm", [rnd(3, 4, 15), rnd(15)], {"epsilon": 1e-3}, kind="reduction")
    check_op("crms_norm", [rnd(3, 15), Const(rnd(1))], {"axis": 1}, kind="reduction")


@pytest.mark.parametrize("dtype", [np.float64, np.float16, ml_dtypes.bfloat16])
def test_crms_norm_dtypes(dtype):
    x = rnd(3, 16).astype(dtype)
    check_op("crms_norm", [x, Const(rnd(16).astype(dtype))], {"epsilon": 1e-5})
