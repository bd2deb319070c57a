"""TVM lowerings of the reductions against the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.kernel import lower_node, run_kernel
from kiln.ir.registry import all_ops
from kiln.ir.text import parse
from kiln.ir.types import to_numpy_dtype

from .test_lower_elementwise import rand
from .util import TARGET, check_graph_kernels

OPS = ["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_l2", "reduce_sum_square"]


def _out_shape(shape, axes, keepdims) -> tuple[int, ...]:
    red = {a % len(shape) for a in axes} if axes else set(range(len(shape)))
    return tuple(1 if i in red else d for i, d in enumerate(shape) if keepdims or i not in red)


def graph(op: str, dtype: str, shape, axes, keepdims: int) -> str:
    out = _out_shape(shape, axes, keepdims)
    fmt = ", ".join
    return (f"graph @g(%x: {dtype}[{fmt(map(str, shape))}]) -> (%z) {{\n"
            f"  %z = {op}(%x) {{axes = [{fmt(map(str, axes))}], keepdims = {keepdims}}} : "
            f"{dtype}[{fmt(map(str, out))}]\n}}")


def _input(op: str, dtype: str, shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if op == "reduce_prod":
        x = rand(rng, shape, dtype, 0.5, 1.5) if dtype[0] == "f" else rand(rng, shape, dtype, -3, 3)
        return x * np.where(rng.random(shape) < 0.5, 1, -1).astype(x.dtype) if dtype[0] == "f" else x
    return rand(rng, shape, dtype, -100, 100) if dtype[0] in "iu" else rand(rng, shape, dtype)


CASES = [((4, 64), [-1]), ((4, 64), [0]), ((3, 5, 7), [1]), ((3, 5, 7), [0, 2]), ((3, 5, 7), []),
         ((2, 3, 32), [-1, -2]), ((6, 250), [1])]


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize(("shape", "axes"), CASES)
@pytest.mark.parametrize("op", OPS)
def test_reduce_f32(op, shape, axes, keepdims):
    x = _input(op, "f32", shape)
    check_graph_kernels(graph(op, "f32", shape, axes, keepdims), {"x": x})


@pytest.mark.parametrize("dtype", ["i8", "u8", "i32", "i64", "u32"])
@pytest.mark.parametrize("op", [o for o in OPS if o != "reduce_l2"])
def test_reduce_int(op, dtype):
    x = _input(op, dtype, (3, 40), seed=1)
    for axes in ([1], []):
        check_graph_kernels(graph(op, dtype, (3, 40), axes, 0), {"x": x})


def test_reduce_int_wraps():
    x = np.full((2, 16), 100, np.int8)
    for op in ("reduce_sum", "reduce_sum_square", "reduce_prod", "reduce_mean"):
        check_graph_kernels(graph(op, "i8", (2, 16), [1], 1), {"x": x})


def test_reduce_mean_int_truncates_toward_zero():
    x = np.array([[-7, 0, 0], [7, 1, 0], [-1, -1, 0]], np.int32)
    check_graph_kernels(graph("reduce_mean", "i32", (3, 3), [1], 0), {"x": x})


@pytest.mark.parametrize("dtype", ["f64", "f16"])
@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_max", "reduce_l2"])
def test_reduce_other_floats(op, dtype):
    x = _input(op, dtype, (3, 24), seed=2)
    check_graph_kernels(graph(op, dtype, (3, 24), [-1], 1), {"x": x})


@pytest.mark.parametrize("shape", [(3, 64), (3, 5)])
@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
def test_reduce_max_min_propagate_nan(op, shape):
    x = _input(op, "f32", shape, seed=3)
    x[0, 1] = np.nan
    x[2, -1] = np.nan
    x[1, :] = -np.inf if op == "reduce_max" else np.inf
    check_graph_kernels(graph(op, "f32", shape, [-1], 0), {"x": x})


@pytest.mark.parametrize("op", OPS)
def test_row_reductions_are_scheduled(op):
    node = parse(graph(op, "f32", (64, 256), [-1], 1)).nodes[0]
    k = lower_node(node, TARGET)
    assert k.kind == "reduction" and not k.notes
    assert "vectorized" in k.func.script()


def test_every_reduce_op_is_lowered():
    ops = {n: d for n, d in all_ops().items() if d.reference.__module__.endswith(".reduce")}
    assert ops
    assert not [n for n, d in ops.items() if d.lower_tvm is None]


@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
@pytest.mark.parametrize("dtype", ["f32", "i32", "bool"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_max_min_of_an_empty_set(op, dtype, keepdims):
    """-inf / +inf (the dtype's min / max, False / True) everywhere, as the reference."""
    x = np.zeros((2, 0, 4), to_numpy_dtype(dtype))
    check_graph_kernels(graph(op, dtype, (2, 0, 4), [1], keepdims), {"x": x})


@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
@pytest.mark.parametrize("axes", [[1], [], [0, 2]])
def test_max_min_bool(op, axes):
    x = np.random.default_rng(71).integers(0, 2, (3, 16, 5)).astype(bool)
    check_graph_kernels(graph(op, "bool", (3, 16, 5), axes, 0), {"x": x})


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("op", ["reduce_max", "reduce_min"])
def test_max_min_half_floats_exact_with_nan(op, dtype):
    """f16/bf16 go through float32 keys (TVM has no bf16 isnan): the result is bit-exact, NaN kept."""
    x = _input(op, "f32", (3, 40), seed=4).astype(to_numpy_dtype(dtype))
    x[0, 7] = np.nan
    x[2, :] = -np.inf if op == "reduce_max" else np.inf
    g = parse(graph(op, dtype, (3, 40), [-1], 0))
    (got,) = run_kernel(lower_node(g.nodes[0], TARGET), {"x": x}, TARGET)
    f = np.max if op == "reduce_max" else np.min
    want = f(x.astype(np.float32), axis=-1).astype(x.dtype)
    assert got.dtype == x.dtype and np.isnan(got[0]) and np.isinf(got[2])
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("red,ep", [("reduce_min", "min"), ("reduce_max", "max"), ("reduce_min", "max")])
def test_full_reduction_with_a_min_max_epilogue(red, ep):
    """A rank-0 min reduction with a min epilogue in one kernel: TVM 0.27 miscompiled it
    (fuzz/tvm-findings/rank0-min-epilogue); DynamicQuantizeLinear lifts to exactly this."""
    from kiln.codegen.build import lower_kernel
    from kiln.codegen.kernel import run_kernel
    from kiln.codegen.target import host_target
    from kiln.ir.interpret import interpret
    from kiln.ir.text import parse

    g = parse(f"""graph @g(%a: f32[3,16]) -> (%y) {{
  %z = const f32[] [0.0]
  %r = {red}(%a) {{axes=[], keepdims=0}} : f32[]
  %y = {ep}(%r, %z) : f32[]
}}""")
    a = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    k = lower_kernel(list(g.nodes), host_target(), name="k")
    got = run_kernel(k, {"a": a}, host_target())[0]
    assert float(got) == float(interpret(g, {"a": a})["y"])
