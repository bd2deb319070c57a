"""Delta debugging: ddmin is 1-minimal and cheap; the graph reducer keeps graphs valid and shrinks them."""

from __future__ import annotations

import itertools

import pytest

from kiln import ir
from kiln.fuzz.reduce import Budget, ddmin, reduce_case, reduce_graph, reduce_pipeline
from kiln.ir import Graph
from kiln.passes.manager import run_pipeline

# 20 nodes, two outputs, a constant used twice; the interesting pair is mul -> sqrt in the
# middle of a chain whose tail changes type (transpose, reduce_sum), so it cannot be bypassed.
TWENTY = """graph @g(%x: f32[4,8], %w: f32[8,8]) -> (%out, %aux) {
  %c1 = const f32[8] [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
  %a = add(%x, %c1) : f32[4,8]
  %e = exp(%a) : f32[4,8]
  %t = tanh(%e) : f32[4,8]
  %m = matmul(%t, %w) : f32[4,8]
  %r = relu(%m) : f32[4,8]
  %p = mul(%r, %r) : f32[4,8]
  %s = sqrt(%p) : f32[4,8]
  %n = neg(%s) : f32[4,8]
  %sg = sigmoid(%n) : f32[4,8]
  %tr = transpose(%sg) {perm=[1, 0]} : f32[8,4]
  %rs = reduce_sum(%tr) {axes=[1], keepdims=0} : f32[8]
  %b = add(%rs, %c1) : f32[8]
  %q = mul(%b, %b) : f32[8]
  %ex = exp(%q) : f32[8]
  %out = relu(%ex) : f32[8]
  %d = sub(%x, %a) : f32[4,8]
  %d2 = neg(%d) : f32[4,8]
  %d3 = tanh(%d2) : f32[4,8]
  %d4 = add(%d3, %x) : f32[4,8]
  %aux = relu(%d4) : f32[4,8]
}"""


def _sqrt_of_mul(g: Graph) -> bool:
    """The "bug": a sqrt whose operand a mul produces."""
    return any(n.op == "sqrt" and n.inputs[0] is not None and n.inputs[0].producer is not None
               and n.inputs[0].producer.op == "mul" for n in g.nodes)


class Counted:
    """A predicate that counts its calls and checks it only ever sees valid graphs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        for a in args:
            if isinstance(a, Graph):
                ir.verify(a)
        return self.fn(*args)


def _assert_valid_and_round_trips(g: Graph) -> None:
    ir.verify(g)
    back = ir.parse(ir.print_graph(g))
    assert ir.structurally_equal(g, back) is None
    ir.verify(back)


# ====================================================================== ddmin

def test_ddmin_finds_the_failing_pair_in_64_cheaply():
    pred = Counted(lambda xs: 17 in xs and 42 in xs)
    assert ddmin(list(range(64)), pred) == [17, 42]
    assert pred.calls < 200


@pytest.mark.parametrize("seed", range(5))
def test_ddmin_result_is_one_minimal_and_keeps_order(seed):
    import random

    rng = random.Random(seed)
    items = rng.sample(range(1000), 40)
    key = set(rng.sample(items, 6))

    def fails(xs):  # needs any 3 of the 6 key items: many minimal answers, none larger than 3
        return len(key.intersection(xs)) >= 3

    out = ddmin(items, fails)
    assert fails(out) and len(out) == 3
    assert out == [x for x in items if x in out]  # order kept
    for i in range(len(out)):
        assert not fails(out[:i] + out[i + 1:])


def test_ddmin_edge_cases_and_cache():
    assert ddmin([], lambda xs: True) == []
    assert ddmin([1, 2, 3], lambda xs: True) == []  # nothing needed at all
    assert ddmin(["only"], lambda xs: bool(xs)) == ["only"]
    seen = []
    ddmin(list(range(16)), lambda xs: seen.append(tuple(xs)) or 3 in xs)
    assert len(seen) == len(set(seen))  # no subset tested twice


def test_ddmin_stops_at_its_budget_with_a_failing_subset():
    budget = Budget(5)
    pred = Counted(lambda xs: 5 in xs and 60 in xs)
    out = ddmin(list(range(64)), pred, budget=budget)
    assert pred.calls == 5 and budget.spent
    assert 5 in out and 60 in out


def test_reduce_pipeline_keeps_the_passes_that_matter():
    passes = ["canonicalize", "dce", "fold-conv-bn", "fuse-blocks", "dce", "fold-conv-bn{mode=tune}", "canonicalize"]
    out = reduce_pipeline(passes, lambda ps: "fold-conv-bn{mode=tune}" in ps and ps.index("fold-conv-bn{mode=tune}") > 0
                          and "fuse-blocks" in ps[:ps.index("fold-conv-bn{mode=tune}")])
    assert out == ["fuse-blocks", "fold-conv-bn{mode=tune}"]


# ====================================================================== graphs

def test_reduce_graph_shrinks_twenty_nodes_to_the_pair():
    g = ir.parse(TWENTY)
    before = ir.print_graph(g)
    pred = Counted(_sqrt_of_mul)
    small = reduce_graph(g, pred)
    assert ir.print_graph(g) == before  # the argument is untouched
    assert len(small.nodes) <= 3 and [n.op for n in small.nodes] == ["mul", "sqrt"]
    assert _sqrt_of_mul(small)
    _assert_valid_and_round_trips(small)
    assert pred.calls < 60


def test_reduce_graph_turns_unneeded_constants_into_inputs_and_drops_dead_inputs():
    g = ir.parse("""graph @g(%x: f32[4], %unused: f32[2]) -> (%y, %z) {
      %c = const f32[4] [1.0, 2.0, 3.0, 4.0]
      %k = const f32[4] [0.0, 0.0, 0.0, 0.0]
      %a = add(%x, %c) : f32[4]
      %y = mul(%a, %k) : f32[4]
      %z = relu(%unused) : f32[2]
    }""")
    small = reduce_graph(g, lambda h: {"add", "mul"} <= h.op_counts().keys() and "k" in h.constants)
    _assert_valid_and_round_trips(small)
    assert [n.op for n in small.nodes] == ["add", "mul"]
    assert list(small.constants) == ["k"]
    assert [v.name for v in small.inputs] == ["x", "c"]  # %c became an input of its name; %unused went


def test_a_removed_node_without_a_same_typed_operand_becomes_an_input_of_its_name():
    g = ir.parse("""graph @g(%x: f32[4,8]) -> (%y) {
      %t = transpose(%x) {perm=[1, 0]} : f32[8,4]
      %y = relu(%t) : f32[8,4]
    }""")
    small = reduce_graph(g, lambda h: "relu" in h.op_counts())
    _assert_valid_and_round_trips(small)
    assert ir.print_graph(small) == (
        "graph @g(%t: f32[8,4]) -> (%y) {\n"
        "  %y = relu(%t) : f32[8,4]\n"
        "}\n")


def test_reduce_graph_respects_max_tests():
    pred = Counted(_sqrt_of_mul)
    small = reduce_graph(ir.parse(TWENTY), pred, max_tests=4)
    assert pred.calls == 4
    assert _sqrt_of_mul(small)
    ir.verify(small)


def test_every_keep_set_of_nodes_gives_a_valid_graph():
    """The node step's candidates are valid by construction: try every 1- and 2-node keep set."""
    from kiln.fuzz.reduce import _keep_nodes

    g = ir.parse(TWENTY)
    for keep in itertools.chain(itertools.combinations(range(20), 1), itertools.combinations(range(20), 2)):
        h = _keep_nodes(g, list(keep))
        assert h is not None and len(h.nodes) == len(keep)
        ir.verify(h)


# ====================================================================== cases

def test_reduce_case_shrinks_graph_and_pipeline_together():
    def fused_sqrt_of_mul(g: Graph, passes: list[str]) -> bool:
        out = run_pipeline(g, ",".join(passes))
        return any(n.op == "sqrt" and n.block and n.inputs[0].producer is not None
                   and n.inputs[0].producer.op == "mul" and n.inputs[0].producer.block == n.block
                   for n in out.nodes)

    pred = Counted(fused_sqrt_of_mul)
    passes = ["canonicalize", "fold-conv-bn", "dce", "canonicalize", "fuse-blocks", "dce"]
    g, ps = reduce_case(ir.parse(TWENTY), passes, pred)
    assert ps == ["fuse-blocks"]
    assert [n.op for n in g.nodes] == ["mul", "sqrt"]
    _assert_valid_and_round_trips(g)
    assert fused_sqrt_of_mul(g.clone(), ps)
    assert pred.calls < 80
