"""Ops of family 'dtypes' and the narrow-type rules of ``cast``: references against onnxruntime,
ONNX's reference, a brute-force nearest-value oracle and hand-checked values; type rules."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.numpy_helper import to_float8e8m0

from kiln.ir import OpTypeError
from kiln.ir.ops.dtypes import convert, f32_round_to_odd
from kiln.ir.types import DTYPES

from .onnx_single import infer, run_kiln

COVERED = {"bitcast"}  # every op of the family, each named again in a test below
F8 = ["f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"]
ONNX_F8 = {"f8e4m3fn": TensorProto.FLOAT8E4M3FN, "f8e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
           "f8e5m2": TensorProto.FLOAT8E5M2, "f8e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ}
SPECIAL = np.array([0.0, -0.0, 0.3, -1.7, 1e-7, -1e-7, 240.0, 447.0, 449.0, 500.0, 6e4, 1e6, -1e6,
                    np.inf, -np.inf, np.nan, 0.0107421875, 2.0 ** -10, 2.0 ** -17], np.float32)


def test_family_module_imports():
    import kiln.ir.ops.dtypes  # noqa: F401


def _ort_cast_f8(x: np.ndarray, to: str, saturate: int) -> np.ndarray:
    """onnxruntime's Cast(x -> float8, saturate), carried back as float32 by an exact Cast."""
    nodes = [helper.make_node("Cast", ["x"], ["y8"], to=ONNX_F8[to], saturate=saturate),
             helper.make_node("Cast", ["y8"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("to", F8)
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_to_float8_matches_onnxruntime(to, saturate):
    attrs = {"to": to} if saturate else {"to": to, "saturate": 0}
    (y,), (t,) = run_kiln("cast", [SPECIAL], attrs)
    assert y.dtype == DTYPES[to] and t.dtype == to
    want = _ort_cast_f8(SPECIAL, to, saturate)
    got = y.astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert got[ok].tolist() == want[ok].tolist()
    assert np.signbit(got[ok]).tolist() == np.signbit(want[ok]).tolist()


def test_cast_float8_saturation_by_hand():
    x = np.array([np.inf, -1e6, 449.0, 465.0, np.nan], np.float32)
    (sat,), _ = run_kiln("cast", [x], {"to": "f8e4m3fn"})
    (raw,), _ = run_kiln("cast", [x], {"to": "f8e4m3fn", "saturate": 0})
    assert sat.astype(np.float32)[:4].tolist() == [448.0, -448.0, 448.0, 448.0]
    assert np.isnan(sat.astype(np.float32)[4])
    r = raw.astype(np.float32)
    assert r[2] == 448.0 and np.isnan(r[[0, 1, 3, 4]]).all()  # 449 rounds to 448; 465 is past 464
    (e5,), _ = run_kiln("cast", [x], {"to": "f8e5m2", "saturate": 0})
    assert e5.astype(np.float32)[:2].tolist() == [np.inf, -np.inf]


def test_float64_converts_with_one_rounding():
    # 1 + 2**-4 is the midpoint of 1 and 1.125 in float8_e4m3fn; the extra 2**-40 lies above it.
    x = np.array([1 + 2.0 ** -4 + 2.0 ** -40, 1 + 2.0 ** -4, 1 + 2.0 ** -8 + 2.0 ** -40], np.float64)
    assert convert(x[:2], "f8e4m3fn").astype(np.float64).tolist() == [1.125, 1.0]
    assert convert(x[2:], "bf16").astype(np.float64).tolist() == [1 + 2.0 ** -7]
    (y,), _ = run_kiln("cast", [x[:1]], {"to": "f8e5m2"})
    assert y.astype(np.float64).tolist() == [1.0]  # below e5m2's midpoint 1.125


def _all_values(to: str) -> tuple[np.ndarray, np.ndarray]:
    """Every finite value of a float8 type (as float64) and its bit pattern."""
    bits = np.arange(256, dtype=np.uint8)
    vals = bits.view(DTYPES[to]).astype(np.float64)
    ok = np.isfinite(vals)
    return vals[ok], bits[ok]


@pytest.mark.parametrize("to", F8)
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-7e4, 7e4, allow_nan=False, width=64), min_size=1, max_size=16))
def test_saturating_float8_cast_is_the_nearest_value_ties_to_even(to, xs):
    vals, bits = _all_values(to)
    x = np.array(xs, np.float64)
    got = convert(x, to).astype(np.float64)
    for xi, gi in zip(x, got):
        xc = min(max(xi, vals.min()), vals.max())
        d = np.abs(vals - xc)
        best = np.flatnonzero(d == d.min())
        if len(best) > 1:  # a tie: the even bit pattern (zero's two signs are one value)
            best = [b for b in best if bits[b] % 2 == 0] or best
        assert gi == vals[best[0]], (xi, gi, vals[best])


def test_round_to_odd_marks_inexact_values():
    x = np.array([1.0, 1 + 2.0 ** -30, -(1 + 2.0 ** -30), 1e300, 1e-300], np.float64)
    y = f32_round_to_odd(x)
    assert y[0] == 1.0
    assert y[1] == np.float32(1 + 2.0 ** -23) and y[2] == -np.float32(1 + 2.0 ** -23)
    assert y[3] == np.finfo(np.float32).max and 0 < y[4] < 1e-44


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_to_e8m0_matches_onnx_numpy_helper(mode, saturate):
    x = np.array([0.0, 0.124, 0.25, 0.5, 1.1, 1.5, 2.0, 3.0, 4.0, 8.0, 3e38, 2.0 ** 127 * 1.5, 1e-40,
                  np.nan, np.inf, 0.75, 6.0], np.float32)
    attrs = {"to": "f8e8m0", "round_mode": mode, "saturate": saturate}
    (y,), _ = run_kiln("cast", [x], attrs)
    want = to_float8e8m0(x, bool(saturate), mode)
    assert y.dtype == want.dtype and y.view(np.uint8).tolist() == want.view(np.uint8).tolist()


def test_cast_to_e8m0_by_hand():
    x = np.array([3.0, 1.1, 0.25], np.float32)
    up = convert(x, "f8e8m0").astype(np.float32).tolist()
    down = convert(x, "f8e8m0", round_mode="down").astype(np.float32).tolist()
    assert up == [4.0, 2.0, 0.25] and down == [2.0, 1.0, 0.25]


def test_cast_to_narrow_ints_truncates_and_wraps():
    x = np.array([-3.0, -2.7, 2.7, 1.0, 5.0], np.float32)
    assert convert(x, "i2").astype(np.int8).tolist() == [1, -2, -2, 1, 1]
    assert convert(x, "u2").astype(np.int8).tolist() == [1, 2, 2, 1, 1]
    assert convert(x, "i4").astype(np.int8).tolist() == [-3, -2, 2, 1, 5]
    assert convert(np.array([200, -9], np.int16), "i4").astype(np.int8).tolist() == [-8, 7]


def test_float4_and_float6_clamp_and_round_to_nearest_even():
    x = np.array([0.25, 0.75, 2.5, 5.0, 7.0, -100.0, np.inf], np.float32)
    assert convert(x, "f4e2m1").astype(np.float32).tolist() == [0.0, 1.0, 2.0, 4.0, 6.0, -6.0, 6.0]
    assert convert(np.array([100.0, 7.6], np.float32), "f6e2m3").astype(np.float32).tolist() == [7.5, 7.5]


def test_narrow_floats_widen_exactly():
    # (not f8e8m0: its smallest value 2**-127 is a float32 subnormal, which ONNX's bit rules round up)
    for name in ("f8e4m3fn", "f8e5m2fnuz", "f4e2m1", "f6e3m2"):
        bits = np.arange(1 << (8 if name.startswith("f8") else int(name[1])), dtype=np.uint8)
        x = bits.view(DTYPES[name])
        back = convert(convert(x, "f64"), name)
        same = (back.view(np.uint8) == bits) | np.isnan(x.astype(np.float64))
        assert same.all(), name
    assert convert(np.array([0.5, -7.5], ml_dtypes.float8_e4m3fn), "i32").tolist() == [0, -7]
    assert convert(np.array([0.0, np.nan], ml_dtypes.float8_e5m2), "bool").tolist() == [False, True]


def test_cast_matches_onnx_reference_on_every_pair():
    from onnx.reference import ReferenceEvaluator
    x = np.array([0.0, 0.4, -1.5, 3.0, 100.0, -7.0, 0.01], np.float32)
    for to in ["f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f4e2m1", "i2", "u2", "i4", "u4", "bf16"]:
        from kiln.frontend.dtypes import onnx_dtype
        node = helper.make_node("Cast", ["x"], ["y"], to=onnx_dtype(to))
        g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7])],
                              [helper.make_tensor_value_info("y", onnx_dtype(to), [7])])
        want = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)])).run(
            None, {"x": x})[0]
        (y,), _ = run_kiln("cast", [x], {"to": to})
        assert y.dtype == want.dtype and y.view(np.uint8).tolist() == want.view(np.uint8).tolist(), to


def test_cast_type_rule_checks_saturate_and_round_mode():
    assert [str(t) for t in infer("cast", ["f32[2,3]"], to="f8e5m2", saturate=0)] == ["f8e5m2[2,3]"]
    with pytest.raises(OpTypeError, match="saturate"):
        infer("cast", ["f32[2]"], to="f8e5m2", saturate=2)
    with pytest.raises(OpTypeError, match="round_mode"):
        infer("cast", ["f32[2]"], to="f8e8m0", round_mode="zero")


def test_cast_saturate_only_for_float8_targets_as_onnxruntime_requires():
    """ORT refuses Cast(saturate=...) to a non-float8 type; the fuzzer once set it on an f64 -> f32 cast."""
    with pytest.raises(OpTypeError, match="float8 targets only"):
        infer("cast", ["f64[2]"], to="f32", saturate=0)
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, saturate=0)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(Exception, match="saturate"):
        ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)],
                                               ir_version=10).SerializeToString())


# ------------------------------------------------------------------ bitcast

def test_bitcast_reads_the_bits():
    (y,), (t,) = run_kiln("bitcast", [np.array([1.0, -2.0], np.float32)], {"to": "i32"})
    assert t.dtype == "i32" and y.tolist() == [0x3F800000, -0x40000000]
    (u,), _ = run_kiln("bitcast", [np.array([-1, -8, 7], ml_dtypes.int4)], {"to": "u4"})
    assert u.astype(np.int8).tolist() == [15, 8, 7]
    (f,), _ = run_kiln("bitcast", [np.array([0x38, 0x7F], np.uint8)], {"to": "f8e4m3fn"})
    assert f.astype(np.float32)[0] == 1.0 and np.isnan(f.astype(np.float32)[1])
    (b,), _ = run_kiln("bitcast", [np.array([True, False])], {"to": "u8"})
    assert b.tolist() == [1, 0]
    (c,), _ = run_kiln("bitcast", [np.array([0, 1, 2], np.uint8)], {"to": "bool"})
    assert c.tolist() == [False, True, True]


def test_bitcast_matches_onnx_reference():
    from onnx.reference import ReferenceEvaluator
    x = np.array([[1.5, -0.0, np.inf]], np.float64)
    node = helper.make_node("BitCast", ["x"], ["y"], to=TensorProto.INT64)
    g = helper.make_graph([node], "b", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])])
    want = ReferenceEvaluator(helper.make_model(g, opset_imports=[helper.make_opsetid("", 26)])).run(
        None, {"x": x})[0]
    (y,), _ = run_kiln("bitcast", [x], {"to": "i64"})
    np.testing.assert_array_equal(y, want)
    assert onnx.defs.get_schema("BitCast", 26, "").since_version == 26


def test_bitcast_type_rule_needs_equal_widths():
    assert [str(t) for t in infer("bitcast", ["u8[N,2]"], to="f8e5m2fnuz")] == ["f8e5m2fnuz[N,2]"]
    assert [str(t) for t in infer("bitcast", ["f4e2m1[3]"], to="i4")] == ["i4[3]"]
    with pytest.raises(OpTypeError, match="bit widths"):
        infer("bitcast", ["f32[2]"], to="f64")
    with pytest.raises(OpTypeError, match="bit widths"):
        infer("bitcast", ["i4[2]"], to="i8")
