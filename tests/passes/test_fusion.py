"""fuse-blocks: the partition follows TVM FuseOps' rules within the block contract, and check_blocks polices it.

Graphs are written in IR text; each case names which values share a block.
A hypothesis property builds random DAGs and checks the contract, the block
graph's acyclicity and that the interpreter's outputs do not move; the zoo
models must satisfy the contract with fewer blocks than compute nodes.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln import ir
from kiln.ir import Graph, TensorType, Value
from kiln.ir.registry import is_view
from kiln.ir.verify import VerifyError, check_blocks
from kiln.passes.fusion import FuseBlocks, partition
from kiln.passes.manager import PassLog, random_inputs, run_pipeline, run_pipeline_report

# ====================================================================== helpers


def fuse(text: str | Graph, **opts: int) -> tuple[Graph, PassLog]:
    g = ir.parse(text) if isinstance(text, str) else text
    log = PassLog("fuse-blocks")
    g = FuseBlocks(**opts).apply(g, log)
    ir.verify(g)
    assert check_blocks(g, max_ops=opts.get("max_ops", 16), complete=True) == []
    return g, log


def groups(g: Graph) -> list[list[str]]:
    """The blocks as lists of their nodes' first output names, in block order."""
    by: dict[str, list[str]] = {}
    for n in g.nodes:
        if n.block:
            by.setdefault(n.block, []).append(n.outputs[0].name)
    return [by[k] for k in sorted(by, key=lambda b: int(b[1:]))]


def block_of(g: Graph, value: str) -> str:
    return g.value(value).producer.block


def reasons(log: PassLog, at: str) -> list[str]:
    return [r.reason for r in log.refusals if r.at == at]


def block_graph(g: Graph) -> nx.DiGraph:
    """Blocks (and view nodes, as themselves) and the dataflow between them."""
    def unit(n: ir.Node) -> str:
        return n.block or f"view:{n.outputs[0].name}"

    bg = nx.DiGraph()
    for n in g.nodes:
        bg.add_node(unit(n))
        for v in n.inputs:
            if v is not None and v.producer is not None and unit(v.producer) != unit(n):
                bg.add_edge(unit(v.producer), unit(n))
    return bg


# ====================================================================== the cases

CONV_BIAS_RELU = """graph @g(%x: f32[1,3,8,8], %w: f32[4,3,3,3], %bias: f32[1,4,1,1]) -> (%y) {
  %c = conv(%x, %w, _) {pads=[1, 1, 1, 1]} : f32[1,4,8,8]
  %b = add(%c, %bias) : f32[1,4,8,8]
  %y = relu(%b) : f32[1,4,8,8]
}"""

DENSE_GELU = """graph @g(%x: f32[2,8], %w: f32[8,16], %bias: f32[16]) -> (%y) {
  %m = matmul(%x, %w) : f32[2,16]
  %b = add(%m, %bias) : f32[2,16]
  %y = gelu(%b) : f32[2,16]
}"""


def test_conv_bias_relu_is_one_block():
    g, log = fuse(CONV_BIAS_RELU)
    assert groups(g) == [["c", "b", "y"]]
    assert log.rewrites == [("y", "block b0: conv+add+relu (anchor conv)")]


def test_matmul_add_gelu_is_one_block():
    g, log = fuse(DENSE_GELU)
    assert groups(g) == [["m", "b", "y"]]
    assert log.rewrites == [("y", "block b0: matmul+add+gelu (anchor matmul)")]


def test_a_diamond_of_elementwise_branches_is_one_block():
    g, log = fuse("""graph @g(%x: f32[4,4], %s: f32[4]) -> (%y) {
  %a = mul(%x, %s) : f32[4,4]
  %e = exp(%a) : f32[4,4]
  %n = neg(%a) : f32[4,4]
  %r = relu(%n) : f32[4,4]
  %y = add(%e, %r) : f32[4,4]
}""")
    assert groups(g) == [["a", "e", "n", "r", "y"]]
    assert log.rewrites == [("y", "block b0: mul+exp+neg+relu+add (no anchor)")]


def test_a_diamond_epilogue_after_an_anchor_is_one_block():
    g, _ = fuse("""graph @g(%x: f32[2,8], %w: f32[8,8]) -> (%y) {
  %m = matmul(%x, %w) : f32[2,8]
  %s = sigmoid(%m) : f32[2,8]
  %y = mul(%m, %s) : f32[2,8]
}""")
    assert groups(g) == [["m", "s", "y"]]


def test_a_norm_takes_the_elementwise_nodes_that_follow_it_up_to_the_next_anchor():
    g, log = fuse("""graph @g(%x: f32[2,8], %gamma: f32[8], %w: f32[8,8], %shift: f32[8]) -> (%y) {
  %ln = layer_norm(%x, %gamma, _) : f32[2,8]
  %a = add(%ln, %shift) : f32[2,8]
  %t = tanh(%a) : f32[2,8]
  %y = matmul(%t, %w) : f32[2,8]
}""")
    assert groups(g) == [["ln", "a", "t"], ["y"]]
    assert log.rewrites == [("t", "block b0: layer_norm+add+tanh (anchor layer_norm)")]
    assert reasons(log, "t") == ["second anchor (matmul %y) in one block with layer_norm %ln"]


def test_a_reduction_whose_reader_changes_the_shape_ends_its_block():
    g, log = fuse("""graph @g(%x: f32[4,8]) -> (%y) {
  %r = reduce_sum(%x) {axes=[0], keepdims=0} : f32[8]
  %e = exp(%r) : f32[8]
  %y = add(%x, %e) : f32[4,8]
}""")
    # exp keeps the reduction's shape and joins it; the broadcast back to [4,8] does not
    assert groups(g) == [["r", "e"], ["y"]]
    assert "has shape [4, 8] but the anchor reduce_sum %r has [8]" in reasons(log, "e")[0]


def test_softmax_with_a_scale_before_it_and_a_mask_after_it():
    g, _ = fuse("""graph @g(%x: f32[2,8], %m: f32[2,8]) -> (%y) {
  %s = mul(%x, %x) : f32[2,8]
  %p = softmax(%s) : f32[2,8]
  %y = mul(%p, %m) : f32[2,8]
}""")
    assert groups(g) == [["s", "p", "y"]]


def test_dense_then_dense_is_two_blocks():
    g, log = fuse("""graph @g(%x: f32[2,8], %w1: f32[8,8], %w2: f32[8,4]) -> (%y) {
  %h = matmul(%x, %w1) : f32[2,8]
  %r = relu(%h) : f32[2,8]
  %y = matmul(%r, %w2) : f32[2,4]
}""")
    assert groups(g) == [["h", "r"], ["y"]]
    assert reasons(log, "r") == ["second anchor (matmul %y) in one block with matmul %h"]


def test_a_transpose_feeding_a_matmul_operand_joins_its_block():
    g, log = fuse("""graph @g(%x: f32[2,8], %w: f32[4,8], %bias: f32[4]) -> (%y) {
  %wt = transpose(%w) {perm=[1, 0]} : f32[8,4]
  %m = matmul(%x, %wt) : f32[2,4]
  %y = add(%m, %bias) : f32[2,4]
}""")
    assert groups(g) == [["wt", "m", "y"]]
    assert log.rewrites == [("y", "block b0: transpose+matmul+add (anchor matmul)")]


def test_a_dequantized_constant_weight_joins_the_matmul():
    g, _ = fuse("""graph @g(%x: f32[2,2]) -> (%y) {
  %q = const i8[2,2] [1, -2, 3, 4]
  %sc = const f32[] [0.5]
  %w = dequantize(%q, %sc) : f32[2,2]
  %y = matmul(%x, %w) : f32[2,2]
}""")
    assert groups(g) == [["w", "y"]]


def test_a_producer_read_by_the_anchor_and_its_epilogue_stays_out():
    g, log = fuse("""graph @g(%x: f32[4,4], %w: f32[4,4]) -> (%y) {
  %a = exp(%x) : f32[4,4]
  %m = matmul(%a, %w) : f32[4,4]
  %y = add(%m, %a) : f32[4,4]
}""")
    assert groups(g) == [["a"], ["m", "y"]]
    assert reasons(log, "a") == ["%a has 2 readers, which re-join only at %y: %a feeds the anchor matmul %m "
                                 "and is also read after it (add %y)"]


def test_a_value_read_by_two_blocks_ends_its_block():
    g, log = fuse("""graph @g(%x: f32[2,8], %w1: f32[8,8], %w2: f32[8,8]) -> (%y1, %y2) {
  %a = relu(%x) : f32[2,8]
  %e = exp(%a) : f32[2,8]
  %y1 = matmul(%e, %w1) : f32[2,8]
  %y2 = matmul(%e, %w2) : f32[2,8]
}""")
    assert groups(g) == [["a", "e"], ["y1"], ["y2"]]
    assert reasons(log, "e") == ["%e has 2 readers outside the block"]


def test_readers_that_re_join_through_two_anchors_end_the_block():
    g, log = fuse("""graph @g(%x: f32[2,8], %w1: f32[8,8], %w2: f32[8,8]) -> (%y) {
  %a = relu(%x) : f32[2,8]
  %m1 = matmul(%a, %w1) : f32[2,8]
  %m2 = matmul(%a, %w2) : f32[2,8]
  %y = add(%m1, %m2) : f32[2,8]
}""")
    assert groups(g) == [["a"], ["m2"], ["m1", "y"]]
    assert reasons(log, "m2") == ["second anchor (matmul %m2) in one block with matmul %m1"]
    assert reasons(log, "a")[0].startswith("%a has 2 readers, which re-join only at %y: second anchor")


def test_a_graph_output_ends_its_block():
    g, log = fuse("""graph @g(%x: f32[4]) -> (%a, %y) {
  %a = relu(%x) : f32[4]
  %y = exp(%a) : f32[4]
}""")
    assert groups(g) == [["a"], ["y"]]
    assert reasons(log, "a") == ["%a is a graph output"]


@pytest.mark.parametrize(("max_ops", "sizes"), [(16, [16, 4]), (5, [5, 5, 5, 5]), (7, [7, 7, 6]), (1, [1] * 20)])
def test_the_size_cap_splits_a_long_elementwise_chain(max_ops, sizes):
    lines = [f"  %r{i} = relu(%r{i - 1}) : f32[4]" if i else "  %r0 = relu(%x) : f32[4]" for i in range(20)]
    text = "graph @g(%x: f32[4]) -> (%r19) {\n" + "\n".join(lines) + "\n}"
    g, log = fuse(text, max_ops=max_ops)
    assert [len(b) for b in groups(g)] == sizes
    if max_ops > 1:
        assert reasons(log, f"r{sizes[0] - 1}") == \
            [f"size cap {max_ops} reached (the merged block would have {max_ops + 1} nodes)"]


def test_view_ops_are_never_in_a_block():
    g, log = fuse("""graph @g(%x: f32[2,8], %w: f32[4,4]) -> (%y) {
  %a = relu(%x) : f32[2,8]
  %v = reshape(%a) {shape=[4, 4]} : f32[4,4]
  %m = matmul(%v, %w) : f32[4,4]
  %f = flatten(%m) : f32[4,4]
  %y = exp(%f) : f32[4,4]
}""")
    assert [n.block for n in g.nodes] == ["b0", "", "b1", "", "b2"]
    assert reasons(log, "a") == ["view op reshape ends the block"]
    assert reasons(log, "m") == ["view op flatten ends the block"]


def test_opaque_and_multi_output_nodes_are_alone():
    g, log = fuse("""graph @g(%x: f32[2,8]) -> (%y, %s) {
  %a = relu(%x) : f32[2,8]
  %p, %q = split(%a) {axis=1, split=[4, 4]} : f32[2,4], f32[2,4]
  %y = add(%p, %q) : f32[2,4]
  %e = exp(%x) : f32[2,8]
  %s = shape(%e) : i64[2]
}""")
    assert groups(g) == [["a"], ["p"], ["y"], ["e"], ["s"]]
    assert reasons(log, "a") == ["split has 2 outputs: a multi-output node must be alone in its block"]
    assert reasons(log, "e") == ["opaque op shape %s must be alone in its block"]


def test_injective_ops_fuse_with_elementwise_ones_without_an_anchor():
    g, _ = fuse("""graph @g(%x: f32[2,4], %z: f32[2,4]) -> (%y) {
  %t = transpose(%x) {perm=[1, 0]} : f32[4,2]
  %u = transpose(%z) {perm=[1, 0]} : f32[4,2]
  %c = concat(%t, %u) {axis=0} : f32[8,2]
  %y = relu(%c) : f32[8,2]
}""")
    assert groups(g) == [["t", "u", "c", "y"]]


def test_the_pass_is_idempotent_and_clears_old_block_names():
    g, log1 = fuse(CONV_BIAS_RELU)
    first = str(g)
    g.nodes[0].block = "junk"
    g.nodes[2].block = "b7"
    g2, log2 = fuse(g)
    assert str(g2) == first
    assert log1.rewrites == log2.rewrites and log1.refusals == log2.refusals


def test_blocks_print_and_parse_back():
    g, _ = fuse("""graph @g(%x: f32[2,8], %w: f32[8,8], %v: f32[8,8]) -> (%y) {
  %h = matmul(%x, %w) : f32[2,8]
  %r = relu(%h) : f32[2,8]
  %s = reshape(%r) {shape=[2, 8]} : f32[2,8]
  %y = matmul(%s, %v) : f32[2,8]
}""")
    text = str(g)
    assert '= matmul(%x, %w) : f32[2,8] block("b0")' in text
    assert '= reshape(%r) {allowzero=0, shape=[2, 8]} : f32[2,8]\n' in text
    back = ir.verify(ir.parse(text))
    assert ir.structurally_equal(g, back) is None
    assert [n.block for n in back.nodes] == ["b0", "b0", "", "b1"]


def test_the_pass_runs_from_a_pipeline_string_with_its_option():
    g = ir.parse(DENSE_GELU)
    res = run_pipeline_report(g, "fuse-blocks{max_ops=2}")
    assert groups(res.graph) == [["m", "b"], ["y"]]
    assert res.records[0].name == "fuse-blocks{max_ops=2}"
    with pytest.raises(Exception, match="max_ops"):
        run_pipeline_report(g, "fuse-blocks{max_ops=0}")


def test_partition_does_not_touch_the_graph():
    g = ir.parse(CONV_BIAS_RELU)
    before = str(g)
    part = partition(g, 16)
    assert str(g) == before
    (b,) = part.blocks
    assert (b.name, [n.op for n in b.nodes], b.anchor.op, b.exit.outputs[0].name) == \
        ("b0", ["conv", "add", "relu"], "conv", "y")


# ====================================================================== check_blocks

BLOCKED = """graph @g(%x: f32[2,8], %w: f32[8,8], %w2: f32[8,8]) -> (%y) {
  %h = matmul(%x, %w) : f32[2,8] block("b0")
  %r = relu(%h) : f32[2,8] block("b0")
  %s = reshape(%r) {shape=[2, 8]} : f32[2,8]
  %m = matmul(%s, %w2) : f32[2,8] block("b1")
  %y = add(%m, %r) : f32[2,8] block("b1")
}"""


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda g: setattr(g.nodes[2], "block", "b0"), "view op is in block 'b0'"),
    (lambda g: [setattr(n, "block", "b1") for n in g.nodes[:2]], "second anchor (matmul %m)"),
    (lambda g: setattr(g.nodes[1], "block", "b1"), "%r has 1 reader(s) outside the block (reshape %s)"),
])
def test_check_blocks_names_each_broken_rule(edit, problem):
    g = ir.verify(ir.parse(BLOCKED))
    edit(g)
    problems = check_blocks(g)
    assert any(problem in p for p in problems), problems
    with pytest.raises(VerifyError):
        ir.verify(g)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda g: setattr(g.nodes[1], "block", ""), "compute node has no block"),
    (lambda g: [setattr(n, "block", {"b0": "b1", "b1": "b0"}[n.block]) for n in g.nodes if n.block],
     "should be named 'b0'"),
])
def test_complete_partition_rules_bind_fuse_blocks_but_not_later_passes(edit, problem):
    """What fuse-blocks promises (every node in a block, blocks numbered) is checked on demand; a later
    pass that adds an unblocked node or renames blocks leaves a graph that still verifies."""
    g = ir.verify(ir.parse(BLOCKED))
    edit(g)
    assert any(problem in p for p in check_blocks(g, complete=True))
    assert not any(problem in p for p in check_blocks(g))
    ir.verify(g)


def test_check_blocks_wants_a_single_exit_and_epilogue_shapes():
    g = ir.parse("""graph @g(%x: f32[2,8], %w: f32[8,8]) -> (%y, %h) {
  %h = matmul(%x, %w) : f32[2,8] block("b0")
  %y = reduce_sum(%h) {axes=[1]} : f32[2,1] block("b0")
}""")
    problems = check_blocks(g)
    assert any("%h is a graph output but not the exit" in p for p in problems)
    g = ir.parse("""graph @g(%x: f32[2,8], %w: f32[8,8], %z: f32[4,2,8]) -> (%y) {
  %h = matmul(%x, %w) : f32[2,8] block("b0")
  %y = add(%h, %z) : f32[4,2,8] block("b0")
}""")
    assert check_blocks(g) == ["block 'b0': add %y has shape [4, 2, 8] but the anchor matmul %h has [2, 8]: "
                               "an epilogue keeps the anchor's shape"]
    g = ir.parse("""graph @g(%x: f32[2,8], %w: f32[8,8]) -> (%y) {
  %h = matmul(%x, %w) : f32[2,8] block("b0")
  %y = transpose(%h) {perm=[1, 0]} : f32[8,2] block("b0")
}""")
    assert "injective: only elementwise/broadcast ops may follow the anchor" in check_blocks(g)[0]
    g = ir.parse("""graph @g(%x: f32[2,8], %w: f32[8,8], %z: f32[2,8]) -> (%y) {
  %h = matmul(%x, %w) : f32[2,8] block("b0")
  %e = exp(%z) : f32[2,8] block("b0")
  %y = add(%h, %e) : f32[2,8] block("b0")
}""")
    assert check_blocks(g) == ["block 'b0': exp %e neither feeds nor follows the anchor matmul %h"]


def test_graphs_without_blocks_skip_the_block_check():
    g = ir.parse(BLOCKED)
    for n in g.nodes:
        n.block = ""
    assert ir.verify(g) is g


# ====================================================================== random DAGs

def _broadcastable(a: tuple, b: tuple) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


@st.composite
def dags(draw) -> Graph:
    """A random well-typed DAG of add, mul, relu, exp, matmul, reduce_sum, softmax, transpose, reshape, concat."""
    g = Graph("rand")
    pool: list[Value] = [g.add_input("x0", TensorType("f32", (3, 3))),
                         g.add_input("x1", TensorType("f32", (3, 1))),
                         g.add_input("x2", TensorType("f32", (1, 3)))]
    made: list[Value] = []
    for _ in range(draw(st.integers(1, 18))):
        op = draw(st.sampled_from(["add", "mul", "relu", "exp", "matmul", "reduce_sum", "softmax",
                                   "transpose", "reshape", "concat"]))
        a = draw(st.sampled_from(pool))
        sa = tuple(a.type.shape)
        rank = len(sa)
        if op in ("add", "mul"):
            b = draw(st.sampled_from([v for v in pool if _broadcastable(sa, tuple(v.type.shape))]))
            v = g.op(op, a, b)
        elif op in ("relu", "exp"):
            v = g.op(op, a)
        elif op == "matmul":
            bs = [v for v in pool if rank == 2 and len(v.type.shape) == 2 and v.type.shape[0] == sa[1]]
            if not bs:
                continue
            v = g.op("matmul", a, draw(st.sampled_from(bs)))
        elif op == "reduce_sum":
            if rank == 0:
                continue
            v = g.op("reduce_sum", a, axes=[draw(st.integers(0, rank - 1))], keepdims=draw(st.integers(0, 1)))
        elif op == "softmax":
            if rank == 0:
                continue
            v = g.op("softmax", a, axis=-1)
        elif op == "transpose":
            v = g.op("transpose", a, perm=list(range(rank))[::-1])
        elif op == "reshape":
            v = g.op("reshape", a, shape=draw(st.sampled_from([[-1], list(sa[::-1]) or [1]])))
        else:
            bs = [v for v in pool if len(v.type.shape) == rank >= 1 and tuple(v.type.shape[1:]) == sa[1:]]
            if not bs:
                continue
            v = g.op("concat", a, draw(st.sampled_from(bs)), axis=0)
        pool.append(v)
        made.append(v)
    if not made:
        made.append(g.op("relu", pool[0]))
    outs = draw(st.lists(st.sampled_from(made), min_size=1, max_size=3, unique_by=id))
    if made[-1] not in outs and draw(st.booleans()):
        outs.append(made[-1])
    g.set_outputs(outs)
    return ir.verify(g)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=dags(), max_ops=st.integers(1, 16))
def test_random_dags_satisfy_the_contract(g, max_ops):
    feeds = random_inputs(g, seed=1)
    with np.errstate(all="ignore"):
        want = ir.interpret(g, feeds)
    g, _ = fuse(g, max_ops=max_ops)
    assert check_blocks(g, max_ops=max_ops, complete=True) == []
    assert nx.is_directed_acyclic_graph(block_graph(g))
    for n in g.nodes:
        assert (n.block == "") == is_view(n.op)
    sizes: dict[str, int] = {}
    for n in g.nodes:
        if n.block:
            sizes[n.block] = sizes.get(n.block, 0) + 1
    assert max(sizes.values(), default=0) <= max_ops
    with np.errstate(all="ignore"):
        got = ir.interpret(g, feeds)
    for v in g.outputs:
        np.testing.assert_array_equal(got[v.name], want[v.name])


# ====================================================================== the zoo

@pytest.mark.slow
def test_zoo_models_satisfy_the_contract_with_fewer_blocks_than_nodes():
    from kiln import zoo
    from kiln.frontend import lift

    for name in zoo.names():
        g = lift(zoo.onnx_model(name))
        g, log = fuse(g)
        assert nx.is_directed_acyclic_graph(block_graph(g)), name
        compute = sum(1 for n in g.nodes if not is_view(n.op))
        blocks = {n.block for n in g.nodes if n.block}
        assert len(blocks) < compute, (name, len(blocks), compute)
        assert len(log.rewrites) == sum(1 for b in groups(g) if len(b) > 1)



def _attention_graph(scale: str = "const f32[] [0.5]"):
    g = ir.Graph("g")
    q = g.add_input("q", ir.TensorType("f32", (1, 2, 8, 4)))
    kt = g.add_input("kt", ir.TensorType("f32", (1, 2, 4, 8)))
    v = g.add_input("v", ir.TensorType("f32", (1, 2, 8, 4)))
    sc = g.add_constant(np.array(0.5, np.float32) if scale.startswith("const") else np.full((1, 2, 8, 8), 0.5,
                                                                                           np.float32), "scale")
    keep = g.add_constant(np.tril(np.ones((8, 8), bool))[None, None], "keep")
    fill = g.add_constant(np.array(-np.inf, np.float32), "fill")
    s = g.op("matmul", q, kt)
    m = g.op("mul", s, sc)
    w = g.op("where", keep, m, fill)
    p = g.op("softmax", w, axis=-1)
    a = g.op("matmul", p, v)
    g.set_outputs([g.op("relu", a)])
    return ir.verify(g)


def test_the_attention_chain_is_one_block_with_two_anchors_by_exception():
    g = run_pipeline(_attention_graph(), "fuse-blocks")
    blocks = {}
    for n in g.nodes:
        blocks.setdefault(n.block, []).append(n.op)
    assert ["matmul", "mul", "where", "softmax", "matmul"] in blocks.values()
    assert ["relu"] in blocks.values()  # the attention block takes no epilogue
    assert check_blocks(g, complete=True) == []


def test_a_chain_the_attention_kernel_cannot_build_is_partitioned_by_the_normal_rules():
    g = run_pipeline(_attention_graph(scale="tensor"), "fuse-blocks")  # a tensor scale: not matched
    for n in g.nodes:
        members = [m.op for m in g.nodes if m.block == n.block]
        assert members.count("matmul") + members.count("softmax") <= 1
    assert check_blocks(g, complete=True) == []


def _transposed_attention_graph(gpt_kt: bool = False, q_extra_reader: bool = False):
    """Attention whose q, kT and v are transposes; kT GPT's transpose(k, [0,2,3,1]) or one keeping its last axis."""
    g = ir.Graph("g")
    xq = g.add_input("xq", ir.TensorType("f32", (1, 8, 2, 4)))
    xk = g.add_input("xk", ir.TensorType("f32", (1, 8, 2, 4) if gpt_kt else (2, 1, 4, 8)))
    xv = g.add_input("xv", ir.TensorType("f32", (1, 8, 2, 4)))
    sc = g.add_constant(np.array(0.5, np.float32), "scale")
    q = g.op("transpose", xq, perm=[0, 2, 1, 3])
    kt = g.op("transpose", xk, perm=[0, 2, 3, 1] if gpt_kt else [1, 0, 2, 3])
    v = g.op("transpose", xv, perm=[0, 2, 1, 3])
    s = g.op("matmul", q, kt)
    p = g.op("softmax", g.op("mul", s, sc), axis=-1)
    outs = [g.op("matmul", p, v)]
    if q_extra_reader:
        outs.append(g.op("relu", q))
    g.set_outputs(outs)
    return ir.verify(g)


def _blocks(g: Graph) -> list[list[str]]:
    by: dict[str, list[str]] = {}
    for n in g.nodes:
        by.setdefault(n.block, []).append(n.op)
    return list(by.values())


def test_operand_transposes_join_the_attention_block():
    g, _ = fuse(_transposed_attention_graph())
    assert ["transpose"] * 3 + ["matmul", "mul", "softmax", "matmul"] in _blocks(g)
    before = _transposed_attention_graph()
    feeds = random_inputs(before)
    want, got = ir.interpret(before, feeds), ir.interpret(g, feeds)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_a_kt_transpose_moving_the_last_axis_and_a_shared_q_stay_out():
    g, _ = fuse(_transposed_attention_graph(gpt_kt=True))  # GPT's kT: the kernel's loads would be gathers
    assert ["transpose", "transpose", "matmul", "mul", "softmax", "matmul"] in _blocks(g)
    assert ["transpose"] in _blocks(g)
    g, _ = fuse(_transposed_attention_graph(gpt_kt=True, q_extra_reader=True))
    attention = next(b for b in _blocks(g) if "softmax" in b)
    assert attention == ["transpose", "matmul", "mul", "softmax", "matmul"]  # only v's transpose


def test_is_attention_chain_accepts_leading_operand_transposes():
    from kiln.ir.verify import is_attention_chain

    nodes = list(_transposed_attention_graph(q_extra_reader=True).nodes)
    chain, relu = nodes[3:-1], nodes[-1]
    assert [n.op for n in chain] == ["matmul", "mul", "softmax", "matmul"] and relu.op == "relu"
    assert is_attention_chain(nodes[:-1]) and is_attention_chain(nodes[1:-1]) and is_attention_chain(chain)
    assert not is_attention_chain(nodes[:3])  # transposes alone
    assert not is_attention_chain([relu, *chain])  # a leading node that is no transpose
    assert not is_attention_chain([nodes[0], nodes[0], nodes[1], nodes[2], *chain])  # more than three


@pytest.mark.slow
def test_zoo_gpt_attention_blocks_take_the_q_and_v_transposes_and_the_output_transpose():
    from kiln import zoo
    from kiln.frontend import lift

    g, _ = fuse(lift(zoo.onnx_model("gpt")))
    attention = [b for b in _blocks(g) if "softmax" in b]
    assert len(attention) == 4
    for b in attention:
        assert b == ["transpose", "transpose", "matmul", "mul", "where", "softmax", "matmul", "transpose"]


# ------------------------------------------------------------------ SDPA's NaN guard in the attention block

SDPA_GUARD = """graph @g(%q: f32[1,2,8,4], %kT: f32[1,2,4,8], %xv: f32[1,8,2,4], %m: f32[1,1,8,8]) -> (%y) {
  %zero = const f32[] [0.0]
  %v = transpose(%xv) {perm=[0, 2, 1, 3]} : f32[1,2,8,4]
  %s = matmul(%q, %kT) : f32[1,2,8,8]
  %a = add(%s, %m) : f32[1,2,8,8]
  %p = softmax(%a) {axis=-1} : f32[1,2,8,8]
  %n = is_nan(%p) : bool[1,2,8,8]
  %w = where(%n, %zero, %p) : f32[1,2,8,8]
  %o = matmul(%w, %v) : f32[1,2,8,4]
  %y = relu(%o) : f32[1,2,8,4]
}"""


def test_the_guarded_chain_is_found_with_its_v_transpose():
    from kiln.passes.fusion import attention_chains

    g = ir.parse(SDPA_GUARD)
    assert [[g.nodes[p].op for p in c] for c in attention_chains(g)] == [
        ["transpose", "matmul", "add", "softmax", "is_nan", "where", "matmul"]]


def test_sdpa_nan_guard_joins_the_attention_block():
    before = ir.parse(SDPA_GUARD)
    g, log = fuse(ir.parse(SDPA_GUARD))
    assert groups(g) == [["v", "s", "a", "p", "n", "w", "o"], ["y"]]
    assert log.rewrites[0] == ("o", "block b0: transpose+matmul+add+softmax+is_nan+where+matmul (anchor matmul)")
    feeds = random_inputs(before)
    feeds["m"] = np.where(np.tril(np.ones((8, 8), bool)), 0.0, -np.inf).astype(np.float32)[None, None]
    feeds["m"][..., 2, :] = -np.inf  # a fully masked row: the guard's zeros
    want, got = ir.interpret(before, feeds)["y"], ir.interpret(g, feeds)["y"]
    np.testing.assert_array_equal(want, got)
    assert (want[..., 2, :] == 0).all()


def test_a_chain_the_verifier_does_not_know_stays_unfused_with_the_reason(monkeypatch):
    import sys

    verify_mod = sys.modules["kiln.ir.verify"]
    monkeypatch.setattr(verify_mod, "is_attention_chain", lambda nodes: False)
    g, log = fuse(ir.parse(SDPA_GUARD))
    assert not any(b.count("matmul") == 2 for b in _blocks(g))
    assert [r for r in reasons(log, "o") if r.startswith("attention chain not fused: second anchor")]


# ------------------------------------------------------------------ q/k/v prologues and the output transpose

# GPT-2 after hoist-views: q/k/v slices of one head view; q and kT scaled; kT's transpose moves the last axis.
QKV = """graph @g(%x: f32[1,8,6,4]) -> (%y) {
  %c = const f32[] [0.5]
  %hq = slice(%x) {starts=[0], ends=[2], axes=[2]} : f32[1,8,2,4]
  %hk = slice(%x) {starts=[2], ends=[4], axes=[2]} : f32[1,8,2,4]
  %hv = slice(%x) {starts=[4], ends=[6], axes=[2]} : f32[1,8,2,4]
  %tq = transpose(%hq) {perm=[0, 2, 1, 3]} : f32[1,2,8,4]
  %tk = transpose(%hk) {perm=[0, 2, 3, 1]} : f32[1,2,4,8]
  %v = transpose(%hv) {perm=[0, 2, 1, 3]} : f32[1,2,8,4]
  %q = mul(%tq, %c) : f32[1,2,8,4]
  %k = mul(%tk, %c) : f32[1,2,4,8]
  %s = matmul(%q, %k) : f32[1,2,8,8]
  %p = softmax(%s) {axis=-1} : f32[1,2,8,8]
  %o = matmul(%p, %v) : f32[1,2,8,4]
  %ot = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,8,2,4]
  %y = reshape(%ot) {shape=[8, 8]} : f32[8,8]
}"""


def test_operand_prologues_and_the_output_transpose_join_the_attention_block():
    g, log = fuse(QKV)
    assert groups(g) == [["hk", "tk", "k"], ["hq", "hv", "tq", "v", "q", "s", "p", "o", "ot"]]
    assert log.rewrites[1] == ("ot", "block b1: slice+slice+transpose+transpose+mul+matmul+softmax+matmul+"
                                     "transpose (anchor matmul)")
    before = ir.parse(QKV)
    feeds = random_inputs(before)
    np.testing.assert_array_equal(ir.interpret(before, feeds)["y"], ir.interpret(g, feeds)["y"])


def test_an_operand_prologue_joins_whole_or_not_at_all():
    """kT's slice+transpose+mul cannot all join (the transpose moves the last axis): its mul stays with them."""
    from kiln.passes.fusion import attention_chains

    g = ir.parse(QKV)
    (chain,) = attention_chains(g)
    names = [g.nodes[p].outputs[0].name for p in chain]
    assert "k" not in names and "tk" not in names and "hk" not in names
    assert names == ["hq", "hv", "tq", "v", "q", "s", "p", "o", "ot"]


def test_a_prologue_stops_at_a_value_read_outside():
    """q's transpose is also a graph output: the kernel reads it, scaled; its slice and transpose stay out."""
    g, _ = fuse(QKV.replace("-> (%y)", "-> (%y, %tq)"))
    attention = next(b for b in _blocks(g) if "softmax" in b)
    assert attention == ["slice", "transpose", "mul", "matmul", "softmax", "matmul", "transpose"]
    assert block_of(g, "q") == block_of(g, "s") != block_of(g, "tq") == block_of(g, "hq")


def test_is_attention_chain_accepts_prologues_and_an_output_transpose():
    from kiln.ir.verify import block_problems, is_attention_chain

    g = ir.parse(QKV)
    n = {node.outputs[0].name: node for node in g.nodes}
    core = [n["s"], n["p"], n["o"]]
    block = [n["hq"], n["hv"], n["tq"], n["v"], n["q"], *core, n["ot"]]
    assert is_attention_chain(block) and block_problems(block, g.outputs) == []
    assert is_attention_chain([n["tq"], n["q"], *core]) and is_attention_chain([*core, n["ot"]])
    assert not is_attention_chain([n["q"], n["tq"], *core])  # a link after its reader
    assert not is_attention_chain([n["hq"], n["hq"], n["tq"], n["q"], *core])
    assert not is_attention_chain([n["ot"], *core])  # the output transpose first
    assert not is_attention_chain([*core, n["ot"], n["q"]])
    problems = block_problems([n["tq"], n["q"], *core], [*g.outputs, n["tq"].outputs[0]])
    assert problems == ["%tq is a graph output but not the exit (last node) of its block"]
