"""Lifting onnxruntime's com.microsoft quantized ops (what quantize_static's QOperator format emits).

Every op is a one-node model run by onnxruntime (optimizations off, the reference) and by kiln's
interpreter after ``lift``; the compiled kernels are checked in the slow test at the end.
Tolerances: the ops whose kiln form is onnxruntime's integer formula (QGemm, global average
pool, concat, the Q/DQ ops) must give the same codes; the ones onnxruntime computes in fixed
point or through a table of its own float functions (add, mul, sigmoid, leaky relu, average
pool, softmax, where) may move a code by one where the exact value lies within float rounding
of a rounding boundary, so they are held to one code and to few such codes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from kiln import ir
from kiln.corpus import ort_outputs
from kiln.frontend import lift
from kiln.frontend.errors import UnsupportedOpsError

from .conftest import make_model, vi

F32, U8, I8, I32 = np.float32, np.uint8, np.int8, np.int32
RNG = np.random.default_rng(7)
MS = "com.microsoft"
MOSTLY_EXACT = 0.02  # the share of codes allowed one step off, for the table / fixed-point ops


def codes(dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def every_code(dtype, shape=(256,)) -> np.ndarray:
    """All 256 codes of ``dtype`` (a 1-D ramp reshaped)."""
    info = np.iinfo(dtype)
    return np.arange(info.min, info.max + 1).astype(dtype).reshape(shape)


def one_node(op: str, inputs: dict[str, np.ndarray | None], out_dtype, *, consts=(), domain: str = MS,
             n_out: int = 1, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model; ``None`` inputs are absent, names in ``consts`` are initializers."""
    names = [k if v is not None else "" for k, v in inputs.items()]
    while names and not names[-1]:
        names.pop()
    outs = ["y"] + [f"y{k}" for k in range(1, n_out)]
    node = helper.make_node(op, names, outs, domain=domain, **attrs)
    feeds = {k: v for k, v in inputs.items() if v is not None and k not in consts}
    inits = {k: v for k, v in inputs.items() if v is not None and k in consts}
    model = make_model([node], [vi(k, v.dtype, list(v.shape)) for k, v in feeds.items()],
                       [vi(o, out_dtype, None) for o in outs], inits, opset=17, extra_opsets={MS: 1})
    return model, feeds


def run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[ir.Graph, np.ndarray, np.ndarray]:
    """(lifted graph, kiln's interpreter output, onnxruntime's output)."""
    graph = lift(model)
    got = ir.interpret(graph, feeds)[graph.outputs[0].name]
    return graph, got, ort_outputs(model, feeds)[0]


def assert_same_codes(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    np.testing.assert_array_equal(got, want)


def assert_within_one_code(got: np.ndarray, want: np.ndarray, share: float = MOSTLY_EXACT) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1, f"codes differ by up to {diff.max()}"
    assert np.mean(diff != 0) <= share, f"{np.mean(diff != 0):.1%} of the codes differ"


def scale(lo: float = 0.01, hi: float = 0.1) -> np.ndarray:
    return np.array(RNG.uniform(lo, hi), F32)


def zp(dtype, spread: int = 20) -> np.ndarray:
    mid = 0 if dtype is I8 else 128
    return np.array(mid + RNG.integers(-spread, spread + 1), dtype)


# ====================================================================== QGemm

@pytest.mark.parametrize("a_dt,b_dt", [(U8, U8), (U8, I8), (I8, I8)])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_qgemm_same_codes_as_onnxruntime(a_dt, b_dt, per_column, trans_b):
    m, k, n = 4, 9, 6
    sb = RNG.uniform(0.002, 0.01, (n,) if per_column else ()).astype(F32)
    zb = np.zeros(sb.shape, b_dt) if b_dt is I8 else RNG.integers(100, 150, sb.shape).astype(b_dt)
    b = codes(b_dt, (n, k) if trans_b else (k, n))
    inputs = {"a": codes(a_dt, (m, k)), "sa": scale(), "za": zp(a_dt), "b": b, "sb": sb, "zb": zb,
              "c": RNG.integers(-3000, 3000, (n,)).astype(I32), "sy": scale(0.05, 0.2), "zy": zp(a_dt)}
    model, feeds = one_node("QGemm", inputs, a_dt, consts={"b", "sb", "zb", "c", "sy", "zy", "sa", "za"},
                            transB=trans_b, alpha=1.0)
    graph, got, want = run_both(model, feeds)
    assert "qmatmul" in graph.op_counts()
    assert_same_codes(got, want)


@pytest.mark.parametrize("bias_shape", [None, (), (1, 6), (4, 1), (4, 6)])
def test_qgemm_bias_shapes_alpha_and_trans_a(bias_shape):
    m, k, n = 4, 7, 6
    bias = None if bias_shape is None else RNG.integers(-2000, 2000, bias_shape).astype(I32)
    inputs = {"a": codes(U8, (k, m)), "sa": scale(), "za": zp(U8), "b": codes(I8, (k, n)), "sb": scale(0.002, 0.01),
              "zb": np.array(0, I8), "c": bias, "sy": scale(0.05, 0.2), "zy": zp(U8)}
    model, feeds = one_node("QGemm", inputs, U8, consts={"b", "sb", "zb", "c"}, transA=1, alpha=0.75)
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)


def test_qgemm_float_output_without_y_scale():
    inputs = {"a": codes(U8, (3, 8)), "sa": scale(), "za": zp(U8), "b": codes(I8, (5, 8)),
              "sb": RNG.uniform(0.002, 0.01, (5,)).astype(F32), "zb": np.zeros(5, I8),
              "c": RNG.integers(-2000, 2000, (5,)).astype(I32)}
    model, feeds = one_node("QGemm", inputs, F32, consts={"b", "sb", "zb", "c"}, transB=1)
    _, got, want = run_both(model, feeds)
    assert got.dtype == want.dtype == F32
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=0)


def test_qgemm_runtime_scales():
    inputs = {"a": codes(U8, (3, 8)), "sa": scale(), "za": zp(U8), "b": codes(U8, (8, 5)), "sb": scale(),
              "zb": zp(U8), "c": None, "sy": scale(0.3, 0.5), "zy": zp(U8)}
    model, feeds = one_node("QGemm", inputs, U8)
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)


def test_qgemm_per_row_a_scale_is_refused():
    inputs = {"a": codes(U8, (3, 8)), "sa": np.full(3, 0.1, F32), "za": zp(U8), "b": codes(U8, (8, 5)),
              "sb": scale(), "zb": zp(U8), "c": None, "sy": scale(), "zy": zp(U8)}
    model, _ = one_node("QGemm", inputs, U8, consts={"sa"})
    with pytest.raises(UnsupportedOpsError, match="a_scale must be per tensor"):
        lift(model)


def test_unknown_attribute_is_refused_by_name():
    inputs = {"a": codes(U8, (2, 4)), "sa": scale(), "za": zp(U8), "b": codes(U8, (2, 4)), "sb": scale(),
              "zb": zp(U8), "sc": scale(), "zc": zp(U8)}
    model, _ = one_node("QLinearAdd", inputs, U8, consts={"sa", "za", "sb", "zb", "sc", "zc"}, fused="relu")
    with pytest.raises(UnsupportedOpsError, match="fused"):
        lift(model)


# ====================================================================== add / mul

@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("shapes", [((4, 64), (4, 64)), ((2, 3, 32), (32,)), ((3, 1, 16), (1, 5, 1))])
def test_qlinear_binary_within_one_code(op, dtype, shapes):
    sc = scale(0.02, 0.1) if op == "QLinearAdd" else scale(0.05, 0.3)
    inputs = {"a": codes(dtype, shapes[0]), "sa": scale(), "za": zp(dtype), "b": codes(dtype, shapes[1]),
              "sb": scale(), "zb": zp(dtype), "sc": sc, "zc": zp(dtype)}
    model, feeds = one_node(op, inputs, dtype, consts={"sa", "za", "sb", "zb", "sc", "zc"})
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


def test_qlinear_add_without_output_zero_point():
    inputs = {"a": codes(U8, (8, 32)), "sa": scale(), "za": zp(U8), "b": codes(U8, (8, 32)), "sb": scale(),
              "zb": zp(U8), "sc": scale(0.1, 0.2), "zc": None}
    model, feeds = one_node("QLinearAdd", inputs, U8, consts={"sa", "za", "sb", "zb", "sc"})
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


# ====================================================================== table ops

@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("op,attrs", [("QLinearSigmoid", {}), ("QLinearLeakyRelu", {"alpha": 0.1}),
                                      ("QLinearLeakyRelu", {})])
def test_qlinear_activation_over_every_code(op, attrs, dtype):
    sy = np.array(1 / 256, F32) if op == "QLinearSigmoid" else scale(0.02, 0.05)
    zy = np.array(0 if dtype is U8 else -128, dtype) if op == "QLinearSigmoid" else zp(dtype)
    inputs = {"x": every_code(dtype, (4, 64)), "sx": scale(0.03, 0.06), "zx": zp(dtype), "sy": sy, "zy": zy}
    model, feeds = one_node(op, inputs, dtype, consts={"sx", "zx", "sy", "zy"}, **attrs)
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


@pytest.mark.parametrize("dtype", [U8, I8])
def test_qlinear_where(dtype):
    inputs = {"c": RNG.random((3, 8)) < 0.5, "x": codes(dtype, (3, 8)), "sx": scale(), "zx": zp(dtype),
              "w": codes(dtype, (1, 8)), "sw": scale(), "zw": zp(dtype), "sz": scale(0.05, 0.1), "zz": zp(dtype)}
    model, feeds = one_node("QLinearWhere", inputs, dtype, consts={"sx", "zx", "sw", "zw", "sz", "zz"})
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


# ====================================================================== pooling

@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_global_average_pool_same_codes(dtype, channels_last):
    shape = (2, 5, 7, 3) if channels_last else (2, 3, 5, 7)
    inputs = {"x": codes(dtype, shape), "sx": scale(), "zx": zp(dtype), "sy": scale(0.005, 0.02), "zy": zp(dtype)}
    model, feeds = one_node("QLinearGlobalAveragePool", inputs, dtype, consts={"sx", "zx", "sy", "zy"},
                            channels_last=channels_last)
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
    {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [2, 2], "strides": [1, 2], "channels_last": 1},
])
@pytest.mark.parametrize("dtype", [U8, I8])
def test_qlinear_average_pool(attrs, dtype):
    shape = (1, 6, 7, 4) if attrs.get("channels_last") else (1, 4, 6, 7)
    inputs = {"x": codes(dtype, shape), "sx": scale(), "zx": zp(dtype), "sy": scale(0.02, 0.05), "zy": zp(dtype)}
    model, feeds = one_node("QLinearAveragePool", inputs, dtype, consts={"sx", "zx", "sy", "zy"}, **attrs)
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


# ====================================================================== concat / softmax

@pytest.mark.parametrize("dtype", [U8, I8])
def test_qlinear_concat_same_codes(dtype):
    sy, zy = scale(0.05, 0.1), zp(dtype)
    inputs = {"sy": sy, "zy": zy,
              "x0": codes(dtype, (2, 3, 4)), "s0": sy.copy(), "z0": zy.copy(),  # passes through
              "x1": codes(dtype, (2, 5, 4)), "s1": scale(), "z1": zp(dtype),  # requantized
              "x2": codes(dtype, (2, 1, 4)), "s2": scale(0.1, 0.3), "z2": zp(dtype)}
    model, feeds = one_node("QLinearConcat", inputs, dtype, consts={k for k in inputs if k[0] in "sz"}, axis=1)
    graph, got, want = run_both(model, feeds)
    assert graph.op_counts().get("quantize") == 2
    assert_same_codes(got, want)


@pytest.mark.parametrize("dtype", [U8, I8])
@pytest.mark.parametrize("opset,axis,shape", [(13, -1, (3, 4, 10)), (13, 1, (2, 6, 5)), (12, 1, (3, 2, 4)),
                                              (13, None, (4, 16))])
def test_qlinear_softmax(dtype, opset, axis, shape):
    zy = np.array(0 if dtype is U8 else -128, dtype)
    inputs = {"x": codes(dtype, shape), "sx": scale(0.02, 0.08), "zx": zp(dtype), "sy": np.array(1 / 256, F32),
              "zy": zy}
    attrs = {"opset": opset} if axis is None else {"opset": opset, "axis": axis}
    model, feeds = one_node("QLinearSoftmax", inputs, dtype, consts={"sx", "zx", "sy", "zy"}, **attrs)
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


def test_qlinear_softmax_scale_not_a_power_of_two():
    """onnxruntime multiplies by floor(1 / y_scale), not divides by y_scale."""
    inputs = {"x": codes(U8, (6, 12)), "sx": scale(0.05, 0.1), "zx": zp(U8), "sy": np.array(1 / 200.5, F32),
              "zy": np.array(3, U8)}
    model, feeds = one_node("QLinearSoftmax", inputs, U8, consts={"sx", "zx", "sy", "zy"}, opset=13, axis=-1)
    _, got, want = run_both(model, feeds)
    assert_within_one_code(got, want)


# ====================================================================== float-output matmuls

@pytest.mark.parametrize("a_dt,b_dt", [(U8, U8), (U8, I8), (I8, I8)])
@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_integer_to_float(a_dt, b_dt, per_column):
    k, n = 12, 5
    sb = RNG.uniform(0.002, 0.01, (n,) if per_column else ()).astype(F32)
    zb = zp(b_dt, 5) if not per_column else RNG.integers(-3, 4, (n,)).astype(b_dt) + (0 if b_dt is I8 else 128)
    inputs = {"a": codes(a_dt, (2, 3, k)), "b": codes(b_dt, (k, n)), "sa": scale(), "sb": sb, "za": zp(a_dt),
              "zb": zb.astype(b_dt), "bias": RNG.standard_normal(n).astype(F32)}
    model, feeds = one_node("MatMulIntegerToFloat", inputs, F32, consts={"b", "sb", "zb", "bias"})
    graph, got, want = run_both(model, feeds)
    assert "qmatmul" in graph.op_counts()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b_dt", [U8, I8])
def test_dynamic_quantize_matmul(b_dt):
    inputs = {"a": RNG.standard_normal((2, 4, 16)).astype(F32), "b": codes(b_dt, (16, 6)),
              "sb": RNG.uniform(0.002, 0.01, (6,)).astype(F32), "zb": np.zeros(6, b_dt) + (0 if b_dt is I8 else 128),
              "bias": RNG.standard_normal(6).astype(F32)}
    inputs["zb"] = inputs["zb"].astype(b_dt)
    model, feeds = one_node("DynamicQuantizeMatMul", inputs, F32, consts={"b", "sb", "zb", "bias"})
    _, got, want = run_both(model, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ====================================================================== com.microsoft Q / DQ

@pytest.mark.parametrize("dtype", [U8, I8])
def test_contrib_quantize_dequantize_same_codes(dtype):
    x = RNG.standard_normal((3, 4)).astype(F32)
    s, z = np.array(0.02, F32), zp(dtype)
    model, feeds = one_node("QuantizeLinear", {"x": x, "s": s, "z": z}, dtype, consts={"s", "z"})
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)
    q = codes(dtype, (3, 4))
    model, feeds = one_node("DequantizeLinear", {"q": q, "s": s, "z": z}, F32, consts={"s", "z"})
    _, got, want = run_both(model, feeds)
    np.testing.assert_array_equal(got, want)


# ====================================================================== rules for all inputs

@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 5), k=st.integers(1, 40), n=st.integers(1, 7), seed=st.integers(0, 2**31),
       signed=st.booleans(), per_column=st.booleans())
def test_qgemm_same_codes_for_any_shape_and_scales(m, k, n, seed, signed, per_column):
    """QGemm is integer arithmetic and one f32 multiply: kiln's codes are onnxruntime's, whatever the data."""
    rng = np.random.default_rng(seed)
    dt = I8 if signed else U8

    def draw(dtype, shape):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, shape).astype(dtype)
    sb = rng.uniform(1e-4, 0.05, (n,) if per_column else ()).astype(F32)
    inputs = {"a": draw(dt, (m, k)), "sa": np.array(rng.uniform(1e-3, 0.2), F32), "za": draw(dt, ()),
              "b": draw(I8, (k, n)), "sb": sb, "zb": np.zeros(sb.shape, I8),
              "c": rng.integers(-20000, 20000, (n,)).astype(I32),
              "sy": np.array(rng.uniform(1e-3, 0.5), F32), "zy": draw(dt, ())}
    model, feeds = one_node("QGemm", inputs, dt, consts={"b", "sb", "zb", "c", "sa", "za", "sy", "zy"})
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**31), signed=st.booleans())
def test_qlinear_global_average_pool_same_codes_for_any_data(h, w, seed, signed):
    rng = np.random.default_rng(seed)
    dt = I8 if signed else U8
    info = np.iinfo(dt)
    inputs = {"x": rng.integers(info.min, info.max + 1, (1, 3, h, w)).astype(dt),
              "sx": np.array(rng.uniform(1e-3, 0.1), F32), "zx": np.array(rng.integers(info.min, info.max + 1), dt),
              "sy": np.array(rng.uniform(1e-3, 0.1), F32), "zy": np.array(rng.integers(info.min, info.max + 1), dt)}
    model, feeds = one_node("QLinearGlobalAveragePool", inputs, dt, consts={"sx", "zx", "sy", "zy"})
    _, got, want = run_both(model, feeds)
    assert_same_codes(got, want)


def test_dynamic_quantize_lstm_is_listed_as_unsupported():
    """kiln has no quantized LSTM (onnxruntime requantizes x and h at every step): a clean refusal."""
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"], domain=MS, hidden_size=2)
    model = make_model([node], [vi("x", F32, [1, 1, 2])], [vi("y", F32, None)],
                       {"w": codes(I8, (1, 2, 8)), "r": codes(I8, (1, 2, 8))}, opset=17, extra_opsets={MS: 1})
    with pytest.raises(UnsupportedOpsError, match="DynamicQuantizeLSTM"):
        lift(model)


# ====================================================================== compiled kernels

def _compiled_cases() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    """One small model per contrib op (and per lowering path of QGemm)."""
    rng_codes = {"x": codes(U8, (2, 4, 6, 6)), "sx": scale(), "zx": zp(U8), "sy": scale(0.02, 0.05), "zy": zp(U8)}
    pq = {"sx", "zx", "sy", "zy"}
    binary = {"a": codes(I8, (3, 40)), "sa": scale(), "za": zp(I8), "b": codes(I8, (40,)), "sb": scale(),
              "zb": zp(I8), "sc": scale(0.05, 0.2), "zc": zp(I8)}
    bq = {"sa", "za", "sb", "zb", "sc", "zc"}
    gemm = {"a": codes(U8, (4, 24)), "sa": scale(), "za": zp(U8), "b": codes(I8, (10, 24)),
            "sb": RNG.uniform(0.002, 0.01, (10,)).astype(F32), "zb": np.zeros(10, I8),
            "c": RNG.integers(-3000, 3000, (10,)).astype(I32), "sy": scale(0.05, 0.2), "zy": zp(U8)}
    gq = {"b", "sb", "zb", "c", "sy", "zy", "sa", "za"}
    act = {"x": every_code(I8, (4, 64)), "sx": scale(0.03, 0.06), "zx": zp(I8), "sy": np.array(1 / 256, F32),
           "zy": np.array(-128, I8)}
    return {
        "qgemm": one_node("QGemm", gemm, U8, consts=gq, transB=1),
        "qgemm_mn_bias": one_node("QGemm", {**gemm, "c": RNG.integers(-3000, 3000, (4, 10)).astype(I32)}, U8,
                                  consts=gq, transB=1),
        "qlinear_add": one_node("QLinearAdd", binary, I8, consts=bq),
        "qlinear_mul": one_node("QLinearMul", binary, I8, consts=bq),
        "qlinear_sigmoid": one_node("QLinearSigmoid", act, I8, consts=pq),
        "qlinear_leaky_relu": one_node("QLinearLeakyRelu", act, I8, consts=pq, alpha=0.2),
        "qlinear_global_average_pool": one_node("QLinearGlobalAveragePool", rng_codes, U8, consts=pq),
        "qlinear_average_pool": one_node("QLinearAveragePool", rng_codes, U8, consts=pq, kernel_shape=[3, 3],
                                         pads=[1, 1, 1, 1], strides=[2, 2]),
        "qlinear_softmax": one_node("QLinearSoftmax", {**act, "x": codes(I8, (6, 20))}, I8, consts=pq, opset=13),
        "qlinear_concat": one_node("QLinearConcat", {"sy": scale(0.05, 0.1), "zy": zp(U8), "x0": codes(U8, (2, 3)),
                                                     "s0": scale(), "z0": zp(U8), "x1": codes(U8, (2, 5)),
                                                     "s1": scale(), "z1": zp(U8)}, U8,
                                   consts={"sy", "zy", "s0", "z0", "s1", "z1"}, axis=1),
        "qlinear_where": one_node("QLinearWhere", {"c": RNG.random((3, 8)) < 0.5, "x": codes(U8, (3, 8)),
                                                   "sx": scale(), "zx": zp(U8), "w": codes(U8, (3, 8)),
                                                   "sw": scale(), "zw": zp(U8), "sz": scale(), "zz": zp(U8)}, U8,
                                  consts={"sx", "zx", "sw", "zw", "sz", "zz"}),
        "matmul_integer_to_float": one_node(
            "MatMulIntegerToFloat", {"a": codes(U8, (3, 16)), "b": codes(I8, (16, 5)), "sa": scale(),
                                     "sb": RNG.uniform(0.002, 0.01, (5,)).astype(F32), "za": zp(U8),
                                     "zb": np.zeros(5, I8), "bias": RNG.standard_normal(5).astype(F32)}, F32,
            consts={"b", "sb", "zb", "bias"}),
        "dynamic_quantize_matmul": one_node(
            "DynamicQuantizeMatMul", {"a": RNG.standard_normal((3, 16)).astype(F32), "b": codes(I8, (16, 5)),
                                      "sb": RNG.uniform(0.002, 0.01, (5,)).astype(F32), "zb": np.zeros(5, I8),
                                      "bias": RNG.standard_normal(5).astype(F32)}, F32,
            consts={"b", "sb", "zb", "bias"}),
    }


COMPILED = _compiled_cases()
@pytest.mark.slow
@pytest.mark.parametrize("case", list(COMPILED))
def test_compiled_kernels_match_onnxruntime(case):
    """The compiled artifact against onnxruntime: same codes within the interpreter's tolerance."""
    import kiln

    model, feeds = COMPILED[case]
    want = ort_outputs(model, feeds)[0]
    got = next(iter(kiln.compile(model, example_inputs=feeds).load().run(feeds).values()))
    if want.dtype == F32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    elif case in ("qgemm", "qgemm_mn_bias", "qlinear_global_average_pool", "qlinear_concat"):
        assert_same_codes(got, want)
    else:
        assert_within_one_code(got, want)
