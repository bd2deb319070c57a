"""The mutation API keeps use-def links right; the interpreter checks inputs and types."""

import numpy as np
import pytest

from kiln import ir
from kiln.ir import TensorType


def small() -> ir.Graph:
    return ir.parse("""graph @g(%x: f32[N,3]) -> (%y) {
      %c = const f32[3] [1.0, -2.0, 0.5]
      %a = mul(%x, %c) : f32[N,3]
      %b = relu(%a) : f32[N,3]
      %y = add(%b, %a) : f32[N,3]
    }""")


def test_replace_all_uses_moves_every_use_and_graph_outputs():
    g = small()
    a, b = g.value("a"), g.value("b")
    t = g.add_node("tanh", [a], before=b.producer, out_names=["t"]).output
    g.replace_all_uses(a, t)
    # the new node itself must keep reading %a: fix the one self-use
    g.set_input(t.producer, 0, a)
    ir.verify(g)
    assert [n.op for n, _ in t.uses] == ["relu", "add"]
    assert [n.op for n, _ in a.uses] == ["tanh"]
    g.replace_all_uses(g.value("y"), b)
    assert g.outputs == [b]


def test_remove_refuses_a_used_node_and_cleans_up_an_unused_one():
    g = small()
    with pytest.raises(ValueError, match="still used"):
        g.remove(g.value("a").producer)
    g.replace_all_uses(g.value("y"), g.value("b"))
    g.remove(g.value("y").producer)
    ir.verify(g)
    assert [n.op for n, _ in g.value("a").uses] == ["relu"]


def test_dce_removes_dead_nodes_and_constants():
    g = small()
    g.set_outputs([g.inputs[0]])
    assert g.dce() == 4
    assert not g.nodes and not g.constants
    ir.verify(g)


def test_insert_before_keeps_topological_order():
    g = small()
    y = g.value("y").producer
    n = g.make_node("neg", [g.value("b")], out_names=["nb"])
    g.insert_before(y, n)
    g.set_input(y, 1, n.output)
    ir.verify(g)
    assert [m.op for m in g.nodes] == ["mul", "relu", "neg", "add"]


def test_clone_is_deep_and_equal():
    g = small()
    h = g.clone()
    assert ir.structurally_equal(g, h) is None
    h.set_input(h.nodes[1], 0, h.inputs[0])
    assert ir.structurally_equal(g, h) is not None
    ir.verify(g)
    ir.verify(h)


def test_type_rule_refusal_names_the_op():
    g = ir.Graph()
    x = g.add_input("x", TensorType("f32", (2, 3)))
    y = g.add_input("y", TensorType("f32", (4,)))
    with pytest.raises(ir.OpTypeError, match="add.*do not broadcast"):
        g.op("add", x, y)


def test_interpreter_binds_symbols_and_checks_inputs():
    g = small()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = ir.interpret(g, {"x": x})["y"]
    a = x * np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(out, np.maximum(a, 0) + a)
    with pytest.raises(ir.InputError, match="missing \\['x'\\]"):
        ir.interpret(g, {})
    with pytest.raises(ir.InputError, match="unexpected \\['z'\\]"):
        ir.interpret(g, {"x": x, "z": x})
    with pytest.raises(ir.InputError, match="input 'x': expected dtype f32.*got float64"):
        ir.interpret(g, {"x": x.astype(np.float64)})
    with pytest.raises(ir.InputError, match="input 'x': expected shape f32\\[N,3\\], got \\[2, 4\\]"):
        ir.interpret(g, {"x": np.zeros((2, 4), np.float32)})


def test_interpreter_binds_a_symbol_consistently_across_inputs():
    g = ir.parse("""graph @g(%a: f32[N], %b: f32[N]) -> (%y) {
      %y = add(%a, %b) : f32[N]
    }""")
    with pytest.raises(ir.InputError, match="input 'b'.*N=3 elsewhere"):
        ir.interpret(g, {"a": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)})


def test_interpreter_catches_a_type_rule_that_disagrees_with_the_reference():
    g = small()
    g.value("b").type = TensorType("f64", ("N", 3))
    with pytest.raises(ir.InterpretError, match="relu -> %b: reference gave float32"):
        ir.interpret(g, {"x": np.zeros((1, 3), np.float32)})
