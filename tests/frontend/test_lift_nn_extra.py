"""Lifting the nn_extra ONNX ops: GroupNormalization (18 and 21), LpNormalization, MVN, LpPool,
GlobalLpPool, MaxUnpool, Einsum (decomposed and general), Det, and the NonMaxSuppression refusal.

Every lifted model is interpreted and compared with onnxruntime on the original model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln import ir
from kiln.frontend import lift
from kiln.frontend.errors import FrontendError

from .conftest import assert_close, make_model, ort_run, vi

F32 = np.float32
RNG = np.random.default_rng(11)


def one_node(op: str, feeds: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None, *,
             opset: int, inputs: list[str] | None = None, out_type: int = onnx.TensorProto.FLOAT,
             **attrs) -> onnx.ModelProto:
    """A one-node model: ``feeds`` are graph inputs, ``inits`` constant inputs, in ``inputs`` order."""
    inits = inits or {}
    names = inputs or [*feeds, *inits]
    node = helper.make_node(op, names, ["y"], **attrs)
    return make_model([node], [vi(k, v.dtype, list(v.shape)) for k, v in feeds.items()],
                      [helper.make_tensor_value_info("y", out_type, None)], inits,
                      opset=opset, ir_version=10)


def run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5,
             atol: float = 1e-6) -> ir.Graph:
    graph = lift(model)
    got = ir.interpret(graph, feeds)[graph.outputs[0].name]
    assert_close(got, ort_run(model, feeds)[0], rtol=rtol, atol=atol)
    return graph


def ops_of(graph: ir.Graph) -> set[str]:
    return {n.op for n in graph.nodes}


def x_(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(F32)


# ------------------------------------------------------------------ normalization

def test_group_norm_21_is_one_op():
    feeds = {"x": x_(2, 6, 3, 4), "s": x_(6), "b": x_(6)}
    g = run_both(one_node("GroupNormalization", feeds, opset=21, num_groups=3, epsilon=1e-3), feeds)
    assert ops_of(g) == {"group_norm"}


@pytest.mark.parametrize("const", [True, False])
def test_group_norm_18_repeats_per_group_params(const):
    x, s, b = x_(2, 6, 5), x_(3), x_(3)
    feeds, inits = ({"x": x}, {"s": s, "b": b}) if const else ({"x": x, "s": s, "b": b}, {})
    model = one_node("GroupNormalization", feeds, inits, opset=18, inputs=["x", "s", "b"], num_groups=3)
    graph = lift(model)
    got = ir.interpret(graph, feeds)[graph.outputs[0].name]
    xg = x.astype(np.float64).reshape(2, 3, -1)
    want = ((xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + 1e-5))
    want = want * s.reshape(1, 3, 1) + b.reshape(1, 3, 1)
    np.testing.assert_allclose(got, want.reshape(x.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p,axis", [(1, 1), (2, 0), (2, -1), (1, -1)])
def test_lp_normalization(p, axis):
    x = x_(3, 4, 5)
    x[1, :, 2] = 0  # a zero norm along axis 1 gives 0, as onnxruntime does
    x[:, 1, :] = 0
    run_both(one_node("LpNormalization", {"x": x}, opset=22, p=p, axis=axis), {"x": x})


def test_lp_normalization_refuses_other_p():
    with pytest.raises(FrontendError, match="p=3"):
        lift(one_node("LpNormalization", {"x": x_(3, 4)}, opset=22, p=3))


@pytest.mark.parametrize("axes", [None, [1], [0, 1, 2, 3]])
def test_mean_variance_normalization(axes):
    x = x_(2, 3, 4, 5) * 3 + 1
    attrs = {} if axes is None else {"axes": axes}
    run_both(one_node("MeanVarianceNormalization", {"x": x}, opset=13, **attrs), {"x": x}, atol=1e-5)


# ------------------------------------------------------------------ pooling

@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_lp_pool_auto_pad(auto_pad):
    x = x_(1, 2, 7, 6)
    g = run_both(one_node("LpPool", {"x": x}, opset=18, kernel_shape=[3, 2], strides=[2, 2], p=3,
                          auto_pad=auto_pad), {"x": x}, atol=1e-5)
    assert ops_of(g) == {"lp_pool"}


def test_lp_pool_opset_11_and_dilations():
    x = x_(1, 2, 8, 8)
    run_both(one_node("LpPool", {"x": x}, opset=11, kernel_shape=[2, 2], p=2), {"x": x})
    run_both(one_node("LpPool", {"x": x}, opset=18, kernel_shape=[2, 2], dilations=[2, 3], ceil_mode=1, p=1),
             {"x": x})


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool(p):
    x = x_(2, 3, 4, 5)
    g = run_both(one_node("GlobalLpPool", {"x": x}, opset=13, p=p), {"x": x}, atol=1e-5)
    assert not any(op.endswith("pool") for op in ops_of(g))


def test_max_unpool_with_constant_output_shape():
    x = x_(1, 1, 2, 2)
    idx = np.array([0, 3, 9, 14], np.int64).reshape(1, 1, 2, 2)
    model = one_node("MaxUnpool", {"x": x, "i": idx}, {"s": np.array([1, 1, 5, 5], np.int64)}, opset=22,
                     kernel_shape=[2, 2], strides=[2, 2])
    g = run_both(model, {"x": x, "i": idx})
    assert ops_of(g) == {"max_unpool"}


# ------------------------------------------------------------------ einsum

@pytest.mark.parametrize("equation,shapes,general", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], False),
    ("ij,jk", [(3, 4), (4, 5)], False),
    ("ij->ji", [(3, 4)], False),
    ("ij->i", [(3, 4)], False),
    ("i,i", [(5,), (5,)], False),
    ("bhqd,bhkd->bhqk", [(1, 2, 3, 4), (1, 2, 5, 4)], False),
    ("ij,jk,kl->li", [(2, 3), (3, 4), (4, 2)], False),
    ("abc,cd->", [(2, 3, 4), (4, 2)], False),
    ("ibh,jbh->bij", [(3, 2, 4), (5, 2, 4)], False),
    ("ij,kl->ijkl", [(2, 3), (2, 2)], False),
    ("ii->i", [(4, 4)], True),
    ("...ii->...i", [(2, 3, 3)], True),
])
def test_einsum(equation, shapes, general):
    feeds = {f"x{i}": x_(*s) for i, s in enumerate(shapes)}
    g = run_both(one_node("Einsum", feeds, opset=12, equation=equation), feeds, atol=1e-5)
    assert ("einsum" in ops_of(g)) == general
    if len(shapes) > 1 and not general and "," in equation:
        assert "matmul" in ops_of(g)


def test_einsum_graph_input_to_output_stays_distinct():
    feeds = {"x": x_(3, 4)}
    g = run_both(one_node("Einsum", feeds, opset=12, equation="ij->ij"), feeds)
    assert g.outputs[0].name == "y"


def test_det():
    feeds = {"x": x_(3, 4, 4)}
    run_both(one_node("Det", feeds, opset=22), feeds, rtol=1e-4)


# ------------------------------------------------------------------ NonMaxSuppression

def _nms_inputs():
    boxes = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, 10, 1, 11]]], F32)
    scores = np.array([[[0.9, 0.8, 0.7]]], F32)
    return {"boxes": boxes, "scores": scores}, {"m": np.array([2], np.int64), "iou": np.array([0.5], F32)}


def test_nms_is_refused_with_a_reason():
    feeds, inits = _nms_inputs()
    model = one_node("NonMaxSuppression", feeds, inits, opset=11, out_type=onnx.TensorProto.INT64)
    with pytest.raises(FrontendError, match="data-dependent number of boxes"):
        lift(model)


def test_nms_of_constants_folds():
    feeds, inits = _nms_inputs()
    model = one_node("NonMaxSuppression", {}, {**feeds, **inits}, opset=11,
                     inputs=["boxes", "scores", "m", "iou"], out_type=onnx.TensorProto.INT64)
    g = lift(model)
    got = ir.interpret(g, {})[g.outputs[0].name]
    np.testing.assert_array_equal(got, [[0, 0, 0], [0, 0, 2]])
