"""Lowerings of ir/ops/tensor.py: each op as one scheduled kernel against the reference interpreter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln import ir
from kiln.ir.registry import all_ops
from kiln.ir.types import from_numpy_dtype
from tests.codegen.util import check_graph_kernels

rng = np.random.default_rng(0)
IMAX, IMIN = 2 ** 63 - 1, -(2 ** 63)
class Const:
    """An operand given as a graph constant (not a kernel input)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)


def check_op(op: str, args: Sequence[np.ndarray | Const | None], attrs: dict | None = None, *,
             n_out: int = 1, kind: str | None = None):
    """One-node graph ``op(args)``: lower, schedule, run and compare; returns the kernel."""
    g = ir.Graph("g")
    values, feeds = [], {}
    for i, a in enumerate(args):
        if a is None:
            values.append(None)
        elif isinstance(a, Const):
            values.append(g.add_constant(a.array, f"c{i}"))
        else:
            a = np.asarray(a)
            values.append(g.add_input(f"x{i}", ir.TensorType(from_numpy_dtype(a.dtype), a.shape)))
            feeds[f"x{i}"] = a
    node = g.add_node(op, values, attrs or {}, out_names=[f"y{i}" for i in range(n_out)])
    g.set_outputs(node.outputs)
    (kernel,) = check_graph_kernels(ir.print_graph(g), feeds)
    if kind is not None:
        assert kernel.kind == kind
    return kernel


def rnd(*shape, dtype=np.float32):
    if np.dtype(dtype).kind in "iu":
        lo = -50 if np.dtype(dtype).kind == "i" else 0
        return rng.integers(lo, 50, size=shape).astype(dtype)
    if np.dtype(dtype).kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.standard_normal(shape).astype(dtype)


def _module_ops(module: str) -> set[str]:
    return {name for name, o in all_ops().items() if o.reference.__module__ == module}


@pytest.mark.parametrize("module", ["kiln.ir.ops.tensor", "kiln.ir.ops.nn"])
def test_every_op_of_the_family_has_a_lowering(module):
    ops = _module_ops(module)
    assert ops
    assert sorted(o for o in ops if ir.get_op(o).lower_tvm is None) == []


# ------------------------------------------------------------------ reshape family


@pytest.mark.parametrize("shape,target,allowzero", [
    ((2, 3, 4), [6, 4], 0), ((2, 3, 4), [-1], 0), ((2, 3, 4), [0, -1], 0), ((2, 3, 4), [2, 0, 2, 2], 0),
    ((2, 3, 4), [4, -1, 2], 0), ((2, 3, 4), [1, 1, 24], 0), ((), [1, 1], 0),
    ((1, 1), [], 0),
    ((4, 6, 64), [4, 6, 4, 16], 0), ((2, 12, 5), [2, 3, 4, 5], 0),
])
def test_reshape(shape, target, allowzero):
    check_op("reshape", [rnd(*shape)], {"shape": target, "allowzero": allowzero}, kind="injective")


@pytest.mark.parametrize("axis", [0, 1, 3, -1, -3])
def test_flatten(axis):
    check_op("flatten", [rnd(2, 3, 4, dtype=np.int8)], {"axis": axis})


@pytest.mark.parametrize("shape,perm,dtype", [
    ((2, 3), [], np.float32), ((2, 3, 4), [1, 0, 2], np.int64), ((2, 3, 4), [2, 0, 1], np.float32),
    ((2, 3, 4, 5), [0, 3, 1, 2], np.float16), ((2, 3, 4), [], np.bool_), ((1, 8, 16, 8), [0, 2, 1, 3], np.float32),
])
def test_transpose(shape, perm, dtype):
    check_op("transpose", [rnd(*shape, dtype=dtype)], {"perm": perm})


@pytest.mark.parametrize("axes", [[], [0], [-2], [0, 2]])
def test_squeeze(axes):
    check_op("squeeze", [rnd(1, 3, 1, 4)], {"axes": axes})


@pytest.mark.parametrize("shape,axes", [((3, 4), [0]), ((3, 4), [-1]), ((3, 4), [0, 3]),
                                        ((), [0]), ((3,), [2, 0])])
def test_unsqueeze(shape, axes):
    check_op("unsqueeze", [rnd(*shape, dtype=np.int32)], {"axes": axes})


# ------------------------------------------------------------------ concat / split


@pytest.mark.parametrize("shapes,axis", [
    ([(2, 3), (2, 5)], 1), ([(2, 3), (4, 3), (1, 3)], 0), ([(2, 3, 4), (2, 3, 1)], -1),
    ([(3,)], 0), ([(2, 0), (2, 3), (2, 2)], 1), ([(1, 4, 8), (1, 4, 8)], -2),
])
def test_concat(shapes, axis):
    check_op("concat", [rnd(*s) for s in shapes], {"axis": axis})


def test_concat_ints_and_a_constant_operand():
    check_op("concat", [rnd(2, 3, dtype=np.int64), Const(rnd(2, 2, dtype=np.int64))], {"axis": 1})


@pytest.mark.parametrize("shape,axis,sizes", [
    ((6, 4), 0, [2, 4]), ((2, 7), -1, [1, 3, 3]), ((2, 6, 3), 1, [6]), ((4, 5), 1, [2, 0, 3]),
])
def test_split(shape, axis, sizes):
    check_op("split", [rnd(*shape, dtype=np.int16)], {"axis": axis, "split": sizes}, n_out=len(sizes))


# ------------------------------------------------------------------ slice


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [3], [], []), ([0, 1], [2, -1], [0, 1], [1, 2]), ([-1], [IMIN], [1], [-1]), ([5], [0], [1], [-2]),
    ([-100], [100], [2], [3]), ([0, 2], [IMAX, IMAX], [2, -3], [1, 1]), ([3], [1], [0], [1]),
    ([2], [IMAX], [-1], [-1]), ([6], [IMIN], [-1], [-1]), ([1, -2, 0], [-1, 0, 7], [0, 1, 2], [1, -1, 4]),
])
def test_slice(starts, ends, axes, steps):
    check_op("slice", [rnd(4, 6, 7)], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})


# ------------------------------------------------------------------ gather / expand / tile / pad


@pytest.mark.parametrize("xshape,indices,axis,idt", [
    ((5, 3), [[0, -1], [4, 2]], 0, np.int64), ((2, 5, 3), [1, -5, 4], 1, np.int32),
    ((4, 6), 3, -1, np.int64), ((4, 6), [[3]], -1, np.int64), ((3, 4), [[-1]], 1, np.int64), ((10, 8), [[1, 2, 9], [0, 0, -3]], 0, np.int32),
])
def test_gather(xshape, indices, axis, idt):
    check_op("gather", [rnd(*xshape), np.asarray(indices, dtype=idt)], {"axis": axis})


def test_gather_with_constant_indices_and_int_data():
    check_op("gather", [rnd(6, 4, dtype=np.int8), Const(np.array([5, -6, 2], np.int64))], {"axis": 0})


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(axis):
    x = rnd(3, 4, 5)
    dim = x.shape[axis]
    idx = rng.integers(-dim, dim, size=(2, 3, 4)).astype(np.int64)
    check_op("gather_elements", [x, idx], {"axis": axis})


@pytest.mark.parametrize("xshape,shape", [((3, 1), [2, 1, 6]), ((1,), [4]), ((2, 3), [3]), ((4, 1, 2), [1, 5, 1]),
                                          ((), [2, 3])])
def test_expand(xshape, shape):
    check_op("expand", [rnd(*xshape, dtype=np.int32)], {"shape": shape})


@pytest.mark.parametrize("shape,repeats", [((2, 3), [2, 3]), ((3,), [1]), ((1, 2, 3), [4, 1, 2]),
                                           ((2, 2), [0, 2])])
def test_tile(shape, repeats):
    check_op("tile", [rnd(*shape)], {"repeats": repeats})


@pytest.mark.parametrize("mode,pads,value", [
    ("constant", [1, 2, 0, 3], 0.0), ("constant", [0, 0, 2, 1], -1.5), ("constant", [-1, 2, 1, -2], 7.0),
    ("constant", [0, 0, 0, 0], 0.0), ("reflect", [2, 1, 1, 3], 0.0), ("edge", [3, 0, 1, 4], 0.0),
    ("wrap", [2, 5, 3, 1], 0.0),
])
def test_pad(mode, pads, value):
    check_op("pad", [rnd(4, 5)], {"pads": pads, "mode": mode, "value": value})


@pytest.mark.parametrize("dtype,value", [(np.int32, 2.7), (np.uint8, 200.0), (np.bool_, 1.0)])
def test_pad_int_and_bool_value_is_cast(dtype, value):
    check_op("pad", [rnd(2, 3, dtype=dtype)], {"pads": [1, 0, 0, 2], "value": value})


def test_pad_reflect_3d():
    check_op("pad", [rnd(2, 3, 4, dtype=np.int64)], {"pads": [0, 2, 3, 1, 1, 0], "mode": "reflect"})


# ------------------------------------------------------------------ shape, trilu, range


@pytest.mark.parametrize("start,end", [(0, None), (1, None), (-2, None), (0, -1), (1, 3), (3, 1),
                                       (-10, 10)])
def test_shape(start, end):
    attrs = {"start": start} | ({} if end is None else {"end": end})
    check_op("shape", [rnd(2, 3, 4, 5)], attrs)


@pytest.mark.parametrize("upper,k", [(1, 0), (0, 0), (1, 2), (0, -1), (1, -5), (0, 7)])
def test_trilu(upper, k):
    check_op("trilu", [rnd(2, 4, 6)], {"upper": upper, "k": k})


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_trilu_int_and_bool(dtype):
    check_op("trilu", [rnd(5, 3, dtype=dtype)], {"upper": 0, "k": 1})


@pytest.mark.parametrize("start,limit,delta,dtype", [
    (0, 10, 1, "i64"), (10, -3, -3, "i32"), (2.7, 9, 2, "i16"), (0.5, 3.0, 0.25, "f32"), (1, 1, 1, "i64"),
    (-1.0, 2.0, 0.1, "f64"), (0, 100, 7, "f32"),
])
def test_range(start, limit, delta, dtype):
    check_op("range", [], {"start": start, "limit": limit, "delta": delta, "dtype": dtype})


# ------------------------------------------------------------------ argmax / cumsum


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("axis,keepdims,last", [(0, 1, 0), (1, 0, 0), (-1, 1, 1), (2, 0, 1)])
def test_arg_reduce(op, axis, keepdims, last):
    x = rng.integers(-3, 3, size=(3, 4, 17)).astype(np.float32)  # many ties
    check_op(op, [x], {"axis": axis, "keepdims": keepdims, "select_last_index": last}, kind="reduction")


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64, np.float64])
def test_arg_reduce_dtypes(dtype):
    x = rnd(5, 9, dtype=dtype)
    check_op("argmax", [x], {"axis": 1, "keepdims": 0})
    check_op("argmin", [x], {"axis": 0, "select_last_index": 1})


def test_argmax_of_all_minus_inf_rows_is_a_real_index():
    x = np.full((3, 5), -np.inf, np.float32)
    x[1, 3] = 0.0
    check_op("argmax", [x], {"axis": 1})
    check_op("argmax", [x], {"axis": 1, "select_last_index": 1})


@pytest.mark.parametrize("axis,exclusive,reverse", [(0, 0, 0), (1, 1, 0), (-1, 0, 1), (1, 1, 1)])
def test_cumsum(axis, exclusive, reverse):
    check_op("cumsum", [rnd(3, 7, 5)], {"axis": axis, "exclusive": exclusive, "reverse": reverse},
             kind="reduction")


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.float64])
def test_cumsum_dtypes_wrap_like_the_reference(dtype):
    check_op("cumsum", [rnd(4, 40, dtype=dtype) * (3 if np.dtype(dtype).kind in "iu" else 1)],
             {"axis": 1, "exclusive": 1})


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [-3, 0, 2, IMAX, IMIN])
def test_trilu_k_operand(upper, k):
    """k read at run time from a one-value i64 operand."""
    check_op("trilu", [rnd(2, 4, 5), np.array(k, np.int64)], {"upper": upper}, kind="injective")
    check_op("trilu", [rnd(3, 3), np.array([k], np.int64)], {"upper": upper})
