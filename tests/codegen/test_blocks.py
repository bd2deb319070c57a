"""Fused blocks (``Node.block``, the fuse-blocks partition): one scheduled kernel per block, matching the interpreter.

Each composition of the partition's contract is hand-annotated in IR text,
compiled with ``kiln.compile`` (no passes: the blocks stay as written), loaded,
run and compared with ``kiln.ir.interpret``; the kernels are checked to be one
per block, each with a schedule and no stage left serial (a perf cliff).
"""

import re

import numpy as np
import pytest

import kiln
from kiln import ir, zoo
from kiln.codegen import build as build_mod
from kiln.codegen.build import build_graph, epilogue_blocks, kernel_blocks, named_blocks
from kiln.codegen.kernel import CodegenError
from kiln.codegen.schedules import serial_stages
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import MODEL_F32, assert_close
from kiln.ir.types import to_numpy_dtype

TARGET = host_target()

# name -> (IR text, number of blocks); constants are `dense<elided>` and made by _constants
CASES = {
    "transpose_matmul_add_gelu": ("""graph @g(%x: f32[32,24]) -> (%y) {
      %w = const f32[32,40] dense<elided>
      %b = const f32[40] dense<elided>
      %t = transpose(%x) {perm=[1, 0]} : f32[24,32] block("b0")
      %m = matmul(%t, %w) : f32[24,40] block("b0")
      %a = add(%m, %b) : f32[24,40] block("b0")
      %y = gelu(%a) : f32[24,40] block("b0")
    }""", 1),
    "attention_scores_transposed_operands_scale_mask": ("""graph @g(%q: f32[1,16,2,8], %k: f32[1,16,2,8]) -> (%y) {
      %s = const f32[] dense<elided>
      %mask = const bool[16,16] dense<elided>
      %fill = const f32[] dense<elided>
      %qt = transpose(%q) {perm=[0, 2, 1, 3]} : f32[1,2,16,8] block("b0")
      %kt = transpose(%k) {perm=[0, 2, 3, 1]} : f32[1,2,8,16] block("b0")
      %m = matmul(%qt, %kt) : f32[1,2,16,16] block("b0")
      %sc = mul(%m, %s) : f32[1,2,16,16] block("b0")
      %y = where(%mask, %sc, %fill) : f32[1,2,16,16] block("b0")
    }""", 1),
    "transposed_value_matmul": ("""graph @g(%p: f32[1,2,17,17], %v: f32[1,17,2,8]) -> (%y) {
      %vt = transpose(%v) {perm=[0, 2, 1, 3]} : f32[1,2,17,8] block("b0")
      %y = matmul(%p, %vt) : f32[1,2,17,8] block("b0")
    }""", 1),
    "matmul_silu_diamond_residual": ("""graph @g(%x: f32[8,32], %r: f32[8,48]) -> (%y) {
      %w = const f32[32,48] dense<elided>
      %b = const f32[48] dense<elided>
      %m = matmul(%x, %w) : f32[8,48] block("b0")
      %a = add(%m, %b) : f32[8,48] block("b0")
      %s = sigmoid(%a) : f32[8,48] block("b0")
      %z = mul(%a, %s) : f32[8,48] block("b0")
      %y = add(%z, %r) : f32[8,48] block("b0")
    }""", 1),
    "dequantized_weight_matmul_relu": ("""graph @g(%x: f32[4,32]) -> (%y) {
      %w = const i8[32,40] dense<elided>
      %sc = const f32[40] dense<elided>
      %zp = const i8[40] dense<elided>
      %d = dequantize(%w, %sc, %zp) {axis=1} : f32[32,40] block("b0")
      %m = matmul(%x, %d) : f32[4,40] block("b0")
      %y = relu(%m) : f32[4,40] block("b0")
    }""", 1),
    "elementwise_diamond": ("""graph @g(%x: f32[8,40], %z: f32[8,40]) -> (%y) {
      %c = const f32[40] dense<elided>
      %a = add(%x, %c) : f32[8,40] block("b0")
      %s = sigmoid(%a) : f32[8,40] block("b0")
      %e = exp(%a) : f32[8,40] block("b0")
      %m = mul(%s, %e) : f32[8,40] block("b0")
      %y = add(%m, %z) : f32[8,40] block("b0")
    }""", 1),
    "injective_and_elementwise": ("""graph @g(%x: f32[8,16,4], %z: f32[16,8,6]) -> (%y) {
      %t = transpose(%x) {perm=[1, 0, 2]} : f32[16,8,4] block("b0")
      %s = slice(%z) {starts=[1], ends=[3], axes=[2]} : f32[16,8,2] block("b0")
      %c = concat(%t, %s) {axis=2} : f32[16,8,6] block("b0")
      %a = add(%c, %z) : f32[16,8,6] block("b0")
      %y = relu(%a) : f32[16,8,6] block("b0")
    }""", 1),
    "layer_norm_mul_add": ("""graph @g(%x: f32[2,16,64], %r: f32[2,16,64]) -> (%y) {
      %g = const f32[64] dense<elided>
      %b = const f32[64] dense<elided>
      %s = const f32[64] dense<elided>
      %n = layer_norm(%x, %g, %b) {axis=-1, epsilon=1e-5} : f32[2,16,64] block("b0")
      %m = mul(%n, %s) : f32[2,16,64] block("b0")
      %y = add(%m, %r) : f32[2,16,64] block("b0")
    }""", 1),
    "ragged_layer_norm_mul_add": ("""graph @g(%x: f32[3,5,45], %r: f32[3,5,45]) -> (%y) {
      %g = const f32[45] dense<elided>
      %b = const f32[45] dense<elided>
      %s = const f32[45] dense<elided>
      %n = layer_norm(%x, %g, %b) {axis=-1, epsilon=1e-5} : f32[3,5,45] block("b0")
      %m = mul(%n, %s) : f32[3,5,45] block("b0")
      %y = add(%m, %r) : f32[3,5,45] block("b0")
    }""", 1),
    "residual_rms_norm_mul": ("""graph @g(%x: f32[1,32,128], %r: f32[1,32,128]) -> (%y) {
      %g = const f32[128] dense<elided>
      %s = const f32[128] dense<elided>
      %a = add(%x, %r) : f32[1,32,128] block("b0")
      %n = rms_norm(%a, %g) {axis=-1, epsilon=1e-6} : f32[1,32,128] block("b0")
      %y = mul(%n, %s) : f32[1,32,128] block("b0")
    }""", 1),
    "scale_mask_softmax": ("""graph @g(%x: f32[1,2,16,16]) -> (%y) {
      %s = const f32[] dense<elided>
      %mask = const bool[16,16] dense<elided>
      %fill = const f32[] dense<elided>
      %m = mul(%x, %s) : f32[1,2,16,16] block("b0")
      %w = where(%mask, %m, %fill) : f32[1,2,16,16] block("b0")
      %y = softmax(%w) {axis=-1} : f32[1,2,16,16] block("b0")
    }""", 1),
    "scale_mask_softmax_scale": ("""graph @g(%x: f32[2,64,64]) -> (%y) {
      %s = const f32[] dense<elided>
      %mask = const bool[64,64] dense<elided>
      %fill = const f32[] dense<elided>
      %m = mul(%x, %s) : f32[2,64,64] block("b0")
      %w = where(%mask, %m, %fill) : f32[2,64,64] block("b0")
      %p = softmax(%w) {axis=-1} : f32[2,64,64] block("b0")
      %y = mul(%p, %s) : f32[2,64,64] block("b0")
    }""", 1),
    "reduce_mean_epilogue": ("""graph @g(%x: f32[4,24,40]) -> (%y) {
      %s = const f32[4,24,1] dense<elided>
      %e = exp(%x) : f32[4,24,40] block("b0")
      %m = reduce_mean(%e) {axes=[2], keepdims=1} : f32[4,24,1] block("b0")
      %y = mul(%m, %s) : f32[4,24,1] block("b0")
    }""", 1),
    "scaled_conv_bias_relu": ("""graph @g(%x: f32[1,8,12,12]) -> (%y) {
      %sc = const f32[1,8,1,1] dense<elided>
      %w = const f32[16,8,3,3] dense<elided>
      %b = const f32[1,16,1,1] dense<elided>
      %p = mul(%x, %sc) : f32[1,8,12,12] block("b0")
      %c = conv(%p, %w) {pads=[1, 1, 1, 1]} : f32[1,16,12,12] block("b0")
      %a = add(%c, %b) : f32[1,16,12,12] block("b0")
      %y = relu(%a) : f32[1,16,12,12] block("b0")
    }""", 1),
    "relu_conv1x1_bias_residual": ("""graph @g(%x: f32[1,16,8,16], %r: f32[1,24,8,16]) -> (%y) {
      %w = const f32[24,16,1,1] dense<elided>
      %b = const f32[24] dense<elided>
      %p = relu(%x) : f32[1,16,8,16] block("b0")
      %c = conv(%p, %w, %b) : f32[1,24,8,16] block("b0")
      %y = add(%c, %r) : f32[1,24,8,16] block("b0")
    }""", 1),
    "conv_transpose_relu": ("""graph @g(%x: f32[1,4,6,6]) -> (%y) {
      %w = const f32[4,8,3,3] dense<elided>
      %b = const f32[1,8,1,1] dense<elided>
      %p = neg(%x) : f32[1,4,6,6] block("b0")
      %c = conv_transpose(%p, %w) {strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]} : f32[1,8,12,12] block("b0")
      %a = add(%c, %b) : f32[1,8,12,12] block("b0")
      %y = relu(%a) : f32[1,8,12,12] block("b0")
    }""", 1),
    "relu_max_pool_add": ("""graph @g(%x: f32[1,8,16,16], %r: f32[1,8,8,8]) -> (%y) {
      %p = relu(%x) : f32[1,8,16,16] block("b0")
      %m = max_pool(%p) {kernel_shape=[2, 2], strides=[2, 2]} : f32[1,8,8,8] block("b0")
      %y = add(%m, %r) : f32[1,8,8,8] block("b0")
    }""", 1),
    "global_avg_pool_sigmoid": ("""graph @g(%x: f32[1,32,7,7]) -> (%y) {
      %g = global_avg_pool(%x) : f32[1,32,1,1] block("b0")
      %y = sigmoid(%g) : f32[1,32,1,1] block("b0")
    }""", 1),
}


def _constants(text: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Values for the elided constants of ``text``: causal masks, -inf fills, int8 weights, else normals."""
    out: dict[str, np.ndarray] = {}
    for m in re.finditer(r"%(\w+) = const (\w+)\[([\d,]*)\] dense<elided>", text):
        name, dtype, shape = m[1], m[2], tuple(int(d) for d in m[3].split(",") if d)
        if dtype == "bool":
            out[name] = np.tril(np.ones(shape, bool))
        elif name == "fill":
            out[name] = np.array(-np.inf, np.float32)
        elif dtype == "i8":
            out[name] = rng.integers(-100, 100, shape).astype(np.int8)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _graph(text: str) -> ir.Graph:
    return ir.parse(text, constants=_constants(text, np.random.default_rng(0)))


def _feeds(graph: ir.Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {v.name: rng.standard_normal(v.type.shape).astype(to_numpy_dtype(v.type.dtype)) for v in graph.inputs}


@pytest.fixture
def built(monkeypatch):
    """The CompiledGraph of each build_graph call (kiln.compile keeps only the artifact)."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(build_graph(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(build_mod, "build_graph", spy)
    return seen


def _assert_scheduled(kernels) -> None:
    for k in kernels:
        assert k.scheduled, (k.name, k.notes)
        assert not serial_stages(k.func), (k.name, serial_stages(k.func))


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_is_one_scheduled_kernel_matching_the_interpreter(name, built):
    text, blocks = CASES[name]
    graph = _graph(text)
    feeds = _feeds(graph)
    art = kiln.compile(graph, feeds, passes="")
    assert not art.stats["notes"], art.stats["notes"]
    got = art.load().run(feeds)
    expected = ir.interpret(graph, feeds)
    for k in expected:
        assert_close(got[k], expected[k], what=f"{name}:{k}")
    (compiled,) = built
    assert len(compiled.kernels) == blocks == art.stats["kernels"]
    _assert_scheduled(compiled.kernels)


def test_kernel_node_is_the_anchor_and_the_schedule_is_its():
    compiled = build_graph(_graph(CASES["transpose_matmul_add_gelu"][0]), TARGET)
    (k,) = compiled.kernels
    assert [n.op for n in k.nodes] == ["transpose", "matmul", "add", "gelu"]
    assert k.node.op == "matmul" and k.kind == "matmul"
    compiled = build_graph(_graph(CASES["scale_mask_softmax"][0]), TARGET)
    assert compiled.kernels[0].node.op == "softmax" and compiled.kernels[0].kind == "reduction"


INTERLEAVED = """graph @g(%x: f32[4,32], %z: f32[4,16]) -> (%y, %u) {
  %w = const f32[32,16] dense<elided>
  %n = neg(%x) : f32[4,32] block("b0")
  %e = exp(%z) : f32[4,16] block("b1")
  %m = matmul(%n, %w) : f32[4,16] block("b0")
  %f = add(%e, %z) : f32[4,16] block("b1")
  %r = reshape(%f) {shape=[8, 8]} : f32[8,8] block("b1")
  %a = add(%m, %z) : f32[4,16] block("b0")
  %t = tanh(%a) : f32[4,16]
  %y = relu(%r) : f32[8,8] block("b2")
  %u = sub(%t, %f) : f32[4,16] block("b3")
}"""


def test_named_blocks_group_by_name_in_graph_order_views_stay_views():
    graph = _graph(INTERLEAVED)
    blocks = [[n.outputs[0].name for n in b] for b in kernel_blocks(graph)]
    assert blocks == [["n", "m", "a"], ["e", "f"], ["t"], ["y"], ["u"]]
    feeds = _feeds(graph)
    compiled = build_graph(graph, TARGET)
    assert len(compiled.kernels) == 5
    _assert_scheduled(compiled.kernels)
    got = kiln.compile(graph, feeds, passes="").load().run(feeds)
    expected = ir.interpret(graph, feeds)
    for k in expected:
        assert_close(got[k], expected[k], what=k)


def test_unannotated_graphs_keep_the_epilogue_partition():
    text = CASES["matmul_silu_diamond_residual"][0].replace(' block("b0")', "")
    graph = _graph(text)
    assert kernel_blocks(graph) == epilogue_blocks(graph)
    assert [[n.op for n in b] for b in kernel_blocks(graph)] == [["matmul", "add"], ["sigmoid"], ["mul"], ["add"]]


def test_a_block_whose_inner_value_leaves_it_is_refused_with_the_value_named():
    graph = _graph("""graph @g(%x: f32[4,8]) -> (%y, %a) {
      %a = relu(%x) : f32[4,8] block("b0")
      %y = exp(%a) : f32[4,8] block("b0")
    }""")
    with pytest.raises(CodegenError, match=r"block 'b0': value 'a' of relu is a graph output, but only the block's "
                                           r"last node \(exp -> y\)"):
        named_blocks(graph)
    graph = _graph("""graph @g(%x: f32[4,8]) -> (%y, %z) {
      %a = relu(%x) : f32[4,8] block("b0")
      %y = exp(%a) : f32[4,8] block("b0")
      %z = neg(%a) : f32[4,8] block("b1")
    }""")
    with pytest.raises(CodegenError, match=r"value 'a' of relu is read by neg \(z\)"):
        build_graph(graph, TARGET)


BASE = "canonicalize,fold-conv-bn,dce"


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_under_fusion_matches_the_interpreter_with_fewer_scheduled_kernels(name, built):
    """Fewer kernels than the epilogue partition, unless fusion found the same blocks."""
    from kiln.frontend import lift

    _, example = zoo.get(name)
    feeds = {n: t.numpy() for n, t in zip(zoo.input_names(name), example)}
    art = kiln.compile(name, passes=BASE + ",fuse-blocks")
    assert not art.stats["notes"], art.stats["notes"]
    got = art.load().run(feeds)
    expected = ir.interpret(lift(zoo.onnx_model(name)), feeds)
    for k in expected:
        assert_close(got[k], expected[k], MODEL_F32, what=f"{name}:{k}")
    fused = built[-1]
    _assert_scheduled(fused.kernels)
    kiln.compile(name, passes=BASE)
    plain = built[-1]
    if len(fused.kernels) >= len(plain.kernels):
        ops = [[n.op for n in k.nodes] for k in fused.kernels]
        assert ops == [[n.op for n in k.nodes] for k in plain.kernels], "fusion made more or other kernels"


QDQ_LINEAR = """graph @g(%xq: u8[4,32]) -> (%y) {
  %sx = const f32[] [0.05]
  %zx = const u8[] [128]
  %wq = const i8[32,24] dense<elided>
  %sw = const f32[24] dense<elided>
  %b = const f32[24] dense<elided>
  %so = const f32[] [0.02]
  %zo = const u8[] [3]
  %x = dequantize(%xq, %sx, %zx) : f32[4,32]
  %w = dequantize(%wq, %sw, _) {axis=1} : f32[32,24]
  %m = matmul(%x, %w) : f32[4,24]
  %a = add(%m, %b) : f32[4,24]
  %r = relu(%a) : f32[4,24]
  %y = quantize(%r, %so, %zo) {dtype="u8"} : u8[4,24]
}"""


def test_a_quantized_linear_is_one_block_and_one_kernel_dequantize_and_requantize_folded_in(built):
    """dequantize (activation and int8 weight) -> matmul -> bias -> relu -> quantize: the fusion pass makes
    it one block and codegen one scheduled kernel, whose u8 output is the interpreter's to within one step."""
    graph = _graph(QDQ_LINEAR)
    graph.value("sw").const[...] = np.abs(graph.value("sw").const) * 0.01 + 1e-3
    feeds = {"xq": np.random.default_rng(2).integers(0, 256, (4, 32)).astype(np.uint8)}
    art = kiln.compile(graph, feeds, passes="fuse-blocks")
    (compiled,) = built
    assert [[n.op for n in k.nodes] for k in compiled.kernels] == [
        ["dequantize", "dequantize", "matmul", "add", "relu", "quantize"]]
    _assert_scheduled(compiled.kernels)
    got = art.load().run(feeds)["y"].astype(np.int32)
    want = ir.interpret(graph, feeds)["y"].astype(np.int32)
    assert np.abs(got - want).max() <= 1 and np.mean(got == want) > 0.95
    assert np.unique(want).size > 10


# GPT-2's attention layer as exported: one q/k/v projection, split, head views, kT via transpose(reshape(transpose)).
GPT_LAYER = """graph @g(%x: f32[16,64]) -> (%y) {
  %w = const f32[64,192] dense<elided>
  %c = const f32[] [0.5]
  %mask = const bool[1,1,16,16] dense<elided>
  %neg_inf = const f32[] [-inf]
  %m = matmul(%x, %w) : f32[16,192]
  %m3 = reshape(%m) {shape=[1, 16, 192]} : f32[1,16,192]
  %s0, %s1, %s2 = split(%m3) {axis=2, split=[64, 64, 64]} : f32[1,16,64], f32[1,16,64], f32[1,16,64]
  %hk = reshape(%s1) {shape=[1, 16, 4, 16]} : f32[1,16,4,16]
  %tk = transpose(%hk) {perm=[0, 2, 1, 3]} : f32[1,4,16,16]
  %hv = reshape(%s2) {shape=[1, 16, 4, 16]} : f32[1,16,4,16]
  %v = transpose(%hv) {perm=[0, 2, 1, 3]} : f32[1,4,16,16]
  %hq = reshape(%s0) {shape=[1, 16, 4, 16]} : f32[1,16,4,16]
  %tq = transpose(%hq) {perm=[0, 2, 1, 3]} : f32[1,4,16,16]
  %k3 = reshape(%tk) {shape=[4, 16, 16]} : f32[4,16,16]
  %kt3 = transpose(%k3) {perm=[0, 2, 1]} : f32[4,16,16]
  %kt4 = reshape(%kt3) {shape=[1, 4, 16, 16]} : f32[1,4,16,16]
  %q = mul(%tq, %c) : f32[1,4,16,16]
  %kT = mul(%kt4, %c) : f32[1,4,16,16]
  %s = matmul(%q, %kT) : f32[1,4,16,16]
  %sm = where(%mask, %neg_inf, %s) : f32[1,4,16,16]
  %p = softmax(%sm) {axis=-1} : f32[1,4,16,16]
  %o = matmul(%p, %v) : f32[1,4,16,16]
  %ot = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,16,4,16]
  %y = reshape(%ot) {shape=[16, 64]} : f32[16,64]
}"""


def test_gpt_attention_layer_is_three_kernels_after_hoist_views(built):
    """q/k/v projection, kT (slice+transpose+mul), and attention reading q and v from the projection."""
    graph = ir.parse(GPT_LAYER, constants={"w": np.random.default_rng(0).standard_normal((64, 192)).astype(
        np.float32) * 0.3, "mask": ~np.tril(np.ones((16, 16), bool))[None, None]})
    feeds = _feeds(graph)
    art = kiln.compile(graph, feeds, passes="hoist-views,sink-views,dce,fuse-blocks")
    assert not art.stats["notes"], art.stats["notes"]
    got = art.load().run(feeds)
    assert_close(got["y"], ir.interpret(graph, feeds)["y"], what="y")
    (compiled,) = built
    assert [[n.op for n in k.nodes] for k in compiled.kernels] == [
        ["matmul"],
        ["slice", "slice", "transpose", "transpose", "mul", "matmul", "where", "softmax", "matmul", "transpose"],
        ["slice", "transpose", "mul"]]  # kernels in the order of their first nodes
    assert compiled.kernels[1].kind == "attention"
    _assert_scheduled(compiled.kernels)
