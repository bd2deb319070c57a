"""TVM lowerings of the transformer ops against the reference interpreter, and their schedules."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.schedules import loop_kinds
from kiln.codegen.tolerance import Tolerance
from kiln.ir.graph import Graph
from kiln.ir.text import print_graph
from kiln.ir.types import TensorType

from .util import check_graph_kernels

rng = np.random.default_rng(5)


def _one_node(op: str, inputs: dict[str, np.ndarray | None], attrs: dict, consts: dict[str, np.ndarray] = ()) -> str:
    """IR text of ``op`` on graph inputs (and constants) named as given; None entries are absent operands."""
    g = Graph("g")
    consts = dict(consts)
    vals = []
    for name, a in inputs.items():
        if a is None:
            vals.append(None)
        elif name in consts:
            vals.append(g.add_constant(a, name))
        else:
            vals.append(g.add_input(name, TensorType.of(a)))
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    return print_graph(g)


def _feeds(inputs: dict[str, np.ndarray | None], consts=()) -> dict[str, np.ndarray]:
    return {k: v for k, v in inputs.items() if v is not None and k not in dict(consts)}


# ------------------------------------------------------------------ rotary_embedding

@pytest.mark.parametrize("rank", [3, 4])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot", [0, 4])
@pytest.mark.parametrize("with_ids", [True, False])
def test_rotary_embedding_kernel(rank, interleaved, rot, with_ids):
    heads, seq, head, batch = 3, 5, 8, 2
    x = rng.standard_normal((batch, heads, seq, head) if rank == 4 else (batch, seq, heads * head)).astype(np.float32)
    half = (rot or head) // 2
    rows = (12,) if with_ids else (batch, seq)
    theta = rng.uniform(0, 6.3, (*rows, half))
    ins = {"x": x, "cos": np.cos(theta).astype(np.float32), "sin": np.sin(theta).astype(np.float32)}
    if with_ids:
        ins["pos"] = rng.integers(-12, 12, (batch, seq)).astype(np.int64)
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rot, "num_heads": heads if rank == 3 else 0}
    check_graph_kernels(_one_node("rotary_embedding", ins, attrs), ins)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_rotary_embedding_kernel_dtypes(dtype):
    x = rng.standard_normal((1, 2, 4, 6)).astype(dtype)
    theta = rng.uniform(0, 6.3, (7, 3))
    ins = {"x": x, "cos": np.cos(theta).astype(dtype), "sin": np.sin(theta).astype(dtype),
           "pos": rng.integers(0, 7, (1, 4)).astype(np.int64)}
    check_graph_kernels(_one_node("rotary_embedding", ins, {}), ins)


def test_rotary_embedding_kernel_is_parallel_and_vectorized():
    x = rng.standard_normal((2, 8, 64, 64)).astype(np.float32)
    theta = rng.uniform(0, 6.3, (2, 64, 32))
    ins = {"x": x, "cos": np.cos(theta).astype(np.float32), "sin": np.sin(theta).astype(np.float32)}
    (k,) = check_graph_kernels(_one_node("rotary_embedding", ins, {}), ins)
    kinds = loop_kinds(k.func)
    assert kinds["parallel"] >= 1 and kinds["vectorized"] >= 1, kinds


# ------------------------------------------------------------------ linear_attention

def _la_inputs(rule, dtype=np.float32, hq=4, hkv=2, dk=3, dv=8, b=2, t=5, past=False, per_dim=False,
               beta_one=False):
    ins = {"q": rng.standard_normal((b, t, hq * dk)).astype(dtype),
           "k": (rng.standard_normal((b, t, hkv * dk)) / 2).astype(dtype),
           "v": rng.standard_normal((b, t, hkv * dv)).astype(dtype),
           "state": rng.standard_normal((b, hkv, dk, dv)).astype(dtype) if past else None,
           "decay": None, "beta": None}
    if rule in ("gated", "gated_delta"):
        ins["decay"] = rng.uniform(-1, 0, (b, t, hkv * (dk if per_dim else 1))).astype(dtype)
    if rule in ("delta", "gated_delta"):
        ins["beta"] = rng.uniform(0, 1, (b, t, 1 if beta_one else hkv)).astype(dtype)
    return ins, {"q_num_heads": hq, "kv_num_heads": hkv, "update_rule": rule}


@pytest.mark.parametrize("rule", ["linear", "gated", "delta", "gated_delta"])
@pytest.mark.parametrize("shape", [dict(), dict(hq=2, hkv=2, dv=5, past=True, per_dim=True),
                                   dict(hq=3, hkv=1, dv=16, beta_one=True, t=1)])
def test_linear_attention_kernel(rule, shape):
    ins, attrs = _la_inputs(rule, **shape)
    check_graph_kernels(_one_node("linear_attention", ins, attrs), _feeds(ins))


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_linear_attention_kernel_dtypes(dtype):
    ins, attrs = _la_inputs("gated_delta", dtype=dtype, past=True, per_dim=True)
    tol = Tolerance(2e-2, 2e-2) if dtype == np.float16 else None
    check_graph_kernels(_one_node("linear_attention", ins, attrs), _feeds(ins), tol)


def test_linear_attention_kernel_with_constant_operands_and_scale():
    ins, attrs = _la_inputs("gated", past=True)
    consts = {"decay": ins["decay"], "state": ins["state"]}
    text = _one_node("linear_attention", ins, {**attrs, "scale": 0.3}, consts)
    check_graph_kernels(text, _feeds(ins, consts))


def test_linear_attention_kernel_is_parallel_and_vectorized():
    ins, attrs = _la_inputs("gated_delta", b=2, hq=4, hkv=4, dk=16, dv=32, t=8)
    (k,) = check_graph_kernels(_one_node("linear_attention", ins, attrs), _feeds(ins))
    kinds = loop_kinds(k.func)
    assert kinds["parallel"] == 1 and kinds["vectorized"] >= 5, kinds


@pytest.mark.slow
def test_attention_model_compiles_to_the_fused_attention_kernel():
    """ONNX Attention (causal, GQA) through kiln.compile: two kernels (kv repeat, fused attention), right values."""
    import onnx
    from onnx import helper

    import kiln
    from kiln.frontend import lift
    from kiln.ir.interpret import interpret

    def vi(name, shape):
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)

    node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], is_causal=1)
    graph = helper.make_graph([node], "att", [vi("Q", [1, 4, 16, 8]), vi("K", [1, 2, 16, 8]), vi("V", [1, 2, 16, 8])],
                              [vi("Y", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("Q", (1, 4, 16, 8)), ("K", (1, 2, 16, 8)), ("V", (1, 2, 16, 8)))}
    art = kiln.compile(model, example_inputs=feeds)
    assert "matmul+mul+add+softmax+matmul" in str(art.stats["passes"])
    got = art.load().run(feeds)["Y"]
    g = lift(model)
    np.testing.assert_allclose(got, interpret(g, feeds)[g.outputs[0].name], rtol=1e-4, atol=1e-5)
