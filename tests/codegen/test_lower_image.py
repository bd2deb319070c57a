"""TVM lowerings of the image ops (resize, grid_sample, affine_grid, col2im, deform_conv, roi_align,
max_roi_pool) against the reference interpreter, and the schedules they get."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln import ir
from kiln.codegen.kernel import lower_node, run_kernel
from kiln.codegen.lowering import image as lim
from kiln.codegen.schedules import loop_kinds
from kiln.codegen.tolerance import assert_close
from kiln.ir import TensorType

from .util import TARGET


def run_op(op: str, inputs: list[np.ndarray | None], attrs: dict, *, consts: tuple[int, ...] = ()):
    """Lower one node, run it, compare with the interpreter; returns the kernel."""
    g = ir.Graph("g")
    vals = []
    for i, a in enumerate(inputs):
        if a is None:
            vals.append(None)
        elif i in consts:
            vals.append(g.add_constant(a, f"c{i}"))
        else:
            vals.append(g.add_input(f"in{i}", TensorType.of(a)))
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    ir.verify(g)
    feeds = {f"in{i}": a for i, a in enumerate(inputs) if a is not None and i not in consts}
    want = ir.interpret(g, feeds)[node.outputs[0].name]
    k = lower_node(node, TARGET, name="k")
    assert not k.notes, k.notes
    got = run_kernel(k, feeds, TARGET)[0]
    assert_close(got, want, what=f"{op} {attrs}")
    return k


def rand(shape, dtype="f32", lo=-2.0, hi=2.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype in ("u8", "i8", "i32"):
        dt = {"u8": np.uint8, "i8": np.int8, "i32": np.int32}[dtype]
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -100), min(info.max, 200), size=shape).astype(dt)
    return rng.uniform(lo, hi, size=shape).astype({"f32": np.float32, "f64": np.float64, "f16": np.float16}[dtype])


# ------------------------------------------------------------------ resize

NEAREST = [
    {"scales": [1.0, 1.0, 2.0, 2.0]},
    {"scales": [1.0, 1.0, 0.5, 0.5]},
    {"sizes": [7, 3], "axes": [2, 3], "nearest_mode": "round_prefer_ceil"},
    {"sizes": [1, 1, 5, 9], "coordinate_transformation_mode": "align_corners", "nearest_mode": "floor"},
    {"scales": [1.0, 1.0, 0.6, 1.7], "coordinate_transformation_mode": "asymmetric", "nearest_mode": "ceil"},
    {"sizes": [6, 4], "axes": [3, 2], "coordinate_transformation_mode": "half_pixel_symmetric"},
    {"sizes": [1, 1, 7, 7], "coordinate_transformation_mode": "tf_crop_and_resize",
     "roi": [0, 0, 0.3, -0.2, 1, 1, 0.9, 1.4], "extrapolation_value": 3.5},
    {"sizes": [5, 5], "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
]


@pytest.mark.parametrize("attrs", NEAREST, ids=range(len(NEAREST)))
def test_resize_nearest(attrs):
    k = run_op("resize", [rand((1, 2, 4, 6))], {"mode": "nearest", **attrs})
    assert k.kind == "injective"


WEIGHTED = [
    {"mode": "linear", "scales": [1.0, 1.0, 2.0, 2.0]},
    {"mode": "linear", "scales": [1.0, 1.0, 0.6, 0.6], "coordinate_transformation_mode": "align_corners"},
    {"mode": "linear", "sizes": [1, 1, 3, 4], "coordinate_transformation_mode": "pytorch_half_pixel"},
    {"mode": "linear", "sizes": [1, 2, 7, 7], "coordinate_transformation_mode": "tf_crop_and_resize",
     "roi": [0, 0, 0.4, -0.3, 1, 1, 0.6, 1.2], "extrapolation_value": 10.0},
    {"mode": "cubic", "scales": [1.0, 1.0, 1.5, 0.8]},
    {"mode": "cubic", "scales": [1.0, 1.0, 0.8, 0.8], "cubic_coeff_a": -0.5, "exclude_outside": 1},
    {"mode": "cubic", "scales": [1.0, 1.0, 2.0, 2.0], "coordinate_transformation_mode": "asymmetric"},
    {"mode": "linear", "scales": [1.0, 1.0, 0.6, 0.6], "antialias": 1},
    {"mode": "cubic", "sizes": [1, 2, 3, 2], "antialias": 1},
    {"mode": "linear", "scales": [1.0, 1.0, 0.3333, 2.25], "coordinate_transformation_mode": "half_pixel_symmetric"},
]


@pytest.mark.parametrize("attrs", WEIGHTED, ids=range(len(WEIGHTED)))
def test_resize_weighted(attrs):
    run_op("resize", [rand((1, 2, 4, 6))], attrs)


@pytest.mark.parametrize(("dtype", "mode"), [("u8", "linear"), ("i8", "nearest"), ("f64", "linear"), ("f16", "linear")])
def test_resize_dtypes(dtype, mode):
    run_op("resize", [rand((1, 1, 3, 5), dtype)], {"mode": mode, "scales": [1.0, 1.0, 1.5, 2.0]})


def test_resize_1d_and_5d():
    run_op("resize", [rand((9,))], {"mode": "linear", "sizes": [4]})
    run_op("resize", [rand((1, 1, 2, 3, 4))], {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 2.0, 2.0]})


def test_resize_identity_is_a_copy():
    run_op("resize", [rand((1, 2, 3, 3))], {"mode": "linear", "scales": [1.0, 1.0, 1.0, 1.0]})


def test_nearest_integer_rule_reproduces_the_table():
    """The compile-time integer rule is exact where it is used and absent where it cannot be."""
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_floor",
             "exclude_outside": 0, "antialias": 0, "cubic_coeff_a": -0.75}
    for in_w, out_w in [(4, 8), (8, 4), (5, 13), (13, 5), (7, 7), (3, 1)]:
        ax = lim._Axis(in_w, out_w, out_w / in_w, attrs, None)
        table = np.clip(ax.idx[np.arange(out_w), ax.w.argmax(1)], 0, in_w - 1)
        P, Q, R = lim._floor_fit(table, ax.x, in_w)
        assert np.array_equal(np.clip((np.arange(out_w) * P + Q) // R, 0, in_w - 1), table)
    assert lim._floor_fit(np.array([0, 2, 1]), np.array([0.0, 1.0, 2.0]), 3) is None


def test_resize_f64_coordinate_path():
    """A float32 scale with no small rational form takes ONNX's float64 coordinate operations."""
    attrs = {"mode": "nearest", "scales": [1.0, 1.0, 0.7071, 1.4142], "coordinate_transformation_mode": "half_pixel"}
    plan = ir.ops.image.resize_plan((1, 1, 9, 11), {**ir.get_op("resize").complete_attrs(attrs)})
    assert lim._rational_fit(lim._Axis(9, plan.out_shape[2], plan.scales[2],
                                       ir.get_op("resize").complete_attrs(attrs), None).x) is None
    run_op("resize", [rand((1, 1, 9, 11))], attrs)
    run_op("resize", [rand((1, 1, 9, 11))], {**attrs, "mode": "linear"})


def test_resize_schedule_is_parallel_and_vectorized():
    x = rand((1, 8, 64, 64))
    for mode in ("nearest", "linear"):
        k = run_op("resize", [x], {"mode": mode, "scales": [1.0, 1.0, 2.0, 2.0]})
        kinds = loop_kinds(k.func)
        assert kinds["parallel"] >= 1 and kinds["vectorized"] >= 1, kinds


# ------------------------------------------------------------------ grid_sample / affine_grid

@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample(mode, padding):
    align = int(padding != "border")
    x = rand((2, 3, 4, 5))
    grid = rand((2, 3, 6, 2), lo=-1.6, hi=1.6, seed=1)
    grid[0, 0, :4] = [[-1, -1], [1, 1], [-0.5, 0.25], [0.75, -1.25]]  # corners and half-way points
    run_op("grid_sample", [x, grid], {"mode": mode, "padding_mode": padding, "align_corners": align})


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_grid_sample_volumetric(mode):
    run_op("grid_sample", [rand((1, 2, 3, 4, 5)), rand((1, 2, 3, 4, 3), lo=-1.3, hi=1.3, seed=2)],
           {"mode": mode, "padding_mode": "reflection"})


@pytest.mark.parametrize(("size", "align"), [([2, 3, 4, 5], 0), ([2, 1, 3, 4, 2], 1)])
def test_affine_grid(size, align):
    nd = len(size) - 2
    run_op("affine_grid", [rand((2, nd, nd + 1))], {"size": size, "align_corners": align})


# ------------------------------------------------------------------ col2im / deform_conv

@pytest.mark.parametrize("dtype", ["f32", "i32"])
def test_col2im(dtype):
    run_op("col2im", [rand((2, 3 * 4, 12), dtype)],
           {"image_shape": [5, 5], "block_shape": [2, 2], "strides": [2, 1], "pads": [1, 0, 0, 1],
            "dilations": [1, 2]})
    run_op("col2im", [rand((1, 2 * 3, 24), dtype)], {"image_shape": [3, 3, 4], "block_shape": [1, 3, 1],
                                                     "pads": [0, 1, 0, 0, 0, 0]})


@pytest.mark.parametrize("with_mask", [False, True])
def test_deform_conv(with_mask):
    x = rand((1, 4, 5, 6))
    w = rand((4, 2, 2, 3), seed=1)
    off = rand((1, 2 * 2 * 3 * 2, 6, 2), lo=-1.5, hi=1.5, seed=2)
    b = rand((4,), seed=3)
    mask = rand((1, 2 * 2 * 3, 6, 2), lo=0, hi=1, seed=4) if with_mask else None
    run_op("deform_conv", [x, w, off, b, mask],
           {"group": 2, "offset_group": 2, "pads": [1, 0, 1, 0], "strides": [1, 2], "dilations": [1, 1]})


# ------------------------------------------------------------------ roi_align / max_roi_pool

ROIS = np.array([[0.5, 0.5, 4.2, 3.3], [1.0, 0.0, 6.9, 5.0], [-2.0, -1.5, 1.0, 2.0], [3, 3, 3.2, 3.1]],
                dtype=np.float32)


@pytest.mark.parametrize(("mode", "ratio", "ctm"), [("avg", 2, "half_pixel"), ("max", 2, "output_half_pixel"),
                                                   ("avg", 0, "output_half_pixel"), ("max", 0, "half_pixel")])
def test_roi_align(mode, ratio, ctm):
    x = rand((2, 3, 6, 7), lo=0, hi=3)
    run_op("roi_align", [x, ROIS, np.array([0, 1, 1, 0], dtype=np.int64)],
           {"mode": mode, "output_height": 3, "output_width": 2, "sampling_ratio": ratio, "spatial_scale": 0.9,
            "coordinate_transformation_mode": ctm})


def test_max_roi_pool():
    rois = np.array([[0, 0, 0, 5, 4], [1, 1.4, 2.6, 3.5, 4.5], [1, -3, -3, 1, 1], [0, 6, 5, 2, 1]], dtype=np.float32)
    run_op("max_roi_pool", [rand((2, 3, 6, 7)), rois], {"pooled_shape": [2, 3], "spatial_scale": 0.8})


# ------------------------------------------------------------------ fuzz builders

@pytest.mark.parametrize("op", ["resize", "grid_sample", "affine_grid", "roi_align", "max_roi_pool", "deform_conv",
                                "col2im"])
def test_fuzz_builder_graphs_compile_and_match(op):
    """The family's fuzz builders make valid nodes whose kernels agree with the interpreter."""
    from kiln.fuzz.generate import OP_BUILDERS, Builder, GenFailed, safe_inputs
    for seed in range(20):
        g = ir.Graph("g")
        try:
            v = OP_BUILDERS[op](Builder(g, np.random.default_rng(seed)), None)
        except GenFailed:
            continue
        g.set_outputs([v])
        ir.verify(g)
        env = ir.interpret(g, safe_inputs(g, np.random.default_rng(seed)), keep_all=True)
        k = lower_node(v.producer, TARGET, name="k")
        assert not k.notes, k.notes
        feeds = {u.name: env[u.name] for u in v.producer.inputs if u is not None and u.const is None}
        assert_close(run_kernel(k, feeds, TARGET)[0], env[v.name], what=f"{op} seed {seed}")
        return
    pytest.fail(f"no {op} graph in 20 seeds")
