"""Lowerings of ir/ops/index.py: each op as one scheduled kernel against the reference interpreter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln import ir
from kiln.codegen.lowering.index import TOP_K_CHAIN_MAX
from kiln.codegen.schedules import loop_kinds
from kiln.ir.registry import all_ops
from kiln.ir.types import from_numpy_dtype
from tests.codegen.util import check_graph_kernels

rng = np.random.default_rng(0)


def check_op(op: str, args: Sequence[np.ndarray | None], attrs: dict | None = None, *, n_out: int = 1,
             kind: str | None = None):
    """One-node graph ``op(args)``: lower, schedule, run and compare with the interpreter; the kernel."""
    g = ir.Graph("g")
    values, feeds = [], {}
    for i, a in enumerate(args):
        if a is None:
            values.append(None)
            continue
        a = np.asarray(a)
        values.append(g.add_input(f"x{i}", ir.TensorType(from_numpy_dtype(a.dtype), a.shape)))
        feeds[f"x{i}"] = a
    node = g.add_node(op, values, attrs or {}, out_names=[f"y{i}" for i in range(n_out)])
    g.set_outputs(node.outputs)
    (kernel,) = check_graph_kernels(ir.print_graph(g), feeds)
    if kind is not None:
        assert kernel.kind == kind
    return kernel


def rnd(*shape, dtype=np.float32, lo=-50, hi=50):
    if np.dtype(dtype).kind in "iu":
        return rng.integers(max(lo, 0) if np.dtype(dtype).kind == "u" else lo, hi, size=shape).astype(dtype)
    if np.dtype(dtype).kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.standard_normal(shape).astype(dtype)


def parallel_and_vector(kernel) -> bool:
    kinds = loop_kinds(kernel.func)
    return kinds["parallel"] > 0 and kinds["vectorized"] > 0


def test_every_op_of_the_family_has_a_lowering():
    ops = {name for name, o in all_ops().items() if o.reference.__module__ == "kiln.ir.ops.index"}
    assert ops
    assert sorted(o for o in ops if ir.get_op(o).lower_tvm is None) == []


# ------------------------------------------------------------------ pointwise index ops

@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.float32, np.float64, np.float16])
def test_arange(dtype):
    check_op("arange", [np.array(3, dtype), np.array(-2, dtype)], {"length": 37}, kind="injective")


@pytest.mark.parametrize("shape,axis", [((3,), -1), ((2, 5), 0), ((2, 5), 1), ((2, 5), -3), ((4, 3, 2), 2)])
@pytest.mark.parametrize("idx_dtype", [np.int64, np.int32, np.float32])
def test_one_hot(shape, axis, idx_dtype):
    depth = 6
    idx = rng.integers(-depth - 2, depth + 2, size=shape).astype(idx_dtype)
    check_op("one_hot", [idx, np.array([-1.5, 2.5], np.float32)], {"depth": depth, "axis": axis}, kind="injective")


@pytest.mark.parametrize("shape,k,dtype", [((4, 4), 0, None), ((3, 5), 1, "f32"), ((5, 3), -2, "bool"),
                                           ((64, 300), 3, "i64")])
def test_eye_like(shape, k, dtype):
    attrs = {"k": k} if dtype is None else {"k": k, "dtype": dtype}
    kernel = check_op("eye_like", [rnd(*shape, dtype=np.int32)], attrs, kind="injective")
    if shape == (64, 300):
        assert parallel_and_vector(kernel)


@pytest.mark.parametrize("mode", ["linear", "circular"])
@pytest.mark.parametrize("axis", [-2, 1, 2])
def test_tensor_scatter(mode, axis):
    past = rnd(3, 6, 5, 4)
    ushape = list(past.shape)
    ax = axis % 4
    ushape[ax] = 3
    wi = np.array([0, 2, 5] if mode == "circular" else [0, 3, 1], np.int64)
    if mode == "linear":
        wi = np.minimum(wi, past.shape[ax] - 3)
    check_op("tensor_scatter", [past, rnd(*ushape), wi], {"axis": axis, "mode": mode}, kind="injective")


def test_tensor_scatter_without_write_indices_is_parallel_and_vectorized():
    kernel = check_op("tensor_scatter", [rnd(2, 4, 64, 64), rnd(2, 4, 8, 64)], {"axis": 2, "mode": "linear"})
    assert parallel_and_vector(kernel)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_and_back(mode):
    x = rnd(2, 12, 3, 5)
    check_op("depth_to_space", [x], {"blocksize": 2, "mode": mode}, kind="injective")
    check_op("space_to_depth", [rnd(2, 3, 6, 10)], {"blocksize": 2, "mode": mode}, kind="injective")
    kernel = check_op("space_to_depth", [rnd(1, 8, 32, 64)], {"blocksize": 4, "mode": mode})
    assert parallel_and_vector(kernel)


@pytest.mark.parametrize("time_axis,batch_axis,shape", [(0, 1, (5, 4, 3)), (1, 0, (4, 5)), (0, 1, (5, 4))])
def test_reverse_sequence(time_axis, batch_axis, shape):
    lens = rng.integers(0, shape[time_axis] + 1, size=shape[batch_axis]).astype(np.int64)
    check_op("reverse_sequence", [rnd(*shape), lens], {"time_axis": time_axis, "batch_axis": batch_axis},
             kind="injective")


# ------------------------------------------------------------------ reductions

@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [0, -1])
def test_cumprod(exclusive, reverse, axis):
    x = rng.uniform(0.5, 1.5, size=(5, 7)).astype(np.float32)
    attrs = {"axis": axis, "exclusive": exclusive, "reverse": reverse}
    check_op("cumprod", [x], attrs, kind="reduction")
    check_op("cumprod", [rnd(4, 6, dtype=np.int64, lo=-3, hi=4)], attrs)


@pytest.mark.parametrize("k", [1, 3, TOP_K_CHAIN_MAX + 1])  # selection passes, passes, ranking
@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("axis", [-1, 0])
def test_top_k(k, largest, axis):
    x = rnd(40, 3, 40, dtype=np.int32, lo=-4, hi=4)  # many ties: they go to the lower index
    check_op("top_k", [x], {"k": [k], "axis": axis, "largest": largest}, n_out=2, kind="reduction")
    check_op("top_k", [x.astype(np.float32) + rng.standard_normal(x.shape).astype(np.float32)],
             {"k": [k], "axis": axis, "largest": largest}, n_out=2)


def test_top_k_runs_rows_in_parallel():
    kernel = check_op("top_k", [rnd(256, 100)], {"k": [2], "axis": 1}, n_out=2)
    assert loop_kinds(kernel.func)["parallel"] > 0


def test_top_k_uint64_and_full_sort():
    x = rng.integers(0, 2 ** 63, size=(3, 40), dtype=np.uint64)
    check_op("top_k", [x], {"k": [40], "axis": 1}, n_out=2)


# ------------------------------------------------------------------ scatters

REDUCTIONS = ["none", "add", "mul", "max", "min"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements(reduction, axis):
    data = rnd(6, 5, 4)
    ishape = [3, 5, 4]
    ishape[axis % 3] = 7  # along the axis: more updates than the dim (duplicates)
    ishape = [min(s, d) if a != axis % 3 else s for a, (s, d) in enumerate(zip(ishape, data.shape))]
    dim = data.shape[axis % 3]
    idx = rng.integers(-dim, dim, size=ishape).astype(np.int64)
    check_op("scatter_elements", [data, idx, rnd(*ishape)], {"axis": axis, "reduction": reduction})


def test_scatter_elements_unit_dims():
    check_op("scatter_elements", [rnd(1, 5), np.array([[1, -2]], np.int64), rnd(1, 2)], {"axis": 1})


def test_scatter_elements_large_runs_parallel_vectorized():
    idx = rng.integers(0, 300, size=(64, 300)).astype(np.int64)
    kernel = check_op("scatter_elements", [rnd(64, 300), idx, rnd(64, 300)], {"axis": 1, "reduction": "max"})
    assert parallel_and_vector(kernel)


def test_scatter_elements_int32_indices_and_ints():
    data = rnd(4, 9, dtype=np.int64)
    idx = rng.integers(0, 9, size=(4, 9)).astype(np.int32)
    check_op("scatter_elements", [data, idx, rnd(4, 9, dtype=np.int64)], {"axis": 1, "reduction": "add"})


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dshape,ishape", [((4, 4, 4), (2, 1)), ((2, 2), (2, 2)), ((5, 3, 40), (3, 2, 1)),
                                           ((8, 70), (4, 1)), ((6,), (4, 1))])
def test_scatter_nd(reduction, dshape, ishape):
    q = ishape[-1]
    cols = [rng.integers(-d, d, size=ishape[:-1]) for d in dshape[:q]]
    idx = np.stack(cols, axis=-1).astype(np.int64)
    upd = rnd(*ishape[:-1], *dshape[q:])
    check_op("scatter_nd", [rnd(*dshape), idx, upd], {"reduction": reduction})


def test_scatter_nd_large_slices_run_parallel_vectorized():
    data = rnd(8, 64, 64)
    idx = np.array([[1], [5], [1]], np.int64)
    kernel = check_op("scatter_nd", [data, idx, rnd(3, 64, 64)], {"reduction": "add"})
    assert parallel_and_vector(kernel)


def test_scatter_out_of_range_index_is_skipped_by_the_kernel():
    from kiln.codegen.kernel import lower_node, run_kernel
    from kiln.codegen.target import host_target

    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", (4, 3)))
    i = g.add_constant(np.array([[0], [9], [-1]], np.int64), "i")
    u = g.add_input("u", ir.TensorType("f32", (3, 3)))
    node = g.add_node("scatter_nd", [x, i, u], {"reduction": "none"})
    k = lower_node(node, host_target(), name="k")
    data, upd = np.zeros((4, 3), np.float32), np.ones((3, 3), np.float32)
    (got,) = run_kernel(k, {"x": data, "u": upd}, host_target())
    want = data.copy()
    want[[0, 3]] = 1.0
    np.testing.assert_array_equal(got, want)
