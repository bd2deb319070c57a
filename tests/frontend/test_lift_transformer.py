"""Lifting Attention / SwiGLU / CausalConvWithState (decompositions) and RotaryEmbedding / LinearAttention.

Attention is checked against onnxruntime (opsets 23, 24) and onnx.reference (opset 25, which
onnxruntime 1.31 does not load); the others against onnx.reference (opsets 27 and 28).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln.codegen.attention import match_attention
from kiln.frontend import lift
from kiln.frontend.errors import UnsupportedOpsError
from kiln.ir import interpret
from kiln.passes.manager import run_pipeline

from .conftest import make_model, vi

rng = np.random.default_rng(11)


def _model(op: str, inputs: dict[str, np.ndarray | None], outputs: list[str], opset: int, **attrs):
    names = [k if v is not None else "" for k, v in inputs.items()]
    node = helper.make_node(op, names, outputs, **attrs)
    ins = [vi(k, v.dtype, list(v.shape)) for k, v in inputs.items() if v is not None]
    return make_model([node], ins, [vi(o, np.float32, None) for o in outputs if o], opset=opset, ir_version=10)


def _kiln(model, feeds):
    g = lift(model)
    out = interpret(g, feeds)
    return [out[v.name] for v in g.outputs], g


def _reference(model, feeds):
    return ReferenceEvaluator(model).run(None, feeds)


def _onnxruntime(model, feeds):
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _qkv(b=2, hq=4, hkv=2, sq=3, skv=5, d=8, dv=6, rank=4):
    if rank == 4:
        return (rng.standard_normal((b, hq, sq, d)).astype(np.float32),
                rng.standard_normal((b, hkv, skv, d)).astype(np.float32),
                rng.standard_normal((b, hkv, skv, dv)).astype(np.float32))
    return (rng.standard_normal((b, sq, hq * d)).astype(np.float32),
            rng.standard_normal((b, skv, hkv * d)).astype(np.float32),
            rng.standard_normal((b, skv, hkv * dv)).astype(np.float32))


CASES = [
    dict(),
    dict(rank=3, q_num_heads=4, kv_num_heads=2),
    dict(is_causal=1),
    dict(mask="bool"),
    dict(mask="float", is_causal=1, past=True),
    dict(softcap=1.5, mask="float", qk_matmul_output_mode=1),
    dict(mask="short_bool", qk_matmul_output_mode=2),
    dict(mask="bool", qk_matmul_output_mode=3, scale=0.2),
    dict(rank=3, q_num_heads=4, kv_num_heads=2, is_causal=1, past=True),
]


def _attention_case(case: dict):
    case = dict(case)
    rank, mask, past = case.pop("rank", 4), case.pop("mask", None), case.pop("past", False)
    q, k, v = _qkv(rank=rank)
    skv_total = 5 + (4 if past else 0)
    ins = {"Q": q, "K": k, "V": v, "attn_mask": None, "past_key": None, "past_value": None}
    if mask == "bool":
        ins["attn_mask"] = rng.random((3, skv_total)) < 0.7
    elif mask == "short_bool":
        ins["attn_mask"] = rng.random((2, 1, 3, skv_total - 2)) < 0.7
    elif mask == "float":
        ins["attn_mask"] = rng.standard_normal((4, 3, skv_total)).astype(np.float32)
    if past:
        ins["past_key"] = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
        ins["past_value"] = rng.standard_normal((2, 2, 4, 6)).astype(np.float32)
    while ins and list(ins.values())[-1] is None:
        ins.popitem()
    outs = ["Y", "present_key" if past else "", "present_value" if past else ""]
    if "qk_matmul_output_mode" in case:
        outs.append("qk")
    return ins, outs, case


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_attention_matches_onnxruntime_or_the_onnx_reference(case):
    ins, outs, attrs = _attention_case(case)
    model = _model("Attention", ins, outs, 23, **attrs)
    feeds = {k: v for k, v in ins.items() if v is not None}
    got, _ = _kiln(model, feeds)
    # onnxruntime refuses a mask shorter than the KV length (ONNX pads it with -inf)
    short = case.get("mask") == "short_bool"
    want = _reference(model, feeds) if short else _onnxruntime(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_attention_lifts_to_the_fused_attention_chain():
    q, k, v = _qkv(hq=2, hkv=2, d=8, dv=8)
    model = _model("Attention", {"Q": q, "K": k, "V": v}, ["Y"], 23, is_causal=1)
    g = run_pipeline(lift(model), "fuse-blocks")
    blocks: dict[str, list] = {}
    for n in g.nodes:
        blocks.setdefault(n.block, []).append(n)
    specs = [match_attention(b) for b in blocks.values()]
    spec = next(s for s in specs if s is not None)
    assert spec.causal_offset == 0 and spec.mask_kind == "additive"


def test_attention_fully_masked_rows_are_zero_not_nan():
    q, k, v = _qkv()
    mask = rng.random((3, 5)) < 0.6
    mask[1] = False
    model = _model("Attention", {"Q": q, "K": k, "V": v, "attn_mask": mask}, ["Y", "", "", "qk"], 23,
                   qk_matmul_output_mode=3)
    (y, p), _ = _kiln(model, {"Q": q, "K": k, "V": v, "attn_mask": mask})
    assert np.isfinite(y).all() and not y[:, :, 1].any() and not p[:, :, 1].any()
    want = _onnxruntime(model, {"Q": q, "K": k, "V": v, "attn_mask": mask})
    np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)


def test_attention_mode0_with_softcap_is_the_raw_product():
    """ONNX's spec and function body: mode 0 is the scaled Q·Kᵀ before softcap."""
    q, k, v = _qkv(hq=2, hkv=2)
    model = _model("Attention", {"Q": q, "K": k, "V": v}, ["Y", "", "", "qk"], 23, softcap=1.0)
    (_, qk), _ = _kiln(model, {"Q": q, "K": k, "V": v})
    np.testing.assert_allclose(qk, q @ k.transpose(0, 1, 3, 2) / np.sqrt(8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset,attrs,nonpad", [
    (24, dict(is_causal=1), [5, 3]),
    (24, dict(), [4, 1]),
    (25, dict(is_causal=1, left_window_size=1), None),
    (25, dict(left_window_size=1, right_window_size=2), [5, 2]),
])
def test_attention_nonpad_and_windows_match_the_onnx_reference(opset, attrs, nonpad):
    q, k, v = _qkv()
    ins = {"Q": q, "K": k, "V": v}
    if nonpad is not None:
        ins.update({"attn_mask": None, "past_key": None, "past_value": None,
                    "nonpad_kv_seqlen": np.array(nonpad, np.int64)})
    model = _model("Attention", ins, ["Y"], opset, **attrs)
    feeds = {k: v for k, v in ins.items() if v is not None}
    (y,), g = _kiln(model, feeds)
    np.testing.assert_allclose(y, _reference(model, feeds)[0], rtol=1e-5, atol=1e-5)
    if opset == 24:
        np.testing.assert_allclose(y, _onnxruntime(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs,why", [
    (dict(), "q_num_heads"),
    (dict(q_num_heads=3, kv_num_heads=2), "heads"),
])
def test_attention_refusals_say_why(attrs, why):
    q, k, v = _qkv(rank=3)
    with pytest.raises(UnsupportedOpsError, match=why):
        lift(_model("Attention", {"Q": q, "K": k, "V": v}, ["Y"], 23, **attrs))


def test_attention_4d_with_head_attributes_is_refused_at_opset_25():
    q, k, v = _qkv()
    with pytest.raises(UnsupportedOpsError, match="must not be given"):
        lift(_model("Attention", {"Q": q, "K": k, "V": v}, ["Y"], 25, q_num_heads=4, kv_num_heads=2))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_swiglu(alpha):
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    model = _model("SwiGLU", {"a": a, "b": b}, ["y"], 28, alpha=alpha)
    (y,), _ = _kiln(model, {"a": a, "b": b})
    np.testing.assert_allclose(y, a / (1 + np.exp(-alpha * a)) * b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, _reference(model, {"a": a, "b": b})[0], rtol=1e-6, atol=1e-6)


def test_swiglu_refuses_broadcasting():
    a, b = np.ones((3, 4), np.float32), np.ones((4,), np.float32)
    with pytest.raises(UnsupportedOpsError, match="no broadcasting"):
        lift(_model("SwiGLU", {"a": a, "b": b}, ["y"], 28))


@pytest.mark.parametrize("k,past,bias,act", [(4, False, False, "none"), (3, True, True, "silu"),
                                             (1, False, True, "swish"), (5, False, False, "none")])
def test_causal_conv_with_state(k, past, bias, act):
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ins = {"x": x, "w": rng.standard_normal((3, 1, k)).astype(np.float32),
           "b": rng.standard_normal(3).astype(np.float32) if bias else None,
           "past": rng.standard_normal((2, 3, k - 1)).astype(np.float32) if past else None}
    while list(ins.values())[-1] is None:
        ins.popitem()
    model = _model("CausalConvWithState", ins, ["y", "state"], 27, activation=act)
    feeds = {n: a for n, a in ins.items() if a is not None}
    got, _ = _kiln(model, feeds)
    for g, w in zip(got, _reference(model, feeds)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_rotary_and_linear_attention_lift_to_their_ops():
    x = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    cache = rng.standard_normal((1, 3, 2)).astype(np.float32)
    g = lift(_model("RotaryEmbedding", {"x": x, "c": cache, "s": cache}, ["y"], 23))
    assert [n.op for n in g.nodes] == ["rotary_embedding"]
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    model = _model("LinearAttention", {"q": q, "k": q, "v": q}, ["y", "s"], 27, q_num_heads=1, kv_num_heads=1,
                   update_rule="linear")
    got, g = _kiln(model, {"q": q, "k": q, "v": q})
    assert [n.op for n in g.nodes] == ["linear_attention"]
    for a, w in zip(got, _reference(model, {"q": q, "k": q, "v": q})):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
