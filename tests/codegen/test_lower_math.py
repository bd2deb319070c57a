"""TVM lowerings of the 'math' family against the reference interpreter (and float32 accuracy in ulp)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.kernel import build_kernel, lower_node, run_kernel
from kiln.ir.registry import all_ops
from kiln.ir.text import parse

from .test_lower_elementwise import check_op, rand
from .util import TARGET

TRIG = ["acos", "asin", "atan", "tan", "acosh", "asinh", "atanh", "sinh", "cosh"]
DOMAIN = {"acos": (-1.0, 1.0), "asin": (-1.0, 1.0), "atanh": (-1.0, 1.0), "acosh": (1.0, 40.0)}
NUMPY = {"acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "tan": np.tan, "acosh": np.arccosh,
         "asinh": np.arcsinh, "atanh": np.arctanh, "sinh": np.sinh, "cosh": np.cosh}
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-38, 0.5, -0.5, np.inf, -np.inf, np.nan]


def _f32_kernel(op: str, x: np.ndarray):
    g = parse(f"graph @g(%x: f32[{x.size}]) -> (%z) {{\n  %z = {op}(%x) : f32[{x.size}]\n}}")
    return lower_node(g.nodes[0], TARGET, name="k")


def _ulp_error(op: str, x: np.ndarray) -> float:
    """The largest error of the compiled float32 kernel in units of float32's last place, against
    numpy in float64 (finite results only)."""
    (y,) = run_kernel(_f32_kernel(op, x), {"x": x}, TARGET)
    with np.errstate(all="ignore"):
        exact = NUMPY[op](x.astype(np.float64))
    ok = np.isfinite(exact) & (np.abs(exact) < 3e38)
    ulp = np.spacing(np.abs(exact[ok]).astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(y[ok].astype(np.float64) - exact[ok]) / ulp))


@pytest.mark.parametrize("op", TRIG)
def test_trig_f32(op):
    rng = np.random.default_rng(1)
    lo, hi = DOMAIN.get(op, (-9.0, 9.0))
    x = rand(rng, (5, 37), "f32", lo, hi)
    x.flat[:len(SPECIAL)] = SPECIAL
    check_op(op, [("x", x)])


@pytest.mark.parametrize(("op", "dtype"), [(op, "f64") for op in TRIG] + [
    (op, dt) for op in ("acos", "atanh", "tan", "sinh") for dt in ("f16", "bf16")])
def test_trig_other_floats(op, dtype):
    rng = np.random.default_rng(2)
    lo, hi = DOMAIN.get(op, (-5.0, 5.0))
    x = rand(rng, (3, 19), dtype, lo, hi)
    x.flat[:4] = [np.nan, np.inf, -np.inf, 0.0]
    check_op(op, [("x", x)])


@pytest.mark.parametrize("op,lo,hi,max_ulp", [
    ("acos", -1.0, 1.0, 2), ("asin", -1.0, 1.0, 3), ("atan", -50.0, 50.0, 3), ("atanh", -1.0, 1.0, 3),
    ("tan", -20.0, 20.0, 3), ("asinh", -50.0, 50.0, 4), ("acosh", 1.0, 50.0, 5), ("sinh", -20.0, 20.0, 8),
    ("cosh", -20.0, 20.0, 8),
])
def test_f32_accuracy_in_ulp(op, lo, hi, max_ulp):
    x = np.random.default_rng(3).uniform(lo, hi, 4000).astype(np.float32)
    assert _ulp_error(op, x) <= max_ulp


@pytest.mark.parametrize("op", ["atan", "asinh", "atanh", "sinh", "tan", "asin"])
def test_f32_tiny_arguments_keep_their_bits(op):
    """Near 0 these functions are x(1 + O(x**2)); formulas through log(1 + x) or e**x - 1 lose x."""
    x = np.concatenate([10.0 ** -np.arange(1, 38), -(10.0 ** -np.arange(1, 38, 3))]).astype(np.float32)
    assert _ulp_error(op, x) <= 3


def test_acosh_near_one():
    x = (1.0 + np.float32(2.0) ** -np.arange(1, 23)).astype(np.float32)
    assert _ulp_error("acosh", x) <= 4


def test_tan_reduces_huge_arguments_exactly():
    x = np.array([1e4, 1e6, 1e10, 1e20, 3.4e38, -2.5e30, 1e38, 8.0e7, 7.0e22, 1.5707964], np.float32)
    assert _ulp_error("tan", x) <= 3


def test_sinh_cosh_overflow_where_the_result_does():
    x = np.array([88.0, 89.0, 89.4, 89.5, 90.0, -89.4, -89.5], np.float32)
    for op in ("sinh", "cosh"):
        (y,) = run_kernel(_f32_kernel(op, x), {"x": x}, TARGET)
        with np.errstate(over="ignore"):
            want = NUMPY[op](x.astype(np.float64)).astype(np.float32)
        np.testing.assert_allclose(y, want, rtol=1e-5)


@pytest.mark.parametrize("op", TRIG + ["mish", "celu", "selu", "swish", "softsign"])
def test_f32_kernels_vectorize_without_libm(op):
    """The float32 kernels are vector code: no scalar libm call (acosf, sinhf, expf ...) per lane."""
    ll = build_kernel(_f32_kernel(op, np.zeros(256, np.float32)), TARGET).inspect_source("ll")
    calls = set(re.findall(r"call [^@]*@([\w.]+)\(", ll))
    assert not {c for c in calls if re.fullmatch(r"[a-z0-9]+f", c)}, calls
    assert re.search(r"<\d+ x float>", ll)


@pytest.mark.parametrize("dtype", ["f32", "f64", "f16", "bf16"])
def test_predicates(dtype):
    x = rand(np.random.default_rng(4), (4, 9), dtype, -3, 3)
    x.flat[:5] = [np.nan, np.inf, -np.inf, 0.0, -np.nan]
    check_op("is_nan", [("x", x)], out_dtype="bool")
    for neg, pos in [(1, 1), (1, 0), (0, 1), (0, 0)]:
        check_op("is_inf", [("x", x)], out_dtype="bool", attrs=f"{{detect_negative = {neg}, detect_positive = {pos}}}")


ACTIVATIONS = [("celu", ""), ("celu", "{alpha = 2.5}"), ("celu", "{alpha = 0.25}"), ("selu", ""),
               ("selu", "{alpha = 2.0, gamma = 0.5}"), ("mish", ""), ("swish", ""), ("swish", "{alpha = -0.75}"),
               ("softsign", ""), ("thresholded_relu", ""), ("thresholded_relu", "{alpha = -0.5}"),
               ("shrink", ""), ("shrink", "{bias = 1.5, lambd = 2.0}")]


@pytest.mark.parametrize(("op", "attrs", "dtype"), [(op, at, "f32") for op, at in ACTIVATIONS] + [
    (op, at, dt) for op, at in ACTIVATIONS[::2] for dt in ("f64", "f16", "bf16")])
def test_activations(op, attrs, dtype):
    x = rand(np.random.default_rng(5), (4, 21), dtype, -25, 25)
    x.flat[:9] = [0.0, -0.0, 1e-4, -1e-4, 0.3, -0.3, np.nan, np.inf, -np.inf]
    check_op(op, [("x", x)], attrs=attrs)


@pytest.mark.parametrize("dtype", ["i8", "u8", "i32", "u64"])
def test_shrink_int(dtype):
    x = rand(np.random.default_rng(6), (3, 17), dtype, -40, 40)
    check_op("shrink", [("x", x)], attrs="{bias = 1.5, lambd = 2.0}")
    check_op("shrink", [("x", x)], attrs="{bias = -3.0, lambd = 0.0}")


def test_xor():
    rng = np.random.default_rng(7)
    check_op("xor", [("a", rand(rng, (3, 1, 8), "bool")), ("b", rand(rng, (5, 1), "bool"))])


INTS = ["i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"]


@pytest.mark.parametrize("dtype", ["i8", "u16", "i32", "u64"])
def test_bitwise(dtype):
    rng = np.random.default_rng(8)
    info = np.iinfo(rand(rng, (1,), dtype).dtype)
    a = rng.integers(info.min, info.max, (3, 1, 20), dtype=info.dtype, endpoint=True)
    b = rng.integers(info.min, info.max, (4, 1), dtype=info.dtype, endpoint=True)
    for op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
        check_op(op, [("a", a), ("b", b)])
    check_op("bitwise_not", [("a", a)])


@pytest.mark.parametrize("direction", ["LEFT", "RIGHT"])
@pytest.mark.parametrize("dtype", INTS)
def test_bit_shift(direction, dtype):
    """Every shift from below 0 to beyond the width, on extreme and random values."""
    rng = np.random.default_rng(9)
    info = np.iinfo(rand(rng, (1,), dtype).dtype)
    x = rng.integers(info.min, info.max, (6, 1), dtype=info.dtype, endpoint=True)
    x[:4, 0] = [info.min, info.max, 1, info.max // 3]
    s = np.arange(-3 if info.min < 0 else 0, info.bits + 3).astype(info.dtype)
    check_op("bit_shift", [("x", x), ("s", s)], attrs=f'{{direction = "{direction}"}}')


def test_every_math_op_is_lowered():
    ops = {n: d for n, d in all_ops().items() if d.reference.__module__.endswith(".math")}
    assert len(ops) == 24
    assert not [n for n, d in ops.items() if d.lower_tvm is None]


def test_polynomial_constants_are_what_they_claim():
    from kiln.codegen.lowering.math import _TWO_OVER_PI

    # each part has at most 29 significant bits (so x*part is exact for a 24-bit x) ...
    for c in _TWO_OVER_PI:
        m, _ = math.frexp(c)
        assert (m * 2 ** 29).is_integer()
    # ... and together they are 2/pi to far below float64's precision
    assert abs(sum(_TWO_OVER_PI[:2]) - 2 / math.pi) < 1e-16
