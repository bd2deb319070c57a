"""TVM lowerings of the nn_extra ops against the reference interpreter, and their schedules."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.schedules import loop_kinds

from .util import check_graph_kernels

RNG = np.random.default_rng(3)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def one(op: str, ins: dict[str, np.ndarray], out: str, attrs: str = "") -> list:
    """Lower ``%y = op(ins...) {attrs} : out`` and compare the kernel with the interpreter."""
    from kiln.ir.types import from_numpy_dtype
    params = ", ".join(f"%{k}: {from_numpy_dtype(v.dtype)}[{', '.join(map(str, v.shape))}]" for k, v in ins.items())
    args = ", ".join(f"%{k}" for k in ins)
    text = f"graph @g({params}) -> (%y) {{\n  %y = {op}({args}){' ' + attrs if attrs else ''} : {out}\n}}"
    return check_graph_kernels(text, ins)


def kinds(kernel) -> set[str]:
    return {str(k) for k in loop_kinds(kernel.func)}


@pytest.mark.parametrize("shape,groups", [((2, 6, 3, 5), 3), ((1, 32, 16, 16), 8), ((3, 4), 2)])
def test_group_norm(shape, groups):
    c = shape[1]
    (k,) = one("group_norm", {"x": rand(*shape), "s": rand(c), "b": rand(c)},
               f"f32[{', '.join(map(str, shape))}]", f"{{num_groups={groups}, epsilon=0.001}}")
    assert k.kind == "reduction"


def test_group_norm_big_is_parallel_and_vectorized():
    (k,) = one("group_norm", {"x": rand(2, 16, 32, 32), "s": rand(16), "b": rand(16)}, "f32[2, 16, 32, 32]",
               "{num_groups=4}")
    assert {"parallel", "vectorized"} <= kinds(k), kinds(k)


@pytest.mark.parametrize("shape,attrs,out", [
    ((2, 6, 3, 5), "{kernel_shape=[2, 3], strides=[2, 1], pads=[1, 0, 1, 2], ceil_mode=1, p=3}", "f32[2, 6, 2, 5]"),
    ((2, 6, 3, 5), "{kernel_shape=[2, 2], dilations=[2, 1], p=2}", "f32[2, 6, 1, 4]"),
    ((1, 3, 12), "{kernel_shape=[3], strides=[2], p=1}", "f32[1, 3, 5]"),
    ((1, 2, 4, 4, 4), "{kernel_shape=[2, 2, 2], p=4}", "f32[1, 2, 3, 3, 3]"),
])
def test_lp_pool(shape, attrs, out):
    (k,) = one("lp_pool", {"x": rand(*shape)}, out, attrs)
    assert k.kind == "reduction"


def test_lp_pool_f64():
    one("lp_pool", {"x": rand(1, 2, 6, 6, dtype=np.float64)}, "f64[1, 2, 3, 3]",
        "{kernel_shape=[2, 2], strides=[2, 2], p=3}")


def test_max_unpool():
    x = rand(1, 2, 2, 2)
    idx = np.array([0, 3, 9, 14, 16, 19, 25, 31], np.int64).reshape(1, 2, 2, 2)
    one("max_unpool", {"x": x, "i": idx}, "f32[1, 2, 4, 4]", "{kernel_shape=[2, 2], strides=[2, 2]}")
    one("max_unpool", {"x": x, "i": idx}, "f32[1, 2, 5, 7]",
        "{kernel_shape=[2, 2], strides=[2, 2], output_shape=[1, 2, 5, 7]}")


def test_max_unpool_repeated_index_keeps_the_last():
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
    idx = np.array([5, 5, 0, 5], np.int64).reshape(1, 1, 2, 2)
    one("max_unpool", {"x": x, "i": idx}, "f32[1, 1, 4, 4]", "{kernel_shape=[2, 2], strides=[2, 2]}")


def test_max_unpool_big_fill_is_parallel():
    x = rand(2, 8, 32, 32)
    idx = (np.arange(x.size, dtype=np.int64) * 4).reshape(x.shape)
    (k,) = one("max_unpool", {"x": x, "i": idx}, "f32[2, 8, 64, 64]", "{kernel_shape=[2, 2], strides=[2, 2]}")
    script = k.func.script()
    assert "T.parallel" in script and "T.vectorized" in script


@pytest.mark.parametrize("shape,dtype", [((3, 4, 4), "f64"), ((5, 5), "f32"), ((2, 2, 1, 1), "f32"),
                                         ((6, 3, 3), "f32")])
def test_det(shape, dtype):
    x = rand(*shape, dtype=np.float64 if dtype == "f64" else np.float32)
    out = f"{dtype}[{', '.join(map(str, shape[:-2]))}]"
    one("det", {"x": x}, out)


def test_det_singular_and_pivoting():
    x = np.array([[[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [4.0, -3.0, 8.0]],
                  [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]]])
    one("det", {"x": x}, "f64[2]")


@pytest.mark.parametrize("equation,shapes,out", [
    ("iij->j", [(3, 3, 4)], "[4]"),
    ("...ij,...jk->...ik", [(2, 3, 4), (1, 4, 5)], "[2, 3, 5]"),
    ("ii", [(5, 5)], "[]"),
    ("ij->ji", [(3, 4)], "[4, 3]"),
])
def test_einsum(equation, shapes, out):
    ins = {f"x{i}": rand(*s) for i, s in enumerate(shapes)}
    one("einsum", ins, f"f32{out}", f'{{equation="{equation}"}}')


def test_einsum_int():
    a = RNG.integers(-4, 4, (3, 3, 2)).astype(np.int32)
    one("einsum", {"a": a}, "i32[2]", '{equation="iij->j"}')
