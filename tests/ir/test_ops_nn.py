"""nn ops (conv, pooling, norms, softmax, matmul): references vs onnxruntime, and their type rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kiln import ir
from kiln.ir import OpTypeError, TensorType

from .onnx_single import T, check, infer, run_kiln

COVERED = {"conv", "conv_transpose", "max_pool", "max_pool_with_indices", "avg_pool", "global_avg_pool",
           "global_max_pool",
           "batch_norm", "layer_norm", "rms_norm", "instance_norm", "lrn", "softmax", "log_softmax",
           "matmul"}

rng = np.random.default_rng(0)


def rnd(*shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ conv

CONV_CASES = [
    # (x shape, w shape, attrs, bias)
    ((2, 4, 9), (6, 4, 3), {"strides": [2], "pads": [1, 0]}, True),
    ((1, 3, 7), (2, 3, 2), {"dilations": [3]}, False),
    ((2, 3, 8, 8), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    ((1, 3, 9, 7), (4, 3, 3, 3), {"strides": [2, 2]}, True),
    ((1, 3, 9, 9), (4, 3, 3, 3), {"strides": [2, 1], "pads": [0, 1, 2, 0], "dilations": [2, 1]}, False),
    ((1, 4, 6, 6), (6, 2, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}, True),
    ((2, 6, 7, 7), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]}, True),  # depthwise
    ((1, 3, 5, 5), (6, 1, 3, 3), {"group": 3}, False),  # depthwise, multiplier 2
    ((1, 8, 4, 5), (16, 8, 1, 1), {}, True),  # pointwise
    ((1, 2, 6, 7), (3, 2, 2, 3), {"strides": [1, 2], "pads": [1, 0, 0, 2]}, True),  # non-square kernel
    ((1, 2, 5, 6, 4), (3, 2, 2, 3, 2), {"strides": [1, 2, 1], "pads": [1, 0, 1, 0, 1, 1]}, True),  # 3-D
    ((1, 4, 5, 5, 5), (4, 1, 3, 3, 3), {"group": 4, "dilations": [1, 2, 1]}, False),  # 3-D depthwise
]


def _torch_pads(pads: list[int], nsp: int) -> list[int]:
    """ONNX pads (begins, then ends) as torch.nn.functional.pad wants them (last dim first)."""
    pads = pads or [0] * (2 * nsp)
    out = []
    for i in reversed(range(nsp)):
        out += [pads[i], pads[i + nsp]]
    return out


def torch_conv(x, w, b, attrs):
    """float64 oracle (onnxruntime has no float64 Conv): explicit F.pad, then F.conv{1,2,3}d."""
    nsp = x.ndim - 2
    t = torch.nn.functional.pad(torch.from_numpy(x), _torch_pads(attrs.get("pads", []), nsp))
    fn = getattr(torch.nn.functional, f"conv{nsp}d")
    y = fn(t, torch.from_numpy(w), None if b is None else torch.from_numpy(b),
           stride=attrs.get("strides") or 1, dilation=attrs.get("dilations") or 1, groups=attrs.get("group", 1))
    return y.numpy()


@pytest.mark.parametrize("xs,ws,attrs,bias", CONV_CASES)
def test_conv(xs, ws, attrs, bias):
    b = rnd(ws[0]) if bias else None
    check("conv", [rnd(*xs), rnd(*ws), b], attrs)


@pytest.mark.parametrize("xs,ws,attrs,bias", CONV_CASES)
def test_conv_f64_vs_torch(xs, ws, attrs, bias):
    x, w, b = rnd(*xs, dtype=np.float64), rnd(*ws, dtype=np.float64), rnd(ws[0], dtype=np.float64) if bias else None
    (y,), (t,) = run_kiln("conv", [x, w, b], attrs)
    assert TensorType.of(y) == t
    np.testing.assert_allclose(y, torch_conv(x, w, b, attrs), rtol=1e-12, atol=1e-12)


def test_conv_f16():
    check("conv", [rnd(1, 2, 5, 5, dtype=np.float16), rnd(3, 2, 3, 3, dtype=np.float16, scale=0.3)],
          {"pads": [1, 1, 1, 1]}, rtol=1e-2, atol=1e-2)


def test_conv_by_hand():
    # 1-D, one channel: a cross-correlation, not a convolution (the kernel is not flipped)
    x = np.array([[[1, 2, 3, 4]]], np.float64)
    w = np.array([[[1, 0, -1]]], np.float64)
    (y,), _ = run_kiln("conv", [x, w], {"pads": [1, 1]})
    np.testing.assert_array_equal(y, [[[-2, -2, -2, 3]]])


CONV_T_CASES = [
    ((1, 3, 5), (3, 2, 3), {"strides": [2]}, True),
    ((2, 2, 4), (2, 3, 2), {"strides": [3], "pads": [1, 0], "output_padding": [1]}, False),
    ((1, 3, 4, 4), (3, 2, 3, 3), {}, True),
    ((1, 3, 4, 5), (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, True),
    ((1, 2, 3, 3), (2, 2, 2, 3), {"strides": [2, 1], "dilations": [2, 2], "pads": [0, 1, 1, 0]}, True),
    ((1, 4, 3, 3), (4, 3, 3, 3), {"group": 2, "strides": [2, 2]}, True),
    ((1, 4, 3, 3), (4, 1, 2, 2), {"group": 4, "strides": [2, 2]}, False),  # depthwise
    ((1, 2, 2, 3, 2), (2, 2, 2, 2, 2), {"strides": [2, 1, 2], "pads": [0, 1, 0, 1, 0, 0]}, True),
]


@pytest.mark.parametrize("xs,ws,attrs,bias", CONV_T_CASES)
def test_conv_transpose(xs, ws, attrs, bias):
    b = rnd(ws[1] * attrs.get("group", 1)) if bias else None
    check("conv_transpose", [rnd(*xs), rnd(*ws), b], attrs)


def torch_conv_transpose(x, w, b, attrs):
    """float64 oracle: F.conv_transpose without padding, then ONNX's output_padding and pads by hand."""
    nsp = x.ndim - 2
    fn = getattr(torch.nn.functional, f"conv_transpose{nsp}d")
    y = fn(torch.from_numpy(x), torch.from_numpy(w), stride=attrs.get("strides") or 1,
           dilation=attrs.get("dilations") or 1, groups=attrs.get("group", 1)).numpy()
    opad = attrs.get("output_padding") or [0] * nsp
    y = np.pad(y, [(0, 0), (0, 0)] + [(0, o) for o in opad])
    pads = attrs.get("pads") or [0] * (2 * nsp)
    y = y[(slice(None),) * 2 + tuple(slice(pads[i], y.shape[2 + i] - pads[i + nsp]) for i in range(nsp))]
    return y if b is None else y + b.reshape(-1, *[1] * nsp)


@pytest.mark.parametrize("xs,ws,attrs,bias", CONV_T_CASES)
def test_conv_transpose_f64_vs_torch(xs, ws, attrs, bias):
    x, w = rnd(*xs, dtype=np.float64), rnd(*ws, dtype=np.float64)
    b = rnd(ws[1] * attrs.get("group", 1), dtype=np.float64) if bias else None
    (y,), (t,) = run_kiln("conv_transpose", [x, w, b], attrs)
    assert TensorType.of(y) == t
    np.testing.assert_allclose(y, torch_conv_transpose(x, w, b, attrs), rtol=1e-12, atol=1e-12)


def test_conv_transpose_is_the_adjoint_of_conv():
    # <conv(x), y> == <x, conv_transpose(y)> for the same weight, strides, pads, dilations
    x, w = rnd(1, 3, 7, 6, dtype=np.float64), rnd(4, 3, 3, 2, dtype=np.float64)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 1], "dilations": [1, 2]}
    (cx,), _ = run_kiln("conv", [x, w], attrs)
    y = rnd(*cx.shape, dtype=np.float64)
    (ty,), _ = run_kiln("conv_transpose", [y, w], attrs | {"output_padding": [0, 0]})
    ty = ty[..., :x.shape[2], :x.shape[3]]
    assert np.isclose((cx * y).sum(), (x * ty).sum(), rtol=1e-12)


# ------------------------------------------------------------------ pooling

POOL_CASES = [
    ((1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((1, 1, 5, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),  # window runs past the edge
    ((1, 1, 6, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ((1, 1, 8, 8), {"kernel_shape": [3, 3], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ((2, 3, 9, 8), {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [0, 1, 2, 0]}),
    ((1, 2, 9), {"kernel_shape": [4], "strides": [3], "pads": [1, 2], "ceil_mode": 1}),
    ((1, 2, 4, 5, 6), {"kernel_shape": [2, 3, 2], "strides": [2, 1, 2], "pads": [1, 0, 1, 0, 1, 1]}),
]


@pytest.mark.parametrize("xs,attrs", POOL_CASES)
def test_max_pool(xs, attrs):
    check("max_pool", [rnd(*xs)], attrs)


@pytest.mark.parametrize("xs,attrs", [
    ((1, 2, 9, 9), {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 1, 8, 8), {"kernel_shape": [2, 2], "dilations": [2, 1], "strides": [2, 2], "ceil_mode": 1}),
])
def test_max_pool_dilated(xs, attrs):
    check("max_pool", [rnd(*xs)], attrs)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.float64])
def test_max_pool_dtypes(dtype):
    x = rng.integers(-128 if dtype == np.int8 else 0, 127, size=(1, 2, 5, 5)).astype(dtype)
    check("max_pool", [x], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]})


def test_max_pool_padding_is_minus_infinity():
    x = -np.ones((1, 1, 2, 2), np.float32) * 5
    (y,), _ = run_kiln("max_pool", [x], {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1]})
    np.testing.assert_array_equal(y, np.full((1, 1, 3, 3), -5, np.float32))


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("xs,attrs", POOL_CASES)
def test_avg_pool(xs, attrs, count_include_pad):
    check("avg_pool", [rnd(*xs)], attrs | {"count_include_pad": count_include_pad})


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("xs,attrs", [
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ((1, 2, 7, 8), {"kernel_shape": [3, 2], "dilations": [2, 3], "pads": [2, 1, 2, 1]}),
    ((1, 2, 7, 8), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 1, 9), {"kernel_shape": [3], "dilations": [3], "strides": [2], "pads": [1, 2]}),
])
def test_avg_pool_dilated(xs, attrs, count_include_pad):
    check("avg_pool", [rnd(*xs)], attrs | {"count_include_pad": count_include_pad}, opset=19)


@pytest.mark.parametrize("xs,attrs", [
    ((2, 3, 6, 7), {"kernel_shape": [2, 2]}),
    ((2, 3, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 3, 6, 7), {"kernel_shape": [2, 3], "dilations": [2, 1], "storage_order": 1}),
    ((2, 3, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 2, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ((1, 2, 4, 5, 3), {"kernel_shape": [2, 2, 2], "storage_order": 1}),
])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_with_indices(xs, attrs, ties):
    """Both outputs vs onnxruntime; with ties (small integers) the first tap in window order wins."""
    x = rng.integers(-3, 3, xs).astype(np.float32) if ties else rnd(*xs)
    y, idx = check("max_pool_with_indices", [x], attrs)
    (y_plain,), _ = run_kiln("max_pool", [x], {k: v for k, v in attrs.items() if k != "storage_order"})
    np.testing.assert_array_equal(y, y_plain)
    if not attrs.get("storage_order"):
        np.testing.assert_array_equal(x.reshape(-1)[idx], y)  # row-major indices point at the maxima


def test_max_pool_with_indices_types():
    assert infer("max_pool_with_indices", ["f32[N,3,8,8]"], kernel_shape=[2, 2], strides=[2, 2]) == \
        [T("f32[N,3,4,4]"), T("i64[N,3,4,4]")]
    with pytest.raises(OpTypeError, match="storage_order must be 0 or 1"):
        infer("max_pool_with_indices", ["f32[1,3,8,8]"], kernel_shape=[2, 2], storage_order=2)


def test_avg_pool_ceil_window_counts_by_hand():
    # 5 columns, kernel 2, stride 2, ceil: the last window covers column 4 and one past the edge
    x = np.arange(5, dtype=np.float64).reshape(1, 1, 1, 5)
    for cip in (0, 1):
        (y,), _ = run_kiln("avg_pool", [x], {"kernel_shape": [1, 2], "strides": [1, 2], "ceil_mode": 1,
                                              "count_include_pad": cip})
        np.testing.assert_array_equal(y.ravel(), [0.5, 2.5, 4.0])
    (y,), _ = run_kiln("avg_pool", [x], {"kernel_shape": [1, 3], "strides": [1, 3], "pads": [0, 1, 0, 1],
                                          "count_include_pad": 1})
    np.testing.assert_array_equal(y.ravel(), [1 / 3, 9 / 3])


@pytest.mark.parametrize("op", ["global_avg_pool", "global_max_pool"])
@pytest.mark.parametrize("xs", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 2)])
def test_global_pool(op, xs):
    check(op, [rnd(*xs)])


# ------------------------------------------------------------------ norms

@pytest.mark.parametrize("xs", [(2, 3), (2, 3, 5), (2, 4, 3, 3)])
def test_batch_norm(xs):
    c = xs[1]
    check("batch_norm", [rnd(*xs), rnd(c), rnd(c), rnd(c), np.abs(rnd(c)) + 0.1], {"epsilon": 1e-3})


@pytest.mark.parametrize("xs,axis,sshape,bias", [
    ((2, 3, 8), -1, (8,), True),
    ((2, 3, 8), 1, (3, 8), True),
    ((2, 3, 8), -2, (3, 8), False),
    ((4, 6), 0, (4, 6), True),
    ((2, 3, 4, 5), 2, (4, 5), True),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm(xs, axis, sshape, bias, dtype):
    check("layer_norm", [rnd(*xs, dtype=dtype), rnd(*sshape, dtype=dtype), rnd(*sshape, dtype=dtype) if bias else None],
          {"axis": axis, "epsilon": 1e-5})


def test_layer_norm_broadcast_scale():
    x, s, b = rnd(2, 3, 8, dtype=np.float64), rnd(8, dtype=np.float64), rnd(1, 8, dtype=np.float64)
    (y,), _ = run_kiln("layer_norm", [x, s, b], {"axis": 1})
    m = x.mean(axis=(1, 2), keepdims=True)
    v = x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - m) / np.sqrt(v + 1e-5) * s + b, rtol=1e-12)


@pytest.mark.parametrize("xs,axis,sshape", [((2, 3, 8), -1, (8,)), ((2, 3, 8), 1, (3, 8)), ((5, 4), 0, (5, 4))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rms_norm(xs, axis, sshape, dtype):
    # onnxruntime 1.31 runs RMSNormalization (ai.onnx opset 23)
    check("rms_norm", [rnd(*xs, dtype=dtype), rnd(*sshape, dtype=dtype)], {"axis": axis, "epsilon": 1e-4}, opset=23)


def _decomposed(op, inputs, attrs):
    g = ir.Graph("d")
    vals = [g.add_input(f"in{i}", TensorType.of(a)) for i, a in enumerate(inputs)]
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    (new,) = ir.get_op(op).decompose(g, node)
    g.replace_all_uses(node.output, new)
    g.remove(node)
    ir.verify(g)
    assert op not in g.op_counts()
    return ir.interpret(g, {f"in{i}": a for i, a in enumerate(inputs)})[new.name]


@pytest.mark.parametrize("op,n", [("rms_norm", 2), ("layer_norm", 3), ("layer_norm", 2)])
def test_norm_decompositions(op, n):
    inputs = [rnd(2, 3, 6, dtype=np.float64), rnd(3, 6, dtype=np.float64), rnd(6, dtype=np.float64)][:n]
    attrs = {"axis": -2, "epsilon": 1e-3}
    (want,), _ = run_kiln(op, inputs, attrs)
    np.testing.assert_allclose(_decomposed(op, inputs, attrs), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("xs", [(2, 3, 5), (1, 4, 3, 3), (2, 2, 2, 3, 2)])
def test_instance_norm(xs):
    c = xs[1]
    check("instance_norm", [rnd(*xs), rnd(c), rnd(c)], {"epsilon": 1e-4})


LRN_ATTRS = {"alpha": 0.01, "beta": 0.7, "bias": 1.5}


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size):
    check("lrn", [rnd(2, 6, 3, 3)], {"size": size} | LRN_ATTRS)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_lrn_matches_onnx_formula(size):
    # onnxruntime refuses even sizes, so the formula from the ONNX spec, written as loops, is the oracle
    x = rnd(1, 5, 2, 2, dtype=np.float64)
    (y,), _ = run_kiln("lrn", [x], {"size": size} | LRN_ATTRS)
    want = np.empty_like(x)
    c = x.shape[1]
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c - 1, ch + -(-(size - 1) // 2))
        sq = (x[:, lo:hi + 1] ** 2).sum(axis=1)
        want[:, ch] = x[:, ch] / (1.5 + 0.01 / size * sq) ** 0.7
    np.testing.assert_allclose(y, want, rtol=1e-13)


# ------------------------------------------------------------------ softmax

@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("xs,axis", [((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1), ((2, 3, 4), -3), ((7,), 0)])
def test_softmax(op, xs, axis):
    check(op, [rnd(*xs, scale=5.0)], {"axis": axis})


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_is_stable(op):
    x = np.array([[1000.0, 1001.0, 999.0], [-1e4, -1e4, -1e4]], np.float32)
    check(op, [x])
    (y,), _ = run_kiln(op, [x], {})
    assert np.isfinite(y).all()


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
                  elements=st.floats(-300, 300)), st.integers(-3, 2))
def test_softmax_sums_to_one(x, axis):
    if not -x.ndim <= axis < x.ndim:
        with pytest.raises(OpTypeError, match="axis"):
            infer("softmax", [TensorType.of(x)], axis=axis)
        return
    (y,), _ = run_kiln("softmax", [x], {"axis": axis})
    np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-12)
    assert (y >= 0).all()
    (ly,), _ = run_kiln("log_softmax", [x], {"axis": axis})
    np.testing.assert_allclose(np.exp(ly), y, rtol=1e-9, atol=1e-300)


# ------------------------------------------------------------------ matmul

@pytest.mark.parametrize("a,b", [
    ((3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)), ((2, 1, 3, 4), (5, 4, 6)),
    ((2, 3, 4), (4, 2)), ((4,), (2, 4, 3)), ((1, 3, 4), (2, 4, 1)),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_matmul(a, b, dtype):
    if np.dtype(dtype).kind == "i":
        x, y = rng.integers(-50, 50, size=a).astype(dtype), rng.integers(-50, 50, size=b).astype(dtype)
    else:
        x, y = rnd(*a, dtype=dtype), rnd(*b, dtype=dtype)
    check("matmul", [x, y])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=0, max_size=3), st.lists(st.integers(1, 3), min_size=0, max_size=3),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(), st.booleans())
def test_matmul_type_rule_agrees_with_numpy(ba, bb, m, k, n, a1d, b1d):
    sa = (k,) if a1d else (*ba, m, k)
    sb = (k,) if b1d else (*bb, k, n)
    try:
        want = np.matmul(np.zeros(sa), np.zeros(sb)).shape
    except ValueError:
        with pytest.raises(OpTypeError):
            infer("matmul", [TensorType("f32", sa), TensorType("f32", sb)])
        return
    assert infer("matmul", [TensorType("f32", sa), TensorType("f32", sb)]) == [TensorType("f32", want)]


# ------------------------------------------------------------------ type rules: symbolic dims and errors

def test_symbolic_dims_flow():
    assert infer("conv", ["f32[N,3,H,W]", "f32[8,3,3,3]"], pads=[1, 1, 1, 1]) == [T("f32[N,8,H,W]")]
    assert infer("conv", ["f32[N,3,32,32]", "f32[8,3,3,3]", "f32[8]"], strides=[2, 2]) == [T("f32[N,8,15,15]")]
    assert infer("conv", ["f32[N,C,8,8]", "f32[M,C,3,3]"]) == [T("f32[N,M,6,6]")]
    assert infer("conv", ["f32[N,2*C,8,8]", "f32[M,C,1,1]"], group=2) == [T("f32[N,M,8,8]")]
    assert infer("conv_transpose", ["f32[N,4,H,W]", "f32[4,2,3,3]"], pads=[1, 1, 1, 1]) == [T("f32[N,2,H,W]")]
    assert infer("max_pool", ["f32[N,3,H,W]"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]) == [T("f32[N,3,H,W]")]
    assert infer("avg_pool", ["f32[B,3,7,7]"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1) == [T("f32[B,3,4,4]")]
    assert infer("global_avg_pool", ["f32[N,C,H,W]"]) == [T("f32[N,C,1,1]")]
    assert infer("batch_norm", ["f32[N,4,H]", "f32[4]", "f32[4]", "f32[4]", "f32[4]"]) == [T("f32[N,4,H]")]
    assert infer("layer_norm", ["f32[B,S,64]", "f32[64]"]) == [T("f32[B,S,64]")]
    assert infer("rms_norm", ["f32[B,S,64]", "f32[64]"]) == [T("f32[B,S,64]")]
    assert infer("softmax", ["f32[B,S,S]"], axis=1) == [T("f32[B,S,S]")]
    assert infer("matmul", ["f32[B,S,64]", "f32[64,N]"]) == [T("f32[B,S,N]")]
    assert infer("matmul", ["f32[B,1,S,K]", "f32[H,K,S]"]) == [T("f32[B,H,S,S]")]


@pytest.mark.parametrize("op,types,attrs,match", [
    ("conv", ["f32[1,3,8,8]", "f32[4,4,3,3]"], {}, r"input has 3 channels but the weight expects 4 \(.*group=1\)"),
    ("conv", ["f32[1,4,8,8]", "f32[6,1,3,3]"], {"group": 3}, "expects 3"),
    ("conv", ["f32[1,4,8]", "f32[4,4,3,3]"], {}, "rank"),
    ("conv", ["f32[1,4]", "f32[4,4]"], {}, "rank >= 3"),
    ("conv", ["f32[1,4,8,8]", "f32[6,4,3,3]", "f32[5]"], {}, "bias"),
    ("conv", ["f32[1,4,8,8]", "f64[6,4,3,3]"], {}, "dtype"),
    ("conv", ["i32[1,4,8,8]", "i32[6,4,3,3]"], {}, "float"),
    ("conv", ["f32[1,4,8,8]", "f32[6,4,3,3]"], {"pads": [1, 1]}, "pads"),
    ("conv", ["f32[1,4,8,8]", "f32[6,4,3,3]"], {"strides": [0, 1]}, "strides"),
    ("conv", ["f32[1,4,2,8]", "f32[6,4,3,3]"], {}, "smaller than the effective kernel"),
    ("conv", ["f32[1,4,H,8]", "f32[6,4,3,3]"], {"strides": [2, 2]}, "symbolic"),
    ("conv", ["f32[1,6,8,8]", "f32[5,3,3,3]"], {"group": 2}, "divide"),
    ("conv_transpose", ["f32[1,3,4,4]", "f32[4,2,3,3]"], {}, "3 channels"),
    ("conv_transpose", ["f32[1,4,H,4]", "f32[4,2,3,3]"], {"strides": [2, 2]}, "symbolic"),
    ("max_pool", ["f32[1,3,8,8]"], {"kernel_shape": [3]}, "kernel_shape"),
    ("max_pool", ["f32[1,3,8,8]"], {"kernel_shape": [2, 2], "pads": [2, 0, 0, 0]}, "smaller than the kernel"),
    ("avg_pool", ["i8[1,3,8,8]"], {"kernel_shape": [2, 2]}, "dtype"),
    ("batch_norm", ["f32[2,3,4]", "f32[4]", "f32[3]", "f32[3]", "f32[3]"], {}, "scale must be 1-D of length 3"),
    ("layer_norm", ["f32[2,3,4]", "f32[3]"], {}, "does not broadcast"),
    ("layer_norm", ["f32[2,3,4]", "f32[4]"], {"axis": 3}, "axis 3"),
    ("rms_norm", ["f32[2,3,4]", "f32[2,3,4,1]"], {"axis": 1}, "more dims"),
    ("instance_norm", ["f32[2,3,4]", "f32[3]", "f32[2]"], {}, "bias"),
    ("lrn", ["f32[2,3,4,4]"], {"size": 0}, "size"),
    ("softmax", ["f32[2,3]"], {"axis": 2}, "axis 2"),
    ("softmax", ["i32[2,3]"], {}, "float"),
    ("matmul", ["f32[3,4]", "f32[5,6]"], {}, "inner dims"),
    ("matmul", ["f32[2,3,4]", "f32[3,4,5]"], {}, "broadcast"),
    ("matmul", ["f32[3,4]", "f16[4,5]"], {}, "dtype"),
    ("matmul", ["f32[]", "f32[4]"], {}, "rank"),
])
def test_type_errors(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer(op, types, **attrs)
    assert str(e.value).startswith(f"{op}:")


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_of_an_empty_tensor_is_empty(op):
    """Fuzzer finding: split with a 0-size piece verified, then the reference failed on the empty softmax."""
    g = ir.parse(f"""graph @g(%x: f32[4,3]) -> (%y) {{
      %a, %b = split(%x) {{axis=0, split=[4, 0]}} : f32[4,3], f32[0,3]
      %y = {op}(%b) {{axis=-1}} : f32[0,3]
    }}""")
    ir.verify(g)
    out = ir.interpret(g, {"x": np.ones((4, 3), np.float32)})["y"]
    assert out.shape == (0, 3) and out.dtype == np.float32


def test_conv_transpose_output_padding_must_stay_below_the_stride():
    """Fuzzer finding: output_padding=1 with stride 1 verified; ONNX Runtime refused it at run time."""
    x, w = TensorType("f32", (1, 2, 5)), TensorType("f32", (2, 3, 3))
    with pytest.raises(OpTypeError, match=r"output_padding\[0\] = 1 must be less than max\(stride, dilation\) = 1"):
        infer("conv_transpose", [x, w], output_padding=[1])
    assert infer("conv_transpose", [x, w], output_padding=[1], strides=[2])[0].shape == (1, 3, 12)
