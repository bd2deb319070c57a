"""Shape and data-movement ops: references vs onnxruntime, type rules vs the references' shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper

from kiln.ir import OpTypeError, TensorType

from .onnx_single import T, assert_same, check, infer, run_graph, run_kiln

COVERED = {"reshape", "flatten", "transpose", "squeeze", "unsqueeze", "concat", "split", "slice", "gather",
           "gather_elements", "expand", "tile", "pad", "shape", "trilu", "range", "argmax", "argmin", "cumsum"}

rng = np.random.default_rng(1)
IMAX, IMIN = 2 ** 63 - 1, -(2 ** 63)


def rnd(*shape, dtype=np.float32):
    if np.dtype(dtype).kind in "iu":
        return rng.integers(-20 if np.dtype(dtype).kind == "i" else 0, 20, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ reshape family

@pytest.mark.parametrize("shape,target,allowzero", [
    ((2, 3, 4), [6, 4], 0), ((2, 3, 4), [-1], 0), ((2, 3, 4), [0, -1], 0), ((2, 3, 4), [2, 0, 2, 2], 0),
    ((2, 3, 4), [4, -1, 2], 0), ((2, 3, 4), [1, 1, 24], 0), ((0, 3), [3, 0], 1), ((0, 3), [-1, 0], 0), ((0, 3), [3, -1], 0),
    ((), [1, 1], 0), ((1, 1), [], 0),
])
def test_reshape(shape, target, allowzero):
    check("reshape", [rnd(*shape)], {"shape": target, "allowzero": allowzero})


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_flatten(axis):
    check("flatten", [rnd(2, 3, 4)], {"axis": axis})


@pytest.mark.parametrize("shape,perm", [((2, 3), []), ((2, 3, 4), [1, 0, 2]), ((2, 3, 4), [2, 0, 1]),
                                        ((2, 3, 4, 5), [0, 3, 1, 2]), ((2, 3, 4), [])])
def test_transpose(shape, perm):
    check("transpose", [rnd(*shape, dtype=np.int64)], {"perm": perm})


@pytest.mark.parametrize("axes", [[], [0], [-2], [0, 2], [2, -4]])
def test_squeeze(axes):
    check("squeeze", [rnd(1, 3, 1, 4)], {"axes": axes})


@pytest.mark.parametrize("shape,axes", [((3, 4), [0]), ((3, 4), [-1]), ((3, 4), [0, 3]), ((3, 4), [1, -1]),
                                        ((), [0]), ((3,), [2, 0])])
def test_unsqueeze(shape, axes):
    check("unsqueeze", [rnd(*shape)], {"axes": axes})


# ------------------------------------------------------------------ concat / split

@pytest.mark.parametrize("shapes,axis", [([(2, 3), (4, 3)], 0), ([(2, 3), (2, 1), (2, 5)], 1),
                                         ([(2, 3, 1), (2, 3, 2)], -1), ([(3,)], 0), ([(2, 0), (2, 3)], 1)])
def test_concat(shapes, axis):
    check("concat", [rnd(*s, dtype=np.int32) for s in shapes], {"axis": axis})


@pytest.mark.parametrize("shape,axis,sizes", [((5, 3), 0, [1, 4]), ((2, 5), -1, [2, 2, 1]), ((6,), 0, [6]),
                                              ((2, 3, 4), 1, [1, 1, 1])])
def test_split(shape, axis, sizes):
    outs = check("split", [rnd(*shape)], {"axis": axis, "split": sizes})
    assert len(outs) == len(sizes)


# ------------------------------------------------------------------ slice

SLICES = [
    ((10,), {"starts": [2], "ends": [8]}),
    ((10,), {"starts": [-3], "ends": [IMAX]}),
    ((10,), {"starts": [8], "ends": [2], "steps": [-1]}),
    ((10,), {"starts": [-1], "ends": [IMIN], "steps": [-1]}),
    ((10,), {"starts": [IMAX], "ends": [IMIN], "steps": [-3]}),
    ((10,), {"starts": [20], "ends": [30]}),
    ((10,), {"starts": [-20], "ends": [3]}),
    ((10,), {"starts": [7], "ends": [3]}),
    ((10,), {"starts": [1], "ends": [-1], "steps": [3]}),
    ((10,), {"starts": [9], "ends": [-11], "steps": [-2]}),
    ((10,), {"starts": [0], "ends": [-1], "steps": [-1]}),
    ((4, 6), {"starts": [1], "ends": [5], "axes": [1]}),
    ((4, 6), {"starts": [0, 5], "ends": [IMAX, 0], "axes": [-2, 1], "steps": [2, -2]}),
    ((4, 6, 3), {"starts": [-1, 1], "ends": [-5, 3], "axes": [2, 0], "steps": [-1, 1]}),
    ((0, 3), {"starts": [0], "ends": [2], "axes": [1]}),
]


@pytest.mark.parametrize("shape,attrs", SLICES)
def test_slice(shape, attrs):
    check("slice", [rnd(*shape, dtype=np.int64)], attrs)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 7), st.integers(-10, 10) | st.sampled_from([IMAX, IMIN]),
       st.integers(-10, 10) | st.sampled_from([IMAX, IMIN]), st.integers(-4, 4).filter(bool))
def test_slice_1d_clamping_vs_onnxruntime(dim, start, end, step):
    assume(not (end == IMAX and step < 0))  # onnxruntime deviates there; see test_slice_int64_max_end_backwards
    check("slice", [np.arange(dim, dtype=np.int64)], {"starts": [start], "ends": [end], "steps": [step]})


def test_slice_int64_max_end_backwards():
    # The ONNX spec clamps an end of INT64_MAX into [-1, dim-1] for negative steps, so x[0:INT64_MAX:-1]
    # is empty (as numpy, and onnx.reference, say); onnxruntime 1.31 instead reads INT64_MAX as "no end"
    # and returns [x0]. kiln follows the spec.
    (y,), _ = run_kiln("slice", [np.arange(3)], {"starts": [0], "ends": [IMAX], "steps": [-1]})
    assert y.size == 0
    (y,), _ = run_kiln("slice", [np.arange(3)], {"starts": [2], "ends": [IMAX], "steps": [-1]})
    assert y.size == 0


def test_slice_differs_from_python_where_onnx_says_so():
    # negative step: ONNX clamps the start into [0, dim-1], Python slicing gives an empty result
    x = np.arange(4)
    (y,), _ = run_kiln("slice", [x], {"starts": [-9], "ends": [IMIN], "steps": [-1]})
    np.testing.assert_array_equal(y, [0])
    assert x[-9::-1].size == 0


# ------------------------------------------------------------------ gather / expand / tile / pad

@pytest.mark.parametrize("shape,idx,axis", [
    ((5, 3), np.array([0, 4, -1, 2]), 0), ((5, 3), np.array([[0, -3], [2, 1]]), 1),
    ((2, 3, 4), np.array(-2), -1), ((2, 3, 4), np.array([1, 1, 0]), 1), ((4,), np.zeros((2, 0), int), 0),
])
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64])
def test_gather(shape, idx, axis, idx_dtype):
    check("gather", [rnd(*shape), idx.astype(idx_dtype)], {"axis": axis})


def test_gather_out_of_range_fails():
    from kiln.ir import InterpretError
    with pytest.raises(InterpretError, match="out of range"):
        run_kiln("gather", [rnd(3), np.array([3])], {})


@pytest.mark.parametrize("shape,idx,axis", [
    ((3, 3), np.array([[1, 2, 0], [2, 0, -1]]), 0), ((3, 4), np.array([[0, 3], [-1, 1], [2, 2]]), 1),
    ((2, 3, 2), np.array([[[0], [1]]]), -2), ((3, 3), np.array([[1], [2]]), 1),
])
def test_gather_elements(shape, idx, axis):
    check("gather_elements", [rnd(*shape), idx.astype(np.int64)], {"axis": axis})


@pytest.mark.parametrize("shape,target", [((3, 1), [2, 1, 4]), ((1,), [3]), ((2, 3), [1, 1]), ((3, 1), [3, 4]),
                                          ((), [2, 2]), ((2, 1), [0, 1, 1])])
def test_expand(shape, target):
    check("expand", [rnd(*shape)], {"shape": target})


@pytest.mark.parametrize("shape,reps", [((2, 3), [2, 1]), ((2, 3), [1, 3]), ((3,), [0]), ((2, 1, 2), [2, 3, 1])])
def test_tile(shape, reps):
    check("tile", [rnd(*shape, dtype=np.int32)], {"repeats": reps})


@pytest.mark.parametrize("shape,pads,mode,value", [
    ((3, 4), [1, 2, 0, 1], "constant", 0.0), ((3, 4), [0, 0, 2, 3], "constant", -1.5),
    ((3, 4), [-1, 1, 0, -2], "constant", 7.0), ((3, 4), [2, 1, 1, 3], "reflect", 0.0),
    ((3, 4), [2, 1, 1, 3], "edge", 0.0), ((3, 4), [2, 5, 1, 3], "wrap", 0.0), ((2, 3, 4), [0, 1, 1, 1, 0, 2], "reflect", 0.0),
    ((5,), [4, 4], "reflect", 0.0),
])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_pad(shape, pads, mode, value, dtype):
    check("pad", [rnd(*shape, dtype=dtype)], {"pads": pads, "mode": mode, "value": value})


# ------------------------------------------------------------------ shape, trilu, range

@pytest.mark.parametrize("start,end", [(0, None), (1, None), (-2, None), (0, -1), (-10, 10), (2, 1), (3, None)])
def test_shape(start, end):
    attrs = {"start": start} | ({} if end is None else {"end": end})
    check("shape", [rnd(2, 3, 4)], attrs)


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [-1, 0, 2, 9, -9])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 3)])
def test_trilu(upper, k, shape):
    check("trilu", [rnd(*shape)], {"upper": upper, "k": k})


@pytest.mark.parametrize("upper", [0, 1])
@pytest.mark.parametrize("k", [-4, -1, 0, 2, 7, IMAX, IMIN])
def test_trilu_k_operand(upper, k):
    """k as ONNX Trilu's input 1, read at run time: the same result as the attribute."""
    x = rnd(2, 3, 5)
    (y,), _ = run_kiln("trilu", [x, np.array(k, np.int64)], {"upper": upper})
    (want,), _ = run_kiln("trilu", [x], {"upper": upper, "k": k})
    assert_same(y, want)
    want_ort = run_graph([helper.make_node("Trilu", ["x", "k"], ["y"], upper=upper)],
                         {"x": x, "k": np.array(k, np.int64)}, {}, [("y", "f32")])[0]
    assert_same(y, want_ort)
    with pytest.raises(OpTypeError, match="k operand must be one i64 value"):
        infer("trilu", ["f32[3,3]", "i32[]"])
    with pytest.raises(OpTypeError, match="nonzero attribute"):
        infer("trilu", ["f32[3,3]", "i64[1]"], k=1)


@pytest.mark.parametrize("start,limit,delta,dtype", [
    (0, 10, 3, "i64"), (10, 0, -3, "i32"), (5, 5, 1, "i64"), (0, -4, 1, "i16"), (0.5, 3.7, 0.3, "f32"),
    (-1.25, 2.0, 0.1, "f32"), (1.0, -1.0, -0.25, "f64"), (0.1, 10.0, 0.7, "f64"),
])
def test_range(start, limit, delta, dtype):
    # range has no ONNX spelling (the lifter folds Range), so build ONNX Range over constant operands
    from onnx import helper

    from .onnx_single import ONNX_DTYPE  # noqa: F401
    attrs = {"start": start, "limit": limit, "delta": delta, "dtype": dtype}
    (y,), (t,) = run_kiln("range", [], attrs)
    assert TensorType.of(y) == t
    npdt = TensorType(dtype, ()).np_dtype
    consts = {n: np.array(v, dtype=npdt) for n, v in zip(("s", "l", "d"), (start, limit, delta))}
    (want,) = run_graph([helper.make_node("Range", ["s", "l", "d"], ["y"])], {}, consts, [("y", dtype)])
    assert_same(y, want, rtol=0, atol=0, what="range")


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("last", [0, 1])
def test_arg_reductions(op, axis, keepdims, last):
    x = rng.integers(0, 3, size=(3, 4)).astype(np.int32)  # many ties
    check(op, [x], {"axis": axis, "keepdims": keepdims, "select_last_index": last})
    check(op, [rnd(2, 3, 4)], {"axis": axis, "keepdims": keepdims, "select_last_index": last})


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_cumsum(axis, exclusive, reverse, dtype):
    check("cumsum", [rnd(3, 4, dtype=dtype)], {"axis": axis, "exclusive": exclusive, "reverse": reverse})


# ------------------------------------------------------------------ type rules vs reference shapes (properties)

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@settings(max_examples=100, deadline=None)
@given(shapes, st.data())
def test_reshape_rule_agrees_with_reference(shape, data):
    n = int(np.prod(shape))
    target = list(data.draw(st.lists(st.integers(-1, 6), min_size=0, max_size=4)))
    allowzero = data.draw(st.integers(0, 1))
    x = np.arange(n, dtype=np.int32).reshape(shape)
    try:
        (t,) = infer("reshape", [TensorType.of(x)], shape=target, allowzero=allowzero)
    except OpTypeError:
        # the rule refused: then the reference must fail too (or the ONNX semantics forbid it)
        resolved = [shape[i] if (v == 0 and not allowzero and i < len(shape)) else v for i, v in enumerate(target)]
        if any(v == 0 and not allowzero and i >= len(shape) for i, v in enumerate(target)) or resolved.count(-1) > 1:
            return
        with pytest.raises(ValueError):
            np.reshape(x, resolved)
        return
    (y,), _ = run_kiln("reshape", [x], {"shape": target, "allowzero": allowzero})
    assert TensorType.of(y) == t
    np.testing.assert_array_equal(y.ravel(), x.ravel())


@settings(max_examples=60, deadline=None)
@given(shapes.filter(lambda s: len(s) > 0), st.data())
def test_transpose_rule_agrees_with_reference(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    x = np.arange(int(np.prod(shape))).reshape(shape)
    (y,), (t,) = run_kiln("transpose", [x], {"perm": list(perm)})
    assert TensorType.of(y) == t
    np.testing.assert_array_equal(y, np.transpose(x, perm))


@settings(max_examples=80, deadline=None)
@given(shapes.filter(lambda s: len(s) > 0), st.data())
def test_slice_rule_and_reference_vs_onnxruntime(shape, data):
    r = len(shape)
    axes = data.draw(st.lists(st.integers(-r, r - 1), min_size=1, max_size=r, unique_by=lambda a: a % r))
    k = len(axes)
    ends_ = st.integers(-6, 6) | st.sampled_from([IMAX, IMIN])
    starts = data.draw(st.lists(ends_, min_size=k, max_size=k))
    ends = data.draw(st.lists(ends_, min_size=k, max_size=k))
    steps = data.draw(st.lists(st.integers(-3, 3).filter(bool), min_size=k, max_size=k))
    assume(not any(e == IMAX and st_ < 0 for e, st_ in zip(ends, steps)))  # see below
    x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    check("slice", [x], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})  # rule, reference, ORT


@settings(max_examples=60, deadline=None)
@given(shapes, st.data())
def test_squeeze_unsqueeze_round_trip(shape, data):
    x = np.zeros(shape)
    r = len(shape) + 1
    axes = data.draw(st.lists(st.integers(-r, r - 1), min_size=1, max_size=1))
    (y,), (t,) = run_kiln("unsqueeze", [x], {"axes": axes})
    assert TensorType.of(y) == t and y.ndim == x.ndim + 1
    (z,), (u,) = run_kiln("squeeze", [y], {"axes": axes})
    assert z.shape == x.shape and u == TensorType.of(x)


# ------------------------------------------------------------------ symbolic dims and errors

def test_symbolic_dims_flow():
    assert infer("reshape", ["f32[N,3,4]"], shape=[0, -1]) == [T("f32[N,12]")]
    assert infer("reshape", ["f32[N,12]"], shape=[-1, 3, 4]) == [T("f32[N,3,4]")]
    assert infer("reshape", ["f32[B,S,64]"], shape=[0, 0, 8, 8]) == [T("f32[B,S,8,8]")]
    assert infer("flatten", ["f32[N,3,4]"]) == [T("f32[N,12]")]
    assert infer("flatten", ["f32[N,3,4]"], axis=2) == [T("f32[3*N,4]")]
    assert infer("transpose", ["f32[B,S,H]"], perm=[0, 2, 1]) == [T("f32[B,H,S]")]
    assert infer("squeeze", ["f32[N,1,4]"], axes=[1]) == [T("f32[N,4]")]
    assert infer("unsqueeze", ["f32[N,4]"], axes=[1, -1]) == [T("f32[N,1,4,1]")]
    assert infer("concat", ["f32[N,2]", "f32[N,3]"], axis=1) == [T("f32[N,5]")]
    assert infer("concat", ["f32[N,2]", "f32[N,2]", "f32[2*N,2]"], axis=0) == [T("f32[4*N,2]")]
    assert infer("split", ["f32[N,6]"], axis=1, split=[2, 4]) == [T("f32[N,2]"), T("f32[N,4]")]
    assert infer("slice", ["f32[N,6]"], starts=[1], ends=[3], axes=[1]) == [T("f32[N,2]")]
    assert infer("slice", ["f32[N,6]"], starts=[0], ends=[IMAX], axes=[0]) == [T("f32[N,6]")]
    assert infer("gather", ["f32[V,D]", "i64[B,S]"]) == [T("f32[B,S,D]")]
    assert infer("gather", ["f32[B,S,D]", "i64[]"], axis=1) == [T("f32[B,D]")]
    assert infer("gather_elements", ["f32[N,4]", "i64[N,2]"], axis=1) == [T("f32[N,2]")]
    assert infer("expand", ["f32[N,1]"], shape=[1, 5]) == [T("f32[N,5]")]
    assert infer("tile", ["f32[N,3]"], repeats=[2, 1]) == [T("f32[2*N,3]")]
    assert infer("pad", ["f32[N,3]"], pads=[0, 1, 0, 2]) == [T("f32[N,6]")]
    assert infer("shape", ["f32[N,3,S]"]) == [T("i64[3]")]
    assert infer("trilu", ["f32[B,S,S]"]) == [T("f32[B,S,S]")]
    assert infer("argmax", ["f32[N,10]"], axis=1, keepdims=0) == [T("i64[N]")]
    assert infer("cumsum", ["f32[N,10]"], axis=0) == [T("f32[N,10]")]


@pytest.mark.parametrize("op,types,attrs,match", [
    ("reshape", ["f32[2,3]"], {"shape": [4, 2]}, "cannot reshape"),
    ("reshape", ["f32[2,3]"], {"shape": [-1, -1]}, "more than one -1"),
    ("flatten", ["f32[2,3]"], {"axis": 3}, "out of range"),
    ("transpose", ["f32[2,3,4]"], {"perm": [0, 0, 1]}, "not a permutation"),
    ("transpose", ["f32[2,3,4]"], {"perm": [1, 0]}, "not a permutation"),
    ("squeeze", ["f32[2,1]"], {"axes": [0]}, "not 1"),
    ("squeeze", ["f32[N,1]"], {}, "symbolic"),
    ("squeeze", ["f32[2,1]"], {"axes": [2]}, "out of range"),
    ("unsqueeze", ["f32[2,3]"], {"axes": [0, -4]}, "repeat"),
    ("unsqueeze", ["f32[2,3]"], {"axes": [4]}, "out of range"),
    ("concat", ["f32[2,3]", "f32[3,3]"], {"axis": 1}, "differ in dim 0"),
    ("concat", ["f32[2,3]", "f32[2,3,1]"], {"axis": 0}, "rank"),
    ("concat", ["f32[2,3]", "i32[2,3]"], {"axis": 0}, "dtype"),
    ("concat", ["f32[N,3]", "f32[2,3]"], {"axis": 0}, "static"),
    ("split", ["f32[5,3]"], {"split": [2, 2]}, "sum to 4"),
    ("split", ["f32[N,3]"], {"split": [2, 2]}, "symbolic"),
    ("slice", ["f32[5,3]"], {"starts": [0], "ends": [1, 2]}, "equal lengths"),
    ("slice", ["f32[5,3]"], {"starts": [0], "ends": [1], "steps": [0]}, "not be 0"),
    ("slice", ["f32[5,3]"], {"starts": [0, 0], "ends": [1, 1], "axes": [0, -2]}, "repeat"),
    ("slice", ["f32[N,3]"], {"starts": [1], "ends": [IMAX]}, "static"),
    ("gather", ["f32[5,3]", "f32[2]"], {}, "i32 or i64"),
    ("gather", ["f32[5,3]", "i64[2]"], {"axis": 2}, "out of range"),
    ("gather_elements", ["f32[5,3]", "i64[2]"], {}, "rank"),
    ("expand", ["f32[3,2]"], {"shape": [4, 1]}, "broadcast"),
    ("tile", ["f32[3,2]"], {"repeats": [2]}, "one per dim"),
    ("pad", ["f32[3,2]"], {"pads": [1, 1]}, "need 4"),
    ("pad", ["f32[3,2]"], {"pads": [0, 3, 0, 0], "mode": "reflect"}, "pads < dim"),
    ("pad", ["f32[3,2]"], {"pads": [0, 1, 0, 0], "mode": "mirror"}, "mode"),
    ("pad", ["f32[N,2]"], {"pads": [1, 0, 0, 0]}, "symbolic"),
    ("trilu", ["f32[3]"], {}, "rank >= 2"),
    ("range", [], {"start": 0.0, "limit": 3.0, "delta": 0.0, "dtype": "i64"}, "delta"),
    ("range", [], {"start": 0.0, "limit": 3.0, "delta": 1.0, "dtype": "u8"}, "dtype"),
    ("argmax", ["f32[3,2]"], {"axis": -3}, "out of range"),
    ("cumsum", ["bool[3]"], {"axis": 0}, "dtype"),
    ("cumsum", ["f32[3]"], {"axis": 1}, "out of range"),
])
def test_type_errors(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer(op, types, **attrs)
    assert str(e.value).startswith(f"{op}:")


def test_range_by_hand():
    (y,), _ = run_kiln("range", [], {"start": 1, "limit": 10, "delta": 4, "dtype": "i64"})
    np.testing.assert_array_equal(y, np.array([1, 5, 9], np.int64))


def test_gather_elements_indices_may_not_outgrow_the_data_off_the_axis():
    """Fuzzer finding: the type rule accepted indices wider than the data off the axis; the reference raised."""
    with pytest.raises(OpTypeError, match="dim 0 .* exceeds"):
        infer("gather_elements", [TensorType("f32", (1, 3)), TensorType("i64", (2, 3))], axis=1)
    assert infer("gather_elements", [TensorType("f32", (1, 3)), TensorType("i64", (1, 5))], axis=1)[0].shape == (1, 5)
