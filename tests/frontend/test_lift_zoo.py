"""Lifting the example zoo (torch -> ONNX by dynamo at opset 18): canonical ops, numerics, lowering.

The expected number of each canonical op is read off the torch module (one
``layer_norm`` per nn.LayerNorm, one ``rms_norm`` per zoo.RMSNorm, one ``gelu``
per nn.GELU, one ``silu`` per SwiGLU block...). At opset 18 the exporter writes
LayerNormalization itself but decomposes GELU (erf or tanh form), RMSNorm and
SiLU, so those come from canonicalization; ``test_zoo_layer_norm_chains``
expands every LayerNormalization into the ReduceMean/Sub/Pow/Sqrt/Div chain
that exporters emit below opset 17 and checks that canonicalization finds them
all again.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from torch import nn

from kiln import ir, zoo
from kiln.frontend import lift, lower_to_onnx

from .conftest import assert_close, ort_run

pytestmark = pytest.mark.slow

NAMES = ["resnet", "gpt", "vit", "llama", "bert", "mlp"]


def expected_ops(module: nn.Module) -> Counter:
    counts: Counter = Counter()
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            counts["layer_norm"] += 1
        elif isinstance(m, zoo.RMSNorm):
            counts["rms_norm"] += 1
        elif isinstance(m, nn.GELU):
            counts["gelu"] += 1
        elif isinstance(m, zoo.SwiGLU):
            counts["silu"] += 1
        elif isinstance(m, nn.BatchNorm2d):
            counts["batch_norm"] += 1
        elif isinstance(m, nn.Conv2d):
            counts["conv"] += 1
    return counts


def _check_numerics(model: onnx.ModelProto, graph: ir.Graph, feeds: dict[str, np.ndarray]) -> None:
    want = ort_run(model, feeds)
    got = ir.interpret(graph, feeds)
    assert [v.name for v in graph.outputs] == [o.name for o in model.graph.output]
    for v, w in zip(graph.outputs, want):
        assert_close(got[v.name], w, rtol=1e-4, atol=1e-4)
    lowered = lower_to_onnx(graph)
    assert [o.name for o in lowered.graph.output] == [o.name for o in model.graph.output]
    for w, low in zip(want, ort_run(lowered, feeds)):
        assert_close(low, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model(name):
    model = zoo.onnx_model(name)
    module, example = zoo.get(name)
    graph = lift(model)
    counts = graph.op_counts()
    want = expected_ops(module)
    assert {op: counts.get(op, 0) for op in want} == dict(want)
    # the decomposed spellings are gone: no erf, sigmoid, sqrt or pow is left in any zoo model
    assert not {"erf", "sigmoid", "sqrt", "pow", "reciprocal", "identity"} & set(counts), counts
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, example)}
    _check_numerics(model, graph, feeds)


def expand_layer_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Every LayerNormalization replaced by the opset-13-era chain
    ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add (axis -1 only)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    n = 0
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            out.graph.node.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("axis", -1) == -1
        x, g, b = node.input
        p = f"ln{n}_"
        out.graph.initializer.extend([
            numpy_helper.from_array(np.array([-1], np.int64), p + "axes"),
            numpy_helper.from_array(np.array(2.0, np.float32), p + "two"),
            numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), p + "eps")])
        out.graph.node.extend([
            helper.make_node("ReduceMean", [x, p + "axes"], [p + "mean"], keepdims=1),
            helper.make_node("Sub", [x, p + "mean"], [p + "d"]),
            helper.make_node("Pow", [p + "d", p + "two"], [p + "sq"]),
            helper.make_node("ReduceMean", [p + "sq", p + "axes"], [p + "var"], keepdims=1),
            helper.make_node("Add", [p + "var", p + "eps"], [p + "ve"]),
            helper.make_node("Sqrt", [p + "ve"], [p + "std"]),
            helper.make_node("Div", [p + "d", p + "std"], [p + "n"]),
            helper.make_node("Mul", [p + "n", g], [p + "s"]),
            helper.make_node("Add", [p + "s", b], [node.output[0]])])
        n += 1
    return out, n


@pytest.mark.parametrize("name", ["gpt", "vit", "bert"])
def test_zoo_layer_norm_chains(name):
    model, n = expand_layer_norms(zoo.onnx_model(name))
    module, example = zoo.get(name)
    assert n == expected_ops(module)["layer_norm"] > 0
    graph = lift(model)
    counts = graph.op_counts()
    assert counts["layer_norm"] == n
    assert not {"reduce_mean", "sqrt", "pow"} & set(counts), counts
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, example)}
    _check_numerics(model, graph, feeds)
