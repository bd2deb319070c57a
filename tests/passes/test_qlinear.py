"""fuse-qlinear: the QDQ form rewritten into qmatmul / qconv / dq_matmul.

Golden IR text for the rewrite, the interpreter's result of the fused graph
against the QDQ graph's (float rounding only: both compute exact integer sums),
refusals that leave the graph's text unchanged with their reason, the ONNX
lowering of the fused ops (decomposed back to QDQ, run by onnxruntime), and an
onnxruntime ``quantize_static`` model lifted and fused, against onnxruntime.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from kiln import ir
from kiln.frontend import lift
from kiln.frontend.lower import lower_to_onnx
from kiln.ir import Graph
from kiln.passes.manager import DEFAULT_PIPELINE, run_pipeline_report

F32_RTOL = 1e-5


def fuse(g: Graph):
    return run_pipeline_report(g.clone(), "fuse-qlinear")


def assert_same(a: Graph, b: Graph, feeds: dict[str, np.ndarray], rtol: float = F32_RTOL) -> None:
    ya, yb = ir.interpret(a, feeds), ir.interpret(b, feeds)
    for v in a.outputs:
        want = ya[v.name].astype(np.float64)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(yb[v.name].astype(np.float64), want, rtol=0, atol=rtol * scale, err_msg=v.name)


MLP = """graph @g(%x: f32[4,3]) -> (%y) {
  %sx = const f32[] [0.05]
  %zx = const i8[] [-3]
  %W.q = const i8[3,2] [1, -2, 3, 4, -127, 127]
  %sw = const f32[2] [0.01, 0.02]
  %zw = const i8[2] [0, 0]
  %b.q = const i32[2] [100, -50]
  %sb = const f32[2] [0.0005, 0.001]
  %x.q = quantize(%x, %sx, %zx) {dtype="i8"} : i8[4,3]
  %x.dq = dequantize(%x.q, %sx, %zx) : f32[4,3]
  %W.dq = dequantize(%W.q, %sw, %zw) {axis=1} : f32[3,2]
  %b.dq = dequantize(%b.q, %sb) {axis=0} : f32[2]
  %m = matmul(%x.dq, %W.dq) : f32[4,2]
  %y = add(%m, %b.dq) : f32[4,2]
}"""

MLP_FUSED = """graph @g(%x: f32[4,3]) -> (%y) {
  %sx = const f32[] [0.05]
  %zx = const i8[] [-3]
  %W.q = const i8[3,2] [1, -2, 3, 4, -127, 127]
  %sw = const f32[2] [0.01, 0.02]
  %zw = const i8[2] [0, 0]
  %b.q = const i32[2] [100, -50]
  %sb = const f32[2] [0.0005, 0.001]
  %x.q = quantize(%x, %sx, %zx) {axis=1, block_size=0, dtype="i8"} : i8[4,3]
  %y = qmatmul(%x.q, %sx, %zx, %W.q, %sw, %zw, %b.q) : f32[4,2]
}
"""


def test_qmatmul_golden_text():
    """The matmul and its bias add become one qmatmul named like the add; the dequantizes go."""
    g = ir.parse(MLP)
    res = fuse(g)
    assert str(res.graph) == MLP_FUSED
    assert res.records[0].log.rewrites == [("y", "matmul -> qmatmul (bias folded)")]
    assert not res.refusals
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * 3
    assert_same(g, res.graph, {"x": x})


def test_default_pipeline_fuses_before_canonicalize_folds_the_weights():
    assert DEFAULT_PIPELINE.index("fuse-qlinear") < DEFAULT_PIPELINE.index("canonicalize")
    res = run_pipeline_report(ir.parse(MLP), DEFAULT_PIPELINE)
    assert [n.op for n in res.graph.nodes] == ["quantize", "qmatmul"]


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 9), seed=st.integers(0, 2 ** 16),
       adt=st.sampled_from(["i8", "u8"]), per_col=st.booleans(), with_bias=st.booleans())
def test_fused_matmul_equals_qdq_for_all_inputs(m, k, n, seed, adt, per_col, with_bias):
    """Any scales, zero points and codes: qmatmul gives the QDQ graph's f32 result up to float rounding."""
    rng = np.random.default_rng(seed)
    sx = np.float32(rng.uniform(1e-3, 0.5))
    pshape = (n,) if per_col else ()
    sw = rng.uniform(1e-3, 0.5, pshape).astype(np.float32)
    lo, hi = (-128, 127) if adt == "i8" else (0, 255)
    consts = {"sx": np.array(sx), "zx": np.array(rng.integers(lo, hi + 1), np.int8 if adt == "i8" else np.uint8),
              "W": rng.integers(-127, 128, (k, n)).astype(np.int8), "sw": sw,
              "zw": rng.integers(-5, 6, pshape).astype(np.int8),
              "b": rng.integers(-10 ** 6, 10 ** 6, n).astype(np.int32), "sb": (sx * sw).astype(np.float32)}
    p = f"[{n}]" if per_col else "[]"
    bias = (f"  %bd = dequantize(%b, %sb) {{axis=0}} : f32[{n}]\n  %y = add(%mm, %bd) : f32[{m},{n}]"
            if with_bias else f"  %y = relu(%mm) : f32[{m},{n}]")
    text = f"""graph @g(%x: f32[{m},{k}]) -> (%y) {{
  %sx = const f32[] dense<elided>
  %zx = const {adt}[] dense<elided>
  %W = const i8[{k},{n}] dense<elided>
  %sw = const f32{p} dense<elided>
  %zw = const i8{p} dense<elided>
  %b = const i32[{n}] dense<elided>
  %sb = const f32{p} dense<elided>
  %xq = quantize(%x, %sx, %zx) {{dtype="{adt}"}} : {adt}[{m},{k}]
  %xd = dequantize(%xq, %sx, %zx) : f32[{m},{k}]
  %wd = dequantize(%W, %sw, %zw) {{axis=1}} : f32[{k},{n}]
  %mm = matmul(%xd, %wd) : f32[{m},{n}]
{bias}
}}"""
    g = ir.parse(text, constants=consts)
    res = fuse(g)
    assert "qmatmul" in res.graph.op_counts() and "matmul" not in res.graph.op_counts()
    assert_same(g, res.graph, {"x": (rng.standard_normal((m, k)) * 4).astype(np.float32)})


CONV = """graph @g(%x: f32[1,2,5,5]) -> (%y) {
  %sx = const f32[] [0.1]
  %zx = const u8[] [128]
  %W = const i8[3,2,3,3] dense<elided>
  %sw = const f32[3] [0.01, 0.02, 0.03]
  %zw = const i8[3] [0, 0, 0]
  %b = const i32[3] [10, -20, 30]
  %sb = const f32[3] dense<elided>
  %xq = quantize(%x, %sx, %zx) {dtype="u8"} : u8[1,2,5,5]
  %xd = dequantize(%xq, %sx, %zx) : f32[1,2,5,5]
  %wd = dequantize(%W, %sw, %zw) {axis=0} : f32[3,2,3,3]
  %bd = dequantize(%b, %sb) {axis=0} : f32[3]
  %y = conv(%xd, %wd, %bd) {pads=[1, 1, 1, 1], strides=[2, 2]} : f32[1,3,3,3]
}"""


def _conv_consts(sb_scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"W": rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8),
            "sb": (np.float32(0.1) * np.array([0.01, 0.02, 0.03], np.float32) * np.float32(sb_scale)).astype(np.float32)}


def test_qconv_pads_with_the_zero_point():
    """u8 input with zero point 128 and padding: the fused conv pads the dequantized input with 0."""
    g = ir.parse(CONV, constants=_conv_consts())
    res = fuse(g)
    assert [n.op for n in res.graph.nodes] == ["quantize", "qconv"]
    assert res.graph.nodes[1].attrs["pads"] == [1, 1, 1, 1]
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32) * 5
    assert_same(g, res.graph, {"x": x})


WEIGHT_ONLY = """graph @g(%a: f32[3,16]) -> (%y) {
  %W = const i4[16,6] dense<elided>
  %s = const f32[2,6] dense<elided>
  %z = const i4[2,6] dense<elided>
  %wd = dequantize(%W, %s, %z) {axis=0, block_size=8} : f32[16,6]
  %y = matmul(%a, %wd) : f32[3,6]
}"""


def test_weight_only_int4_blocked():
    rng = np.random.default_rng(3)
    consts = {"W": rng.integers(-8, 8, (16, 6)).astype(ml_dtypes.int4), "s": rng.uniform(0.01, 0.1, (2, 6)).astype(np.float32),
              "z": rng.integers(-2, 3, (2, 6)).astype(ml_dtypes.int4)}
    g = ir.parse(WEIGHT_ONLY, constants=consts)
    res = fuse(g)
    (node,) = res.graph.nodes
    assert node.op == "dq_matmul" and node.attrs == {"axis": 0, "block_size": 8}
    assert node.outputs[0].name == "y"
    a = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(ir.interpret(res.graph, {"a": a})["y"], ir.interpret(g, {"a": a})["y"])


def test_gemm_style_transposed_weight_is_fused():
    """transpose(dequantize(W[N, K]){axis=0}) (ONNX Gemm transB as lifted): codes transposed at compile time."""
    text = """graph @g(%xq: i8[2,3]) -> (%y) {
  %sx = const f32[] [0.5]
  %zx = const i8[] [1]
  %W = const i8[2,3] [1, 2, 3, -4, -5, -6]
  %sw = const f32[2] [0.25, 0.125]
  %xd = dequantize(%xq, %sx, %zx) : f32[2,3]
  %wd = dequantize(%W, %sw) {axis=0} : f32[2,3]
  %wt = transpose(%wd) {perm=[1, 0]} : f32[3,2]
  %y = matmul(%xd, %wt) : f32[2,2]
}"""
    g = ir.parse(text)
    res = fuse(g)
    (node,) = res.graph.nodes
    assert node.op == "qmatmul"
    np.testing.assert_array_equal(node.inputs[3].const, np.array([[1, -4], [2, -5], [3, -6]], np.int8))
    xq = np.array([[1, -2, 3], [127, -128, 0]], np.int8)
    np.testing.assert_array_equal(ir.interpret(res.graph, {"xq": xq})["y"], ir.interpret(g, {"xq": xq})["y"])


REFUSALS = {
    "per-axis activation": (MLP.replace("%sx = const f32[] [0.05]", "%sx = const f32[3] [0.05, 0.1, 0.2]")
                            .replace("%zx = const i8[] [-3]", "%zx = const i8[3] [0, 0, 0]")
                            .replace("quantize(%x, %sx, %zx) {", "quantize(%x, %sx, %zx) {axis=1, ")
                            .replace("%b.q = const i32[2] [100, -50]\n", "")
                            .replace("%sb = const f32[2] [0.0005, 0.001]\n", "")
                            .replace("  %b.dq = dequantize(%b.q, %sb) {axis=0} : f32[2]\n", "")
                            .replace("add(%m, %b.dq)", "relu(%m)"),
                            "m", ["not per tensor"]),
    "bias scale": (MLP.replace("[0.0005, 0.001]", "[0.0005, 0.0011]"), "y", ["bias scale", "channel 1"]),
    "weight axis": (MLP.replace("%sw = const f32[2] [0.01, 0.02]", "%sw = const f32[3] [0.01, 0.02, 0.03]")
                    .replace("%zw = const i8[2] [0, 0]", "%zw = const i8[3] [0, 0, 0]")
                    .replace("{axis=1} : f32[3,2]", "{axis=0} : f32[3,2]"), "y", ["axis 0", "output channel"]),
    "bias not checkable": (MLP.replace("(%x: f32[4,3])", "(%x: f32[4,3], %sb: f32[2])")
                           .replace("  %sb = const f32[2] [0.0005, 0.001]\n", ""), "y", ["%sb not constant"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_leave_the_graph_alone(case):
    text, at, words = REFUSALS[case]
    g = ir.parse(text)
    ir.verify(g)
    res = fuse(g)
    assert ir.print_graph(res.graph) == ir.print_graph(g)
    assert [r.at for r in res.refusals] == [at], res.refusals
    for w in words:
        assert w in res.refusals[0].reason, res.refusals[0].reason


def test_refuses_3d_conv_and_i16_codes():
    text = """graph @g(%xq: i8[1,1,3,3,3], %aq: i16[2,2]) -> (%y, %z) {
  %sx = const f32[] [0.1]
  %W = const i8[1,1,1,1,1] [3]
  %sw = const f32[] [0.5]
  %B = const i8[2,2] [1, 2, 3, 4]
  %xd = dequantize(%xq, %sx) : f32[1,1,3,3,3]
  %wd = dequantize(%W, %sw) {axis=0} : f32[1,1,1,1,1]
  %y = conv(%xd, %wd) : f32[1,1,3,3,3]
  %ad = dequantize(%aq, %sx) : f32[2,2]
  %bd = dequantize(%B, %sw) : f32[2,2]
  %z = matmul(%ad, %bd) : f32[2,2]
}"""
    g = ir.parse(text)
    res = fuse(g)
    assert ir.print_graph(res.graph) == ir.print_graph(g)
    reasons = {r.at: r.reason for r in res.refusals}
    assert "3-D" in reasons["y"] and "i16 codes" in reasons["z"]


def test_lowered_to_onnx_as_qdq_and_run_by_onnxruntime():
    """The fused ops decompose back to DequantizeLinear + MatMul/Conv; onnxruntime (no optimizations) agrees."""
    text = """graph @g(%xq: i8[4,3], %cq: u8[1,2,5,5]) -> (%y, %c) {
  %sx = const f32[] [0.05]
  %zx = const i8[] [-3]
  %W.q = const i8[3,2] [1, -2, 3, 4, -127, 127]
  %sw = const f32[2] [0.01, 0.02]
  %zw = const i8[2] [0, 0]
  %b.q = const i32[2] [100, -50]
  %sc = const f32[] [0.1]
  %zc = const u8[] [128]
  %Wc = const i8[3,2,3,3] dense<elided>
  %swc = const f32[3] [0.01, 0.02, 0.03]
  %y = qmatmul(%xq, %sx, %zx, %W.q, %sw, %zw, %b.q) : f32[4,2]
  %c = qconv(%cq, %sc, %zc, %Wc, %swc) {pads=[1, 1, 1, 1]} : f32[1,3,5,5]
}"""
    rng = np.random.default_rng(9)
    g = ir.parse(text, constants={"Wc": rng.integers(-127, 128, (3, 2, 3, 3)).astype(np.int8)})
    model = lower_to_onnx(g)
    assert {n.op_type for n in model.graph.node} >= {"DequantizeLinear", "MatMul", "Conv"}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"xq": rng.integers(-128, 128, (4, 3)).astype(np.int8), "cq": rng.integers(0, 256, (1, 2, 5, 5)).astype(np.uint8)}
    got = dict(zip(["y", "c"], sess.run(["y", "c"], feeds)))
    want = ir.interpret(g, feeds)
    for k in ("y", "c"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


def _mlp_onnx(rng: np.random.Generator) -> onnx.ModelProto:
    # weights above the lifter's fold limit (2^16 elements): it folds smaller dequantized weights to floats
    w1, w2 = rng.standard_normal((256, 288)).astype(np.float32) * 0.1, rng.standard_normal((288, 256)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(288).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_onnxruntime_quantize_static_model_is_fused(tmp_path):
    """onnxruntime's QDQ (QInt8, per channel) of an MLP, lifted: every MatMul becomes a qmatmul, same result."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(11)
    src, dst = tmp_path / "mlp.onnx", tmp_path / "mlp.q.onnx"
    onnx.save(_mlp_onnx(rng), src)
    samples = [{"x": rng.standard_normal((4, 256)).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    g = lift(onnx.load(dst), canonicalize=False)  # canonicalize would fold the weight dequantizes to floats
    res = run_pipeline_report(g.clone(), DEFAULT_PIPELINE)
    assert res.graph.op_counts().get("qmatmul") == 2 and "matmul" not in res.graph.op_counts(), res.refusals
    x = samples[0]["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(dst), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(ir.interpret(res.graph, {"x": x})["y"], want, rtol=1e-4, atol=1e-4)
