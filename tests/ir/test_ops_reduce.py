"""Reductions: references vs onnxruntime (opset 18+ form, axes as an input), and their type rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ir import OpTypeError, TensorType

from .onnx_single import T, check, infer, run_kiln

REDUCTIONS = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_l2",
              "reduce_sum_square"]
COVERED = set(REDUCTIONS)

rng = np.random.default_rng(2)


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("axes", [[], [0], [-1], [0, 2], [1, -1], [2, 1, 0]])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_float(op, axes, keepdims):
    x = rng.uniform(0.5, 1.5, size=(2, 3, 4)).astype(np.float32) * rng.choice([-1, 1], size=(2, 3, 4))
    check(op, [x], {"axes": axes, "keepdims": keepdims})


@pytest.mark.parametrize("op", [o for o in REDUCTIONS if o != "reduce_l2"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("axes", [[], [1], [0, -1]])
def test_int(op, dtype, axes):
    hi = 3 if op == "reduce_prod" else 8  # no overflow: onnxruntime's int32 product does not wrap
    x = rng.integers(-hi + 1, hi, size=(3, 4, 2)).astype(dtype)
    check(op, [x], {"axes": axes, "keepdims": 1})


@pytest.mark.parametrize("op,dtype,want", [
    ("reduce_max", np.float32, -np.inf), ("reduce_min", np.float32, np.inf),
    ("reduce_max", np.int32, np.iinfo(np.int32).min), ("reduce_min", np.int64, np.iinfo(np.int64).max),
    ("reduce_max", np.bool_, False), ("reduce_min", np.bool_, True),
])
def test_max_min_of_an_empty_set_is_the_identity(op, dtype, want):
    """ONNX (ReduceMax/Min-18+): an empty reduction gives -inf / +inf (the dtype's min / max)."""
    (y,), _ = run_kiln(op, [np.zeros((2, 0, 4), dtype)], {"axes": [1], "keepdims": 1})
    assert y.shape == (2, 1, 4) and y.dtype == dtype and (y == want).all()


@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
@pytest.mark.parametrize("axes", [[], [1], [0, 1]])
def test_max_min_bool(op, axes):
    """bool inputs since ReduceMax/Min-20: any / all."""
    x = rng.integers(0, 2, size=(4, 3)).astype(bool)
    (y,), _ = run_kiln(op, [x], {"axes": axes, "keepdims": 0})
    want = (x.any if op == "reduce_max" else x.all)(axis=tuple(axes) if axes else None)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("op", REDUCTIONS)
def test_f64(op):
    x = rng.standard_normal((3, 5)).astype(np.float64)
    check(op, [x], {"axes": [1], "keepdims": 0})


def test_int_mean_truncates_toward_zero():
    x = np.array([[-3, -4], [3, 4], [-1, 0]], np.int32)
    (y,), _ = run_kiln("reduce_mean", [x], {"axes": [1], "keepdims": 0})
    np.testing.assert_array_equal(y, np.array([-3, 3, 0], np.int32))
    check("reduce_mean", [x], {"axes": [1], "keepdims": 0})


def test_narrow_int_mean_does_not_wrap():
    x = np.full((2, 48), 100, np.int8)
    x[1] = -100
    (y,), _ = run_kiln("reduce_mean", [x], {"axes": [1], "keepdims": 0})
    np.testing.assert_array_equal(y, np.array([100, -100], np.int8))


def test_scalar_input_reduces_nothing():
    check("reduce_sum", [np.array(2.5, np.float32)], {})


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple), st.data())
def test_rule_agrees_with_numpy(shape, data):
    r = len(shape)
    axes = data.draw(st.lists(st.integers(-r, r - 1), max_size=r, unique_by=lambda a: a % r)) if r else []
    keep = data.draw(st.integers(0, 1))
    x = np.ones(shape, np.float32)
    (y,), (t,) = run_kiln("reduce_max", [x], {"axes": axes, "keepdims": keep})
    want = np.max(x, axis=tuple(axes) if axes else None, keepdims=bool(keep))
    assert t == TensorType.of(y) == TensorType.of(want)


def test_symbolic_dims_flow():
    assert infer("reduce_mean", ["f32[N,S,64]"], axes=[-1]) == [T("f32[N,S,1]")]
    assert infer("reduce_sum", ["f32[N,S,64]"], axes=[1], keepdims=0) == [T("f32[N,64]")]
    assert infer("reduce_max", ["f32[N,C,H,W]"], axes=[2, 3]) == [T("f32[N,C,1,1]")]
    assert infer("reduce_l2", ["f32[N,4]"]) == [T("f32[1,1]")]


@pytest.mark.parametrize("op,types,attrs,match", [
    ("reduce_sum", ["f32[2,3]"], {"axes": [2]}, "out of range"),
    ("reduce_sum", ["f32[2,3]"], {"axes": [1, -1]}, "repeat"),
    ("reduce_mean", ["bool[2,3]"], {}, "dtype"),
    ("reduce_l2", ["i32[2,3]"], {}, "dtype"),
])
def test_type_errors(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer(op, types, **attrs)
    assert str(e.value).startswith(f"{op}:")
