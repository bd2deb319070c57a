"""Lowerings of ir/ops/nn.py: each op as one scheduled kernel against the reference interpreter."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.codegen.test_lower_tensor import Const, check_op, rnd

rng = np.random.default_rng(1)


# ------------------------------------------------------------------ matmul


@pytest.mark.parametrize("ashape,bshape", [
    ((5, 7), (7, 19)), ((1, 6, 32), (32, 48)), ((2, 3, 4, 16), (16, 5)), ((7,), (7, 3)), ((13, 33), (33, 1)),
])
def test_matmul_constant_weight_is_packed(ashape, bshape):
    k = check_op("matmul", [rnd(*ashape), Const(rnd(*bshape))], kind="matmul")
    assert k.node.op == "matmul" and any(a.const is not None and a.const.ndim == 3 for a in k.args)


@pytest.mark.parametrize("ashape,bshape", [
    ((5, 7), (7, 19)), ((2, 4, 5, 8), (2, 4, 8, 6)), ((1, 2, 9, 4), (1, 2, 4, 9)), ((3, 5, 7), (7, 19)),
    ((5, 7), (2, 7, 3)), ((2, 1, 3, 4), (5, 4, 6)), ((7,), (7,)), ((7,), (2, 7, 3)), ((2, 3, 7), (7,)),
])
def test_matmul_activations(ashape, bshape):
    check_op("matmul", [rnd(*ashape), rnd(*bshape)], kind="batch_matmul")


def test_matmul_constant_batched_weight_is_a_batch_matmul():
    check_op("matmul", [rnd(2, 3, 5), Const(rnd(2, 5, 4))], kind="batch_matmul")


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.int64, np.float64, np.float16])
def test_matmul_dtypes(dtype):
    a, b = rnd(4, 9, dtype=dtype), rnd(9, 5, dtype=dtype)
    check_op("matmul", [a, b])
    check_op("matmul", [a, Const(b)])


# ------------------------------------------------------------------ convolution


@pytest.mark.parametrize("xshape,wshape,attrs", [
    ((1, 3, 9, 9), (4, 3, 3, 3), {}),
    ((2, 4, 10, 11), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ((1, 6, 8, 8), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ((1, 3, 12, 13), (5, 3, 3, 2), {"dilations": [2, 3], "pads": [0, 2, 1, 0]}),
    ((1, 2, 7, 7), (3, 2, 1, 1), {"strides": [2, 3]}),
    ((1, 4, 9, 7), (8, 4, 5, 3), {"pads": [2, 0, 1, 3], "strides": [1, 2]}),
    ((1, 4, 6, 6), (8, 2, 3, 3), {"group": 2, "pads": [0, 1, 2, 0], "strides": [2, 1], "dilations": [1, 2]}),
])
@pytest.mark.parametrize("bias", [False, True])
def test_conv2d(xshape, wshape, attrs, bias):
    args = [rnd(*xshape), Const(rnd(*wshape))] + ([Const(rnd(wshape[0]))] if bias else [])
    check_op("conv", args, attrs, kind="conv2d")


@pytest.mark.parametrize("xshape,ksize,attrs", [
    ((2, 16, 5, 7), 3, {"pads": [1, 1, 1, 1]}),
    ((1, 32, 8, 8), 3, {"pads": [0, 1, 2, 0], "strides": [2, 2]}),
    ((1, 16, 6, 5), 3, {"pads": [2, 1, 2, 1], "dilations": [2, 1]}),
    ((1, 24, 4, 4), 5, {"pads": [2, 2, 2, 2]}),
    ((1, 48, 1, 1), 3, {"pads": [1, 1, 1, 1]}),
    ((1, 16, 9, 9), 3, {"strides": [3, 2]}),
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depthwise_conv2d_on_small_maps_runs_channels_last(xshape, ksize, attrs, bias, dtype):
    """One input and one output channel per group, channels filling vectors, <= 64 output pixels."""
    c = xshape[1]
    args = [rnd(*xshape, dtype=dtype), Const(rnd(c, 1, ksize, ksize, dtype=dtype))]
    args += [Const(rnd(c, dtype=dtype))] if bias else []
    k = check_op("conv", args, {"group": c, **attrs}, kind="depthwise_conv2d_cl")
    assert any(a.const is not None and a.const.shape == (ksize, ksize, c) for a in k.args)  # [KH, KW, C]


def test_depthwise_conv2d_weight_input_and_the_nchw_cases():
    """A weight given at run time is transposed in the kernel; big maps, depth multipliers and channel counts
    that fill no vector keep the NCHW kernel."""
    check_op("conv", [rnd(1, 16, 4, 4), rnd(16, 1, 3, 3), rnd(16)], {"group": 16, "pads": [1, 1, 1, 1]},
             kind="depthwise_conv2d_cl")
    check_op("conv", [rnd(1, 16, 12, 12), Const(rnd(16, 1, 3, 3))], {"group": 16, "pads": [1, 1, 1, 1]},
             kind="conv2d")
    check_op("conv", [rnd(1, 16, 4, 4), Const(rnd(32, 1, 3, 3))], {"group": 16}, kind="conv2d")
    check_op("conv", [rnd(1, 6, 4, 4), Const(rnd(6, 1, 3, 3))], {"group": 6}, kind="conv2d")


@pytest.mark.parametrize("xshape,oc", [((2, 24, 3, 5), 40), ((1, 112, 1, 1), 1280), ((1, 7, 4, 4), 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv2d_on_small_maps_is_a_packed_matmul(xshape, oc, bias):
    """A 1x1 conv with <= 16 output pixels: rows are pixels, vectorized over output channels."""
    args = [rnd(*xshape), Const(rnd(oc, xshape[1], 1, 1))] + ([Const(rnd(oc))] if bias else [])
    k = check_op("conv", args, kind="matmul")
    assert any(a.const is not None and a.const.ndim == 3 for a in k.args)  # the packed weight


def test_pointwise_conv2d_other_cases():
    """More than 16 pixels, a stride or padding: the channel-vectorized conv; a weight at run time: NCHW."""
    check_op("conv", [rnd(1, 8, 9, 9), Const(rnd(16, 8, 1, 1))], kind="conv2d_ocvec")  # 81 pixels
    check_op("conv", [rnd(1, 8, 4, 4), Const(rnd(16, 8, 1, 1))], {"strides": [2, 2]}, kind="conv2d_ocvec")
    check_op("conv", [rnd(1, 8, 4, 4), Const(rnd(16, 8, 1, 1))], {"pads": [1, 0, 0, 1]}, kind="conv2d_ocvec")
    check_op("conv", [rnd(1, 8, 4, 4), rnd(16, 8, 1, 1)], kind="conv2d")  # weight at run time
    check_op("conv", [rnd(1, 8, 9, 9), Const(rnd(12, 8, 1, 1))], kind="conv2d")  # 12 channels fill no vector


@pytest.mark.parametrize("xshape,wshape,attrs", [
    ((1, 3, 9, 13), (16, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((2, 5, 10, 11), (32, 5, 3, 3), {"pads": [0, 2, 1, 0], "strides": [2, 2]}),
    ((1, 4, 12, 12), (16, 4, 5, 3), {"dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    ((1, 8, 7, 7), (48, 8, 1, 1), {}),
    ((1, 6, 11, 17), (32, 6, 3, 3), {"strides": [1, 3]}),
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv2d_vectorized_over_output_channels(xshape, wshape, attrs, bias, dtype):
    """One group, constant weight, output channels filling vectors: the weight packed [OC/vb, C, KH, KW, vb]."""
    args = [rnd(*xshape, dtype=dtype), Const(rnd(*wshape, dtype=dtype))]
    args += [Const(rnd(wshape[0], dtype=dtype))] if bias else []
    k = check_op("conv", args, attrs, kind="conv2d_ocvec")
    assert any(a.const is not None and a.const.ndim == 5 for a in k.args)


def test_conv2d_with_weight_and_bias_as_inputs():
    check_op("conv", [rnd(1, 3, 8, 8), rnd(4, 3, 3, 3), rnd(4)], {"pads": [1, 1, 1, 1]}, kind="conv2d")


@pytest.mark.parametrize("attrs", [{}, {"pads": [2, 1], "strides": [2]}, {"dilations": [3], "group": 2},
                                   {"group": 4, "pads": [1, 1]}])
def test_conv1d(attrs):
    wshape = (4, 4 // attrs.get("group", 1), 3)
    check_op("conv", [rnd(2, 4, 17), Const(rnd(*wshape)), Const(rnd(4))], attrs, kind="conv2d")
    check_op("conv", [rnd(2, 4, 17), rnd(*wshape)], attrs, kind="conv2d")


def test_conv3d():
    check_op("conv", [rnd(1, 2, 5, 6, 4), Const(rnd(4, 1, 3, 2, 2)), Const(rnd(4))],
             {"group": 2, "pads": [1, 0, 1, 0, 1, 0], "strides": [2, 1, 1], "dilations": [1, 2, 1]})


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_conv_dtypes(dtype):
    check_op("conv", [rnd(1, 3, 6, 6, dtype=dtype), Const(rnd(4, 3, 3, 3, dtype=dtype)), Const(rnd(4, dtype=dtype))],
             {"pads": [1, 1, 1, 1]})


@pytest.mark.parametrize("xshape,wshape,attrs", [
    ((1, 3, 5, 5), (3, 2, 3, 3), {}),
    ((1, 4, 4, 5), (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}),
    ((2, 4, 3, 3), (4, 2, 2, 3), {"group": 2, "strides": [3, 2], "dilations": [2, 1]}),
    ((1, 2, 4, 4), (2, 3, 4, 4), {"strides": [2, 2], "pads": [3, 0, 0, 3]}),
    ((1, 6, 3, 3), (6, 1, 3, 3), {"group": 6, "strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
])
@pytest.mark.parametrize("const_weight", [True, False])
def test_conv_transpose_2d(xshape, wshape, attrs, const_weight):
    w = rnd(*wshape)
    m = wshape[1] * attrs.get("group", 1)
    check_op("conv_transpose", [rnd(*xshape), Const(w) if const_weight else w, Const(rnd(m))], attrs,
             kind="conv2d")


def test_conv_transpose_1d_and_3d():
    check_op("conv_transpose", [rnd(1, 2, 6), Const(rnd(2, 3, 4))],
             {"strides": [2], "pads": [1, 2], "output_padding": [1]}, kind="conv2d")
    check_op("conv_transpose", [rnd(1, 2, 3, 3, 2), rnd(2, 2, 2, 2, 2), rnd(2)], {"strides": [2, 1, 2]})


# ------------------------------------------------------------------ pooling


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "dilations": [2, 1], "pads": [0, 2, 1, 0]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1},
])
def test_max_pool(attrs):
    check_op("max_pool", [rnd(2, 3, 9, 8)], attrs, kind="reduction")


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float64])
def test_max_pool_dtypes_and_1d(dtype):
    check_op("max_pool", [rnd(1, 2, 11, dtype=dtype)], {"kernel_shape": [3], "strides": [2], "pads": [1, 1]})


def test_max_pool_all_negative_window_is_not_zero():
    check_op("max_pool", [-np.abs(rnd(1, 1, 4, 4)) - 1], {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1]})


@pytest.mark.parametrize("include", [0, 1])
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 3], "pads": [2, 0, 0, 1], "ceil_mode": 1},
])
def test_avg_pool(attrs, include):
    check_op("avg_pool", [rnd(1, 3, 9, 10)], {**attrs, "count_include_pad": include}, kind="reduction")


def test_avg_pool_1d_3d_and_f64():
    check_op("avg_pool", [rnd(2, 2, 9, dtype=np.float64)], {"kernel_shape": [4], "pads": [1, 2], "strides": [3]})
    check_op("avg_pool", [rnd(1, 2, 4, 5, 6)], {"kernel_shape": [2, 2, 3], "pads": [1, 0, 1, 0, 1, 1],
                                                 "count_include_pad": 1})


@pytest.mark.parametrize("op", ["global_avg_pool", "global_max_pool"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 16, 4, 8), (2, 3, 10), (1, 2, 3, 4, 5)])
def test_global_pool(op, shape):
    check_op(op, [rnd(*shape)], kind="reduction")


def test_global_avg_pool_f16():
    check_op("global_avg_pool", [rnd(1, 4, 6, 6, dtype=np.float16)])


# ------------------------------------------------------------------ normalization


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 5, 4), (1, 8, 7)])
def test_batch_norm(shape):
    c = shape[1]
    args = [rnd(*shape), Const(rnd(c)), Const(rnd(c)), Const(rnd(c)), Const(np.abs(rnd(c)) + 0.1)]
    check_op("batch_norm", args, {"epsilon": 1e-3}, kind="injective")


def test_batch_norm_params_as_inputs_f64():
    c = 4
    args = [rnd(2, c, 3, dtype=np.float64), *(rnd(c, dtype=np.float64) for _ in range(3)),
            np.abs(rnd(c, dtype=np.float64)) + 0.5]
    check_op("batch_norm", args)


@pytest.mark.parametrize("shape,axis,pshape", [
    ((4, 32), -1, (32,)), ((2, 5, 19), -1, (19,)), ((2, 3, 4, 5), 2, (4, 5)), ((2, 3, 4), 1, (4,)),
    ((3, 64), 0, (1, 64)),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm(shape, axis, pshape, with_bias):
    args = [rnd(*shape) * 3 + 1, Const(rnd(*pshape))] + ([Const(rnd(*pshape))] if with_bias else [])
    check_op("layer_norm", args, {"axis": axis, "epsilon": 1e-5}, kind="reduction")


@pytest.mark.parametrize("shape,axis,pshape", [((4, 32), -1, (32,)), ((2, 5, 19), 1, (19,)), ((2, 3, 8), -1, (8,))])
def test_rms_norm(shape, axis, pshape):
    check_op("rms_norm", [rnd(*shape), rnd(*pshape)], {"axis": axis, "epsilon": 1e-6}, kind="reduction")


def test_norms_f16_and_f64():
    check_op("layer_norm", [rnd(3, 16, dtype=np.float16), Const(rnd(16, dtype=np.float16))])
    check_op("rms_norm", [rnd(3, 16, dtype=np.float64), Const(rnd(16, dtype=np.float64))])


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 4, 16), (1, 2, 2, 3, 4)])
def test_instance_norm(shape):
    c = shape[1]
    check_op("instance_norm", [rnd(*shape), Const(rnd(c)), Const(rnd(c))], {"epsilon": 1e-4}, kind="reduction")


@pytest.mark.parametrize("size,alpha,beta,bias", [(3, 1e-4, 0.75, 1.0), (4, 0.5, 0.5, 2.0), (1, 0.1, 1.0, 1.5),
                                                  (7, 0.3, 0.6, 1.0)])
def test_lrn(size, alpha, beta, bias):
    check_op("lrn", [rnd(2, 5, 3, 4)], {"size": size, "alpha": alpha, "beta": beta, "bias": bias})


# ------------------------------------------------------------------ softmax


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,axis", [((4, 32), -1), ((2, 3, 17), -1), ((2, 5, 3), 1), ((6, 4), 0),
                                        ((1, 2, 8, 8), 3)])
def test_softmax(op, shape, axis):
    check_op(op, [rnd(*shape) * 4], {"axis": axis}, kind="reduction")


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_softmax_dtypes(op, dtype):
    check_op(op, [rnd(3, 10, dtype=dtype)], {"axis": -1})


# ------------------------------------------------------------------ bfloat16 (accumulates in float32)


def test_bfloat16_anchors():
    bf = ml_dtypes.bfloat16
    check_op("matmul", [rnd(4, 9).astype(bf), Const(rnd(9, 5).astype(bf))], kind="matmul")
    check_op("matmul", [rnd(2, 4, 9).astype(bf), rnd(2, 9, 5).astype(bf)], kind="batch_matmul")
    check_op("conv", [rnd(1, 3, 6, 6).astype(bf), Const(rnd(4, 3, 3, 3).astype(bf))], kind="conv2d")
    check_op("softmax", [rnd(3, 10).astype(bf)], {"axis": -1})
    check_op("layer_norm", [rnd(3, 16).astype(bf), Const(rnd(16).astype(bf))])


@pytest.mark.parametrize("xs,attrs", [
    ((2, 3, 6, 7), {"kernel_shape": [2, 2]}),
    ((2, 3, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 3, 6, 7), {"kernel_shape": [2, 3], "dilations": [2, 1], "storage_order": 1}),
    ((2, 3, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ((1, 2, 4, 5, 3), {"kernel_shape": [2, 2, 2], "storage_order": 1}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_max_pool_with_indices(xs, attrs, dtype):
    """Both outputs from one (index, value) reduction; small integers make ties (the first tap wins)."""
    x = np.random.default_rng(81).integers(-3, 3, xs).astype(dtype)
    check_op("max_pool_with_indices", [x], attrs, n_out=2, kind="reduction")


def test_max_pool_with_indices_nan_and_minus_infinity():
    x = np.array([[[[np.nan, 1.0, -np.inf, -np.inf], [2.0, np.nan, -np.inf, -np.inf]]]], np.float32)
    check_op("max_pool_with_indices", [x], {"kernel_shape": [2, 2], "strides": [2, 2]}, n_out=2)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("xs,attrs", [
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 2], "dilations": [2, 3], "pads": [2, 1, 2, 1]}),
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 1, 9), {"kernel_shape": [3], "dilations": [3], "strides": [2], "pads": [1, 2]}),
])
def test_avg_pool_dilated(xs, attrs, count_include_pad):
    check_op("avg_pool", [rnd(*xs)], attrs | {"count_include_pad": count_include_pad}, kind="reduction")
