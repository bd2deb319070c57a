"""Lifting the 'index' family's ONNX ops: converters of frontend/lift_index.py and the generic ones.

Each model is lifted, interpreted and compared with onnxruntime (or ONNX's reference evaluator for
opsets onnxruntime 1.31 lacks); ops whose output shape depends on run-time values are refused with
a reason that says so.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.frontend import lift, lower_to_onnx
from kiln.frontend.errors import DynamicShapeError, UnsupportedOpsError

from .conftest import assert_close, make_model, ort_run, vi

F32, I64 = np.float32, np.int64
rng = np.random.default_rng(3)
n = helper.make_node


def _check(model, feeds, *, reference: bool = False, round_trip: bool = True):
    """Lift, interpret, compare with onnxruntime (or ONNX's reference); lower back and compare again."""
    graph = lift(model)
    ours = ir.interpret(graph, feeds)
    theirs = ReferenceEvaluator(model).run(None, feeds) if reference else ort_run(model, feeds)
    for o, want in zip(model.graph.output, theirs):
        assert_close(ours[o.name], np.asarray(want))
    if round_trip:
        lowered = lower_to_onnx(graph)
        lowered.ir_version = 10
        for got, want in zip(ort_run(lowered, feeds), theirs):
            assert_close(got, np.asarray(want))
    return graph


# ------------------------------------------------------------------ Range

def test_range_of_constants_folds():
    inits = {"s": np.array(1.5, F32), "l": np.array(7.0, F32), "d": np.array(0.75, F32)}
    model = make_model([n("Range", ["s", "l", "d"], ["y"])], [], [vi("y", F32, None)], inits, opset=21)
    graph = lift(model)
    assert graph.nodes == []
    assert_close(ir.interpret(graph, {})["y"], np.arange(1.5, 7.0, 0.75, dtype=F32))


def test_range_with_run_time_start_and_static_length_is_arange():
    """Range(p, p + 5, 2) over a run-time position p: length 3 is static, the values are not."""
    model = make_model([n("Add", ["p", "five"], ["lim"]), n("Range", ["p", "lim", "two"], ["y"])],
                       [vi("p", I64, [])], [vi("y", I64, [3])],
                       {"five": np.array(5, I64), "two": np.array(2, I64)}, opset=21)
    graph = _check(model, {"p": np.array(-4, I64)}, round_trip=True)
    assert "arange" in graph.op_counts()


def test_range_with_run_time_limit_is_refused_naming_the_input():
    model = make_model([n("Range", ["s", "l", "d"], ["y"])], [vi("l", I64, [])], [vi("y", I64, None)],
                       {"s": np.array(0, I64), "d": np.array(1, I64)}, opset=21)
    with pytest.raises(DynamicShapeError, match="input 1 .limit. is computed at run time"):
        lift(model)


# ------------------------------------------------------------------ TopK, OneHot, Scatter (old opsets)

@pytest.mark.parametrize("opset", [9, 11])
def test_top_k_old_and_new_spelling(opset):
    x = rng.standard_normal((3, 7)).astype(F32)
    if opset < 10:
        model = make_model([n("TopK", ["x"], ["v", "i"], k=3, axis=1)], [vi("x", F32, [3, 7])],
                           [vi("v", F32, [3, 3]), vi("i", I64, [3, 3])], opset=opset)
    else:
        model = make_model([n("TopK", ["x", "k"], ["v", "i"], axis=0, largest=0)], [vi("x", F32, [3, 7])],
                           [vi("v", F32, [2, 7]), vi("i", I64, [2, 7])], {"k": np.array([2], I64)}, opset=opset)
    graph = _check(model, {"x": x})
    assert graph.op_counts() == {"top_k": 1}


def test_one_hot_opset_9_ignores_negative_indices():
    model = make_model([n("OneHot", ["i", "d", "v"], ["y"])], [vi("i", I64, [4])], [vi("y", F32, [4, 3])],
                       {"d": np.array([3], I64), "v": np.array([0, 1], F32)}, opset=9)
    idx = np.array([0, -1, 2, 5], I64)
    graph = lift(model)
    assert ir.interpret(graph, {"i": idx})["y"].tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_scatter_opset_10_is_scatter_elements():
    model = make_model([n("Scatter", ["x", "i", "u"], ["y"], axis=1)],
                       [vi("x", F32, [2, 5]), vi("i", I64, [2, 2]), vi("u", F32, [2, 2])], [vi("y", F32, [2, 5])],
                       opset=10)
    feeds = {"x": rng.standard_normal((2, 5)).astype(F32), "i": np.array([[0, -1], [3, 1]], I64),
             "u": rng.standard_normal((2, 2)).astype(F32)}
    graph = _check(model, feeds, round_trip=False)
    assert graph.op_counts() == {"scatter_elements": 1}


# ------------------------------------------------------------------ Hardmax

@pytest.mark.parametrize("opset,axis,shape", [(13, -1, (3, 4, 5)), (13, 0, (3, 4, 5)), (11, 1, (3, 4, 5)),
                                              (11, 1, (3, 4, 1)), (11, -1, (2, 6))])
def test_hardmax(opset, axis, shape):
    x = rng.integers(-2, 3, size=shape).astype(F32)  # ties: the first maximum wins
    model = make_model([n("Hardmax", ["x"], ["y"], axis=axis)], [vi("x", F32, list(shape))],
                       [vi("y", F32, list(shape))], opset=opset)
    graph = _check(model, {"x": x})
    assert "argmax" in graph.op_counts() and "one_hot" in graph.op_counts()


# ------------------------------------------------------------------ Compress, CenterCropPad

@pytest.mark.parametrize("axis", [None, 0, -1])
def test_compress_with_constant_condition_is_a_gather(axis):
    cond = np.array([True, False, True, True, False])
    attrs = {} if axis is None else {"axis": axis}
    model = make_model([n("Compress", ["x", "c"], ["y"], **attrs)], [vi("x", F32, [5, 5])], [vi("y", F32, None)],
                       {"c": cond}, opset=21)
    graph = _check(model, {"x": rng.standard_normal((5, 5)).astype(F32)})
    assert "gather" in graph.op_counts()


def test_compress_with_run_time_condition_is_refused_with_why():
    model = make_model([n("Compress", ["x", "c"], ["y"], axis=0)], [vi("x", F32, [3, 2]), vi("c", np.bool_, [3])],
                       [vi("y", F32, None)], opset=21)
    with pytest.raises(DynamicShapeError, match="number of true entries of the condition"):
        lift(model)


@pytest.mark.parametrize("shape,target,axes", [((20, 10, 3), [10, 7, 3], None), ((10, 7, 3), [20, 10, 3], None),
                                               ((9, 8, 3), [4, 11], [0, 1]), ((3, 8, 9), [5, 6], [-2, -1])])
def test_center_crop_pad(shape, target, axes):
    attrs = {} if axes is None else {"axes": axes}
    model = make_model([n("CenterCropPad", ["x", "s"], ["y"], **attrs)], [vi("x", F32, list(shape))],
                       [vi("y", F32, None)], {"s": np.array(target, I64)}, opset=18)
    x = rng.standard_normal(shape).astype(F32)
    _check(model, {"x": x}, reference=True)


# ------------------------------------------------------------------ value-dependent shapes

def test_non_zero_and_unique_of_constants_fold():
    c = np.array([[0, 2, 2], [1, 0, 2]], I64)
    model = make_model([n("NonZero", ["c"], ["nz"]), n("Unique", ["c"], ["u", "ui", "inv", "cnt"], sorted=1),
                        n("Add", ["u", "x"], ["y"])], [vi("x", I64, [3])], [vi("nz", I64, None), vi("y", I64, None)],
                       {"c": c}, opset=13)
    graph = lift(model)
    out = ir.interpret(graph, {"x": np.array([10, 20, 30], I64)})
    assert out["nz"].tolist() == [[0, 0, 1, 1], [1, 2, 0, 2]]
    assert out["y"].tolist() == [10, 21, 32]


@pytest.mark.parametrize("op,outs,dtype", [("NonZero", ["y"], I64), ("Unique", ["y", "", "", ""], F32)])
def test_non_zero_and_unique_of_run_time_values_are_refused_with_why(op, outs, dtype):
    model = make_model([n(op, ["x"], outs)], [vi("x", F32, [4])], [vi("y", dtype, None)], opset=13)
    with pytest.raises(UnsupportedOpsError, match="depends on the input's values") as e:
        lift(model)
    assert not isinstance(e.value, DynamicShapeError)  # not a shape operand one could specialize


# ------------------------------------------------------------------ generic spellings

def test_index_ops_lift_generically_and_round_trip():
    """OneHot, EyeLike, ScatterND, ScatterElements, DepthToSpace, SpaceToDepth, ReverseSequence in one model."""
    nodes = [
        n("OneHot", ["i", "depth", "onoff"], ["oh"], axis=0),
        n("EyeLike", ["m"], ["eye"], k=1, dtype=1),
        n("ScatterND", ["data", "nd_idx", "nd_upd"], ["snd"], reduction="add"),
        n("ScatterElements", ["data", "el_idx", "el_upd"], ["sel"], axis=1, reduction="max"),
        n("DepthToSpace", ["img"], ["d2s"], blocksize=2, mode="CRD"),
        n("SpaceToDepth", ["d2s"], ["s2d"], blocksize=2),
        n("ReverseSequence", ["seq", "lens"], ["rev"], time_axis=0, batch_axis=1),
    ]
    inits = {"depth": np.array(4, I64), "onoff": np.array([0.5, 2.0], F32),
             "nd_idx": np.array([[1], [3], [1]], I64), "el_idx": np.array([[0, 3], [2, 2], [1, 0], [3, 3]], I64),
             "lens": np.array([3, 1, 0], I64)}
    ins = [vi("i", I64, [2, 3]), vi("m", F32, [3, 5]), vi("data", F32, [4, 4]), vi("nd_upd", F32, [3, 4]),
           vi("el_upd", F32, [4, 2]), vi("img", F32, [1, 8, 2, 3]), vi("seq", F32, [4, 3, 2])]
    outs = [vi("oh", F32, None), vi("eye", F32, None), vi("snd", F32, None), vi("sel", F32, None),
            vi("s2d", F32, None), vi("rev", F32, None)]
    model = make_model(nodes, ins, outs, inits, opset=18)
    feeds = {"i": np.array([[0, 3, -1], [4, -5, 2]], I64), "m": rng.standard_normal((3, 5)).astype(F32),
             "data": rng.standard_normal((4, 4)).astype(F32), "nd_upd": rng.standard_normal((3, 4)).astype(F32),
             "el_upd": rng.standard_normal((4, 2)).astype(F32), "img": rng.standard_normal((1, 8, 2, 3)).astype(F32),
             "seq": rng.standard_normal((4, 3, 2)).astype(F32)}
    graph = _check(model, feeds)
    assert {"one_hot", "eye_like", "scatter_nd", "scatter_elements", "depth_to_space", "space_to_depth",
            "reverse_sequence"} <= set(graph.op_counts())


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_space_to_depth_opset_28_mode(mode):
    model = make_model([n("SpaceToDepth", ["x"], ["y"], blocksize=2, mode=mode)], [vi("x", F32, [1, 2, 4, 6])],
                       [vi("y", F32, [1, 8, 2, 3])], opset=28)
    _check(model, {"x": rng.standard_normal((1, 2, 4, 6)).astype(F32)}, reference=True, round_trip=False)


def test_cumprod_and_tensor_scatter_new_opsets():
    model = make_model([n("CumProd", ["x", "ax"], ["c"], exclusive=1),
                        n("TensorScatter", ["past", "upd", "w"], ["kv"], mode="circular")],
                       [vi("x", F32, [3, 4]), vi("past", F32, [2, 2, 5, 3]), vi("upd", F32, [2, 2, 2, 3]),
                        vi("w", I64, [2])], [vi("c", F32, None), vi("kv", F32, None)], {"ax": np.array(1, I64)},
                       opset=26)
    feeds = {"x": rng.uniform(-2, 2, (3, 4)).astype(F32), "past": rng.standard_normal((2, 2, 5, 3)).astype(F32),
             "upd": rng.standard_normal((2, 2, 2, 3)).astype(F32), "w": np.array([4, 1], I64)}
    graph = _check(model, feeds, reference=True, round_trip=False)
    assert {"cumprod", "tensor_scatter"} <= set(graph.op_counts())
