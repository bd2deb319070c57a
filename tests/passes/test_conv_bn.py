"""fold-conv-bn: batch_norm folded into conv / conv_transpose / matmul (+ bias), Deploy and Tune modes.

Folded graphs are compared with the unfolded ones through the interpreter in
float64 on BN statistics drawn log-uniform over [1e-6, 10] (c = γ/√(σ²+ε) then
spans about 1e-6..3e3), refusals must leave the printed graph unchanged, and
the onnx light CNNs must fold and still compute their stored outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import ir
from kiln.bench import light_models, randomized_weights
from kiln.frontend import lift
from kiln.ir import Graph, TensorType
from kiln.passes.conv_bn import FoldConvBN
from kiln.passes.manager import (
    Instruments,
    PipelineError,
    PipelineResult,
    format_pipeline,
    parse_pipeline,
    registered_passes,
    run_pipeline,
    run_pipeline_report,
)

from ..frontend.conftest import assert_close, light_input, make_model, ort_run, vi

RTOL64 = 1e-12


# ====================================================================== helpers

def _log_uniform(rng: np.random.Generator, n: int, lo: float = 1e-6, hi: float = 10.0) -> np.ndarray:
    """Magnitudes spread evenly over decades: the small variances are where folding loses precision."""
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n))


def _signed(rng: np.random.Generator, n: int) -> np.ndarray:
    return _log_uniform(rng, n) * rng.choice([-1.0, 1.0], n)


@dataclass(frozen=True)
class Case:
    """A producer feeding a batch_norm: op, input and weight shapes, attrs, whether it has a bias."""

    op: str
    x: tuple[int, ...]
    w: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    bias: bool = True
    bias_first: bool = False

    @property
    def channels(self) -> int:
        if self.op == "conv":
            return self.w[0]
        if self.op == "conv_transpose":
            return self.w[1] * self.attrs.get("group", 1)
        return self.w[1]


CASES = {
    "conv2d": Case("conv", (2, 3, 5, 5), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv2d-no-bias": Case("conv", (2, 3, 5, 5), (4, 3, 3, 3), {"strides": [2, 2]}, bias=False),
    "conv2d-grouped": Case("conv", (1, 4, 5, 5), (6, 2, 3, 3), {"group": 2, "strides": [2, 1]}),
    "conv2d-depthwise": Case("conv", (1, 4, 5, 5), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    "conv1d": Case("conv", (2, 3, 7), (5, 3, 3), {"dilations": [2]}),
    "conv1d-no-bias": Case("conv", (2, 3, 7), (5, 3, 2), bias=False),
    "conv3d-grouped": Case("conv", (1, 4, 3, 4, 4), (6, 2, 2, 2, 2), {"group": 2}),
    "conv-transpose": Case("conv_transpose", (1, 3, 4, 4), (3, 5, 3, 3), {"strides": [2, 2]}),
    "conv-transpose-grouped": Case("conv_transpose", (1, 4, 4, 4), (4, 3, 2, 2), {"group": 2}),
    "conv-transpose-1d-g3-no-bias": Case("conv_transpose", (2, 6, 3), (6, 2, 3), {"group": 3}, bias=False),
    "conv-transpose-depthwise": Case("conv_transpose", (1, 4, 3, 3), (4, 1, 3, 3), {"group": 4}),
    "matmul": Case("matmul", (3, 5), (5, 4), bias=False),
    "matmul-bias": Case("matmul", (3, 5), (5, 4)),
    "matmul-bias-first": Case("matmul", (3, 5), (5, 4), bias_first=True),
}


def _build(case: Case, seed: int, *, params_as_inputs: bool = False,
           dtype: type = np.float64) -> tuple[Graph, dict[str, np.ndarray]]:
    """producer -> batch_norm -> relu, outputs (BN output, relu output); feeds for every input."""
    rng = np.random.default_rng(seed)
    m = case.channels
    arrays = {"w": rng.standard_normal(case.w), "b": rng.standard_normal(m) if case.bias else None,
              "gamma": _signed(rng, m), "beta": _signed(rng, m), "mean": _signed(rng, m), "var": _log_uniform(rng, m)}
    feeds = {"x": rng.standard_normal(case.x).astype(dtype)}
    g = Graph("t")
    x = g.add_input("x", TensorType.of(feeds["x"]))
    v = {}
    for name, a in arrays.items():
        if a is None:
            v[name] = None
        elif params_as_inputs:
            feeds[name] = a.astype(dtype)
            v[name] = g.add_input(name, TensorType.of(feeds[name]))
        else:
            v[name] = g.add_constant(a.astype(dtype), name)
    if case.op == "matmul":
        out = g.add_node("matmul", [x, v["w"]], out_names=["c"]).output
        if case.bias:
            operands = [v["b"], out] if case.bias_first else [out, v["b"]]
            out = g.add_node("add", operands, out_names=["c_plus_b"]).output
    else:
        out = g.add_node(case.op, [x, v["w"], v["b"]], case.attrs, out_names=["c"]).output
    eps = float(_log_uniform(rng, 1, 1e-6, 1e-3)[0])
    y = g.add_node("batch_norm", [out, v["gamma"], v["beta"], v["mean"], v["var"]], {"epsilon": eps},
                   out_names=["y"]).output
    z = g.add_node("relu", [y], out_names=["z"]).output
    g.set_outputs([y, z])
    return ir.verify(g), feeds


def _fold(graph: Graph, pipeline: str = "fold-conv-bn") -> PipelineResult:
    return run_pipeline_report(graph, pipeline)


def _assert_same_function(want_graph: Graph, got_graph: Graph, feeds: dict[str, np.ndarray],
                          rtol: float = RTOL64) -> None:
    """Same output names and values, each within ``rtol`` of that output's magnitude."""
    want, got = ir.interpret(want_graph, feeds), ir.interpret(got_graph, feeds)
    assert [v.name for v in got_graph.outputs] == [v.name for v in want_graph.outputs]
    for name, w in want.items():
        scale = float(np.abs(w.astype(np.float64)).max())
        assert_close(got[name], w, rtol=rtol, atol=rtol * scale)


def _folded_constants(graph: Graph) -> dict[str, np.ndarray]:
    return {k: v.const for k, v in graph.constants.items() if k.endswith((".w_folded", ".b_folded"))}


# ====================================================================== IR text in, IR text out

TEXT = """graph @g(%x: f32[1,1,3,3]) -> (%z) {
  %w = const f32[2,1,1,1] [1.0, 3.0]
  %b = const f32[2] [1.0, 1.0]
  %g = const f32[2] [2.0, 4.0]
  %be = const f32[2] [0.0, 1.0]
  %mu = const f32[2] [0.5, 2.0]
  %var = const f32[2] [3.0, 3.0]
  %c = conv(%x, %w, %b) : f32[1,2,3,3]
  %y = batch_norm(%c, %g, %be, %mu, %var) {epsilon=1.0} : f32[1,2,3,3]
  %z = relu(%y) : f32[1,2,3,3]
}"""

DEPLOYED = """graph @g(%x: f32[1,1,3,3]) -> (%z) {
  %c.w_folded = const f32[2,1,1,1] [1.0, 6.0]
  %c.b_folded = const f32[2] [0.5, -1.0]
  %y = conv(%x, %c.w_folded, %c.b_folded) {dilations=[], group=1, pads=[], strides=[]} : f32[1,2,3,3]
  %z = relu(%y) : f32[1,2,3,3]
}
"""


def test_deploy_text():
    """c = γ/√(σ²+ε) = [1, 2]: W' = [1, 6], b' = β + c(b − μ) = [0.5, −1]; the conv takes the BN's name."""
    g = ir.parse(TEXT)
    res = _fold(g)
    assert str(res.graph) == DEPLOYED
    assert res.records[0].log.rewrites == [
        ("y", "batch_norm folded into conv (deploy): constants %c.w_folded, %c.b_folded")]
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(ir.interpret(res.graph, {"x": x})["z"], ir.interpret(ir.parse(TEXT), {"x": x})["z"])


TUNE_TEXT = """graph @g(%x: f32[1,1,3,3], %w: f32[2,1,1,1], %g: f32[2], %be: f32[2], %mu: f32[2], %var: f32[2]) -> (%y) {
  %c = conv(%x, %w, _) : f32[1,2,3,3]
  %y = batch_norm(%c, %g, %be, %mu, %var) {epsilon=0.001} : f32[1,2,3,3]
}"""

TUNED = """graph @g(%x: f32[1,1,3,3], %w: f32[2,1,1,1], %g: f32[2], %be: f32[2], %mu: f32[2], %var: f32[2]) -> (%y) {
  %c.eps = const f32[] [0.001]
  %c.var_eps = add(%var, %c.eps) : f32[2]
  %c.std = sqrt(%c.var_eps) : f32[2]
  %c.inv_std = reciprocal(%c.std) : f32[2]
  %c.bn_scale = mul(%g, %c.inv_std) : f32[2]
  %c.bn_scale_w = reshape(%c.bn_scale) {allowzero=0, shape=[-1, 1, 1, 1]} : f32[2,1,1,1]
  %c.w_folded = mul(%w, %c.bn_scale_w) : f32[2,1,1,1]
  %c.b_shift = mul(%c.bn_scale, %mu) : f32[2]
  %c.b_folded = sub(%be, %c.b_shift) : f32[2]
  %y = conv(%x, %c.w_folded, %c.b_folded) {dilations=[], group=1, pads=[], strides=[]} : f32[1,2,3,3]
}
"""


def test_tune_text_with_params_as_inputs():
    """Without a conv bias b' = β − c·μ; the subgraph sits where the BN was and the conv reads it."""
    res = _fold(ir.parse(TUNE_TEXT), "fold-conv-bn{mode=tune}")
    assert str(res.graph) == TUNED
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 1, 3, 3)), "w": rng.standard_normal((2, 1, 1, 1)),
             "g": rng.standard_normal(2), "be": rng.standard_normal(2), "mu": rng.standard_normal(2),
             "var": _log_uniform(rng, 2)}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    _assert_same_function(ir.parse(TUNE_TEXT), res.graph, feeds, rtol=1e-6)


# ====================================================================== Deploy == Eval, Tune == Eval

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(CASES))
def test_deploy_matches_eval(name, seed):
    g, feeds = _build(CASES[name], seed)
    want = g.clone()
    res = _fold(g)
    assert "batch_norm" not in res.graph.op_counts()
    assert len(res.records[0].log.rewrites) == 1 and not res.refusals
    assert set(res.graph.constants) == {"c.w_folded", "c.b_folded"}  # the old weights went with the BN
    _assert_same_function(want, res.graph, feeds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tune_with_params_as_inputs_matches_eval(name):
    """The fold is live: new parameter values fed at run time give the new Eval result."""
    g, feeds = _build(CASES[name], 0, params_as_inputs=True)
    want = g.clone()
    res = _fold(g, "fold-conv-bn{mode=tune}")
    counts = res.graph.op_counts()
    assert "batch_norm" not in counts and {"sqrt", "reciprocal"} <= set(counts)
    assert not res.refusals
    _assert_same_function(want, res.graph, feeds)
    for seed in (1, 2):
        _, other = _build(CASES[name], seed, params_as_inputs=True)
        _assert_same_function(want, res.graph, other)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tune_then_canonicalize_is_deploy(name):
    """Constant-folding the tune subgraph gives the deploy graph, constants within a few ulps."""
    deploy, feeds = _build(CASES[name], 3)
    tune = deploy.clone()
    deploy = run_pipeline(deploy, "fold-conv-bn{mode=deploy}")
    tune = run_pipeline(tune, "fold-conv-bn{mode=tune},canonicalize")
    assert [n.op for n in tune.nodes] == [n.op for n in deploy.nodes]
    want, got = _folded_constants(deploy), _folded_constants(tune)
    assert set(got) == set(want) == {"c.w_folded", "c.b_folded"}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-14, atol=1e-14 * np.abs(want[k]).max())
    _assert_same_function(deploy, tune, feeds)


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["conv", "conv_transpose"]), group=st.integers(1, 3), cg=st.integers(1, 3),
       mg=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2), bias=st.booleans(),
       mode=st.sampled_from(["deploy", "tune"]), seed=st.integers(0, 2**32 - 1))
def test_any_grouped_conv_folds_exactly(op, group, cg, mg, k, stride, bias, mode, seed):
    """Grouped convs and conv_transposes of any channel split: the per-(group, channel) scaling is right."""
    w = (group * mg, cg, k, k) if op == "conv" else (group * cg, mg, k, k)
    case = Case(op, (1, group * cg, 4, 4), w, {"group": group, "strides": [stride, stride]}, bias=bias)
    g, feeds = _build(case, seed, params_as_inputs=mode == "tune")
    want = g.clone()
    res = _fold(g, f"fold-conv-bn{{mode={mode}}}")
    assert "batch_norm" not in res.graph.op_counts()
    _assert_same_function(want, res.graph, feeds)


@pytest.mark.parametrize("mode", ["deploy", "tune"])
def test_float32_folds_within_float_rounding(mode):
    g, feeds = _build(CASES["conv2d-grouped"], 4, dtype=np.float32, params_as_inputs=mode == "tune")
    want = g.clone()
    res = run_pipeline_report(g, f"fold-conv-bn{{mode={mode}}}", Instruments(check_each_pass=True, check_inputs=feeds))
    assert "batch_norm" not in res.graph.op_counts()
    _assert_same_function(want, res.graph, feeds, rtol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(np.float16, 4e-3), (ml_dtypes.bfloat16, 1.5e-2)])
def test_half_precision(dtype, rtol):
    """Deploy rounds W' once; Tune computes c, W' and b' in f32 and casts W', b' back."""
    g, feeds = _build(CASES["conv2d-grouped"], 5, dtype=dtype)
    want = g.clone()
    _assert_same_function(want, _fold(g).graph, feeds, rtol=rtol)
    g, feeds = _build(CASES["conv2d-grouped"], 5, dtype=dtype, params_as_inputs=True)
    want = g.clone()
    res = _fold(g, "fold-conv-bn{mode=tune}")
    half = TensorType.of(feeds["x"]).dtype
    assert {n.attrs["to"] for n in res.graph.nodes if n.op == "cast"} == {"f32", half}
    assert {n.output.type.dtype for n in res.graph.nodes if n.op in ("sqrt", "reciprocal", "mul")} == {"f32"}
    _assert_same_function(want, res.graph, feeds, rtol=rtol)


def test_chained_batch_norms_fold_one_after_the_other():
    g, feeds = _build(CASES["conv2d"], 6)
    y = g.value("y")
    c = g.add_constant(np.full(4, 0.5), "p")
    y2 = g.add_node("batch_norm", [y, c, c, c, c], {"epsilon": 1e-5}, out_names=["y2"]).output
    g.set_outputs([y2])
    g.dce()
    want = g.clone()
    res = _fold(g)
    assert res.graph.op_counts() == {"conv": 1}
    assert len(res.records[0].log.rewrites) == 2
    _assert_same_function(want, res.graph, feeds)


def test_a_shared_weight_is_copied_not_changed():
    g, feeds = _build(CASES["conv2d"], 7)
    c2 = g.add_node("conv", [g.value("x"), g.value("w"), None], {"pads": [1, 1, 1, 1]}, out_names=["c2"]).output
    p = g.add_constant(np.linspace(0.5, 2, 4), "p")
    y2 = g.add_node("batch_norm", [c2, p, p, p, p], out_names=["y2"]).output
    g.set_outputs([*g.outputs, y2])
    ir.verify(g)
    want = g.clone()
    res = _fold(g)
    assert res.graph.op_counts() == {"conv": 2, "relu": 1}
    assert "w" not in res.graph.constants  # both sites folded: nothing reads the original any more
    assert "weight %w is shared, so it was copied" in res.records[0].log.rewrites[0][1]
    _assert_same_function(want, res.graph, feeds)


# ====================================================================== refusals


def _assert_refused(text: str, pipeline: str, reason: str) -> None:
    g = ir.parse(text)
    before = str(g)
    res = _fold(g, pipeline)
    assert str(res.graph) == before
    assert [(r.at, r.reason) for r in res.refusals if r.pass_name == "fold-conv-bn"] == [("y", reason)]
    assert not res.records[0].log.rewrites


REFUSALS = {
    "shared-conv-output": (
        """graph @g(%x: f32[1,2,4,4], %w: f32[3,2,1,1]) -> (%y, %r) {
          %c = conv(%x, %w, _) : f32[1,3,4,4]
          %p = const f32[3] [1.0, 2.0, 3.0]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[1,3,4,4]
          %r = relu(%c) : f32[1,3,4,4]
        }""", "fold-conv-bn{mode=tune}",
        "%c (conv output) is also used by relu %r; folding would change what it reads"),
    "conv-output-is-graph-output": (
        """graph @g(%x: f32[1,2,4,4]) -> (%y, %c) {
          %w = const f32[3,2,1,1] [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
          %p = const f32[3] [1.0, 2.0, 3.0]
          %c = conv(%x, %w, _) : f32[1,3,4,4]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[1,3,4,4]
        }""", "fold-conv-bn",
        "%c (conv output) is a graph output; folding would change it"),
    "deploy-with-params-as-inputs": (
        """graph @g(%x: f32[1,2,4,4], %w: f32[3,2,1,1], %gamma: f32[3]) -> (%y) {
          %p = const f32[3] [1.0, 2.0, 3.0]
          %c = conv(%x, %w, _) : f32[1,3,4,4]
          %y = batch_norm(%c, %gamma, %p, %p, %p) : f32[1,3,4,4]
        }""", "fold-conv-bn{mode=deploy}",
        "mode=deploy needs constant operands, but conv weight %w is a graph input; batch_norm scale %gamma "
        "is a graph input; mode=tune folds them as graph ops"),
    "deploy-with-a-computed-bias": (
        """graph @g(%x: f32[2,4], %b0: f32[3]) -> (%y) {
          %w = const f32[4,3] [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
          %p = const f32[3] [1.0, 2.0, 3.0]
          %b = relu(%b0) : f32[3]
          %mm = matmul(%x, %w) : f32[2,3]
          %c = add(%mm, %b) : f32[2,3]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[2,3]
        }""", "fold-conv-bn",
        "mode=deploy needs constant operands, but matmul bias %b is computed by relu; "
        "mode=tune folds them as graph ops"),
    "matmul-channel-axis-mismatch": (
        """graph @g(%x: f32[2,3,4], %w: f32[4,5], %p: f32[3]) -> (%y) {
          %c = matmul(%x, %w) : f32[2,3,5]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[2,3,5]
        }""", "fold-conv-bn{mode=tune}",
        "channel axis mismatch: batch_norm normalizes axis 1 of f32[2,3,5], the matmul's output channels "
        "are its last axis (only a 2-D [N, C] output has them on axis 1)"),
    "matmul-batched-weight": (
        """graph @g(%x: f32[2,4], %w: f32[1,4,3], %p: f32[2]) -> (%y) {
          %c = matmul(%x, %w) : f32[1,2,3]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[1,2,3]
        }""", "fold-conv-bn{mode=tune}",
        "matmul weight %w is f32[1,4,3]; only a 2-D [in, out] weight is folded"),
    "matmul-add-not-a-bias": (
        """graph @g(%x: f32[2,4], %w: f32[4,3], %r: f32[2,3], %p: f32[3]) -> (%y) {
          %mm = matmul(%x, %w) : f32[2,3]
          %c = add(%mm, %r) : f32[2,3]
          %y = batch_norm(%c, %p, %p, %p, %p) : f32[2,3]
        }""", "fold-conv-bn{mode=tune}",
        "the add after the matmul is not a per-channel bias: %r is f32[2,3], not [3], [1, 3] or a scalar"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_name_the_reason_and_leave_the_graph_alone(name):
    _assert_refused(*REFUSALS[name])


def test_a_batch_norm_after_another_op_is_not_a_candidate():
    g = ir.parse("""graph @g(%x: f32[1,3,4,4], %p: f32[3]) -> (%y) {
      %r = relu(%x) : f32[1,3,4,4]
      %y = batch_norm(%r, %p, %p, %p, %p) : f32[1,3,4,4]
    }""")
    before = str(g)
    res = _fold(g, "fold-conv-bn{mode=tune}")
    assert str(res.graph) == before and not res.refusals and not res.records[0].log.rewrites


# ====================================================================== pipeline strings

def test_pipeline_strings():
    assert "fold-conv-bn" in registered_passes()
    (p,) = parse_pipeline("fold-conv-bn{mode=tune}")
    assert p == FoldConvBN(mode="tune")
    assert format_pipeline(parse_pipeline("fold-conv-bn{mode=deploy},dce")) == "fold-conv-bn,dce"
    with pytest.raises(PipelineError, match="mode must be 'deploy' or 'tune', got 'fast'"):
        parse_pipeline("fold-conv-bn{mode=fast}")


def test_check_each_pass_accepts_the_fold():
    g, feeds = _build(CASES["conv-transpose-grouped"], 8)
    run_pipeline(g, "fold-conv-bn,dce", Instruments(check_each_pass=True, check_inputs=feeds))


# ====================================================================== from ONNX

def _conv_gemm_bn_model() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Flatten -> Gemm(transB=1, C of shape [1, M]) -> BN on a 2-D [N, C] input."""
    from onnx import helper

    rng = np.random.default_rng(9)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pos = lambda n: _log_uniform(rng, n).astype(np.float32)  # noqa: E731
    inits = {"W": f32(4, 3, 3, 3), "B": f32(4), "s1": f32(4), "b1": f32(4), "m1": f32(4), "v1": pos(4),
             "G": f32(5, 64), "C": f32(1, 5), "s2": f32(5), "b2": f32(5), "m2": f32(5), "v2": pos(5)}
    N = helper.make_node
    nodes = [N("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "s1", "b1", "m1", "v1"], ["n1"], epsilon=1e-5),
             N("Relu", ["n1"], ["r"]), N("Flatten", ["r"], ["f"]),
             N("Gemm", ["f", "G", "C"], ["fc"], transB=1),
             N("BatchNormalization", ["fc", "s2", "b2", "m2", "v2"], ["y"], epsilon=1e-3)]
    return make_model(nodes, [vi("x", np.float32, [2, 3, 4, 4])], [vi("y", np.float32, [2, 5])], inits)


@pytest.mark.parametrize("mode", ["deploy", "tune"])
def test_onnx_conv_and_gemm_fold_and_match_onnxruntime(mode):
    """Deploy on the lifted model (Gemm's transposed weight folded by lift's canonicalize); Tune on the
    model lifted with its parameters as graph inputs (the weight is then transpose(%G) at run time)."""
    from onnx import numpy_helper

    model = _conv_gemm_bn_model()
    x = np.random.default_rng(10).standard_normal((2, 3, 4, 4)).astype(np.float32)
    graph = lift(model, params_as_inputs=mode == "tune")
    feeds = {"x": x}
    if mode == "tune":
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        feeds |= {k: inits[k] for k in graph.meta["params"]}
    folded = run_pipeline(graph, f"fold-conv-bn{{mode={mode}}},dce")
    assert "batch_norm" not in folded.op_counts()
    want = ort_run(model, {"x": x})[0]
    assert_close(ir.interpret(folded, feeds)["y"], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


# ====================================================================== onnx light models

def _light(name: str, model: onnx.ModelProto | None = None) -> tuple[Graph, str, np.ndarray]:
    model = model if model is not None else onnx.load(light_models()[name])
    x_name, x = light_input(model)
    return lift(model), x_name, x


def _bn_fed_by(graph: Graph, ops: tuple[str, ...]) -> int:
    return sum(1 for n in graph.nodes if n.op == "batch_norm" and n.inputs[0].producer is not None
               and n.inputs[0].producer.op in ops)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "inception_v2"])
def test_light_models_fold_and_keep_their_outputs(name):
    """Every conv -> batch_norm folds; DenseNet's pre-activation norms (after concat or pooling) stay."""
    from onnx import numpy_helper

    graph, x_name, x = _light(name)
    n_bn = graph.op_counts()["batch_norm"]
    kept = n_bn - _bn_fed_by(graph, ("conv",))
    res = _fold(graph, "fold-conv-bn,dce")
    assert res.graph.op_counts().get("batch_norm", 0) == kept
    assert _bn_fed_by(res.graph, ("conv",)) == 0 and not res.refusals
    if name != "densenet121":
        assert kept == 0
    expected = numpy_helper.to_array(onnx.load_tensor(light_models()[name].replace(".onnx", "_output_0.pb")))
    assert_close(ir.interpret(res.graph, {x_name: x})[res.graph.outputs[0].name], expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet50", "inception_v2"])
def test_light_models_with_random_weights_fold(name):
    """The stored weights are constant 0.02; random ones make every folded channel count."""
    model = randomized_weights(onnx.load(light_models()[name]))
    graph, x_name, x = _light(name, model)
    want = ir.interpret(graph, {x_name: x})
    folded = run_pipeline(graph, "fold-conv-bn,dce")
    assert "batch_norm" not in folded.op_counts()
    got = ir.interpret(folded, {x_name: x})
    for k, w in want.items():
        assert np.unique(w).size > 100
        assert_close(got[k], w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
