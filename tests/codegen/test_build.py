"""codegen.build: a graph becomes a Relax main over one kernel per compute node; views cost no kernel."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln import ir
from kiln.codegen.build import build_graph, epilogue_blocks, specialize
from kiln.codegen.kernel import CodegenError
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import assert_close

TARGET = host_target()


def _run(compiled, feeds):
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[v.name]) for v in compiled.graph.inputs]
    args += [tvm.runtime.tensor(a) for a in compiled.weights.values()]
    result = vm["main"](*args)
    return [result.numpy()] if len(compiled.graph.outputs) == 1 else [r.numpy() for r in result]


def _check(graph, feeds):
    compiled = build_graph(graph, TARGET)
    expected = ir.interpret(graph, feeds)
    for got, v in zip(_run(compiled, feeds), graph.outputs):
        assert_close(got, expected[v.name], what=v.name)
    return compiled


def test_views_become_reshapes_and_outputs_may_be_inputs_constants_or_intermediates():
    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", (4, 32)))
    w = g.add_constant(np.linspace(-1, 1, 32, dtype=np.float32), "w")
    a = g.add_node("add", [x, w], out_names=["a"]).output
    r = g.add_node("reshape", [a], {"shape": [8, 16]}, out_names=["r"]).output
    z = g.add_node("relu", [r], out_names=["z"]).output
    c = g.add_constant(np.arange(3, dtype=np.float32), "c")
    g.set_outputs([z, a, x, c])
    compiled = _check(g, {"x": np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)})
    assert [k.node.op for k in compiled.kernels] == ["add", "relu"]
    assert set(compiled.weights) == {"w", "c"}


def test_structurally_equal_kernels_are_compiled_once():
    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", (2, 16)))
    v = x
    for i in range(4):
        v = g.add_node("relu", [v], out_names=[f"r{i}"]).output
        v = g.add_node("add", [v, g.add_constant(np.full(16, i, np.float32))], out_names=[f"a{i}"]).output
    g.set_outputs([v])
    compiled = _check(g, {"x": np.ones((2, 16), np.float32)})
    assert len(compiled.kernels) == 8
    assert compiled.unique_kernels == 2


def test_symbolic_dims_are_specialized_before_codegen():
    g = ir.parse("""graph @g(%x: f32[N, 8]) -> (%y) {
      %y = relu(%x) : f32[N, 8]
    }""")
    with pytest.raises(CodegenError, match=r"symbolic shape f32\[N,8\].*bind the symbols"):
        build_graph(g, TARGET)
    s = specialize(g, {"N": 3})
    assert s.inputs[0].type.shape == (3, 8) and g.inputs[0].type.shape == ("N", 8)
    _check(s, {"x": np.arange(24, dtype=np.float32).reshape(3, 8) - 12})
    with pytest.raises(CodegenError, match="give a value for each symbol"):
        specialize(g, {})


def test_an_op_without_lowering_is_named(monkeypatch):
    from kiln.ir import registry

    g = ir.parse("""graph @g(%x: f32[4]) -> (%y) {
      %y = relu(%x) : f32[4]
    }""")
    monkeypatch.setitem(registry._REGISTRY, "relu",
                        registry.replace(registry.get_op("relu"), lower_tvm=None))
    with pytest.raises(CodegenError, match=r"op 'relu' has no TVM lowering yet: relu \(y\)"):
        build_graph(g, TARGET)


def _blocks(text: str) -> list[list[str]]:
    """Output names per block of ``text``, whose elided f32 constants are given as zeros."""
    consts = {m[1]: np.zeros([int(d) for d in m[2].split(",")], np.float32)
              for m in re.finditer(r"%(\w+) = const f32\[([\d,]+)\] dense<elided>", text)}
    return [[n.outputs[0].name for n in b] for b in epilogue_blocks(ir.parse(text, constants=consts))]


def test_matmul_takes_its_bias_and_activation_but_not_a_shared_or_reshaping_consumer():
    text = """graph @g(%x: f32[4,8], %r: f32[4,16]) -> (%z, %u) {
      %w = const f32[8,16] dense<elided>
      %b = const f32[16] dense<elided>
      %m = matmul(%x, %w) : f32[4,16]
      %a = add(%m, %b) : f32[4,16]
      %y = relu(%a) : f32[4,16]
      %s = add(%y, %r) : f32[4,16]
      %z = exp(%s) : f32[4,16]
      %u = neg(%s) : f32[4,16]
    }"""
    # %s has two readers: the chain stops there; %z, %u are blocks of their own
    assert _blocks(text) == [["m", "a", "y", "s"], ["z"], ["u"]]


def test_chain_stops_at_graph_outputs_shape_changes_and_non_pointwise_ops():
    text = """graph @g(%x: f32[4,8]) -> (%a, %t, %q) {
      %w = const f32[8,16] dense<elided>
      %w2 = const f32[8,16] dense<elided>
      %m = matmul(%x, %w) : f32[4,16]
      %a = relu(%m) : f32[4,16]
      %n = matmul(%x, %w2) : f32[4,16]
      %t = transpose(%n) {perm=[1, 0]} : f32[16,4]
      %k = matmul(%x, %w2) : f32[4,16]
      %q = reduce_sum(%k) {axes=[1], keepdims=1} : f32[4,1]
    }"""
    assert _blocks(text) == [["m", "a"], ["n"], ["t"], ["k"], ["q"]]


def test_residual_diamond_goes_to_one_block_only():
    """Both convolutions' chains reach the add: the first takes it, the second stops before it."""
    text = """graph @g(%x: f32[1,4,6,6]) -> (%y) {
      %w1 = const f32[4,4,3,3] dense<elided>
      %w2 = const f32[4,4,1,1] dense<elided>
      %c1 = conv(%x, %w1) {pads=[1, 1, 1, 1]} : f32[1,4,6,6]
      %c2 = conv(%x, %w2) : f32[1,4,6,6]
      %s = add(%c1, %c2) : f32[1,4,6,6]
      %y = relu(%s) : f32[1,4,6,6]
    }"""
    assert _blocks(text) == [["c1", "s", "y"], ["c2"]]


def test_epilogue_blocks_compile_to_fewer_kernels_and_match_the_interpreter():
    rng = np.random.default_rng(3)
    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", (1, 8, 10, 10)))
    skip = g.add_input("skip", ir.TensorType("f32", (1, 16, 5, 5)))
    w = g.add_constant(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w")
    c = g.add_node("conv", [x, w], {"strides": [2, 2], "pads": [1, 1, 1, 1]}, out_names=["c"]).output
    bn = [g.add_constant(a.astype(np.float32), n) for a, n in
          [(rng.standard_normal(16), "g"), (rng.standard_normal(16), "b"), (rng.standard_normal(16), "mu"),
           (np.abs(rng.standard_normal(16)) + 0.5, "var")]]
    y = g.add_node("batch_norm", [c, *bn], {"epsilon": 1e-5}, out_names=["bn"]).output
    y = g.add_node("add", [y, skip], out_names=["res"]).output
    y = g.add_node("relu", [y], out_names=["y"]).output
    g.set_outputs([y])
    compiled = _check(g, {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32),
                          "skip": rng.standard_normal((1, 16, 5, 5)).astype(np.float32)})
    assert [[n.op for n in k.nodes] for k in compiled.kernels] == [["conv", "batch_norm", "add", "relu"]]
    assert not compiled.kernels[0].notes  # the anchor's schedule took the epilogue
    # batch-norm statistics were folded into two per-channel vectors at compile time
    assert sorted(a.shape for a in compiled.weights.values() if a.ndim == 1) == [(16,), (16,)]


@pytest.mark.parametrize("dtype", ["i4", "u4", "f4e2m1"])
def test_sub_byte_buffers_are_refused_whatever_the_op(dtype):
    """No op's lowering needs to know: a sub-byte graph input, output or kernel operand is refused."""
    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType(dtype, (4, 6)))
    z = g.add_node("transpose", [x], {"perm": [1, 0]}, out_names=["z"]).output
    g.set_outputs([z])
    with pytest.raises(CodegenError, match=r"value 'x' has dtype .*(int4|float4).*sub-byte"):
        build_graph(g, TARGET)


def test_bf16_graph_builds_and_matches_the_interpreter():
    import ml_dtypes

    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("bf16", (3, 40)))
    w = g.add_constant(np.linspace(-2, 2, 40, dtype=np.float32).astype(ml_dtypes.bfloat16), "w")
    a = g.add_node("add", [x, w], out_names=["a"]).output
    m = g.add_node("reduce_max", [a], {"axes": [1], "keepdims": 0}, out_names=["m"]).output
    g.set_outputs([a, m])
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 40)).astype(ml_dtypes.bfloat16)}
    _check(g, feeds)
