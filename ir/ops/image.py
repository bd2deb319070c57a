"""Image ops: resize, grid_sample, affine_grid, roi_align, max_roi_pool, deform_conv, col2im (ONNX semantics).

The references follow ONNX's own reference implementation (``onnx.reference``) where it
exists and ONNX Runtime where it does not (MaxRoiPool), step for step where a step decides an
index (coordinate transforms, nearest rounding, ROI rounding), and in float64 elsewhere, so
they are at least as exact as either and are the oracle for the compiled kernels.

``resize`` is ONNX Resize-19: its ``roi``/``scales``/``sizes`` inputs are attributes (one of
``scales``/``sizes`` non-empty, each listing the ``axes``; empty ``axes`` means all). It is
separable: :func:`resize_plan` resolves the output shape and the per-axis scale, and
:func:`resize_axis_taps` gives, per resized axis, each output position's source indices
(unclamped), weights and extrapolation flag, as ONNX's ``_interpolate_1d_along_axis`` does.
The TVM lowering computes the same coordinates with the same float64 operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, INT_DTYPES, Dim, TensorType, dim_mul
from .common import norm_axes, require_dtype, require_float, same_dtype

INJ = FusionKind.INJECTIVE
OUT = FusionKind.OUT_EWISE_FUSABLE
INTS: list[int] = []
FLOATS: list[float] = []
RESIZE_DTYPES = FLOAT_DTYPES | (INT_DTYPES - {"i2", "u2", "i4", "u4"})

RESIZE_MODES = ("nearest", "linear", "cubic")
COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
ASPECT_POLICIES = ("stretch", "not_larger", "not_smaller")


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OpTypeError(f"{what}={value!r}; expected one of {list(allowed)}")


def _calc(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def _cast_back(y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 results in ``dtype``: integers rounded half to even and saturated (ONNX's saturate_cast)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(y), info.min, info.max).astype(dtype)
    return y.astype(dtype)


# ================================================================== resize

@dataclass(frozen=True)
class ResizePlan:
    """A resize resolved for one input shape: output shape, per-axis scale and ROI, axes to resample."""

    out_shape: tuple[int, ...]
    scales: tuple[float, ...]
    roi: tuple[float, ...] | None  # full rank: begins then ends (f32 values); None when not given
    axes: tuple[int, ...]  # the axes actually resampled, in ONNX's processing order


def _resize_axes(rank: int, attrs: Attrs) -> list[int]:
    axes = list(attrs.get("axes") or [])
    return norm_axes(axes, rank, "resize: axes") if axes else list(range(rank))


def _check_resize_attrs(rank: int, attrs: Attrs) -> list[int]:
    """The normalized axes; OpTypeError for attribute combinations ONNX does not define."""
    _one_of("resize: mode", attrs["mode"], RESIZE_MODES)
    _one_of("resize: coordinate_transformation_mode", attrs["coordinate_transformation_mode"], COORD_MODES)
    _one_of("resize: nearest_mode", attrs["nearest_mode"], NEAREST_MODES)
    _one_of("resize: keep_aspect_ratio_policy", attrs["keep_aspect_ratio_policy"], ASPECT_POLICIES)
    axes = _resize_axes(rank, attrs)
    scales, sizes, roi = attrs["scales"], attrs["sizes"], attrs["roi"]
    if bool(scales) == bool(sizes):
        raise OpTypeError("resize needs exactly one of scales and sizes (the other empty), got "
                          f"scales={scales}, sizes={sizes}")
    given = scales or sizes
    if len(given) != len(axes):
        raise OpTypeError(f"resize: {'scales' if scales else 'sizes'} {given} must have one entry per axis "
                          f"({len(axes)} axes)")
    if scales and any(not s > 0 for s in scales):
        raise OpTypeError(f"resize: scales {scales} must be > 0")
    if sizes and any(s < 1 for s in sizes):
        raise OpTypeError(f"resize: sizes {sizes} must be >= 1")
    if roi and len(roi) != 2 * len(axes):
        raise OpTypeError(f"resize: roi {roi} must have 2 entries per axis (begins then ends), {len(axes)} axes")
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" and not roi:
        raise OpTypeError("resize: coordinate_transformation_mode=tf_crop_and_resize needs a roi")
    if attrs["mode"] == "nearest" and (attrs["antialias"] or attrs["exclude_outside"]):
        raise OpTypeError("resize: antialias and exclude_outside are defined for linear and cubic modes only "
                          "(ONNX Runtime rejects them with nearest; ONNX's reference would drop edge pixels)")
    return axes


def resize_plan(shape: tuple[int, ...], attrs: Attrs) -> ResizePlan:
    """Output shape, per-axis scales and ROI of a resize of a static ``shape`` (as ONNX's _interpolate_nd)."""
    r = len(shape)
    axes = _check_resize_attrs(r, attrs)
    out, scales = list(shape), [1.0] * r
    if attrs["sizes"]:
        for i, d in enumerate(axes):
            out[d] = int(attrs["sizes"][i])
        factors = [out[i] / shape[i] if shape[i] else 1.0 for i in range(r)]
        policy = attrs["keep_aspect_ratio_policy"]
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            scale = pick(factors[d] for d in axes)
            factors = [scale if i in axes else 1.0 for i in range(r)]
            out = [int(scale * shape[i] + 0.5) if i in axes else shape[i] for i in range(r)]
        scales = factors
    else:
        for i, d in enumerate(axes):
            scales[d] = float(np.float32(attrs["scales"][i]))
        out = [int(scales[i] * shape[i]) for i in range(r)]
    roi = None
    if attrs["roi"]:
        full = [0.0] * r + [1.0] * r
        k = len(axes)
        for i, d in enumerate(axes):
            full[d] = float(np.float32(attrs["roi"][i]))
            full[r + d] = float(np.float32(attrs["roi"][k + i]))
        roi = tuple(full)
    active = tuple(d for d in axes if not (
        math.isclose(scales[d], 1.0) and out[d] == shape[d]
        and (roi is None or (math.isclose(roi[d], 0.0) and math.isclose(roi[d + r], 1.0)))))
    return ResizePlan(tuple(out), tuple(scales), roi, active)


def resize_source_coords(y: np.ndarray, in_w: int, out_w: int, scale: float, mode: str,
                         roi: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Source coordinate of each output position ``y`` (float64) and, for tf_crop_and_resize, which
    positions fall outside the input (ONNX's _compute_x_ori, same operations in the same order)."""
    width = scale * in_w  # ONNX uses the unrounded output width here
    extrap = None
    if mode == "align_corners":
        x = np.zeros(out_w) if width == 1 else y * (in_w - 1) / (width - 1)
    elif mode == "asymmetric":
        x = y / scale
    elif mode == "tf_crop_and_resize":
        lo, hi = np.float32(roi[0]), np.float32(roi[1])
        span = float(hi - lo)  # ONNX's roi is float32, and so is this difference
        if width == 1:
            x = np.full(out_w, float(np.float32(hi - lo) * np.float32(in_w - 1) / np.float32(2)))
        else:
            x = y * span * (in_w - 1) / (width - 1)
        x = x + float(lo * np.float32(in_w - 1))
        extrap = (x < 0) | (x > in_w - 1)
    elif mode == "pytorch_half_pixel":
        x = np.full(out_w, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
    elif mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif mode == "half_pixel_symmetric":
        offset = in_w / 2 * (1 - out_w / width)
        x = offset + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")
    return x, extrap


def cubic_coeffs(r, a: float) -> list:
    """Keys' cubic convolution weights of the taps at -1, 0, 1, 2 for fraction ``r`` (ONNX's order of operations)."""
    return [((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
            ((a + 2) * r - (a + 3)) * r * r + 1,
            ((a + 2) * (1 - r) - (a + 3)) * (1 - r) * (1 - r) + 1,
            ((a * ((1 - r) + 1) - 5 * a) * ((1 - r) + 1) + 8 * a) * ((1 - r) + 1) - 4 * a]


def resize_tap_offsets(mode: str, scale: float, antialias: int) -> list[int]:
    """Tap positions relative to the base index (the pixel left of the source coordinate)."""
    if mode == "nearest":
        return [0, 1]
    if not antialias:
        return [0, 1] if mode == "linear" else [-1, 0, 1, 2]
    s = min(scale, 1.0)
    start = int(np.floor((-1 if mode == "linear" else -2) / s) + 1)
    return list(range(start, 2 - start))


def _antialias_weights(mode: str, ratio: np.ndarray, offsets: list[int], scale: float, a: float) -> np.ndarray:
    s = min(scale, 1.0)
    args = (np.asarray(offsets, dtype=np.float64)[None, :] - ratio[:, None]) * s
    if mode == "linear":
        w = np.clip(1 - np.abs(args), 0, 1)
    else:
        x = np.abs(args)
        x2 = x * x
        x3 = x * x2
        w = np.where(x <= 1, (a + 2) * x3 - (a + 3) * x2 + 1,
                     np.where(x < 2, a * x3 - 5 * a * x2 + 8 * a * x - 4 * a, 0.0))
    return w / w.sum(axis=1, keepdims=True)


def resize_axis_taps(in_w: int, out_w: int, scale: float, attrs: Attrs, roi: tuple[float, float] | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per output position along one axis: tap indices (out_w, n) before clamping, their weights
    (out_w, n) and the extrapolated positions (tf_crop_and_resize) or None."""
    mode = attrs["mode"]
    y = np.arange(out_w, dtype=np.float64)
    x, extrap = resize_source_coords(y, in_w, out_w, scale, attrs["coordinate_transformation_mode"], roi)
    fl = np.floor(x)
    whole = x == fl
    base = np.where(whole, fl - 1, fl).astype(np.int64)  # ONNX prefers the pixel left of x
    ratio = np.where(whole, 1.0, x - fl)
    offsets = resize_tap_offsets(mode, scale, attrs["antialias"])
    idx = base[:, None] + np.asarray(offsets, dtype=np.int64)[None, :]
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        up = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5,
              "floor": np.zeros_like(whole), "ceil": np.ones_like(whole)}[nm] | whole
        w = np.stack([~up, up], axis=1).astype(np.float64)
    elif attrs["antialias"]:
        w = _antialias_weights(mode, ratio, offsets, scale, attrs["cubic_coeff_a"])
    elif mode == "linear":
        w = np.stack([1 - ratio, ratio], axis=1)
    else:
        w = np.stack(cubic_coeffs(ratio, attrs["cubic_coeff_a"]), axis=1)
    if attrs["exclude_outside"]:
        w = np.where((idx < 0) | (idx >= in_w), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return idx, w, extrap


def _resize_out_shape(shape: tuple[Dim, ...], attrs: Attrs) -> tuple[Dim, ...]:
    """The output shape; symbolic dims survive where they are not resized or scaled by an integer."""
    if all(isinstance(d, int) for d in shape):
        return resize_plan(tuple(shape), attrs).out_shape
    axes = _check_resize_attrs(len(shape), attrs)
    if attrs["sizes"] and attrs["keep_aspect_ratio_policy"] != "stretch":
        raise OpTypeError(f"resize: keep_aspect_ratio_policy needs static dims on the resized axes, got {shape}")
    out = list(shape)
    for i, d in enumerate(axes):
        if attrs["sizes"]:
            out[d] = int(attrs["sizes"][i])
            continue
        s = float(np.float32(attrs["scales"][i]))
        if isinstance(shape[d], int):
            out[d] = int(s * shape[d])
        elif s == int(s):
            out[d] = dim_mul(shape[d], int(s))
        else:
            raise OpTypeError(f"resize: scaling the symbolic dim {shape[d]} by {s} needs a static size "
                              f"(only whole scale factors keep it symbolic)")
    return tuple(out)


def _resize_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, RESIZE_DTYPES, "resize: input")
    if x.rank < 1:
        raise OpTypeError("resize needs an input of rank >= 1")
    out = _resize_out_shape(tuple(x.shape), attrs)
    if any(isinstance(d, int) and d < 1 for d in out):
        raise OpTypeError(f"resize of {x} gives the empty shape {list(out)}")
    return [x.with_shape(out)]


def _resize_bound(node, ib: list[float], n_in: int) -> float:
    return ib[0] * (4.0 if node.attrs.get("mode") == "cubic" else 1.0)


@op("resize", bound=_resize_bound, inputs=("x",),
    attrs={"roi": Attr("floats", FLOATS), "scales": Attr("floats", FLOATS), "sizes": Attr("ints", INTS),
           "axes": Attr("ints", INTS), "mode": Attr("str", "nearest"),
           "coordinate_transformation_mode": Attr("str", "half_pixel"),
           "nearest_mode": Attr("str", "round_prefer_floor"), "cubic_coeff_a": Attr("float", -0.75),
           "exclude_outside": Attr("int", 0), "extrapolation_value": Attr("float", 0.0),
           "antialias": Attr("int", 0), "keep_aspect_ratio_policy": Attr("str", "stretch")},
    infer=_resize_infer, fusion=INJ,
    onnx=OnnxSpec("Resize", attr_inputs={1: "roi", 2: "scales", 3: "sizes"},
                  attr_dtypes={"roi": "f32", "scales": "f32", "sizes": "i64"}, since=19))
def resize(x, *, roi, scales, sizes, axes, mode, coordinate_transformation_mode, nearest_mode, cubic_coeff_a,
           exclude_outside, extrapolation_value, antialias, keep_aspect_ratio_policy):
    """ONNX Resize-19: nearest / (anti-aliased) linear / cubic resampling, one axis at a time in float64.

    Taps outside the input repeat the edge pixel (unless ``exclude_outside`` drops them and
    renormalizes); tf_crop_and_resize positions outside the input are ``extrapolation_value``.
    Integer outputs are rounded half to even and saturated.
    """
    attrs = {"roi": roi, "scales": scales, "sizes": sizes, "axes": axes, "mode": mode,
             "coordinate_transformation_mode": coordinate_transformation_mode, "nearest_mode": nearest_mode,
             "cubic_coeff_a": cubic_coeff_a, "exclude_outside": exclude_outside, "antialias": antialias,
             "keep_aspect_ratio_policy": keep_aspect_ratio_policy}
    plan = resize_plan(x.shape, attrs)
    r = x.ndim
    y = x
    for d in plan.axes:
        pair = None if plan.roi is None else (plan.roi[d], plan.roi[d + r])
        in_w, out_w = y.shape[d], plan.out_shape[d]
        idx, w, extrap = resize_axis_taps(in_w, out_w, plan.scales[d], attrs, pair)
        clamped = np.clip(idx, 0, in_w - 1)
        if mode == "nearest":
            pick = clamped[np.arange(out_w), w.argmax(axis=1)]
            res = np.take(y, pick, axis=d)
        else:
            gathered = np.take(_calc(y), clamped, axis=d)  # (..., out_w, n, ...)
            wshape = (1,) * d + w.shape + (1,) * (r - d - 1)
            res = (gathered * w.reshape(wshape)).sum(axis=d + 1)
        if extrap is not None and extrap.any():
            mshape = (1,) * d + (out_w,) + (1,) * (r - d - 1)
            res = np.where(extrap.reshape(mshape), extrapolation_value, _calc(res))
        y = res
    if y.dtype == x.dtype:
        return y.copy() if y is x else y
    return _cast_back(np.asarray(y, dtype=np.float64), x.dtype)


# ================================================================== grid_sample

GRID_MODES = ("linear", "nearest", "cubic")
PADDING_MODES = ("zeros", "border", "reflection")


def _grid_sample_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, grid = ts
    require_float(x, "grid_sample: input")
    require_float(grid, "grid_sample: grid")
    _one_of("grid_sample: mode", attrs["mode"], GRID_MODES)
    _one_of("grid_sample: padding_mode", attrs["padding_mode"], PADDING_MODES)
    if x.rank < 3:
        raise OpTypeError(f"grid_sample: input must be (N, C, spatial...), got {x}")
    nd = x.rank - 2
    if grid.rank != x.rank or grid.shape[-1] != nd:
        raise OpTypeError(f"grid_sample: grid must be (N, out spatial..., {nd}) for a {nd}-d input, got {grid}")
    if grid.shape[0] != x.shape[0]:
        raise OpTypeError(f"grid_sample: grid batch {grid.shape[0]} differs from the input's {x.shape[0]}")
    if attrs["mode"] == "cubic" and nd != 2:
        raise OpTypeError(f"grid_sample: cubic mode is defined for 2-d inputs only, got {nd}-d")
    return [x.with_shape((x.shape[0], x.shape[1], *grid.shape[1:-1]))]


def grid_denormalize(g: np.ndarray, size: int, align_corners: int) -> np.ndarray:
    """Grid values in [-1, 1] as pixel coordinates, rounded to float32 as ONNX's reference keeps them.

    Computed in float64, where every step is exact for float32 (and narrower) grids, so the
    kernel's fused multiply-adds cannot change a nearest rounding or a border decision.
    """
    g = g.astype(np.float64)
    x = (g + 1) / 2.0 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2.0
    return np.asarray(x).astype(np.float32)


def grid_reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect coordinates off the borders [lo, hi] until they fall inside (float64).

    The periodic form of ONNX's loop: ``lo + u`` or ``lo + (2*span - u)`` with ``u = (x - lo) mod
    2*span``; it is the identity inside [lo, hi] and exact for the float32 values grids give.
    """
    x = np.asarray(x, dtype=np.float64)
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    t = x - lo
    u = t - 2 * span * np.floor(t / (2 * span))
    return lo + np.where(u <= span, u, 2 * span - u)


def _grid_fetch(xf: np.ndarray, nidx: np.ndarray, coords: list[np.ndarray], dims: tuple[int, ...],
                padding: str, borders: list[tuple[float, float]]) -> np.ndarray:
    """X[n, :, coords...] per grid point (N, C, *O), padded as GridSample's pixel fetch does."""
    valid = np.ones(coords[0].shape, dtype=bool)
    fixed = []
    for c, d, (lo, hi) in zip(coords, dims, borders):
        if padding == "zeros":
            valid &= (c >= 0) & (c < d)
            fixed.append(np.clip(c, 0, d - 1))
        elif padding == "border":
            fixed.append(np.clip(c, 0, d - 1))
        else:
            fixed.append(np.clip(grid_reflect(c, lo, hi).astype(np.int64), 0, d - 1))
    vals = xf[(nidx, slice(None), *fixed)]  # advanced indices around a slice: (N, *O, C)
    vals = np.where(valid[..., None], vals, 0.0)
    return np.moveaxis(vals, -1, 1)


@op("grid_sample", bound=lambda node, ib, n: ib[0] * (2.5 if node.attrs.get("mode") == "cubic" else 1.0),
    inputs=("x", "grid"),
    attrs={"mode": Attr("str", "linear"), "padding_mode": Attr("str", "zeros"), "align_corners": Attr("int", 0)},
    infer=_grid_sample_infer, fusion=INJ, onnx=OnnxSpec("GridSample", since=22))
def grid_sample(x, grid, *, mode, padding_mode, align_corners):
    """ONNX GridSample-22 (any spatial rank; cubic 2-d): sample ``x`` at the grid's normalized
    coordinates (last grid axis lists x, y[, z]: the input's spatial axes reversed).

    Coordinates are denormalized to float32 as ONNX's reference does; nearest rounds half to
    even; out-of-range samples are zero, the clamped border pixel or reflected (``padding_mode``).
    Linear and nearest pad the source coordinate, then each tap; cubic pads each of its 16 taps
    only, as PyTorch and ONNX Runtime do (ONNX's reference also clamps cubic's coordinate).
    """
    dims = x.shape[2:]
    nd = len(dims)
    n = x.shape[0]
    xf = _calc(x)
    borders = [(0.0, d - 1.0) if align_corners else (-0.5, d - 0.5) for d in dims]
    coords = [grid_denormalize(grid[..., nd - 1 - i], dims[i], align_corners).astype(np.float64)
              for i in range(nd)]
    if mode == "nearest":
        coords = [np.rint(c) for c in coords]
    for i, (lo, hi) in enumerate(borders if mode != "cubic" else []):
        c = coords[i]
        if padding_mode == "border":
            coords[i] = np.where((c < lo) | (c > hi), np.clip(c, 0, dims[i] - 1), c)
        elif padding_mode == "reflection":
            coords[i] = grid_reflect(c, lo, hi)
    nidx = np.arange(n).reshape((n,) + (1,) * (grid.ndim - 2))
    if mode == "nearest":
        ints = [np.trunc(c).astype(np.int64) for c in coords]
        return _grid_fetch(xf, nidx, ints, dims, padding_mode, borders).astype(x.dtype)
    offsets = [0, 1] if mode == "linear" else [-1, 0, 1, 2]
    base = [np.floor(c).astype(np.int64) for c in coords]
    frac = [c - np.floor(c) for c in coords]
    weights = [[1 - f, f] if mode == "linear" else cubic_coeffs(f, -0.75) for f in frac]
    out = np.zeros((n, x.shape[1], *grid.shape[1:-1]))
    for taps in np.ndindex(*([len(offsets)] * nd)):
        w = np.ones(grid.shape[:-1])
        for i, t in enumerate(taps):
            w = w * weights[i][t]
        idx = [base[i] + offsets[t] for i, t in enumerate(taps)]
        out += _grid_fetch(xf, nidx, idx, dims, padding_mode, borders) * w[:, None]
    return out.astype(x.dtype)


# ================================================================== affine_grid

def _affine_grid_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    theta = ts[0]
    require_float(theta, "affine_grid: theta")
    size = list(attrs["size"])
    if len(size) not in (4, 5):
        raise OpTypeError(f"affine_grid: size {size} must be (N, C, H, W) or (N, C, D, H, W)")
    nd = len(size) - 2
    if theta.rank != 3 or theta.shape[1:] != (nd, nd + 1):
        raise OpTypeError(f"affine_grid: theta must be (N, {nd}, {nd + 1}) for size {size}, got {theta}")
    if any(s < 1 for s in size[2:]):
        raise OpTypeError(f"affine_grid: size {size} has an empty spatial dim")
    if attrs["align_corners"] and 1 in size[2:]:
        raise OpTypeError(f"affine_grid: align_corners=1 with a spatial size of 1 ({size}) is ill-defined "
                          f"(ONNX's formula divides by zero; PyTorch gives 0, ONNX Runtime 1)")
    if isinstance(theta.shape[0], int) and theta.shape[0] != size[0]:
        raise OpTypeError(f"affine_grid: size {size} has batch {size[0]}, theta {theta.shape[0]}")
    return [theta.with_shape((theta.shape[0], *size[2:], nd))]


def affine_base(size: int, align_corners: int) -> np.ndarray:
    """Normalized coordinates of the pixels along one axis (ONNX's arange construction)."""
    if align_corners:
        return -1 + np.arange(size) * (2.0 / (size - 1))
    step = 2.0 / size
    return (-1 + step / 2) + np.arange(size) * step


@op("affine_grid", bound=lambda node, ib, n: ib[0] * 4.0, inputs=("theta",),
    attrs={"size": Attr("ints"), "align_corners": Attr("int", 0)},
    infer=_affine_grid_infer, fusion=INJ,
    onnx=OnnxSpec("AffineGrid", attr_inputs={1: "size"}, attr_dtypes={"size": "i64"}))
def affine_grid(theta, *, size, align_corners):
    """ONNX AffineGrid: the sampling grid (N, *spatial, nd) of the affine maps ``theta`` (N, nd, nd+1),
    whose last axis lists x, y[, z] (the spatial axes reversed), in float64."""
    spatial = list(size[2:])
    nd = len(spatial)
    axes = [affine_base(s, align_corners) for s in spatial]
    mesh = np.meshgrid(*axes, indexing="ij")  # spatial order
    homo = np.stack([*mesh[::-1], np.ones(spatial)], axis=-1)  # (*spatial, nd + 1): x, y[, z], 1
    out = np.einsum("...k,njk->n...j", homo, _calc(theta))
    return out.reshape(theta.shape[0], *spatial, nd).astype(theta.dtype)


# ================================================================== roi_align

def _roi_align_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, rois, idx = ts
    require_float(x, "roi_align: input")
    same_dtype([x, rois], "roi_align: input and rois")
    require_dtype(idx, {"i64"}, "roi_align: batch_indices")
    _one_of("roi_align: mode", attrs["mode"], ("avg", "max"))
    _one_of("roi_align: coordinate_transformation_mode", attrs["coordinate_transformation_mode"],
            ("half_pixel", "output_half_pixel"))
    if x.rank != 4:
        raise OpTypeError(f"roi_align: input must be (N, C, H, W), got {x}")
    if rois.rank != 2 or rois.shape[1] != 4:
        raise OpTypeError(f"roi_align: rois must be (num_rois, 4), got {rois}")
    if idx.rank != 1 or idx.shape[0] != rois.shape[0]:
        raise OpTypeError(f"roi_align: batch_indices must be ({rois.shape[0]},), got {idx}")
    if attrs["output_height"] < 1 or attrs["output_width"] < 1 or attrs["sampling_ratio"] < 0:
        raise OpTypeError("roi_align: output_height/width must be >= 1 and sampling_ratio >= 0")
    return [x.with_shape((rois.shape[0], x.shape[1], attrs["output_height"], attrs["output_width"]))]


def roi_align_geometry(roi: np.ndarray, spatial_scale: float, half_pixel: bool, oh: int, ow: int,
                       sampling_ratio: int) -> tuple:
    """(start_h, start_w, bin_h, bin_w, grid_h, grid_w) of one ROI, in the ROIs' float type (float32
    for f16/bf16/f32) as ONNX's reference and ONNX Runtime compute them."""
    t = np.float64 if roi.dtype == np.float64 else np.float32
    offset = t(0.5 if half_pixel else 0.0)
    sw, sh, ew, eh = (t(v) * t(spatial_scale) - offset for v in roi)
    rw, rh = ew - sw, eh - sh
    if not half_pixel:
        rw, rh = max(rw, t(1.0)), max(rh, t(1.0))
    bh, bw = rh / t(oh), rw / t(ow)
    gh = int(sampling_ratio) if sampling_ratio > 0 else int(np.ceil(rh / t(oh)))
    gw = int(sampling_ratio) if sampling_ratio > 0 else int(np.ceil(rw / t(ow)))
    return sh, sw, bh, bw, gh, gw


def roi_bilinear(y: np.ndarray, x: np.ndarray, height: int, width: int):
    """Corner indices (y_lo, y_hi, x_lo, x_hi) and weights (w1..w4) of RoiAlign's bilinear samples;
    samples beyond one pixel outside the map get zero weights."""
    out = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y, x = np.maximum(y, y.dtype.type(0)), np.maximum(x, x.dtype.type(0))
    ylo, xlo = y.astype(np.int64), x.astype(np.int64)
    ytop, xtop = ylo >= height - 1, xlo >= width - 1
    ylo = np.where(ytop, height - 1, ylo)
    xlo = np.where(xtop, width - 1, xlo)
    yhi, xhi = np.where(ytop, ylo, ylo + 1), np.where(xtop, xlo, xlo + 1)
    t = y.dtype
    y, x = np.where(ytop, ylo.astype(t), y), np.where(xtop, xlo.astype(t), x)
    ly, lx = y - ylo.astype(t), x - xlo.astype(t)
    hy, hx = 1.0 - ly, 1.0 - lx
    ws = [np.where(out, 0.0, w) for w in (hy * hx, hy * lx, ly * hx, ly * lx)]
    zero = np.zeros_like(ylo)
    ylo, yhi, xlo, xhi = (np.where(out, zero, v) for v in (ylo, yhi, xlo, xhi))
    return (ylo, yhi, xlo, xhi), ws


@op("roi_align", bound="keep", inputs=("x", "rois", "batch_indices"),
    attrs={"mode": Attr("str", "avg"), "output_height": Attr("int", 1), "output_width": Attr("int", 1),
           "sampling_ratio": Attr("int", 0), "spatial_scale": Attr("float", 1.0),
           "coordinate_transformation_mode": Attr("str", "half_pixel")},
    infer=_roi_align_infer, fusion=OUT, onnx=OnnxSpec("RoiAlign", since=22))
def roi_align(x, rois, batch_indices, *, mode, output_height, output_width, sampling_ratio, spatial_scale,
              coordinate_transformation_mode):
    """ONNX RoiAlign: average (or max) of bilinear samples on a regular grid in each output bin.

    ``max`` takes, as ONNX's reference and ONNX Runtime do, the largest *weighted corner* value
    over the samples, not the max of the interpolated values. ``sampling_ratio`` 0 adapts the grid
    to each ROI's size.
    """
    _, c, height, width = x.shape
    oh, ow = output_height, output_width
    half = coordinate_transformation_mode == "half_pixel"
    xf = _calc(x)
    out = np.zeros((rois.shape[0], c, oh, ow))
    for r in range(rois.shape[0]):
        sh, sw, bh, bw, gh, gw = roi_align_geometry(rois[r], spatial_scale, half, oh, ow, sampling_ratio)
        if gh * gw == 0:
            continue
        t = type(sh)
        iy, ix = np.arange(gh, dtype=t), np.arange(gw, dtype=t)
        yy = sh + np.arange(oh, dtype=t)[:, None] * bh + (iy[None, :] + t(0.5)) * bh / t(gh)  # (oh, gh)
        xx = sw + np.arange(ow, dtype=t)[:, None] * bw + (ix[None, :] + t(0.5)) * bw / t(gw)  # (ow, gw)
        ys = np.broadcast_to(yy[:, :, None, None], (oh, gh, ow, gw))
        xs = np.broadcast_to(xx[None, None, :, :], (oh, gh, ow, gw))
        (ylo, yhi, xlo, xhi), ws = roi_bilinear(ys, xs, height, width)
        img = xf[int(batch_indices[r])]  # (C, H, W)
        terms = [w * img[:, a, b] for w, a, b in zip(ws, (ylo, ylo, yhi, yhi), (xlo, xhi, xlo, xhi))]
        if mode == "avg":
            out[r] = (terms[0] + terms[1] + terms[2] + terms[3]).sum(axis=(2, 4)) / max(gh * gw, 1)
        else:
            out[r] = np.maximum(np.maximum(terms[0], terms[1]), np.maximum(terms[2], terms[3])).max(axis=(2, 4))
    return out.astype(x.dtype)


# ================================================================== max_roi_pool

def _max_roi_pool_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, rois = ts
    require_float(x, "max_roi_pool: input")
    same_dtype([x, rois], "max_roi_pool: input and rois")
    if x.rank != 4:
        raise OpTypeError(f"max_roi_pool: input must be (N, C, H, W), got {x}")
    if rois.rank != 2 or rois.shape[1] != 5:
        raise OpTypeError(f"max_roi_pool: rois must be (num_rois, 5): batch index, x1, y1, x2, y2; got {rois}")
    ps = list(attrs["pooled_shape"])
    if len(ps) != 2 or min(ps) < 1:
        raise OpTypeError(f"max_roi_pool: pooled_shape {ps} must be two sizes >= 1")
    return [x.with_shape((rois.shape[0], x.shape[1], ps[0], ps[1]))]


def max_roi_windows(roi: np.ndarray, spatial_scale: float, ph: int, pw: int, height: int, width: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clipped [hstart, hend) per pooled row and [wstart, wend) per pooled column of one ROI, computed
    in float32 with round-half-away-from-zero as ONNX Runtime's MaxRoiPool does."""
    f = np.float32
    scale = f(spatial_scale)

    def rnd(v: float) -> int:
        v = float(f(v) * scale)  # a float32 value: |v| + 0.5 is exact in float64
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    sw, sh, ew, eh = (rnd(roi[k]) for k in (1, 2, 3, 4))
    rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
    bh, bw = f(rh) / f(ph), f(rw) / f(pw)

    def bounds(n: int, b: np.float32, start: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        k = np.arange(n, dtype=np.float32)
        lo = np.floor(k * b).astype(np.int64) + start
        hi = np.ceil((k + f(1)) * b).astype(np.int64) + start
        return np.clip(lo, 0, limit), np.clip(hi, 0, limit)

    hs, he = bounds(ph, bh, sh, height)
    ws, we = bounds(pw, bw, sw, width)
    return hs, he, ws, we


@op("max_roi_pool", bound="keep", inputs=("x", "rois"),
    attrs={"pooled_shape": Attr("ints"), "spatial_scale": Attr("float", 1.0)},
    infer=_max_roi_pool_infer, fusion=OUT, onnx=OnnxSpec("MaxRoiPool", since=22))
def max_roi_pool(x, rois, *, pooled_shape, spatial_scale):
    """ONNX MaxRoiPool (Fast R-CNN): max over each bin of the rounded ROI; an empty bin gives 0.

    A ROI row is (batch index, x1, y1, x2, y2) in input coordinates before ``spatial_scale``.
    """
    _, c, height, width = x.shape
    ph, pw = pooled_shape
    out = np.zeros((rois.shape[0], c, ph, pw), dtype=x.dtype)
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        hs, he, ws, we = max_roi_windows(rois[r], spatial_scale, ph, pw, height, width)
        for i in range(ph):
            for j in range(pw):
                if he[i] > hs[i] and we[j] > ws[j]:
                    out[r, :, i, j] = x[b, :, hs[i]:he[i], ws[j]:we[j]].max(axis=(1, 2))
    return out


# ================================================================== deform_conv

def _deform_conv_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, w, off = ts[0], ts[1], ts[2]
    b = ts[3] if len(ts) > 3 else None
    mask = ts[4] if len(ts) > 4 else None
    require_float(x, "deform_conv: input")
    dtype = same_dtype([x, w, off, b, mask], "deform_conv: operands")
    if x.rank != 4 or w.rank != 4:
        raise OpTypeError(f"deform_conv: kiln implements 2-d deformable convolution (N, C, H, W); got {x}, {w}")
    for t in (x, w, off):
        if not all(isinstance(d, int) for d in t.shape):
            raise OpTypeError(f"deform_conv needs static shapes, got {t}")
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    group, og = attrs["group"], attrs["offset_group"]
    ks = list(attrs["kernel_shape"] or [kh, kw])
    if ks != [kh, kw]:
        raise OpTypeError(f"deform_conv: kernel_shape {ks} disagrees with the weight {w}")
    strides = list(attrs["strides"] or [1, 1])
    dil = list(attrs["dilations"] or [1, 1])
    pads = list(attrs["pads"] or [0, 0, 0, 0])
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4 or min(strides + dil) < 1 or min(pads) < 0:
        raise OpTypeError(f"deform_conv: strides {strides}, dilations {dil}, pads {pads} do not fit 2-d")
    if group < 1 or og < 1 or cg * group != c or m % group or c % og:
        raise OpTypeError(f"deform_conv: {c} channels, weight {w}, group={group}, offset_group={og} do not fit")
    oh = (h + pads[0] + pads[2] - ((kh - 1) * dil[0] + 1)) // strides[0] + 1
    ow = (wd + pads[1] + pads[3] - ((kw - 1) * dil[1] + 1)) // strides[1] + 1
    if oh < 1 or ow < 1:
        raise OpTypeError(f"deform_conv: the kernel does not fit the padded input {x}")
    if off.shape != (n, og * kh * kw * 2, oh, ow):
        raise OpTypeError(f"deform_conv: offset must be {(n, og * kh * kw * 2, oh, ow)}, got {off}")
    if mask is not None and mask.shape != (n, og * kh * kw, oh, ow):
        raise OpTypeError(f"deform_conv: mask must be {(n, og * kh * kw, oh, ow)}, got {mask}")
    if b is not None and b.shape != (m,):
        raise OpTypeError(f"deform_conv: bias must be ({m},), got {b}")
    return [TensorType(dtype, (n, m, oh, ow))]


def deform_sample(img: np.ndarray, hy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` (C, H, W) at float positions (broadcast shapes), zero outside."""
    _, height, width = img.shape
    y0, x0 = np.floor(hy), np.floor(wx)
    ly, lx = hy - y0, wx - x0
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    out = 0.0
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wxx in ((0, 1 - lx), (1, lx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            v = img[:, np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]
            out = out + np.where(ok, v, 0.0) * (wy * wxx)
    return out


@op("deform_conv", layer=True, bound=lambda node, ib, n: float(np.prod(node.inputs[1].type.shape[1:])) * ib[0]
    * ib[1] * (ib[4] if len(ib) > 4 else 1.0) + (ib[3] if len(ib) > 3 else 0.0),
    inputs=("x", "w", "offset", "b?", "mask?"),
    attrs={"strides": Attr("ints", INTS), "pads": Attr("ints", INTS), "dilations": Attr("ints", INTS),
           "group": Attr("int", 1), "offset_group": Attr("int", 1), "kernel_shape": Attr("ints", INTS)},
    infer=_deform_conv_infer, fusion=OUT, onnx=OnnxSpec("DeformConv", since=22))
def deform_conv(x, w, offset, b=None, mask=None, *, strides, pads, dilations, group, offset_group, kernel_shape):
    """ONNX DeformConv (2-d): each kernel tap reads the input bilinearly at its regular position plus
    a learned (dy, dx) offset, scaled by the optional mask; zero outside the input. float64."""
    n, c, _, _ = x.shape
    m, cg, kh, kw = w.shape
    strides = list(strides or [1, 1])
    dil = list(dilations or [1, 1])
    pads = list(pads or [0, 0, 0, 0])
    oh, ow = offset.shape[2:]
    og = offset_group
    cog = c // og
    mg = m // group
    off = _calc(offset).reshape(n, og, kh, kw, 2, oh, ow)
    msk = None if mask is None else _calc(mask).reshape(n, og, kh, kw, oh, ow)
    base_h = (np.arange(oh) * strides[0] - pads[0])[:, None]
    base_w = (np.arange(ow) * strides[1] - pads[1])[None, :]
    xf, wf = _calc(x), _calc(w)
    out = np.zeros((n, m, oh, ow))
    for bi in range(n):
        cols = np.zeros((c, kh, kw, oh, ow))
        for g in range(og):
            img = xf[bi, g * cog:(g + 1) * cog]
            for i in range(kh):
                for j in range(kw):
                    hy = base_h + i * dil[0] + off[bi, g, i, j, 0]
                    wx = base_w + j * dil[1] + off[bi, g, i, j, 1]
                    v = deform_sample(img, hy, wx)
                    if msk is not None:
                        v = v * msk[bi, g, i, j]
                    cols[g * cog:(g + 1) * cog, i, j] = v
        for gi in range(group):
            wg = wf[gi * mg:(gi + 1) * mg].reshape(mg, -1)
            cg_cols = cols[gi * cg:(gi + 1) * cg].reshape(cg * kh * kw, -1)
            out[bi, gi * mg:(gi + 1) * mg] = (wg @ cg_cols).reshape(mg, oh, ow)
    if b is not None:
        out = out + _calc(b).reshape(m, 1, 1)
    return out.astype(x.dtype)


# ================================================================== col2im

def col2im_blocks(image: list[int], block: list[int], strides, pads, dil) -> list[int]:
    """Number of sliding blocks per spatial axis."""
    nd = len(image)
    return [(image[i] + pads[i] + pads[i + nd] - (dil[i] * (block[i] - 1) + 1)) // strides[i] + 1
            for i in range(nd)]


def _col2im_spatial(attrs: Attrs) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    image, block = list(attrs["image_shape"]), list(attrs["block_shape"])
    nd = len(image)
    strides = list(attrs["strides"] or [1] * nd)
    pads = list(attrs["pads"] or [0] * (2 * nd))
    dil = list(attrs["dilations"] or [1] * nd)
    if nd < 1 or len(block) != nd or len(strides) != nd or len(dil) != nd or len(pads) != 2 * nd:
        raise OpTypeError(f"col2im: image_shape {image}, block_shape {block}, strides {strides}, pads {pads}, "
                          f"dilations {dil} must agree in length")
    if min(image + block + strides + dil) < 1 or min(pads) < 0:
        raise OpTypeError("col2im: sizes, strides and dilations must be >= 1, pads >= 0")
    return image, block, strides, pads, dil


def _col2im_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, FLOAT_DTYPES | (INT_DTYPES - {"i2", "u2", "i4", "u4"}), "col2im: input")
    image, block, strides, pads, dil = _col2im_spatial(attrs)
    if x.rank != 3:
        raise OpTypeError(f"col2im: input must be (N, C * prod(block_shape), L), got {x}")
    kk = math.prod(block)
    cb, length = x.shape[1], x.shape[2]
    if not isinstance(cb, int) or cb % kk:
        raise OpTypeError(f"col2im: input dim 1 ({cb}) must be a multiple of prod(block_shape) = {kk}")
    blocks = col2im_blocks(image, block, strides, pads, dil)
    if min(blocks) < 1 or length != math.prod(blocks):
        raise OpTypeError(f"col2im: input dim 2 must be the number of blocks {blocks} = {math.prod(blocks)}, "
                          f"got {length}")
    return [x.with_shape((x.shape[0], cb // kk, *image))]


@op("col2im", bound=lambda node, ib, n: ib[0] * float(np.prod(node.attrs.get("block_shape") or [1])),
    inputs=("x",),
    attrs={"image_shape": Attr("ints"), "block_shape": Attr("ints"), "strides": Attr("ints", INTS),
           "pads": Attr("ints", INTS), "dilations": Attr("ints", INTS)},
    infer=_col2im_infer, fusion=INJ,
    onnx=OnnxSpec("Col2Im", attr_inputs={1: "image_shape", 2: "block_shape"},
                  attr_dtypes={"image_shape": "i64", "block_shape": "i64"}))
def col2im(x, *, image_shape, block_shape, strides, pads, dilations):
    """ONNX Col2Im: sum the columns (N, C * prod(block), L) of sliding blocks back into images
    (N, C, *image_shape); floats add in float64, integers in their own dtype (wrapping)."""
    image, block, strides, pads, dil = _col2im_spatial(
        {"image_shape": image_shape, "block_shape": block_shape, "strides": strides, "pads": pads,
         "dilations": dilations})
    nd = len(image)
    n, cb, _ = x.shape
    kk = math.prod(block)
    c = cb // kk
    blocks = col2im_blocks(image, block, strides, pads, dil)
    acc = np.float64 if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x.dtype
    src = x.astype(acc).reshape(n, c, *block, *blocks)
    padded = np.zeros((n, c, *[image[i] + pads[i] + pads[i + nd] + strides[i] * 2 + dil[i] * block[i]
                               for i in range(nd)]), dtype=acc)
    for tap in np.ndindex(*block):
        dst = tuple(slice(tap[i] * dil[i], tap[i] * dil[i] + strides[i] * (blocks[i] - 1) + 1, strides[i])
                    for i in range(nd))
        padded[(slice(None), slice(None)) + dst] += src[(slice(None), slice(None)) + tap]
    crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(nd))
    return padded[(slice(None), slice(None)) + crop].astype(x.dtype)
