"""Ops of family 'math': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.ir import OpTypeError, TensorType

from .onnx_single import ONNX_DTYPE, assert_same, check, infer, kdt, run_kiln, to_onnx

TRIG = ["acos", "asin", "atan", "acosh", "asinh", "atanh", "sinh", "cosh", "tan"]
ACTIVATIONS = ["celu", "selu", "mish", "softsign", "shrink", "thresholded_relu", "swish"]
BITWISE = ["bitwise_and", "bitwise_or", "bitwise_xor"]
COVERED = set(TRIG + ACTIVATIONS + BITWISE) | {"is_nan", "is_inf", "xor", "bitwise_not", "bit_shift"}

INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
DOMAIN = {"acos": (-1.0, 1.0), "asin": (-1.0, 1.0), "atanh": (-0.999, 0.999), "acosh": (1.0, 30.0),
          "sinh": (-20.0, 20.0), "cosh": (-20.0, 20.0), "tan": (-10.0, 10.0)}
rng = np.random.default_rng(11)


def rnd(shape, dtype=np.float32, lo=-5.0, hi=5.0) -> np.ndarray:
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(int(lo), info.min), min(int(hi), info.max), size=shape, dtype=dtype,
                            endpoint=True)
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def onnx_reference(op: str, inputs: list[np.ndarray], attrs: dict | None = None, *, opset: int) -> list[np.ndarray]:
    """The op as one ONNX node (via its OnnxSpec) run by ONNX's own reference evaluator at ``opset``."""
    types = ir.infer_types(op, [TensorType.of(a) for a in inputs], ir.get_op(op).complete_attrs(attrs or {}))
    node, feeds, inits = to_onnx(op, inputs, attrs or {}, [t.dtype for t in types])
    ins = [helper.make_tensor_value_info(k, ONNX_DTYPE[kdt(v)], list(v.shape)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, ONNX_DTYPE[t.dtype], None) for o, t in zip(node.output, types)]
    model = helper.make_model(helper.make_graph([node], "single", ins, outs),
                              opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)


# ------------------------------------------------------------------ float predicates

SPECIALS = np.array([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf, np.nan, 3.0e38, -1e-40])


def specials(dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        return SPECIALS.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_is_nan(dtype):
    x = specials(dtype)
    (y,) = check("is_nan", [x])
    assert y.tolist() == [False] * 6 + [True] + [False] * 2


@pytest.mark.parametrize("neg,pos", [(1, 1), (1, 0), (0, 1), (0, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_is_inf(neg, pos, dtype):
    x = specials(dtype)
    (y,) = check("is_inf", [x], {"detect_negative": neg, "detect_positive": pos})
    want = [False] * len(x)
    want[4], want[5] = bool(pos), bool(neg)
    if dtype == np.float16:
        want[7] = bool(pos)  # 3e38 overflows to +inf in f16
    assert y.tolist() == want


def test_is_inf_bf16_via_onnx_reference():
    x = specials(TensorType("bf16", ()).np_dtype)
    (y,), _ = run_kiln("is_inf", [x], {"detect_positive": 0})
    assert y.tolist() == [False, False, False, False, False, True, False, False, False]


# ------------------------------------------------------------------ trigonometric and hyperbolic


@pytest.mark.parametrize("op", TRIG)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_trig_vs_onnxruntime(op, dtype):
    lo, hi = DOMAIN.get(op, (-8.0, 8.0))
    if dtype == np.float16 and op in ("sinh", "cosh"):
        lo, hi = -9.0, 9.0  # beyond, the f16 result overflows
    check(op, [rnd((3, 17), dtype, lo, hi)], rtol=1e-5 if dtype == np.float32 else None)


@pytest.mark.parametrize("op", TRIG)
def test_trig_float64_vs_math(op):
    """float64 against Python's math module (an implementation independent of numpy's ufuncs)."""
    lo, hi = DOMAIN.get(op, (-8.0, 8.0))
    x = rnd((40,), np.float64, lo, hi)
    (y,), _ = run_kiln(op, [x])
    want = np.array([getattr(math, op)(v) for v in x.tolist()])
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("op,x,want", [
    ("acos", [1.5, -1.0, 1.0], [math.nan, math.pi, 0.0]),
    ("asin", [-1.5, 1.0, -0.0], [math.nan, math.pi / 2, -0.0]),
    ("atan", [math.inf, -math.inf, math.nan], [math.pi / 2, -math.pi / 2, math.nan]),
    ("acosh", [0.5, 1.0, math.inf], [math.nan, 0.0, math.inf]),
    ("atanh", [1.0, -1.0, 1.5], [math.inf, -math.inf, math.nan]),
    ("sinh", [math.inf, -math.inf, 89.0], [math.inf, -math.inf, math.sinh(89.0)]),
    ("cosh", [math.inf, -math.inf, -89.0], [math.inf, math.inf, math.cosh(89.0)]),
    ("tan", [math.inf, 0.0, math.nan], [math.nan, 0.0, math.nan]),
])
def test_trig_edges(op, x, want):
    (y,), _ = run_kiln(op, [np.array(x, np.float32)])
    np.testing.assert_allclose(y, np.array(want, np.float32), rtol=1e-6)
    real = ~np.isnan(np.array(want))
    assert (np.signbit(y[real]) == np.signbit(np.array(want)[real])).all()  # -0.0 stays -0.0


@settings(max_examples=200, deadline=None)
@given(st.floats(-1.0, 1.0))
def test_acos_plus_asin_is_half_pi(v):
    x = np.array([v])
    (a,), _ = run_kiln("acos", [x])
    (b,), _ = run_kiln("asin", [x])
    assert abs(a[0] + b[0] - math.pi / 2) < 1e-15


@settings(max_examples=200, deadline=None)
@given(st.floats(-30.0, 30.0))
def test_cosh_squared_minus_sinh_squared(v):
    x = np.array([v])
    (c,), _ = run_kiln("cosh", [x])
    (s,), _ = run_kiln("sinh", [x])
    assert abs((c[0] - s[0]) * (c[0] + s[0]) - 1.0) < 1e-12 * c[0] ** 2 + 1e-15


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("attrs", [{}, {"alpha": 2.0}, {"alpha": 0.5}])
def test_celu(attrs):
    check("celu", [rnd((4, 9), np.float32, -6, 6)], attrs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("attrs", [{}, {"alpha": 2.0, "gamma": 0.5}])
def test_selu(attrs, dtype):
    check("selu", [rnd((4, 9), dtype, -6, 6)], attrs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op", ["mish", "softsign"])
def test_mish_softsign(op, dtype):
    x = rnd((4, 9), dtype, -12, 12)
    x[0, :3] = [0.0, 30.0, -30.0]
    check(op, [x])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("alpha", [1.0, -0.5, 0.0])
def test_thresholded_relu(alpha, dtype):
    x = rnd((4, 9), dtype, -3, 3)
    x[0, :2] = [alpha, np.nan]
    (y,) = check("thresholded_relu", [x], {"alpha": alpha})
    assert y[0, 0] == 0 and y[0, 1] == 0  # not above alpha; NaN compares false


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16] + INT_DTYPES)
@pytest.mark.parametrize("attrs", [{}, {"bias": 2.0, "lambd": 1.0}, {"bias": 1.5, "lambd": 3.0}])
def test_shrink(attrs, dtype):
    x = rnd((4, 13), dtype, -9, 20)
    if np.dtype(dtype).kind == "u" and attrs.get("bias", 0) > attrs.get("lambd", 0.5):
        x = np.where(x > attrs["lambd"], np.maximum(x, 2), x).astype(dtype)  # no wrap below 0
    if dtype == np.float64:  # onnxruntime's double Shrink rounds through float32
        (y,), _ = run_kiln("shrink", [x], attrs)
        assert_same(y, onnx_reference("shrink", [x], attrs, opset=21)[0])
        return
    check("shrink", [x], attrs)


def test_shrink_int_truncates_toward_zero():
    x = np.array([-5, -3, -1, 0, 1, 3, 5], np.int32)
    (y,), _ = run_kiln("shrink", [x], {"bias": 1.5, "lambd": 2.0})
    assert y.tolist() == [int(v + 1.5) if v < -2 else int(v - 1.5) if v > 2 else 0 for v in x.tolist()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_swish_vs_onnx_reference(alpha, dtype):
    """Swish is opset 24, which onnxruntime 1.31 lacks: ONNX's reference evaluator is the oracle."""
    x = rnd((3, 11), dtype, -8, 8)
    (y,), _ = run_kiln("swish", [x], {"alpha": alpha})
    (want,) = onnx_reference("swish", [x], {"alpha": alpha}, opset=24)
    assert_same(y, want.astype(dtype), rtol=2e-3 if dtype == np.float16 else None)


def test_swish_alpha_one_is_silu():
    x = rnd((5, 7), np.float64, -8, 8)
    (a,), _ = run_kiln("swish", [x])
    (b,), _ = run_kiln("silu", [x])
    np.testing.assert_allclose(a, b, rtol=1e-15)


@pytest.mark.parametrize("op,attrs", [("swish", {"alpha": 0.5}), ("mish", {})])
def test_decompositions_match_the_op(op, attrs):
    """The decompositions lower_to_onnx uses below the op's opset compute what the op does."""
    g = ir.Graph("d")
    x = g.add_input("x", TensorType("f64", (3, 8)))
    node = g.add_node(op, [x], attrs)
    g.set_outputs(ir.get_op(op).decompose(g, node))
    g.remove(node)
    ir.verify(g)
    xv = rnd((3, 8), np.float64, -6, 6)
    (want,), _ = run_kiln(op, [xv], attrs)
    np.testing.assert_allclose(next(iter(ir.interpret(g, {"x": xv}).values())), want, rtol=1e-13)


# ------------------------------------------------------------------ logic and bitwise


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((2, 1, 4), (3, 1)), ((), (5,))])
def test_xor(shapes):
    (y,) = check("xor", [rnd(shapes[0], np.int8, 0, 1).astype(bool), rnd(shapes[1], np.int8, 0, 1).astype(bool)])
    assert y.dtype == np.bool_


@pytest.mark.parametrize("op", BITWISE)
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bitwise_binary(op, dtype):
    info = np.iinfo(dtype)
    check(op, [rnd((3, 1, 5), dtype, info.min, info.max), rnd((4, 1), dtype, info.min, info.max)])


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bitwise_not(dtype):
    info = np.iinfo(dtype)
    x = rnd((4, 6), dtype, info.min, info.max)
    x[0, :2] = [info.min, info.max]
    (y,) = check("bitwise_not", [x])
    assert y[0, 0] == info.max and y[0, 1] == info.min


def _shift_by_hand(x: int, s: int, left: bool, dtype) -> int:
    """BitShift-28 in Python integers: wrap to the dtype's bits; out-of-range shifts give the fill."""
    info = np.iinfo(dtype)
    bits = info.bits
    if not 0 <= s < bits:
        return -1 if (not left and x < 0) else 0
    if not left:
        return x >> s
    v = (x << s) & ((1 << bits) - 1)
    return v - (1 << bits) if info.min < 0 and v > info.max else v


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bit_shift_by_hand(direction, dtype):
    info = np.iinfo(dtype)
    x = rnd((6, 1), dtype, info.min, info.max)
    x[:3, 0] = [info.min, info.max, 1]
    s = np.arange(-3 if info.min < 0 else 0, info.bits + 3).astype(dtype)
    (y,), _ = run_kiln("bit_shift", [x, s], {"direction": direction})
    want = [[_shift_by_hand(int(a), int(b), direction == "LEFT", dtype) for b in s.tolist()] for a in x[:, 0].tolist()]
    assert y.tolist() == want


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_bit_shift_vs_onnx(direction, dtype):
    """Unsigned in-range shifts against onnxruntime (BitShift-11); every case against ONNX's reference
    at opset 28, which onnxruntime 1.31 lacks."""
    info = np.iinfo(dtype)
    x = rnd((3, 8), dtype, info.min, info.max)
    s = rnd((8,), dtype, -2 if info.min < 0 else 0, info.bits + 1)
    (y,), _ = run_kiln("bit_shift", [x, s], {"direction": direction})
    (want,) = onnx_reference("bit_shift", [x, s], {"direction": direction}, opset=28)
    assert_same(y, want)
    if dtype in (np.uint8, np.uint32, np.uint64):  # onnxruntime's BitShift kernels
        check("bit_shift", [x, rnd((8,), dtype, 0, info.bits - 1)], {"direction": direction})


# ------------------------------------------------------------------ type rules


def test_type_rules():
    assert infer("is_nan", ["f16[N,3]"]) == [TensorType("bool", ("N", 3))]
    assert infer("is_inf", ["bf16[2]"], detect_positive=0) == [TensorType("bool", (2,))]
    assert infer("acosh", ["f64[N]"]) == [TensorType("f64", ("N",))]
    assert infer("bitwise_and", ["u16[3,1]", "u16[4]"]) == [TensorType("u16", (3, 4))]
    assert infer("bit_shift", ["i8[2,3]", "i8[3]"], direction="RIGHT") == [TensorType("i8", (2, 3))]
    assert infer("xor", ["bool[2,1]", "bool[5]"]) == [TensorType("bool", (2, 5))]
    assert infer("shrink", ["i32[4]"]) == [TensorType("i32", (4,))]


@pytest.mark.parametrize("op,types,attrs,match", [
    ("is_nan", ["i32[3]"], {}, "float"),
    ("is_inf", ["bool[3]"], {}, "float"),
    ("acos", ["i64[3]"], {}, "float"),
    ("swish", ["i32[3]"], {}, "float"),
    ("shrink", ["bool[3]"], {}, "dtype"),
    ("shrink", ["i4[3]"], {}, "dtype"),
    ("celu", ["f32[3]"], {"alpha": 0.0}, "nonzero"),
    ("xor", ["bool[3]", "i8[3]"], {}, "bool"),
    ("bitwise_or", ["f32[3]", "f32[3]"], {}, "dtype"),
    ("bitwise_and", ["i8[3]", "u8[3]"], {}, "one dtype"),
    ("bitwise_not", ["bool[3]"], {}, "dtype"),
    ("bit_shift", ["u8[3]", "u8[3]"], {"direction": "left"}, "LEFT"),
    ("bit_shift", ["u8[3]", "u8[4]"], {"direction": "LEFT"}, "broadcast"),
    ("bit_shift", ["u8[3]", "u8[3]"], {}, "direction"),
])
def test_type_rule_refusals(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match):
        infer(op, types, **attrs)
