"""The signal ops compiled end to end: kiln has no signal kernels of its own (DFT and STFT lift to
gather/transpose/reshape and a matmul with a constant DFT matrix, windows to constants), so these
check that the lifted graphs compile and match the interpreter and numpy's FFT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import kiln
from kiln import ir
from kiln.codegen.tolerance import assert_close
from kiln.frontend import lift

RNG = np.random.default_rng(9)


def _model(node: onnx.NodeProto, x: np.ndarray, inits: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "sig", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _compiled_vs_interpreter(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    want = ir.interpret(lift(model), {"x": x})
    got = kiln.compile(model, example_inputs={"x": x}).load().run({"x": x})
    (name,) = want
    assert_close(got["y"], want[name], what="compiled vs interpreter")
    return got["y"]


@pytest.mark.slow
def test_rfft_compiles():
    x = RNG.standard_normal((3, 32, 1)).astype(np.float32)
    y = _compiled_vs_interpreter(_model(helper.make_node("DFT", ["x"], ["y"], axis=1, onesided=1), x, {}, 17), x)
    f = np.fft.rfft(x[..., 0].astype(np.float64), axis=1)
    np.testing.assert_allclose(y[..., 0] + 1j * y[..., 1], f, atol=1e-4)


@pytest.mark.slow
def test_stft_compiles():
    x = RNG.standard_normal((2, 96, 1)).astype(np.float32)
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)).astype(np.float32)
    node = helper.make_node("STFT", ["x", "step", "w"], ["y"])
    y = _compiled_vs_interpreter(_model(node, x, {"step": np.array(8, np.int64), "w": win}, 17), x)
    assert y.shape == (2, 11, 9, 2)
