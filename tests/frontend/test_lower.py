"""lower_to_onnx: kiln IR -> ONNX that onnx.checker accepts and onnxruntime runs like the interpreter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln import ir
from kiln.frontend import LoweringError, lift, lower_to_onnx
from kiln.frontend.lower import DEFAULT_OPSET

from .conftest import assert_close, ort_run


def _feeds(g: ir.Graph, env: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in g.inputs:
        shape = ir.types.eval_shape(v.type.shape, env or {})
        out[v.name] = rng.standard_normal(shape).astype(v.type.np_dtype)
    return out


def roundtrip(text: str, *, opset: int = DEFAULT_OPSET, env: dict[str, int] | None = None,
              rtol: float = 1e-5) -> onnx.ModelProto:
    """Lower the graph, check it with onnx.checker (full), and compare onnxruntime with the interpreter."""
    g = ir.verify(ir.parse(text))
    before = ir.print_graph(g)
    model = lower_to_onnx(g, opset=opset)
    assert ir.print_graph(g) == before, "lowering modified its input graph"
    onnx.checker.check_model(model, full_check=True)
    feeds = _feeds(g, env)
    want = ir.interpret(g, feeds)
    got = ort_run(model, feeds)
    assert [o.name for o in model.graph.output] == list(want)
    for w, x in zip(want.values(), got):
        assert_close(x, w, rtol=rtol, atol=rtol)
    return model


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_model_header():
    model = roundtrip("graph @m(%x: f32[2,3]) -> (%y) {\n  %y = relu(%x) : f32[2,3]\n}\n")
    assert model.opset_import[0].domain == "" and model.opset_import[0].version == DEFAULT_OPSET == 23
    assert model.ir_version == 11 <= 13  # onnxruntime 1.31 reads IR <= 13; opset 23 needs 11
    assert model.producer_name == "kiln"
    assert model.graph.name == "m"


def test_attr_inputs_become_initializers_and_absent_ones_empty_names():
    model = roundtrip("""
graph @m(%x: f32[2,3,4]) -> (%y) {
  %r = reshape(%x) {shape=[0, -1]} : f32[2,12]
  %c = clip(%r) {max=0.5} : f32[2,12]
  %s = slice(%c) {axes=[1], ends=[10], starts=[1]} : f32[2,9]
  %p = pad(%s) {pads=[0, 1, 0, 2], value=1.5} : f32[2,12]
  %y = reduce_sum(%p) {axes=[1], keepdims=0} : f32[2]
}
""")
    nodes = {n.op_type: n for n in model.graph.node}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    shape = inits[nodes["Reshape"].input[1]]
    assert shape.dtype == np.int64 and shape.tolist() == [0, -1]
    assert list(nodes["Clip"].input)[1] == ""  # min is absent
    assert inits[nodes["Clip"].input[2]].dtype == np.float32 and inits[nodes["Clip"].input[2]].shape == ()
    assert len(nodes["Slice"].input) == 4  # axes, no steps
    assert inits[nodes["Pad"].input[2]].dtype == np.float32
    assert [a.name for a in nodes["Reshape"].attribute] == ["allowzero"]  # shape is an input


def test_symbolic_dims_become_dim_params():
    model = roundtrip("""
graph @m(%x: f32[N,2,3]) -> (%y) {
  %y = reshape(%x) {shape=[-1, 3]} : f32[2*N,3]
}
""", env={"N": 3})
    (dim0, dim1) = model.graph.output[0].type.tensor_type.shape.dim
    assert (dim0.dim_param, dim1.dim_value) == ("2*N", 3)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_node_names_are_kept():
    model = roundtrip("""
graph @m(%x: f32[4]) -> (%y) {
  %a = relu(%x) : f32[4] loc("/block/relu")
  %y = neg(%a) : f32[4] loc("/block/relu")
}
""")
    assert [n.name for n in model.graph.node] == ["/block/relu", "/block/relu_1"]


def test_silu_is_decomposed_and_keeps_the_output_name():
    model = roundtrip("graph @m(%x: f32[3,4]) -> (%y) {\n  %y = silu(%x) : f32[3,4]\n}\n")
    assert sorted(_ops(model)) == ["Identity", "Mul", "Sigmoid"]
    assert model.graph.output[0].name == "y"


RMS = """
graph @m(%x: f32[2,3,8]) -> (%y) {
  %w = const f32[8] [1.5, 0.5, -1.0, 2.0, 0.25, 1.0, -0.75, 3.0]
  %y = rms_norm(%x, %w) {axis=-1, epsilon=1e-06} : f32[2,3,8]
}
"""


def test_rms_norm_at_opset_23_and_decomposed_below():
    assert _ops(roundtrip(RMS)) == ["RMSNormalization"]
    assert "RMSNormalization" not in _ops(roundtrip(RMS, opset=21))


def test_layer_norm_and_gelu_at_their_opsets():
    text = """
graph @m(%x: f32[2,8]) -> (%y) {
  %w = const f32[8] [1.5, 0.5, -1.0, 2.0, 0.25, 1.0, -0.75, 3.0]
  %n = layer_norm(%x, %w) {axis=-1, epsilon=1e-05} : f32[2,8]
  %y = gelu(%n) {approximate="tanh"} : f32[2,8]
}
"""
    assert _ops(roundtrip(text)) == ["LayerNormalization", "Gelu"]
    with pytest.raises(LoweringError, match="kiln op gelu \\(node y\\) has no ONNX spelling at opset 18 and no "
                                            "decomposition"):
        lower_to_onnx(ir.parse(text), opset=18)


def test_range_without_onnx_spelling_is_written_as_a_constant():
    model = roundtrip("""
graph @m(%x: f32[5]) -> (%y) {
  %r = range() {delta=1.5, dtype="f32", limit=7.0, start=0.0} : f32[5]
  %y = add(%x, %r) : f32[5]
}
""")
    assert _ops(model) == ["Add"]


def test_outputs_that_are_inputs_or_constants():
    roundtrip("""
graph @m(%x: f32[3]) -> (%x, %c, %y) {
  %c = const f32[2] [1.0, 2.0]
  %y = relu(%x) : f32[3]
}
""")


def test_a_repeated_output_gets_a_second_name():
    g = ir.parse("graph @m(%x: f32[3]) -> (%y, %y) {\n  %y = relu(%x) : f32[3]\n}\n")
    model = lower_to_onnx(g)
    assert [o.name for o in model.graph.output] == ["y", "y_1"]
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    a, b = ort_run(model, {"x": x})
    assert_close(a, np.maximum(x, 0))
    assert_close(b, np.maximum(x, 0))


def test_quantized_int4_and_bool_and_int_constants():
    roundtrip("""
graph @m(%x: f32[2,4]) -> (%y, %m) {
  %s = const f32[2,2] [0.5, 0.25, 0.3, 1.0]
  %z = const i4[2,2] [1, -2, 0, 7]
  %t = const bool[4] [1, 0, 1, 1]
  %q = quantize(%x, %s, %z) {axis=1, block_size=2, dtype="i4"} : i4[2,4]
  %y = dequantize(%q, %s, %z) {axis=1, block_size=2} : f32[2,4]
  %m = where(%t, %x, %y) : f32[2,4]
}
""")


def test_lift_of_lowered_graph_gives_the_same_graph():
    text = """
graph @m(%x: f32[1,3,8,8]) -> (%y) {
  %w = const f32[2,3,1,1] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  %c = conv(%x, %w) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1]} : f32[1,2,8,8] loc("conv")
  %s = softmax(%c) {axis=1} : f32[1,2,8,8] loc("softmax")
  %y = max_pool(%s) {ceil_mode=0, dilations=[1, 1], kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[2, 2]} : f32[1,2,4,4] loc("pool")
}
"""
    g = ir.parse(text)
    again = lift(lower_to_onnx(g))
    assert ir.structurally_equal(again, g) is None


def test_opset_out_of_range():
    g = ir.parse("graph @m(%x: f32[2]) -> (%y) {\n  %y = relu(%x) : f32[2]\n}\n")
    with pytest.raises(LoweringError, match="cannot lower to opset 11: kiln lowers to opsets 13\\.\\."):
        lower_to_onnx(g, opset=11)


def test_lowered_model_loads_in_onnxruntime_without_checker(tmp_path):
    g = ir.parse("graph @m(%x: f32[2]) -> (%y) {\n  %y = exp(%x) : f32[2]\n}\n")
    model = lower_to_onnx(g, check=False)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.array([0.0, 1.0], np.float32)
    assert_close(ort_run(onnx.load(path), {"x": x})[0], np.exp(x))
    assert helper.printable_graph(model.graph).startswith("graph m")


def test_lowering_refuses_a_dtype_the_opset_does_not_allow():
    from kiln.frontend.errors import LoweringError
    from kiln.ir import parse

    g = parse("""graph @main(%a: i32[4], %b: i32[4]) -> (%y) {
  %y = bit_shift(%a, %b) {direction="LEFT"} : i32[4]
}""")
    with pytest.raises(LoweringError, match=r"BitShift-11 \(opset 23\) does not take i32 .*opset 28"):
        lower_to_onnx(g, opset=23)
    assert lower_to_onnx(g, opset=28).opset_import[0].version == 28
