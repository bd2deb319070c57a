"""insert-qdq (passes/qdq.py): the QDQ form of the quantization contract, checked against onnxruntime.

* golden IR text for a matmul + bias add and for a grouped conv, on calibration
  data whose min/max are chosen, with constants written by hand (codes) or from
  the contract's formulas (scales);
* the rewritten graph lowered to ONNX (QuantizeLinear/DequantizeLinear, opsets
  13, 21 and 23) in onnxruntime with graph optimizations off: the int8 codes of every
  activation quantize are read as extra outputs and must equal the interpreter's
  exactly for the graph input, and within one code (in at most 0.5 % of the
  elements) for computed activations, whose float values ORT (float32 sgemm) and
  the interpreter (float64 accumulation) round differently; outputs agree within
  1e-5 of their magnitude;
* scales and zero points against onnxruntime.quantization.quantize_static
  (QDQ, QInt8/QInt8, per channel, MinMax) on the same data: equal for the graph
  input and the weights, within one quantization step for computed activations;
* refusals leave the printed graph unchanged and say why; exclude, fixed, skip,
  sharing, idempotence and the pipeline string.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from kiln import ir
from kiln.frontend import lift, lower_to_onnx
from kiln.ir import Graph
from kiln.passes.manager import PassLog, PipelineError, run_pipeline, run_pipeline_report
from kiln.passes.qdq import InsertQDQ, QuantLayer, insert_qdq

from ..frontend.conftest import make_model, vi

F32 = np.float32


def _text(g: Graph) -> str:
    return ir.print_graph(g)


def _same(got: Graph, expected: str) -> None:
    ir.verify(got)
    assert _text(got) == _text(ir.parse(expected))


# ====================================================================== golden IR text

MATMUL = """graph @main(%x: f32[2,4]) -> (%y) {
  %W = const f32[4,2] [0.5, -0.26, 1.27, 0.1, -0.3, 2.54, 0.0, -1.0]
  %b = const f32[2] [0.2, -0.4]
  %mm = matmul(%x, %W) : f32[2,2]
  %y = add(%mm, %b) : f32[2,2]
}"""


def test_matmul_add_golden():
    """x spans [-1, 3]: scale 4/255, zero point round(-128 + 1/(4/255)) = -64; W per column /0.01 and /0.02."""
    x = np.array([[-1.0, 0.0, 1.0, 3.0], [0.5, 0.5, 2.0, -0.5]], F32)
    g = ir.parse(MATMUL)
    before = _text(g)
    got, layers = insert_qdq(g, [{"x": x}])
    sx = F32(4 / 255)
    expected = f"""graph @main(%x: f32[2,4]) -> (%y) {{
  %x.scale = const f32[] [{sx}]
  %x.zero_point = const i8[] [-64]
  %W.q = const i8[4,2] [50, -13, 127, 5, -30, 127, 0, -50]
  %W.scale = const f32[2] [0.01, 0.02]
  %W.zero_point = const i8[2] [0, 0]
  %b.q = const i32[2] [1275, -1275]
  %b.scale = const f32[2] [{sx * F32(0.01)}, {sx * F32(0.02)}]
  %x.q = quantize(%x, %x.scale, %x.zero_point) {{dtype="i8"}} : i8[2,4] loc("x.q")
  %x.dq = dequantize(%x.q, %x.scale, %x.zero_point) : f32[2,4] loc("x.dq")
  %W.dq = dequantize(%W.q, %W.scale, %W.zero_point) {{axis=1}} : f32[4,2] loc("W.dq")
  %b.dq = dequantize(%b.q, %b.scale) {{axis=0}} : f32[2] loc("b.dq")
  %mm = matmul(%x.dq, %W.dq) : f32[2,2]
  %y = add(%mm, %b.dq) : f32[2,2]
}}"""
    _same(got, expected)
    assert _text(g) == before  # the caller's graph is not changed
    assert layers == [QuantLayer(node="mm", op="matmul", output="mm", inputs=("x",), act_qparams=((float(sx), -64),),
                                 act_source=("calibrated",), ranges=((-1.0, 3.0),), weight="W",
                                 weight_scheme="i8 symmetric per-channel axis=1", bias="b")]


CONV = """graph @main(%x: f32[1,2,3,3]) -> (%y) {
  %K = const f32[2,1,2,2] [0.127, -0.05, 0.02, 0.0, -0.254, 0.1, 0.03, 0.06]
  %b = const f32[2] [0.5, -0.3]
  %y = conv(%x, %K, %b) {group=2} : f32[1,2,2,2]
}"""


def test_conv_golden():
    """x spans [0, 2.55]: scale 0.01, zero point -128; K per output channel (axis 0) /0.001 and /0.002."""
    x = np.linspace(0, 2.55, 18, dtype=F32).reshape(1, 2, 3, 3)
    got, _ = insert_qdq(ir.parse(CONV), [{"x": x}])
    sx = F32(np.float64(F32(2.55)) / 255)
    expected = f"""graph @main(%x: f32[1,2,3,3]) -> (%y) {{
  %x.scale = const f32[] [{sx}]
  %x.zero_point = const i8[] [-128]
  %K.q = const i8[2,1,2,2] [127, -50, 20, 0, -127, 50, 15, 30]
  %K.scale = const f32[2] [0.001, 0.002]
  %K.zero_point = const i8[2] [0, 0]
  %b.q = const i32[2] [50000, -15000]
  %b.scale = const f32[2] [{sx * F32(0.001)}, {sx * F32(0.002)}]
  %x.q = quantize(%x, %x.scale, %x.zero_point) {{dtype="i8"}} : i8[1,2,3,3] loc("x.q")
  %x.dq = dequantize(%x.q, %x.scale, %x.zero_point) : f32[1,2,3,3] loc("x.dq")
  %K.dq = dequantize(%K.q, %K.scale, %K.zero_point) {{axis=0}} : f32[2,1,2,2] loc("K.dq")
  %b.dq = dequantize(%b.q, %b.scale) {{axis=0}} : f32[2] loc("b.dq")
  %y = conv(%x.dq, %K.dq, %b.dq) {{group=2}} : f32[1,2,2,2]
}}"""
    _same(got, expected)


def test_per_tensor_weights():
    x = np.array([[-1.0, 0.0, 1.0, 3.0]], F32)
    got, layers = insert_qdq(ir.parse(MATMUL.replace("[2,4]", "[1,4]").replace("[2,2]", "[1,2]")), [{"x": x}],
                             per_channel=False)
    assert got.constants["W.scale"].const.shape == () and got.constants["W.scale"].const == F32(0.02)
    np.testing.assert_array_equal(got.constants["W.q"].const.reshape(-1), [25, -13, 64, 5, -15, 127, 0, -50])
    assert layers[0].weight_scheme == "i8 symmetric per-tensor"
    ir.verify(got)


# ====================================================================== models for onnxruntime

def _gemm_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x[4,16] -> Gemm(transB) -> Relu -> MatMul + Add -> y[4,5] (torch's Linear and a plain MatMul+Add)."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="fc2_bias")]
    inits = {"w1": rng.standard_normal((12, 16)).astype(F32) * 0.3, "b1": rng.standard_normal(12).astype(F32) * 0.1,
             "w2": rng.standard_normal((12, 5)).astype(F32) * 0.3, "b2": rng.standard_normal(5).astype(F32) * 0.1}
    return make_model(nodes, [vi("x", F32, [4, 16])], [vi("y", F32, [4, 5])], inits, opset=21, ir_version=10)


def _cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv -> Relu -> grouped Conv -> Flatten -> Gemm -> y[1,5]."""
    nodes = [helper.make_node("Conv", ["x", "k1", "c1"], ["h1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "k2", "c2"], ["h2"], group=2, strides=[2, 2], name="conv2"),
             helper.make_node("Flatten", ["h2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1, name="fc")]
    inits = {"k1": rng.standard_normal((4, 3, 3, 3)).astype(F32) * 0.3, "c1": rng.standard_normal(4).astype(F32) * 0.1,
             "k2": rng.standard_normal((4, 2, 3, 3)).astype(F32) * 0.3, "c2": rng.standard_normal(4).astype(F32) * 0.1,
             "w": rng.standard_normal((5, 36)).astype(F32) * 0.3, "b": rng.standard_normal(5).astype(F32) * 0.1}
    return make_model(nodes, [vi("x", F32, [1, 3, 8, 8])], [vi("y", F32, [1, 5])], inits, opset=21, ir_version=10)


MODELS = {"mlp": (_gemm_mlp, (4, 16)), "cnn": (_cnn, (1, 3, 8, 8))}


def _setup(kind: str, n: int = 8) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    build, shape = MODELS[kind]
    rng = np.random.default_rng(5)
    model = build(rng)
    return model, [{"x": rng.standard_normal(shape).astype(F32)} for _ in range(n)]


def _ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", [13, 21, 23])
@pytest.mark.parametrize("kind", list(MODELS))
def test_onnxruntime_runs_the_qdq_graph_like_the_interpreter(kind: str, opset: int):
    model, samples = _setup(kind)
    q, layers = insert_qdq(lift(model), samples)
    codes = [n.outputs[0] for n in q.nodes if n.op == "quantize"]
    assert len(codes) == len({a for layer in layers for a in layer.inputs}) >= 2
    probe = q.clone()
    probe.set_outputs([*probe.outputs, *(probe.value(c.name) for c in codes)])
    onx = lower_to_onnx(probe, opset=opset)
    assert onx.opset_import[0].version == opset
    ops = [n.op_type for n in onx.graph.node]
    assert ops.count("QuantizeLinear") == len(codes) and ops.count("DequantizeLinear") == len(codes) + 2 * len(layers)
    inits = {t.name: numpy_helper.to_array(t) for t in onx.graph.initializer}
    for layer in layers:
        assert inits[f"{layer.weight}.q"].dtype == np.int8 and inits[f"{layer.bias}.q"].dtype == np.int32
        assert inits[f"{layer.weight}.scale"].ndim == 1 and inits[f"{layer.bias}.scale"].ndim == 1
    axes = {n.output[0]: helper.get_attribute_value(next(a for a in n.attribute if a.name == "axis"))
            for n in onx.graph.node if n.op_type == "DequantizeLinear"}
    assert {axes[f"{lay.weight}.dq"] for lay in layers} == ({1} if kind == "mlp" else {0, 1})
    sess = _ort_session(onx)
    for feeds in samples[:3]:
        got = dict(zip([o.name for o in onx.graph.output], sess.run(None, feeds)))
        want = ir.interpret(probe, feeds)
        for c in codes:
            g, w = got[c.name].astype(np.int32), want[c.name].astype(np.int32)
            if c.producer.inputs[0].producer is None:
                np.testing.assert_array_equal(g, w)
            assert np.abs(g - w).max() <= 1 and np.mean(g != w) <= 0.005, c.name
        y = want["y"].astype(np.float64)
        np.testing.assert_allclose(got["y"], y, rtol=0, atol=1e-5 * np.abs(y).max())


@pytest.mark.parametrize("kind", list(MODELS))
def test_qparams_agree_with_quantize_static(kind: str, tmp_path: Path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model, samples = _setup(kind)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    qm = onnx.load(str(dst))
    inits = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    made = {o: n for n in qm.graph.node for o in n.output}

    def dq_params(name: str) -> tuple[str, np.ndarray, np.ndarray]:
        dq = made[name]
        src_name = made[dq.input[0]].input[0] if dq.input[0] in made else dq.input[0]
        return src_name, inits[dq.input[1]], inits[dq.input[2]]

    q, layers = insert_qdq(lift(model), samples)
    by_input = {layer.inputs[0]: layer for layer in layers}
    ort_layers = [n for n in qm.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert len(ort_layers) == len(layers)
    for n in ort_layers:
        act, s_o, z_o = dq_params(n.input[0])
        layer = by_input[act]
        (s_k, z_k), = layer.act_qparams
        if act == "x":
            assert (s_k, z_k) == (float(s_o), int(z_o))
        else:
            assert abs(s_k - float(s_o)) <= 1e-5 * float(s_o) and abs(z_k - int(z_o)) <= 1, (act, s_k, z_k, s_o, z_o)
            lo_k, lo_o = (-128 - z_k) * s_k, (-128 - int(z_o)) * float(s_o)
            assert abs(lo_k - lo_o) <= float(s_o)  # the representable range starts within one step
        _, ws_o, wz_o = dq_params(n.input[1])
        wdq = q.value(f"{layer.weight}.dq").producer
        np.testing.assert_array_equal(wdq.inputs[1].const, ws_o)
        np.testing.assert_array_equal(wdq.inputs[2].const, wz_o)
        if len(n.input) > 2:  # Gemm / Conv biases: ORT's i32 codes and scale sx*sw
            bdq_o = made[n.input[2]]
            bdq = q.value(f"{layer.bias}.dq").producer
            codes, codes_o = bdq.inputs[0].const, inits[bdq_o.input[0]]
            exact = act == "x"  # a computed activation's scale may differ in the last bit (see above)
            assert np.abs(codes.astype(np.int64) - codes_o).max() <= (0 if exact else 1)
            np.testing.assert_allclose(bdq.inputs[1].const, inits[bdq_o.input[1]], rtol=0 if exact else 1e-5)


# ====================================================================== refusals, options

REFUSED = {
    "conv weight not constant": ("""graph @main(%x: f32[1,2,4,4], %w: f32[3,2,3,3]) -> (%y) {
  %y = conv(%x, %w, _) : f32[1,3,2,2]
}""", "y", "not a constant"),
    "weight already quantized": ("""graph @main(%x: f32[2,4]) -> (%y) {
  %Wq = const i8[4,3] [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  %Ws = const f32[3] [0.1, 0.2, 0.3]
  %Wd = dequantize(%Wq, %Ws) {axis=1} : f32[4,3]
  %y = matmul(%x, %Wd) : f32[2,3]
}""", "y", "already quantized"),
    "3-D constant weight": ("""graph @main(%x: f32[2,3,4]) -> (%y) {
  %W = const f32[2,4,1] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
  %y = matmul(%x, %W) : f32[2,3,1]
}""", "y", "only a 2-D [K, N] weight"),
    "f64": ("""graph @main(%x: f64[2,2]) -> (%y) {
  %W = const f64[2,2] [1.0, 2.0, 3.0, 4.0]
  %y = matmul(%x, %W) : f64[2,2]
}""", "y", "dtype f64"),
    "constant first operand": ("""graph @main(%x: f32[2,2]) -> (%y) {
  %A = const f32[2,2] [1.0, 2.0, 3.0, 4.0]
  %y = matmul(%A, %x) : f32[2,2]
}""", "y", "first operand %A is a constant"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_leave_the_graph_unchanged(case: str):
    text, at, words = REFUSED[case]
    g = ir.parse(text)
    log = PassLog("insert-qdq")
    got, layers = insert_qdq(g, [], log=log)
    assert _text(got) == _text(g) and layers == []
    assert [(r.at, words in r.reason) for r in log.refusals] == [(at, True)], log.refusals
    res = run_pipeline_report(g, "insert-qdq")
    assert _text(res.graph) == _text(g) and len(res.refusals) == 1


TWO = """graph @main(%x: f32[2,4]) -> (%y, %z) {
  %W = const f32[4,2] [0.5, -0.26, 1.27, 0.1, -0.3, 2.54, 0.0, -1.0]
  %y = matmul(%x, %W) : f32[2,2] loc("first")
  %z = matmul(%x, %W) : f32[2,2] loc("second")
}"""
X = [{"x": np.array([[-1.0, 0.0, 1.0, 3.0], [0.5, 0.5, 2.0, -0.5]], F32)}]


def test_shared_activation_and_weight_get_one_pair_each():
    got, layers = insert_qdq(ir.parse(TWO), X)
    assert got.op_counts() == {"quantize": 1, "dequantize": 2, "matmul": 2}
    assert [lay.node for lay in layers] == ["first", "second"] and "W" not in got.constants
    ir.verify(got)


@pytest.mark.parametrize("name", ["second", "z"])
def test_exclude_by_node_or_value_name(name: str):
    log = PassLog("insert-qdq")
    got, layers = insert_qdq(ir.parse(TWO), X, exclude=[name], log=log)
    assert [lay.node for lay in layers] == ["first"]
    z = got.value("z").producer
    assert z.inputs[0].name == "x" and z.inputs[1].name == "W"  # left float, W kept for it
    assert [(r.at, r.reason) for r in log.refusals] == [("second", "excluded from quantization by the caller")]


ATTN = """graph @main(%q: f32[2,3,4], %k: f32[2,4,3], %v: f32[2,3,4]) -> (%o) {
  %s = matmul(%q, %k) : f32[2,3,3]
  %a = softmax(%s) {axis=-1} : f32[2,3,3]
  %as = const f32[] [0.00390625]
  %aq = quantize(%a, %as) {dtype="u8"} : u8[2,3,3]
  %ad = dequantize(%aq, %as) : f32[2,3,3]
  %o = matmul(%ad, %v) : f32[2,3,4]
}"""


def _attn_samples(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"q": rng.standard_normal((2, 3, 4)).astype(F32), "k": rng.standard_normal((2, 4, 3)).astype(F32),
             "v": rng.standard_normal((2, 3, 4)).astype(F32)} for _ in range(n)]


def test_activation_x_activation_and_already_quantized_operands():
    """Q.K^T gets two pairs; A.V only one: A is already the output of a dequantize."""
    got, layers = insert_qdq(ir.parse(ATTN), _attn_samples())
    ir.verify(got)
    assert [(lay.node, lay.inputs, lay.weight_scheme) for lay in layers] == [
        ("s", ("q", "k"), "activation"), ("o", ("v",), "activation")]
    assert got.value("o").producer.inputs[0].name == "ad"
    assert got.op_counts()["quantize"] == 4  # q, k, v and the one already there


def test_fixed_and_skip():
    samples = _attn_samples()
    got, layers = insert_qdq(ir.parse(ATTN), samples, fixed={"q": (0.05, 3)}, skip={"v"})
    assert (float(got.constants["q.scale"].const), int(got.constants["q.zero_point"].const)) == (float(F32(0.05)), 3)
    assert layers[0].act_source == ("fixed", "calibrated") and layers[0].ranges[0] is None
    assert layers[1].act_source == ("skipped",) and layers[1].act_qparams == (None,)
    assert got.value("o").producer.inputs[1].name == "v"
    with pytest.raises(ValueError, match=r"%q: expected a finite scale > 0 and an integer zero point in \[-128, 127\]"):
        insert_qdq(ir.parse(ATTN), samples, fixed={"q": (0.05, 200)})


def test_all_fixed_needs_no_calibration_and_skip_keeps_bias_float():
    got, layers = insert_qdq(ir.parse(MATMUL), [], fixed={"x": (0.05, 0)})
    assert got.constants["b.q"].const.tolist() == [400, -400]  # 0.2 / (0.05 * 0.01), -0.4 / (0.05 * 0.02)
    got, layers = insert_qdq(ir.parse(MATMUL), [], skip={"x"})
    assert layers[0].bias == "" and "b" in got.constants and got.value("mm").producer.inputs[0].name == "x"


def test_second_run_changes_nothing():
    once, _ = insert_qdq(ir.parse(MATMUL), X)
    log = PassLog("insert-qdq")
    twice, layers = insert_qdq(once, [], log=log)
    assert _text(twice) == _text(once) and layers == []
    assert "already quantized" in log.refusals[0].reason


def test_pipeline_string_with_synthetic_and_file_calibration(tmp_path: Path):
    model, samples = _setup("mlp")
    g = lift(model)
    q = run_pipeline(g, "insert-qdq")
    assert q.op_counts()["quantize"] == 2 and _text(q) != _text(g)
    for i, s in enumerate(samples):
        np.savez(tmp_path / f"s{i}.npz", **s)
    q1 = run_pipeline(g, f"insert-qdq{{calib={tmp_path},samples=0,method=minmax}}")
    q2, _ = insert_qdq(g, samples)
    assert _text(q1) == _text(q2)
    q3 = run_pipeline(g, "insert-qdq{method=mse,samples=2,seed=3,per_channel=false}")
    weight_dqs = [n for n in q3.nodes if n.op == "dequantize" and n.inputs[0].is_const and n.inputs[0].type.dtype == "i8"]
    assert len(weight_dqs) == 2 and all(n.inputs[1].type.rank == 0 for n in weight_dqs)
    assert str(InsertQDQ(method="entropy", samples=4)) == "insert-qdq{method=entropy,samples=4}"
    with pytest.raises(PipelineError, match="method must be one of minmax, percentile, entropy, mse"):
        run_pipeline(g, "insert-qdq{method=kl}")


def test_non_finite_weight_is_refused_and_unrepresentable_bias_stays_float():
    text = MATMUL.replace("[0.5, -0.26, 1.27, 0.1, -0.3, 2.54, 0.0, -1.0]", "dense<elided>")
    g = ir.parse(text, constants={"W": np.array([[np.nan, 1], [1, 1], [1, 1], [1, np.inf]], F32)})
    log = PassLog("insert-qdq")
    got, layers = insert_qdq(g, X, log=log)
    assert _text(got) == _text(g) and [r.reason for r in log.refusals] == ["weight %W has non-finite values"]
    log = PassLog("insert-qdq")
    got, layers = insert_qdq(ir.parse(MATMUL), [], fixed={"x": (1e-30, 0)}, log=log)
    assert layers[0].bias == "" and got.value("y").producer.inputs[1].name == "b"
    assert "bias %b left float: its codes b / (sx*sw) do not fit int32" in log.rewrites[0][1]
