"""Fuzz builders for the ops of family 'image' (ops the generic builders do not cover).

Every builder keeps its node tame and valid: resize picks scales or sizes that give 1..12 pixels
per axis (and a ROI near [0, 1] for tf_crop_and_resize); grid_sample's grid and deform_conv's
offsets come squashed into a few pixels around the image; ROIs are constants inside the image with
batch indices in range; col2im gets an input of exactly the shape its attributes need.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.ops.image import COORD_MODES, NEAREST_MODES, col2im_blocks
from kiln.ir.types import TensorType

from .generate import Builder, GenFailed, _divisors, _is_float, builder


def _grid_like(b: Builder, shape: tuple[int, ...], dtype: str, span: float, hint: str) -> Value:
    """A float operand of ``shape`` in about [-span, span]: a constant, or a squashed new input."""
    if b.chance(0.5):
        return b.rand_const(shape, dtype, -span, span, hint)
    v = b.node("tanh", [b.input(TensorType(dtype, shape), hint)])
    return b.node("mul", [v, b.const(np.array(span, dtype=v.type.np_dtype), "span")])


@builder("resize")
def _b_resize(b: Builder, x: Value | None) -> Value:
    a = b.image(x)
    mode = b.choice(("nearest", "nearest", "linear", "linear", "cubic"))
    if mode == "cubic":
        a = b.tame(a, 100.0)
    rank = a.type.rank
    axes = list(range(2, rank))
    attrs: dict = {"mode": mode, "coordinate_transformation_mode": b.choice(COORD_MODES)}
    if mode == "nearest":
        attrs["nearest_mode"] = b.choice(NEAREST_MODES)
    elif b.chance(0.3):
        attrs["antialias"] = 1
    if mode == "cubic":
        attrs["cubic_coeff_a"] = b.choice((-0.75, -0.5))
        attrs["exclude_outside"] = int(b.chance(0.3))
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize":
        lo = [round(float(b.rng.uniform(-0.2, 0.4)), 2) for _ in axes]
        hi = [round(float(b.rng.uniform(0.6, 1.2)), 2) for _ in axes]
        attrs["roi"] = lo + hi
        attrs["extrapolation_value"] = b.choice((0.0, 1.5))
    if b.chance(0.5):
        attrs["scales"] = [b.choice((0.5, 0.75, 1.0, 1.5, 2.0, 3.0)) for _ in axes]
    else:
        attrs["sizes"] = [b.randint(1, 12) for _ in axes]
        if b.chance(0.2):
            attrs["keep_aspect_ratio_policy"] = b.choice(("not_larger", "not_smaller"))
    if b.chance(0.6) or "roi" in attrs:
        attrs["axes"] = axes
    else:
        key = "scales" if "scales" in attrs else "sizes"
        attrs[key] = [1.0 if key == "scales" else a.type.shape[i] for i in range(2)] + attrs[key]
    return b.node("resize", [a], **attrs)


@builder("grid_sample")
def _b_grid_sample(b: Builder, x: Value | None) -> Value:
    a = b.image(x, min_rank=4)
    mode = b.choice(("linear", "nearest", "cubic"))
    n, nd = a.type.shape[0], a.type.rank - 2
    if nd != 2 and mode == "cubic":
        mode = "linear"
    out = [b.randint(1, 5) for _ in range(nd)]
    grid = _grid_like(b, (n, *out, nd), a.type.dtype, b.choice((1.0, 1.3)), "grid")
    return b.node("grid_sample", [b.tame(a, 100.0), grid], mode=mode,
                  padding_mode=b.choice(("zeros", "border", "reflection")), align_corners=int(b.chance(0.5)))


@builder("affine_grid")
def _b_affine_grid(b: Builder, x: Value | None) -> Value:
    nd = b.choice((2, 2, 3))

    def make() -> Value:
        return b.input(TensorType(b.choice(("f32", "f64")), (b.randint(1, 2), nd, nd + 1)), "theta")
    theta = b.tame(b.primary(x, lambda v: _is_float(v) and v.type.rank == 3 and v.type.shape[1] in (2, 3)
                             and v.type.shape[2] == v.type.shape[1] + 1 and isinstance(v.type.shape[0], int),
                             make), 10.0)
    nd = theta.type.shape[1]
    spatial = [b.randint(2, 6) for _ in range(nd)]
    return b.node("affine_grid", [theta], size=[theta.type.shape[0], 1, *spatial],
                  align_corners=int(b.chance(0.5)))


def _rois(b: Builder, count: int, height: int, width: int) -> np.ndarray:
    """(count, 4) boxes x1, y1, x2, y2 mostly inside a height x width image."""
    x1 = b.rng.uniform(-0.5, width - 1, count)
    y1 = b.rng.uniform(-0.5, height - 1, count)
    x2 = x1 + b.rng.uniform(0.2, width, count)
    y2 = y1 + b.rng.uniform(0.2, height, count)
    return np.round(np.stack([x1, y1, x2, y2], axis=1), 2)


@builder("roi_align")
def _b_roi_align(b: Builder, x: Value | None) -> Value:
    a = b.image(x, min_rank=4)
    if a.type.rank != 4:
        raise GenFailed("roi_align takes 4-d images")
    n, _, h, w = a.type.shape
    count = b.randint(1, 3)
    rois = b.const(_rois(b, count, h, w).astype(a.type.np_dtype), "rois")
    idx = b.const(b.rng.integers(0, n, count).astype(np.int64), "batch_indices")
    return b.node("roi_align", [b.tame(a, 100.0), rois, idx], mode=b.choice(("avg", "max")),
                  output_height=b.randint(1, 3), output_width=b.randint(1, 3), sampling_ratio=b.choice((0, 1, 2)),
                  spatial_scale=b.choice((1.0, 0.5)),
                  coordinate_transformation_mode=b.choice(("half_pixel", "output_half_pixel")))


@builder("max_roi_pool")
def _b_max_roi_pool(b: Builder, x: Value | None) -> Value:
    a = b.image(x, min_rank=4)
    if a.type.rank != 4:
        raise GenFailed("max_roi_pool takes 4-d images")
    n, _, h, w = a.type.shape
    count = b.randint(1, 3)
    boxes = _rois(b, count, h, w)
    rois = np.concatenate([b.rng.integers(0, n, (count, 1)), boxes], axis=1).astype(a.type.np_dtype)
    return b.node("max_roi_pool", [a, b.const(rois, "rois")], pooled_shape=[b.randint(1, 3), b.randint(1, 3)],
                  spatial_scale=b.choice((1.0, 0.5)))


@builder("deform_conv")
def _b_deform_conv(b: Builder, x: Value | None) -> Value:
    a = b.image(x, min_rank=4)
    if a.type.rank != 4:
        raise GenFailed("deform_conv takes 4-d images")
    a = b.tame(a)
    n, c, h, wd = a.type.shape
    dt = a.type.dtype
    group = b.choice(_divisors(c))
    og = b.choice(_divisors(c))
    m = group * b.randint(1, 2)
    kh, kw = b.randint(1, min(3, h)), b.randint(1, min(3, wd))
    strides = [b.choice((1, 1, 2)), b.choice((1, 1, 2))]
    pads = [b.randint(0, 1) for _ in range(4)]
    oh = (h + pads[0] + pads[2] - kh) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - kw) // strides[1] + 1
    w = b.weight((m, c // group, kh, kw), dt, (c // group) * kh * kw)
    offset = _grid_like(b, (n, og * kh * kw * 2, oh, ow), dt, 1.5, "offset")
    bias = b.rand_const([m], dt, -0.5, 0.5, "b") if b.chance(0.5) else None
    mask = b.rand_const([n, og * kh * kw, oh, ow], dt, 0.0, 1.0, "mask") if b.chance(0.4) else None
    return b.node("deform_conv", [a, w, offset, bias, mask], group=group, offset_group=og, strides=strides,
                  pads=pads, kernel_shape=[kh, kw])


@builder("col2im")
def _b_col2im(b: Builder, x: Value | None) -> Value:
    nd = b.choice((1, 2, 2))
    image = [b.randint(2, 6) for _ in range(nd)]
    block = [b.randint(1, min(3, s)) for s in image]
    strides = [b.choice((1, 1, 2)) for _ in range(nd)]
    dil = [b.choice((1, 1, 2)) if (s - 1) >= 2 * (k - 1) else 1 for s, k in zip(image, block)]
    pads = [b.randint(0, 1) for _ in range(2 * nd)]
    blocks = col2im_blocks(image, block, strides, pads, dil)
    if min(blocks) < 1:
        raise GenFailed("col2im blocks do not fit")
    c = b.randint(1, 3)
    shape = (b.randint(1, 2), c * math.prod(block), math.prod(blocks))
    a = b.primary(x, lambda v: _is_float(v) and tuple(v.type.shape) == shape,
                  lambda: b.input(TensorType(b.choice(("f32", "f64")), shape), "cols"))
    return b.node("col2im", [b.tame(a)], image_shape=image, block_shape=block, strides=strides, pads=pads,
                  dilations=dil)
