"""Ops of family 'nn_extra': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ir.registry import OpTypeError

from .onnx_single import check, infer, run_kiln

COVERED = {"group_norm", "lp_pool", "max_unpool", "einsum", "det"}


def test_family_module_imports():
    import kiln.ir.ops.nn_extra  # noqa: F401


def test_covered_is_the_family():
    from kiln.ir.ops import nn_extra
    from kiln.ir.registry import all_ops
    family = {n for n, d in all_ops().items() if d.reference.__module__ == nn_extra.__name__}
    assert family == COVERED


RNG = np.random.default_rng(7)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ group_norm

@pytest.mark.parametrize("shape,groups", [((2, 6, 3, 5), 3), ((1, 4, 7), 4), ((2, 6, 2, 2, 3), 1), ((3, 8), 2)])
def test_group_norm_vs_onnxruntime(shape, groups):
    c = shape[1]
    check("group_norm", [rand(*shape), rand(c), rand(c)], {"num_groups": groups, "epsilon": 1e-3})


def test_group_norm_normalizes_each_group():
    x = rand(2, 6, 4, dtype=np.float64) * 5 + 3
    y = run_kiln("group_norm", [x, np.ones(6), np.zeros(6)], {"num_groups": 2, "epsilon": 0.0})[0][0]
    g = y.reshape(2, 2, -1)
    np.testing.assert_allclose(g.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(g.var(-1), 1, rtol=1e-12)


def test_group_norm_type_rule():
    assert infer("group_norm", ["f32[N,6,H,W]", "f32[6]", "f32[6]"], num_groups=3)[0].shape == ("N", 6, "H", "W")
    with pytest.raises(OpTypeError, match="do not divide"):
        infer("group_norm", ["f32[1,6,4]", "f32[6]", "f32[6]"], num_groups=4)
    with pytest.raises(OpTypeError, match="length 6"):
        infer("group_norm", ["f32[1,6,4]", "f32[3]", "f32[6]"], num_groups=3)
    with pytest.raises(OpTypeError, match="static"):
        infer("group_norm", ["f32[1,C,4]", "f32[C]", "f32[C]"], num_groups=3)


# ------------------------------------------------------------------ lp_pool

@pytest.mark.parametrize("shape,attrs", [
    ((1, 3, 10), {"kernel_shape": [3], "p": 1}),
    ((2, 3, 7, 8), {"kernel_shape": [2, 3], "strides": [2, 1], "pads": [1, 0, 1, 2], "p": 2}),
    ((2, 2, 7, 8), {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1, "p": 3}),
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "dilations": [2, 2], "p": 2}),
    ((1, 2, 4, 5, 4), {"kernel_shape": [2, 2, 2], "strides": [1, 2, 1], "p": 4}),
])
def test_lp_pool_vs_onnxruntime(shape, attrs):
    check("lp_pool", [rand(*shape)], attrs, opset=22)


def test_lp_pool_type_rule():
    assert infer("lp_pool", ["f32[N,3,8,8]"], kernel_shape=[3, 3], strides=[2, 2])[0].shape == ("N", 3, 3, 3)
    with pytest.raises(OpTypeError, match="p must be"):
        infer("lp_pool", ["f32[1,3,8,8]"], kernel_shape=[3, 3], p=0)
    with pytest.raises(OpTypeError, match="kernel_shape"):
        infer("lp_pool", ["f32[1,3,8,8]"], kernel_shape=[3])


# ------------------------------------------------------------------ max_unpool

def _pool_indices(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """MaxPool (kernel k, stride k) output and flat indices over the whole tensor, as ONNX's MaxPool."""
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // k, k, w // k, k).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // k, w // k, k * k)
    arg = win.argmax(-1)
    rows = np.arange(h // k)[:, None] * k + arg // k
    cols = np.arange(w // k)[None, :] * k + arg % k
    flat = (np.arange(n)[:, None, None, None] * c + np.arange(c)[None, :, None, None]) * h * w + rows * w + cols
    return win.max(-1), flat.astype(np.int64)


def test_max_unpool_inverts_max_pool():
    x = rand(2, 3, 4, 6)
    pooled, idx = _pool_indices(x, 2)
    y = check("max_unpool", [pooled, idx], {"kernel_shape": [2, 2], "strides": [2, 2]})[0]
    assert y.shape == x.shape
    assert np.count_nonzero(y) == pooled.size
    np.testing.assert_array_equal(y.reshape(-1)[idx.reshape(-1)], pooled.reshape(-1))


def test_max_unpool_output_shape_and_pads():
    x = rand(1, 2, 2, 3)
    idx = np.array([0, 3, 7, 9, 13, 20, 25, 30, 41, 44, 50, 53], np.int64).reshape(1, 2, 2, 3)
    check("max_unpool", [x, idx], {"kernel_shape": [3, 3], "strides": [2, 2], "output_shape": [1, 2, 6, 8]})
    with pytest.raises(OpTypeError, match="smaller than the default"):
        infer("max_unpool", ["f32[1,2,2,3]", "i64[1,2,2,3]"], kernel_shape=[3, 3], strides=[2, 2],
              output_shape=[1, 2, 5, 6])
    check("max_unpool", [x, idx], {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 0, 0, 1]})


def test_max_unpool_out_of_range_index_is_an_error():
    with pytest.raises(Exception, match="outside the output"):
        run_kiln("max_unpool", [rand(1, 1, 1, 1), np.array([[[[4]]]], np.int64)],
                 {"kernel_shape": [2, 2], "strides": [2, 2]})


def test_max_unpool_type_rule():
    assert infer("max_unpool", ["f32[N,3,4,4]", "i64[N,3,4,4]"], kernel_shape=[2, 2],
                 strides=[2, 2])[0].shape == ("N", 3, 8, 8)
    with pytest.raises(OpTypeError, match="indices"):
        infer("max_unpool", ["f32[1,3,4,4]", "i64[1,3,4,3]"], kernel_shape=[2, 2])
    with pytest.raises(OpTypeError, match="changes dim 1"):
        infer("max_unpool", ["f32[1,3,4,4]", "i64[1,3,4,4]"], kernel_shape=[2, 2], output_shape=[1, 2, 8, 8])


# ------------------------------------------------------------------ einsum

@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij->ji", [(3, 4)]),
    ("ij->i", [(3, 4)]),
    ("i,i", [(5,), (5,)]),
    ("ii->i", [(4, 4)]),
    ("...ii->...i", [(2, 3, 3)]),
    ("bij,jk", [(2, 3, 4), (4, 5)]),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    ("abc,cd->", [(2, 3, 4), (4, 2)]),
    ("ibh,jbh->bij", [(3, 2, 4), (5, 2, 4)]),
])
def test_einsum_vs_onnxruntime(equation, shapes):
    check("einsum", [rand(*s) for s in shapes], {"equation": equation})


def test_einsum_broadcasts_ellipsis_dims():
    a, b = rand(2, 1, 3, 4, dtype=np.float64), rand(5, 4, 2, dtype=np.float64)
    got = run_kiln("einsum", [a, b], {"equation": "...ij,...jk->...ik"})[0][0]
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-12)


def test_einsum_integer_and_double():
    a = RNG.integers(-5, 5, (3, 4)).astype(np.int64)
    b = RNG.integers(-5, 5, (4, 2)).astype(np.int64)
    check("einsum", [a, b], {"equation": "ij,jk->ik"})
    check("einsum", [rand(3, 4, dtype=np.float64), rand(4, dtype=np.float64)], {"equation": "ij,j->i"})


def test_einsum_type_rule():
    assert infer("einsum", ["f32[N,3,4]", "f32[N,4,5]"], equation="bij,bjk->bik")[0].shape == ("N", 3, 5)
    assert infer("einsum", ["f32[3,4]"], equation="ij")[0].shape == (3, 4)
    assert infer("einsum", ["f32[4,3]", "f32[3]"], equation="ij,j")[0].shape == (4,)
    with pytest.raises(OpTypeError, match="sizes"):
        infer("einsum", ["f32[3,4]", "f32[5,2]"], equation="ij,jk->ik")
    with pytest.raises(OpTypeError, match="rank"):
        infer("einsum", ["f32[3,4,5]"], equation="ij->i")
    with pytest.raises(OpTypeError, match="in no operand"):
        infer("einsum", ["f32[3,4]"], equation="ij->k")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2 ** 31))
def test_einsum_matches_matmul(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    got = run_kiln("einsum", [a, b], {"equation": "ik,kj->ij"})[0][0]
    np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ det

def test_det_vs_onnxruntime():
    check("det", [rand(3, 4, 4)])
    check("det", [rand(2, 2)])
    check("det", [rand(2, 3, 1, 1)])


def test_det_known_values():
    tri = np.triu(rand(5, 5, dtype=np.float64)) + np.eye(5)
    assert run_kiln("det", [tri])[0][0] == pytest.approx(np.prod(np.diag(tri)), rel=1e-12)
    perm = np.eye(4)[[1, 0, 3, 2]]  # two swaps
    assert run_kiln("det", [perm])[0][0] == pytest.approx(1.0)
    assert run_kiln("det", [np.eye(3)[[1, 0, 2]]])[0][0] == pytest.approx(-1.0)
    assert run_kiln("det", [np.ones((3, 3))])[0][0] == pytest.approx(0.0, abs=1e-12)


def test_det_type_rule():
    assert infer("det", ["f32[N,3,3]"])[0].shape == ("N",)
    assert infer("det", ["f64[3,3]"])[0].shape == ()
    with pytest.raises(OpTypeError, match="square"):
        infer("det", ["f32[3,4]"])
    with pytest.raises(OpTypeError, match="float"):
        infer("det", ["i32[3,3]"])


# ------------------------------------------------------------------ fuzz builders

@pytest.mark.parametrize("op", sorted(COVERED))
def test_fuzz_builder_makes_tame_valid_graphs(op):
    from kiln import ir
    from kiln.fuzz.generate import Builder, finalize_outputs, safe_inputs, try_build
    built = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        g = ir.Graph("g")
        if try_build(Builder(g, rng), op) is None:
            continue
        finalize_outputs(g)
        assert any(n.op == op for n in g.nodes)
        for a in ir.interpret(g, safe_inputs(g, rng)).values():
            a = np.asarray(a, dtype=np.float64)
            assert np.isfinite(a).all() and np.abs(a).max(initial=0) < 1e6
        built += 1
    assert built >= 6
