"""TVM lowerings of the elementwise ops against the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.ir.registry import all_ops
from kiln.ir.types import from_numpy_dtype, to_numpy_dtype

from .util import check_graph_kernels

SHAPES = [((4, 33), (4, 33)), ((3, 1, 40), (5, 1)), ((2, 16), (1,))]


def rand(rng: np.random.Generator, shape, dtype: str, lo: float = -3.0, hi: float = 3.0) -> np.ndarray:
    dt = to_numpy_dtype(dtype)
    if dt == np.bool_:
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        return rng.integers(max(lo, np.iinfo(dt).min), min(hi, np.iinfo(dt).max) + 1, size=shape).astype(dt)
    return rng.uniform(lo, hi, size=shape).astype(dt)


def _type(dtype: str, shape) -> str:
    return f"{dtype}[{', '.join(map(str, shape))}]"


def check_op(op: str, args: list[tuple[str, np.ndarray]], out_dtype: str | None = None, attrs: str = "") -> None:
    """One-node graph ``z = op(args...) {attrs}`` lowered, run and compared with the interpreter."""
    dtypes = [from_numpy_dtype(a.dtype) for _, a in args]
    shape = np.broadcast_shapes(*(a.shape for _, a in args))
    params = ", ".join(f"%{n}: {_type(d, a.shape)}" for (n, a), d in zip(args, dtypes))
    operands = ", ".join(f"%{n}" for n, _ in args)
    text = (f"graph @g({params}) -> (%z) {{\n"
            f"  %z = {op}({operands}){' ' + attrs if attrs else ''} : {_type(out_dtype or dtypes[0], shape)}\n}}")
    check_graph_kernels(text, dict(args))


BINARY_FLOAT = ["add", "sub", "mul", "div", "pow", "max", "min", "sum"]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("op", BINARY_FLOAT)
def test_binary_float(op, shapes):
    rng = np.random.default_rng(0)
    lo = 0.1 if op == "pow" else -3.0
    a, b = rand(rng, shapes[0], "f32", lo), rand(rng, shapes[1], "f32", 0.5)
    check_op(op, [("a", a), ("b", b)])


@pytest.mark.parametrize("dtype", ["i8", "u8", "i32", "i64"])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "max", "min"])
def test_binary_int(op, dtype):
    rng = np.random.default_rng(1)
    a, b = rand(rng, (3, 20), dtype, -100, 100), rand(rng, (20,), dtype, -9, 9)
    if op == "div":
        b[:3] = [0, -1, 1] if dtype[0] == "i" else [0, 1, 1]
        a[0, :3] = np.iinfo(a.dtype).min
    check_op(op, [("a", a), ("b", b)])


def test_rank0_operand():
    rng = np.random.default_rng(2)
    check_op("add", [("a", rand(rng, (2, 16), "f32")), ("b", rand(rng, (), "f32"))])


def test_add_bool():
    rng = np.random.default_rng(2)
    check_op("add", [("a", rand(rng, (4, 8), "bool")), ("b", rand(rng, (8,), "bool"))])


@pytest.mark.parametrize("dtype", ["f64", "f16"])
@pytest.mark.parametrize("op", ["add", "div", "max"])
def test_binary_other_floats(op, dtype):
    rng = np.random.default_rng(3)
    check_op(op, [("a", rand(rng, (3, 17), dtype)), ("b", rand(rng, (17,), dtype, 0.5))])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("op", ["max", "min", "sum"])
def test_variadic(op, n):
    rng = np.random.default_rng(4)
    shapes = [(2, 3, 8), (3, 1), (8,)][:n]
    check_op(op, [(f"x{i}", rand(rng, s, "f32")) for i, s in enumerate(shapes)])


def test_max_min_propagate_nan():
    a = np.array([np.nan, 1.0, 2.0, np.nan], np.float32)
    b = np.array([0.0, np.nan, 1.0, np.nan], np.float32)
    for op in ("max", "min"):
        check_op(op, [("a", a), ("b", b)])


@pytest.mark.parametrize("dtype", ["i8", "u16", "i32", "i64"])
@pytest.mark.parametrize("fmod", [0, 1])
def test_mod_int(dtype, fmod):
    rng = np.random.default_rng(5)
    a, b = rand(rng, (4, 24), dtype, -120, 120), rand(rng, (24,), dtype, -9, 9)
    b[0] = 0
    check_op("mod", [("a", a), ("b", b)], attrs=f"{{fmod = {fmod}}}")


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_mod_float(dtype):
    rng = np.random.default_rng(6)
    a = rand(rng, (3, 20), dtype, -50, 50)
    b = rand(rng, (3, 1), dtype, 0.1, 3) * np.array([[1], [-1], [1]], to_numpy_dtype(dtype))
    check_op("mod", [("a", a), ("b", b)], attrs="{fmod = 1}")


@pytest.mark.parametrize(("dtype", "edtype"), [("i32", "i32"), ("i8", "i32"), ("u8", "u8"), ("i64", "i64"),
                                               ("i32", "f32"), ("f32", "i32"), ("f64", "f64")])
def test_pow_mixed(dtype, edtype):
    rng = np.random.default_rng(7)
    a = rand(rng, (3, 16), dtype, -6 if dtype[0] != "f" else 0.1, 6)
    b = rand(rng, (16,), edtype, 0, 9 if dtype[0] != "f" else 3)
    check_op("pow", [("a", a), ("b", b)])


@pytest.mark.parametrize("op", ["equal", "less", "less_equal", "greater", "greater_equal"])
@pytest.mark.parametrize("dtype", ["f32", "i32", "u8"])
def test_compare(op, dtype):
    rng = np.random.default_rng(8)
    a, b = rand(rng, (3, 1, 12), dtype, 0, 4), rand(rng, (5, 1), dtype, 0, 4)
    check_op(op, [("a", a), ("b", b)], out_dtype="bool")


def test_compare_nan():
    a = np.array([np.nan, 1.0, np.nan], np.float32)
    b = np.array([1.0, np.nan, np.nan], np.float32)
    for op in ("equal", "less", "greater_equal"):
        check_op(op, [("a", a), ("b", b)], out_dtype="bool")


@pytest.mark.parametrize("op", ["and", "or"])
def test_logic(op):
    rng = np.random.default_rng(9)
    check_op(op, [("a", rand(rng, (4, 1, 8), "bool")), ("b", rand(rng, (3, 8), "bool"))])


def test_not():
    check_op("not", [("x", rand(np.random.default_rng(10), (5, 7), "bool"))])


@pytest.mark.parametrize("dtype", ["f32", "i8", "bool"])
def test_where(dtype):
    rng = np.random.default_rng(11)
    args = [("c", rand(rng, (4, 1), "bool")), ("a", rand(rng, (4, 9), dtype)), ("b", rand(rng, (9,), dtype))]
    check_op("where", args, out_dtype=dtype)


UNARY_DOMAIN = {"log": (0.01, 5.0), "sqrt": (0.0, 5.0), "reciprocal": (0.2, 5.0)}
UNARY_FLOAT = ["neg", "abs", "sign", "exp", "log", "sqrt", "reciprocal", "floor", "ceil", "round", "tanh", "sin",
               "cos", "erf", "relu", "sigmoid", "softplus", "silu", "identity"]


@pytest.mark.parametrize("op", UNARY_FLOAT)
def test_unary_float(op):
    rng = np.random.default_rng(12)
    lo, hi = UNARY_DOMAIN.get(op, (-6.0, 6.0))
    x = rand(rng, (5, 67), "f32", lo, hi)
    x[0, :8] = [0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 1e-3] if op not in UNARY_DOMAIN else x[0, :8]
    check_op(op, [("x", x)])


@pytest.mark.parametrize("op", ["exp", "tanh", "sigmoid", "softplus", "silu", "erf"])
def test_unary_extreme_values(op):
    x = np.array([-200.0, -100.0, -88.5, -20.0, -1e-6, 1e-6, 20.0, 88.5, 88.7, 88.8, 100.0, np.inf, -np.inf, np.nan],
                 np.float32)
    check_op(op, [("x", x)])


@pytest.mark.parametrize("op", ["exp", "tanh", "erf", "log", "sigmoid", "round"])
@pytest.mark.parametrize("dtype", ["f64", "f16"])
def test_unary_other_floats(op, dtype):
    x = rand(np.random.default_rng(13), (4, 9), dtype, 0.1 if op == "log" else -3.0, 3.0)
    check_op(op, [("x", x)])


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f64"])
@pytest.mark.parametrize(("op", "attrs"), [("gelu", ""), ("gelu", '{approximate = "tanh"}'), ("mod", "{fmod = 1}"),
                                           ("pow", ""), ("silu", "")])
def test_other_float_dtypes(op, attrs, dtype):
    rng = np.random.default_rng(21)
    args = [("a", rand(rng, (3, 8), dtype, 0.5 if op == "pow" else -3.0))]
    if op in ("mod", "pow"):
        args.append(("b", rand(rng, (8,), dtype, 0.5)))
    check_op(op, args, attrs=attrs)


@pytest.mark.parametrize("op", ["neg", "abs", "sign", "relu", "identity"])
@pytest.mark.parametrize("dtype", ["i8", "i32", "u8", "i64"])
def test_unary_int(op, dtype):
    check_op(op, [("x", rand(np.random.default_rng(14), (3, 11), dtype, -50, 50))])


@pytest.mark.parametrize("op", ["relu", "sign", "abs", "neg", "floor", "round"])
def test_unary_nan(op):
    check_op(op, [("x", np.array([np.nan, -1.0, 1.0, np.inf, -np.inf], np.float32))])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(2, 64), (3, 5, 7)])
def test_gelu(approximate, shape):
    x = rand(np.random.default_rng(15), shape, "f32", -8, 8)
    check_op("gelu", [("x", x)], attrs=f'{{approximate = "{approximate}"}}')


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_leaky_relu(alpha):
    check_op("leaky_relu", [("x", rand(np.random.default_rng(16), (4, 19), "f32"))], attrs=f"{{alpha = {alpha}}}")


@pytest.mark.parametrize("attrs", ["", "{alpha = 0.5, beta = 0.1}"])
def test_hard_sigmoid(attrs):
    check_op("hard_sigmoid", [("x", rand(np.random.default_rng(17), (4, 19), "f32", -5, 5))], attrs=attrs)


@pytest.mark.parametrize("bounds", ["", "{min = -1.0}", "{max = 0.5}", "{min = -0.5, max = 2.0}", "{min = 0.0, max = 6.0}"])
@pytest.mark.parametrize("dtype", ["f32", "i32", "u8"])
def test_clip(bounds, dtype):
    x = rand(np.random.default_rng(18), (3, 21), dtype, -5, 8)
    check_op("clip", [("x", x)], attrs=bounds)


def test_clip_int_fractional_and_wide_bounds():
    x = rand(np.random.default_rng(19), (40,), "i8", -128, 127)
    check_op("clip", [("x", x)], attrs="{min = -1.5, max = 2.5}")
    check_op("clip", [("x", x)], attrs="{min = -1000.0, max = 1000.0}")


def test_clip_nan():
    check_op("clip", [("x", np.array([np.nan, -3.0, 3.0], np.float32))], attrs="{min = -1.0, max = 1.0}")


CASTS = [("f32", "i32"), ("f32", "i8"), ("f32", "u8"), ("f32", "bool"), ("f32", "f64"), ("f32", "f16"), ("f32", "bf16"),
         ("bf16", "f32"),
         ("f64", "f32"), ("i32", "f32"), ("i32", "i8"), ("i64", "i32"), ("u8", "i8"), ("i32", "bool"),
         ("bool", "f32"), ("bool", "i32"), ("f16", "f32"), ("f64", "i64")]


@pytest.mark.parametrize(("src", "dst"), CASTS)
def test_cast(src, dst):
    rng = np.random.default_rng(20)
    hi = 250 if dst in ("u8",) else 120
    x = rand(rng, (3, 13), src, -300 if src[0] != "u" else 0, 300) if src[0] in "iu" else rand(rng, (3, 13), src, -hi, hi)
    if src[0] == "f" and dst in ("u8",):
        x = np.abs(x)
    if src[0] == "f":
        x[0, :3] = [0.0, -0.7, 0.7]
    check_op("cast", [("x", x)], out_dtype=dst, attrs=f'{{to = "{dst}"}}')


def test_cast_nan_to_bool():
    check_op("cast", [("x", np.array([np.nan, 0.0, -0.0, 2.0], np.float32))], out_dtype="bool",
             attrs='{to = "bool"}')


def test_every_elementwise_op_is_lowered():
    ops = {n: d for n, d in all_ops().items() if d.reference.__module__.endswith(".elementwise")}
    assert ops
    missing = [n for n, d in ops.items() if d.lower_tvm is None]
    assert not missing


@pytest.mark.parametrize("dtype", ["f16", "f32", "f64"])
def test_mod_float_fmod_0(dtype):
    """numpy's mod (ONNX opset 28): the divisor's sign, zeros signed like it, x mod +-inf per the spec."""
    dt = to_numpy_dtype(dtype)
    a = np.array([-4.3, 7.2, 5, 0, -0.0, 0, -0.0, -3, 3, -1, 1, np.inf, -np.inf, 1, 1, np.nan, 1], dt)
    b = np.array([2.1, -3.4, 8, -2, 2, 2, -2, np.inf, np.inf, -np.inf, -np.inf, 2, 2, 0, -0.0, 2, np.nan], dt)
    check_op("mod", [("a", a), ("b", b)], attrs="{fmod = 0}")
    rng = np.random.default_rng(61)
    check_op("mod", [("a", rand(rng, (3, 20), dtype, -50, 50)), ("b", rand(rng, (3, 1), dtype, -3, 3))],
             attrs="{fmod = 0}")


def _clip_text(dtype: str, lo: bool, hi: bool, attrs: str = "") -> str:
    ins = [f"%x: {dtype}[3,7]"] + ([f"%lo: {dtype}[]"] if lo else []) + ([f"%hi: {dtype}[1]"] if hi else [])
    args = ", ".join(["%x", "%lo" if lo else "_"] + (["%hi"] if hi else []))
    return (f"graph @g({', '.join(ins)}) -> (%y) {{\n"
            f"  %y = clip({args}){attrs} : {dtype}[3,7]\n}}\n")


@pytest.mark.parametrize("dtype", ["f32", "f64", "i32", "u8"])
@pytest.mark.parametrize("lo,hi,attrs", [(True, True, ""), (True, False, " {max = 3.0}"), (False, True, ""),
                                         (False, True, " {min = 1.0}")])
def test_clip_operand_bounds(dtype, lo, hi, attrs):
    rng = np.random.default_rng(62)
    dt = to_numpy_dtype(dtype)
    feeds = {"x": rand(rng, (3, 7), dtype, 0, 9)}
    if lo:
        feeds["lo"] = np.array(2, dt)
    if hi:
        feeds["hi"] = np.array([6], dt)
    check_graph_kernels(_clip_text(dtype, lo, hi, attrs), feeds)


def test_clip_operand_bounds_min_above_max_and_nan():
    x = np.array([[-2.0, 0.0, 2.0, np.nan, 1.0, -1.0, 5.0]] * 3, np.float32)
    check_graph_kernels(_clip_text("f32", True, True), {"x": x, "lo": np.array(1.0, np.float32),
                                                        "hi": np.array([-1.0], np.float32)})
    check_graph_kernels(_clip_text("f32", True, True), {"x": x, "lo": np.array(np.nan, np.float32),
                                                        "hi": np.array([1.0], np.float32)})


# ------------------------------------------------------------------ float8 casts (kiln's bit-level codec)

F8 = ["f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"]


def _run_cast(x: np.ndarray, dst: str, attrs: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(compiled, interpreted) results of ``cast(x) {to = dst, attrs}``."""
    from kiln.codegen.kernel import lower_node, run_kernel
    from kiln.ir.interpret import interpret
    from kiln.ir.text import parse

    from .util import TARGET

    src = from_numpy_dtype(x.dtype)
    extra = f", {attrs}" if attrs else ""
    g = parse(f"graph @g(%x: {_type(src, x.shape)}) -> (%z) {{\n"
              f'  %z = cast(%x) {{to = "{dst}"{extra}}} : {_type(dst, x.shape)}\n}}')
    k = lower_node(g.nodes[0], TARGET)
    assert not k.notes, k.notes
    (got,) = run_kernel(k, {"x": x}, TARGET)
    return got, interpret(g, {"x": x})["z"]


def _assert_same_floats(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype and the same value bit for bit, any NaN matching any NaN."""
    assert got.dtype == want.dtype
    g, w = got.astype(np.float64), want.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    ok = ~np.isnan(w)
    np.testing.assert_array_equal(np.signbit(g[ok]), np.signbit(w[ok]))
    np.testing.assert_array_equal(g[ok], w[ok])


def _f8_edges(dst: str, dtype: np.dtype) -> np.ndarray:
    """Every code's value and the midpoints between neighbours (ties), +-, with 0, inf, NaN, overflow."""
    import ml_dtypes

    vals = np.arange(256, dtype=np.uint8).view(to_numpy_dtype(dst)).astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = (vals[1:] + vals[:-1]) / 2
    big = float(ml_dtypes.finfo(to_numpy_dtype(dst)).max)
    more = [0.0, -0.0, np.inf, -np.inf, np.nan, big * 1.01, -big * 1.01, big * 1.0625, big * 3, 1e30, -1e30,
            1e-30, -1e-30]
    x = np.concatenate([vals, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), more])
    with np.errstate(over="ignore"):
        return np.concatenate([x, -x]).astype(dtype)


@pytest.mark.parametrize("saturate", [None, 0, 1])
@pytest.mark.parametrize("src", ["f32", "f64", "f16"])
@pytest.mark.parametrize("dst", F8)
def test_cast_to_float8_rounds_and_saturates_like_the_reference(dst, src, saturate):
    x = _f8_edges(dst, to_numpy_dtype(src))
    got, want = _run_cast(x, dst, "" if saturate is None else f"saturate = {saturate}")
    _assert_same_floats(got, want)


@pytest.mark.parametrize("dst", ["f32", "f16", "bf16", "f64", "i32", "bool"] + F8)
@pytest.mark.parametrize("src", F8 + ["f8e8m0"])
def test_cast_from_float8_decodes_every_code(src, dst):
    x = np.arange(256, dtype=np.uint8).view(to_numpy_dtype(src))
    if dst in ("i32",):  # int of NaN/inf is undefined: only finite codes
        x = x[np.isfinite(x.astype(np.float32))]
    if src == dst:
        return
    got, want = _run_cast(x, dst)
    if dst in ("i32", "bool"):
        np.testing.assert_array_equal(got, want)
    else:
        _assert_same_floats(got, want)


@pytest.mark.parametrize("round_mode", [None, "up", "down", "nearest"])
@pytest.mark.parametrize("saturate", [None, 0])
@pytest.mark.parametrize("src", ["f32", "f64"])
def test_cast_to_e8m0(src, saturate, round_mode):
    rng = np.random.default_rng(5)
    x = np.concatenate([2.0 ** np.arange(-130, 128), 1.5 * 2.0 ** np.arange(-10, 10),
                        rng.uniform(-1e3, 1e3, 64), [0.0, np.inf, np.nan, 3e38, 1 + 2**-30, 2**-127],
                        2.0 ** 127 * np.array([1.0, 1.75])]).astype(to_numpy_dtype(src))
    attrs = ", ".join(([] if saturate is None else [f"saturate = {saturate}"])
                      + ([] if round_mode is None else [f'round_mode = "{round_mode}"']))
    got, want = _run_cast(x, "f8e8m0", attrs)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_cast_to_float8_from_integers():
    x = np.array([0, 1, -1, 3, 17, 300, -449, 464, 465, 100000, -(2**31)], np.int32)
    for dst in F8:
        got, want = _run_cast(x, dst)
        _assert_same_floats(got, want)
