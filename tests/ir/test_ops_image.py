"""Ops of family 'image': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx.reference import ReferenceEvaluator

from kiln import ir
from kiln.ir import OpTypeError

from .onnx_single import T, assert_same, check, infer, run_kiln, to_onnx

COVERED = {"resize", "grid_sample", "affine_grid", "roi_align", "max_roi_pool", "deform_conv", "col2im"}
RNG = np.random.default_rng(11)


def test_family_module_imports():
    import kiln.ir.ops.image  # noqa: F401


def test_covered_is_the_family():
    from kiln.ir.ops import image
    from kiln.ir.registry import all_ops
    family = {n for n, d in all_ops().items() if d.reference.__module__ == image.__name__}
    assert family == COVERED


def rnd(shape, lo=-2.0, hi=2.0, dtype=np.float32) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape).astype(dtype)


def check_onnx_reference(op: str, inputs, attrs, *, opset: int = 22, rtol=1e-5, atol=1e-6) -> None:
    """kiln's reference == onnx.reference for this op (where onnxruntime differs or lacks it)."""
    outs, types = run_kiln(op, inputs, attrs)
    node, feeds, inits = to_onnx(op, inputs, attrs, [t.dtype for t in types])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in feeds.items()],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    assert_same(outs[0], want.astype(outs[0].dtype), rtol=rtol, atol=atol, what=f"{op} vs onnx.reference")


# ------------------------------------------------------------------ resize

RESIZE_CASES = [
    {"mode": "nearest", "scales": [1, 1, 2, 3]},
    {"mode": "nearest", "scales": [1, 1, 0.5, 0.6], "nearest_mode": "round_prefer_ceil"},
    {"mode": "nearest", "sizes": [7, 3], "axes": [2, 3], "coordinate_transformation_mode": "asymmetric",
     "nearest_mode": "ceil"},
    {"mode": "nearest", "sizes": [1, 2, 9, 4], "coordinate_transformation_mode": "align_corners",
     "nearest_mode": "floor"},
    {"mode": "nearest", "sizes": [3, 9], "axes": [3, 2], "keep_aspect_ratio_policy": "not_smaller"},
    {"mode": "nearest", "sizes": [3, 9], "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
    {"mode": "linear", "scales": [1, 1, 1.5, 0.8]},
    {"mode": "linear", "sizes": [1, 2, 7, 3], "coordinate_transformation_mode": "pytorch_half_pixel"},
    {"mode": "linear", "scales": [1, 1, 0.7, 1.3], "coordinate_transformation_mode": "half_pixel_symmetric"},
    {"mode": "linear", "sizes": [1, 2, 6, 6], "coordinate_transformation_mode": "tf_crop_and_resize",
     "roi": [0, 0, 0.2, -0.3, 1, 1, 0.8, 1.1], "extrapolation_value": 7.0},
    {"mode": "linear", "scales": [1, 1, 0.4, 0.6], "antialias": 1},
    {"mode": "cubic", "scales": [1, 1, 1.8, 1.2], "cubic_coeff_a": -0.5, "exclude_outside": 1},
    {"mode": "cubic", "sizes": [1, 2, 2, 3], "antialias": 1},
    {"mode": "cubic", "sizes": [1, 2, 6, 8], "coordinate_transformation_mode": "align_corners"},
]


@pytest.mark.parametrize("attrs", RESIZE_CASES, ids=range(len(RESIZE_CASES)))
def test_resize_vs_onnxruntime(attrs):
    check("resize", [rnd((1, 2, 4, 5))], attrs)


@pytest.mark.parametrize("attrs", RESIZE_CASES, ids=range(len(RESIZE_CASES)))
def test_resize_vs_onnx_reference(attrs):
    # onnx.reference computes cubic weights in float32 when cubic_coeff_a is given (a float32 attribute)
    check_onnx_reference("resize", [rnd((1, 2, 4, 5), dtype=np.float64)], attrs, rtol=1e-5, atol=1e-6)


def test_resize_integers_round_half_to_even_as_onnx_reference():
    """ONNX's reference rounds integer results half to even and saturates; onnxruntime truncates u8."""
    x = RNG.integers(0, 256, (1, 1, 4, 5)).astype(np.uint8)
    for attrs in ({"mode": "linear", "scales": [1, 1, 1.5, 1.7]}, {"mode": "cubic", "scales": [1, 1, 2.0, 2.0]}):
        check_onnx_reference("resize", [x], attrs)
    check("resize", [x], {"mode": "nearest", "scales": [1, 1, 1.5, 1.7]})
    out = run_kiln("resize", [np.array([0, 255, 0], np.uint8)], {"mode": "cubic", "sizes": [7]})[0][0]
    assert out.dtype == np.uint8 and out.max() == 255  # cubic overshoot saturates instead of wrapping


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3))
@settings(max_examples=30, deadline=None)
def test_resize_nearest_whole_factors_repeat(h, w, k):
    """asymmetric nearest upsampling by a whole factor is np.repeat along each axis."""
    x = RNG.standard_normal((1, 1, h, w)).astype(np.float32)
    got = run_kiln("resize", [x], {"mode": "nearest", "scales": [1, 1, k, k],
                                   "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"})[0][0]
    np.testing.assert_array_equal(got, np.repeat(np.repeat(x, k, axis=2), k, axis=3))


@given(st.integers(2, 6), st.integers(1, 12), st.sampled_from(["linear", "cubic"]))
@settings(max_examples=30, deadline=None)
def test_resize_keeps_constants(n, m, mode):
    """Linear and cubic weights sum to one: a constant input stays constant (also with exclude_outside)."""
    x = np.full((n,), 3.25)
    for extra in ({}, {"exclude_outside": 1}, {"antialias": 1}):
        got = run_kiln("resize", [x], {"mode": mode, "sizes": [m], **extra})[0][0]
        np.testing.assert_allclose(got, 3.25, rtol=1e-12)


def test_resize_type_rule():
    assert infer("resize", ["f32[N,3,8,8]"], scales=[1, 1, 2, 2])[0] == T("f32[N,3,16,16]")
    assert infer("resize", ["f32[N,3,H,W]"], scales=[1, 1, 2, 3])[0] == T("f32[N,3,H*2,W*3]")
    assert infer("resize", ["f32[N,3,H,W]"], sizes=[5, 7], axes=[2, 3])[0] == T("f32[N,3,5,7]")
    assert infer("resize", ["u8[1,3,5,5]"], scales=[1, 1, 0.5, 0.5])[0] == T("u8[1,3,2,2]")
    assert infer("resize", ["f32[1,1,4,6]"], sizes=[3, 3], axes=[2, 3],
                 keep_aspect_ratio_policy="not_larger")[0] == T("f32[1,1,2,3]")
    bad = [
        ({"scales": [1, 1, 1.5, 2]}, "f32[N,3,H,W]", "whole scale"),
        ({"scales": [1, 2], "sizes": [1, 2]}, "f32[2,2]", "exactly one"),
        ({"scales": [1, 1, 2]}, "f32[1,1,2,2]", "one entry per axis"),
        ({"scales": [2.0], "mode": "nearest", "exclude_outside": 1}, "f32[4]", "linear and cubic"),
        ({"scales": [2.0], "coordinate_transformation_mode": "tf_crop_and_resize"}, "f32[4]", "needs a roi"),
        ({"scales": [2.0], "mode": "area"}, "f32[4]", "mode"),
        ({"scales": [0.1]}, "f32[4]", "empty shape"),
        ({"scales": [2.0]}, "bool[4]", "dtype"),
    ]
    for attrs, t, why in bad:
        with pytest.raises(OpTypeError, match=why):
            infer("resize", [t], **attrs)


# ------------------------------------------------------------------ grid_sample / affine_grid

@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_vs_onnxruntime(mode, padding, align):
    grid = rnd((2, 4, 3, 2), -1.7, 1.7)
    grid[0, 0] = [[-1, -1], [1, 1], [0.3, -0.5]]
    check("grid_sample", [rnd((2, 3, 5, 4)), grid], {"mode": mode, "padding_mode": padding, "align_corners": align})


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_grid_sample_volumetric_vs_onnx_reference(mode):
    check_onnx_reference("grid_sample", [rnd((1, 2, 3, 4, 2)), rnd((1, 2, 2, 3, 3), -1.3, 1.3)],
                         {"mode": mode, "padding_mode": "reflection", "align_corners": 1})


def test_grid_sample_type_rule():
    assert infer("grid_sample", ["f32[N,3,8,8]", "f32[N,5,6,2]"])[0] == T("f32[N,3,5,6]")
    with pytest.raises(OpTypeError, match="grid must be"):
        infer("grid_sample", ["f32[1,3,8,8]", "f32[1,5,6,3]"])
    with pytest.raises(OpTypeError, match="cubic"):
        infer("grid_sample", ["f32[1,3,4,4,4]", "f32[1,2,2,2,3]"], mode="cubic")


@pytest.mark.parametrize("size", [[2, 3, 4, 5], [2, 1, 3, 2, 4], [2, 1, 1, 3]])
@pytest.mark.parametrize("align", [0, 1])
def test_affine_grid_vs_onnxruntime(size, align):
    if align and 1 in size[2:]:
        with pytest.raises(OpTypeError, match="ill-defined"):
            infer("affine_grid", [f"f32[2,{len(size) - 2},{len(size) - 1}]"], size=size, align_corners=1)
        return
    nd = len(size) - 2
    check("affine_grid", [rnd((2, nd, nd + 1))], {"size": size, "align_corners": align})


def test_affine_grid_type_rule():
    assert infer("affine_grid", ["f64[N,2,3]"], size=[4, 1, 5, 6])[0] == T("f64[N,5,6,2]")
    with pytest.raises(OpTypeError, match="theta must be"):
        infer("affine_grid", ["f32[2,2,3]"], size=[2, 1, 3, 4, 5])


# ------------------------------------------------------------------ roi_align / max_roi_pool

ROIS = np.array([[0.4, 0.6, 3.7, 2.9], [1.0, 0.0, 4.9, 3.0], [-1.5, -1.0, 0.5, 1.5], [2.0, 2.0, 2.1, 2.05]],
                dtype=np.float32)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("ctm", ["half_pixel", "output_half_pixel"])
def test_roi_align_vs_onnxruntime(mode, ratio, ctm):
    check("roi_align", [rnd((2, 3, 5, 6), 0, 2), ROIS, np.array([0, 1, 1, 0], np.int64)],
          {"mode": mode, "output_height": 3, "output_width": 2, "sampling_ratio": ratio, "spatial_scale": 1.1,
           "coordinate_transformation_mode": ctm})


def test_roi_align_vs_onnx_reference():
    check_onnx_reference("roi_align", [rnd((1, 2, 6, 6)), ROIS * 1.2, np.zeros(4, np.int64)],
                         {"mode": "avg", "output_height": 2, "output_width": 3, "sampling_ratio": 0})


def test_max_roi_pool_vs_onnxruntime():
    """onnxruntime starts each bin's max at FLT_MIN (not -FLT_MAX), so it is compared on positive data."""
    rois = np.array([[0, 0, 0, 4, 3], [1, 1.5, 0.5, 5.5, 4.5], [1, -2, -3, 1, 1], [0, 5, 4, 1, 1]], np.float32)
    check("max_roi_pool", [rnd((2, 3, 5, 6), 0.1, 2), rois], {"pooled_shape": [2, 3], "spatial_scale": 0.75})


def test_max_roi_pool_negative_and_empty_bins():
    x = -np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    out = run_kiln("max_roi_pool", [x, np.array([[0, 0, 0, 1, 1], [0, 9, 9, 12, 12]], np.float32)],
                   {"pooled_shape": [1, 1]})[0][0]
    assert out[0, 0, 0, 0] == -1.0  # the true max, not ORT's FLT_MIN
    assert out[1, 0, 0, 0] == 0.0  # a bin clipped away entirely is empty: 0


# ------------------------------------------------------------------ deform_conv / col2im

@pytest.mark.parametrize("mask", [False, True])
def test_deform_conv_vs_onnxruntime(mask):
    x, w = rnd((2, 4, 5, 6)), rnd((6, 2, 2, 3))
    off = rnd((2, 2 * 2 * 3 * 2, 5, 3), -1.5, 1.5)
    m = rnd((2, 2 * 2 * 3, 5, 3), 0, 1) if mask else None
    check("deform_conv", [x, w, off, rnd((6,)), m],
          {"group": 2, "offset_group": 2, "pads": [1, 0, 0, 1], "strides": [1, 2]}, rtol=1e-4, atol=1e-5)


def test_deform_conv_zero_offsets_is_conv():
    x, w = rnd((1, 3, 6, 5), dtype=np.float64), rnd((4, 3, 3, 2), dtype=np.float64)
    off = np.zeros((1, 3 * 2 * 2, 4, 3))
    attrs = {"strides": [1, 2], "pads": [0, 0, 0, 1], "dilations": [1, 1]}
    got = run_kiln("deform_conv", [x, w, off], attrs)[0][0]
    want = run_kiln("conv", [x, w], attrs)[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attrs", [
    {"image_shape": [5, 5], "block_shape": [2, 2], "strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]},
    {"image_shape": [3, 4], "block_shape": [3, 1], "pads": [1, 0, 1, 0]},
])
def test_col2im_vs_onnxruntime(attrs):
    from kiln.ir.ops.image import col2im_blocks
    nd = len(attrs["image_shape"])
    blocks = col2im_blocks(attrs["image_shape"], attrs["block_shape"], attrs.get("strides") or [1] * nd,
                           attrs.get("pads") or [0] * 2 * nd, attrs.get("dilations") or [1] * nd)
    x = rnd((2, 3 * int(np.prod(attrs["block_shape"])), int(np.prod(blocks))))
    check("col2im", [x], attrs)


def test_col2im_5d_vs_onnx_reference():
    check_onnx_reference("col2im", [rnd((1, 2 * 4, 8))], {"image_shape": [2, 3, 4], "block_shape": [1, 2, 2],
                                                          "dilations": [1, 1, 2]})


def test_col2im_type_rule():
    assert infer("col2im", ["f32[N,12,16]"], image_shape=[5, 5], block_shape=[2, 2])[0] == T("f32[N,3,5,5]")
    with pytest.raises(OpTypeError, match="number of blocks"):
        infer("col2im", ["f32[1,12,15]"], image_shape=[5, 5], block_shape=[2, 2])
    assert ir.get_op("col2im").onnx.attr_inputs == {1: "image_shape", 2: "block_shape"}
