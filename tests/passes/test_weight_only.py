"""weight-only (passes/weight_only.py): RTN, GPTQ, AWQ on [in, out] matmul weights, stored as blocked int4/int8.

RTN codes and scales are checked against the formula written out here group by
group; the dequantized weight against kiln's ``dequantize`` reference and
onnxruntime's DequantizeLinear (opset 21, ORT_DISABLE_ALL) on the lowered
graph; GPTQ against an unbatched re-statement of the algorithm and against RTN
(a diagonal Hessian feeds no error forward, so the codes are RTN's exactly);
GPTQ and AWQ must beat RTN on hold-out inputs drawn like the calibration ones;
AWQ's folding must be exact in float64; refusals leave the graph unchanged.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import ir
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
from kiln.passes.weight_only import (
    QWeight,
    awq_fold,
    awq_scales,
    dequant,
    gptq,
    quantize_weights,
    rtn,
)

STORAGE = {(4, False): ml_dtypes.uint4, (4, True): ml_dtypes.int4, (8, False): np.uint8, (8, True): np.int8}


# ====================================================================== helpers


def formula_rtn(w: np.ndarray, bits: int, g: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """passes-math.md §4 written out per group and output channel: codes [K, N], scale, zero point."""
    k, n = w.shape
    bounds = [(a, min(a + g, k)) for a in range(0, k, g)] if g else [(0, k)]
    scale = np.zeros((len(bounds), n), np.float32)
    zero = np.zeros((len(bounds), n))
    q = np.zeros((k, n))
    for j, (a, b) in enumerate(bounds):
        for c in range(n):
            col = w[a:b, c].astype(np.float64)
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = np.float32(np.abs(col).max() / qmax)
                s = np.float32(1) if s == 0 else s
                q[a:b, c] = np.clip(np.rint(col / np.float64(s)), -qmax, qmax)
            else:
                lo, hi = min(col.min(), 0.0), max(col.max(), 0.0)
                s = np.float32((hi - lo) / (2 ** bits - 1))
                s = np.float32(1) if s == 0 else s
                zero[j, c] = np.clip(np.rint(-lo / np.float64(s)), 0, 2 ** bits - 1)
                q[a:b, c] = np.clip(np.rint(col / np.float64(s)) + zero[j, c], 0, 2 ** bits - 1)
            scale[j, c] = s
    if not g:
        scale, zero = scale[0], zero[0]
    return q, scale, None if symmetric else zero


def linear_graph(w: np.ndarray, tokens: int = 6) -> Graph:
    """y = x · W for a constant W[K, N] (x: [2, tokens, K])."""
    k, n = w.shape
    dt = {np.float32: "f32", np.float16: "f16", np.float64: "f64"}[w.dtype.type]
    return ir.parse(f"""graph @lin(%x: {dt}[2,{tokens},{k}]) -> (%y) {{
      %W = const {dt}[{k},{n}] dense<elided>
      %y = matmul(%x, %W) : {dt}[2,{tokens},{n}]
    }}""", constants={"W": w})


def correlated(rng: np.random.Generator, n: int, k: int, mix: np.ndarray) -> np.ndarray:
    """n rows of strongly correlated inputs: standard normals through a fixed mixing matrix."""
    return rng.standard_normal((n, k)) @ mix


def samples(x: np.ndarray, tokens: int) -> CalibrationSet:
    """Rows of x as calibration samples of shape [2, tokens, K]."""
    per = 2 * tokens
    return as_calibration([{"x": x[i:i + per].reshape(2, tokens, -1).astype(np.float32)}
                           for i in range(0, len(x) - per + 1, per)])


def output_error(x: np.ndarray, w: np.ndarray, wq: np.ndarray) -> float:
    """‖X(Ŵ − W)‖ / ‖XW‖ in float64."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return float(np.linalg.norm(x64 @ (np.asarray(wq, np.float64) - w64)) / np.linalg.norm(x64 @ w64))


def graph_output_error(ref: Graph, quant: Graph, calib: CalibrationSet) -> float:
    """Relative error of the quantized graph's output over the samples (interpreter, float64 sums)."""
    num = den = 0.0
    for s in calib.samples:
        want = ir.interpret(ref, s)["y"].astype(np.float64)
        got = ir.interpret(quant, s)["y"].astype(np.float64)
        num += float(np.sum((got - want) ** 2))
        den += float(np.sum(want ** 2))
    return float(np.sqrt(num / den))


def mixing(rng: np.random.Generator, k: int) -> np.ndarray:
    """A mixing matrix with a decaying spectrum: the inputs live mostly in a few directions."""
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (u * (0.8 ** np.arange(k))) @ u.T + 0.05 * rng.standard_normal((k, k))


# ====================================================================== RTN


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
@pytest.mark.parametrize("k,g", [(64, 16), (40, 16), (64, 0), (48, 48)])
def test_rtn_codes_and_scales_follow_the_formula(bits, symmetric, k, g):
    rng = np.random.default_rng(bits * 100 + k + g)
    w = (rng.standard_normal((k, 12)) * rng.uniform(0.1, 3, 12)).astype(np.float32)
    w[:, 3] = np.abs(w[:, 3])  # a channel with no negative weight: the range must still include 0
    w[:g or k, 5] = 0  # an all-zero group: scale 1, codes at the zero point
    qw = rtn(w, bits=bits, group_size=g, symmetric=symmetric)
    q, scale, zero = formula_rtn(w, bits, g, symmetric)
    assert qw.q.dtype == STORAGE[bits, symmetric] and qw.q.shape == (k, 12)
    assert (qw.axis, qw.block_size) == ((0, g) if g else (1, 0))
    assert qw.scale.dtype == np.float32 and qw.scale.shape == scale.shape
    np.testing.assert_array_equal(qw.q.astype(np.int64), q.astype(np.int64))
    np.testing.assert_array_equal(qw.scale, scale)
    if symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == STORAGE[bits, symmetric]
        np.testing.assert_array_equal(qw.zero_point.astype(np.int64), zero.astype(np.int64))
    assert qw.bits == bits and qw.symmetric == symmetric
    # reconstruction error: at most half a step inside the range
    step = np.repeat(scale, g, axis=0)[:k] if g else scale[None, :]
    assert np.all(np.abs(dequant(qw).astype(np.float64) - w) <= step * 0.5 + 1e-6)


def test_rtn_rounds_half_to_even():
    # group [0, 3.75]: scale 0.25 exactly, zero 0; 0.125, 0.375, 0.625 are ties 0.5, 1.5, 2.5 -> 0, 2, 2
    w = np.array([[0.0], [3.75], [0.125], [0.375], [0.625]], np.float32)
    qw = rtn(w, bits=4, group_size=0)
    assert qw.scale[0] == np.float32(0.25) and int(qw.zero_point[0]) == 0
    assert qw.q[:, 0].astype(int).tolist() == [0, 15, 0, 2, 2]


def test_rtn_rejects_bad_arguments():
    w = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn(w, bits=3)
    with pytest.raises(ValueError, match="group_size must be >= 0"):
        rtn(w, group_size=-1)
    with pytest.raises(ValueError, match="2-D float"):
        rtn(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        rtn(np.full((4, 2), np.nan, np.float32))


@pytest.mark.parametrize("bits,symmetric,k,g", [(4, False, 64, 16), (4, True, 40, 16), (8, False, 32, 0),
                                                (8, True, 48, 32), (4, False, 24, 0)])
def test_dequant_matches_kiln_dequantize_and_onnxruntime(bits, symmetric, k, g):
    rng = np.random.default_rng(k + g + bits)
    w = rng.standard_normal((k, 8)).astype(np.float32)
    graph, layers = quantize_weights(linear_graph(w), None, bits=bits, group_size=g, symmetric=symmetric)
    ir.verify(graph)
    assert [(lay.weight, lay.output_error) for lay in layers] == [("W", None)]
    wq = graph.value("W.q")
    assert wq.type.dtype == {(4, False): "u4", (4, True): "i4", (8, False): "u8", (8, True): "i8"}[bits, symmetric]
    dq_node = graph.value("W.dq").producer
    assert dq_node.op == "dequantize" and dq_node.attrs == {"axis": 0 if g else 1, "block_size": g}
    assert "W" not in graph.constants
    zp = graph.constants.get("W.zp")
    qw = QWeight(wq.const, graph.value("W.scale").const, None if zp is None else zp.const, dq_node.attrs["axis"], g)
    np.testing.assert_array_equal(qw.q.astype(int), rtn(w, bits=bits, group_size=g, symmetric=symmetric).q.astype(int))

    x = rng.standard_normal((2, 6, k)).astype(np.float32)
    graph.set_outputs([graph.value("y"), graph.value("W.dq")])
    env = ir.interpret(graph, {"x": x})
    np.testing.assert_array_equal(env["W.dq"], dequant(qw))  # kiln's dequantize reference, bit for bit

    model = lower_to_onnx(graph, opset=21)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y_ort, dq_ort = sess.run(["y", "W.dq"], {"x": x})
    np.testing.assert_array_equal(dq_ort, dequant(qw))  # DequantizeLinear rounds (q − z)·s once, like kiln
    np.testing.assert_allclose(y_ort, env["y"], rtol=1e-5, atol=1e-5)


def test_f16_weight_keeps_its_dtype():
    w = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float16)
    graph, _ = quantize_weights(linear_graph(w), None, group_size=8)
    ir.verify(graph)
    assert graph.value("W.scale").type.dtype == "f16" and graph.value("W.dq").type.dtype == "f16"


# ====================================================================== GPTQ


def naive_gptq(w: np.ndarray, h: np.ndarray, bits: int, g: int, damp: float = 0.01) -> np.ndarray:
    """GPTQ without lazy batches (every error fed to all later columns at once); dequantized W[K, N]."""
    wt = w.T.astype(np.float64).copy()
    k = wt.shape[1]
    h = h.astype(np.float64).copy()
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros_like(wt)
    for i in range(k):
        if i % g == 0:
            grp = wt[:, i:i + g]
            lo, hi = np.minimum(grp.min(axis=1), 0), np.maximum(grp.max(axis=1), 0)
            s = ((hi - lo) / (2 ** bits - 1)).astype(np.float32).astype(np.float64)
            z = np.rint(-lo / s)
        qhat = (np.clip(np.rint(wt[:, i] / s) + z, 0, 2 ** bits - 1) - z) * s
        out[:, i] = qhat
        err = (wt[:, i] - qhat) / u[i, i]
        wt[:, i:] -= np.outer(err, u[i, i:])
    return out.T


@pytest.mark.parametrize("block", [1, 5, 16, 128])
def test_gptq_lazy_batches_equal_the_unbatched_algorithm(block):
    rng = np.random.default_rng(7)
    k = 48
    x = correlated(rng, 256, k, mixing(rng, k))
    w = rng.standard_normal((k, 10))
    h = 2 / len(x) * x.T @ x
    qw = gptq(w, h, bits=4, group_size=12, block=block)
    rows = np.repeat(qw.scale, 12, axis=0).astype(np.float64), np.repeat(qw.zero_point, 12, axis=0).astype(np.float64)
    got = (qw.q.astype(np.float64) - rows[1]) * rows[0]  # before dequant's cast to f32
    np.testing.assert_allclose(got, naive_gptq(w, h, 4, 12), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("g", [32, 0], ids=["g32", "per-channel"])
def test_gptq_beats_rtn_on_correlated_hold_out_inputs(g):
    rng = np.random.default_rng(11)
    k, n, tokens = 96, 48, 8
    mix = mixing(rng, k)
    calib = samples(correlated(rng, 32 * 2 * tokens, k, mix), tokens)
    hold_out = samples(correlated(rng, 8 * 2 * tokens, k, mix), tokens)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    ref = linear_graph(w, tokens)
    errs = {}
    for method in ("rtn", "gptq"):
        graph, (layer,) = quantize_weights(ref, calib, method=method, bits=4, group_size=g)
        ir.verify(graph)
        assert layer.method == method and layer.group_size == g
        assert layer.output_error == pytest.approx(graph_output_error(ref, graph, calib), rel=1e-3)
        errs[method] = graph_output_error(ref, graph, hold_out)
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), k=st.integers(4, 40), g=st.sampled_from([0, 4, 8, 16]),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), act_order=st.booleans(),
       block=st.sampled_from([3, 128]))
def test_gptq_with_a_diagonal_hessian_is_rtn(seed, k, g, bits, symmetric, act_order, block):
    # U = chol(H⁻¹)ᵀ is diagonal, so no error is fed forward and every code is RTN's, exactly
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, 5)) * rng.uniform(0.01, 10)
    h = np.diag(rng.uniform(0.01, 100, k))
    a = gptq(w, h, bits=bits, group_size=g, symmetric=symmetric, act_order=act_order, block=block)
    b = rtn(w, bits=bits, group_size=g, symmetric=symmetric)
    np.testing.assert_array_equal(a.q.astype(int), b.q.astype(int))
    np.testing.assert_array_equal(a.scale, b.scale)
    assert (a.zero_point is None) == (b.zero_point is None)
    if a.zero_point is not None:
        np.testing.assert_array_equal(a.zero_point.astype(int), b.zero_point.astype(int))


def test_gptq_zeroes_dead_inputs_and_keeps_groups_contiguous_with_act_order():
    rng = np.random.default_rng(3)
    k = 32
    x = correlated(rng, 200, k, mixing(rng, k))
    x[:, [4, 17]] = 0  # inputs that are always zero: diag(H) = 0
    h = 2 / len(x) * x.T @ x
    w = rng.standard_normal((k, 6))
    for act_order in (False, True):
        qw = gptq(w, h, group_size=8, act_order=act_order)
        assert qw.scale.shape == (4, 6) and qw.block_size == 8 and qw.axis == 0
        np.testing.assert_array_equal(dequant(qw)[[4, 17]], 0)
        # static groups: each stored block's scale is the RTN scale of that original block
        if act_order:
            np.testing.assert_array_equal(qw.scale, rtn(np.where(np.diag(h)[:, None] == 0, 0, w),
                                                         group_size=8).scale)
        assert output_error(x, w, dequant(qw)) < output_error(x, w, dequant(rtn(w, group_size=8)))


def test_gptq_rejects_a_hessian_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\[8, 8\] matrix"):
        gptq(np.ones((8, 2)), np.eye(4))


# ====================================================================== AWQ

FOLD_TEXT = """graph @blk(%x: f64[2,5,16]) -> (%y, %z) {
  %g = const f64[16] dense<elided>
  %be = const f64[16] dense<elided>
  %Wq = const f64[16,16] dense<elided>
  %Wk = const f64[16,16] dense<elided>
  %Wv = const f64[16,16] dense<elided>
  %bv = const f64[16] dense<elided>
  %Wo = const f64[16,16] dense<elided>
  %W1 = const f64[16,16] dense<elided>
  %W2 = const f64[16,16] dense<elided>
  %n = layer_norm(%x, %g, %be) : f64[2,5,16]
  %q = matmul(%n, %Wq) : f64[2,5,16]
  %k = matmul(%n, %Wk) : f64[2,5,16]
  %v0 = matmul(%n, %Wv) : f64[2,5,16]
  %v = add(%v0, %bv) : f64[2,5,16]
  %o = matmul(%v, %Wo) : f64[2,5,16]
  %qk = mul(%q, %k) : f64[2,5,16]
  %r = add(%qk, %o) : f64[2,5,16]
  %h = matmul(%r, %W1) : f64[2,5,16]
  %a = gelu(%h) : f64[2,5,16]
  %y = matmul(%a, %W2) : f64[2,5,16]
  %z = add(%r, %y) : f64[2,5,16]
}"""


def fold_graph(rng: np.random.Generator) -> Graph:
    names = ["g", "be", "Wq", "Wk", "Wv", "bv", "Wo", "W1", "W2"]
    return ir.parse(FOLD_TEXT, constants={n: rng.standard_normal((16, 16) if n.startswith("W") else 16)
                                          for n in names})


@pytest.mark.parametrize("seed", range(3))
def test_awq_folding_is_exact_in_float64(seed):
    rng = np.random.default_rng(seed)
    graph = fold_graph(rng)
    before = str(graph)
    scales = {name: np.exp(rng.uniform(-3, 3, 16)) for name in ("n", "v", "r", "a")}
    folded = awq_fold(graph, scales)
    ir.verify(folded)
    assert str(graph) == before  # the caller's graph is untouched
    ops = folded.op_counts()
    # n -> layer_norm γ, β; v -> Wv's columns and bv; r (also read by the residual add) and a (gelu): a mul
    assert ops["mul"] == 3 and {n.inputs[0].name for n in folded.nodes if n.op == "mul"} >= {"r", "a"}
    assert folded.value("o").producer.inputs[0].name == "v"
    feeds = {"x": rng.standard_normal((2, 5, 16))}
    want, got = ir.interpret(graph, feeds), ir.interpret(folded, feeds)
    for name in ("y", "z"):
        assert np.abs(got[name] - want[name]).max() <= 1e-12 * np.abs(want[name]).max()


def test_awq_fold_into_a_bias_free_linear_and_rms_norm():
    rng = np.random.default_rng(5)
    graph = ir.parse("""graph @b(%x: f64[3,8]) -> (%y) {
      %g = const f64[8] dense<elided>
      %A = const f64[8,8] dense<elided>
      %B = const f64[8,4] dense<elided>
      %n = rms_norm(%x, %g) : f64[3,8]
      %h = matmul(%n, %A) : f64[3,8]
      %y = matmul(%h, %B) : f64[3,4]
    }""", constants={"g": rng.standard_normal(8), "A": rng.standard_normal((8, 8)),
                     "B": rng.standard_normal((8, 4))})
    folded = awq_fold(graph, {"n": np.exp(rng.uniform(-2, 2, 8)), "h": np.exp(rng.uniform(-2, 2, 8))})
    assert "mul" not in folded.op_counts()
    x = rng.standard_normal((3, 8))
    want, got = ir.interpret(graph, {"x": x})["y"], ir.interpret(folded, {"x": x})["y"]
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_awq_on_a_transformer_block_folds_where_it_can_and_wins_each_search():
    rng = np.random.default_rng(8)
    f64 = fold_graph(rng)
    graph = ir.parse(FOLD_TEXT.replace("f64", "f32"),
                     constants={n: v.const.astype(np.float32) for n, v in f64.constants.items()})
    calib = as_calibration([{"x": rng.standard_normal((2, 5, 16)).astype(np.float32)} for _ in range(8)])
    results = {m: quantize_weights(graph, calib, method=m, group_size=8) for m in ("rtn", "awq")}
    quant, layers = results["awq"]
    ir.verify(quant)
    where = {lay.weight: lay.awq.split(", ", 1)[1] for lay in layers}
    assert where == {"Wq": "1/s folded into layer_norm %n's scale and bias",
                     "Wk": "1/s folded into layer_norm %n's scale and bias",
                     "Wv": "1/s folded into layer_norm %n's scale and bias",
                     "Wo": "1/s folded into the output columns of %Wv and bias %bv",
                     "W1": "1/s applied by an inserted mul %r.awq (it has other readers)",
                     "W2": "1/s applied by an inserted mul %a.awq (it is computed by gelu, which cannot absorb it)"}
    # each search includes r = 0 (RTN): per input, Σ ‖X ΔW‖² over its linears is at most RTN's
    envs = [ir.interpret(graph, s, keep_all=True) for s in calib.samples]
    reads = {"Wq": "n", "Wk": "n", "Wv": "n", "Wo": "v", "W1": "r", "W2": "a"}

    def group_loss(method: str, x: str) -> float:
        total = 0.0
        for lay in results[method][1]:
            if reads[lay.weight] == x:
                w = graph.constants[lay.weight].const.astype(np.float64)
                total += lay.output_error ** 2 * sum(float(np.sum((e[x].astype(np.float64) @ w) ** 2)) for e in envs)
        return total
    for x in ("n", "v", "r", "a"):
        assert group_loss("awq", x) <= group_loss("rtn", x) * (1 + 1e-6), x


def salient(rng: np.random.Generator, n: int, k: int, channels: np.ndarray) -> np.ndarray:
    """Inputs whose few ``channels`` are 25x larger than the rest (LLM-style activation outliers)."""
    x = rng.standard_normal((n, k))
    x[:, channels] *= 25
    return x


def test_awq_beats_rtn_on_inputs_with_salient_channels():
    rng = np.random.default_rng(21)
    k, n, tokens = 64, 32, 8
    channels = rng.choice(k, 3, replace=False)
    graph = ir.parse(f"""graph @ln(%x: f32[2,{tokens},{k}]) -> (%y) {{
      %g = const f32[{k}] dense<elided>
      %W = const f32[{k},{n}] dense<elided>
      %n = layer_norm(%x, %g) : f32[2,{tokens},{k}]
      %y = matmul(%n, %W) : f32[2,{tokens},{n}]
    }}""", constants={"g": np.where(np.isin(np.arange(k), channels), 25.0, 1.0).astype(np.float32),
                      "W": rng.standard_normal((k, n)).astype(np.float32)})
    calib = samples(rng.standard_normal((16 * 2 * tokens, k)), tokens)
    hold_out = samples(rng.standard_normal((8 * 2 * tokens, k)), tokens)
    errs = {}
    for method in ("rtn", "awq"):
        log = PassLog("weight-only")
        quant, (layer,) = quantize_weights(graph, calib, method=method, group_size=32, log=log)
        ir.verify(quant)
        assert layer.output_error == pytest.approx(graph_output_error(graph, quant, calib), rel=1e-3)
        errs[method] = graph_output_error(graph, quant, hold_out)
    assert "layer_norm %n's scale" in layer.awq and "mul" not in quant.op_counts()
    assert errs["awq"] < 0.8 * errs["rtn"], errs


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 16), g=st.sampled_from([0, 8, 16]), bits=st.sampled_from([4, 8]))
def test_awq_never_loses_to_rtn_on_its_calibration_inputs(seed, g, bits):
    rng = np.random.default_rng(seed)
    x = salient(rng, 64, 16, rng.choice(16, 2, replace=False))
    ws = [rng.standard_normal((16, 6)), rng.standard_normal((16, 3))]
    s = awq_scales(ws, x, bits=bits, group_size=g)
    assert s.shape == (16,) and np.all(s > 0)

    def loss(scale: np.ndarray) -> float:
        return sum(float(np.sum((x @ (w - dequant(rtn(scale[:, None] * w, bits=bits, group_size=g))
                                      .astype(np.float64) / scale[:, None])) ** 2)) for w in ws)
    assert loss(s) <= loss(np.ones(16)) * (1 + 1e-9)


def test_awq_fold_rejects_a_value_no_linear_reads():
    graph = fold_graph(np.random.default_rng(0))
    with pytest.raises(ValueError, match="no matmul .* reads %q"):
        awq_fold(graph, {"q": np.ones(16)})
    with pytest.raises(ValueError, match=r"finite and positive with shape \[16\]"):
        awq_fold(graph, {"n": -np.ones(16)})


# ====================================================================== the graph rewrite and the pass


REFUSALS_TEXT = """graph @r(%x: f32[4,32], %xt: f32[32,4], %win: f32[32,8]) -> (%a, %b, %c, %d, %e, %f, %h) {
  %Wgood = const f32[32,8] dense<elided>
  %Wshared = const f32[32,32] dense<elided>
  %Wleft = const f32[32,32] dense<elided>
  %Wsmall = const f32[8,8] dense<elided>
  %W3 = const f32[2,32,8] dense<elided>
  %Wskip = const f32[32,8] dense<elided>
  %a = matmul(%x, %Wgood) : f32[4,8]
  %b = matmul(%x, %win) : f32[4,8]
  %c0 = matmul(%x, %Wshared) : f32[4,32]
  %c = relu(%Wshared) : f32[32,32]
  %d = matmul(%a, %Wsmall) : f32[4,8]
  %e = matmul(%x, %W3) : f32[2,4,8]
  %f = matmul(%x, %Wskip) : f32[4,8]
  %h0 = matmul(%x, %Wleft) : f32[4,32]
  %h = matmul(%Wleft, %xt) : f32[32,4]
}"""


def refusal_graph() -> Graph:
    rng = np.random.default_rng(0)
    shapes = {"Wgood": (32, 8), "Wshared": (32, 32), "Wleft": (32, 32), "Wsmall": (8, 8), "W3": (2, 32, 8),
              "Wskip": (32, 8)}
    return ir.parse(REFUSALS_TEXT, constants={n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})


def test_refusals_are_logged_and_leave_those_matmuls_alone():
    graph = refusal_graph()
    before = str(graph)
    res = run_pipeline_report(graph, "weight-only{group_size=16,exclude=Wsk*}", Instruments(verify=True))
    assert str(graph) == before
    reasons = {r.at: r.reason for r in res.refusals}
    assert reasons == {
        "b": "weight %win is not a constant (a graph input)",
        "c0": "weight %Wshared is shared: it also feeds relu %c, which would read the dequantized weight",
        "d": "group_size 16 is larger than K=8 (the input dim of %Wsmall); use group_size <= 8, "
             "or 0 for per output channel",
        "e": "weight %W3 is f32[2,32,8]; only a 2-D [in, out] weight is quantized",
        "f": "excluded by pattern 'Wsk*'",
        "h0": "weight %Wleft is shared: it also feeds left operand of matmul %h, which would read the "
              "dequantized weight",
        "h": "weight %xt is not a constant (a graph input)",
    }
    out = res.graph
    assert [r[0] for r in res.records[0].log.rewrites] == ["a"]
    assert out.value("a").producer.inputs[1].name == "Wgood.dq"
    for name in ("Wshared", "Wleft", "Wsmall", "W3", "Wskip"):
        assert name in out.constants
    again = run_pipeline_report(out, "weight-only{group_size=16}")
    assert {r.at: r.reason for r in again.refusals}["a"] == \
        "weight %Wgood.dq is already quantized (computed by dequantize)"
    assert [r[0] for r in again.records[0].log.rewrites] == ["f"]  # no exclude this time


def test_f64_weights_are_refused():
    w = np.ones((8, 2))
    res = run_pipeline_report(linear_graph(w), "weight-only{group_size=0}")
    assert [(r.at, r.reason) for r in res.refusals] == [
        ("y", "weight %W is f64; weight-only quantization takes f16, bf16, f32")]


def test_pass_options_and_pipeline():
    (p,) = parse_pipeline("weight-only{bits=8,method=gptq,group_size=0,symmetric=true,samples=4,seed=3}")
    assert str(p) == "weight-only{bits=8,method=gptq,group_size=0,symmetric=True,samples=4,seed=3}"
    for bad, msg in [("bits=3", "bits must be one of"), ("method=hqq", "method must be one of"),
                     ("group_size=-8", "group_size must be >= 0")]:
        with pytest.raises(PipelineError, match=msg):
            parse_pipeline(f"weight-only{{{bad}}}")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_pass_calibrates_on_synthetic_inputs_and_shared_weights(method):
    # one weight read by two matmuls: GPTQ sums both inputs' Hessians; AWQ leaves it to RTN and says so
    rng = np.random.default_rng(2)
    graph = ir.parse("""graph @s(%x: f32[3,16], %u: f32[3,16]) -> (%y, %z) {
      %W = const f32[16,8] dense<elided>
      %y = matmul(%x, %W) : f32[3,8]
      %z = matmul(%u, %W) : f32[3,8]
    }""", constants={"W": rng.standard_normal((16, 8)).astype(np.float32)})
    res = run_pipeline_report(graph, f"weight-only{{method={method},group_size=8,samples=4}}")
    out = res.graph
    ir.verify(out)
    assert out.value("y").producer.inputs[1] is out.value("z").producer.inputs[1] is out.value("W.dq")
    if method == "awq":
        assert [(r.at, r.reason) for r in res.refusals] == [
            ("y", "AWQ: weight %W is read by 2 matmuls and AWQ scales one linear's rows; quantized by RTN "
                  "without scales")]
    else:
        assert not res.refusals


def test_quantize_weights_records_and_keeps_the_callers_graph():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    graph = linear_graph(w)
    before = str(graph)
    calib = samples(rng.standard_normal((4 * 12, 32)), 6)
    quant, (layer,) = quantize_weights(graph, calib, bits=8, group_size=16, method="rtn")
    assert str(graph) == before
    assert (layer.name, layer.weight, layer.outputs, layer.bits, layer.group_size, layer.method) == \
        ("y", "W", ("y",), 8, 16, "rtn")
    wq = ir.interpret(quant, {"x": calib.samples[0]["x"]}, keep_all=True)["W.dq"].astype(np.float64)
    assert layer.weight_error == pytest.approx(np.linalg.norm(wq - w) / np.linalg.norm(w.astype(np.float64)), rel=1e-9)
    assert layer.output_error == pytest.approx(graph_output_error(graph, quant, calib), rel=1e-3)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_weights(graph, None, method="gptq")
