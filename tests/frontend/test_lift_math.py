"""Lifting the 'math' family's ONNX ops (generic, from the registry's OnnxSpecs) and lowering them back.

Each model is lifted, interpreted and compared with onnxruntime (or ONNX's reference evaluator for
the opsets onnxruntime 1.31 lacks: Swish-24, BitShift-28), then lowered back to ONNX and run again.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.frontend import lift, lower_to_onnx

from .conftest import assert_close, make_model, ort_run, vi

F32 = np.float32
rng = np.random.default_rng(5)


def _chain_model() -> tuple:
    """A float chain of the unary ops, the float predicates feeding Xor, and an unsigned bit path."""
    n = helper.make_node
    nodes = [
        n("Atan", ["x"], ["a"]), n("Softsign", ["a"], ["b"]), n("Celu", ["b"], ["c"], alpha=0.5),
        n("Selu", ["c"], ["d"]), n("Mish", ["d"], ["e"]), n("ThresholdedRelu", ["e"], ["f"], alpha=-0.2),
        n("Shrink", ["f"], ["g"], bias=0.1, lambd=0.05), n("Asinh", ["g"], ["h"]), n("Sinh", ["h"], ["i"]),
        n("Cosh", ["i"], ["j"]), n("Acosh", ["j"], ["k"]), n("Tanh", ["k"], ["l"]), n("Asin", ["l"], ["m"]),
        n("Acos", ["l"], ["o"]), n("Atanh", ["l"], ["p"]), n("Tan", ["p"], ["q"]), n("Sum", ["m", "o", "q"], ["y"]),
        n("IsNaN", ["x"], ["isnan"]), n("IsInf", ["x"], ["isinf"], detect_negative=0),
        n("Xor", ["isnan", "isinf"], ["flags"]),
        n("BitShift", ["u", "k1"], ["s1"], direction="LEFT"), n("BitwiseAnd", ["s1", "mask"], ["s2"]),
        n("BitwiseOr", ["s2", "k1"], ["s3"]), n("BitwiseXor", ["s3", "u"], ["s4"]), n("BitwiseNot", ["s4"], ["s5"]),
        n("BitShift", ["s5", "k1"], ["bits"], direction="RIGHT"),
    ]
    inits = {"k1": np.array([1, 2, 3, 4], np.uint32), "mask": np.array(0x0FF0F0F0, np.uint32)}
    model = make_model(nodes, [vi("x", F32, [3, 4]), vi("u", np.uint32, [3, 4])],
                       [vi("y", F32, [3, 4]), vi("flags", np.bool_, [3, 4]), vi("bits", np.uint32, [3, 4])],
                       inits, opset=21)
    x = rng.uniform(-3, 3, (3, 4)).astype(F32)
    x[0, :3] = [np.nan, np.inf, -np.inf]
    u = rng.integers(0, 2 ** 32 - 1, (3, 4), dtype=np.uint32)
    return model, {"x": x, "u": u}


def test_chain_lifts_and_round_trips():
    model, feeds = _chain_model()
    graph = lift(model)
    ops = set(graph.op_counts())
    assert {"atan", "softsign", "celu", "selu", "mish", "thresholded_relu", "shrink", "asinh", "sinh", "cosh",
            "acosh", "asin", "acos", "atanh", "tan", "is_nan", "is_inf", "xor", "bit_shift", "bitwise_and",
            "bitwise_or", "bitwise_xor", "bitwise_not"} <= ops
    ours = ir.interpret(graph, feeds)
    theirs = ort_run(model, feeds)
    for name, want in zip(("y", "flags", "bits"), theirs):
        assert_close(ours[name], want, rtol=1e-4, atol=1e-5)
    again = ort_run(lower_to_onnx(graph), feeds)
    for got, want in zip(again, theirs):
        assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_swish_opset_24(alpha):
    """Swish exists from opset 24: lifted to swish; lowered at opset 23 as Mul(x, Sigmoid(alpha*x))."""
    model = make_model([helper.make_node("Swish", ["x"], ["y"], alpha=alpha)], [vi("x", F32, [2, 5])],
                       [vi("y", F32, [2, 5])], opset=24)
    graph = lift(model)
    assert graph.op_counts() == {"swish": 1}
    x = rng.uniform(-6, 6, (2, 5)).astype(F32)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    assert_close(ir.interpret(graph, {"x": x})["y"], want)
    lowered = lower_to_onnx(graph)
    assert [nd.op_type for nd in lowered.graph.node if nd.op_type != "Identity"] == ["Mul", "Sigmoid", "Mul"]
    assert_close(ort_run(lowered, {"x": x})[0], want)


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
def test_signed_bit_shift_opset_28(direction):
    """BitShift-28 takes signed integers (arithmetic right shifts; out-of-range shifts give the fill)."""
    model = make_model([helper.make_node("BitShift", ["x", "s"], ["y"], direction=direction)],
                       [vi("x", np.int8, [2, 6]), vi("s", np.int8, [6])], [vi("y", np.int8, [2, 6])], opset=28)
    graph = lift(model)
    x = np.array([[-128, -7, -1, 1, 100, 127], [5, -5, 64, -64, 3, -3]], np.int8)
    s = np.array([0, 1, 3, 7, 8, -1], np.int8)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x, "s": s})
    np.testing.assert_array_equal(ir.interpret(graph, {"x": x, "s": s})["y"], want)


def test_celu_opset_28_double():
    """Celu-28 widened Celu-12's types (float only) to every float: the same op, lifted at both."""
    model = make_model([helper.make_node("Celu", ["x"], ["y"], alpha=2.0)], [vi("x", np.float64, [7])],
                       [vi("y", np.float64, [7])], opset=28)
    x = np.array([-30.0, -2.0, -1e-9, 0.0, 1e-9, 3.0, np.nan])
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_allclose(ir.interpret(lift(model), {"x": x})["y"], want, rtol=1e-15)


def test_is_inf_attributes_survive_lowering():
    model = make_model([helper.make_node("IsInf", ["x"], ["y"], detect_positive=0)], [vi("x", F32, [4])],
                       [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])], opset=20)
    graph = lift(model)
    assert next(iter(graph.nodes)).attrs == {"detect_negative": 1, "detect_positive": 0}
    x = np.array([np.inf, -np.inf, np.nan, 1.0], F32)
    assert ort_run(lower_to_onnx(graph), {"x": x})[0].tolist() == [False, True, False, False]
