"""crms_norm (Pre-CRMSNorm): reference, type rule, decomposition, ONNX lowering, and the identity
that makes the ln-to-crmsnorm pass exact: [y', -sum(y')] from the compressed vector == rms_norm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln import ir
from kiln.frontend import lower_to_onnx
from kiln.ir import OpTypeError, TensorType

from .onnx_single import T, infer, run_kiln

COVERED = {"crms_norm"}

rng = np.random.default_rng(7)


def rnd(*shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def formula(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    d = x.shape[-1] + 1
    ms = (np.sum(x * x, -1, keepdims=True) + np.sum(x, -1, keepdims=True) ** 2) / d
    return x / np.sqrt(ms + eps) * scale.astype(np.float64)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 15)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_is_the_formula(shape, dtype):
    x, s = rnd(*shape, dtype=dtype), rnd(shape[-1], dtype=dtype)
    (y,), (t,) = run_kiln("crms_norm", [x, s], {"epsilon": 1e-3})
    assert TensorType.of(y) == t and y.dtype == dtype
    np.testing.assert_allclose(y, formula(x, s, 1e-3).astype(dtype), rtol=1e-6 if dtype == np.float32 else 1e-13)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=9),
                  elements=st.floats(-1e3, 1e3)),
       st.sampled_from([0.0, 1e-6, 1e-2]))
def test_expanded_crms_norm_equals_rms_norm_of_the_full_zero_mean_vector(full, eps):
    x = full - full.mean(axis=-1, keepdims=True)
    # rows that are (nearly) constant keep a rounding-size mean comparable to their spread
    assume(np.all(np.sqrt((x * x).mean(-1)) > 1e-6 * (1 + np.abs(full).max())))
    d = x.shape[-1]
    ones = np.ones(d)
    (want,), _ = run_kiln("rms_norm", [x, ones], {"axis": -1, "epsilon": eps})
    (y,), _ = run_kiln("crms_norm", [np.ascontiguousarray(x[..., :-1]), ones[:-1]], {"epsilon": eps})
    expanded = np.concatenate([y, -y.sum(axis=-1, keepdims=True)], axis=-1)
    np.testing.assert_allclose(expanded, want, rtol=1e-9, atol=1e-9)


def test_scale_applies_to_the_kept_components():
    x = rnd(4, 9)
    x -= x.mean(-1, keepdims=True)
    g = rnd(9)
    (want,), _ = run_kiln("rms_norm", [x, g], {"epsilon": 1e-5})
    (y,), _ = run_kiln("crms_norm", [np.ascontiguousarray(x[:, :-1]), g[:-1]], {"epsilon": 1e-5})
    np.testing.assert_allclose(y, want[:, :-1], rtol=1e-12)


def test_type_rule():
    assert infer("crms_norm", ["f32[B,S,255]", "f32[255]"]) == [T("f32[B,S,255]")]
    assert infer("crms_norm", ["f64[7]", "f64[1]"], axis=0) == [T("f64[7]")]


@pytest.mark.parametrize("types,attrs,match", [
    (["f32[2,3,4]", "f32[4]"], {"axis": 1}, "not the last axis"),
    (["f32[2,3,4]", "f32[3]"], {}, "does not broadcast"),
    (["f32[2,3,4]", "f64[4]"], {}, "dtype"),
    (["i32[2,4]", "i32[4]"], {}, "float"),
    (["f32[2,S]", "f32[1]"], {}, "static"),
    (["f32[]", "f32[]"], {}, "rank"),
])
def test_type_errors(types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer("crms_norm", types, **attrs)
    assert str(e.value).startswith("crms_norm:")


def _graph(x: np.ndarray, s: np.ndarray) -> ir.Graph:
    g = ir.Graph("crms")
    xv = g.add_input("x", TensorType.of(x))
    node = g.add_node("crms_norm", [xv, g.add_constant(s, "scale")], {"epsilon": 1e-4}, out_names=["y"])
    g.set_outputs(node.outputs)
    return g


def test_decomposition_matches_the_reference():
    x, s = rnd(2, 3, 11), rnd(11)
    g = _graph(x, s)
    want = ir.interpret(g, {"x": x})["y"]
    node = g.nodes[0]
    (new,) = ir.get_op("crms_norm").decompose(g, node)
    g.replace_all_uses(node.output, new)
    g.remove(node)
    ir.verify(g)
    assert "crms_norm" not in g.op_counts()
    np.testing.assert_allclose(ir.interpret(g, {"x": x})[new.name], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opset", [18, 23])
def test_lowered_to_onnx_runs_in_onnxruntime(opset):
    import onnxruntime as ort

    x, s = rnd(3, 5, 31, dtype=np.float32), rnd(31, dtype=np.float32)
    g = _graph(x, s)
    model = lower_to_onnx(g, opset=opset)
    assert "crms_norm" not in {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(got, ir.interpret(g, {"x": x})["y"], rtol=2e-5, atol=2e-6)


def test_round_trips_through_text():
    g = _graph(rnd(2, 5), rnd(5))
    assert ir.structurally_equal(ir.parse(ir.print_graph(g)), g) is None
