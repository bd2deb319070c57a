"""Ops of family 'transformer': references against onnxruntime / ONNX's reference, type rules.

onnxruntime 1.31 runs RotaryEmbedding (opset 23) but not LinearAttention (opset 27), so
linear_attention is checked against ``onnx.reference`` and against independent closed forms.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln.ir import OpTypeError, TensorType

from .onnx_single import ONNX_DTYPE, assert_same, check, infer, kdt, run_kiln, to_onnx

COVERED = {"rotary_embedding", "linear_attention"}  # every op of the family, each named again in a test below

rng = np.random.default_rng(23)


def test_family_module_imports():
    import kiln.ir.ops.transformer  # noqa: F401


def _onnx_reference(op: str, inputs, attrs, out_dtypes, opset: int) -> list[np.ndarray]:
    """The op as a one-node ONNX model run by onnx.reference (for ops onnxruntime does not have)."""
    node, feeds, inits = to_onnx(op, inputs, attrs, out_dtypes)
    ins = [helper.make_tensor_value_info(k, ONNX_DTYPE[kdt(v)], list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(n, ONNX_DTYPE[d], None) for n, d in zip(node.output, out_dtypes)]
    graph = helper.make_graph([node], "single", ins, outs,
                              initializer=[helper.make_tensor(k, ONNX_DTYPE[kdt(v)], v.shape, v.reshape(-1))
                                           for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


# ------------------------------------------------------------------ rotary_embedding

def _caches(rows, half, dtype=np.float32):
    theta = rng.uniform(0, 2 * np.pi, (*rows, half))
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def _rotary_case(rank, interleaved, rot, with_ids, dtype=np.float32, heads=3, seq=5, head=8, batch=2):
    x = rng.standard_normal((batch, heads, seq, head) if rank == 4 else (batch, seq, heads * head)).astype(dtype)
    half = (rot or head) // 2
    if with_ids:
        cos, sin = _caches((11,), half, dtype)
        ids = rng.integers(0, 11, (batch, seq)).astype(np.int64)
        inputs = [x, cos, sin, ids]
    else:
        cos, sin = _caches((batch, seq), half, dtype)
        inputs = [x, cos, sin]
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot, "num_heads": heads if rank == 3 else 0}
    return inputs, attrs


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot", [0, 4])
@pytest.mark.parametrize("with_ids", [True, False])
def test_rotary_embedding_vs_onnxruntime(rank, interleaved, rot, with_ids):
    inputs, attrs = _rotary_case(rank, interleaved, rot, with_ids)
    check("rotary_embedding", inputs, attrs, opset=23)


@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_vs_onnx_reference_f64_and_f16(rank, interleaved):
    for dtype in (np.float64, np.float16):
        inputs, attrs = _rotary_case(rank, interleaved, 6, True, dtype)
        (y,), _ = run_kiln("rotary_embedding", inputs, attrs)
        (want,) = _onnx_reference("rotary_embedding", inputs, attrs, [kdt(inputs[0])], 23)
        assert_same(y, want, what=str(dtype))


def test_rotary_embedding_negative_position_ids_count_from_the_end():
    inputs, attrs = _rotary_case(4, 0, 0, True)
    x, cos, sin, ids = inputs
    (a,), _ = run_kiln("rotary_embedding", [x, cos, sin, ids - 11], attrs)
    (b,), _ = run_kiln("rotary_embedding", [x, cos, sin, ids], attrs)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="out of range"):
        run_kiln("rotary_embedding", [x, cos, sin, ids + 11], attrs)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 1), st.sampled_from([2, 4, 8]), st.integers(0, 2**31 - 1))
def test_rotary_embedding_is_a_rotation(interleaved, rot, seed):
    """Each rotated pair keeps its length and the dims past rot are untouched, for any input."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((1, 2, 3, 8))
    theta = r.uniform(-10, 10, (1, 3, rot // 2))
    (y,), _ = run_kiln("rotary_embedding", [x, np.cos(theta), np.sin(theta)],
                       {"interleaved": interleaved, "rotary_embedding_dim": rot})
    pairs = (lambda a: (a[..., 0:rot:2], a[..., 1:rot:2])) if interleaved else \
        (lambda a: (a[..., :rot // 2], a[..., rot // 2:rot]))
    (xa, xb), (ya, yb) = pairs(x), pairs(y)
    np.testing.assert_allclose(ya ** 2 + yb ** 2, xa ** 2 + xb ** 2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(y[..., rot:], x[..., rot:])


def test_rotary_embedding_type_rule():
    assert infer("rotary_embedding", ["f32[2,4,3,8]", "f32[9,4]", "f32[9,4]", "i64[2,3]"])[0] == infer(
        "rotary_embedding", ["f32[2,4,3,8]", "f32[2,3,4]", "f32[2,3,4]"])[0]
    assert str(infer("rotary_embedding", ["f32[N,3,32]", "f32[9,2]", "f32[9,2]", "i64[N,3]"],
                     num_heads=4, rotary_embedding_dim=4)[0]) == "f32[N,3,32]"
    bad = [
        (["f32[2,3,32]", "f32[9,4]", "f32[9,4]", "i64[2,3]"], {}, "num_heads"),
        (["f32[2,4,3,8]", "f32[9,2]", "f32[9,2]", "i64[2,3]"], {"rotary_embedding_dim": 6}, "cos_cache"),
        (["f32[2,4,3,8]", "f32[9,4]", "f32[9,4]", "i64[2,3]"], {"rotary_embedding_dim": 5}, "even"),
        (["f32[2,4,3,8]", "f32[9,4]", "f32[9,4]", "i32[2,3]"], {}, "i64"),
        (["f32[2,4,3,8]", "f32[2,4,4]", "f32[2,4,4]"], {}, "batch, seq"),
        (["f32[2,4,3,8]", "f64[9,4]", "f32[9,4]", "i64[2,3]"], {}, "dtype"),
    ]
    for types, attrs, msg in bad:
        with pytest.raises(OpTypeError, match=msg):
            infer("rotary_embedding", types, **attrs)


# ------------------------------------------------------------------ linear_attention

def _la_case(rule, hq=4, hkv=2, dk=3, dv=5, b=2, t=4, past=False, per_dim=False, beta_one=False,
             dtype=np.float32, scale=0.0):
    q = rng.standard_normal((b, t, hq * dk)).astype(dtype)
    k = (rng.standard_normal((b, t, hkv * dk)) / 2).astype(dtype)
    v = rng.standard_normal((b, t, hkv * dv)).astype(dtype)
    state = rng.standard_normal((b, hkv, dk, dv)).astype(dtype) if past else None
    decay = beta = None
    if rule in ("gated", "gated_delta"):
        decay = rng.uniform(-1, 0, (b, t, hkv * (dk if per_dim else 1))).astype(dtype)
    if rule in ("delta", "gated_delta"):
        beta = rng.uniform(0, 1, (b, t, 1 if beta_one else hkv)).astype(dtype)
    attrs = {"q_num_heads": hq, "kv_num_heads": hkv, "update_rule": rule, "scale": scale}
    return [q, k, v, state, decay, beta], attrs


@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
@pytest.mark.parametrize("shape", [dict(), dict(hq=2, hkv=2, past=True, per_dim=True),
                                   dict(hq=3, hkv=1, beta_one=True, scale=0.5, t=1)])
def test_linear_attention_vs_onnx_reference(rule, shape):
    inputs, attrs = _la_case(rule, **shape)
    outs, types = run_kiln("linear_attention", inputs, attrs)
    assert types == [TensorType.of(o) for o in outs]
    want = _onnx_reference("linear_attention", inputs, attrs, [t.dtype for t in types], 27)
    for got, w, what in zip(outs, want, ("output", "present_state")):
        assert_same(got, w, rtol=1e-5, atol=1e-5, what=what)


def test_linear_attention_f16_state_dtype_follows_past_state():
    inputs, attrs = _la_case("gated_delta", dtype=np.float16, past=True)
    inputs[3] = inputs[3].astype(np.float32)
    (y, s), _ = run_kiln("linear_attention", inputs, attrs)
    assert y.dtype == np.float16 and s.dtype == np.float32
    want = _onnx_reference("linear_attention", inputs, attrs, ["f16", "f32"], 27)
    assert_same(y, want[0], rtol=1e-2, atol=1e-2)
    assert_same(s, want[1], rtol=1e-3, atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_linear_rule_is_causally_masked_attention_without_softmax(t, group, seed):
    """'linear' equals scale * (tril(Q Kᵀ) V) per head, whatever the inputs (a closed form)."""
    r = np.random.default_rng(seed)
    hkv, dk, dv = 2, 3, 4
    q, k, v = r.standard_normal((1, t, hkv * group * dk)), r.standard_normal((1, t, hkv * dk)), \
        r.standard_normal((1, t, hkv * dv))
    (y, s), _ = run_kiln("linear_attention", [q, k, v],
                         {"q_num_heads": hkv * group, "kv_num_heads": hkv, "update_rule": "linear"})
    for hq in range(hkv * group):
        h = hq // group
        qh, kh, vh = q[0, :, hq * dk:(hq + 1) * dk], k[0, :, h * dk:(h + 1) * dk], v[0, :, h * dv:(h + 1) * dv]
        want = np.tril(qh @ kh.T) @ vh / np.sqrt(dk)
        np.testing.assert_allclose(y[0, :, hq * dv:(hq + 1) * dv], want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(s[0, 0], k[0, :, :dk].T @ v[0, :, :dv], rtol=1e-10, atol=1e-10)


def test_linear_attention_type_rule():
    out = infer("linear_attention", ["f32[B,T,12]", "f32[B,T,6]", "f32[B,T,10]", None, "f32[B,T,2]", "f32[B,T,1]"],
                q_num_heads=4, kv_num_heads=2)
    assert [str(t) for t in out] == ["f32[B,T,20]", "f32[B,2,3,5]"]
    base = ["f32[2,4,12]", "f32[2,4,6]", "f32[2,4,10]"]
    bad = [
        (base + [None, "f32[2,4,2]"], {"update_rule": "linear"}, "forbids the decay"),
        (base + [None, "f32[2,4,2]"], {}, "needs the beta"),
        (base + [None, None, "f32[2,4,2]"], {"update_rule": "delta", "q_num_heads": 3}, "multiple"),
        (base + [None, "f32[2,4,5]", "f32[2,4,2]"], {}, "decay"),
        (base + [None, None, "f32[2,4,3]"], {"update_rule": "delta"}, "beta"),
        (base + ["f32[2,2,3,4]", None, "f32[2,4,2]"], {"update_rule": "delta"}, "past_state"),
        (base + [None], {"update_rule": "fast"}, "update_rule"),
        (["f32[2,4,12]", "f32[2,4,8]", "f32[2,4,10]"], {"update_rule": "linear"}, "head size"),
    ]
    for types, attrs, msg in bad:
        with pytest.raises(OpTypeError, match=msg):
            infer("linear_attention", types, **{"q_num_heads": 4, "kv_num_heads": 2, **attrs})


# ------------------------------------------------------------------ lowering back to ONNX

def _graph(op: str, inputs: list, attrs: dict):
    from kiln.ir.graph import Graph
    g = Graph("g")
    vals = [None if a is None else g.add_input(f"in{i}", TensorType.of(a)) for i, a in enumerate(inputs)]
    while vals and vals[-1] is None:
        vals.pop()
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    return g, {f"in{i}": a for i, a in enumerate(inputs) if a is not None}


@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
def test_linear_attention_lowers_to_onnx_23_unrolled_and_to_27_as_itself(rule):
    import onnxruntime as ort

    from kiln import ir
    from kiln.frontend import lower_to_onnx
    inputs, attrs = _la_case(rule, past=rule != "linear", per_dim=rule == "gated")
    g, feeds = _graph("linear_attention", inputs, attrs)
    want = ir.interpret(g, feeds)
    unrolled = lower_to_onnx(g)  # opset 23: no LinearAttention, so the decomposition
    assert "LinearAttention" not in {n.op_type for n in unrolled.graph.node}
    got = ort.InferenceSession(unrolled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    native = lower_to_onnx(g, opset=27)
    assert [n.op_type for n in native.graph.node] == ["LinearAttention"]
    got27 = ReferenceEvaluator(native).run(None, feeds)
    for v, a, b in zip(g.outputs, got, got27):
        assert_same(a, want[v.name], rtol=1e-5, atol=1e-5)
        assert_same(b, want[v.name], rtol=1e-5, atol=1e-5)


def test_rotary_embedding_lowers_to_onnx():
    import onnxruntime as ort

    from kiln import ir
    from kiln.frontend import lower_to_onnx
    inputs, attrs = _rotary_case(3, 1, 4, True)
    g, feeds = _graph("rotary_embedding", inputs, attrs)
    model = lower_to_onnx(g)
    assert [n.op_type for n in model.graph.node] == ["RotaryEmbedding"]
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert_same(got, ir.interpret(g, feeds)[g.outputs[0].name])
