"""codegen.attention: the attention chain is recognized, and lowers to one kernel that matches the interpreter."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import s_tir

from kiln import ir
from kiln.codegen.attention import AttentionSpec, lower_attention, match_attention
from kiln.codegen.kernel import run_kernel
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import assert_close
from kiln.ir.interpret import interpret
from kiln.ir.text import parse

TARGET = host_target()
rng = np.random.default_rng(7)

GPT = """graph @gpt(%q: f32[1,4,128,64], %kT: f32[1,4,64,128], %v: f32[1,4,128,64]) -> (%out) {
  %scale = const f32[] [0.125]
  %neg_inf = const f32[] [-inf]
  %mask = const bool[1,1,128,128] dense<elided>
  %matmul = matmul(%q, %kT) : f32[1,4,128,128]
  %mul = mul(%matmul, %scale) : f32[1,4,128,128]
  %masked_fill = where(%mask, %neg_inf, %mul) : f32[1,4,128,128]
  %softmax = softmax(%masked_fill) {axis=-1} : f32[1,4,128,128]
  %out = matmul(%softmax, %v) : f32[1,4,128,64]
}"""

VIT = """graph @vit(%q: f32[1,3,65,64], %kT: f32[1,3,64,65], %v: f32[1,3,65,64]) -> (%out) {
  %scale = const f32[] [0.125]
  %matmul = matmul(%q, %kT) : f32[1,3,65,65]
  %mul = mul(%matmul, %scale) : f32[1,3,65,65]
  %softmax = softmax(%mul) {axis=-1} : f32[1,3,65,65]
  %out = matmul(%softmax, %v) : f32[1,3,65,64]
}"""

LLAMA = """graph @llama(%q: f32[1,4,128,64], %kT: f32[1,4,64,128], %v: f32[1,4,128,64]) -> (%out) {
  %sqrt_d = const f32[] [8.0]
  %mask = const f32[1,1,128,128] dense<elided>
  %matmul = matmul(%q, %kT) : f32[1,4,128,128]
  %div = div(%matmul, %sqrt_d) : f32[1,4,128,128]
  %add = add(%div, %mask) : f32[1,4,128,128]
  %softmax = softmax(%add) {axis=-1} : f32[1,4,128,128]
  %out = matmul(%softmax, %v) : f32[1,4,128,64]
}"""


def causal_bool(s: int) -> np.ndarray:
    """True above the diagonal: the entries ``where(mask, -inf, x)`` hides (GPT's ``~tril``)."""
    return ~np.tril(np.ones((s, s), bool))[None, None]


def causal_additive(s: int) -> np.ndarray:
    """LLaMA's additive causal mask: finfo.min above the diagonal, 0 elsewhere."""
    return np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)[None, None]


def gpt(s: int = 128):
    return parse(GPT, constants={"mask": causal_bool(s)})


def llama():
    return parse(LLAMA, constants={"mask": causal_additive(128)})


def feeds_for(graph) -> dict[str, np.ndarray]:
    return {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}


def check_numerics(graph, feeds: dict[str, np.ndarray] | None = None) -> tuple[AttentionSpec, object]:
    """Match the whole graph, lower and run the kernel, compare with the interpreter."""
    spec = match_attention(graph.nodes)
    assert spec is not None
    feeds = feeds if feeds is not None else feeds_for(graph)
    kernel = lower_attention(spec, TARGET, "attention")
    assert not kernel.notes, kernel.notes
    (got,) = run_kernel(kernel, feeds, TARGET)
    assert_close(got, interpret(graph, feeds)[graph.outputs[0].name], what="attention")
    return spec, kernel


# ------------------------------------------------------------------ matching


def test_gpt_causal_form_is_matched():
    g = gpt()
    spec = match_attention(g.nodes)
    assert spec is not None
    assert [n.op for n in spec.nodes] == ["matmul", "mul", "where", "softmax", "matmul"]
    assert (spec.q.name, spec.k_t.name, spec.v.name) == ("q", "kT", "v")
    assert (spec.scale, spec.scale_op) == (0.125, "mul")
    assert (spec.mask_kind, spec.mask.name, spec.fill, spec.fill_when) == ("select", "mask", -np.inf, True)
    assert spec.out is g.outputs[0] and spec.scores_shape == (1, 4, 128, 128)


def test_vit_form_without_mask_is_matched():
    spec = match_attention(parse(VIT).nodes)
    assert spec is not None and spec.mask_kind is None and spec.mask is None
    assert (spec.scale, spec.scale_op) == (0.125, "mul")


def test_llama_form_keeps_the_division_and_the_additive_mask():
    spec = match_attention(llama().nodes)
    assert spec is not None
    assert (spec.scale, spec.scale_op) == (8.0, "div")
    assert (spec.mask_kind, spec.mask.name, spec.fill) == ("additive", "mask", None)


def test_operand_order_variants_are_matched():
    text = """graph @g(%q: f32[2,9,8], %kT: f32[2,8,9], %v: f32[2,9,5], %m: bool[9,9]) -> (%out) {
      %c = const f32[1] [0.5]
      %fill = const f32[] [-10000.0]
      %s = matmul(%q, %kT) : f32[2,9,9]
      %x = mul(%c, %s) : f32[2,9,9]
      %y = where(%m, %x, %fill) : f32[2,9,9]
      %p = softmax(%y) {axis=2} : f32[2,9,9]
      %out = matmul(%p, %v) : f32[2,9,5]
    }"""
    spec = match_attention(parse(text).nodes)
    assert spec is not None
    assert (spec.scale, spec.scale_op, spec.fill, spec.fill_when) == (0.5, "mul", -10000.0, False)
    assert spec.scores_shape == (2, 9, 9)


def test_bare_matmul_softmax_matmul_is_matched():
    text = """graph @g(%q: f32[1,2,6,4], %kT: f32[1,2,4,7], %v: f32[1,2,7,3]) -> (%out) {
      %s = matmul(%q, %kT) : f32[1,2,6,7]
      %p = softmax(%s) {axis=-1} : f32[1,2,6,7]
      %out = matmul(%p, %v) : f32[1,2,6,3]
    }"""
    spec = match_attention(parse(text).nodes)
    assert spec is not None and spec.scale is None and spec.mask is None


NEAR_MISSES = {
    "softmax on another axis": (VIT.replace("{axis=-1}", "{axis=2}"), None),
    "an inner value read outside": (VIT.replace("-> (%out)", "-> (%out, %mul)"), None),
    "an inner value read by a later node": (VIT.replace(
        "  %out = matmul(%softmax, %v) : f32[1,3,65,64]\n",
        "  %out = matmul(%softmax, %v) : f32[1,3,65,64]\n  %extra = relu(%matmul) : f32[1,3,65,65]\n"), 4),
    "divided into the constant": (VIT.replace("mul(%matmul, %scale)", "div(%scale, %matmul)"), None),
    "scale by a tensor": (VIT.replace("%scale = const f32[] [0.125]", "%scale = const f32[65] dense<elided>"),
                          None),
    "softmax output as the right operand": (VIT.replace("matmul(%softmax, %v) : f32[1,3,65,64]",
                                                        "matmul(%v, %softmax) : f32[1,3,65,65]"), None),
    "float64": (VIT.replace("f32", "f64"), None),
    "mask fill not a constant": (GPT.replace("%neg_inf = const f32[] [-inf]\n", "").replace(
        "(%q: f32[1,4,128,64],", "(%neg_inf: f32[], %q: f32[1,4,128,64],"), None),
}


@pytest.mark.parametrize("case", sorted(NEAR_MISSES))
def test_near_misses_are_refused(case):
    text, count = NEAR_MISSES[case]
    consts = {"scale": np.ones(65, np.float32)} if case == "scale by a tensor" else {}
    if "%mask" in text:
        consts["mask"] = causal_bool(128)
    g = parse(text, constants=consts)
    nodes = g.nodes[:count] if count else g.nodes
    assert match_attention(nodes) is None


def test_a_partial_or_reordered_chain_is_refused():
    g = gpt()
    assert match_attention(g.nodes[:-1]) is None
    assert match_attention(g.nodes[1:]) is None
    assert match_attention([g.nodes[0], g.nodes[2], g.nodes[1], *g.nodes[3:]]) is None


# ------------------------------------------------------------------ numerics


def test_gpt_causal_matches_the_interpreter():
    check_numerics(gpt())


def test_vit_without_mask_matches_the_interpreter():
    check_numerics(parse(VIT))


def test_llama_additive_constant_mask_matches_the_interpreter():
    check_numerics(llama())


def test_computed_additive_mask_is_a_kernel_parameter():
    text = LLAMA.replace("%mask = const f32[1,1,128,128] dense<elided>\n", "").replace(
        "%v: f32[1,4,128,64])", "%v: f32[1,4,128,64], %mask: f32[1,4,1,128])").replace(
        "add(%div, %mask)", "add(%mask, %div)")
    g = parse(text)
    feeds = feeds_for(g)
    feeds["mask"] = np.where(rng.random((1, 4, 1, 128)) < 0.3, -np.inf, 0.0).astype(np.float32)
    _, kernel = check_numerics(g, feeds)
    assert [a.value.name for a in kernel.args] == ["q", "kT", "v", "mask"]


def test_rank3_broadcast_batch_and_ragged_sizes():
    text = """graph @g(%q: f32[3,13,24], %kT: f32[1,24,37], %v: f32[3,37,20]) -> (%out) {
      %c = const f32[] [3.0]
      %s = matmul(%q, %kT) : f32[3,13,37]
      %x = div(%s, %c) : f32[3,13,37]
      %p = softmax(%x) {axis=-1} : f32[3,13,37]
      %out = matmul(%p, %v) : f32[3,13,20]
    }"""
    check_numerics(parse(text))


def test_a_value_used_twice_is_passed_once():
    text = """graph @g(%x: f32[2,16,16]) -> (%out) {
      %s = matmul(%x, %x) : f32[2,16,16]
      %p = softmax(%s) {axis=-1} : f32[2,16,16]
      %out = matmul(%p, %x) : f32[2,16,16]
    }"""
    g = parse(text)
    _, kernel = check_numerics(g, {"x": (rng.standard_normal((2, 16, 16)) * 0.3).astype(np.float32)})
    assert [a.value.name for a in kernel.args] == ["x"]


def test_fully_masked_rows_match_the_interpreter():
    """-inf everywhere in a row: the interpreter's exp(-inf - -inf) is NaN; a finite fill gives a uniform row."""
    mask = causal_bool(128).copy()
    mask[..., 5, :] = True
    for fill in ("-inf", "-1e9"):
        g = parse(GPT.replace("[-inf]", f"[{fill}]"), constants={"mask": mask})
        feeds = feeds_for(g)
        want = interpret(g, feeds)["out"]
        spec = match_attention(g.nodes)
        (got,) = run_kernel(lower_attention(spec, TARGET, "attention"), feeds, TARGET)
        assert np.isnan(want[..., 5, :]).all() == (fill == "-inf")
        assert_close(got, want, what=f"fill {fill}")


@pytest.mark.parametrize("sq,sk", [(37, 37), (16, 48), (128, 128)])
def test_causal_masks_skip_dead_columns_and_match(sq, sk):
    """Constant causal masks (offset sk - sq: the last rows of a longer key sequence) bound the column loops."""
    text = (GPT.replace("%v: f32[1,4,128,64]", f"%v: f32[1,4,{sk},64]").replace("128,64]", f"{sq},64]")
            .replace("64,128]", f"64,{sk}]").replace("128,128]", f"{sq},{sk}]"))
    mask = ~np.tril(np.ones((sq, sk), bool), sk - sq)[None, None]
    spec, kernel = check_numerics(parse(text, constants={"mask": mask}))
    assert spec.causal_offset == sk - sq
    assert "T.min(" in kernel.func.script()  # loop extents bounded by the tile's last live column


def test_sliding_window_and_additive_offset_masks():
    window = np.tril(np.ones((128, 128), bool)) & ~np.tril(np.ones((128, 128), bool), -9)
    g = parse(GPT, constants={"mask": ~window[None, None]})
    spec, _ = check_numerics(g)
    assert spec.causal_offset == 0
    additive = np.where(np.tril(np.ones((128, 128), bool), 3), 0.0, -np.inf).astype(np.float32)[None, None]
    spec, _ = check_numerics(parse(LLAMA, constants={"mask": additive}))
    assert spec.causal_offset == 3


def test_masks_that_do_not_end_rows_early_get_no_offset():
    assert match_attention(parse(GPT, constants={"mask": causal_bool(128)[..., ::-1].copy()}).nodes) \
        .causal_offset is None  # anti-causal: every row reaches the last column
    finite = parse(GPT.replace("[-inf]", "[-1e9]"), constants={"mask": causal_bool(128)})
    assert match_attention(finite.nodes).causal_offset is None  # -1e9 is not dead enough to skip
    mixed = causal_additive(128).copy()
    mixed[..., 0, 5] = -1e25  # neither dead nor safely live
    assert match_attention(parse(LLAMA, constants={"mask": mixed}).nodes).causal_offset is None
    dead_row = causal_additive(128).copy()
    dead_row[..., 7, :] = np.finfo(np.float32).min  # a fully masked row with a finite value is uniform
    assert match_attention(parse(LLAMA, constants={"mask": dead_row}).nodes).causal_offset is None


def test_keep_mask_orientation_matches_the_interpreter():
    text = GPT.replace("where(%mask, %neg_inf, %mul)", "where(%mask, %mul, %neg_inf)")
    check_numerics(parse(text, constants={"mask": ~causal_bool(128)}))


# ------------------------------------------------------------------ schedule


def _allocations(func) -> dict[str, int]:
    """Element count of every buffer the kernel allocates, after TVM compacts them to the regions used."""
    passes = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerOpaqueBlock(),
    ])
    text = passes(tvm.IRModule({"main": func}))["main"].script()
    found = re.findall(r"(\w+) = T\.alloc_buffer\(\(([\d, ]+)\)", text)
    assert found, text
    return {name: int(np.prod([int(d) for d in dims.split(",") if d.strip()])) for name, dims in found}


@pytest.mark.parametrize("make", [gpt, llama, lambda: parse(VIT)], ids=["gpt", "llama", "vit"])
def test_no_buffer_holds_the_score_matrix(make):
    spec = match_attention(make().nodes)
    kernel = lower_attention(spec, TARGET, "attention")
    sq, sk = spec.scores_shape[-2:]
    sizes = _allocations(kernel.func)
    assert max(sizes.values()) < sq * sk, sizes
    assert max(sizes.values()) <= 8 * sk, sizes  # a row tile of scores, not more


def test_schedule_is_parallel_and_vectorized():
    kernel = lower_attention(match_attention(gpt().nodes), TARGET, "attention")
    text = kernel.func.script()
    assert text.count("T.parallel(") == 1
    assert text.count("T.vectorized(") >= 5
    assert kernel.kind == "attention" and [v.name for v in kernel.outputs] == ["out"]


# ------------------------------------------------------------------ fused operand transposes

# The zoo GPT's form: q, kT and v are transposes of the [1, S, H, D] projections.
GPT_T = """graph @gpt(%xq: f32[1,128,4,64], %xk: f32[1,128,4,64], %xv: f32[1,128,4,64]) -> (%out) {
  %scale = const f32[] [0.125]
  %neg_inf = const f32[] [-inf]
  %mask = const bool[1,1,128,128] dense<elided>
  %q = transpose(%xq) {perm=[0, 2, 1, 3]} : f32[1,4,128,64]
  %v = transpose(%xv) {perm=[0, 2, 1, 3]} : f32[1,4,128,64]
  %kT = transpose(%xk) {perm=[0, 2, 3, 1]} : f32[1,4,64,128]
  %matmul = matmul(%q, %kT) : f32[1,4,128,128]
  %mul = mul(%matmul, %scale) : f32[1,4,128,128]
  %masked_fill = where(%mask, %neg_inf, %mul) : f32[1,4,128,128]
  %softmax = softmax(%masked_fill) {axis=-1} : f32[1,4,128,128]
  %out = matmul(%softmax, %v) : f32[1,4,128,64]
}"""

# ViT's form (ragged 65 tokens, no mask), kT given as a last-axis-keeping transpose of [1, 3, 64, 65].
VIT_T = """graph @vit(%xq: f32[1,65,3,64], %xk: f32[3,1,64,65], %xv: f32[1,65,3,64]) -> (%out) {
  %scale = const f32[] [0.125]
  %q = transpose(%xq) {perm=[0, 2, 1, 3]} : f32[1,3,65,64]
  %kT = transpose(%xk) {perm=[1, 0, 2, 3]} : f32[1,3,64,65]
  %v = transpose(%xv) {perm=[0, 2, 1, 3]} : f32[1,3,65,64]
  %matmul = matmul(%q, %kT) : f32[1,3,65,65]
  %mul = mul(%matmul, %scale) : f32[1,3,65,65]
  %softmax = softmax(%mul) {axis=-1} : f32[1,3,65,65]
  %out = matmul(%softmax, %v) : f32[1,3,65,64]
}"""


def gpt_t():
    return parse(GPT_T, constants={"mask": causal_bool(128)})


def test_q_and_v_transposes_are_folded_into_the_spec():
    g = gpt_t()
    q_t, v_t, k_t = g.nodes[:3]
    spec = match_attention([q_t, v_t, *g.nodes[3:]])
    assert spec is not None
    assert [n.op for n in spec.nodes] == ["transpose", "transpose", "matmul", "mul", "where", "softmax", "matmul"]
    assert (spec.q.name, spec.k_t.name, spec.v.name) == ("xq", "kT", "xv")
    assert (spec.q_perm, spec.k_perm, spec.v_perm) == ((0, 2, 1, 3), None, (0, 2, 1, 3))
    assert spec.qk is g.nodes[3] and spec.scores_shape == (1, 4, 128, 128) and spec.out is g.outputs[0]
    assert spec.causal_offset == 0


def test_a_kt_transpose_that_moves_the_last_axis_is_refused():
    g = gpt_t()
    assert match_attention(g.nodes) is None  # kT = transpose(k, [0,2,3,1]): its column loads would be gathers
    assert match_attention([g.nodes[2], *g.nodes[3:]]) is None
    assert match_attention(g.nodes[3:]) is not None


def test_transposes_that_do_not_feed_the_chain_privately_are_refused():
    g = gpt_t()
    q_t, v_t, _ = g.nodes[:3]
    chain = list(g.nodes[3:])
    assert match_attention([q_t, q_t, *chain]) is None  # one operand, two transposes
    assert match_attention([*chain[:1], q_t, *chain[1:]]) is None  # not leading
    text = GPT_T.replace("-> (%out)", "-> (%out, %q)")  # q is also a graph output
    g2 = parse(text, constants={"mask": causal_bool(128)})
    assert match_attention([g2.nodes[0], *g2.nodes[3:]]) is None
    text = """graph @g(%x: f32[1,2,8,4], %kT: f32[1,2,4,8], %v: f32[1,2,8,4]) -> (%out, %r) {
      %t = transpose(%x) {perm=[0, 1, 3, 2]} : f32[1,2,4,8]
      %q = transpose(%t) {perm=[0, 1, 3, 2]} : f32[1,2,8,4]
      %s = matmul(%q, %kT) : f32[1,2,8,8]
      %p = softmax(%s) {axis=-1} : f32[1,2,8,8]
      %out = matmul(%p, %v) : f32[1,2,8,4]
      %r = relu(%t) : f32[1,2,4,8]
    }"""
    g3 = parse(text)
    assert match_attention(g3.nodes[1:5]) is not None
    assert match_attention(g3.nodes[:5]) is None  # %t feeds a transpose, not the chain


def test_gpt_form_with_transposes_matches_the_interpreter():
    sub = parse(GPT_T.replace("%xk: f32[1,128,4,64]", "%kT: f32[1,4,64,128]").replace(
        "  %kT = transpose(%xk) {perm=[0, 2, 3, 1]} : f32[1,4,64,128]\n", ""),
        constants={"mask": causal_bool(128)})
    spec, kernel = check_numerics(sub)
    assert [a.value.name for a in kernel.args] == ["xq", "kT", "xv", "mask"]
    assert spec.q_perm is not None and spec.v_perm is not None


def test_vit_form_with_transposes_matches_the_interpreter():
    spec, kernel = check_numerics(parse(VIT_T))
    assert (spec.q_perm, spec.k_perm, spec.v_perm) == ((0, 2, 1, 3), (1, 0, 2, 3), (0, 2, 1, 3))
    assert [a.value.name for a in kernel.args] == ["xq", "xk", "xv"]


def test_a_transposed_operand_broadcasts_its_batch_dims_and_q_may_move_its_last_axis():
    text = """graph @g(%xq: f32[8,1,2,5], %kT: f32[1,1,8,5], %xv: f32[1,5,1,3]) -> (%out) {
      %q = transpose(%xq) {perm=[1, 2, 3, 0]} : f32[1,2,5,8]
      %v = transpose(%xv) {perm=[0, 2, 1, 3]} : f32[1,1,5,3]
      %s = matmul(%q, %kT) : f32[1,2,5,5]
      %p = softmax(%s) {axis=-1} : f32[1,2,5,5]
      %out = matmul(%p, %v) : f32[1,2,5,3]
    }"""
    spec, _ = check_numerics(parse(text))
    assert spec.q_perm == (1, 2, 3, 0) and spec.v_perm == (0, 2, 1, 3)


def test_codegen_lowers_a_transpose_led_block_to_the_fused_kernel():
    from kiln.codegen.build import lower_kernel

    g = gpt_t()
    block = [g.nodes[0], g.nodes[1], *g.nodes[3:]]  # q's and v's transposes, then the chain
    kernel = lower_kernel(block, TARGET, name="attention")
    assert kernel.kind == "attention" and not kernel.notes
    assert [a.value.name for a in kernel.args] == ["xq", "kT", "xv", "mask"]


# ------------------------------------------------------------------ SDPA's NaN guard

# torch SDPA's dynamo export: q and kT pre-scaled, an additive mask, where(isnan(p), 0, p) after the softmax.
SDPA = """graph @sdpa(%q: f32[1,2,16,8], %kT: f32[1,2,8,16], %v: f32[1,2,16,8], %m: f32[1,1,16,16]) -> (%out) {
  %zero = const f32[] [0.0]
  %s = matmul(%q, %kT) : f32[1,2,16,16]
  %a = add(%s, %m) : f32[1,2,16,16]
  %p = softmax(%a) {axis=-1} : f32[1,2,16,16]
  %n = is_nan(%p) : bool[1,2,16,16]
  %w = where(%n, %zero, %p) : f32[1,2,16,16]
  %out = matmul(%w, %v) : f32[1,2,16,8]
}"""


def sdpa_feeds(g) -> dict[str, np.ndarray]:
    """Causal additive mask with row 3 fully masked (-inf) and a +inf score in row 7; a NaN q entry (head 1, row 9)."""
    feeds = feeds_for(g)
    m = np.where(np.tril(np.ones((16, 16), bool)), 0.0, -np.inf).astype(np.float32)[None, None].copy()
    m[..., 3, :] = -np.inf
    m[..., 7, 2] = np.inf
    feeds["m"] = m
    feeds["q"][0, 1, 9, 0] = np.nan
    return feeds


def test_the_nan_guard_after_softmax_is_matched():
    g = parse(SDPA)
    spec = match_attention(g.nodes)
    assert spec is not None and spec.nan_guard
    assert [n.op for n in spec.nodes] == ["matmul", "add", "softmax", "is_nan", "where", "matmul"]
    assert (spec.mask_kind, spec.mask.name) == ("additive", "m")
    assert not match_attention(parse(VIT).nodes).nan_guard


@pytest.mark.parametrize("edit", [
    ("where(%n, %zero, %p)", "where(%n, %p, %zero)"),  # keeps the NaNs, zeroes the rest
    ("%zero = const f32[] [0.0]", "%zero = const f32[] [1.0]"),  # a fill other than 0
    ("%zero = const f32[] [0.0]", "%zero = const f32[] [-0.0]"),  # -0 rows: not what the kernel writes
    ("%n = is_nan(%p)", "%n = is_inf(%p)"),
])
def test_guard_near_misses_are_refused(edit):
    assert match_attention(parse(SDPA.replace(*edit)).nodes) is None


def test_a_guarded_p_read_elsewhere_is_refused():
    g = parse(SDPA.replace("-> (%out)", "-> (%out, %n)"))
    assert match_attention(g.nodes) is None
    text = SDPA.replace("-> (%out)", "-> (%out, %r)") + ""
    text = text.replace("  %out = matmul(%w, %v) : f32[1,2,16,8]\n",
                        "  %out = matmul(%w, %v) : f32[1,2,16,8]\n  %r = relu(%p) : f32[1,2,16,16]\n")
    g2 = parse(text)
    assert match_attention(g2.nodes[:-1]) is None


def test_fully_masked_inf_and_nan_rows_give_the_guards_zeros():
    """The rows the guard zeroes (max -inf, +inf, a NaN score) come out 0; every other row matches too."""
    g = parse(SDPA)
    feeds = sdpa_feeds(g)
    want = interpret(g, feeds)["out"]
    assert (want[0, :, 3] == 0).all() and (want[0, :, 7] == 0).all() and (want[0, 1, 9] == 0).all()
    assert np.isfinite(want).all() and (np.abs(want[0, 0, 9]) > 0).any()
    spec, _ = check_numerics(g, feeds)
    assert spec.nan_guard


def test_without_the_guard_the_same_rows_stay_nan():
    """The unguarded kernel keeps the interpreter's NaN rows: the guard is what makes them 0."""
    text = SDPA.replace("  %n = is_nan(%p) : bool[1,2,16,16]\n  %w = where(%n, %zero, %p) : f32[1,2,16,16]\n", "")
    g = parse(text.replace("matmul(%w, %v)", "matmul(%p, %v)"))
    feeds = sdpa_feeds(g)
    feeds["q"][0, 1, 9, 0] = 0.5  # NaN scores: the vector max may drop them, the interpreter's does not
    want = interpret(g, feeds)["out"]
    assert np.isnan(want[0, :, 3]).all() and np.isnan(want[0, :, 7]).all()
    spec, _ = check_numerics(g, feeds)
    assert not spec.nan_guard


def test_a_guarded_gpt_causal_mask_keeps_its_column_bound():
    text = GPT.replace("  %out = matmul(%softmax, %v) : f32[1,4,128,64]\n",
                       "  %isnan = is_nan(%softmax) : bool[1,4,128,128]\n"
                       "  %guard = where(%isnan, %zero, %softmax) : f32[1,4,128,128]\n"
                       "  %out = matmul(%guard, %v) : f32[1,4,128,64]\n").replace(
        "%neg_inf = const f32[] [-inf]\n", "%neg_inf = const f32[] [-inf]\n  %zero = const f32[] [0.0]\n")
    mask = causal_bool(128).copy()
    mask[..., 5, :] = True  # a fully masked row: 0 with the guard
    g = parse(text, constants={"mask": mask})
    spec, kernel = check_numerics(g)
    assert spec.nan_guard and spec.causal_offset == 0
    (got,) = run_kernel(kernel, feeds_for(g), TARGET)
    assert (got[..., 5, :] == 0).all()


# ------------------------------------------------------------------ q/k/v prologues and the output transpose

# GPT-2 after hoist-views: q and v are slices of the fused projection's head view, q scaled by 1/sqrt(sqrt(d));
# kT (a transpose moving the last axis) comes materialized; the output is transposed back to [1, S, H, D].
GPT_QKV = """graph @gpt(%x: f32[1,32,12,16], %kT: f32[1,4,16,32]) -> (%out) {
  %c = const f32[] [0.5]
  %neg_inf = const f32[] [-inf]
  %mask = const bool[1,1,32,32] dense<elided>
  %hq = slice(%x) {starts=[0], ends=[4], axes=[2]} : f32[1,32,4,16]
  %hv = slice(%x) {starts=[8], ends=[12], axes=[2]} : f32[1,32,4,16]
  %tq = transpose(%hq) {perm=[0, 2, 1, 3]} : f32[1,4,32,16]
  %v = transpose(%hv) {perm=[0, 2, 1, 3]} : f32[1,4,32,16]
  %q = mul(%tq, %c) : f32[1,4,32,16]
  %k = mul(%c, %kT) : f32[1,4,16,32]
  %s = matmul(%q, %k) : f32[1,4,32,32]
  %w = where(%mask, %neg_inf, %s) : f32[1,4,32,32]
  %p = softmax(%w) {axis=-1} : f32[1,4,32,32]
  %o = matmul(%p, %v) : f32[1,4,32,16]
  %out = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,32,4,16]
}"""


def gpt_qkv(text: str = GPT_QKV):
    return parse(text, constants={"mask": causal_bool(32)})


def test_slices_transposes_scales_and_the_output_transpose_fold_into_the_spec():
    g = gpt_qkv()
    spec = match_attention(g.nodes)
    assert spec is not None and spec.nodes == tuple(g.nodes)
    assert (spec.q.name, spec.k_t.name, spec.v.name) == ("x", "kT", "x")
    assert (spec.q_perm, spec.q_offset, spec.q_scale) == ((0, 2, 1, 3), None, 0.5)
    assert (spec.k_perm, spec.k_offset, spec.k_scale) == (None, None, 0.5)
    assert (spec.v_perm, spec.v_offset, spec.v_scale) == ((0, 2, 1, 3), (0, 0, 8, 0), None)
    assert spec.out_perm == (0, 2, 1, 3) and spec.out is g.outputs[0]
    assert spec.qk is g.value("s").producer and spec.pv is g.value("o").producer
    assert spec.scores_shape == (1, 4, 32, 32) and spec.causal_offset == 0


def test_the_fused_projection_form_matches_the_interpreter_reading_x_once():
    spec, kernel = check_numerics(gpt_qkv())
    assert [a.value.name for a in kernel.args] == ["x", "kT", "mask"]
    assert [v.name for v in kernel.outputs] == ["out"]


def test_each_operand_is_scaled_as_the_graph_rounds_it():
    """mul(q, c1) and mul(kT, c2) with scales that round: the kernel multiplies each element as it reads it."""
    text = GPT_QKV.replace("%c = const f32[] [0.5]", "%c = const f32[] [0.3535533845424652]")
    g = gpt_qkv(text)
    feeds = feeds_for(g)
    feeds["x"] *= 7.0
    spec, _ = check_numerics(g, feeds)
    assert spec.q_scale == spec.k_scale == float(np.float32(0.3535533845424652))


def test_a_sliced_operand_broadcasts_its_batch_dim_with_its_offset():
    text = """graph @g(%x: f32[4,9,8], %kT: f32[3,8,9], %v: f32[3,9,5]) -> (%out) {
      %q1 = slice(%x) {starts=[2, 1], ends=[3, 9], axes=[0, 1]} : f32[1,8,8]
      %s = matmul(%q1, %kT) : f32[3,8,9]
      %p = softmax(%s) {axis=-1} : f32[3,8,9]
      %out = matmul(%p, %v) : f32[3,8,5]
    }"""
    text = text.replace("%x: f32[4,9,8]", "%x: f32[4,10,8]")
    spec, kernel = check_numerics(parse(text))
    assert spec.q_offset == (2, 1, 0) and spec.q_perm is None
    assert [a.value.name for a in kernel.args] == ["x", "kT", "v"]


PROLOGUE_MISSES = {
    "two muls on q": ("%q = mul(%tq, %c) : f32[1,4,32,16]",
                      "%q0 = mul(%tq, %c) : f32[1,4,32,16]\n  %q = mul(%q0, %c) : f32[1,4,32,16]"),
    "q scaled by a tensor": ("%q = mul(%tq, %c)", "%q = mul(%tq, %tq)"),
    "a strided slice": ("%hv = slice(%x) {starts=[8], ends=[12], axes=[2]}",
                        "%hv = slice(%x) {starts=[4], ends=[12], axes=[2], steps=[2]}"),
    "an output transpose moving the last axis": ("%out = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,32,4,16]",
                                                 "%out = transpose(%o) {perm=[0, 1, 3, 2]} : f32[1,4,16,32]"),
    "a prologue value read elsewhere": ("-> (%out)", "-> (%out, %tq)"),
}


@pytest.mark.parametrize("case", sorted(PROLOGUE_MISSES))
def test_prologue_near_misses_are_refused(case):
    old, new = PROLOGUE_MISSES[case]
    text = GPT_QKV.replace(old, new)
    g = ir.verify(gpt_qkv(text))
    assert match_attention(g.nodes) is None


def test_without_the_refused_part_the_rest_still_matches():
    """The output transpose that moves the last axis is left out; the chain without it is matched."""
    g = gpt_qkv(GPT_QKV.replace("%out = transpose(%o) {perm=[0, 2, 1, 3]} : f32[1,32,4,16]",
                                "%out = transpose(%o) {perm=[0, 1, 3, 2]} : f32[1,4,16,32]"))
    assert match_attention(g.nodes) is None
    spec = match_attention(g.nodes[:-1])
    assert spec is not None and spec.out_perm is None and spec.out is g.value("o")


def test_a_kt_scale_joins_only_while_the_row_tiles_are_few():
    """Every row tile scales kT again: at 128 query rows (32 tiles) a separate mul kernel is cheaper."""
    text = GPT.replace("%kT: f32[1,4,64,128]", "%k0: f32[1,4,64,128]").replace(
        "  %matmul = matmul(%q, %kT)", "  %kT = mul(%k0, %scale) : f32[1,4,64,128]\n  %matmul = matmul(%q, %kT)")
    g = parse(text, constants={"mask": causal_bool(128)})
    assert match_attention(g.nodes) is None
    assert match_attention(g.nodes[1:]) is not None
    spec = match_attention(gpt_qkv().nodes)  # 32 rows: 8 tiles
    assert spec is not None and spec.k_scale == 0.5
