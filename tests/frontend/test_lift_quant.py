"""Lifting ONNX's quantized operators onto kiln's integer ops (qmatmul, qconv, quantize).

Each model is lifted and interpreted and compared with onnxruntime (exact: the outputs are
integers), or, where onnxruntime has no kernel, with a numpy computation in int64.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

import kiln
from kiln import ir
from kiln.frontend import lift
from kiln.frontend.errors import UnsupportedOpsError

from .conftest import make_model, ort_run, vi

F32, U8, I8, I32 = np.float32, np.uint8, np.int8, np.int32
RNG = np.random.default_rng(11)


def _codes(dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def _lift_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[ir.Graph, list[np.ndarray]]:
    graph = lift(model)
    got = ir.interpret(graph, feeds)
    return graph, [got[v.name] for v in graph.outputs]


def _assert_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(got, want)


def _model(op: str, inputs: dict[str, np.ndarray], out: tuple[str, type], *, consts: set[str] = frozenset(),
           opset: int = 21, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model; inputs named in ``consts`` are initializers, the others graph inputs."""
    names = [k if k else "" for k in inputs]
    node = helper.make_node(op, names, [out[0]], **attrs)
    feeds = {k: v for k, v in inputs.items() if k and k not in consts}
    inits = {k: v for k, v in inputs.items() if k in consts}
    model = make_model([node], [vi(k, v.dtype, list(v.shape)) for k, v in feeds.items()],
                       [vi(out[0], out[1], None)], inits, opset=opset)
    return model, feeds


# ====================================================================== QLinearMatMul

@pytest.mark.parametrize("a_dt,b_dt", [(U8, U8), (I8, I8), (U8, I8)])
@pytest.mark.parametrize("per_column", [False, True])
def test_qlinear_matmul_matches_onnxruntime(a_dt, b_dt, per_column):
    n = 5
    sb = RNG.uniform(0.01, 0.05, (n,) if per_column else ()).astype(F32)
    zb = _codes(b_dt, sb.shape) // 4
    inputs = {"a": _codes(a_dt, (3, 7)), "sa": np.array(0.03, F32), "za": np.array(3, a_dt),
              "b": _codes(b_dt, (7, n)), "sb": sb, "zb": zb.astype(b_dt), "sy": np.array(0.2, F32),
              "zy": np.array(9, U8)}
    model, feeds = _model("QLinearMatMul", inputs, ("y", U8), consts={"b", "sb", "zb"})
    graph, (got,) = _lift_run(model, feeds)
    assert "qmatmul" in graph.op_counts()
    # onnxruntime has no int8 x int8 QLinearMatMul kernel: that pair is checked against ONNX's reference
    want = ReferenceEvaluator(model).run(None, feeds)[0] if a_dt is I8 else ort_run(model, feeds)[0]
    _assert_equal(got, want)


def test_qlinear_matmul_batched_runtime_scales():
    inputs = {"a": _codes(U8, (2, 3, 6)), "sa": np.array(0.02, F32), "za": np.array(100, U8),
              "b": _codes(U8, (2, 6, 4)), "sb": np.array(0.04, F32), "zb": np.array(120, U8),
              "sy": np.array(0.1, F32), "zy": np.array(128, U8)}
    model, feeds = _model("QLinearMatMul", inputs, ("y", U8))
    _, (got,) = _lift_run(model, feeds)
    _assert_equal(got, ort_run(model, feeds)[0])


def test_qlinear_matmul_per_row_a_scale_is_refused():
    inputs = {"a": _codes(U8, (3, 4)), "sa": np.full(3, 0.1, F32), "za": np.zeros(3, U8),
              "b": _codes(U8, (4, 2)), "sb": np.array(0.1, F32), "zb": np.array(0, U8),
              "sy": np.array(0.1, F32), "zy": np.array(0, U8)}
    model, _ = _model("QLinearMatMul", inputs, ("y", U8))
    with pytest.raises(UnsupportedOpsError, match="per-row scale of a"):
        lift(model)


# ====================================================================== MatMulInteger

@pytest.mark.parametrize("k,kernel", [(6, "qmatmul"), (300, "matmul")])
def test_matmul_integer(k, kernel):
    """K <= 258 runs on qmatmul (its f32 result is exact), larger K on an int32 matmul."""
    inputs = {"A": _codes(U8, (4, k)), "B": _codes(U8, (k, 3)), "a_zp": np.array(130, U8),
              "b_zp": np.array([5, 200, 17], U8)}
    model, feeds = _model("MatMulInteger", inputs, ("Y", I32), opset=13)
    graph, (got,) = _lift_run(model, feeds)
    assert kernel in graph.op_counts()
    _assert_equal(got, ort_run(model, feeds)[0])


def test_matmul_integer_per_row_a_zero_point_and_int8():
    a, b = _codes(I8, (3, 5)), _codes(I8, (5, 2))
    za, zb = np.array([1, -4, 7], I8), np.array(-3, I8)
    model, feeds = _model("MatMulInteger", {"A": a, "B": b, "a_zp": za, "b_zp": zb}, ("Y", I32), opset=13)
    _, (got,) = _lift_run(model, feeds)
    want = (a.astype(np.int64) - za.astype(np.int64)[:, None]) @ (b.astype(np.int64) - int(zb))
    _assert_equal(got, want.astype(I32))


def test_matmul_integer_without_zero_points():
    model, feeds = _model("MatMulInteger", {"A": _codes(U8, (2, 3)), "B": _codes(U8, (3, 2))}, ("Y", I32),
                          opset=13)
    _, (got,) = _lift_run(model, feeds)
    _assert_equal(got, ort_run(model, feeds)[0])


# ====================================================================== ConvInteger, QLinearConv

@pytest.mark.parametrize("channels,kernel", [(2, "qconv"), (40, "conv")])
def test_conv_integer(channels, kernel):
    """C * kh * kw <= 258 runs on qconv; more on a float64 conv of the centered codes (exact)."""
    inputs = {"x": _codes(U8, (1, channels, 5, 5)), "w": _codes(U8, (3, channels, 3, 3)),
              "x_zp": np.array(120, U8), "w_zp": np.array(7, U8)}
    model, feeds = _model("ConvInteger", inputs, ("y", I32), opset=13, pads=[1, 0, 1, 2], strides=[2, 1])
    graph, (got,) = _lift_run(model, feeds)
    assert kernel in graph.op_counts()
    _assert_equal(got, ort_run(model, feeds)[0])


def test_conv_integer_per_channel_weight_zero_point_reference():
    inputs = {"x": _codes(U8, (1, 2, 4, 4)), "w": _codes(U8, (2, 2, 2, 2)), "x_zp": np.array(3, U8),
              "w_zp": np.array([1, 250], U8)}
    model, feeds = _model("ConvInteger", inputs, ("y", I32), opset=13, auto_pad="SAME_UPPER")
    _, (got,) = _lift_run(model, feeds)
    _assert_equal(got, ReferenceEvaluator(model).run(None, feeds)[0])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("x_dt,w_dt", [(U8, U8), (U8, I8), (I8, I8)])
def test_qlinear_conv_matches_onnxruntime(per_channel, x_dt, w_dt):
    m = 4
    ws = RNG.uniform(0.002, 0.01, (m,) if per_channel else ()).astype(F32)
    y_dt = x_dt
    inputs = {"x": _codes(x_dt, (1, 2, 6, 6)), "xs": np.array(0.05, F32), "xz": np.array(5, x_dt),
              "w": _codes(w_dt, (m, 1, 3, 3)), "ws": ws, "wz": np.zeros(ws.shape, w_dt),
              "ys": np.array(0.04, F32), "yz": np.array(10, y_dt),
              "B": RNG.integers(-500, 500, m).astype(I32)}
    model, feeds = _model("QLinearConv", inputs, ("y", y_dt), consts={"w", "ws", "wz", "B"}, opset=13,
                          group=2, pads=[1, 1, 1, 1], strides=[1, 2])
    graph, (got,) = _lift_run(model, feeds)
    assert "qconv" in graph.op_counts()
    _assert_equal(got, ort_run(model, feeds)[0])


def test_qlinear_conv_3d_on_the_float64_path():
    """(ONNX's reference broadcasts a per-channel w_scale wrongly for 3-D convs: per tensor here.)"""
    inputs = {"x": _codes(U8, (1, 2, 3, 4, 4)), "xs": np.array(0.05, F32), "xz": np.array(5, U8),
              "w": _codes(U8, (2, 2, 2, 2, 2)), "ws": np.array(0.002, F32),
              "wz": np.array([100, 110], U8), "ys": np.array(0.6, F32), "yz": np.array(128, U8)}
    model, feeds = _model("QLinearConv", inputs, ("y", U8), opset=13)
    graph, (got,) = _lift_run(model, feeds)
    assert "conv" in graph.op_counts() and "qconv" not in graph.op_counts()
    _assert_equal(got, ReferenceEvaluator(model).run(None, feeds)[0])


# ====================================================================== DynamicQuantizeLinear

@pytest.mark.parametrize("lo,hi", [(-3.0, 5.0), (0.5, 4.0), (-6.0, -1.0), (0.0, 0.0)])
def test_dynamic_quantize_linear(lo, hi):
    """(An all-zero input: scale 1 as onnxruntime gives, where ONNX's reference gives 1/255.)"""
    x = RNG.uniform(lo, hi, (3, 5)).astype(F32)
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    model = make_model([node], [vi("x", F32, [3, 5])], [vi("y", U8, None), vi("s", F32, None), vi("z", U8, None)],
                       opset=13)
    _, got = _lift_run(model, {"x": x})
    want = ort_run(model, {"x": x})
    _assert_equal(got[0], want[0])
    _assert_equal(got[2], want[2])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-7)
    assert got[1].dtype == np.float32 and got[1].shape == ()


# ====================================================================== compiled

@pytest.mark.slow
def test_quantized_ops_compiled():
    """QLinearMatMul (per column), MatMulInteger (int32 path) and ConvInteger (float64 path) compiled."""
    nodes = [helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"]),
             helper.make_node("MatMulInteger", ["A", "B2"], ["Y"]),
             helper.make_node("ConvInteger", ["x", "w", "xz"], ["c"], pads=[1, 1, 1, 1])]
    inits = {"sa": np.array(0.03, F32), "za": np.array(3, U8), "b": _codes(U8, (7, 5)),
             "sb": RNG.uniform(0.01, 0.05, 5).astype(F32), "zb": _codes(U8, 5), "sy": np.array(0.2, F32),
             "zy": np.array(9, U8), "B2": _codes(U8, (300, 3)), "w": _codes(U8, (3, 40, 3, 3)),
             "xz": np.array(128, U8)}
    feeds = {"a": _codes(U8, (3, 7)), "A": _codes(U8, (2, 300)), "x": _codes(U8, (1, 40, 4, 4))}
    model = make_model(nodes, [vi(k, v.dtype, list(v.shape)) for k, v in feeds.items()],
                       [vi("y", U8, None), vi("Y", I32, None), vi("c", I32, None)], inits, opset=21,
                       ir_version=10)
    sess = kiln.compile(model, example_inputs=feeds).load()
    got = sess.run(feeds)
    for name, want in zip(("y", "Y", "c"), ort_run(model, feeds)):
        _assert_equal(got[name], want)
