"""TVM lowerings of quantize / dequantize against the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.kernel import CodegenError, lower_node
from kiln.ir.registry import all_ops
from kiln.ir.text import parse
from kiln.ir.types import from_numpy_dtype, to_numpy_dtype

from .util import TARGET, check_graph_kernels

LIMITS = {"i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535)}


def _t(a: np.ndarray) -> str:
    return f"{from_numpy_dtype(a.dtype)}[{', '.join(map(str, a.shape))}]"


def check(op: str, x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, out: str, attrs: str) -> None:
    args = [("x", x), ("s", scale)] + ([("zp", zp)] if zp is not None else [])
    params = ", ".join(f"%{n}: {_t(a)}" for n, a in args)
    operands = ", ".join(f"%{n}" for n, _ in args)
    text = (f"graph @g({params}) -> (%z) {{\n  %z = {op}({operands}) {attrs} : "
            f"{out}[{', '.join(map(str, x.shape))}]\n}}")
    check_graph_kernels(text, dict(args))


def _scale_shape(x_shape, axis: int, block_size: int, granularity: str) -> tuple[int, ...]:
    if granularity == "tensor":
        return (1,)
    if granularity == "scalar":
        return ()
    ax = axis % len(x_shape)
    if granularity == "axis":
        return (x_shape[ax],)
    return tuple(-(-d // block_size) if i == ax else d for i, d in enumerate(x_shape))


def _params(rng, shape, dtype: str, with_zp: bool, x_dtype: str = "f32"):
    scale = rng.uniform(0.02, 0.2, size=shape).astype(to_numpy_dtype(x_dtype))
    if not with_zp:
        return scale, None
    lo, hi = LIMITS[dtype]
    zp = rng.integers(lo + (hi - lo) // 4, hi - (hi - lo) // 4 + 1, size=shape).astype(to_numpy_dtype(dtype))
    return scale, zp


GRANULARITY = [("tensor", 1, 0), ("axis", 1, 0), ("axis", 0, 0), ("axis", -1, 0), ("block", 1, 4), ("block", -1, 3),
               ("block", 0, 2)]
QDTYPES = ["u8", "i8", "i16", "u16"]


@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize(("granularity", "axis", "block_size"), GRANULARITY)
def test_quantize(granularity, axis, block_size, dtype, with_zp):
    rng = np.random.default_rng(0)
    shape = (3, 10, 8)
    scale, zp = _params(rng, _scale_shape(shape, axis, block_size, granularity), dtype, with_zp)
    x = rng.uniform(-30, 30, size=shape).astype(np.float32)
    attrs = f'{{axis = {axis}, block_size = {block_size}, dtype = "{dtype}"}}'
    check("quantize", x, scale, zp, dtype, attrs)


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 1000.0, -1000.0, np.nan, np.inf, -np.inf], np.float32)
    scale = np.array([1.0], np.float32)
    for dtype, zp in [("u8", np.array([10], np.uint8)), ("i8", np.array([-3], np.int8)), ("i16", None)]:
        check("quantize", x, scale, zp, dtype, f'{{axis = 0, dtype = "{dtype}"}}')


@pytest.mark.parametrize("x_dtype", ["f16", "bf16"])
def test_quantize_half_inputs(x_dtype):
    rng = np.random.default_rng(1)
    x = rng.uniform(-20, 20, size=(4, 16)).astype(to_numpy_dtype(x_dtype))
    scale, zp = _params(rng, (16,), "i8", True, x_dtype)
    check("quantize", x, scale, zp, "i8", '{axis = 1, dtype = "i8"}')


def test_quantize_scalar_scale():
    rng = np.random.default_rng(2)
    scale, zp = _params(rng, (), "u8", True)
    check("quantize", rng.uniform(-5, 5, (4, 8)).astype(np.float32), scale, zp, "u8", '{dtype = "u8"}')


@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("dtype", ["u8", "i8", "i16", "u16", "i32"])
@pytest.mark.parametrize(("granularity", "axis", "block_size"), GRANULARITY)
def test_dequantize(granularity, axis, block_size, dtype, with_zp):
    rng = np.random.default_rng(3)
    shape = (3, 10, 8)
    sshape = _scale_shape(shape, axis, block_size, granularity)
    dt = to_numpy_dtype(dtype)
    info = (-(2**31), 2**31 - 1) if dtype == "i32" else LIMITS[dtype]
    x = rng.integers(info[0], info[1], size=shape, endpoint=True).astype(dt)
    scale = rng.uniform(0.02, 0.2, size=sshape).astype(np.float32)
    zp = rng.integers(info[0] // 2, info[1] // 2, size=sshape).astype(dt) if with_zp else None
    check("dequantize", x, scale, zp, "f32", f"{{axis = {axis}, block_size = {block_size}}}")


@pytest.mark.parametrize("s_dtype", ["f16", "bf16"])
def test_dequantize_half_scale(s_dtype):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=(5, 12)).astype(np.uint8)
    scale = rng.uniform(0.02, 0.2, size=(12,)).astype(to_numpy_dtype(s_dtype))
    zp = rng.integers(100, 150, size=(12,)).astype(np.uint8)
    check("dequantize", x, scale, zp, s_dtype, "{axis = -1}")


def test_dequantize_scalar_scale():
    x = np.arange(-8, 8, dtype=np.int8).reshape(2, 8)
    check("dequantize", x, np.array(0.5, np.float32), np.array(3, np.int8), "f32", "{}")


@pytest.mark.parametrize("text", [
    'graph @g(%x: f32[4, 8], %s: f32[1]) -> (%z) {\n  %z = quantize(%x, %s) {dtype = "i4"} : i4[4, 8]\n}',
    'graph @g(%x: u4[4, 8], %s: f32[1]) -> (%z) {\n  %z = dequantize(%x, %s) : f32[4, 8]\n}',
])
def test_int4_is_refused(text):
    """TVM 0.27 miscompiles sub-byte buffers (heap corruption), so the lowering refuses them."""
    with pytest.raises(CodegenError, match="int4"):
        lower_node(parse(text).nodes[0], TARGET)


def test_every_quant_op_is_lowered():
    ops = {n: d for n, d in all_ops().items() if d.reference.__module__.endswith(".quant")}
    assert ops
    assert not [n for n, d in ops.items() if d.lower_tvm is None]


F8 = ["f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"]


def _run(text: str, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(compiled, interpreted) output of a one-node graph."""
    from kiln.codegen.kernel import run_kernel
    from kiln.ir.interpret import interpret

    g = parse(text)
    k = lower_node(g.nodes[0], TARGET)
    assert not k.notes, k.notes
    (got,) = run_kernel(k, feeds, TARGET)
    return got, interpret(g, feeds)["z"]


def _same(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype and values bit for bit (any NaN equals any NaN)."""
    assert got.dtype == want.dtype
    g, w = got.astype(np.float64), want.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
    np.testing.assert_array_equal(np.nan_to_num(g), np.nan_to_num(w))


@pytest.mark.parametrize("saturate", [None, 0])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("dtype", F8)
def test_quantize_float8(dtype, with_zp, saturate):
    """x / scale (+ zero point) rounded by Cast's float8 rules, per axis; overflow, inf and NaN included."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-40, 40, (3, 16)).astype(np.float32)
    x[0, :6] = [np.inf, -np.inf, np.nan, 1e6, -1e6, 0.0]
    scale = np.array([0.01, 0.5, 3.0], np.float32)
    zp = np.array([0.0, 1.5, -2.0], np.float32).astype(to_numpy_dtype(dtype)) if with_zp else None
    args = [("x", x), ("s", scale)] + ([("zp", zp)] if zp is not None else [])
    attrs = f'{{axis = 0, dtype = "{dtype}"' + ("" if saturate is None else f", saturate = {saturate}") + "}"
    text = (f"graph @g({', '.join(f'%{n}: {_t(a)}' for n, a in args)}) -> (%z) {{\n"
            f"  %z = quantize({', '.join(f'%{n}' for n, _ in args)}) {attrs} : {dtype}[3, 16]\n}}")
    _same(*_run(text, dict(args)))


@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("dtype", F8)
def test_dequantize_float8_every_code(dtype, with_zp):
    x = np.arange(256, dtype=np.uint8).reshape(2, 128).view(to_numpy_dtype(dtype))
    scale = np.array([0.25, 3.0], np.float32)
    zp = np.array([1.0, -0.5], np.float32).astype(to_numpy_dtype(dtype)) if with_zp else None
    args = [("x", x), ("s", scale)] + ([("zp", zp)] if zp is not None else [])
    text = (f"graph @g({', '.join(f'%{n}: {_t(a)}' for n, a in args)}) -> (%z) {{\n"
            f"  %z = dequantize({', '.join(f'%{n}' for n, _ in args)}) {{axis = 0}} : f32[2, 128]\n}}")
    _same(*_run(text, dict(args)))


@pytest.mark.parametrize("dtype", ["i4", "u4", "f4e2m1"])
def test_subbyte_quantize_is_refused(dtype):
    g = parse(f"""graph @g(%x: f32[4], %s: f32[]) -> (%z) {{
      %z = quantize(%x, %s) {{axis = 0, dtype = "{dtype}"}} : {dtype}[4]
    }}""")
    with pytest.raises(CodegenError, match="sub-byte"):
        lower_node(g.nodes[0], TARGET)
