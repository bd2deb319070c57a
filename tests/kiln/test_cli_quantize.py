"""``kiln quantize`` end to end: a tiny ONNX model and a directory of .npz -> QDQ ONNX that ONNX Runtime runs,
and the JSON report; ``kiln compile --calib`` records the calibration in the manifest."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.cli import main
from kiln.frontend import lift
from kiln.ir.interpret import interpret

RNG = np.random.default_rng(11)
W1 = (RNG.standard_normal((6, 12)) / 2).astype(np.float32)
B1 = RNG.standard_normal(12).astype(np.float32)
W2 = (RNG.standard_normal((12, 3)) / 3).astype(np.float32)


def tiny_model(path) -> str:
    """x[N,6] -> Gemm(W1, b1) -> Relu -> MatMul(W2) -> y[N,3]."""
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in
             (("W1", W1), ("b1", B1), ("W2", W2))]
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
                           helper.make_node("Relu", ["h"], ["r"], name="relu"),
                           helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.save(m, path)
    return str(path)


def calib_dir(path, n: int = 6, name: str = "x", shape=(4, 6)) -> str:
    path.mkdir()
    for i in range(n):
        np.savez(path / f"s{i:02d}.npz", **{name: RNG.standard_normal(shape).astype(np.float32)})
    return str(path)


def ort_session(path: str) -> ort.InferenceSession:
    """ORT without graph optimizations: its fused int8 kernels are not exact on CPUs without VNNI."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def test_quantize_writes_qdq_onnx_that_onnxruntime_runs_and_a_json_report(tmp_path, capsys):
    model = tiny_model(tmp_path / "tiny.onnx")
    calib = calib_dir(tmp_path / "calib")
    out, report = tmp_path / "tiny.q.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", calib, "-o", str(out), "--report", str(report),
                 "--samples", "4", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "SQNR dB" in printed and "fc1" in printed and f"wrote {out}" in printed
    assert not (tmp_path / "tiny.q.onnx.tmp").exists()

    q = onnx.load(out)
    onnx.checker.check_model(q)
    assert q.opset_import[0].version == 21
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") >= 5  # 2 acts, 2 weights, 1 bias

    data = json.loads(report.read_text())
    drawn = data["calibration"]["samples"]
    x = np.concatenate([np.load(tmp_path / "calib" / f"{i}.npz")["x"] for i in drawn])  # within the ranges
    (got,) = ort_session(str(out)).run(None, {"x": x})
    want_q = interpret(lift(q), {"x": x})["y"]
    np.testing.assert_allclose(got, want_q, rtol=1e-5, atol=1e-5)
    want_f = np.maximum(x @ W1 + B1, 0) @ W2
    assert np.max(np.abs(got - want_f)) < 0.05 * np.max(np.abs(want_f))

    assert data["calibration"]["seed"] == 2 and len(drawn) == 4 and set(drawn) <= {f"s{i:02d}" for i in range(6)}
    assert [e["node"] for e in data["layers"]] == ["fc1", "fc2"]
    assert data["outputs"][0]["name"] == "y" and 25 < data["outputs"][0]["sqnr_db"] < 80
    assert all(e["sqnr_db"] is not None and math.isfinite(e["sqnr_db"]) for e in data["layers"])


def test_weight_only_and_error_budget_flags(tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx")
    calib = calib_dir(tmp_path / "calib")
    out, report = tmp_path / "w4.onnx", tmp_path / "r.json"
    assert main(["quantize", model, "--calib", calib, "-o", str(out), "--scheme", "w4a16", "--weights", "gptq",
                 "--group-size", "3", "--error-budget", "200", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["error_budget_db"] == 200 and data["budget_met"] is True
    assert {k["node"] for k in data["kept_float"]} == {"fc1", "fc2"}  # 200 dB: only float meets it
    assert data["outputs"][0]["sqnr_db"] is None  # exact
    (got,) = ort_session(str(out)).run(None, {"x": np.ones((2, 6), np.float32)})
    np.testing.assert_allclose(got, np.maximum(np.ones((2, 6)) @ W1 + B1, 0) @ W2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,words", [
    (lambda p: calib_dir(p, name="image"), ["lacks model input(s) ['x']", "['image']"]),
    (lambda p: calib_dir(p, shape=(4, 5)), ["input 'x' expected shape f32[N,6]", "got [4, 5]"]),
    (lambda p: str(p / "nowhere"), ["does not exist"]),
])
def test_bad_calibration_data_is_one_line_naming_the_input(tmp_path, capsys, make, words):
    model = tiny_model(tmp_path / "tiny.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", model, "--calib", make(tmp_path / "calib"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert "Traceback" not in err and not out.exists()


def test_bad_option_combination_is_one_line(tmp_path, capsys):
    model = tiny_model(tmp_path / "tiny.onnx")
    assert main(["quantize", model, "--calib", calib_dir(tmp_path / "c"), "-o", str(tmp_path / "q.onnx"),
                 "--weights", "awq"]) == 1
    assert "weights='awq' applies to the weight-only schemes" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_with_calib_quantizes_and_records_it_in_the_manifest(tmp_path, capsys):
    from kiln.runtime.artifact import read_artifact

    model = tiny_model(tmp_path / "tiny.onnx")
    calib = calib_dir(tmp_path / "calib")
    out = tmp_path / "tiny.kiln"
    assert main(["compile", model, "--calib", calib, "--samples", "3", "--seed", "5", "--shape", "N=2",
                 "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "w8a8 (minmax, reparam none), calibration seed 5, 3 samples" in printed
    cal = read_artifact(str(out)).manifest["calibration"]
    assert cal["scheme"] == "w8a8" and cal["method"] == "minmax" and cal["seed"] == 5
    assert len(cal["samples"]) == 3 and set(cal["samples"]) <= {f"s{i:02d}" for i in range(6)}
    assert json.loads((tmp_path / "r.json").read_text())["calibration"]["samples"] == cal["samples"]


def test_compile_quantization_flags_without_calib_are_an_error(tmp_path, capsys):
    model = tiny_model(tmp_path / "tiny.onnx")
    for flags in (["--scheme", "w4a16"], ["--seed", "3"], ["--report", "r.json"]):
        assert main(["compile", model, *flags, "-o", str(tmp_path / "t.kiln")]) == 1
        assert "need --calib" in capsys.readouterr().err
    assert not (tmp_path / "t.kiln").exists()
