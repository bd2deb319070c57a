"""Norm passes (passes/norm.py): fold-ln-affine, ln-to-rmsnorm, ln-to-crmsnorm.

Exactness is checked through the interpreter in float64 on Pre-LN transformers
(GPT and ViT from the zoo's classes at d=16 with two layers, a hand-written
ONNX model after canonicalization, and the zoo GPT/ViT once each), the float32
error against ``F32_TOLERANCE``; refusals must leave the printed graph
unchanged and name the value in their reason.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import kiln
import kiln.frontend
import kiln.zoo as zoo
from kiln import ir
from kiln.codegen.tolerance import Tolerance
from kiln.ir import Graph
from kiln.passes.manager import Instruments, PassLog, run_pipeline, run_pipeline_report
from kiln.passes.norm import F32_TOLERANCE, StreamProof, prove_stream

from ..frontend.conftest import make_model, vi

F64 = Tolerance(1e-9, 1e-12)
CHECKED = Instruments(check_each_pass=True)


# ====================================================================== models


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` in float64 with every parameter moved by noise, so norms and biases are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return module.double().eval()


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names=("x",), outs=("y",)) -> Graph:
    """Export and lift ``module`` (already float64) on ``example``."""
    return kiln.frontend.lift(kiln.frontend.export(module, example, input_names=list(names),
                                                   output_names=list(outs)))


@functools.cache
def _small(kind: str) -> tuple[Graph, dict[str, np.ndarray]]:
    """A float64 Pre-LN GPT or ViT from the zoo's classes, d=16, two layers, and its example feeds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt":
            module = zoo.GPT(vocab=32, d=16, n_heads=2, n_layers=2, max_len=8)
            example = (torch.randint(0, 32, (1, 8)),)
        else:
            module = zoo.ViT(image=8, patch=4, d=16, n_heads=2, n_layers=2, classes=5)
            example = (torch.randn(1, 3, 8, 8, dtype=torch.float64),)
    g = _export(_perturbed(module, 1), example)
    return g, {"x": example[0].numpy()}


@functools.cache
def _zoo64(name: str) -> tuple[Graph, dict[str, np.ndarray]]:
    """Zoo model ``name`` exported in float64, and its example feeds."""
    module, example = zoo.get(name)
    example = tuple(e.double() if e.is_floating_point() else e for e in example)
    g = _export(module.double(), example, zoo.input_names(name), zoo.output_names(name))
    return g, {zoo.input_names(name)[0]: example[0].numpy()}


def _as_f32(g: Graph) -> Graph:
    """``g`` with every float64 input and constant in float32 (types re-inferred)."""
    out = Graph(g.name)
    vmap: dict[int, ir.Value] = {}
    for v in g.inputs:
        vmap[id(v)] = out.add_input(v.name, v.type.with_dtype("f32") if v.type.dtype == "f64" else v.type)
    for v in g.constants.values():
        vmap[id(v)] = out.add_constant(v.const.astype(np.float32) if v.const.dtype == np.float64 else v.const, v.name)
    for n in g.nodes:
        m = out.add_node(n.op, [None if v is None else vmap[id(v)] for v in n.inputs], n.attrs, name=n.name,
                         out_names=[o.name for o in n.outputs])
        vmap.update(zip(map(id, n.outputs), m.outputs))
    out.set_outputs([vmap[id(v)] for v in g.outputs])
    return out


def _f32_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in feeds.items()}


def _outputs(g: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    res = ir.interpret(g, feeds)
    return [res[v.name] for v in g.outputs]


def _rel_err(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest difference relative to each output's magnitude."""
    return max(float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max() / np.abs(y).max())
               for x, y in zip(a, b))


def _random_feeds(feeds: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(0, 32, v.shape) if v.dtype.kind == "i" else rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in feeds.items()}


def _run(g: Graph, pipeline: str) -> tuple[Graph, list]:
    """Run ``pipeline`` on a clone of ``g``; returns the graph and its refusals."""
    res = run_pipeline_report(g.clone(), pipeline)
    return res.graph, res.refusals


# ====================================================================== hand-written IR


TOY = """graph @toy(%ids: i64[1,4]) -> (%y) {
  %E = const f64[10,6] dense<elided>
  %P = const f64[4,6] dense<elided>
  %g1 = const f64[6] dense<elided>
  %b1 = const f64[6] dense<elided>
  %W1 = const f64[6,12] dense<elided>
  %c1 = const f64[12] dense<elided>
  %W2 = const f64[12,6] dense<elided>
  %c2 = const f64[6] dense<elided>
  %gf = const f64[6] dense<elided>
  %bf = const f64[6] dense<elided>
  %H = const f64[6,10] dense<elided>
  %e = gather(%E, %ids) {axis=0} : f64[1,4,6]
  %x0 = add(%e, %P) : f64[1,4,6]
  %h = layer_norm(%x0, %g1, %b1) {axis=-1, epsilon=1e-05} : f64[1,4,6]
  %u = matmul(%h, %W1) : f64[1,4,12]
  %u1 = add(%u, %c1) : f64[1,4,12]
  %a = gelu(%u1) : f64[1,4,12]
  %m = matmul(%a, %W2) : f64[1,4,6]
  %m1 = add(%m, %c2) : f64[1,4,6]
  %x1 = add(%x0, %m1) : f64[1,4,6]
  %f = layer_norm(%x1, %gf, %bf) {axis=-1, epsilon=1e-05} : f64[1,4,6]
  %y = matmul(%f, %H) : f64[1,4,10]
}"""
TOY_FEEDS = {"ids": np.array([[1, 7, 3, 3]], np.int64)}


def _toy(*edits: tuple[str, str], extra: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """TOY (a one-block Pre-LN transformer) with text ``edits`` applied; constants seeded, ``extra`` added."""
    text = TOY
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    rng = np.random.default_rng(3)
    shapes = {"E": (10, 6), "P": (4, 6), "g1": (6,), "b1": (6,), "W1": (6, 12), "c1": (12,), "W2": (12, 6),
              "c2": (6,), "gf": (6,), "bf": (6,), "H": (6, 10), **(extra or {})}
    consts = {k: (1.0 if k.startswith("g") else 0.0) + rng.standard_normal(s) for k, s in shapes.items()}
    g = ir.parse(text, constants=consts)
    ir.verify(g)
    return g


def _assert_refused(g: Graph, pipeline: str, at: str, *words: str) -> None:
    """``pipeline`` leaves ``g``'s text unchanged and refuses at ``at`` with a reason containing ``words``."""
    before = ir.print_graph(g)
    res = run_pipeline_report(g, pipeline)
    assert ir.print_graph(res.graph) == before
    assert [r.at for r in res.refusals] == [at], res.refusals
    for w in words:
        assert w in res.refusals[0].reason, res.refusals[0].reason


# ====================================================================== fold-ln-affine


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_fold_ln_affine_is_exact(kind):
    g, feeds = _small(kind)
    res = run_pipeline_report(g.clone(), "fold-ln-affine",
                              Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    out = res.graph
    norms = [n for n in out.nodes if n.op == "layer_norm"]
    assert len(norms) == 5 and not res.refusals and len(res.records[0].log.rewrites) == 5
    for n in norms:
        assert len(n.inputs) == 2 and np.all(n.inputs[1].const == 1)
    assert _rel_err(_outputs(out, feeds), _outputs(g, feeds)) < 1e-12


def test_fold_creates_a_bias_for_the_unbiased_head_and_keeps_the_output_name():
    g, _ = _small("gpt")
    assert g.outputs[0].producer.op == "matmul"
    out, _ = _run(g, "fold-ln-affine")
    y = out.outputs[0]
    assert y.name == "y" and y.producer.op == "add" and y.producer.inputs[0].producer.op == "matmul"


def test_fold_refuses_a_nonlinear_consumer_and_leaves_that_norm_alone():
    g = _toy(("%y = matmul(%f, %H) : f64[1,4,10]",
              "%r = relu(%f) : f64[1,4,6]\n  %y = matmul(%r, %H) : f64[1,4,10]"))
    want = _outputs(g, TOY_FEEDS)
    res = run_pipeline_report(g, "fold-ln-affine", CHECKED)
    (refusal,) = res.refusals
    assert refusal.at == "f" and "relu %r" in refusal.reason
    f = res.graph.value("f").producer
    assert [v.name for v in f.inputs] == ["x1", "gf", "bf"]
    h = res.graph.value("h").producer
    assert len(h.inputs) == 2 and np.all(h.inputs[1].const == 1)
    assert _rel_err(_outputs(res.graph, TOY_FEEDS), want) < 1e-12


@pytest.mark.parametrize("edits,extra,at,words", [
    ([("%ids: i64[1,4]", "%ids: i64[1,4], %H: f64[6,10]"), ("  %H = const f64[6,10] dense<elided>\n", "")],
     None, "f", ["weight %H, a graph input"]),
    ([("-> (%y)", "-> (%y, %f)")], None, "f", ["%f is a graph output"]),
    ([("%h = layer_norm(%x0, %g1, %b1) {axis=-1", "%h = layer_norm(%x0, %g1, %b1) {axis=-2")],
     None, "h", ["normalizes dims 1..2"]),
], ids=["weight-is-an-input", "output-is-a-graph-output", "not-the-last-axis"])
def test_fold_refusals(edits, extra, at, words):
    g = _toy(*edits, extra=extra)
    res = run_pipeline_report(g, "fold-ln-affine")
    assert at in [r.at for r in res.refusals]
    reason = next(r.reason for r in res.refusals if r.at == at)
    for w in words:
        assert w in reason, reason


def test_fold_absorbs_the_bias_add_that_ln_to_rmsnorm_leaves():
    g, feeds = _small("vit")
    res = run_pipeline_report(g.clone(), "ln-to-rmsnorm,fold-ln-affine",
                              Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    out = res.graph
    assert out.op_counts().get("layer_norm", 0) == 0 and not res.refusals
    for n in (n for n in out.nodes if n.op == "rms_norm"):
        assert np.all(n.inputs[1].const == 1)
        assert all(u.op in ("matmul", "gather") for u in n.output.users)


def test_fold_is_idempotent():
    g, _ = _small("gpt")
    once, _ = _run(g, "fold-ln-affine")
    twice = run_pipeline_report(once.clone(), "fold-ln-affine")
    assert ir.print_graph(twice.graph) == ir.print_graph(once)
    assert not twice.records[0].log.rewrites and not twice.refusals


# ====================================================================== ln-to-rmsnorm / ln-to-crmsnorm


@pytest.mark.parametrize("kind", ["gpt", "vit"])
@pytest.mark.parametrize("pipeline", ["ln-to-rmsnorm", "ln-to-crmsnorm"])
def test_conversion_is_exact_in_float64(kind, pipeline):
    g, feeds = _small(kind)
    res = run_pipeline_report(g.clone(), pipeline,
                              Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    out = res.graph
    counts = out.op_counts()
    new = "rms_norm" if pipeline == "ln-to-rmsnorm" else "crms_norm"
    assert counts.get("layer_norm", 0) == 0 and counts[new] == 5 and not res.refusals
    assert [(v.name, v.type) for v in out.outputs] == [(v.name, v.type) for v in g.outputs]
    for f in (feeds, _random_feeds(feeds, 1)):
        assert _rel_err(_outputs(out, f), _outputs(g, f)) < 1e-12


def test_rmsnorm_keeps_epsilon_gamma_and_adds_beta():
    g = _toy()
    out = run_pipeline(g.clone(), "ln-to-rmsnorm", CHECKED)
    f = out.value("f").producer
    assert f.op == "add" and f.inputs[1].name == "bf"
    rms = f.inputs[0].producer
    assert rms.op == "rms_norm" and rms.attrs["epsilon"] == 1e-5 and rms.inputs[1].name == "gf"
    np.testing.assert_array_equal(rms.inputs[1].const, g.value("gf").const)


def test_crmsnorm_narrows_the_stream_and_the_consumer_weights():
    g = _toy()
    out = run_pipeline(g.clone(), "ln-to-crmsnorm", CHECKED)
    assert out.value("x1").type.shape == (1, 4, 5)
    assert out.value("E").type.shape == (10, 5) and out.value("W2").type.shape == (12, 5)
    assert out.value("W1").type.shape == (5, 12) and out.value("H").type.shape == (5, 10)
    f = out.value("f").producer
    assert f.op == "crms_norm" and f.inputs[1].type.shape == (5,) and f.attrs["epsilon"] == 1e-5


def _stream(g: Graph) -> StreamProof:
    proof = prove_stream(g)
    assert isinstance(proof, StreamProof), proof
    return proof


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_every_residual_write_has_zero_mean_after_conversion(kind):
    g, feeds = _small(kind)
    stream = [(v.name, ax) for v, ax in _stream(g).tracked.values() if not v.is_const]
    assert len(stream) > 10
    before = ir.interpret(g, feeds, keep_all=True)
    rms = ir.interpret(run_pipeline(g.clone(), "ln-to-rmsnorm"), feeds, keep_all=True)
    crms = ir.interpret(run_pipeline(g.clone(), "ln-to-crmsnorm"), feeds, keep_all=True)
    off = 0
    for name, ax in stream:
        x, c = rms[name], crms[name]
        scale = np.sqrt((x * x).mean(axis=ax))
        assert np.all(np.abs(x.mean(axis=ax)) <= 1e-12 * scale), name
        off += np.any(np.abs(before[name].mean(axis=ax)) > 1e-3 * scale)
        # the narrow stream is the centered one without its last component, which is -sum of the others
        np.testing.assert_allclose(c, np.take(x, range(x.shape[ax] - 1), axis=ax), rtol=1e-9, atol=1e-12 * scale.max())
        np.testing.assert_allclose(-c.sum(axis=ax), np.take(x, x.shape[ax] - 1, axis=ax), atol=1e-10 * scale.max())
    assert off > len(stream) // 2  # the originals were not zero-mean


def _onnx_pre_ln(d: int = 8, hidden: int = 16, vocab: int = 11, tokens: int = 5, blocks: int = 2) -> onnx.ModelProto:
    """A hand-written Pre-LN model: Gather embedding + positions, LN as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add,
    Gemm(transB=1) MLP blocks, final LN and a Gemm head (float64)."""
    rng = np.random.default_rng(5)
    inits: dict[str, np.ndarray] = {"E": rng.standard_normal((vocab, d)), "P": rng.standard_normal((tokens, d)),
                                    "axes": np.array([-1], np.int64), "two": np.array(2.0), "eps": np.array(1e-5)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("Add", ["e", "P"], ["x0"])]

    def layer_norm(x: str, p: str) -> str:
        inits[f"{p}_g"], inits[f"{p}_b"] = 1 + 0.3 * rng.standard_normal(d), 0.3 * rng.standard_normal(d)
        nodes.extend([
            helper.make_node("ReduceMean", [x, "axes"], [f"{p}_mu"]),
            helper.make_node("Sub", [x, f"{p}_mu"], [f"{p}_dx"]),
            helper.make_node("Pow", [f"{p}_dx", "two"], [f"{p}_sq"]),
            helper.make_node("ReduceMean", [f"{p}_sq", "axes"], [f"{p}_var"]),
            helper.make_node("Add", [f"{p}_var", "eps"], [f"{p}_ve"]),
            helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_sd"]),
            helper.make_node("Div", [f"{p}_dx", f"{p}_sd"], [f"{p}_n"]),
            helper.make_node("Mul", [f"{p}_n", f"{p}_g"], [f"{p}_s"]),
            helper.make_node("Add", [f"{p}_s", f"{p}_b"], [f"{p}_y"]),
        ])
        return f"{p}_y"

    def gemm(x: str, p: str, n_in: int, n_out: int) -> str:
        inits[f"{p}_W"], inits[f"{p}_c"] = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), 0.1 * rng.standard_normal(n_out)
        nodes.append(helper.make_node("Gemm", [x, f"{p}_W", f"{p}_c"], [f"{p}_out"], transB=1))
        return f"{p}_out"

    x = "x0"
    for b in range(blocks):
        hid = gemm(layer_norm(x, f"ln{b}"), f"fc1_{b}", d, hidden)
        nodes.append(helper.make_node("Relu", [hid], [f"act{b}"]))
        nodes.append(helper.make_node("Add", [x, gemm(f"act{b}", f"fc2_{b}", hidden, d)], [f"x{b + 1}"]))
        x = f"x{b + 1}"
    nodes.append(helper.make_node("Identity", [gemm(layer_norm(x, "lnf"), "head", d, vocab)], ["logits"]))
    return make_model(nodes, [vi("ids", np.int64, [tokens])], [vi("logits", np.float64, [tokens, vocab])], inits,
                      opset=18)


@pytest.mark.parametrize("pipeline", ["ln-to-rmsnorm", "ln-to-crmsnorm", "fold-ln-affine,ln-to-crmsnorm"])
def test_hand_written_onnx_after_canonicalization(pipeline):
    g = kiln.frontend.lift(_onnx_pre_ln())
    assert g.op_counts()["layer_norm"] == 3
    feeds = {"ids": np.array([3, 1, 4, 1, 5], np.int64)}
    out = run_pipeline(g.clone(), pipeline, Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    assert out.op_counts().get("layer_norm", 0) == 0
    assert _rel_err(_outputs(out, feeds), _outputs(g, feeds)) < 1e-12


VIT_LIKE = """graph @vitlike(%px: f64[2,3,4,4]) -> (%y) {
  %W = const f64[6,3,2,2] dense<elided>
  %b = const f64[6] dense<elided>
  %cls = const f64[1,1,6] dense<elided>
  %pos = const f64[1,5,6] dense<elided>
  %sc = const f64[1,5,1] dense<elided>
  %g = const f64[6] dense<elided>
  %bb = const f64[6] dense<elided>
  %H = const f64[6,3] dense<elided>
  %hb = const f64[3] dense<elided>
  %c = conv(%px, %W, %b) {strides=[2, 2]} : f64[2,6,2,2]
  %f = reshape(%c) {shape=[0, 6, -1]} : f64[2,6,4]
  %t = transpose(%f) {perm=[0, 2, 1]} : f64[2,4,6]
  %k = expand(%cls) {shape=[2, 1, 6]} : f64[2,1,6]
  %x = concat(%k, %t) {axis=1} : f64[2,5,6]
  %x0 = add(%x, %pos) : f64[2,5,6]
  %xs = mul(%x0, %sc) : f64[2,5,6]
  %s = slice(%xs) {starts=[0], ends=[1], axes=[1]} : f64[2,1,6]
  %q = squeeze(%s) {axes=[1]} : f64[2,6]
  %n = layer_norm(%q, %g, %bb) {axis=-1, epsilon=1e-06} : f64[2,6]
  %y0 = matmul(%n, %H) : f64[2,3]
  %y = add(%y0, %hb) : f64[2,3]
}"""


CLS_HEAD = """  %s = slice(%xs) {starts=[0], ends=[1], axes=[1]} : f64[2,1,6]
  %q = squeeze(%s) {axes=[1]} : f64[2,6]
  %n = layer_norm(%q, %g, %bb) {axis=-1, epsilon=1e-06} : f64[2,6]
  %y0 = matmul(%n, %H) : f64[2,3]
"""
HEADS = {  # the cls token, or token mean-pooling before / after the final norm
    "cls": CLS_HEAD,
    "pool-before-norm": """  %q = reduce_mean(%xs) {axes=[1], keepdims=0} : f64[2,6]
  %n = layer_norm(%q, %g, %bb) {axis=-1, epsilon=1e-06} : f64[2,6]
  %y0 = matmul(%n, %H) : f64[2,3]
""",
    "pool-after-norm": """  %n = layer_norm(%xs, %g, %bb) {axis=-1, epsilon=1e-06} : f64[2,5,6]
  %p = reduce_mean(%n) {axes=[1], keepdims=0} : f64[2,6]
  %y0 = matmul(%p, %H) : f64[2,3]
""",
}


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("pipeline", ["ln-to-rmsnorm", "ln-to-crmsnorm", "fold-ln-affine"])
def test_patch_embedding_cls_token_and_token_selection(pipeline, head):
    rng = np.random.default_rng(4)
    shapes = {"W": (6, 3, 2, 2), "b": (6,), "cls": (1, 1, 6), "pos": (1, 5, 6), "g": (6,), "bb": (6,), "H": (6, 3),
              "hb": (3,), "sc": (1, 5, 1)}
    assert CLS_HEAD in VIT_LIKE
    text = VIT_LIKE.replace(CLS_HEAD, HEADS[head])
    g = ir.parse(text, constants={k: rng.standard_normal(v) for k, v in shapes.items()})
    feeds = {"px": rng.standard_normal((2, 3, 4, 4))}
    out = run_pipeline(g.clone(), pipeline, Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    assert _rel_err(_outputs(out, feeds), _outputs(g, feeds)) < 1e-12
    assert out.op_counts().get("layer_norm", 0) == (pipeline == "fold-ln-affine")
    if pipeline == "ln-to-crmsnorm" and head == "cls":
        assert out.value("W").type.shape == (5, 3, 2, 2) and out.value("f").producer.attrs["shape"] == [0, 5, -1]
        assert out.value("k").producer.attrs["shape"] == [2, 1, 5] and out.value("q").type.shape == (2, 5)


def test_symbolic_batch():
    g = ir.parse(TOY.replace("[1,4", "[N,4"), constants={v.name: v.const for v in _toy().constants.values()})
    feeds = {"ids": np.array([[1, 7, 3, 3], [0, 9, 2, 5]], np.int64)}
    for pipeline in ("fold-ln-affine", "ln-to-rmsnorm", "ln-to-crmsnorm"):
        out = run_pipeline(g.clone(), pipeline, Instruments(check_each_pass=True, check_inputs=feeds,
                                                            check_tolerance=F64))
        assert out.value("x1").type.shape[0] == "N"
        assert _rel_err(_outputs(out, feeds), _outputs(g, feeds)) < 1e-12


@pytest.mark.parametrize("pipeline", ["fold-ln-affine", "ln-to-rmsnorm", "ln-to-crmsnorm"])
def test_a_branch_that_is_one_linear_layer(pipeline):
    # x1 = x0 + (ln(x0) @ W3 + c2): W3 is both a write into the stream and a consumer of the norm
    g = _toy(("%H = const f64[6,10] dense<elided>", "%H = const f64[6,10] dense<elided>\n  %W3 = const f64[6,6] dense<elided>"),
             ("%m = matmul(%a, %W2)", "%m = matmul(%h, %W3)"), extra={"W3": (6, 6)})
    res = run_pipeline_report(g.clone(), pipeline, Instruments(check_each_pass=True, check_inputs=TOY_FEEDS,
                                                               check_tolerance=F64))
    assert not res.refusals
    if pipeline == "ln-to-crmsnorm":
        assert res.graph.value("W3").type.shape == (5, 5)


def test_untie_centers_a_copy_of_a_tied_embedding():
    g = _toy(("%y = matmul(%f, %H) : f64[1,4,10]",
              "%Et = transpose(%E) {perm=[1, 0]} : f64[6,10]\n  %y = matmul(%f, %Et) : f64[1,4,10]"))
    res = run_pipeline_report(g.clone(), "ln-to-rmsnorm{untie=true}", CHECKED)
    out = res.graph
    assert ("E", "untied: the stream reads a centered copy, other nodes the original") in res.records[0].log.rewrites
    np.testing.assert_array_equal(out.value("E").const, g.value("E").const)
    assert out.value("Et").producer.inputs[0].name == "E"
    table = out.value("e").producer.inputs[0]
    assert table.name != "E" and np.allclose(table.const.mean(axis=1), 0, atol=1e-15)
    assert _rel_err(_outputs(out, TOY_FEEDS), _outputs(g, TOY_FEEDS)) < 1e-12


def test_a_graph_without_layer_norm_is_left_alone():
    g = _toy(("layer_norm(%x0, %g1, %b1)", "rms_norm(%x0, %g1)"), ("layer_norm(%x1, %gf, %bf)", "rms_norm(%x1, %gf)"))
    for pipeline in ("ln-to-rmsnorm", "ln-to-crmsnorm"):
        res = run_pipeline_report(g.clone(), pipeline)
        assert ir.print_graph(res.graph) == ir.print_graph(g) and not res.refusals


# ====================================================================== refusals of the whole graph


BOTH = ["ln-to-rmsnorm", "ln-to-crmsnorm"]


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_nonlinearity_writing_into_the_stream(pipeline):
    g = _toy(("%x1 = add(%x0, %m1)", "%r = relu(%m1) : f64[1,4,6]\n  %x1 = add(%x0, %r)"))
    _assert_refused(g, pipeline, "r", "%r = relu(...) flows into layer_norm %f", "nonlinearity")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_layer_scale_not_folded_into_the_projection(pipeline):
    g = _toy(("%H = const f64[6,10] dense<elided>", "%H = const f64[6,10] dense<elided>\n  %LS = const f64[6] dense<elided>"),
             ("%x1 = add(%x0, %m1)", "%ls = mul(%m1, %LS) : f64[1,4,6]\n  %x1 = add(%x0, %ls)"), extra={"LS": (6,)})
    _assert_refused(g, pipeline, "ls", "per channel by the constant %LS", "LayerScale")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_tied_embedding_and_head(pipeline):
    g = _toy(("%y = matmul(%f, %H) : f64[1,4,10]",
              "%Et = transpose(%E) {perm=[1, 0]} : f64[6,10]\n  %y = matmul(%f, %Et) : f64[1,4,10]"))
    _assert_refused(g, pipeline, "E", "constant %E", "transpose %Et", "tied embedding/head")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_weights_given_as_graph_inputs(pipeline):
    g = _toy(("%ids: i64[1,4]", "%ids: i64[1,4], %W2: f64[12,6]"), ("  %W2 = const f64[12,6] dense<elided>\n", ""))
    _assert_refused(g, pipeline, "W2", "graph input %W2 flows into layer_norm %f", "run time")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_stream_that_is_a_graph_output(pipeline):
    _assert_refused(_toy(("-> (%y)", "-> (%y, %x1)")), pipeline, "x1", "%x1", "graph output")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_norm_of_something_other_than_the_stream(pipeline):
    g = _toy(("%m = matmul(%a, %W2)", "%an = layer_norm(%a, %c1, %c1) : f64[1,4,12]\n  %m = matmul(%an, %W2)"))
    _assert_refused(g, pipeline, "a", "%a = gelu(...) flows into layer_norm %an")


@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_a_stream_read_by_a_matmul(pipeline):
    g = _toy(("%u = matmul(%h, %W1)", "%u = matmul(%x0, %W1)"))
    _assert_refused(g, pipeline, "x0", "%x0 is in the residual stream", "matmul %u")


def test_crmsnorm_refuses_a_norm_whose_consumer_cannot_fold():
    g = _toy(("%y = matmul(%f, %H) : f64[1,4,10]",
              "%r = relu(%f) : f64[1,4,6]\n  %y = matmul(%r, %H) : f64[1,4,10]"))
    _assert_refused(g, "ln-to-crmsnorm", "f", "consumers of layer_norm %f", "relu %r")
    assert run_pipeline(g.clone(), "ln-to-rmsnorm", CHECKED).op_counts()["rms_norm"] == 2


@pytest.mark.slow
@pytest.mark.xdist_group("norm-zoo")
@pytest.mark.parametrize("pipeline", BOTH)
def test_refuses_the_post_ln_zoo_bert(pipeline):
    g = kiln.frontend.lift(zoo.onnx_model("bert"))
    before = ir.print_graph(g)
    res = run_pipeline_report(g, pipeline)
    assert ir.print_graph(res.graph) == before
    (r,) = res.refusals
    assert f"%{r.at} = layer_norm(...) flows into layer_norm" in r.reason and "Post-LN" in r.reason


# ====================================================================== the zoo, float64 and float32


@pytest.mark.slow
@pytest.mark.xdist_group("norm-zoo")
@pytest.mark.parametrize("name", ["gpt", "vit"])
def test_zoo_conversions(name):
    g, feeds = _zoo64(name)
    g32, feeds32 = _as_f32(g), _f32_feeds(feeds)
    for pipeline in ("ln-to-rmsnorm", "ln-to-crmsnorm", "fold-ln-affine"):
        out = run_pipeline(g.clone(), pipeline)
        assert out.op_counts().get("layer_norm", 0) == (9 if pipeline == "fold-ln-affine" else 0)
        assert _rel_err(_outputs(out, feeds), _outputs(g, feeds)) < F64.rtol
        out32 = run_pipeline(g32.clone(), pipeline)
        for f in (feeds32, _random_feeds(feeds32, 2)):
            assert _rel_err(_outputs(out32, f), _outputs(g32, f)) < F32_TOLERANCE, pipeline


def test_pass_log_names_what_was_rewritten():
    g = _toy()
    log = PassLog("ln-to-crmsnorm")
    from kiln.passes.norm import LnToCrmsNorm

    LnToCrmsNorm().apply(g, log)
    assert [at for at, _ in log.rewrites] == ["graph", "h", "f"]
    assert "2 consumer weight(s)" in log.rewrites[0][1]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["canonicalize,ln-to-crmsnorm,dce", "canonicalize,ln-to-rmsnorm,fold-ln-affine,dce"])
def test_converted_vit_compiles_and_matches_torch(pipeline, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = zoo.ViT(image=8, patch=4, d=16, n_heads=2, n_layers=2, classes=5).eval()
        x = torch.randn(1, 3, 8, 8)
    art = kiln.compile(module, example_inputs=(x,), passes=pipeline)
    assert ("crms_norm" in art.ir_text) == ("crms" in pipeline)
    sess = kiln.load(art.save(tmp_path / "vit.kiln"))
    (got,) = sess.run({sess.inputs[0].name: x.numpy()}).values()
    want = module(x).detach().numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < F32_TOLERANCE


@pytest.mark.parametrize("pipeline", ["ln-to-rmsnorm,fold-ln-affine", "ln-to-crmsnorm"])
def test_torchscript_exporter_form(pipeline):
    """The TorchScript exporter (dynamo=False) spells the same GPT differently; after canonicalization it converts."""
    import io
    import warnings

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _perturbed(zoo.GPT(vocab=32, d=16, n_heads=2, n_layers=2, max_len=8), 1)
        example = (torch.randint(0, 32, (1, 8)),)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=18, input_names=["x"],
                          output_names=["y"])
    proto = onnx.load_from_string(buf.getvalue())
    assert "Constant" in {n.op_type for n in proto.graph.node}  # not the dynamo spelling
    g = kiln.frontend.lift(proto)
    feeds = {"x": example[0].numpy()}
    res = run_pipeline_report(g.clone(), pipeline, Instruments(check_each_pass=True, check_inputs=feeds,
                                                                check_tolerance=F64))
    assert not res.refusals and "layer_norm" not in res.graph.op_counts()
    with torch.no_grad():
        want = module(*example).numpy()
    assert _rel_err(_outputs(res.graph, feeds), [want]) < 1e-12
