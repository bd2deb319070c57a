"""Elementwise and broadcasting ops: references vs onnxruntime, broadcasting rule vs numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from kiln import ir
from kiln.ir import OpTypeError, TensorType

from .onnx_single import T, assert_same, check, infer, run_graph, run_kiln

ARITH = ["add", "sub", "mul", "div"]
COMPARE = ["equal", "less", "less_equal", "greater", "greater_equal"]
VARIADIC = ["max", "min", "sum"]
UNARY_ANY = ["neg", "abs", "sign", "relu", "identity"]
UNARY_FLOAT = ["exp", "tanh", "sin", "cos", "erf", "sigmoid", "softplus", "floor", "ceil", "round"]
UNARY_POSITIVE = ["log", "sqrt", "reciprocal"]
COVERED = set(ARITH + COMPARE + VARIADIC + UNARY_ANY + UNARY_FLOAT + UNARY_POSITIVE) | {
    "mod", "pow", "and", "or", "not", "where", "silu", "gelu", "leaky_relu", "hard_sigmoid", "clip", "cast"}

rng = np.random.default_rng(4)
SHAPE_PAIRS = [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((), (2, 3)), ((1,), (5, 1)),
               ((2, 1, 3), (4, 1))]


def rnd(shape, dtype=np.float32, lo=-5.0, hi=5.0):
    if np.dtype(dtype).kind in "iu":
        lo = max(lo, 0) if np.dtype(dtype).kind == "u" else lo
        return rng.integers(int(lo), int(hi) + 1, size=shape).astype(dtype)
    return rng.uniform(lo, hi, size=shape).astype(dtype)


def nonzero(shape, dtype):
    x = rnd(shape, dtype, -7, 7)
    return np.where(x == 0, np.asarray(3, dtype), x).astype(dtype)


# ------------------------------------------------------------------ binary arithmetic

@pytest.mark.parametrize("op", ARITH)
@pytest.mark.parametrize("shapes", SHAPE_PAIRS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_arith(op, shapes, dtype):
    a = rnd(shapes[0], dtype, -20, 20)
    b = nonzero(shapes[1], dtype) if op == "div" else rnd(shapes[1], dtype, -20, 20)
    check(op, [a, b])


@pytest.mark.parametrize("op", ARITH)
@pytest.mark.parametrize("dtype", [np.float16, np.uint8, np.int8, np.uint32, np.uint64, np.int16])
def test_arith_more_dtypes(op, dtype):
    try:  # onnxruntime lacks some integer kernels: fall back to the exact result where it does
        check(op, [rnd((3, 4), dtype, 0, 9), nonzero((3, 4), dtype) if op == "div" else rnd((3, 4), dtype, 0, 9)])
    except Exception as e:  # noqa: BLE001
        if "NOT_IMPLEMENTED" not in str(e):
            raise
        a, b = rnd((3, 4), dtype, 0, 9), nonzero((3, 4), dtype) if op == "div" else rnd((3, 4), dtype, 0, 9)
        (y,), _ = run_kiln(op, [a, b])
        py = {"add": lambda p, q: p + q, "sub": lambda p, q: p - q, "mul": lambda p, q: p * q,
              "div": lambda p, q: int(p / q)}[op]
        want = np.array([py(int(p), int(q)) for p, q in zip(a.ravel(), b.ravel())]).astype(dtype).reshape(3, 4)
        np.testing.assert_array_equal(y, want)


def test_integer_division_truncates_toward_zero():
    a = np.array([7, -7, 7, -7, 2 ** 62 + 1, -(2 ** 62 + 1), 0, -1], np.int64)
    b = np.array([2, 2, -2, -2, 3, 3, -5, 4], np.int64)
    (y,), _ = run_kiln("div", [a, b])
    want = [abs(p) // abs(q) * (1 if (p < 0) == (q < 0) else -1) for p, q in zip(a.tolist(), b.tolist())]
    assert y.tolist() == want  # exact beyond 2**53, where a float64 detour would round
    check("div", [a, b])


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.int8])
def test_mod_int(fmod, dtype):
    a = np.array([7, -7, 7, -7, 0, 5, -5, 3], dtype)
    b = np.array([3, 3, -3, -3, 2, 5, 5, -8], dtype)
    (y,), _ = run_kiln("mod", [a, b], {"fmod": fmod})
    want = [math.fmod(p, q) if fmod else p - q * math.floor(p / q) for p, q in zip(a.tolist(), b.tolist())]
    assert y.tolist() == want
    check("mod", [a, b], {"fmod": fmod})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mod_float(dtype):
    check("mod", [rnd((3, 4), dtype, -9, 9), nonzero((1, 4), dtype)], {"fmod": 1})


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_mod_float_fmod_0_is_floor_mod(dtype):
    """ONNX opset 28: a - floor(a/b)*b with its listed special cases (onnxruntime has no kernel for it)."""
    a = np.array([-4.5, 7.25, 0.0, -0.0, -3.0, 3.0, -1.0, 1.0, np.inf, 1.0, np.nan, 2.0], dtype)
    b = np.array([2.0, -3.0, -2.0, 2.0, np.inf, np.inf, -np.inf, -np.inf, 2.0, 0.0, 2.0, np.nan], dtype)
    (y,), _ = run_kiln("mod", [a, b], {"fmod": 0})
    want = [1.5, -1.75, -0.0, 0.0, np.inf, 3.0, -1.0, -np.inf, np.nan, np.nan, np.nan, np.nan]
    np.testing.assert_array_equal(y, np.array(want, dtype))
    assert y.dtype == dtype and np.signbit(y[2]) and not np.signbit(y[3])


@pytest.mark.parametrize("a_dt,b_dt,a_lo", [(np.float32, np.float32, 0.1), (np.float32, np.int64, -3.0),
                                            (np.float64, np.float32, 0.1), (np.int64, np.int64, -3),
                                            (np.int32, np.int32, 0)])
def test_pow(a_dt, b_dt, a_lo):
    a = rnd((3, 4), a_dt, a_lo, 3)
    b = rnd((4,), b_dt, 0, 3) if np.dtype(b_dt).kind == "i" else rnd((4,), b_dt, -2, 2)
    check("pow", [a, b])


@pytest.mark.parametrize("op", VARIADIC)
@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 4), (4,)], [(2, 1, 4), (3, 1), (1,)]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_variadic(op, shapes, dtype):
    xs = [rnd(s, dtype) for s in shapes]
    if op == "sum" and np.dtype(dtype).kind == "i":
        with pytest.raises(OpTypeError, match="float"):  # ONNX Sum is float-only
            infer(op, [TensorType.of(x) for x in xs])
        return
    check(op, xs)


@pytest.mark.parametrize("op", ["max", "min"])
def test_max_min_propagate_nan(op):
    a = np.array([1.0, np.nan, 3.0], np.float32)
    b = np.array([np.nan, 2.0, 1.0], np.float32)
    (y,), _ = run_kiln(op, [a, b])
    assert np.isnan(y[:2]).all() and y[2] == (3.0 if op == "max" else 1.0)
    check(op, [a, b])


# ------------------------------------------------------------------ comparisons and logic

@pytest.mark.parametrize("op", COMPARE)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
@pytest.mark.parametrize("shapes", SHAPE_PAIRS[:3])
def test_compare(op, dtype, shapes):
    check(op, [rnd(shapes[0], dtype, -2, 2).round(), rnd(shapes[1], dtype, -2, 2).round()])  # many equal pairs


@pytest.mark.parametrize("op", ["and", "or"])
@pytest.mark.parametrize("shapes", SHAPE_PAIRS[:3])
def test_logic(op, shapes):
    check(op, [rng.random(shapes[0]) < 0.5, rng.random(shapes[1]) < 0.5])


def test_not():
    check("not", [rng.random((3, 4)) < 0.5])


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), (3, 4)), ((3, 1), (1, 4), ()), ((4,), (2, 1, 4), (2, 3, 1))])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_where(shapes, dtype):
    check("where", [rng.random(shapes[0]) < 0.5, rnd(shapes[1], dtype), rnd(shapes[2], dtype)])


# ------------------------------------------------------------------ unary

@pytest.mark.parametrize("op", UNARY_ANY)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int32, np.int64, np.float16])
def test_unary_any(op, dtype):
    x = rnd((3, 5), dtype, -5, 5)
    if op == "relu" and dtype == np.int64:  # onnxruntime has no int64 Relu kernel
        (y,), _ = run_kiln(op, [x])
        np.testing.assert_array_equal(y, np.where(x > 0, x, 0))
        return
    check(op, [x])


# math-module oracles for float64, where onnxruntime 1.31 has no kernel (Erf, Softplus) or
# computes in float32 (Gelu tanh)
MATH = {"erf": math.erf, "softplus": lambda v: math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v)),
        "sigmoid": lambda v: 1 / (1 + math.exp(-v)), "tanh": math.tanh, "exp": math.exp, "sin": math.sin,
        "cos": math.cos, "floor": math.floor, "ceil": math.ceil, "round": round}


@pytest.mark.parametrize("op", UNARY_FLOAT)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary_float(op, dtype):
    x = rnd((4, 5), dtype, -6, 6)
    if op in ("round", "floor", "ceil"):
        x = np.concatenate([x.ravel(), np.arange(-3.5, 4, 0.5, dtype=dtype)])  # ties round half to even
    if op in ("erf", "softplus") and dtype == np.float64:
        (y,), _ = run_kiln(op, [x])
        np.testing.assert_allclose(y.ravel(), [MATH[op](v) for v in x.ravel().tolist()], rtol=1e-14)
        return
    check(op, [x])


@pytest.mark.parametrize("op", UNARY_FLOAT)
def test_unary_float64_vs_math(op):
    x = rnd((40,), np.float64, -30, 30)
    (y,), _ = run_kiln(op, [x])
    np.testing.assert_allclose(y, [MATH[op](v) for v in x.tolist()], rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("op", UNARY_POSITIVE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary_positive(op, dtype):
    check(op, [rnd((4, 5), dtype, 0.05, 9)])


def test_unary_f16():
    for op in ("exp", "tanh", "sigmoid", "sqrt", "erf"):
        check(op, [rnd((3, 4), np.float16, 0.1, 3)])


def test_round_half_to_even_by_hand():
    (y,), _ = run_kiln("round", [np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32)])
    assert y.tolist() == [0, 2, 2, -0, -2, -2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu(dtype):
    # silu has no ONNX op before Swish (opset 24); its ONNX spelling is Mul(x, Sigmoid(x))
    x = rnd((3, 7), dtype, -8, 8)
    (y,), (t,) = run_kiln("silu", [x])
    assert TensorType.of(y) == t
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    (want,) = run_graph(nodes, {"x": x}, {}, [("y", t.dtype)])
    assert_same(y, want)


def test_silu_decompose():
    g = ir.Graph("d")
    x = g.add_input("x", TensorType("f64", (3, 4)))
    node = g.add_node("silu", [x])
    g.set_outputs(node.outputs)
    (new,) = ir.get_op("silu").decompose(g, node)
    g.replace_all_uses(node.output, new)
    g.remove(node)
    ir.verify(g)
    xs = rnd((3, 4), np.float64)
    np.testing.assert_allclose(ir.interpret(g, {"x": xs})[new.name], xs / (1 + np.exp(-xs)), rtol=1e-14)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    check("gelu", [rnd((4, 6), np.float32, -5, 5)], {"approximate": approximate})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_f64_by_formula(approximate):
    x = rnd((30,), np.float64, -6, 6)
    (y,), _ = run_kiln("gelu", [x], {"approximate": approximate})
    if approximate == "none":
        want = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
    else:
        want = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x.tolist()]
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-15)  # 1 + tanh(..) cancels for x << 0


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_leaky_relu(alpha):
    check("leaky_relu", [rnd((3, 4))], {"alpha": alpha})


def test_hard_sigmoid():
    check("hard_sigmoid", [rnd((3, 4))], {"alpha": 0.3, "beta": 0.4})
    check("hard_sigmoid", [rnd((3, 4))])


@pytest.mark.parametrize("lo,hi", [(None, None), (-1.0, None), (None, 2.0), (-1.5, 0.5), (2.0, 1.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_clip(lo, hi, dtype):
    if dtype == np.int64 and lo is not None:
        lo = math.floor(lo)
    if dtype == np.int64 and hi is not None:
        hi = math.floor(hi)
    attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
    check("clip", [rnd((3, 4), dtype)], attrs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("which", ["both", "min", "max"])
def test_clip_operand_bounds(dtype, which):
    """min/max as one-value operands (ONNX Clip's inputs 1 and 2, read at run time)."""
    x = rnd((3, 4), dtype)
    lo = np.array(-1 if np.dtype(dtype).kind == "i" else -0.5, dtype)
    hi = np.array([2 if np.dtype(dtype).kind == "i" else 0.75], dtype)
    args = [x, lo if which != "max" else None, hi if which != "min" else None]
    check("clip", args)
    (y,), _ = run_kiln("clip", args)
    assert (y >= lo).all() if which != "max" else (y <= hi).all()


def test_clip_operand_min_above_max_gives_max_and_nan_bound_gives_nan():
    x = np.array([-2.0, 0.0, 2.0], np.float32)
    (y,), _ = run_kiln("clip", [x, np.array(1.0, np.float32), np.array(-1.0, np.float32)])
    assert y.tolist() == [-1.0, -1.0, -1.0]
    (y,), _ = run_kiln("clip", [x, np.array(np.nan, np.float32)])
    assert np.isnan(y).all()


CASTS = [
    ("f32", "i32", [-2.7, -0.5, 0.0, 0.5, 2.7, 100.9, -100.9]),
    ("f32", "i64", [-2.7, 3.99, -3.99]),
    ("f32", "u8", [0.0, 1.7, 254.9]),
    ("f32", "i8", [-127.9, 126.9, -0.9]),
    ("f32", "bool", [0.0, -0.0, 1.0, -2.5, 1e-30]),
    ("f32", "f16", [1.0, 1e-3, 65504.0, -3.14159]),
    ("f32", "bf16", [1.0, 1e-3, 3.0e38, -3.14159]),
    ("f32", "f64", [1.0, 0.1]),
    ("f64", "f32", [0.1, 1e300, -1e-300]),
    ("i64", "f32", [2 ** 40 + 1, -7, 0]),
    ("i32", "i8", [5, -5, 127]),
    ("i32", "bool", [0, 3, -1]),
    ("bool", "f32", [True, False]),
    ("bool", "i64", [True, False]),
    ("u8", "i32", [0, 255]),
    ("f16", "f32", [0.5, -65504.0]),
]


@pytest.mark.parametrize("src,dst,values", CASTS)
def test_cast(src, dst, values):
    x = np.array(values).astype(TensorType(src, ()).np_dtype)
    check("cast", [x], {"to": dst}, rtol=0, atol=0)


def test_cast_float_to_int_truncates():
    (y,), _ = run_kiln("cast", [np.array([-2.7, 2.7, -0.2], np.float32)], {"to": "i32"})
    assert y.tolist() == [-2, 2, 0]


# ------------------------------------------------------------------ broadcasting rule (property)

dims = st.integers(0, 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(dims, max_size=4), min_size=1, max_size=3))
def test_broadcast_rule_agrees_with_numpy(shapes):
    ts = [TensorType("f32", tuple(s)) for s in shapes]
    try:
        want = np.broadcast_shapes(*(tuple(s) for s in shapes))
    except ValueError:
        with pytest.raises(OpTypeError, match="broadcast"):
            infer("sum", ts)
        return
    assert infer("sum", ts) == [TensorType("f32", want)]
    if len(ts) == 2:
        assert infer("add", ts) == [TensorType("f32", want)]
        assert infer("less", ts) == [TensorType("bool", want)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from([1, 2, 3, "N", "S"]), max_size=3), min_size=2, max_size=3),
       st.integers(1, 3), st.integers(1, 3))
def test_symbolic_broadcast_agrees_with_numpy_for_every_binding(shapes, n, s):
    env = {"N": n, "S": s}
    ts = [TensorType("f32", tuple(sh)) for sh in shapes]
    try:
        (t,) = infer("mul", ts)
    except OpTypeError:
        return  # refusing is allowed (e.g. N vs 3); accepting must be right for every binding
    concrete = [tuple(env.get(d, d) for d in sh) for sh in shapes]
    try:
        want = np.broadcast_shapes(*concrete)
    except ValueError:
        return  # a binding under which the graph is ill-typed; the runtime rejects such inputs
    assert tuple(env.get(d, d) for d in t.shape) == want


# ------------------------------------------------------------------ type errors

@pytest.mark.parametrize("op,types,attrs,match", [
    ("add", ["f32[3]", "i32[3]"], {}, "dtype"),
    ("add", ["f32[3]", "f32[4]"], {}, "broadcast"),
    ("and", ["f32[3]", "f32[3]"], {}, "bool"),
    ("where", ["f32[3]", "f32[3]", "f32[3]"], {}, "condition must be bool"),
    ("where", ["bool[3]", "f32[3]", "i32[3]"], {}, "dtype"),
    ("exp", ["i32[3]"], {}, "float"),
    ("sum", ["i32[3]", "i32[3]"], {}, "float"),
    ("mod", ["bool[3]", "bool[3]"], {}, "bool"),
    ("clip", ["f32[3]", "f32[2]"], {}, "one value"),
    ("clip", ["f32[3]", "f64[]"], {}, "dtype"),
    ("clip", ["f32[3]", "f32[]"], {"min": 0.0}, "both as an operand and as an attribute"),
])
def test_type_errors(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer(op, types, **attrs)
    assert str(e.value).startswith(f"{op}:")


def test_symbolic_dims_flow():
    assert infer("add", ["f32[N,1,64]", "f32[S,1]"]) == [T("f32[N,S,64]")]
    assert infer("where", ["bool[B,1,S,S]", "f32[]", "f32[B,H,S,S]"]) == [T("f32[B,H,S,S]")]
    assert infer("cast", ["f32[N,3]"], to="i8") == [T("i8[N,3]")]


def test_gelu_rejects_an_unknown_approximation_in_its_type_rule():
    """Fuzzer finding: approximate="bogus" verified and only the reference refused it."""
    g = ir.Graph("g")
    x = g.add_input("x", TensorType("f32", (2,)))
    with pytest.raises(OpTypeError, match="approximate must be 'none' or 'tanh'"):
        g.op("gelu", x, approximate="bogus")
