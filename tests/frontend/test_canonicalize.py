"""canonicalize: IR text before -> expected IR text, and the interpreter before == after.

Every positive case is run in float64 and compared with the interpreter on the
original graph to ~1e-12 (the rewrites are exact up to rounding); every
negative case checks that the graph is left exactly as it was and that the
refusal says why.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln import ir
from kiln.frontend import canonicalize
from kiln.frontend import canonicalize as canonicalize_fn
from kiln.frontend.canonicalize import canonicalize_with_report

G8 = "[1.5, 0.5, -1.0, 2.0, 0.25, 1.0, -0.75, 3.0]"
B8 = "[0.1, -0.2, 0.3, 0.0, 1.0, -1.5, 0.05, 2.0]"


def _inputs(g: ir.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: (rng.standard_normal(v.type.shape) * 2).astype(v.type.np_dtype) for v in g.inputs}


def rewrite(text: str, *, rtol: float = 1e-12, atol: float = 1e-12):
    """Parse, canonicalize a clone, verify, and check the interpreter agrees; returns (after, report)."""
    before = ir.verify(ir.parse(text))
    after, report = canonicalize_with_report(before.clone())
    ir.verify(after)
    feeds = _inputs(before)
    want = ir.interpret(before, feeds)
    got = ir.interpret(after, feeds)
    assert list(want) == list(got), "graph output names changed"
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64), rtol=rtol, atol=atol)
    return after, report


def same_text(a: ir.Graph, expected: str) -> None:
    assert ir.print_graph(a) == ir.print_graph(ir.parse(expected))


def unchanged(text: str) -> list[str]:
    """The graph is left as it was (but for unused constants); returns the refusal reasons."""
    after, report = rewrite(text)
    before = ir.parse(text)
    before.dce()
    assert ir.print_graph(after) == ir.print_graph(before)
    return [r.reason for r in report.refusals]


# ====================================================================== layer norm

LN = """
graph @ln(%x: f64[2,5,8]) -> (%y) {{
  %two = const f64[] [2.0]
  %eps = const f64[] [1e-05]
  %g = const f64[8] {g}
  %b = const f64[8] {b}
  %mean = reduce_mean(%x) {{axes=[{axes}], keepdims=1}} : f64[2,5,1]
  %d = sub(%x, %mean) : f64[2,5,8]
  %sq = pow(%d, %two) : f64[2,5,8]
  %var = reduce_mean(%sq) {{axes=[{axes}], keepdims=1}} : f64[2,5,1]
  %ve = add(%var, %eps) : f64[2,5,1]
  %std = sqrt(%ve) : f64[2,5,1]
  %n = div(%d, %std) : f64[2,5,8]
  %s = mul(%n, %g) : f64[2,5,8]
  %y = add(%s, %b) : f64[2,5,8]
}}
"""


def test_layer_norm_rewritten_to_one_op():
    after, report = rewrite(LN.format(g=G8, b=B8, axes=-1))
    same_text(after, f"""
graph @ln(%x: f64[2,5,8]) -> (%y) {{
  %g = const f64[8] {G8}
  %b = const f64[8] {B8}
  %y = layer_norm(%x, %g, %b) {{axis=-1, epsilon=1e-05}} : f64[2,5,8]
}}
""")
    assert report.rewrites == {"layer-norm": 1}


LN_VARIANTS = {
    "mul-d-d": ("%sq = pow(%d, %two) : f64[2,5,8]", "%sq = mul(%d, %d) : f64[2,5,8]"),
    "reciprocal": ("%n = div(%d, %std) : f64[2,5,8]",
                   "%r = reciprocal(%std) : f64[2,5,1]\n  %n = mul(%r, %d) : f64[2,5,8]"),
    "one-over": ("%n = div(%d, %std) : f64[2,5,8]",
                 "%one = const f64[] [1.0]\n  %r = div(%one, %std) : f64[2,5,1]\n  %n = mul(%d, %r) : f64[2,5,8]"),
    "eps-first": ("%ve = add(%var, %eps)", "%ve = add(%eps, %var)"),
    "gamma-first": ("%s = mul(%n, %g)", "%s = mul(%g, %n)"),
    "beta-first": ("%y = add(%s, %b)", "%y = add(%b, %s)"),
}


@pytest.mark.parametrize("variant", sorted(LN_VARIANTS))
def test_layer_norm_spellings(variant):
    old, new = LN_VARIANTS[variant]
    text = LN.format(g=G8, b=B8, axes=-1)
    assert old in text
    after, _ = rewrite(text.replace(old, new))
    assert after.op_counts() == {"layer_norm": 1}


def test_layer_norm_rsqrt_as_pow_minus_half():
    text = LN.format(g=G8, b=B8, axes=-1).replace(
        "%std = sqrt(%ve) : f64[2,5,1]\n  %n = div(%d, %std) : f64[2,5,8]",
        "%mh = const f64[] [-0.5]\n  %r = pow(%ve, %mh) : f64[2,5,1]\n  %n = mul(%d, %r) : f64[2,5,8]")
    after, _ = rewrite(text)
    assert after.op_counts() == {"layer_norm": 1}


def test_layer_norm_without_affine_gets_unit_gamma():
    text = """
graph @ln(%x: f64[3,4]) -> (%n) {
  %eps = const f64[] [1e-06]
  %mean = reduce_mean(%x) {axes=[1], keepdims=1} : f64[3,1]
  %d = sub(%x, %mean) : f64[3,4]
  %sq = mul(%d, %d) : f64[3,4]
  %var = reduce_mean(%sq) {axes=[1], keepdims=1} : f64[3,1]
  %ve = add(%var, %eps) : f64[3,1]
  %std = sqrt(%ve) : f64[3,1]
  %n = div(%d, %std) : f64[3,4]
}
"""
    after, _ = rewrite(text)
    same_text(after, """
graph @ln(%x: f64[3,4]) -> (%n) {
  %n_layer_norm_c = const f64[4] [1.0, 1.0, 1.0, 1.0]
  %n = layer_norm(%x, %n_layer_norm_c) {axis=-1, epsilon=1e-06} : f64[3,4]
}
""")


def test_layer_norm_over_two_trailing_axes():
    text = """
graph @ln(%x: f64[2,3,4]) -> (%y) {
  %eps = const f64[] [1e-05]
  %g = const f64[1,3,4] dense<"AAAAAAAA8D8AAAAAAAAAQAAAAAAAAAhAAAAAAAAAEEAAAAAAAAAUQAAAAAAAABhAAAAAAAAAHEAAAAAAAAAgQAAAAAAAACJAAAAAAAAAJEAAAAAAAAAmQAAAAAAAAChA">
  %mean = reduce_mean(%x) {axes=[-2, -1], keepdims=1} : f64[2,1,1]
  %d = sub(%x, %mean) : f64[2,3,4]
  %sq = mul(%d, %d) : f64[2,3,4]
  %var = reduce_mean(%sq) {axes=[-2, -1], keepdims=1} : f64[2,1,1]
  %ve = add(%var, %eps) : f64[2,1,1]
  %std = sqrt(%ve) : f64[2,1,1]
  %n = div(%d, %std) : f64[2,3,4]
  %y = mul(%n, %g) : f64[2,3,4]
}
"""
    after, _ = rewrite(text)
    (node,) = after.nodes
    assert node.op == "layer_norm" and node.attrs["axis"] == -2
    assert node.inputs[1].type.shape == (3, 4)  # the leading 1 of the constant gamma is dropped


def test_layer_norm_refused_when_eps_is_added_after_sqrt():
    text = LN.format(g=G8, b=B8, axes=-1).replace(
        "%ve = add(%var, %eps) : f64[2,5,1]\n  %std = sqrt(%ve) : f64[2,5,1]",
        "%sd = sqrt(%var) : f64[2,5,1]\n  %std = add(%sd, %eps) : f64[2,5,1]")
    reasons = unchanged(text)
    assert any("after the square root" in r for r in reasons), reasons


def test_layer_norm_refused_over_a_non_trailing_axis():
    text = LN.format(g="[1.0, 2.0, 3.0, 4.0, 5.0]", b="[0.0, 1.0, 2.0, 3.0, 4.0]", axes=1) \
        .replace("f64[2,5,1]", "f64[2,1,8]").replace("%g = const f64[8]", "%g = const f64[5,1]") \
        .replace("%b = const f64[8]", "%b = const f64[5,1]")
    reasons = unchanged(text)
    assert any("not the trailing axes" in r for r in reasons), reasons


def test_layer_norm_refused_when_gamma_has_the_wrong_shape():
    text = LN.format(g="[1.0, 2.0, 3.0, 4.0, 5.0]", b=B8, axes=-1).replace(
        "%g = const f64[8]", "%g = const f64[5,1]")
    reasons = unchanged(text)
    assert any("gamma %g has shape [5, 1], not the normalized shape [8]" in r for r in reasons), reasons


def test_layer_norm_refused_when_mean_and_variance_axes_differ():
    text = """
graph @ln(%x: f64[2,3,4]) -> (%n) {
  %eps = const f64[] [1e-05]
  %mean = reduce_mean(%x) {axes=[-2, -1], keepdims=1} : f64[2,1,1]
  %d = sub(%x, %mean) : f64[2,3,4]
  %sq = mul(%d, %d) : f64[2,3,4]
  %var = reduce_mean(%sq) {axes=[-1], keepdims=1} : f64[2,3,1]
  %ve = add(%var, %eps) : f64[2,3,1]
  %std = sqrt(%ve) : f64[2,3,1]
  %n = div(%d, %std) : f64[2,3,4]
}
"""
    reasons = unchanged(text)
    assert any("the mean is taken over axes [-2, -1] but the variance over [-1]" in r for r in reasons), reasons


def test_layer_norm_refused_when_an_intermediate_is_shared():
    text = LN.format(g=G8, b=B8, axes=-1).replace("-> (%y)", "-> (%y, %var)")
    reasons = unchanged(text)
    assert any("%var is a graph output" in r for r in reasons), reasons


# ====================================================================== RMS norm

RMS = """
graph @rms(%x: f64[2,3,8]) -> (%y) {{
  %two = const f64[] [2.0]
  %eps = const f64[] [1e-06]
  %w = const f64[8] {g}
  %sq = pow(%x, %two) : f64[2,3,8]
  %var = reduce_mean(%sq) {{axes=[-1], keepdims=1}} : f64[2,3,1]
  %ve = add(%var, %eps) : f64[2,3,1]
  %std = sqrt(%ve) : f64[2,3,1]
  %r = reciprocal(%std) : f64[2,3,1]
  %n = mul(%x, %r) : f64[2,3,8]
  %y = mul(%w, %n) : f64[2,3,8]
}}
"""


def test_rms_norm_hf_llama_form():
    after, report = rewrite(RMS.format(g=G8))
    same_text(after, f"""
graph @rms(%x: f64[2,3,8]) -> (%y) {{
  %w = const f64[8] {G8}
  %y = rms_norm(%x, %w) {{axis=-1, epsilon=1e-06}} : f64[2,3,8]
}}
""")
    assert report.rewrites == {"rms-norm": 1}


RMS_VARIANTS = {
    "mul-x-x": ("%sq = pow(%x, %two)", "%sq = mul(%x, %x)"),
    "div-sqrt": ("%r = reciprocal(%std) : f64[2,3,1]\n  %n = mul(%x, %r) : f64[2,3,8]",
                 "%n = div(%x, %std) : f64[2,3,8]"),
    "one-over": ("%r = reciprocal(%std) : f64[2,3,1]",
                 "%one = const f64[] [1.0]\n  %r = div(%one, %std) : f64[2,3,1]"),
    "rstd-first": ("%n = mul(%x, %r)", "%n = mul(%r, %x)"),
    "gamma-last": ("%y = mul(%w, %n)", "%y = mul(%n, %w)"),
}


@pytest.mark.parametrize("variant", sorted(RMS_VARIANTS))
def test_rms_norm_spellings(variant):
    old, new = RMS_VARIANTS[variant]
    text = RMS.format(g=G8)
    assert old in text
    after, _ = rewrite(text.replace(old, new))
    assert after.op_counts() == {"rms_norm": 1}


def test_rms_norm_with_casts_to_f32_and_back():
    text = """
graph @rms(%x: f16[2,8]) -> (%y) {
  %two = const f32[] [2.0]
  %eps = const f32[] [1e-06]
  %w = const f16[8] [1.5, 0.5, -1.0, 2.0, 0.25, 1.0, -0.75, 3.0]
  %xf = cast(%x) {to="f32"} : f32[2,8]
  %sq = pow(%xf, %two) : f32[2,8]
  %var = reduce_mean(%sq) {axes=[-1], keepdims=1} : f32[2,1]
  %ve = add(%var, %eps) : f32[2,1]
  %std = sqrt(%ve) : f32[2,1]
  %r = reciprocal(%std) : f32[2,1]
  %n = mul(%xf, %r) : f32[2,8]
  %nh = cast(%n) {to="f16"} : f16[2,8]
  %y = mul(%w, %nh) : f16[2,8]
}
"""
    after, _ = rewrite(text, rtol=2e-3, atol=2e-3)  # f16 output; epsilon is the f32 constant's exact value
    same_text(after, """
graph @rms(%x: f16[2,8]) -> (%y) {
  %w = const f16[8] [1.5, 0.5, -1.0, 2.0, 0.25, 1.0, -0.75, 3.0]
  %y = rms_norm(%x, %w) {axis=-1, epsilon=9.999999974752427e-07} : f16[2,8]
}
""")


def test_rms_norm_refused_when_gamma_has_the_wrong_shape():
    text = RMS.format(g="[1.0, 2.0, 3.0]").replace("%w = const f64[8]", "%w = const f64[3,1]")
    reasons = unchanged(text)
    assert any("gamma %w has shape [3, 1]" in r for r in reasons), reasons


def test_rms_norm_refused_when_epsilon_is_not_constant():
    text = RMS.format(g=G8).replace("graph @rms(%x: f64[2,3,8])", "graph @rms(%x: f64[2,3,8], %eps: f64[])") \
        .replace("  %eps = const f64[] [1e-06]\n", "")
    reasons = unchanged(text)
    assert any("epsilon is not a scalar constant" in r for r in reasons), reasons


# ====================================================================== GELU and SiLU

GELU_ERF = {
    "x*0.5*(1+erf(x/sqrt2))": """
  %t = div(%x, %sqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%e, %one) : f64[4,6]
  %h = mul(%x, %half) : f64[4,6]
  %y = mul(%h, %a) : f64[4,6]""",
    "0.5*x*(1+erf(x*0.7071))": """
  %t = mul(%x, %rsqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%one, %e) : f64[4,6]
  %h = mul(%half, %x) : f64[4,6]
  %y = mul(%a, %h) : f64[4,6]""",
    "(x*(1+erf))*0.5": """
  %t = mul(%rsqrt2, %x) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%e, %one) : f64[4,6]
  %m = mul(%x, %a) : f64[4,6]
  %y = mul(%m, %half) : f64[4,6]""",
    "(x*(1+erf))/2": """
  %t = div(%x, %sqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%e, %one) : f64[4,6]
  %m = mul(%a, %x) : f64[4,6]
  %y = div(%m, %two) : f64[4,6]""",
    "onnx-function-body-with-sum": """
  %t = div(%x, %sqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = sum(%one, %e) : f64[4,6]
  %h = mul(%half, %x) : f64[4,6]
  %y = mul(%h, %a) : f64[4,6]""",
    "(0.5*(1+erf))*x": """
  %t = div(%x, %sqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%e, %one) : f64[4,6]
  %m = mul(%half, %a) : f64[4,6]
  %y = mul(%x, %m) : f64[4,6]""",
}
GELU_CONSTS = """
  %sqrt2 = const f64[] [1.4142135623730951]
  %rsqrt2 = const f64[] [0.7071067811865476]
  %one = const f64[] [1.0]
  %half = const f64[] [0.5]
  %two = const f64[] [2.0]"""


def _gelu_graph(body: str) -> str:
    return "graph @gelu(%x: f64[4,6]) -> (%y) {" + GELU_CONSTS + body + "\n}\n"


@pytest.mark.parametrize("form", sorted(GELU_ERF))
def test_gelu_erf_forms(form):
    after, report = rewrite(_gelu_graph(GELU_ERF[form]))
    same_text(after, """
graph @gelu(%x: f64[4,6]) -> (%y) {
  %y = gelu(%x) {approximate="none"} : f64[4,6]
}
""")
    assert report.rewrites["gelu-erf"] == 1


def test_gelu_erf_with_a_rounded_sqrt2():
    """Exporters write 1.4142: accepted (within CONST_RTOL), so the result moves by ~1e-5 relative."""
    body = GELU_ERF["x*0.5*(1+erf(x/sqrt2))"]
    text = _gelu_graph(body).replace("[1.4142135623730951]", "[1.4142]")
    after, _ = rewrite(text, rtol=1e-4, atol=1e-4)
    assert after.op_counts() == {"gelu": 1}


def test_gelu_refused_when_the_divisor_is_not_sqrt2():
    text = _gelu_graph(GELU_ERF["x*0.5*(1+erf(x/sqrt2))"]).replace("[1.4142135623730951]", "[1.5]")
    reasons = unchanged(text)
    assert any("sqrt(2) is 1.5" in r for r in reasons), reasons


def test_gelu_not_matched_when_the_multiplied_value_is_another_tensor():
    text = """
graph @g(%x: f64[4,6], %z: f64[4,6]) -> (%y) {
  %sqrt2 = const f64[] [1.4142135623730951]
  %one = const f64[] [1.0]
  %half = const f64[] [0.5]
  %t = div(%x, %sqrt2) : f64[4,6]
  %e = erf(%t) : f64[4,6]
  %a = add(%e, %one) : f64[4,6]
  %h = mul(%z, %half) : f64[4,6]
  %y = mul(%h, %a) : f64[4,6]
}
"""
    assert unchanged(text) == []


GELU_TANH = """
graph @gelu(%x: f64[4,6]) -> (%y) {{
  %c1 = const f64[] [0.7978845608028654]
  %c2 = const f64[] [0.044715]
  %three = const f64[] [3.0]
  %one = const f64[] [1.0]
  %half = const f64[] [0.5]
{cube}
  %w = mul(%c2, %x3) : f64[4,6]
  %v = add(%x, %w) : f64[4,6]
  %u = mul(%c1, %v) : f64[4,6]
  %t = tanh(%u) : f64[4,6]
  %a = add(%one, %t) : f64[4,6]
  %h = mul(%half, %x) : f64[4,6]
  %y = mul(%h, %a) : f64[4,6]
}}
"""


@pytest.mark.parametrize("cube", ["  %x3 = pow(%x, %three) : f64[4,6]",
                                  "  %xx = mul(%x, %x) : f64[4,6]\n  %x3 = mul(%xx, %x) : f64[4,6]",
                                  "  %xx = mul(%x, %x) : f64[4,6]\n  %x3 = mul(%x, %xx) : f64[4,6]"],
                         ids=["pow", "xx*x", "x*xx"])
def test_gelu_tanh_forms(cube):
    after, report = rewrite(GELU_TANH.format(cube=cube))
    same_text(after, """
graph @gelu(%x: f64[4,6]) -> (%y) {
  %y = gelu(%x) {approximate="tanh"} : f64[4,6]
}
""")
    assert report.rewrites == {"gelu-tanh": 1}


def test_gelu_tanh_refused_with_a_wrong_cubic_coefficient():
    text = GELU_TANH.format(cube="  %x3 = pow(%x, %three) : f64[4,6]").replace("[0.044715]", "[0.05]")
    reasons = unchanged(text)
    assert any("0.044715 is 0.05" in r for r in reasons), reasons


@pytest.mark.parametrize("order", ["mul(%x, %s)", "mul(%s, %x)"])
def test_silu(order):
    text = f"""
graph @silu(%x: f64[3,5]) -> (%y) {{
  %s = sigmoid(%x) : f64[3,5]
  %y = {order} : f64[3,5]
}}
"""
    after, _ = rewrite(text)
    same_text(after, "graph @silu(%x: f64[3,5]) -> (%y) {\n  %y = silu(%x) : f64[3,5]\n}\n")


def test_silu_not_matched_for_a_gate_on_another_value():
    text = """
graph @glu(%x: f64[3,5], %z: f64[3,5]) -> (%y) {
  %s = sigmoid(%x) : f64[3,5]
  %y = mul(%z, %s) : f64[3,5]
}
"""
    assert unchanged(text) == []


# ====================================================================== folding, no-ops, driver

def test_constant_folding_keeps_names_and_removes_dead_weights():
    text = """
graph @f(%x: f32[2,3]) -> (%y) {
  %w = const f32[2,3] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  %wt = transpose(%w) {perm=[1, 0]} : f32[3,2]
  %y = matmul(%x, %wt) : f32[2,2]
}
"""
    after, report = rewrite(text, rtol=1e-6)
    same_text(after, """
graph @f(%x: f32[2,3]) -> (%y) {
  %wt = const f32[3,2] [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
  %y = matmul(%x, %wt) : f32[2,2]
}
""")
    assert report.folded == 1


def test_large_shared_constant_is_not_duplicated(monkeypatch):
    import sys
    monkeypatch.setattr(sys.modules["kiln.frontend.canonicalize"], "FOLD_LIMIT", 4)
    text = """
graph @f(%x: f32[2,3]) -> (%y, %z) {
  %w = const f32[2,3] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  %wt = transpose(%w) {perm=[1, 0]} : f32[3,2]
  %y = matmul(%x, %wt) : f32[2,2]
  %z = add(%x, %w) : f32[2,3]
}
"""
    reasons = unchanged(text)
    assert any("would duplicate the large constant %w" in r for r in reasons), reasons


def test_noops_are_removed_but_output_names_survive():
    text = """
graph @n(%x: f32[2,3]) -> (%y, %o) {
  %a = identity(%x) : f32[2,3]
  %b = cast(%a) {to="f32"} : f32[2,3]
  %c = transpose(%b) {perm=[0, 1]} : f32[2,3]
  %d = max(%c) : f32[2,3]
  %y = relu(%d) : f32[2,3]
  %o = identity(%y) : f32[2,3]
}
"""
    after, report = rewrite(text)
    same_text(after, """
graph @n(%x: f32[2,3]) -> (%y, %o) {
  %y = relu(%x) : f32[2,3]
  %o = identity(%y) : f32[2,3]
}
""")
    assert report.removed_noops == 4


def test_canonicalize_works_in_place_and_reports_refusals():
    g = ir.parse(LN.format(g="[1.0, 2.0, 3.0, 4.0, 5.0]", b=B8, axes=-1).replace(
        "%g = const f64[8]", "%g = const f64[5,1]"))
    explain: list = []
    out = canonicalize_fn(g, explain=explain)
    assert out is g
    assert [r.pattern for r in explain] == ["layer-norm"]
    assert str(explain[0]).startswith("layer-norm at %y: gamma %g")
    assert canonicalize is canonicalize_fn
