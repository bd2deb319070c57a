"""ONNX converters for the ops of family 'image' that the generic registry lifting cannot express.

* ``Resize`` 11-19 is lifted generically (its roi/scales/sizes inputs must be constants; a
  run-time one is refused as a dynamic shape); ``tf_half_pixel_for_nn`` (Resize-11 only) is refused.
* ``Resize``-10 and ``Upsample`` 7-10 become ``resize`` with the ``asymmetric`` transform, as ONNX
  Runtime runs them: nearest takes the floor of the source coordinate on upsampled axes and its
  ceiling on downsampled ones; a node where that rule differs between axes is refused.
* ``GridSample``-16 spells linear/cubic ``bilinear``/``bicubic``; ``RoiAlign``-10 has no
  coordinate_transformation_mode and behaves as ``output_half_pixel``.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.ops.image import resize_axis_taps
from kiln.ir.registry import get_op

from .lift import _Ctx, _Refuse, _special

_LINEAR_SPELLINGS = {"linear": "linear", "bilinear": "linear", "trilinear": "linear", "nearest": "nearest"}


@_special("Resize", needs=("resize",), since=19)
def _resize(ctx: _Ctx) -> list[Value | None]:
    if ctx.opset < 11:
        return _upsample_as_resize(ctx, ctx.const_input(1, "scales"))
    if ctx.attr("coordinate_transformation_mode", "half_pixel") == "tf_half_pixel_for_nn":
        raise _Refuse("coordinate_transformation_mode=tf_half_pixel_for_nn (removed in opset 13) "
                      "is not supported")
    return ctx.generic(get_op("resize"))


@_special("Upsample", needs=("resize",), since=10)
def _upsample(ctx: _Ctx) -> list[Value | None]:
    scales = ctx.attrs.get("scales") if ctx.opset < 9 else ctx.const_input(1, "scales")
    return _upsample_as_resize(ctx, scales)


def _upsample_as_resize(ctx: _Ctx, scales) -> list[Value | None]:
    """Upsample / Resize-10: per-axis scales, asymmetric coordinates, ONNX Runtime's nearest rule."""
    x = ctx.x(0)
    if scales is None:
        raise _Refuse("scales are missing")
    scales = [float(np.float32(s)) for s in np.asarray(scales).reshape(-1)]
    if len(scales) != x.type.rank:
        raise _Refuse(f"scales {scales} need one entry per input dim (rank {x.type.rank})")
    mode = _LINEAR_SPELLINGS.get(str(ctx.attr("mode", "nearest")).lower())
    if mode is None:
        raise _Refuse(f"mode={ctx.attr('mode')!r} is not an Upsample mode kiln knows (nearest, linear)")
    attrs = {"scales": scales, "mode": mode, "coordinate_transformation_mode": "asymmetric"}
    if mode == "nearest":
        attrs["nearest_mode"] = _simple_nearest_mode(x, scales)
    return [ctx.op("resize", [x], attrs, out=0)]


def _simple_nearest_mode(x: Value, scales: list[float]) -> str:
    """ONNX Runtime's pre-opset-11 nearest: floor on upsampled axes, ceil on downsampled ones, as one
    kiln nearest_mode (axes whose coordinates are all whole numbers accept either)."""
    needs: set[str] = set()
    for d, s in zip(x.type.shape, scales):
        if s == 1.0:
            continue
        if not isinstance(d, int):
            if s != int(s):
                raise _Refuse(f"nearest upsampling of the symbolic dim {d} by {s} needs a static size",
                              dynamic=True)
            needs.add("floor")
            continue
        want = "ceil" if s < 1 else "floor"
        base = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "antialias": 0,
                "exclude_outside": 0, "cubic_coeff_a": -0.75}
        tables = [resize_axis_taps(d, int(s * d), s, {**base, "nearest_mode": m}, None)
                  for m in ("floor", "ceil")]
        if not np.array_equal(tables[0][1], tables[1][1]):
            needs.add(want)
    if len(needs) > 1:
        raise _Refuse("nearest resampling that rounds down on upsampled axes and up on downsampled ones "
                      "(ONNX Runtime's rule before opset 11) in one node; kiln's resize has one nearest_mode")
    return needs.pop() if needs else "floor"


@_special("GridSample", needs=("grid_sample",), since=22)
def _grid_sample(ctx: _Ctx) -> list[Value | None]:
    mode = str(ctx.attr("mode", "linear"))
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    return ctx.generic(get_op("grid_sample"), attrs={"mode": mode}, skip_attrs=("mode",))


@_special("RoiAlign", needs=("roi_align",), since=22)
def _roi_align(ctx: _Ctx) -> list[Value | None]:
    if ctx.opset < 16:
        return ctx.generic(get_op("roi_align"), attrs={"coordinate_transformation_mode": "output_half_pixel"})
    return ctx.generic(get_op("roi_align"))
