"""sink-views: ``f(view(a), b) -> view(f(a, b'))`` is exact, refused with a reason where b' does not exist.

Graphs are written in IR text; rewritten graphs must compute bit-identical
float64 outputs in the interpreter, refusals leave the printed graph as it was,
and ``broadcast_through_view`` is checked against numpy on random shapes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import ir
from kiln.ir import Graph
from kiln.passes.fusion import FuseBlocks
from kiln.passes.manager import (
    PassLog,
    parse_pipeline,
    random_inputs,
    registered_passes,
    run_pipeline,
)
from kiln.passes.views import SinkViews, broadcast_through_view, segments


def sink(text: str | Graph, constants: dict[str, np.ndarray] | None = None) -> tuple[Graph, Graph, PassLog]:
    """(original, rewritten, log): the pass on a parsed copy, verified."""
    before = ir.parse(text, constants=constants) if isinstance(text, str) else text
    g = ir.parse(ir.print_graph(before), constants=constants) if isinstance(text, str) else before.clone()
    log = PassLog("sink-views")
    g = SinkViews().apply(g, log)
    ir.verify(g)
    return before, g, log


def assert_same_outputs(a: Graph, b: Graph, seed: int = 0) -> None:
    """Bit-identical interpreter outputs on the same random inputs."""
    feeds = random_inputs(a, seed)
    ra, rb = ir.interpret(a, feeds), ir.interpret(b, feeds)
    for v in a.outputs:
        assert ra[v.name].shape == rb[v.name].shape
        np.testing.assert_array_equal(ra[v.name], rb[v.name], err_msg=v.name)


def ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def blocks(g: Graph) -> list[list[str]]:
    by: dict[str, list[str]] = {}
    for n in g.nodes:
        if n.block:
            by.setdefault(n.block, []).append(n.op)
    return list(by.values())


GPT_RESIDUAL = """graph @g(%x: f64[16,64], %w: f64[64,64], %res: f64[1,16,64]) -> (%y) {
  %m = matmul(%x, %w) : f64[16,64]
  %v = reshape(%m) {shape=[1, 16, 64]} : f64[1,16,64]
  %y = add(%v, %res) : f64[1,16,64]
}"""


def test_residual_add_behind_a_reshape_sinks_and_fuses_with_the_matmul():
    before, g, log = sink(GPT_RESIDUAL)
    assert ops(g) == ["matmul", "reshape", "add", "reshape"]
    add = g.nodes[2]
    assert add.inputs[0] is g.value("m") and add.inputs[1].producer.inputs[0] is g.value("res")
    assert add.outputs[0].type.shape == (16, 64)
    assert g.outputs[0].name == "y" and g.outputs[0].producer.op == "reshape"
    assert log.rewrites == [("y", "reshape [16, 64] -> [1, 16, 64] sunk below add")]
    assert_same_outputs(before, g)
    FuseBlocks().apply(g, PassLog("fuse-blocks"))
    ir.verify(g)
    assert blocks(g) == [["matmul", "add"]]


def test_bias_then_gelu_then_residual_sink_one_after_the_other_into_one_block():
    text = """graph @g(%x: f64[1,16,64], %w: f64[64,256], %b: f64[256], %w2: f64[256,64]) -> (%y) {
  %x2 = reshape(%x) {shape=[16, 64]} : f64[16,64]
  %m = matmul(%x2, %w) : f64[16,256]
  %v = reshape(%m) {shape=[1, 16, 256]} : f64[1,16,256]
  %a = add(%v, %b) : f64[1,16,256]
  %g = gelu(%a) {approximate="tanh"} : f64[1,16,256]
  %g2 = reshape(%g) {shape=[16, 256]} : f64[16,256]
  %m2 = matmul(%g2, %w2) : f64[16,64]
  %v2 = reshape(%m2) {shape=[1, 16, 64]} : f64[1,16,64]
  %y = add(%x, %v2) : f64[1,16,64]
}"""
    before, g, log = sink(text)
    assert [at for at, _ in log.rewrites] == ["a", "g", "y"]
    # the bias [256] already broadcasts over [16, 256]: it is read as it is, no reshape of it
    add = next(n for n in g.nodes if n.op == "add")
    assert add.inputs[1] is g.value("b")
    assert_same_outputs(before, g)
    run_pipeline(g, "dce,fuse-blocks")
    assert blocks(g) == [["matmul", "add", "gelu"], ["matmul", "add"]]


def test_a_constant_operand_is_reshaped_into_a_new_constant():
    text = """graph @g(%x: f64[6,8], %w: f64[8,8]) -> (%y) {
  %c = const f64[2,3,1] dense<elided>
  %m = matmul(%x, %w) : f64[6,8]
  %v = reshape(%m) {shape=[2, 3, 8]} : f64[2,3,8]
  %y = mul(%c, %v) : f64[2,3,8]
}"""
    consts = {"c": np.arange(6, dtype=np.float64).reshape(2, 3, 1) - 2.5}
    before, g, _ = sink(text, consts)
    mul = next(n for n in g.nodes if n.op == "mul")
    c2 = mul.inputs[0]
    assert c2.const is not None and c2.type.shape == (6, 1)
    np.testing.assert_array_equal(c2.const.reshape(-1), consts["c"].reshape(-1))
    assert_same_outputs(before, g)


@pytest.mark.parametrize("shape, reason", [
    ((3, 1), "shape [3, 1] broadcasts over part of the dims [2, 3] that the view makes from [6]"),
    ((2, 1, 1), "shape [2, 1, 1] broadcasts over part of the dims [2, 3] that the view makes from [6]"),
])
def test_an_operand_broadcast_over_part_of_a_split_dim_is_refused(shape, reason):
    text = f"""graph @g(%x: f32[6,8], %w: f32[8,8], %b: f32[{','.join(map(str, shape))}]) -> (%y) {{
  %m = matmul(%x, %w) : f32[6,8]
  %v = reshape(%m) {{shape=[2, 3, 8]}} : f32[2,3,8]
  %y = add(%v, %b) : f32[2,3,8]
}}"""
    before, g, log = sink(text)
    assert ir.print_graph(g) == ir.print_graph(before)
    assert [(r.at, r.reason) for r in log.refusals] == [("y", f"operand %b: {reason}")]


def test_batch_norm_is_not_sunk_its_operands_are_per_channel_not_numpy_broadcast():
    text = """graph @g(%x: f32[2,12], %w: f32[12,12], %s: f32[3], %t: f32[3]) -> (%y) {
  %m = matmul(%x, %w) : f32[2,12]
  %v = reshape(%m) {shape=[2, 3, 4]} : f32[2,3,4]
  %y = batch_norm(%v, %s, %t, %t, %s) : f32[2,3,4]
}"""
    before, g, log = sink(text)
    assert ir.print_graph(g) == ir.print_graph(before) and not log.refusals


def test_a_view_read_twice_or_a_source_read_twice_is_left_alone():
    for text in ("""graph @g(%x: f32[4,4], %w: f32[4,4]) -> (%y, %v) {
  %m = matmul(%x, %w) : f32[4,4]
  %v = reshape(%m) {shape=[16]} : f32[16]
  %y = relu(%v) : f32[16]
}""", """graph @g(%x: f32[4,4], %w: f32[4,4]) -> (%y, %z) {
  %m = matmul(%x, %w) : f32[4,4]
  %v = reshape(%m) {shape=[16]} : f32[16]
  %y = relu(%v) : f32[16]
  %z = exp(%m) : f32[4,4]
}"""):
        before, g, log = sink(text)
        assert ir.print_graph(g) == ir.print_graph(before) and not log.rewrites


def test_a_view_of_a_graph_input_is_left_alone_nothing_would_fuse():
    before, g, log = sink("""graph @g(%x: f32[4,4]) -> (%y) {
  %v = reshape(%x) {shape=[16]} : f32[16]
  %y = relu(%v) : f32[16]
}""")
    assert ir.print_graph(g) == ir.print_graph(before)


def test_an_operand_that_broadcasts_the_view_itself_is_left_alone():
    # the view operand is [4,1], the add's result [4,8]: the view's source would have to be broadcast
    before, g, log = sink("""graph @g(%x: f32[2,2], %w: f32[2,2], %b: f32[4,8]) -> (%y) {
  %m = matmul(%x, %w) : f32[2,2]
  %v = reshape(%m) {shape=[4, 1]} : f32[4,1]
  %y = add(%v, %b) : f32[4,8]
}""")
    assert ir.print_graph(g) == ir.print_graph(before)


def test_symbolic_shapes_are_refused():
    before, g, log = sink("""graph @g(%x: f32[N,4], %w: f32[4,4], %b: f32[1,N,4]) -> (%y) {
  %m = matmul(%x, %w) : f32[N,4]
  %v = unsqueeze(%m) {axes=[0]} : f32[1,N,4]
  %y = add(%v, %b) : f32[1,N,4]
}""")
    assert ir.print_graph(g) == ir.print_graph(before)
    assert [r.reason for r in log.refusals] == ["symbolic shape: the view [N, 4] -> [1, N, 4] cannot be checked"]


def test_every_view_op_sinks_squeeze_unsqueeze_flatten():
    text = """graph @g(%x: f64[2,3,4], %w: f64[4,4], %b: f64[4]) -> (%y) {
  %m = matmul(%x, %w) : f64[2,3,4]
  %f = flatten(%m) {axis=2} : f64[6,4]
  %a = add(%f, %b) : f64[6,4]
  %u = unsqueeze(%a) {axes=[1]} : f64[6,1,4]
  %t = tanh(%u) : f64[6,1,4]
  %s = squeeze(%t) {axes=[1]} : f64[6,4]
  %y = sub(%s, %b) : f64[6,4]
}"""
    before, g, log = sink(text)
    assert [at for at, _ in log.rewrites] == ["a", "t", "y"]
    assert [n.op for n in g.nodes if not n.op == "reshape"] == ["matmul", "add", "tanh", "sub"]
    assert all(n.outputs[0].type.shape == (2, 3, 4) for n in g.nodes if n.op != "reshape")
    assert_same_outputs(before, g)


def test_the_pass_is_registered_and_in_a_pipeline_keeps_every_output():
    assert "sink-views" in registered_passes()
    before = ir.parse(GPT_RESIDUAL)
    g = run_pipeline(before.clone(), parse_pipeline("canonicalize,sink-views,dce,fuse-blocks"))
    assert_same_outputs(before, g, seed=3)


# ---------------------------------------------------------------- broadcast_through_view vs numpy


def test_segments_pair_the_merged_and_split_dims():
    assert segments((16, 64), (1, 16, 64)) == [([0], [1]), ([1], [2])]
    assert segments((6, 8), (2, 3, 8)) == [([0], [0, 1]), ([1], [2])]
    assert segments((4, 6), (2, 12)) == [([0, 1], [0, 1])]
    assert segments((4, 6), (5, 5)) is None and segments((0, 2), (2, 0)) is None


def _regroup(draw, src: tuple[int, ...]) -> tuple[int, ...]:
    """A random reshape target of ``src``: adjacent dims merged, dims split into factors, 1s inserted."""
    out: list[int] = []
    i = 0
    while i < len(src):
        if i + 1 < len(src) and draw(st.booleans()):
            out.append(src[i] * src[i + 1])
            i += 2
            continue
        d = src[i]
        f = draw(st.sampled_from([k for k in range(1, d + 1) if d % k == 0]))
        out.extend([f, d // f] if 1 < f < d else [d])
        i += 1
        if draw(st.integers(0, 4)) == 0:
            out.append(1)
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_broadcast_through_view_agrees_with_numpy(data):
    src = tuple(data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    dst = _regroup(data.draw, src)
    keep = data.draw(st.lists(st.booleans(), min_size=len(dst), max_size=len(dst)))
    lead = data.draw(st.integers(0, len(dst)))
    bshape = tuple(d if k else 1 for d, k in zip(dst, keep))[lead:]
    b = np.arange(1, math.prod(bshape) + 1, dtype=np.float64).reshape(bshape)
    want = np.broadcast_to(b, dst).reshape(src)  # what f(view(a), b) reads, in a's layout
    found = broadcast_through_view(bshape, src, dst)
    if isinstance(found, tuple):
        assert len(found) == len(src) and all(f in (1, s) for f, s in zip(found, src))
        np.testing.assert_array_equal(np.broadcast_to(b.reshape(found), src), want)
    else:
        # no b' of b's elements broadcasts to ``want``: the dims along which it is constant leave more
        minimal = want[tuple(slice(0, 1) if np.all(want == want.take([0], axis=k)) else slice(None)
                             for k in range(want.ndim))]
        assert minimal.size != b.size or not np.array_equal(np.broadcast_to(minimal, src), want)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_rewrite_is_bit_exact_on_random_views(data):
    src = tuple(data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dst = _regroup(data.draw, src)
    keep = data.draw(st.lists(st.booleans(), min_size=len(dst), max_size=len(dst)))
    bshape = tuple(d if k else 1 for d, k in zip(dst, keep))
    op = data.draw(st.sampled_from(["add", "mul", "sub", "div", "max"]))
    sh = lambda s: ",".join(map(str, s))  # noqa: E731
    text = f"""graph @g(%x: f64[{sh(src)}], %b: f64[{sh(bshape)}]) -> (%y) {{
  %e = exp(%x) : f64[{sh(src)}]
  %v = reshape(%e) {{shape=[{', '.join(map(str, dst))}]}} : f64[{sh(dst)}]
  %y = {op}(%b, %v) : f64[{sh(dst)}]
}}"""
    before, g, log = sink(text)
    assert len(log.rewrites) + len(log.refusals) == 1
    if log.rewrites:
        assert g.value("e").uses[0][0].op == op
        assert_same_outputs(before, g, seed=data.draw(st.integers(0, 9)))
    else:
        assert ir.print_graph(g) == ir.print_graph(before)
