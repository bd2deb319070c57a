"""kiln.quantize (passes/quantize.py): options, calibration checks, the error report, the sensitivity fallback.

The report's numbers are checked against SQNRs the tests compute themselves
in float64 from the interpreter's outputs of the float and the quantized
graphs; a layer "alone" against numpy's quantization of that layer's float
input with the scale and zero point the quantized graph stores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from kiln import ir
from kiln.ir.interpret import interpret
from kiln.passes.calibrate import CalibrationError
from kiln.passes.quantize import (
    QuantizeError,
    QuantizeOptions,
    QuantReport,
    check_calibration,
    quantize,
    quantized_layers,
    sqnr_db,
)

RNG = np.random.default_rng(7)
MLP_CONSTS = {"W1": (RNG.standard_normal((8, 16)) / 3).astype(np.float32),
              "b1": RNG.standard_normal(16).astype(np.float32),
              "W2": (RNG.standard_normal((16, 4)) / 4).astype(np.float32)}
MLP = """graph @mlp(%x: f32[N,8]) -> (%y) {
  %W1 = const f32[8,16] dense<elided>
  %b1 = const f32[16] dense<elided>
  %W2 = const f32[16,4] dense<elided>
  %h0 = matmul(%x, %W1) : f32[N,16]
  %h = add(%h0, %b1) : f32[N,16]
  %r = relu(%h) : f32[N,16]
  %y = matmul(%r, %W2) : f32[N,4]
}
"""

D = 8
ATTN_CONSTS = {**{k: (RNG.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for k in ("Wq", "Wk", "Wv", "Wo")},
               "g": RNG.uniform(0.5, 2.0, D).astype(np.float32), "b": RNG.standard_normal(D).astype(np.float32)}
ATTN = """graph @attn(%x: f32[N,4,8]) -> (%y) {
  %g = const f32[8] dense<elided>
  %b = const f32[8] dense<elided>
  %Wq = const f32[8,8] dense<elided>
  %Wk = const f32[8,8] dense<elided>
  %Wv = const f32[8,8] dense<elided>
  %Wo = const f32[8,8] dense<elided>
  %ln = layer_norm(%x, %g, %b) {axis=-1, epsilon=1e-5} : f32[N,4,8]
  %q = matmul(%ln, %Wq) : f32[N,4,8]
  %k = matmul(%ln, %Wk) : f32[N,4,8]
  %v = matmul(%ln, %Wv) : f32[N,4,8]
  %kt = transpose(%k) {perm=[0, 2, 1]} : f32[N,8,4]
  %s = matmul(%q, %kt) : f32[N,4,4]
  %a = softmax(%s) {axis=-1} : f32[N,4,4]
  %o = matmul(%a, %v) : f32[N,4,8]
  %y = matmul(%o, %Wo) : f32[N,4,8]
}
"""


def mlp() -> ir.Graph:
    return ir.verify(ir.parse(MLP, constants=MLP_CONSTS))


def attn() -> ir.Graph:
    return ir.verify(ir.parse(ATTN, constants=ATTN_CONSTS))


def mlp_calib(n: int = 12, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(n)]


def attn_calib(n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    spread = np.linspace(0.2, 5.0, D)  # uneven channels: what RepQ-ViT and SmoothQuant are for
    return [{"x": (rng.standard_normal((2, 4, D)) * spread).astype(np.float32)} for _ in range(n)]


def own_sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """SQNR in dB over all samples, computed here from scratch in float64."""
    r = np.concatenate([np.ravel(a).astype(np.float64) for a in ref])
    g = np.concatenate([np.ravel(a).astype(np.float64) for a in got])
    noise = float(np.sum((g - r) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(r ** 2)) / noise)


def values(graph: ir.Graph, calib: list[dict[str, np.ndarray]], name: str) -> list[np.ndarray]:
    return [interpret(graph, s, keep_all=True)[name] for s in calib]


def layer(report: QuantReport, key: str):
    return next(e for e in report.layers if e.key == key)


# ====================================================================== options


@pytest.mark.parametrize("kwargs,words", [
    ({"scheme": "w3a8"}, ["scheme", "'w3a8'", "w8a8, w4a16, w8a16"]),
    ({"method": "kl"}, ["method", "minmax"]),
    ({"reparam": "gptq"}, ["reparam", "repq"]),
    ({"weights": "gptq"}, ["weights='gptq'", "w4a16"]),
    ({"scheme": "w4a16", "reparam": "repq"}, ["reparam='repq'", "w4a16"]),
    ({"scheme": "w8a16", "method": "entropy"}, ["method='entropy'", "does not quantize activations"]),
    ({"samples": -1}, ["samples", "-1"]),
    ({"group_size": -1}, ["group_size", "-1"]),
    ({"alpha": 1.5}, ["alpha", "1.5"]),
    ({"error_budget": float("nan")}, ["error_budget", "nan"]),
])
def test_bad_options_are_errors_that_name_the_option(kwargs, words):
    with pytest.raises(QuantizeError) as e:
        QuantizeOptions(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_options_are_frozen_and_exclude_becomes_a_tuple():
    o = QuantizeOptions(exclude=["a", "b"])
    assert o.exclude == ("a", "b") and QuantizeOptions(exclude="a").exclude == ("a",)
    with pytest.raises(AttributeError):
        o.scheme = "w4a16"  # type: ignore[misc]


def test_unknown_override_lists_the_options():
    with pytest.raises(QuantizeError, match="options are scheme, method"):
        quantize(mlp(), mlp_calib(), bits=4)


# ====================================================================== calibration data


def test_missing_input_is_named():
    with pytest.raises(CalibrationError, match=r"lacks model input\(s\) \['x'\]"):
        quantize(mlp(), [{"image": np.zeros((4, 8), np.float32)}])


def test_wrong_shape_names_input_expected_and_got():
    with pytest.raises(CalibrationError) as e:
        quantize(mlp(), [{"x": np.zeros((4, 7), np.float32)}])
    msg = str(e.value)
    assert "'x'" in msg and "f32[N,8]" in msg and "[4, 7]" in msg and "sample '0'" in msg


def test_wrong_dtype_is_named():
    with pytest.raises(CalibrationError, match=r"input 'x' expected dtype f32, got <U1"):
        check_calibration(mlp(), kiln.passes.calibrate.as_calibration([{"x": np.full((4, 8), "a")}]))


def test_samples_are_drawn_with_the_seed_and_ids_are_kept():
    calib = mlp_calib(20)
    a = quantize(mlp(), calib, samples=5, seed=3)
    b = quantize(mlp(), calib, samples=5, seed=3)
    c = quantize(mlp(), calib, samples=5, seed=4)
    assert a.sample_ids == b.sample_ids and len(a.sample_ids) == 5 and a.seed == 3
    assert a.sample_ids != c.sample_ids
    assert set(a.sample_ids) <= {str(i) for i in range(20)}
    assert a.report.to_json()["calibration"] == {"seed": 3, "samples": list(a.sample_ids)}
    assert len(quantize(mlp(), calib, samples=0).sample_ids) == 20


# ====================================================================== the report


def test_w8a8_report_matches_sqnr_computed_here():
    g, calib = mlp(), mlp_calib()
    res = quantize(g, calib, samples=0)
    q = res.graph
    assert [n.output.name for n in quantized_layers(q)] == ["h0", "y"]
    rep = res.report
    h = layer(rep, "h0")
    assert h.output == "h" and h.node == "h0"  # compared after its int32 bias
    assert h.scheme == "w8a8 act per-tensor asym / weight per-channel sym"
    for name, err in (("h", h), ("y", layer(rep, "y"))):
        want = own_sqnr(values(g, calib, name), values(q, calib, name))
        assert err.sqnr_db == pytest.approx(want, abs=1e-9)
        assert err.rel_mse == pytest.approx(10 ** (-want / 10), rel=1e-9)
    assert rep.outputs[0].name == "y"
    assert rep.outputs[0].sqnr_db == pytest.approx(own_sqnr(values(g, calib, "y"), values(q, calib, "y")), abs=1e-9)
    assert 30 < rep.output_sqnr_db < 60  # int8 on a 2-layer MLP: neither exact nor broken


def test_alone_sqnr_is_the_layer_on_float_inputs():
    """Layer 1 alone: relu output quantized with the stored scale/zero point (numpy), times the int8 weight."""
    g, calib = mlp(), mlp_calib()
    res = quantize(g, calib, samples=0)
    q = res.graph
    first = layer(res.report, "h0")
    assert first.alone_sqnr_db == pytest.approx(first.sqnr_db, abs=1e-9)  # its input is the model input
    c = {k: v.const for k, v in q.constants.items()}
    sx, zx = float(c["r.scale"]), int(c["r.zero_point"])
    wq = c["W2.q"].astype(np.float64) * c["W2.scale"].astype(np.float64)
    refs, gots = [], []
    for s in calib:
        r = interpret(g, s, keep_all=True)["r"]
        codes = np.clip(np.rint(r.astype(np.float32) / np.float32(sx)) + zx, -128, 127)
        refs.append(r @ MLP_CONSTS["W2"].astype(np.float64))
        gots.append(((codes - zx) * sx) @ wq)
    assert layer(res.report, "y").alone_sqnr_db == pytest.approx(own_sqnr(refs, gots), abs=1e-3)


def test_attention_layers_and_activation_matmuls():
    res = quantize(attn(), attn_calib(), samples=0)
    rep = res.report
    assert [e.key for e in rep.layers] == ["q", "k", "v", "s", "o", "y"]
    assert layer(rep, "s").scheme == "a8a8 act x act per-tensor asym"
    assert all(math.isfinite(e.sqnr_db) and e.alone_sqnr_db is not None for e in rep.layers)
    assert [e.key for e in rep.worst()] == [e.key for e in sorted(rep.layers, key=lambda e: e.sqnr_db)[:5]]


def test_json_is_strict_and_highlights_the_five_worst():
    rep = quantize(attn(), attn_calib(), samples=0).report
    text = json.dumps(rep.to_json(), allow_nan=False)
    data = json.loads(text)
    worst = sorted(data["layers"], key=lambda e: e["sqnr_db"])[:5]
    assert data["worst"] == [e["key"] for e in worst]
    assert sum(e["worst"] for e in data["layers"]) == 5
    assert data["options"]["scheme"] == "w8a8" and data["error_budget_db"] is None
    assert {"node", "key", "output", "op", "scheme", "sqnr_db", "rel_mse", "alone_sqnr_db", "reparam"} <= \
        set(data["layers"][0])


def test_rich_tables_render(capsys):
    from rich.console import Console

    rep = quantize(attn(), attn_calib(), samples=0, error_budget=1000.0).report
    console = Console(width=200, force_terminal=False)
    for t in rep.tables():
        console.print(t)
    out = capsys.readouterr().out
    assert "SQNR dB" in out and "alone dB" in out and "model outputs" in out
    assert "kept in float" in out and "error budget 1000 dB" in out


@pytest.mark.parametrize("reparam,softmax", [("repq", "log2"), ("repq", "uniform"), ("smoothquant", "uniform")])
def test_reparam_is_reported_per_layer_and_outputs_stay_close(reparam, softmax):
    g, calib = attn(), attn_calib()
    res = quantize(g, calib, samples=0, reparam=reparam, softmax=softmax)
    rep = res.report
    assert rep.reparam and all(isinstance(r, str) for r in rep.reparam)
    kind = "repq" if reparam == "repq" else "smoothquant"
    touched = [e for e in rep.layers if e.reparam.startswith(kind)]
    assert {"q", "k", "v"} <= {e.key.removesuffix("_matmul") for e in touched}
    want = own_sqnr(values(g, calib, "y"), values(res.graph, calib, "y"))
    assert rep.outputs[0].sqnr_db == pytest.approx(want, abs=1e-9)
    assert want > 20
    if softmax == "log2":  # A.V reads the log-sqrt2 quantized softmax, which insert-qdq leaves alone
        assert layer(rep, "o").scheme == "act x act: log-sqrt2 a8 x a8 per-tensor asym"
    else:
        assert "log-sqrt2" not in layer(rep, "o").scheme


def test_progress_follows_every_calibration_stage():
    seen: dict[str, list[tuple[int, int]]] = {}
    quantize(attn(), attn_calib(5), samples=0, reparam="smoothquant",
             progress=lambda stage, done, total: seen.setdefault(stage, []).append((done, total)))
    assert {"smoothquant", "calibrating ranges", "float model", "quantized model"} <= set(seen)
    for stage in ("float model", "quantized model"):
        assert seen[stage] == [(i, 5) for i in range(1, 6)]


def test_weight_only_report_uses_the_quantizer_records():
    g, calib = mlp(), mlp_calib()
    res = quantize(g, calib, scheme="w4a16", weights="gptq", group_size=4, samples=0)
    rep = res.report
    assert [e.scheme for e in rep.layers] == ["w4 g4 asym gptq"] * 2
    first = layer(rep, "h0")
    # its input is the model's own: alone (the record's ||X(W^-W)||/||XW||) is its error in the model
    assert first.alone_sqnr_db == pytest.approx(first.sqnr_db, abs=1e-3)
    assert rep.outputs[0].sqnr_db == pytest.approx(own_sqnr(values(g, calib, "y"), values(res.graph, calib, "y")),
                                                   abs=1e-9)
    assert not any(n.op == "quantize" for n in res.graph.nodes)  # activations stay float


def test_exclude_keeps_a_layer_float():
    res = quantize(mlp(), mlp_calib(), exclude=("y",))
    assert [e.key for e in res.report.layers] == ["h0"]
    assert any("y" in n and "exclu" in n for n in res.report.notes)


def test_exclude_by_pattern_and_by_bias_output_also_after_repq():
    assert [e.key for e in quantize(mlp(), mlp_calib(), exclude=("h*",)).report.layers] == ["y"]
    assert [e.key for e in quantize(mlp(), mlp_calib(), exclude=("h",)).report.layers] == ["y"]
    keys = [e.key for e in quantize(attn(), attn_calib(), reparam="repq", exclude=("q",)).report.layers]
    assert "q" not in keys and "q_matmul" not in keys and "k_matmul" in keys


def test_exclude_that_matches_nothing_lists_the_layers():
    with pytest.raises(QuantizeError, match=r"exclude 'fc9' matches no matmul/conv layer of @mlp; its layers: h0, y$"):
        quantize(mlp(), mlp_calib(), exclude=("fc9",))


# ====================================================================== fallback


def test_fallback_keeps_worst_alone_layers_float_until_the_budget_is_met():
    g, calib = attn(), attn_calib()
    base = quantize(g, calib, samples=0).report
    budget = base.output_sqnr_db + 4.0
    res = quantize(g, calib, samples=0, error_budget=budget)
    rep = res.report
    assert rep.budget_met is True and rep.kept_float
    ranked = [e.key for e in sorted(base.layers, key=lambda e: e.alone_sqnr_db)]
    assert [k.layer for k in rep.kept_float] == ranked[:len(rep.kept_float)]
    got = own_sqnr(values(g, calib, "y"), values(res.graph, calib, "y"))
    assert got >= budget and rep.output_sqnr_db == pytest.approx(got, abs=1e-9)
    if len(rep.kept_float) > 1:  # one at a time: without the last one the budget was not met
        assert rep.kept_float[-2].output_sqnr_after < budget
    float_layers = {k.layer for k in rep.kept_float}
    assert float_layers.isdisjoint(n.output.name for n in quantized_layers(res.graph))
    excluded = quantize(g, calib, samples=0, exclude=tuple(float_layers))  # calibrated afresh: the same graph
    assert ir.print_graph(excluded.graph) == ir.print_graph(res.graph)
    assert all(budget > k.output_sqnr_before and "budget" in k.reason for k in rep.kept_float)


def test_unreachable_budget_keeps_every_layer_float_and_says_what_remains():
    res = quantize(attn(), attn_calib(), samples=0, reparam="repq", softmax="log2", error_budget=200.0)
    rep = res.report
    assert rep.budget_met is False and len(rep.kept_float) == 6 and not quantized_layers(res.graph)
    assert any("a.log2q" in n and "log-sqrt2" in n for n in rep.notes)
    assert json.loads(json.dumps(rep.to_json(), allow_nan=False))["budget_met"] is False


def test_budget_already_met_changes_nothing():
    g, calib = mlp(), mlp_calib()
    plain = quantize(g, calib)
    res = quantize(g, calib, error_budget=10.0)
    assert res.report.budget_met is True and not res.report.kept_float
    assert ir.print_graph(res.graph) == ir.print_graph(plain.graph)


# ====================================================================== sqnr


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-6, 1e6), st.floats(1e-6, 1e6))
def test_sqnr_db_is_the_log_ratio(signal, noise):
    assert sqnr_db(signal, noise) == pytest.approx(10 * math.log10(signal / noise))
    assert sqnr_db(signal, 0.0) == math.inf


# ====================================================================== models in other forms


def test_quantize_accepts_an_onnx_path_and_kiln_exports_it(tmp_path):
    import onnx
    from onnx import helper

    from ..frontend.conftest import make_model, vi

    m = make_model([helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                    helper.make_node("Relu", ["m"], ["y"], name="relu")],
                   [vi("x", np.float32, ["N", 8])], [vi("y", np.float32, ["N", 16])], {"W": MLP_CONSTS["W1"]})
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    res = kiln.quantize(str(path), mlp_calib())
    assert res.report.layers[0].node == "mm" and res.report.layers[0].key == "m"


@pytest.mark.slow
def test_compile_quantizes_a_torch_module_and_records_the_calibration():
    import torch

    from kiln.passes.calibrate import as_calibration, draw

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    calib = mlp_calib(6)
    art = kiln.compile(net, (torch.zeros(4, 8),), quantize=QuantizeOptions(samples=4, seed=1), calibration=calib)
    cal = art.manifest["calibration"]
    assert cal["scheme"] == "w8a8" and cal["method"] == "minmax" and cal["seed"] == 1
    assert cal["samples"] == list(draw(as_calibration(calib), 4, 1).ids)
    assert art.manifest["inputs"][0]["name"] == "x"  # exported with the calibration arrays' names
    rep = art.stats["quantize"]
    assert len(rep.layers) == 2 and cal["output_sqnr_db"] == pytest.approx(rep.output_sqnr_db)
    x = calib[5]["x"]
    got = art.load().run({"x": x})
    (name,) = got
    assert "qmatmul(" in art.ir_text or "qconv(" in art.ir_text  # what the artifact's model.ir shows
    want = interpret(art.graph, {"x": x})[name]  # the compiled graph, fused integer ops included
    np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert own_sqnr([ref], [got[name]]) > 30


def test_compile_needs_calibration_when_quantizing():
    from kiln.compiler import CompileError

    with pytest.raises(CompileError, match="needs calibration data"):
        kiln.compile(mlp(), quantize=True)
    with pytest.raises(CompileError, match="quantize is off"):
        kiln.compile(mlp(), calibration=mlp_calib())
