"""sink-views: ``f(view(a), b) -> view(f(a, b'))`` is exact, refused with a reason where b' does not exist;
hoist-views: transpose chains fold, views move above a split, a split becomes slices, all exact.

Graphs are written in IR text; rewritten graphs must compute bit-identical
float64 outputs in the interpreter, refusals leave the printed graph as it was,
and ``broadcast_through_view``, ``fold_transposes`` and ``hoist_split_views``
are checked against numpy on random shapes.
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
from kiln.passes.views import (
    HoistViews,
    SinkViews,
    broadcast_through_view,
    fold_transposes,
    hoist_split_views,
    segments,
)


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


# ================================================================ hoist-views


def hoist(text: str, constants: dict[str, np.ndarray] | None = None) -> tuple[Graph, Graph, PassLog]:
    """(original, rewritten, log): hoist-views on a parsed copy, verified."""
    before = ir.parse(text, constants=constants)
    g = ir.parse(text, constants=constants)
    log = PassLog("hoist-views")
    g = HoistViews().apply(g, log)
    ir.verify(g)
    return before, g, log


# GPT-2's dynamo export: one q/k/v projection, split, a head view each, kT as transpose(reshape(transpose)).
GPT_QKV = """graph @g(%x: f64[16,64], %w: f64[64,192]) -> (%q, %kT, %v) {
  %c = const f64[] [0.5]
  %m = matmul(%x, %w) : f64[16,192]
  %m3 = reshape(%m) {shape=[1, 16, 192]} : f64[1,16,192]
  %s0, %s1, %s2 = split(%m3) {axis=2, split=[64, 64, 64]} : f64[1,16,64], f64[1,16,64], f64[1,16,64]
  %hk = reshape(%s1) {shape=[1, 16, 4, 16]} : f64[1,16,4,16]
  %tk = transpose(%hk) {perm=[0, 2, 1, 3]} : f64[1,4,16,16]
  %hv = reshape(%s2) {shape=[1, 16, 4, 16]} : f64[1,16,4,16]
  %v = transpose(%hv) {perm=[0, 2, 1, 3]} : f64[1,4,16,16]
  %hq = reshape(%s0) {shape=[1, 16, 4, 16]} : f64[1,16,4,16]
  %tq = transpose(%hq) {perm=[0, 2, 1, 3]} : f64[1,4,16,16]
  %k3 = reshape(%tk) {shape=[4, 16, 16]} : f64[4,16,16]
  %kt3 = transpose(%k3) {perm=[0, 2, 1]} : f64[4,16,16]
  %kt4 = reshape(%kt3) {shape=[1, 4, 16, 16]} : f64[1,4,16,16]
  %q = mul(%tq, %c) : f64[1,4,16,16]
  %kT = mul(%kt4, %c) : f64[1,4,16,16]
}"""


def test_gpt_qkv_split_becomes_slices_of_one_head_view_and_kt_one_transpose():
    before, g, log = hoist(GPT_QKV)
    assert ops(g) == ["matmul", "reshape", "reshape", "slice", "slice", "slice", "transpose", "transpose",
                      "transpose", "mul", "mul"]
    heads = g.nodes[2].outputs[0]
    assert heads.type.shape == (1, 16, 12, 16)
    slices = {n.outputs[0].name: (n.attrs["starts"], n.attrs["ends"], n.attrs["axes"]) for n in g.nodes
              if n.op == "slice"}
    assert slices == {"hq": ([0], [4], [2]), "hk": ([4], [8], [2]), "hv": ([8], [12], [2])}
    kt = g.value("kt4").producer
    assert kt.op == "transpose" and kt.attrs["perm"] == [0, 2, 3, 1] and kt.inputs[0] is g.value("hk")
    assert [at for at, _ in log.rewrites] == ["kt4", "s0", "hq"]  # fold, hoist (at the old split), slices
    assert log.rewrites[0][1] == "transpose+reshape+transpose+reshape folded into transpose [0, 2, 3, 1]"
    assert_same_outputs(before, g)


def test_hoisted_gpt_qkv_fuses_q_and_v_into_the_attention_block():
    text = GPT_QKV.replace("f64", "f32").replace("-> (%q, %kT, %v)", "-> (%y)").replace(
        "  %kT = mul(%kt4, %c) : f32[1,4,16,16]\n", """  %kT = mul(%kt4, %c) : f32[1,4,16,16]
  %s = matmul(%q, %kT) : f32[1,4,16,16]
  %p = softmax(%s) {axis=-1} : f32[1,4,16,16]
  %o = matmul(%p, %v) : f32[1,4,16,16]
  %ot = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,16,4,16]
  %y = reshape(%ot) {shape=[16, 64]} : f32[16,64]
""")
    before = ir.parse(text)
    g = run_pipeline(ir.parse(text), "hoist-views,sink-views,dce,fuse-blocks")
    assert blocks(g) == [["matmul"],
                         ["slice", "slice", "transpose", "transpose", "mul", "matmul", "softmax", "matmul",
                          "transpose"],
                         ["slice", "transpose", "mul"]]  # kT = transpose(k, [0,2,3,1]) stays a kernel
    assert_same_outputs(before, g)


def test_an_identity_view_before_a_transpose_disappears_and_a_unit_transpose_is_a_view():
    before, g, log = hoist("""graph @g(%x: f64[2,3], %w: f64[3,4]) -> (%y, %z) {
  %m = matmul(%x, %w) : f64[2,4]
  %u = unsqueeze(%m) {axes=[0]} : f64[1,2,4]
  %v = reshape(%u) {shape=[1, 2, 4]} : f64[1,2,4]
  %y = transpose(%v) {perm=[0, 2, 1]} : f64[1,4,2]
  %e = exp(%x) : f64[2,3]
  %e1 = unsqueeze(%e) {axes=[1]} : f64[2,1,3]
  %z = transpose(%e1) {perm=[1, 0, 2]} : f64[1,2,3]
}""")
    assert ops(g) == ["matmul", "reshape", "transpose", "exp", "reshape"]
    assert g.value("y").producer.attrs["perm"] == [0, 2, 1]
    assert g.value("y").producer.inputs[0].producer.inputs[0] is g.value("m")
    assert g.value("z").producer.op == "reshape" and g.value("z").producer.inputs[0] is g.value("e")
    assert_same_outputs(before, g)


def test_canonical_chains_and_shared_links_are_left_alone():
    before, g, log = hoist("""graph @g(%x: f64[2,3,4]) -> (%y, %z) {
  %e = exp(%x) : f64[2,3,4]
  %v = reshape(%e) {shape=[6, 4]} : f64[6,4]
  %y = transpose(%v) {perm=[1, 0]} : f64[4,6]
  %t = transpose(%x) {perm=[2, 1, 0]} : f64[4,3,2]
  %r = reshape(%t) {shape=[1, 4, 3, 2]} : f64[1,4,3,2]
  %z = transpose(%r) {perm=[0, 1, 3, 2]} : f64[1,4,2,3]
  %w = relu(%t) : f64[4,3,2]
}""".replace("-> (%y, %z)", "-> (%y, %z, %w)"))
    assert ir.print_graph(g) == ir.print_graph(before) and not log.rewrites  # %t has two readers


@pytest.mark.parametrize("views, reason", [
    (("[1, 16, 4, 16]", "[1, 16, 4, 16]", "[1, 16, 8, 8]"),
     "the views [[1, 16, 4, 16], [1, 16, 4, 16], [1, 16, 8, 8]] of its outputs do not cut the split axis 2 "
     "of [1, 16, 192] the same way"),
    (("[16, 64]", "[16, 64]", "[1, 16, 4, 16]"), "the views of its outputs have different ranks"),
    (("[1, 4, 16, 16]", "[1, 4, 16, 16]", "[1, 4, 16, 16]"),
     "the views [[1, 4, 16, 16], [1, 4, 16, 16], [1, 4, 16, 16]] of its outputs do not cut the split axis 2 "
     "of [1, 16, 192] the same way"),
])
def test_split_views_that_do_not_agree_are_refused(views, reason):
    shapes = [v.strip("[]").replace(" ", "") for v in views]
    text = f"""graph @g(%x: f64[1,16,192]) -> (%a, %b, %c) {{
  %e = exp(%x) : f64[1,16,192]
  %s0, %s1, %s2 = split(%e) {{axis=2, split=[64, 64, 64]}} : f64[1,16,64], f64[1,16,64], f64[1,16,64]
  %a = reshape(%s0) {{shape={views[0]}}} : f64[{shapes[0]}]
  %b = reshape(%s1) {{shape={views[1]}}} : f64[{shapes[1]}]
  %c = reshape(%s2) {{shape={views[2]}}} : f64[{shapes[2]}]
}}"""
    before, g, log = hoist(text)
    assert ir.print_graph(g) == ir.print_graph(before)
    assert ("s0", reason) in [(r.at, r.reason) for r in log.refusals]


def test_a_split_read_by_views_with_unequal_pieces_hoists():
    before, g, log = hoist("""graph @g(%x: f64[2,3,24]) -> (%a, %b) {
  %e = exp(%x) : f64[2,3,24]
  %s0, %s1 = split(%e) {axis=2, split=[8, 16]} : f64[2,3,8], f64[2,3,16]
  %r0 = reshape(%s0) {shape=[2, 3, 2, 4]} : f64[2,3,2,4]
  %r1 = reshape(%s1) {shape=[2, 3, 4, 4]} : f64[2,3,4,4]
  %a = tanh(%r0) : f64[2,3,2,4]
  %b = neg(%r1) : f64[2,3,4,4]
}""")
    assert ops(g) == ["exp", "reshape", "slice", "slice", "tanh", "neg"]
    assert [n.attrs["starts"] for n in g.nodes if n.op == "slice"] == [[0], [2]]
    assert_same_outputs(before, g)


@pytest.mark.parametrize("tail, reason", [
    ("  %a = tanh(%s0) : f64[2,6]\n  %b = neg(%s1) : f64[2,6]\n  %c = sigmoid(%s1) : f64[2,6]\n",
     "%s1 has 2 readers: the split stays one kernel"),
    ("  %a = tanh(%s0) : f64[2,6]\n  %b = softmax(%s1) {axis=-1} : f64[2,6]\n",
     "%s1 is read by softmax, which does not take a slice into its kernel"),
])
def test_a_split_whose_outputs_do_not_all_feed_one_pointwise_node_stays(tail, reason):
    outs = "%a, %b, %c" if "%c" in tail else "%a, %b"
    text = (f"graph @g(%x: f64[2,12]) -> ({outs}) {{\n"
            "  %s0, %s1 = split(%x) {axis=1, split=[6, 6]} : f64[2,6], f64[2,6]\n" + tail + "}")
    before, g, log = hoist(text)
    assert ir.print_graph(g) == ir.print_graph(before)
    assert [(r.at, r.reason) for r in log.refusals] == [("s0", reason)]


def test_a_glu_split_becomes_two_slices_in_one_block():
    before, g, log = hoist("""graph @g(%x: f64[4,16]) -> (%y) {
  %s0, %s1 = split(%x) {axis=-1, split=[8, 8]} : f64[4,8], f64[4,8]
  %g = sigmoid(%s1) : f64[4,8]
  %y = mul(%s0, %g) : f64[4,8]
}""")
    assert ops(g) == ["slice", "slice", "sigmoid", "mul"]
    assert_same_outputs(before, g)
    run_pipeline(g, "fuse-blocks")
    assert blocks(g) == [["slice", "slice", "sigmoid", "mul"]]


def test_hoist_views_is_registered_and_idempotent():
    assert "hoist-views" in registered_passes()
    before, g, _ = hoist(GPT_QKV)
    again = ir.print_graph(g)
    log = PassLog("hoist-views")
    HoistViews().apply(g, log)
    assert ir.print_graph(g) == again and not log.rewrites


# ---------------------------------------------------------------- fold_transposes / hoist_split_views vs numpy


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fold_transposes_agrees_with_numpy(data):
    src = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    x = np.arange(math.prod(src)).reshape(src)
    want, steps = x, []
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            perm = tuple(data.draw(st.permutations(range(want.ndim))))
            want = want.transpose(perm)
            steps.append(("transpose", perm))
        else:  # a view that inserts or drops size-1 dims
            dims = [d for d in want.shape if d != 1 or data.draw(st.booleans())]
            for _ in range(data.draw(st.integers(0, 2))):
                dims.insert(data.draw(st.integers(0, len(dims))), 1)
            want = want.reshape(dims)
            steps.append(("view", tuple(dims)))
    view, perm = fold_transposes(src, steps)
    got = x.reshape(view) if view is not None else x
    got = got.transpose(perm) if perm is not None else got.reshape(want.shape)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert (perm is None) == np.array_equal(want.reshape(-1), x.reshape(-1))  # a view exactly when the order holds


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hoist_split_views_agrees_with_numpy(data):
    rank = data.draw(st.integers(1, 3))
    axis = data.draw(st.integers(0, rank - 1))
    unit = data.draw(st.sampled_from([1, 2, 4]))
    sizes = [unit * data.draw(st.integers(1, 3)) for _ in range(data.draw(st.integers(1, 3)))]
    src = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    src[axis] = sum(sizes)
    x = np.arange(math.prod(src)).reshape(src)
    pieces = np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    cut = data.draw(st.sampled_from([1, unit]))
    views = [p.shape[:axis] + ((p.shape[axis] // cut, cut) if cut > 1 else (p.shape[axis],)) + p.shape[axis + 1:]
             for p in pieces]
    flat = data.draw(st.booleans()) and len(views) > 1
    if flat:  # one piece viewed flat: the views no longer agree outside one axis (unless it changes nothing)
        k = data.draw(st.integers(0, len(views) - 1))
        views[k] = (int(pieces[k].size),)
    found = hoist_split_views(tuple(src), axis, sizes, views)
    if isinstance(found, str):
        assert flat, found  # views that cut the axis alike always hoist
        return
    shape, axis2, sizes2 = found
    got = np.split(x.reshape(shape), np.cumsum(sizes2)[:-1], axis=axis2)
    for g_, p, v in zip(got, pieces, views):
        np.testing.assert_array_equal(g_, p.reshape(v))
