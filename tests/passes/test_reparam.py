"""Scale reparameterization (passes/reparam.py): repq, smoothquant, log2-softmax.

repq and smoothquant are checked exact through the interpreter in float64
(graphs written as IR text with f64 constants); repq's claim about integer
codes (passes-math.md §3: per-tensor codes equal per-channel codes exactly when
z~ is an integer) is checked against per-channel codes computed here in numpy
with ORT's formula; the log-√2 quantizer against a direct numpy transcription of
its formula and against onnxruntime on the lowered graph. Refusals must leave
the printed graph unchanged and say why.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import ir
from kiln.codegen.tolerance import Tolerance
from kiln.frontend.lower import lower_to_onnx
from kiln.ir import Graph
from kiln.passes.calibrate import CalibrationSet, as_calibration
from kiln.passes.manager import (
    Instruments,
    PassLog,
    PipelineError,
    parse_pipeline,
    run_pipeline_report,
)
from kiln.passes.reparam import Log2Softmax, RepQ, SmoothQuant, log2_softmax, repq, smooth_quant

RTOL64 = 1e-12
F64 = Tolerance(1e-12, 1e-14)
D, T = 8, 5  # model width, tokens


# ====================================================================== helpers


def _const(name: str, a: np.ndarray) -> str:
    a = np.asarray(a, np.float64)
    return (f"  %{name} = const f64[{','.join(map(str, a.shape))}] "
            f"[{', '.join(repr(float(v)) for v in a.reshape(-1))}]")


def _outlier_norm(rng: np.random.Generator, beta: bool = True) -> dict[str, np.ndarray]:
    """γ (and β) of a post-LN activation with outlier channels: channel 2 is ~20x wider, channel 5 shifted."""
    gamma = rng.uniform(0.5, 1.5, D)
    gamma[2], gamma[5] = 20.0, -6.0
    out = {"gamma": gamma}
    if beta:
        b = rng.normal(0, 0.3, D)
        b[5] = 4.0
        out["beta"] = b
    return out


def _block(rng: np.random.Generator, *, beta: bool = True, bias: bool = True) -> str:
    """x -> layer_norm -> two linears (fc1 with or without a bias add, fc2 without one), in float64."""
    p = _outlier_norm(rng, beta)
    lines = [f"graph @block(%x: f64[2,{T},{D}]) -> (%y, %z) {{", _const("gamma", p["gamma"])]
    if beta:
        lines.append(_const("beta", p["beta"]))
    lines += [_const("w1", rng.standard_normal((D, 6))), _const("w2", rng.standard_normal((D, 3)))]
    if bias:
        lines.append(_const("b1", rng.standard_normal(6)))
    lines.append(f"  %ln = layer_norm(%x, %gamma{', %beta' if beta else ''}) {{axis=-1, epsilon=1e-05}} : "
                 f"f64[2,{T},{D}]")
    if bias:
        lines += [f"  %h = matmul(%ln, %w1) : f64[2,{T},6]", f"  %y = add(%h, %b1) : f64[2,{T},6]"]
    else:
        lines.append(f"  %y = matmul(%ln, %w1) : f64[2,{T},6]")
    lines += [f"  %z = matmul(%ln, %w2) : f64[2,{T},3]", "}"]
    return "\n".join(lines)


def _calib(rng: np.random.Generator, n: int = 6, shape=(2, T, D)) -> CalibrationSet:
    return as_calibration([{"x": rng.standard_normal(shape)} for _ in range(n)])


def _rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2)))


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _assert_same_function(before: Graph, after: Graph, feeds: list[dict[str, np.ndarray]]) -> float:
    """The outputs agree within RTOL64 of their magnitude on every feed; returns the worst error."""
    worst = 0.0
    for f in feeds:
        want, got = ir.interpret(before, f), ir.interpret(after, f)
        for name in want:
            worst = max(worst, _rel(got[name], want[name]))
    assert worst < RTOL64, worst
    return worst


def _values(graph: Graph, feeds: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    """Value ``name`` computed on every feed, stacked."""
    return np.stack([ir.interpret(graph, f, keep_all=True)[name] for f in feeds])


def _per_channel_u8(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ORT's asymmetric uint8 scale and zero point per channel (range widened to include 0), and y's codes."""
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    s = (hi - lo) / 255
    z = np.rint(-lo / s)
    return s, z, np.clip(np.rint(y / s) + z, 0, 255)


def _fake_quant_i8(y: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """insert-qdq's activation pair in numpy: dequantize(quantize(y)) with int8 (scale, zero point)."""
    return (np.clip(np.rint(y / scale) + zp, -128, 127) - zp) * scale


def _i8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """ORT's per-tensor int8 activation formula: scale = (max - min)/255, zp = round(-128 - min/scale)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = float(np.float32((hi - lo) / 255))
    return s, int(np.clip(np.rint(-128 - lo / s), -128, 127))


def _linear(g: Graph, out: str) -> tuple[np.ndarray, np.ndarray | float]:
    """The weight and bias (0 when none) of the linear whose output is ``out``."""
    node = g.value(out).producer
    if node.op == "matmul":
        return node.inputs[1].const, 0.0
    mm, b = (node.inputs[0].producer, node.inputs[1]) if node.inputs[0].producer else \
        (node.inputs[1].producer, node.inputs[0])
    return mm.inputs[1].const, b.const


def _feeds(rng: np.random.Generator, n: int = 3, shape=(2, T, D)) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal(shape) * 2} for _ in range(n)]


# ====================================================================== repq


@pytest.mark.parametrize("beta,bias", [(True, True), (False, True), (True, False), (False, False)])
def test_repq_is_exact_in_float64(beta, bias):
    """γ~, β~ (created when absent), W~ and b~ (a bias add created when absent) give the same outputs."""
    rng = np.random.default_rng(1)
    text = _block(rng, beta=beta, bias=bias)
    g, log = ir.parse(text), PassLog("repq")
    g, records = repq(g, _calib(rng), log=log)
    ir.verify(g)
    assert [r.at for r in records] == ["ln"] and not log.refusals
    assert records[0].linears == ("h" if bias else "y", "z")
    _assert_same_function(ir.parse(text), g, _feeds(rng))
    assert sum(n.op == "add" for n in g.nodes) == 2  # fc1's bias (kept or created) and fc2's created one
    assert len(g.value("ln").producer.inputs) == 3


def test_repq_post_ln_residual_reader_gets_the_original_activation_back():
    """Post-LN (BERT): the norm output also feeds a residual add; the add reads ỹ·r1 - s·r2, exact in float64."""
    rng = np.random.default_rng(4)
    text = _block(rng).replace(" -> (%y, %z) {", " -> (%y, %z, %r) {").replace(
        "\n}", f"\n  %r = add(%ln, %x) : f64[2,{T},{D}]\n}}")
    g, log = ir.parse(text), PassLog("repq")
    g, records = repq(g, _calib(rng), log=log)
    ir.verify(g)
    assert [r.at for r in records] == ["ln"] and not log.refusals and "other reader" in records[0].what
    add = g.value("r").producer
    assert add.inputs[0].producer.op == "add" and add.inputs[0].producer.inputs[0].producer.op == "mul"
    _assert_same_function(ir.parse(text), g, _feeds(rng))


def test_repq_per_tensor_codes_equal_per_channel_codes():
    """After repq, int8 per-tensor codes with the recorded (s~, zp) on the new activation are the per-channel
    uint8 codes of the old one minus 128, on the calibration set and on new inputs (clipping included)."""
    rng = np.random.default_rng(2)
    text = _block(rng)
    calib = _calib(rng)
    before = ir.parse(text)
    y = _values(before, list(calib.samples), "ln")
    lo, hi = y.reshape(-1, D).min(0), y.reshape(-1, D).max(0)
    s, z, _ = _per_channel_u8(y, lo, hi)
    after, (rec,) = repq(ir.parse(text), calib)
    s_t, zp = rec.fixed["ln"]
    assert s_t == float(np.float32(s.mean())) and zp == int(np.rint(z.mean())) - 128
    assert set(rec.fixed) == {"ln"}
    assert np.ptp(s) / s.mean() > 1  # the channels really differ
    for feeds in (list(calib.samples), _feeds(rng, 4)):
        y_old = _values(before, feeds, "ln")
        y_new = _values(after, feeds, "ln")
        per_channel = _per_channel_u8(y_old, lo, hi)[2]
        per_tensor = np.clip(np.rint(y_new / s_t) + zp, -128, 127) + 128
        np.testing.assert_array_equal(per_tensor, per_channel)
    # on the calibration set every channel of the new activation fits the one per-tensor quantizer
    y_new = _values(after, list(calib.samples), "ln")
    codes = np.rint(y_new / s_t) + zp
    assert codes.min() >= -128 and codes.max() <= 127


def test_repq_codes_need_an_integer_zero_point():
    """The reference's condition: a quantizer computes round(x/s~) + z~, so with z~ = mean(z) left fractional,
    r2 is fractional, round(y/s + r2) != round(y/s) + r2, and the dequantized values (mapped back through r1, r2)
    stop matching the per-channel ones; with z~ rounded they match."""
    rng = np.random.default_rng(3)
    y = rng.standard_normal((400, D)) * rng.uniform(0.2, 5, D) + rng.uniform(-2, 2, D)
    s, z, per_channel = _per_channel_u8(y, y.min(0), y.max(0))
    z_frac = z.mean()
    assert z_frac != np.rint(z_frac)
    for z_t, should_match in ((np.rint(z_frac), True), (z_frac, False)):
        s_t = s.mean()
        r1, r2 = s / s_t, z - z_t
        y_new = (y + s * r2) / r1
        back = (np.clip(np.rint(y_new / s_t) + z_t, 0, 255) - z_t) * s_t * r1 - s * r2
        assert np.allclose(back, (per_channel - z) * s, rtol=0, atol=1e-9 * s.max()) == should_match


def test_repq_lowers_per_tensor_quantization_error():
    """insert-qdq-style int8 per-tensor fake quantization of the LN output, with ranges from the calibration set:
    after repq (with its fixed qparams) fc2's output error equals that of per-channel quantization (same codes)
    and is well below plain per-tensor quantization, on the calibration set and on new inputs."""
    rng = np.random.default_rng(4)
    text = _block(rng)
    calib = _calib(rng, 40)
    before = ir.parse(text)
    after, (rec,) = repq(ir.parse(text), calib)
    y = _values(before, list(calib.samples), "ln")
    plain = _i8_qparams(float(y.min()), float(y.max()))
    lo, hi = y.reshape(-1, D).min(0), y.reshape(-1, D).max(0)
    w2 = before.constants["w2"].const
    w2_new, b2_new = _linear(after, "z")  # repq gave fc2 a bias: b~ = -(s·r2)·W
    for which, feeds in (("calibration", list(calib.samples)), ("new", _feeds(rng, 8))):
        y_old, y_new = _values(before, feeds, "ln"), _values(after, feeds, "ln")
        s, z, codes = _per_channel_u8(y_old, lo, hi)
        ref = y_old @ w2
        err_plain = _rms(_fake_quant_i8(y_old, *plain) @ w2, ref)
        err_channel = _rms(((codes - z) * s) @ w2, ref)
        err_repq = _rms(_fake_quant_i8(y_new, *rec.fixed["ln"]) @ w2_new + b2_new, ref)
        print(f"{which}: fc2 RMS error per-tensor {err_plain:.4g}, per-channel {err_channel:.4g}, "
              f"repq + per-tensor {err_repq:.4g}")
        assert err_repq == pytest.approx(err_channel, rel=1e-9)
        assert err_repq < err_plain / 2


def test_repq_and_smoothquant_in_float32():
    """In float32 (weights rounded once more, every op rounded) the outputs move by rounding only."""
    rng = np.random.default_rng(5)
    text = _block(rng).replace("f64", "f32")
    calib = as_calibration([{"x": s["x"].astype(np.float32)} for s in _calib(rng).samples])
    feeds = [{"x": f["x"].astype(np.float32)} for f in _feeds(rng)]
    for name, fn in (("repq", repq), ("smoothquant", smooth_quant)):
        g, _ = fn(ir.parse(text), calib)
        err = max(_rel(ir.interpret(g, f)[o].astype(np.float64), ir.interpret(ir.parse(text), f)[o])
                  for f in feeds for o in ("y", "z"))
        print(f"{name} float32: max error {err:.3g} of the output magnitude")
        assert err < 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), spread=st.floats(1.0, 1e4), shift=st.floats(-10.0, 10.0),
       bits=st.sampled_from([4, 8]))
def test_repq_exact_for_all_norm_parameters(seed, spread, shift, bits):
    """For any γ, β, weights (channel scales spread over ``spread``x, shifted by ``shift``) repq is exact."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, D) * np.exp(rng.uniform(0, math.log(spread), D)) * rng.choice([-1, 1], D)
    beta = rng.normal(shift, 1.0, D)
    text = "\n".join([f"graph @g(%x: f64[{T},{D}]) -> (%y) {{", _const("g", gamma), _const("b", beta),
                      _const("w", rng.standard_normal((D, 4))), _const("c", rng.standard_normal(4)),
                      f"  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]", f"  %h = matmul(%ln, %w) : f64[{T},4]",
                      f"  %y = add(%h, %c) : f64[{T},4]", "}"])
    g, (rec,) = repq(ir.parse(text), _calib(rng, 3, (T, D)), bits=bits)
    _assert_same_function(ir.parse(text), g, _feeds(rng, 2, (T, D)))
    s_t, zp = rec.fixed["ln"]
    assert s_t > 0 and -2 ** (bits - 1) <= zp < 2 ** (bits - 1)


def _refusal_text(body: str, inputs: str = "", outputs: str = "%y") -> str:
    rng = np.random.default_rng(7)
    consts = [_const("g", _outlier_norm(rng)["gamma"]), _const("b", rng.standard_normal(D)),
              _const("w", rng.standard_normal((D, 4)))]
    return "\n".join([f"graph @g(%x: f64[{T},{D}]{inputs}) -> ({outputs}) {{", *consts, body, "}"])


REFUSALS = {
    "consumer-not-a-linear": (_refusal_text(f"""  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]
  %y = relu(%ln) : f64[{T},{D}]"""), "ln", "no linear reads it"),
    "consumer-not-a-linear-behind-a-row-op": (_refusal_text(f"""  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]
  %t = reshape(%ln) {{shape=[{T},{D}]}} : f64[{T},{D}]
  %y = relu(%t) : f64[{T},{D}]"""), "ln", "consumer relu %y (reading %t) is not a matmul with a constant weight"),
    "weight-not-constant": (_refusal_text(f"""  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]
  %y = matmul(%ln, %v) : f64[{T},4]""", inputs=f", %v: f64[{D},4]"), "ln",
                            "consumer matmul %y has the weight %v, a graph input"),
    "weight-shared": (_refusal_text(f"""  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]
  %y = matmul(%ln, %w) : f64[{T},4]
  %u = matmul(%x, %w) : f64[{T},4]""", outputs="%y, %u"), "ln",
                      "weight %w of matmul %y is also read by matmul %u (operand 1), outside the linears that "
                      "read %ln"),
    "output-is-graph-output": (_refusal_text(f"""  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]
  %y = matmul(%ln, %w) : f64[{T},4]""", outputs="%y, %ln"), "ln", "%ln is a graph output"),
    "gamma-not-constant": (_refusal_text(f"""  %ln = layer_norm(%x, %gi, %b) : f64[{T},{D}]
  %y = matmul(%ln, %w) : f64[{T},4]""", inputs=f", %gi: f64[{D}]"), "ln", "its γ %gi is not a constant"),
    "not-the-last-axis": ("\n".join([f"graph @g(%x: f64[{T},{D}]) -> (%y) {{",
                                       _const("g", np.ones((T, D))), _const("w", np.ones((D, 4))),
                                       f"  %ln = layer_norm(%x, %g) {{axis=0}} : f64[{T},{D}]",
                                       f"  %y = matmul(%ln, %w) : f64[{T},4]", "}"]), "ln",
                          "it normalizes dims 0..1; only a norm over the last axis folds into a matmul"),
    "all-zero-activation": (_refusal_text(f"""  %zero = const f64[{D}] [{', '.join(['0.0'] * D)}]
  %ln = layer_norm(%x, %zero, %zero) : f64[{T},{D}]
  %y = matmul(%ln, %w) : f64[{T},4]"""), "ln", "%ln is 0 in every channel over the calibration set"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_repq_refusals_leave_the_graph_alone(name):
    text, at, reason = REFUSALS[name]
    g = ir.parse(text)
    before = str(g)
    res = run_pipeline_report(g, "repq{samples=2}")
    assert str(res.graph) == before
    assert [r.at for r in res.refusals] == [at] and reason in res.refusals[0].reason, res.refusals
    assert not res.records[0].log.rewrites


def test_repq_through_row_moving_ops_and_shared_gamma():
    """A final norm read through a token gather (a ViT head) is reparameterized; a γ shared by two norms is
    copied for the one rewritten; ``fixed`` names the gathered value too."""
    rng = np.random.default_rng(8)
    p = _outlier_norm(rng)
    text = "\n".join([f"graph @g(%x: f64[2,{T},{D}]) -> (%y, %r) {{", _const("g", p["gamma"]),
                      _const("b", p["beta"]), _const("w", rng.standard_normal((D, 3))),
                      "  %i = const i64[] [0]",
                      f"  %ln = layer_norm(%x, %g, %b) : f64[2,{T},{D}]",
                      f"  %cls = gather(%ln, %i) {{axis=1}} : f64[2,{D}]",
                      "  %y = matmul(%cls, %w) : f64[2,3]",
                      f"  %ln2 = layer_norm(%x, %g, %b) : f64[2,{T},{D}]",
                      f"  %r = relu(%ln2) : f64[2,{T},{D}]", "}"])
    log = PassLog("repq")
    g, (rec,) = repq(ir.parse(text), _calib(rng), log=log)
    assert set(rec.fixed) == {"ln", "cls"} and rec.fixed["ln"] == rec.fixed["cls"]
    assert [r.at for r in log.refusals] == ["ln2"]
    assert g.value("ln2").producer.inputs[1].name == "g" and g.value("ln").producer.inputs[1].name != "g"
    _assert_same_function(ir.parse(text), g, _feeds(rng))


def test_repq_pipeline_options():
    assert parse_pipeline("repq{bits=4,samples=3,seed=2}") == [RepQ(samples=3, seed=2, bits=4)]
    assert parse_pipeline("smoothquant{alpha=0.75}") == [SmoothQuant(alpha=0.75)]
    assert parse_pipeline("log2-softmax{bits=4,calib=x.npz}") == [Log2Softmax(calib="x.npz", bits=4)]
    with pytest.raises(PipelineError, match="bits must be in 2..8, got 16"):
        parse_pipeline("repq{bits=16}")
    with pytest.raises(PipelineError, match=r"alpha must be in \[0, 1\], got 2.0"):
        parse_pipeline("smoothquant{alpha=2}")
    with pytest.raises(PipelineError, match="bits must be in 1..16, got 0"):
        parse_pipeline("log2-softmax{bits=0}")


def test_passes_calibrate_only_when_there_is_something_to_do():
    """A graph without candidates is left alone without reading the (missing) calibration file."""
    g = ir.parse("graph @g(%x: f32[2,3]) -> (%y) {\n  %y = relu(%x) : f32[2,3]\n}")
    res = run_pipeline_report(g, "repq{calib=/no/such.npz},smoothquant{calib=/no/such.npz},"
                                 "log2-softmax{calib=/no/such.npz}")
    assert all(not r.log.rewrites and not r.log.refusals for r in res.records)


# ====================================================================== SmoothQuant


def _smooth_text(rng: np.random.Generator) -> str:
    """Four groups: a norm feeding two linears, a linear feeding a linear (foldable producer), a gelu feeding a
    linear (needs a mul), and a graph input feeding a linear (needs a mul)."""
    p = _outlier_norm(rng)
    scale = np.exp(rng.uniform(-2, 2, 6))[None, :]
    return "\n".join([
        f"graph @g(%x: f64[{T},{D}], %u: f64[{T},{D}]) -> (%y, %z, %v) {{", _const("g", p["gamma"]),
        _const("b", p["beta"]), _const("w1", rng.standard_normal((D, 6)) * scale),
        _const("c1", rng.standard_normal(6)), _const("w2", rng.standard_normal((D, 4))),
        _const("w3", rng.standard_normal((6, 5))), _const("w4", rng.standard_normal((5, 3))),
        _const("w5", rng.standard_normal((D, 2))),
        f"  %ln = layer_norm(%x, %g, %b) : f64[{T},{D}]",
        f"  %m1 = matmul(%ln, %w1) : f64[{T},6]", f"  %h1 = add(%m1, %c1) : f64[{T},6]",
        f"  %z = matmul(%ln, %w2) : f64[{T},4]",
        f"  %h3 = matmul(%h1, %w3) : f64[{T},5]",
        f"  %a = gelu(%h3) : f64[{T},5]",
        f"  %y = matmul(%a, %w4) : f64[{T},3]",
        f"  %v = matmul(%u, %w5) : f64[{T},2]", "}"])


def _spread(x: np.ndarray) -> float:
    """max/min over channels (last axis) of max|x|."""
    m = np.abs(x).reshape(-1, x.shape[-1]).max(0)
    return float(m.max() / m.min())


def _smooth_feeds(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((T, D)), "u": rng.standard_normal((T, D)) * np.exp(rng.uniform(-3, 3, D))}
            for _ in range(n)]


def test_smoothquant_is_exact_and_folds_where_it_can():
    rng = np.random.default_rng(10)
    text = _smooth_text(rng)
    log = PassLog("smoothquant")
    g, records = smooth_quant(ir.parse(text), as_calibration(_smooth_feeds(rng, 6)), log=log)
    ir.verify(g)
    assert not log.refusals
    targets = {r.at: r.what.split("goes into ")[1].split(";")[0] for r in records}
    assert targets == {"ln": "layer_norm %ln's γ, β", "h1": "the output columns of %w1 and the bias",
                       "a": "an inserted mul (%a = gelu(...) is not a linear with a constant weight)",
                       "u": "an inserted mul (%u is a graph input)"}
    assert g.op_counts().get("mul", 0) == 2
    _assert_same_function(ir.parse(text), g, _smooth_feeds(rng, 3))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smoothquant_scales_follow_the_formula_and_flatten_activations(alpha):
    """The linears' inputs after smoothing are X_j / s_j with s_j = max|X_j|^α / max_i|W_ij|^(1-α) (max over both
    linears reading the norm); for α >= 0.5 their per-channel max|x| gets flatter (α = 0 makes it follow the
    weights' spread instead)."""
    rng = np.random.default_rng(11)
    text = _smooth_text(rng)
    calib = _smooth_feeds(rng, 6)
    before = ir.parse(text)
    g, _ = smooth_quant(ir.parse(text), as_calibration(calib), alpha=alpha)
    x_old = _values(before, calib, "ln").reshape(-1, D)
    x_new = _values(g, calib, g.value("z").producer.inputs[0].name).reshape(-1, D)
    amax = np.abs(x_old).max(0)
    wmax = np.maximum(np.abs(before.constants["w1"].const).max(1), np.abs(before.constants["w2"].const).max(1))
    s = np.maximum(amax ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-5)
    np.testing.assert_allclose(x_new, x_old / s, rtol=1e-12, atol=1e-15)
    ratio_before, ratio_after = _spread(x_old), _spread(x_new)
    u_before, u_after = _spread(_values(before, calib, "u")), _spread(_values(g, calib, "u.smoothed"))
    print(f"α={alpha}: max/min of per-channel max|x| {ratio_before:.3g} -> {ratio_after:.3g} (norm output), "
          f"{u_before:.3g} -> {u_after:.3g} (graph input)")
    if alpha >= 0.5:
        assert ratio_after < ratio_before / 2 and u_after < u_before / 2
    if alpha == 1.0:  # all of the spread goes into the weights
        assert u_after == pytest.approx(1.0) and ratio_after == pytest.approx(1.0)


def test_smoothquant_refuses_a_shared_weight():
    rng = np.random.default_rng(12)
    text = "\n".join([f"graph @g(%x: f64[{T},{D}], %u: f64[{T},{D}]) -> (%y, %v) {{",
                      _const("w", rng.standard_normal((D, D))),
                      f"  %y = matmul(%x, %w) : f64[{T},{D}]", f"  %v = matmul(%u, %w) : f64[{T},{D}]", "}"])
    g = ir.parse(text)
    res = run_pipeline_report(g, "smoothquant{samples=2}")
    assert str(res.graph) == str(ir.parse(text))
    assert [r.at for r in res.refusals] == ["x", "u"]
    assert "weight %w of matmul %y is also read by matmul %v (operand 1), outside the linears that read %x" \
        in res.refusals[0].reason


def test_repq_then_smoothquant_pipeline_is_exact():
    rng = np.random.default_rng(13)
    g = ir.parse(_smooth_text(rng))
    feeds = _smooth_feeds(rng, 1)[0]
    res = run_pipeline_report(g, "repq{samples=4},smoothquant{samples=4,alpha=0.6}",
                              Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    assert [len(r.log.rewrites) for r in res.records] == [1, 4]


# ====================================================================== log-√2 softmax quantizer


def _attention_text(dtype: str = "f64", t: int = 6, extra_output: bool = False, batch: int = 2) -> str:
    """A = softmax(s) read by A·V (and, with ``extra_output``, by the graph outputs)."""
    outs = "%o, %p" if extra_output else "%o"
    return "\n".join([f"graph @att(%s: {dtype}[{batch},{t},{t}], %v: {dtype}[{batch},{t},4]) -> ({outs}) {{",
                      f"  %p = softmax(%s) {{axis=-1}} : {dtype}[{batch},{t},{t}]",
                      f"  %o = matmul(%p, %v) : {dtype}[{batch},{t},4]", "}"])


def _logits(rng: np.random.Generator, n: int, t: int, sigma: float, dtype=np.float64,
            batch: int = 2) -> list[np.ndarray]:
    return [(rng.standard_normal((batch, t, t)) * sigma).astype(dtype) for _ in range(n)]


def _numpy_log2(a: np.ndarray, delta: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The formula of passes-math.md §3, directly: codes (clamped) and â (0 where the code is >= 2^b)."""
    with np.errstate(divide="ignore"):
        c = np.round(-2 * np.log2(a / delta))
    q = np.clip(c, 0, 2 ** bits - 1)
    return q, np.where(c >= 2 ** bits, 0.0, 2.0 ** (-np.ceil(q / 2)) * np.where(q % 2 == 1, math.sqrt(2), 1) * delta)


def _delta_by_mse(values: np.ndarray, bits: int) -> float:
    cands = [*np.quantile(values, [0.999, 0.9999, 0.99999]), 1.0]
    return min(cands, key=lambda d: np.mean((_numpy_log2(values, d, bits)[1] - values) ** 2))


@pytest.mark.parametrize("bits", [8, 4])
def test_log2_codes_match_the_formula(bits):
    """Codes and â of the inserted ops equal the formula on new data, with masked (-inf) logits giving exact
    zeros and logits 300 below the row max (codes >= 2^b) mapped to 0; Δ is the MSE-best candidate."""
    rng = np.random.default_rng(20)
    calib = [{"s": s, "v": rng.standard_normal((2, 6, 4))} for s in _logits(rng, 4, 6, 3.0)]
    log = PassLog("log2-softmax")
    g, (rec,) = log2_softmax(ir.parse(_attention_text()), as_calibration(calib), bits=bits, log=log)
    ir.verify(g)
    assert rec.skip == ("p.log2q",) and g.value("o").producer.inputs[0].name == "p.log2q"
    values = np.concatenate([ir.interpret(ir.parse(_attention_text()), c, keep_all=True)["p"].ravel()
                             for c in calib])
    delta = float(g.constants["p.log2q.delta"].const)
    assert delta == _delta_by_mse(values, bits)
    s = _logits(rng, 1, 6, 3.0)[0]
    s[0, 0, :3] = -np.inf
    s[1, 2, 1] = s[1, 2].max() - 300.0
    env = ir.interpret(g, {"s": s, "v": rng.standard_normal((2, 6, 4))}, keep_all=True)
    q, a_hat = _numpy_log2(env["p"], delta, bits)
    np.testing.assert_array_equal(env["p.log2q.code"], q)
    np.testing.assert_allclose(env["p.log2q"], a_hat, rtol=1e-15, atol=0)
    assert np.all(env["p.log2q"][0, 0, :3] == 0) and env["p.log2q"][1, 2, 1] == 0 and env["p"][1, 2, 1] > 0


def test_log2_keeps_float_softmax_for_other_readers():
    rng = np.random.default_rng(21)
    calib = [{"s": s, "v": rng.standard_normal((2, 6, 4))} for s in _logits(rng, 2, 6, 1.0)]
    g, (rec,) = log2_softmax(ir.parse(_attention_text(extra_output=True)), as_calibration(calib))
    assert [v.name for v in g.outputs] == ["o", "p"] and g.outputs[1].producer.op == "softmax"
    assert rec.linears == ("o",)


def _uniform(a: np.ndarray, hi: float, bits: int) -> np.ndarray:
    s = hi / (2 ** bits - 1)
    return np.clip(np.rint(a / s), 0, 2 ** bits - 1) * s


@pytest.mark.parametrize("bits,t,sigma,uniform_hi", [
    (8, 197, 0.5, "one"),  # ViT-length rows, every weight far below 1: the [0, 1] uniform grid is too coarse
    (4, 197, 2.0, "max"),  # peaked rows: most weights fall below half a uniform step of the calibrated maximum
])
def test_log2_beats_a_uniform_quantizer_on_small_weights(bits, t, sigma, uniform_hi):
    """MSE of â vs a uniform quantizer on [0, 1] (or on [0, calibrated max]) with the same bits, on new rows.
    (At 8 bits a max-calibrated uniform quantizer has the lower MSE on all the softmax rows measured.)"""
    rng = np.random.default_rng(22)
    calib, test = ([{"s": s, "v": np.zeros((1, t, 4))} for s in _logits(rng, 4, t, sigma, batch=1)]
                   for _ in range(2))
    g, _ = log2_softmax(ir.parse(_attention_text(t=t, batch=1)), as_calibration(calib), bits=bits)
    hi = 1.0 if uniform_hi == "one" else max(float(ir.interpret(g, c, keep_all=True)["p"].max()) for c in calib)
    mse_log = mse_uni = 0.0
    for f in test:
        env = ir.interpret(g, f, keep_all=True)
        mse_log += float(np.mean((env["p.log2q"] - env["p"]) ** 2))
        mse_uni += float(np.mean((_uniform(env["p"], hi, bits) - env["p"]) ** 2))
    print(f"{bits} bits, T={t}, σ={sigma}: MSE log-√2 {mse_log / 4:.3g}, uniform [0, {uniform_hi}] {mse_uni / 4:.3g}")
    assert mse_log < mse_uni / 2


def test_log2_lowers_to_onnx_and_runs_in_onnxruntime():
    rng = np.random.default_rng(23)
    calib = [{"s": s, "v": rng.standard_normal((2, 6, 4)).astype(np.float32)}
             for s in _logits(rng, 3, 6, 3.0, np.float32)]
    g, _ = log2_softmax(ir.parse(_attention_text("f32")), as_calibration(calib))
    model = lower_to_onnx(g)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for f in [{"s": s, "v": rng.standard_normal((2, 6, 4)).astype(np.float32)}
              for s in _logits(rng, 3, 6, 3.0, np.float32)]:
        f["s"][0, 1, 2] = -np.inf
        (got,) = sess.run(None, f)
        want = ir.interpret(g, f)["o"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_log2_refuses_non_finite_calibration():
    calib = as_calibration([{"s": np.full((2, 6, 6), np.nan), "v": np.zeros((2, 6, 4))}])
    g = ir.parse(_attention_text())
    before = str(g)
    log = PassLog("log2-softmax")
    g, records = log2_softmax(g, calib, log=log)
    assert str(g) == before and not records
    assert [(r.at, r.reason) for r in log.refusals] == [
        ("p", "%p is not finite on the calibration set (NaN or Inf): no scale can be computed from it")]


# ====================================================================== end to end


@pytest.mark.slow
def test_zoo_vit_end_to_end():
    """The zoo ViT (test_norm's: d=16, two layers, float64, weights perturbed): repq then smoothquant are exact
    under the pass manager's per-pass check; every layer_norm is reparameterized (the head's through its token
    gather); the log-√2 quantizer on both softmaxes lowers to ONNX and onnxruntime agrees with the interpreter."""
    from .test_norm import _as_f32, _small  # imports torch: only here

    g, feeds = _small("vit")  # cached and shared: clone before rewriting
    rng = np.random.default_rng(30)
    calls: list[tuple[int, int]] = []
    res = run_pipeline_report(g.clone(), "repq{samples=4},smoothquant{samples=4}",
                              Instruments(check_each_pass=True, check_inputs=feeds, check_tolerance=F64))
    norms = [n.output.name for n in g.nodes if n.op == "layer_norm"]
    assert sorted(at for at, _ in res.records[0].log.rewrites) == sorted(norms) and len(norms) == 5
    assert not res.records[0].log.refusals and not res.records[1].log.refusals
    calib = as_calibration([{"x": rng.standard_normal((1, 3, 8, 8))} for _ in range(4)])
    _, records = repq(g.clone(), calib, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    head = next(r for r in records if len(r.fixed) == 2)
    assert {g.value(n).producer.op for n in head.fixed} == {"layer_norm", "gather"}
    calib32 = as_calibration([{"x": s["x"].astype(np.float32)} for s in calib.samples])
    lg, records = log2_softmax(_as_f32(g), calib32)  # onnxruntime has no float64 Conv
    assert len(records) == 2
    sess = ort.InferenceSession(lower_to_onnx(lg).SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ir.interpret(lg, {"x": x})["y"], rtol=1e-4, atol=1e-5)
