"""Lifting the signal ops: DFT and STFT as a matmul with a constant DFT matrix, the window
functions and MelWeightMatrix folded to constants, and the refusals of run-time sizes.

Lifted models are interpreted and compared with onnxruntime on the original model.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln import ir
from kiln.frontend import lift
from kiln.frontend.errors import FrontendError
from kiln.frontend.lift_signal import dft_matrix, window

from .conftest import assert_close, make_model, ort_run, vi
from .test_lift_nn_extra import one_node

F32, I64 = np.float32, np.int64
RNG = np.random.default_rng(5)


def run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-4,
             atol: float = 1e-4) -> ir.Graph:
    graph = lift(model)
    got = ir.interpret(graph, feeds)[graph.outputs[0].name]
    assert_close(got, ort_run(model, feeds)[0], rtol=rtol, atol=atol)
    return graph


# ------------------------------------------------------------------ DFT

def test_dft_matrix_is_numpy_fft():
    x = RNG.standard_normal((3, 8))
    m = dft_matrix(8, 1, 8, inverse=False, onesided=False)
    got = (x @ m).reshape(3, 8, 2)
    want = np.fft.fft(x, axis=1)
    np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], want, atol=1e-12)


@pytest.mark.parametrize("shape,attrs,length", [
    ((2, 8, 1), {}, None),
    ((2, 8, 2), {}, None),
    ((2, 8, 1), {"onesided": 1}, None),
    ((2, 9, 2), {"inverse": 1}, None),
    ((1, 5, 3, 2), {"axis": 2}, None),
    ((2, 8, 1), {}, 12),
    ((2, 8, 2), {}, 5),
])
def test_dft_opset17(shape, attrs, length):
    x = RNG.standard_normal(shape).astype(F32)
    inits = {} if length is None else {"n": np.array(length, I64)}
    model = one_node("DFT", {"x": x}, inits, opset=17, **attrs)
    g = run_both(model, {"x": x})
    assert "matmul" in {n.op for n in g.nodes}


@pytest.mark.parametrize("shape,axis,attrs", [
    ((2, 8, 1), -2, {"onesided": 1}),
    ((2, 3, 6, 2), 1, {"inverse": 1}),
    ((2, 5, 2), 1, {"inverse": 1, "onesided": 1}),
])
def test_dft_opset20_constant_axis(shape, axis, attrs):
    x = RNG.standard_normal(shape).astype(F32)
    model = one_node("DFT", {"x": x}, {"axis": np.array(axis, I64)}, opset=20, inputs=["x", "", "axis"], **attrs)
    g = lift(model)
    got = ir.interpret(g, {"x": x})[g.outputs[0].name]
    xc = x[..., 0] + (1j * x[..., 1] if shape[-1] == 2 else 0)
    a = axis % len(shape)
    if attrs.get("inverse") and attrs.get("onesided"):
        want = np.fft.irfft(xc, n=2 * (shape[a] - 1), axis=a)[..., None]
    else:
        f = np.fft.ifft(xc, axis=a) if attrs.get("inverse") else np.fft.fft(xc, axis=a)
        if attrs.get("onesided"):
            f = np.take(f, range(shape[a] // 2 + 1), axis=a)
        want = np.stack([f.real, f.imag], -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dft_run_time_axis_is_refused():
    x = RNG.standard_normal((2, 8, 1)).astype(F32)
    node = helper.make_node("DFT", ["x", "", "axis"], ["y"])
    model = make_model([node], [vi("x", F32, [2, 8, 1]), vi("axis", I64, [])], [vi("y", F32, None)], opset=20,
                       ir_version=10)
    with pytest.raises(FrontendError, match="axis"):
        lift(model)
    g = lift(model, input_values={"axis": np.array(1, I64)})
    got = ir.interpret(g, {"x": x})[g.outputs[0].name]
    assert got.shape == (2, 8, 2)


# ------------------------------------------------------------------ STFT

@pytest.mark.parametrize("c,win,frame_length,onesided", [
    (1, None, 16, 1), (1, "hann", None, 1), (2, None, 8, 0), (1, "hann", 16, 1),
])
def test_stft(c, win, frame_length, onesided):
    x = RNG.standard_normal((2, 64, c)).astype(F32)
    inits = {"step": np.array(6, I64)}
    names = ["x", "step", "", ""]
    if win:
        inits["w"] = window("hann", 16, True).astype(F32)
        names[2] = "w"
    if frame_length:
        inits["fl"] = np.array(frame_length, I64)
        names[3] = "fl"
    model = one_node("STFT", {"x": x}, inits, opset=17, inputs=names, onesided=onesided)
    g = run_both(model, {"x": x}, atol=1e-4)
    assert "matmul" in {n.op for n in g.nodes}


def test_stft_window_must_match_frame_length():
    x = RNG.standard_normal((1, 40, 1)).astype(F32)
    inits = {"step": np.array(5, I64), "w": np.ones(10, F32), "fl": np.array(8, I64)}
    with pytest.raises(FrontendError, match="ONNX requires them equal"):
        lift(one_node("STFT", {"x": x}, inits, opset=17, inputs=["x", "step", "w", "fl"]))


def test_stft_run_time_window():
    x = RNG.standard_normal((1, 40, 1)).astype(F32)
    w = window("hamming", 10, False).astype(F32)
    model = one_node("STFT", {"x": x, "w": w}, {"step": np.array(5, I64)}, opset=17, inputs=["x", "step", "w"])
    g = run_both(model, {"x": x, "w": w})
    assert "mul" in {n.op for n in g.nodes}


# ------------------------------------------------------------------ windows and mel

@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("periodic", [0, 1])
def test_windows_fold_to_constants(op, periodic):
    model = one_node(op, {}, {"n": np.array(10, np.int32)}, opset=17, periodic=periodic)
    g = lift(model)
    assert not g.nodes or all(n.op == "identity" for n in g.nodes)
    got = ir.interpret(g, {})[g.outputs[0].name]
    (want,) = ort_run(model, {})
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_window_output_datatype():
    model = one_node("HannWindow", {}, {"n": np.array(8, I64)}, opset=17, output_datatype=onnx.TensorProto.DOUBLE,
                     out_type=onnx.TensorProto.DOUBLE)
    g = lift(model)
    got = ir.interpret(g, {})[g.outputs[0].name]
    np.testing.assert_allclose(got, 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(8) / 8), atol=1e-15)


def test_window_run_time_size_is_refused():
    node = helper.make_node("HannWindow", ["n"], ["y"])
    model = make_model([node], [vi("n", np.int32, [])], [vi("y", F32, None)], opset=17, ir_version=10)
    with pytest.raises(FrontendError, match="size"):
        lift(model)


def test_mel_weight_matrix():
    inits = {"m": np.array(8, I64), "n": np.array(32, I64), "r": np.array(16000, I64),
             "lo": np.array(20.0, F32), "hi": np.array(8000.0, F32)}
    model = one_node("MelWeightMatrix", {}, inits, opset=17)
    g = lift(model)
    got = ir.interpret(g, {})[g.outputs[0].name]
    (want,) = ort_run(model, {})
    assert got.shape == (17, 8)
    assert_close(got, want, rtol=1e-6, atol=1e-7)
