"""Ops of family 'index': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.ir import OpTypeError

from .onnx_single import ONNX_DTYPE, assert_same, check, infer, kdt, run_graph, run_kiln

COVERED = {"arange", "one_hot", "eye_like", "top_k", "scatter_elements", "scatter_nd", "tensor_scatter",
           "depth_to_space", "space_to_depth", "reverse_sequence", "cumprod"}

rng = np.random.default_rng(11)


def rnd(*shape, dtype=np.float32, lo=-20, hi=20):
    if np.dtype(dtype).kind in "iu":
        return rng.integers(max(lo, 0) if np.dtype(dtype).kind == "u" else lo, hi, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def onnx_reference(op_type: str, inputs: list[np.ndarray], opset: int, n_out: int = 1, **attrs) -> list[np.ndarray]:
    """ONNX's own reference implementation of one node (for ops onnxruntime 1.31 lacks)."""
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op_type, names, [f"out{i}" for i in range(n_out)], **attrs)
    vis = [helper.make_tensor_value_info(n, ONNX_DTYPE[kdt(a)], list(a.shape)) for n, a in zip(names, inputs)]
    outs = [helper.make_tensor_value_info(f"out{i}", 0, None) for i in range(n_out)]
    model = helper.make_model(helper.make_graph([node], "g", vis, outs), opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs)))


def test_family_module_imports():
    import kiln.ir.ops.index  # noqa: F401


def test_covered_is_the_family():
    fam = {n for n, d in ir.all_ops().items() if d.reference.__module__ == "kiln.ir.ops.index"}
    assert fam == COVERED


# ------------------------------------------------------------------ arange (run-time Range)

@pytest.mark.parametrize("dtype,start,delta,n", [(np.int64, 3, -2, 7), (np.int32, -5, 3, 4), (np.int16, 0, 1, 9),
                                                 (np.float32, 0.5, 0.25, 11), (np.float64, -1.0, 0.1, 30)])
def test_arange_is_onnx_range(dtype, start, delta, n):
    s, d = np.array(start, dtype), np.array(delta, dtype)
    (y,), (t,) = run_kiln("arange", [s, d], {"length": n})
    assert t == ir.TensorType(kdt(s), (n,))
    limit = np.array(start + n * delta - (delta / 2 if np.dtype(dtype).kind == "f" else 0), dtype)
    node = helper.make_node("Range", ["s", "l", "d"], ["y"])
    (want,) = run_graph([node], {"s": s, "l": limit, "d": d}, {}, [("y", kdt(s))])
    assert_same(y, want)


def test_arange_f16_is_computed_in_f32():
    s, d = np.array(2048, np.float16), np.array(1, np.float16)  # 2048 + 1 is not an f16 accumulation step
    (y,), _ = run_kiln("arange", [s, d], {"length": 4})
    np.testing.assert_array_equal(y, np.array([2048, 2049, 2050, 2051], np.float32).astype(np.float16))


def test_arange_type_rule():
    assert infer("arange", ["i64[]", "i64[]"], length=5)[0] == ir.TensorType("i64", (5,))
    with pytest.raises(OpTypeError, match="scalars"):
        infer("arange", ["i64[1]", "i64[]"], length=5)
    with pytest.raises(OpTypeError, match="share one dtype"):
        infer("arange", ["i64[]", "i32[]"], length=5)
    with pytest.raises(OpTypeError, match="negative"):
        infer("arange", ["f32[]", "f32[]"], length=-1)


# ------------------------------------------------------------------ one_hot / eye_like

def check_one_hot(idx: np.ndarray, values: np.ndarray, depth, axis: int = -1) -> np.ndarray:
    """kiln's one_hot == onnxruntime's OneHot (depth is ONNX's middle input, so built by hand here)."""
    (got,), (t,) = run_kiln("one_hot", [idx, values], {"depth": int(depth), "axis": axis})
    assert ir.TensorType.of(got) == t
    node = helper.make_node("OneHot", ["i", "d", "v"], ["y"], axis=axis)
    try:
        (want,) = run_graph([node], {"i": idx, "d": np.asarray(depth), "v": values}, {}, [("y", kdt(values))])
    except Exception as e:  # noqa: BLE001 - onnxruntime lacks some dtype combinations
        assert "NOT_IMPLEMENTED" in str(e), e
        (want,) = onnx_reference("OneHot", [idx, np.asarray(depth), values], 21, axis=axis)
    assert_same(got, want)
    return got


@pytest.mark.parametrize("idx_dtype", [np.int64, np.int32, np.float32, np.uint8])
@pytest.mark.parametrize("shape,axis", [((3,), -1), ((2, 4), 0), ((2, 4), 1), ((2, 4), -3), ((2, 1, 3), 2)])
def test_one_hot(idx_dtype, shape, axis):
    depth = 5
    idx = rng.integers(-depth - 2, depth + 2, size=shape)
    idx = (np.abs(idx) if np.dtype(idx_dtype).kind == "u" else idx).astype(idx_dtype)
    check_one_hot(idx, np.array([-1.5, 4.0], np.float32), np.array(depth, np.int64), axis)


def test_one_hot_fractional_float_index_selects_nothing():
    idx = np.array([1.0, -2.0, 1.7, -2.2], np.float32)
    y = check_one_hot(idx, np.array([0, 1], np.int64), np.array(4.0, np.float32))
    assert y.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_one_hot_type_rule():
    assert infer("one_hot", ["i64[N,3]", "f16[2]"], depth=7, axis=1)[0] == ir.TensorType("f16", ("N", 7, 3))
    with pytest.raises(OpTypeError, match="off_value, on_value"):
        infer("one_hot", ["i64[3]", "f32[3]"], depth=2)
    with pytest.raises(OpTypeError, match="depth"):
        infer("one_hot", ["i64[3]", "f32[2]"], depth=0)
    with pytest.raises(OpTypeError, match="out of range"):
        infer("one_hot", ["i64[3]", "f32[2]"], depth=2, axis=2)


@pytest.mark.parametrize("shape,k,dtype", [((4, 4), 0, None), ((3, 5), 1, "f32"), ((5, 3), -2, "i64"),
                                           ((2, 6), 7, "f64"), ((3, 3), 0, "i32")])
def test_eye_like(shape, k, dtype):
    attrs = {"k": k} if dtype is None else {"k": k, "dtype": dtype}
    check("eye_like", [rnd(*shape, dtype=np.int32)], attrs)


def test_eye_like_bool():  # onnxruntime has no bool EyeLike
    (y,), _ = run_kiln("eye_like", [rnd(3, 4)], {"k": -1, "dtype": "bool"})
    np.testing.assert_array_equal(y, np.eye(3, 4, k=-1, dtype=bool))


def test_eye_like_type_rule():
    assert infer("eye_like", ["i32[N,3]"], dtype="f32")[0] == ir.TensorType("f32", ("N", 3))
    with pytest.raises(OpTypeError, match="2-D"):
        infer("eye_like", ["f32[3]"])


# ------------------------------------------------------------------ top_k

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.uint8])
@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_top_k(dtype, largest, axis):
    x = rnd(5, 6, 4, dtype=dtype, lo=-3, hi=3)  # integers with many ties: the lower index comes first
    k = 3
    check("top_k", [x], {"k": [k], "axis": axis, "largest": largest})


def test_top_k_ties_and_full_sort():
    x = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 1, 1]], np.int64)
    vals, idx = check("top_k", [x], {"k": [3], "axis": 1})
    assert idx.tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    vals, idx = check("top_k", [x], {"k": [4], "axis": 1, "largest": 0})
    assert idx[2].tolist() == [2, 3, 0, 1]


def test_top_k_unsorted_returns_the_same_set():
    x = rnd(4, 9)
    (v1, i1), _ = run_kiln("top_k", [x], {"k": [4], "sorted": 0})
    want = np.sort(np.argsort(-x, axis=1, kind="stable")[:, :4], axis=1)
    np.testing.assert_array_equal(np.sort(i1, axis=1), want)


def test_top_k_type_rule():
    v, i = infer("top_k", ["f32[N,10]"], k=[3])
    assert (v, i) == (ir.TensorType("f32", ("N", 3)), ir.TensorType("i64", ("N", 3)))
    with pytest.raises(OpTypeError, match="out of range"):
        infer("top_k", ["f32[2,3]"], k=[4])
    with pytest.raises(OpTypeError, match="one value"):
        infer("top_k", ["f32[2,3]"], k=[1, 2])
    with pytest.raises(OpTypeError, match="dtype"):
        infer("top_k", ["bool[2,3]"], k=[1])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 3), st.integers(0, 1))
def test_top_k_is_an_ordered_prefix(n, seed, largest):
    """For all inputs: the values are the best k in order and the indices point at them."""
    x = np.random.default_rng(seed).integers(-3, 3, size=(3, n)).astype(np.float32)
    k = max(1, n // 2)
    (v, i), _ = run_kiln("top_k", [x], {"k": [k], "largest": largest})
    np.testing.assert_array_equal(np.take_along_axis(x, i, axis=1), v)
    srt = -np.sort(-x, axis=1) if largest else np.sort(x, axis=1)
    np.testing.assert_array_equal(v, srt[:, :k])
    same = v[:, 1:] == v[:, :-1]
    assert (i[:, 1:][same] > i[:, :-1][same]).all()


# ------------------------------------------------------------------ scatters

REDUCTIONS = ["none", "add", "mul", "max", "min"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements(reduction, axis):
    data = rnd(4, 5, 3)
    ishape = [2, 3, 2]
    dim = data.shape[axis % 3]
    ishape[axis % 3] = 4 if reduction != "none" else dim - 1
    if reduction == "none":  # distinct targets per line (duplicates are undefined in ONNX)
        idx = np.argsort(rng.random((*ishape[:axis % 3], dim, *ishape[axis % 3 + 1:])), axis=axis % 3)
        idx = np.take(idx, range(ishape[axis % 3]), axis=axis % 3) - dim * (rng.random(ishape) < 0.5)
    else:
        idx = rng.integers(-dim, dim, size=ishape)
    check("scatter_elements", [data, idx.astype(np.int64), rnd(*ishape)], {"axis": axis, "reduction": reduction})


def test_scatter_elements_int_and_int32_indices():
    data = rnd(3, 6, dtype=np.int32)
    idx = rng.integers(0, 6, size=(3, 4)).astype(np.int32)
    check("scatter_elements", [data, idx, rnd(3, 4, dtype=np.int32)], {"axis": 1, "reduction": "add"})


def test_scatter_elements_out_of_range_index_is_an_error():
    with pytest.raises(Exception, match="out of range"):
        run_kiln("scatter_elements", [rnd(2, 3), np.array([[3]], np.int64), rnd(1, 1)], {"axis": 1})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dshape,ishape", [((4, 4, 4), (2, 1)), ((3, 4), (3, 2)), ((5, 3, 2), (2, 2, 2)),
                                           ((6,), (1,))])
def test_scatter_nd(reduction, dshape, ishape):
    q = ishape[-1]
    n = int(np.prod(ishape[:-1]))
    flat = rng.choice(int(np.prod(dshape[:q])), size=n, replace=reduction != "none")  # distinct for none
    idx = np.stack(np.unravel_index(flat, dshape[:q]), axis=-1).reshape(ishape)
    idx = idx - np.array(dshape[:q]) * (rng.random(ishape) < 0.3)
    upd = rnd(*ishape[:-1], *dshape[q:])
    check("scatter_nd", [rnd(*dshape), idx.astype(np.int64), upd], {"reduction": reduction})


def test_scatter_type_rules():
    assert infer("scatter_nd", ["f32[4,5,6]", "i64[N,2]", "f32[N,6]"])[0] == ir.TensorType("f32", (4, 5, 6))
    with pytest.raises(OpTypeError, match="updates"):
        infer("scatter_nd", ["f32[4,5,6]", "i64[3,2]", "f32[3,5]"])
    with pytest.raises(OpTypeError, match="reduction"):
        infer("scatter_nd", ["f32[4]", "i64[1,1]", "f32[1]"], reduction="sum")
    with pytest.raises(OpTypeError, match="i32 or i64"):
        infer("scatter_elements", ["f32[4]", "f32[2]", "f32[2]"])
    with pytest.raises(OpTypeError, match="share one shape"):
        infer("scatter_elements", ["f32[4,2]", "i64[2,2]", "f32[2,1]"])


@pytest.mark.parametrize("mode", ["linear", "circular"])
@pytest.mark.parametrize("axis", [-2, 1, 3])
def test_tensor_scatter(mode, axis):
    past = rnd(3, 5, 2, 6)
    ax = axis % 4
    ushape = list(past.shape)
    ushape[ax] = 2
    length = past.shape[ax]
    wi = rng.integers(0, length - 1 if mode == "linear" else 2 * length, size=3).astype(np.int64)
    args = [past, rnd(*ushape), wi]
    (got,), _ = run_kiln("tensor_scatter", args, {"axis": axis, "mode": mode})
    (want,) = onnx_reference("TensorScatter", args, 24, axis=axis, mode=mode)
    assert_same(got, want)


def test_tensor_scatter_without_write_indices_and_type_rule():
    past, upd = rnd(2, 4, 3), rnd(2, 3, 3)
    (got,), _ = run_kiln("tensor_scatter", [past, upd], {"axis": 1})
    np.testing.assert_array_equal(got, np.concatenate([upd, past[:, 3:]], axis=1))
    with pytest.raises(OpTypeError, match="batch"):
        infer("tensor_scatter", ["f32[2,4]", "f32[2,4]"], axis=0)
    with pytest.raises(OpTypeError, match="longer"):
        infer("tensor_scatter", ["f32[2,4,3]", "f32[2,5,3]"], axis=1)
    with pytest.raises(OpTypeError, match="write_indices"):
        infer("tensor_scatter", ["f32[2,4,3]", "f32[2,1,3]", "i32[2]"], axis=1)


def test_tensor_scatter_linear_overflow_is_an_error():
    with pytest.raises(Exception, match="leave the cache"):
        run_kiln("tensor_scatter", [rnd(1, 4, 2), rnd(1, 2, 2), np.array([3], np.int64)], {"axis": 1})


# ------------------------------------------------------------------ depth_to_space / space_to_depth

@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize("b", [1, 2, 3])
def test_depth_to_space(mode, b):
    check("depth_to_space", [rnd(2, 2 * b * b, 3, 2)], {"blocksize": b, "mode": mode})


@pytest.mark.parametrize("b", [1, 2, 3])
def test_space_to_depth_dcr_vs_onnxruntime(b):
    x = rnd(2, 3, 2 * b, 3 * b)
    (got,), _ = run_kiln("space_to_depth", [x], {"blocksize": b})
    node = helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=b)  # opset 21: no mode (DCR)
    (want,) = run_graph([node], {"x": x}, {}, [("y", "f32")])
    assert_same(got, want)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_space_to_depth_modes_vs_onnx_reference(mode):
    x = rnd(1, 2, 4, 6)
    (got,), _ = run_kiln("space_to_depth", [x], {"blocksize": 2, "mode": mode})
    (want,) = onnx_reference("SpaceToDepth", [x], 28, blocksize=2, mode=mode)
    assert_same(got, want)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.sampled_from(["DCR", "CRD"]))
def test_space_to_depth_inverts_depth_to_space(b, c, hw, mode):
    x = rng.standard_normal((1, c, hw * b, (hw + 1) * b)).astype(np.float32)
    (packed,), _ = run_kiln("space_to_depth", [x], {"blocksize": b, "mode": mode})
    (back,), _ = run_kiln("depth_to_space", [packed], {"blocksize": b, "mode": mode})
    np.testing.assert_array_equal(back, x)


def test_depth_space_type_rules():
    assert infer("depth_to_space", ["f32[N,8,H,W]"], blocksize=2)[0] == ir.TensorType("f32", ("N", 2, "2*H", "2*W"))
    assert infer("space_to_depth", ["f32[N,3,4,6]"], blocksize=2)[0] == ir.TensorType("f32", ("N", 12, 2, 3))
    with pytest.raises(OpTypeError, match="multiple"):
        infer("depth_to_space", ["f32[1,6,2,2]"], blocksize=2)
    with pytest.raises(OpTypeError, match="multiples"):
        infer("space_to_depth", ["f32[1,6,3,2]"], blocksize=2)
    with pytest.raises(OpTypeError, match="mode"):
        infer("space_to_depth", ["f32[1,6,2,2]"], blocksize=2, mode="RCD")


# ------------------------------------------------------------------ reverse_sequence, cumprod

@pytest.mark.parametrize("time_axis,batch_axis,shape", [(0, 1, (4, 3, 2)), (1, 0, (3, 5)), (0, 1, (5, 4))])
def test_reverse_sequence(time_axis, batch_axis, shape):
    lens = rng.integers(0, shape[time_axis] + 1, size=shape[batch_axis]).astype(np.int64)
    check("reverse_sequence", [rnd(*shape), lens], {"time_axis": time_axis, "batch_axis": batch_axis})


def test_reverse_sequence_type_rule():
    with pytest.raises(OpTypeError, match="0 and 1"):
        infer("reverse_sequence", ["f32[3,4,5]", "i64[4]"], time_axis=0, batch_axis=2)
    with pytest.raises(OpTypeError, match="one per batch"):
        infer("reverse_sequence", ["f32[3,4]", "i64[3]"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumprod_vs_onnx_reference(dtype, exclusive, reverse, axis):
    x = rnd(3, 4, dtype=dtype, lo=-3, hi=4)
    (got,), _ = run_kiln("cumprod", [x], {"axis": axis, "exclusive": exclusive, "reverse": reverse})
    (want,) = onnx_reference("CumProd", [x, np.array(axis, np.int64)], 26, exclusive=exclusive, reverse=reverse)
    assert_same(got, want)


def test_cumprod_type_rule():
    assert infer("cumprod", ["f32[N,4]"], axis=1)[0] == ir.TensorType("f32", ("N", 4))
    with pytest.raises(OpTypeError, match="dtype"):
        infer("cumprod", ["i8[3]"], axis=0)
    with pytest.raises(OpTypeError, match="out of range"):
        infer("cumprod", ["f32[3]"], axis=1)


# ------------------------------------------------------------------ ONNX lowering of ops without a spelling

def _lowered(op: str, inputs: list[np.ndarray], attrs: dict, opset: int = 23) -> list[np.ndarray]:
    """The one-node graph lowered to ONNX at ``opset`` (decomposed where needed), run in onnxruntime."""
    from kiln.frontend import lower_to_onnx

    g = ir.Graph("g")
    vals = [g.add_input(f"x{i}", ir.TensorType.of(a)) for i, a in enumerate(inputs)]
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    model = lower_to_onnx(g, opset=opset)
    model.ir_version = 10
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {f"x{i}": a for i, a in enumerate(inputs)})


@pytest.mark.parametrize("dtype", [np.int64, np.float32, np.float16])
def test_arange_lowers_to_onnx(dtype):
    args = [np.array(2, dtype), np.array(3, dtype)]
    (want,), _ = run_kiln("arange", args, {"length": 6})
    (got,) = _lowered("arange", args, {"length": 6})
    assert_same(got, want)


@pytest.mark.parametrize("exclusive,reverse", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_cumprod_lowers_to_onnx_before_opset_26(exclusive, reverse):
    x = rnd(2, 5, 3, dtype=np.int64, lo=-3, hi=4)
    attrs = {"axis": 1, "exclusive": exclusive, "reverse": reverse}
    (want,), _ = run_kiln("cumprod", [x], attrs)
    (got,) = _lowered("cumprod", [x], attrs)
    assert_same(got, want)
