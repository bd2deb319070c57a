"""codegen.build: a graph becomes a Relax main over one kernel per compute node; views cost no kernel."""

import numpy as np
import pytest
import tvm
from tvm import relax

from kiln import ir
from kiln.codegen.build import build_graph, specialize
from kiln.codegen.kernel import CodegenError
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import assert_close

TARGET = host_target()


def _run(compiled, feeds):
    vm = relax.VirtualMachine(compiled.executable, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[v.name]) for v in compiled.graph.inputs]
    args += [tvm.runtime.tensor(a) for a in compiled.weights.values()]
    return [r.numpy() for r in vm["main"](*args)]


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
