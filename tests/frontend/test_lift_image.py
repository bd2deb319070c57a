"""Lifting the image ops: Resize across opsets, Upsample, GridSample-16 spellings, RoiAlign-10,
ONNX's conformance cases (with their shape inputs as constants), refusals, and lowering back."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.frontend import lift, lower_to_onnx
from kiln.frontend.errors import FrontendError
from kiln.ir import interpret

IMAGE_CASES = r"test_(resize|upsample|gridsample|affine_grid|roialign|maxroipool|deform_conv|basic_deform|col2im)"
SHAPE_INPUTS = {"scales", "sizes", "roi", "size", "image_shape", "block_shape"}
X = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)


def _model(op: str, opset: int, inputs: list[str], inits: dict[str, np.ndarray], feeds: dict[str, np.ndarray],
           **attrs) -> onnx.ModelProto:
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in feeds.items()]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    graph = helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _kiln(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    g = lift(model)
    return interpret(g, feeds)[g.outputs[0].name]


def _same_as_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    want, got = _ort(model, feeds), _kiln(model, feeds)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conformance_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        return [c for c in collect_testcases(None) if re.search(IMAGE_CASES, c.name)]


CASES = _conformance_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_conformance_case_with_constant_shape_inputs(case):
    """Every conformance case of the family, its scales/sizes/roi/size/image_shape/block_shape inputs made
    initializers (as exporters write them), lifts and matches ONNX's expected output."""
    from kiln.conformance import _array, _matches
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, expected = case.data_sets[0]
    feeds = {}
    for vi, a in zip(list(model.graph.input), inputs):
        a = _array(a)
        if vi.name in SHAPE_INPUTS:
            model.graph.initializer.append(numpy_helper.from_array(a, vi.name))
            model.graph.input.remove(vi)
        else:
            feeds[vi.name] = a
    g = lift(model, input_shapes={k: list(v.shape) for k, v in feeds.items()})
    got = interpret(g, feeds)[g.outputs[0].name]
    bad = _matches(_array(expected[0]), got, float(case.rtol), float(case.atol))
    assert bad is None, bad


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 1.5, 2.5]])
def test_upsample_7_and_9_as_onnxruntime(mode, scales):
    s = np.array(scales, np.float32)
    _same_as_ort(_model("Upsample", 7, ["x"], {}, {"x": X}, mode=mode, scales=[float(v) for v in s]), {"x": X})
    _same_as_ort(_model("Upsample", 9, ["x", "s"], {"s": s}, {"x": X}, mode=mode), {"x": X})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 0.5, 0.6], [1, 1, 0.6, 0.6], [1, 1, 1.5, 2.5]])
def test_resize_10_as_onnxruntime(mode, scales):
    """Resize-10 is asymmetric; nearest rounds down when upsampling and up when downsampling."""
    _same_as_ort(_model("Resize", 10, ["x", "s"], {"s": np.array(scales, np.float32)}, {"x": X}, mode=mode),
                 {"x": X})


def test_resize_10_mixed_nearest_rounding_is_refused():
    m = _model("Resize", 10, ["x", "s"], {"s": np.array([1, 1, 1.5, 0.6], np.float32)}, {"x": X}, mode="nearest")
    with pytest.raises(FrontendError, match="one nearest_mode"):
        lift(m)


@pytest.mark.parametrize("opset", [11, 13, 18, 19])
def test_resize_across_opsets_as_onnxruntime(opset):
    roi = np.array([], np.float32)
    m = _model("Resize", opset, ["x", "roi", "none", "sizes"],  # Resize-11 needs scales, empty beside sizes
               {"roi": roi, "none": roi, "sizes": np.array([1, 2, 4, 9], np.int64)},
               {"x": X}, mode="linear", coordinate_transformation_mode="align_corners")
    _same_as_ort(m, {"x": X})
    m = _model("Resize", opset, ["x", "roi", "scales"], {"roi": roi, "scales": np.array([1, 1, 0.6, 1.4], np.float32)},
               {"x": X}, mode="cubic", cubic_coeff_a=-0.5)
    _same_as_ort(m, {"x": X})


def test_resize_runtime_scales_are_refused_as_dynamic():
    s = np.array([1, 1, 2, 2], np.float32)
    m = _model("Resize", 19, ["x", "", "s"], {}, {"x": X, "s": s}, mode="nearest")
    with pytest.raises(FrontendError) as e:
        lift(m)
    assert "scales" in str(e.value) and "run time" in str(e.value)


def test_tf_half_pixel_for_nn_is_refused():
    m = _model("Resize", 11, ["x", "roi", "s"], {"roi": np.array([], np.float32), "s": np.array([1, 1, 2, 2], np.float32)},
               {"x": X}, mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn")
    with pytest.raises(FrontendError, match="tf_half_pixel_for_nn"):
        lift(m)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_16_spellings(mode):
    grid = np.random.default_rng(1).uniform(-1.2, 1.2, (1, 3, 4, 2)).astype(np.float32)
    m = _model("GridSample", 16, ["x", "grid"], {}, {"x": X, "grid": grid}, mode=mode, padding_mode="border")
    _same_as_ort(m, {"x": X, "grid": grid})
    assert lift(m).nodes[0].attrs["mode"] == {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)


def test_roi_align_10_is_output_half_pixel():
    rois = np.array([[0.5, 0.5, 4.5, 3.2], [1.0, 0.0, 6.0, 4.0]], np.float32)
    idx = np.zeros(2, np.int64)
    feeds = {"x": X, "rois": rois, "idx": idx}
    m = _model("RoiAlign", 10, ["x", "rois", "idx"], {}, feeds, output_height=2, output_width=3, sampling_ratio=2)
    _same_as_ort(m, feeds)
    assert lift(m).nodes[0].attrs["coordinate_transformation_mode"] == "output_half_pixel"


@pytest.mark.parametrize("attrs", [
    {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "sizes": [1, 2, 3, 4],
     "roi": [0, 0, 0.2, 0.1, 1, 1, 0.9, 0.8], "extrapolation_value": 2.0},
    {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 0.5]},
    {"mode": "cubic", "sizes": [6, 5], "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"},
])
def test_lower_to_onnx_round_trip(attrs):
    """kiln's resize written back as ONNX Resize (absent roi/scales/sizes as empty inputs) runs in ORT alike."""
    from kiln import ir
    g = ir.Graph("g")
    x = g.add_input("x", ir.TensorType("f32", X.shape))
    g.set_outputs(g.add_node("resize", [x], attrs).outputs)
    want = interpret(g, {"x": X})[g.outputs[0].name]
    model = lower_to_onnx(g)
    got = _ort(model, {"x": X})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
