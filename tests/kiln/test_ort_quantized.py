"""Models quantized by onnxruntime's quantization tool, lifted, interpreted and compiled by kiln.

Three small torch models (a conv-bn-relu-pool CNN with concat / leaky relu / residual add / softmax,
an MLP, a transformer encoder layer with residual adds), exported with the TorchScript exporter at
opset 17, quantized by onnxruntime 1.31 three ways: ``quantize_static`` in the QOperator format
(QLinearConv / QLinearMatMul and the com.microsoft ops of frontend/lift_contrib.py), in the QDQ
format, and ``quantize_dynamic`` (DynamicQuantizeLinear / MatMulInteger / ConvInteger). Reference:
onnxruntime with optimizations off (kiln.corpus.ort_outputs).

Tolerances: kiln's interpreter computes the same codes as onnxruntime, so its outputs agree to
float rounding of the float ops after the last dequantize (LayerNorm, the dynamic models'
float tails): ``INTERP``. The compiled kernels compute sums, exp and sigmoid in another order
or with other approximations, which may move a code by one where a value lies on a rounding
boundary; one code of an 8-bit activation moves the output by about one output quantization
step, i.e. about 1/256 of the output's range: ``COMPILED``.

The CNN has no sigmoid: a fused block sigmoid -> quantize of a non-trivial input (concat, another
requantize) inlines to hundreds of kilobytes of TIR and minutes of LLVM time (a codegen issue);
QLinearSigmoid's compiled kernel is checked on its own in tests/frontend/test_lift_contrib.py.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from functools import cache

import numpy as np
import onnx
import pytest
from onnx import helper

import kiln
from kiln import ir
from kiln.codegen.tolerance import Tolerance, assert_close
from kiln.corpus import ort_outputs
from kiln.frontend import lift

pytestmark = pytest.mark.slow

SEED = 3
INTERP = Tolerance(1e-5, 1e-6)
FORMATS = ("qoperator", "qdq", "dynamic")


def _cnn():
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
            self.c4, self.pool, self.fc = nn.Conv2d(16, 16, 1), nn.AvgPool2d(2), nn.Linear(16, 10)

        def forward(self, x):
            y = self.pool(torch.relu(self.b1(self.c1(x))))
            y = torch.cat([self.c2(y), self.c3(y)], 1)
            y = nn.functional.leaky_relu(self.c4(y), 0.1) + y
            y = nn.functional.adaptive_avg_pool2d(nn.functional.max_pool2d(y, 2), 1).flatten(1)
            return torch.softmax(self.fc(y), -1)

    return CNN(), (1, 3, 16, 16)


def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), (4, 32)


def _transformer():
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d: int = 32, heads: int = 4):
            super().__init__()
            self.heads, self.qkv, self.o = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.f1, self.f2 = nn.Linear(d, 64), nn.Linear(64, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
            y = self.n1(x + self.o((att @ v).transpose(1, 2).reshape(b, t, d)))
            return self.n2(y + self.f2(torch.relu(self.f1(y))))

    return Layer(), (1, 8, 32)


MODELS = {"cnn": _cnn, "mlp": _mlp, "transformer": _transformer}


@cache
def quantized(name: str, fmt: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Model ``name`` exported and quantized by onnxruntime in format ``fmt``, with a feed."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    torch.manual_seed(SEED)
    module, shape = MODELS[name]()
    module.eval()
    rng = np.random.default_rng(SEED)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(shape),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as f:
            f.write(buf.getvalue())
        if fmt == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        else:
            quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator if fmt == "qoperator"
                            else QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        model = onnx.load(dst)
    return model, {"x": np.random.default_rng(SEED + 1).standard_normal(shape).astype(np.float32)}


def _compiled_tolerance(model: onnx.ModelProto, want: np.ndarray) -> Tolerance:
    """One output quantization step: 1/256 of the output's range (plus f32 rounding)."""
    return Tolerance(1e-4, float(np.ptp(want)) / 256 + 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_interpreter_matches_onnxruntime(name, fmt):
    model, feeds = quantized(name, fmt)
    if fmt == "qoperator":
        assert any(n.domain == "com.microsoft" for n in model.graph.node) or name == "transformer"
    graph = lift(model)
    got = ir.interpret(graph, feeds)
    (want,) = ort_outputs(model, feeds)
    assert_close(got[graph.outputs[0].name], want, INTERP, what=f"{name} {fmt}")


# The quantized transformer layer takes 4-6 minutes of LLVM per kernel chain (fused quantize chains inline
# without sharing subexpressions: fuzz/FINDINGS.md); it runs in `make test-heavy`, not `make test`.
_HEAVY = {"transformer"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.heavy) if m in _HEAVY else m for m in MODELS])
def test_compiled_matches_onnxruntime(name, fmt):
    model, feeds = quantized(name, fmt)
    (want,) = ort_outputs(model, feeds)
    out = kiln.compile(model, example_inputs=feeds).load().run(feeds)
    assert_close(next(iter(out.values())), want, _compiled_tolerance(model, want), what=f"{name} {fmt}")


def test_qoperator_cnn_uses_the_contrib_ops():
    """The QOperator CNN exercises every com.microsoft op quantize_static emits for it."""
    model, _ = quantized("cnn", "qoperator")
    ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert ops >= {"QGemm", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearAdd", "QLinearLeakyRelu",
                   "QLinearConcat", "QLinearSoftmax"}, ops


def test_corpus_cnn_qoperator_compiles_and_matches():
    from kiln import corpus

    cm = corpus.build("cnn-qoperator")
    out = kiln.compile(cm.model, example_inputs=cm.feeds).load().run(cm.feeds)
    want = cm.reference[0]
    assert_close(next(iter(out.values())), want, _compiled_tolerance(cm.model, want), what="cnn-qoperator")


def _extras_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The contrib ops and forms the three models do not reach: QLinearWhere, a QGemm with an [M, N]
    bias (the int32 path) and one with a float output, channels-last pools, MatMulIntegerToFloat and
    DynamicQuantizeMatMul."""
    rng = np.random.default_rng(SEED)
    f32, u8, i8, ms = np.float32, np.uint8, np.int8, "com.microsoft"
    consts = {"s": np.array(0.05, f32), "z": np.array(120, u8), "s2": np.array(0.08, f32),
              "z2": np.array(130, u8), "w": rng.integers(-127, 128, (16, 6)).astype(i8),
              "ws": rng.uniform(0.002, 0.01, (6,)).astype(f32), "wz": np.zeros(6, i8),
              "bmn": rng.integers(-500, 500, (16, 6)).astype(np.int32), "bias": rng.standard_normal(6).astype(f32),
              "zero": np.array(0, f32), "shape": np.array([-1, 16], np.int64)}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),  # x [1, 4, 4, 16] read as NHWC
        helper.make_node("QLinearAveragePool", ["xq", "s", "z", "s2", "z2"], ["p"], domain=ms,
                         kernel_shape=[2, 2], channels_last=1),
        helper.make_node("QLinearGlobalAveragePool", ["p", "s2", "z2", "s", "z"], ["g"], domain=ms,
                         channels_last=1),
        helper.make_node("DequantizeLinear", ["g", "s", "z"], ["pooled"]),
        helper.make_node("Less", ["x", "zero"], ["neg"]),
        helper.make_node("Neg", ["x"], ["xneg"]),
        helper.make_node("QuantizeLinear", ["xneg", "s2", "z2"], ["nq"]),
        helper.make_node("QLinearWhere", ["neg", "xq", "s", "z", "nq", "s2", "z2", "s2", "z2"], ["wh"], domain=ms),
        helper.make_node("Reshape", ["wh", "shape"], ["a"]),
        helper.make_node("QGemm", ["a", "s2", "z2", "w", "ws", "wz", "bmn", "s", "z"], ["qg"], domain=ms),
        helper.make_node("DequantizeLinear", ["qg", "s", "z"], ["qgf"]),
        helper.make_node("QGemm", ["a", "s2", "z2", "w", "ws", "wz"], ["qf"], domain=ms),
        helper.make_node("MatMulIntegerToFloat", ["a", "w", "s2", "ws", "z2", "wz", "bias"], ["mf"], domain=ms),
        helper.make_node("Reshape", ["x", "shape"], ["x2"]),
        helper.make_node("DynamicQuantizeMatMul", ["x2", "w", "ws", "wz", "bias"], ["dm"], domain=ms),
        helper.make_node("Sum", ["qgf", "qf", "mf", "dm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "extras", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4, 16])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "pooled")],
        [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)],
                              ir_version=8)
    return model, {"x": rng.standard_normal((1, 4, 4, 16)).astype(f32)}


def test_extra_contrib_forms_interpreted_and_compiled():
    model, feeds = _extras_model()
    want = ort_outputs(model, feeds)
    graph = lift(model)
    got = ir.interpret(graph, feeds)
    for v, w in zip(graph.outputs, want):
        assert_close(got[v.name], w, INTERP, what=f"interpreted {v.name}")
    out = kiln.compile(model, example_inputs=feeds).load().run(feeds)
    for (k, g), w in zip(out.items(), want):
        assert_close(g, w, _compiled_tolerance(model, w), what=f"compiled {k}")
