"""ir.verify accepts well-formed graphs and names every rule a hand-broken graph breaks."""

import numpy as np
import pytest

from kiln import ir
from kiln.ir import TensorType

BASE = """graph @g(%x: f32[N,4], %y: f32[4]) -> (%out) {
  %c = const f32[4] [1.0, 2.0, 3.0, 4.0]
  %s = add(%x, %y) : f32[N,4]
  %m = mul(%s, %c) : f32[N,4]
  %out = relu(%m) : f32[N,4]
}"""


def base() -> ir.Graph:
    return ir.verify(ir.parse(BASE))


def node(g: ir.Graph, op: str) -> ir.Node:
    return next(n for n in g.nodes if n.op == op)


def break_unknown_op(g):
    node(g, "relu").op = "frobnicate"


def break_order(g):
    g.nodes.reverse()


def break_foreign_operand(g):
    other = ir.Graph("other")
    g.set_input(node(g, "relu"), 0, other.add_input("alien", TensorType("f32", ("N", 4))))


def break_duplicate_name(g):
    node(g, "mul").outputs[0].name = "s"


def break_backlink(g):
    node(g, "mul").outputs[0].producer = node(g, "add")


def break_arity(g):
    n = node(g, "relu")
    n._inputs.append(g.inputs[1])
    g.inputs[1].uses.append((n, 1))


def break_attr(g):
    node(g, "relu").attrs["alpha"] = 0.5


def break_operand_types(g):
    i = g.add_constant(np.arange(4, dtype=np.int64), "ints")
    g.set_input(node(g, "add"), 1, i)


def break_declared_type(g):
    node(g, "relu").outputs[0].type = TensorType("f32", ("N", 5))


def break_use_list(g):
    g.inputs[0].uses.clear()


def break_output(g):
    g.outputs = [ir.Graph("other").add_input("ghost", TensorType("f32", ()))]


def break_constant(g):
    g.constants["c"].const = np.zeros(3, np.float32)


def break_absent_required(g):
    g.set_input(node(g, "mul"), 1, None)


def break_node_owner(g):
    node(g, "mul").graph = None


@pytest.mark.parametrize("breaker, message", [
    (break_unknown_op, "unknown op 'frobnicate'"),
    (break_order, "used before it is defined"),
    (break_foreign_operand, "operand %alien is not defined in the graph"),
    (break_duplicate_name, "name %s is used by two values"),
    (break_backlink, "does not point back at its node"),
    (break_arity, "relu takes 1..1 inputs, got 2"),
    (break_attr, "unknown attribute"),
    (break_operand_types, "type rule refuses the operands.*dtype"),
    (break_declared_type, "typed f32\\[N,5\\], the type rule says f32\\[N,4\\]"),
    (break_use_list, "use list does not match"),
    (break_output, "graph output %ghost is not defined"),
    (break_constant, "data is float32\\[3\\] but its type is f32\\[4\\]"),
    (break_absent_required, "required input 1 is absent"),
    (break_node_owner, "does not belong to this graph"),
])
def test_verify_names_each_broken_rule(breaker, message):
    g = base()
    breaker(g)
    with pytest.raises(ir.VerifyError, match=message) as err:
        ir.verify(g)
    assert err.value.problems


def test_verify_lists_every_problem_at_once():
    g = base()
    break_unknown_op(g)
    break_constant(g)
    problems = ir.verify.__globals__["check"](g)
    assert len(problems) >= 2
    assert any("frobnicate" in p for p in problems) and any("constant %c" in p for p in problems)
