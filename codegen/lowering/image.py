"""TVM lowerings of the ops in ir/ops/image.py.

``resize`` is lowered per resized axis from the reference's own per-axis plan. Where a whole
axis follows an integer rule, found and checked against the reference's table at compile time,
the kernel uses integer arithmetic: nearest indices ``clamp((P*o + Q) // R)``, and for linear and
cubic an exact rational source coordinate ``(p*o + q) / r``. Otherwise it recomputes ONNX's float64
coordinate transform with the same operations in the same order, so every nearest index and every
tf_crop_and_resize extrapolation decision is the reference's. Weighted modes are separable stages
(inlined by the injective schedule); values are computed in float32 (float64 for f64 and integer
data, whose results are rounded half to even and saturated).

grid_sample, affine_grid and col2im are injective gathers; roi_align, max_roi_pool and deform_conv
are reductions (an adaptive RoiAlign sampling grid and MaxRoiPool's bins have data-dependent
extents, which TVM loops over directly).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from tvm import te, tirx

from kiln.ir.ops.image import (
    _cast_back,
    col2im_blocks,
    cubic_coeffs,
    resize_axis_taps,
    resize_plan,
    resize_source_coords,
    resize_tap_offsets,
)

from . import LowerCtx, lowers, shape_of
from .elementwise import dtype_of
from .tensor import out_shape

F64 = "float64"


def _f64(v: float) -> tirx.PrimExpr:
    return tirx.const(float(v), F64)


def _calc_dtype(dtype: str) -> str:
    """Arithmetic dtype: float32 for f16/bf16/f32 data, float64 for f64 and integer data."""
    return "float32" if dtype in ("float16", "bfloat16", "float32") else F64


def _to_dtype(v: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    """A computed value in the output dtype: integers rounded half to even and saturated."""
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(np.dtype(dtype))
        v = tirx.nearbyint(v)
        v = tirx.max(tirx.min(v, tirx.const(float(info.max), dtype_of(v))), tirx.const(float(info.min), dtype_of(v)))
    return v.astype(dtype)


def _clamp(v: tirx.PrimExpr, lo: int, hi: int) -> tirx.PrimExpr:
    return tirx.max(tirx.min(v, hi), lo)


def _int_dtype(*bounds: int) -> str:
    return "int32" if max(abs(b) for b in bounds) < 2 ** 31 - 1 else "int64"


# ================================================================== resize: integer rules found at compile time

def _slope(x: np.ndarray) -> Fraction | None:
    if len(x) < 2:
        return Fraction(0)
    a = (x[-1] - x[0]) / (len(x) - 1)
    return Fraction(a).limit_denominator(1 << 12) if np.isfinite(a) else None


def _floor_fit(table: np.ndarray, x: np.ndarray, in_w: int) -> tuple[int, int, int] | None:
    """(P, Q, R) with clamp((P*o + Q) // R, 0, in_w - 1) == table[o] for every o, or None."""
    a = _slope(x)
    if a is None:
        return None
    o = np.arange(len(table), dtype=object)
    for m in (1, 2):
        R = a.denominator * m
        P = a.numerator * m
        lo, hi = -(1 << 62), 1 << 62
        for k, t in enumerate(table.tolist()):
            base = P * k
            if in_w > 1 and t == 0:
                hi = min(hi, R - 1 - base)
            elif in_w > 1 and t == in_w - 1:
                lo = max(lo, (in_w - 1) * R - base)
            elif in_w > 1:
                lo, hi = max(lo, t * R - base), min(hi, t * R + R - 1 - base)
        if lo > hi:
            continue
        Q = lo if lo > -(1 << 62) else min(hi, 0)
        got = np.clip(np.array([(P * k + Q) // R for k in o], dtype=np.int64), 0, in_w - 1)
        if np.array_equal(got, table):
            return P, Q, R
    return None


def _rational_fit(x: np.ndarray) -> tuple[int, int, int] | None:
    """(p, q, r) with x[o] == (p*o + q) / r up to float64 rounding for every o, or None."""
    a = _slope(x)
    if a is None:
        return None
    b = Fraction(float(x[0])).limit_denominator(1 << 12)
    r = a.denominator * b.denominator // math.gcd(a.denominator, b.denominator)
    p, q = int(a * r), int(b * r)
    exact = (np.arange(len(x)) * p + q) / r
    if np.all(np.abs(exact - x) <= 1e-12 * np.maximum(1.0, np.abs(x))):
        return p, q, r
    return None


def _run_mask(mask: np.ndarray, o: tirx.PrimExpr) -> tirx.PrimExpr | None:
    """``mask[o]`` as ``o < a or o >= b`` when the mask is a prefix plus a suffix, else None."""
    n = len(mask)
    a = int(np.argmin(mask)) if not mask.all() else n
    b = n - (int(np.argmin(mask[::-1])) if not mask.all() else n)
    want = np.zeros(n, dtype=bool)
    want[:a] = True
    want[max(b, a):] = True
    if not np.array_equal(want, mask):
        return None
    conds = ([o < a] if a > 0 else []) + ([o >= b] if b < n else [])
    return tirx.const(False, "bool") if not conds else conds[0] if len(conds) == 1 else tirx.Or(*conds)


# ================================================================== resize: float64 coordinates (ONNX's operations)

def _coord_te(o: tirx.PrimExpr, in_w: int, out_w: int, scale: float, mode: str,
              roi: tuple[float, float] | None) -> tuple[tirx.PrimExpr, tirx.PrimExpr | None]:
    """The same float64 operations as ``resize_source_coords``, on one output index."""
    y = o.astype(F64)
    width = scale * in_w
    extrap = None
    if mode == "align_corners":
        x = _f64(0.0) if width == 1 else y * _f64(in_w - 1) / _f64(width - 1)
    elif mode == "asymmetric":
        x = y / _f64(scale)
    elif mode == "tf_crop_and_resize":
        lo, hi = np.float32(roi[0]), np.float32(roi[1])
        if width == 1:
            x = _f64(float(np.float32(hi - lo) * np.float32(in_w - 1) / np.float32(2)))
        else:
            x = y * _f64(float(hi - lo)) * _f64(in_w - 1) / _f64(width - 1)
        x = x + _f64(float(lo * np.float32(in_w - 1)))
        extrap = tirx.Or(x < _f64(0.0), x > _f64(in_w - 1))
    elif mode == "pytorch_half_pixel":
        x = _f64(-0.5) if width == 1 else (y + _f64(0.5)) / _f64(scale) - _f64(0.5)
    elif mode == "half_pixel":
        x = (y + _f64(0.5)) / _f64(scale) - _f64(0.5)
    else:  # half_pixel_symmetric
        x = _f64(in_w / 2 * (1 - out_w / width)) + (y + _f64(0.5)) / _f64(scale) - _f64(0.5)
    return x, extrap


class _Axis:
    """One resized axis: how its output index maps to taps and weights, decided at compile time."""

    def __init__(self, in_w: int, out_w: int, scale: float, attrs: dict, roi: tuple[float, float] | None):
        self.in_w, self.out_w, self.scale, self.attrs, self.roi = in_w, out_w, scale, attrs, roi
        self.ctm = attrs["coordinate_transformation_mode"]
        self.idx, self.w, self.extrap = resize_axis_taps(in_w, out_w, scale, attrs, roi)
        self.x, _ = resize_source_coords(np.arange(out_w, dtype=np.float64), in_w, out_w, scale, self.ctm, roi)
        self.offsets = resize_tap_offsets(attrs["mode"], scale, attrs["antialias"])

    def extrap_te(self, o: tirx.PrimExpr) -> tirx.PrimExpr | None:
        if self.extrap is None or not self.extrap.any():
            return None
        fast = _run_mask(self.extrap, o)
        return fast if fast is not None else _coord_te(o, self.in_w, self.out_w, self.scale, self.ctm, self.roi)[1]

    def nearest_te(self, o: tirx.PrimExpr) -> tirx.PrimExpr:
        """The clamped source index of output index ``o`` (nearest mode)."""
        table = np.clip(self.idx[np.arange(self.out_w), self.w.argmax(axis=1)], 0, self.in_w - 1)
        fit = _floor_fit(table, self.x, self.in_w)
        if fit is not None:
            P, Q, R = fit
            dt = _int_dtype(P * self.out_w + Q, Q)
            v = tirx.floordiv(o.astype(dt) * P + Q, R) if R != 1 else o.astype(dt) * P + Q
            return _clamp(v, 0, self.in_w - 1).astype("int32")
        x, _ = _coord_te(o, self.in_w, self.out_w, self.scale, self.ctm, self.roi)
        fl = tirx.floor(x)
        whole = x == fl
        ratio = x - fl
        up = {"round_prefer_floor": ratio > _f64(0.5), "round_prefer_ceil": ratio >= _f64(0.5),
              "floor": tirx.const(False, "bool"), "ceil": tirx.const(True, "bool")}[self.attrs["nearest_mode"]]
        # a whole x: ONNX's base is x - 1 and it takes the tap above, i.e. x itself
        idx = tirx.Select(whole, fl, tirx.Select(up, fl + _f64(1.0), fl))
        return _clamp(idx.astype("int64"), 0, self.in_w - 1).astype("int32")

    def interpolate_te(self, o: tirx.PrimExpr, read, calc: str) -> tirx.PrimExpr:
        """sum_k w_k(o) * read(tap_k(o)) in ``calc`` (linear / cubic).

        No Let bindings: an inlined stage is substituted at every read, and TVM rejects one Let
        variable bound to two values; normalized weights are applied as sum(w * v) / sum(w) so the
        expression grows linearly in the taps.
        """
        fit = _rational_fit(self.x)
        if fit is not None:
            p, q, r = fit
            dt = _int_dtype(p * self.out_w + q, q)
            num = o.astype(dt) * p + q
            # the weights of an exact rational coordinate need no float64: compute them in ``calc``
            if r == 1:
                return self._taps(num, tirx.const(0.0, calc), read, calc)
            ratio = tirx.floormod(num, r).astype(calc) * tirx.const(1.0 / r, calc)
            return self._taps(tirx.floordiv(num, r), ratio, read, calc)
        x, _ = _coord_te(o, self.in_w, self.out_w, self.scale, self.ctm, self.roi)
        fl = tirx.floor(x)
        whole = x == fl
        base = tirx.Select(whole, fl - _f64(1.0), fl).astype("int64")
        return self._taps(base, tirx.Select(whole, _f64(1.0), x - fl), read, calc)

    def _taps(self, base: tirx.PrimExpr, ratio: tirx.PrimExpr, read, calc: str) -> tirx.PrimExpr:
        mode, a = self.attrs["mode"], self.attrs["cubic_coeff_a"]
        wdt = dtype_of(ratio)

        def cw(v: float) -> tirx.PrimExpr:  # a constant in the weights' dtype
            return tirx.const(float(v), wdt)

        raw = [base + k for k in self.offsets]
        normalize = bool(self.attrs["antialias"] or self.attrs["exclude_outside"])
        if self.attrs["antialias"]:
            s = min(self.scale, 1.0)
            ws = []
            for k in self.offsets:
                d = tirx.abs((cw(k) - ratio) * cw(s))
                if mode == "linear":
                    ws.append(tirx.max(tirx.min(cw(1.0) - d, cw(1.0)), cw(0.0)))
                else:
                    ws.append(_keys(d, float(a), wdt))
        elif mode == "linear":
            ws = [cw(1.0) - ratio, ratio]
        else:
            ws = cubic_coeffs(ratio, float(a))
        if self.attrs["exclude_outside"]:
            ws = [tirx.Select(tirx.Or(i < 0, i >= self.in_w), cw(0.0), w) for i, w in zip(raw, ws)]
        idx = [_clamp(i, 0, self.in_w - 1).astype("int32") for i in raw]

        num = _sum([w.astype(calc) * read(i).astype(calc) for i, w in zip(idx, ws)])
        if not normalize:
            return num
        total = _sum(ws)  # ONNX divides by the weights' sum (antialias) / the kept ones' (exclude_outside)
        if self.attrs["exclude_outside"]:
            total = tirx.Select(total == cw(0.0), cw(1.0), total)
        return num / total.astype(calc)


def _keys(d: tirx.PrimExpr, a: float, wdt: str) -> tirx.PrimExpr:
    """Keys' cubic kernel at distance ``d`` >= 0 (ONNX's antialiased cubic weights, before normalizing)."""
    def cw(v: float) -> tirx.PrimExpr:
        return tirx.const(float(v), wdt)

    d2 = d * d
    d3 = d * d2
    near = cw(a + 2) * d3 - cw(a + 3) * d2 + cw(1.0)
    far = cw(a) * d3 - cw(5 * a) * d2 + cw(8 * a) * d - cw(4 * a)
    return tirx.Select(d <= cw(1.0), near, tirx.Select(d < cw(2.0), far, cw(0.0)))


def _sum(xs: list[tirx.PrimExpr]) -> tirx.PrimExpr:
    acc = xs[0]
    for v in xs[1:]:
        acc = acc + v
    return acc


@lowers("resize")
def resize(ctx: LowerCtx, x: te.Tensor, **attrs) -> te.Tensor:
    shape = shape_of(x)
    r = len(shape)
    plan = resize_plan(shape, attrs)
    out = out_shape(ctx)
    dtype = str(x.dtype)
    if not plan.axes:
        return te.compute(out, lambda *i: x(*i), name="T_resize")
    axes = {d: _Axis(shape[d], plan.out_shape[d], plan.scales[d], attrs,
                     None if plan.roi is None else (plan.roi[d], plan.roi[d + r])) for d in plan.axes}
    fill = _cast_back(np.array([attrs["extrapolation_value"]], dtype=np.float64), np.dtype(dtype))[0]
    if attrs["mode"] == "nearest":
        def gather(*o):
            v = x(*[axes[d].nearest_te(o[d]) if d in axes else o[d] for d in range(r)])
            outside = [m for m in (axes[d].extrap_te(o[d]) for d in axes) if m is not None]
            if outside:
                v = tirx.Select(outside[0] if len(outside) == 1 else tirx.Or(*outside),
                                tirx.const(fill.item(), dtype), v)
            return v
        return te.compute(out, gather, name="T_resize")
    calc = _calc_dtype(dtype)
    cur = x
    for d in plan.axes:
        ax = axes[d]
        shp = list(shape_of(cur))
        shp[d] = ax.out_w

        cur = te.compute(tuple(shp), _resize_stage(cur, ax, d, calc, attrs["extrapolation_value"]),
                         name=f"T_resize_axis{d}")
    return te.compute(out, lambda *i: _to_dtype(cur(*i), dtype), name="T_resize")


def _resize_stage(cur: te.Tensor, ax: _Axis, d: int, calc: str, fill: float):
    """The compute function resampling axis ``d`` of ``cur``."""
    def stage(*o):
        acc = ax.interpolate_te(o[d], lambda i: cur(*o[:d], i, *o[d + 1:]), calc)
        m = ax.extrap_te(o[d])
        return acc if m is None else tirx.Select(m, tirx.const(fill, calc), acc)
    return stage


# ================================================================== grid_sample

def _reflect_te(v: tirx.PrimExpr, lo: float, hi: float) -> tirx.PrimExpr:
    """``grid_reflect`` on one float64 coordinate (the same operations)."""
    span = hi - lo
    if span <= 0:
        return _f64(lo)
    t = v - _f64(lo)
    u = t - _f64(2 * span) * tirx.floor(t / _f64(2 * span))
    return _f64(lo) + tirx.Select(u <= _f64(span), u, _f64(2 * span) - u)


@lowers("grid_sample")
def grid_sample(ctx: LowerCtx, x: te.Tensor, grid: te.Tensor, *, mode, padding_mode, align_corners) -> te.Tensor:
    dims = shape_of(x)[2:]
    nd = len(dims)
    dtype = str(x.dtype)
    calc = _calc_dtype(dtype) if dtype != "float64" else F64
    borders = [(0.0, d - 1.0) if align_corners else (-0.5, d - 0.5) for d in dims]

    def coord(n, o, i) -> tirx.PrimExpr:
        """Pixel coordinate along spatial axis i (float64 holding a float32 value, padded unless cubic)."""
        g = grid(n, *o, nd - 1 - i).astype(F64)
        size = dims[i]
        v = (g + _f64(1.0)) / _f64(2.0) * _f64(size - 1) if align_corners else \
            ((g + _f64(1.0)) * _f64(size) - _f64(1.0)) / _f64(2.0)
        v = v.astype("float32")
        if mode == "nearest":
            v = tirx.nearbyint(v)
        v = v.astype(F64)
        if mode == "cubic" or padding_mode == "zeros":
            return v
        lo, hi = borders[i]
        if padding_mode == "border":
            outside = tirx.Or(v < _f64(lo), v > _f64(hi))
            return tirx.Select(outside, tirx.max(tirx.min(v, _f64(size - 1)), _f64(0.0)), v)
        return _reflect_te(v, lo, hi)

    def reflect_index(k: tirx.PrimExpr, d: int) -> tirx.PrimExpr:
        """Reflection of a tap index; linear and nearest taps lie within one pixel of the borders
        (their coordinate was reflected first), where it is a clamp or a mirror."""
        if mode == "cubic":
            lo, hi = (0.0, d - 1.0) if align_corners else (-0.5, d - 0.5)
            return _reflect_te(k.astype(F64), lo, hi).astype("int64")
        if not align_corners:
            return k
        return tirx.Select(k < 0, -k, tirx.Select(k > d - 1, 2 * (d - 1) - k, k))

    def fetch(n, c, idx: list[tirx.PrimExpr]) -> tirx.PrimExpr:
        inside, fixed = [], []
        for i, k in enumerate(idx):
            d = dims[i]
            if padding_mode == "zeros":
                inside.append(tirx.all(k >= 0, k < d))
            elif padding_mode == "reflection":
                k = reflect_index(k, d)
            fixed.append(_clamp(k, 0, d - 1).astype("int32"))
        v = x(n, c, *fixed).astype(calc)
        return tirx.Select(tirx.all(*inside), v, tirx.const(0.0, calc)) if inside else v

    offsets = [0, 1] if mode == "linear" else [-1, 0, 1, 2]

    def body(n, c, *o):
        coords = [coord(n, o, i) for i in range(nd)]
        if mode == "nearest":
            return fetch(n, c, [v.astype("int64") for v in coords]).astype(dtype)
        base = [tirx.floor(v).astype("int64") for v in coords]

        fracs = [v - tirx.floor(v) for v in coords]
        rows = [[_f64(1.0) - f, f] if mode == "linear" else cubic_coeffs(f, -0.75) for f in fracs]
        terms = []
        for taps in np.ndindex(*([len(offsets)] * nd)):
            w = rows[0][taps[0]]
            for i in range(1, nd):
                w = w * rows[i][taps[i]]
            idx = [base[i] + offsets[t] for i, t in enumerate(taps)]
            terms.append(w.astype(calc) * fetch(n, c, idx))
        return _sum(terms).astype(dtype)

    return te.compute(out_shape(ctx), body, name="T_grid_sample")


# ================================================================== affine_grid

@lowers("affine_grid")
def affine_grid(ctx: LowerCtx, theta: te.Tensor, *, size, align_corners) -> te.Tensor:
    spatial = list(size[2:])
    nd = len(spatial)
    dtype = str(theta.dtype)

    def axis_value(k: tirx.PrimExpr, s: int) -> tirx.PrimExpr:
        kf = k.astype(F64)
        if align_corners:
            return _f64(-1.0) + kf * _f64(2.0 / (s - 1))
        step = 2.0 / s
        return _f64(-1 + step / 2) + kf * _f64(step)

    def body(n, *rest):
        *pos, j = rest
        acc = theta(n, j, nd).astype(F64)
        for k in range(nd):  # component k (x, y, z) varies along spatial axis nd - 1 - k
            ax = nd - 1 - k
            acc = acc + theta(n, j, k).astype(F64) * axis_value(pos[ax], spatial[ax])
        return acc.astype(dtype)

    return te.compute(out_shape(ctx), body, name="T_affine_grid")


# ================================================================== col2im

@lowers("col2im")
def col2im(ctx: LowerCtx, x: te.Tensor, *, image_shape, block_shape, strides, pads, dilations) -> te.Tensor:
    image, block = list(image_shape), list(block_shape)
    nd = len(image)
    strides = list(strides or [1] * nd)
    pads = list(pads or [0] * (2 * nd))
    dil = list(dilations or [1] * nd)
    blocks = col2im_blocks(image, block, strides, pads, dil)
    kk = math.prod(block)
    dtype = str(x.dtype)
    calc = _calc_dtype(dtype) if dtype.startswith(("float", "bfloat")) else dtype

    def body(n, c, *p):
        acc = tirx.const(0, calc)
        for t, tap in enumerate(np.ndindex(*block)):
            conds, flat = [], 0
            for i in range(nd):
                num = p[i] + pads[i] - tap[i] * dil[i]
                q = tirx.floordiv(num, strides[i]) if strides[i] != 1 else num
                conds += [num >= 0, q < blocks[i]]
                if strides[i] != 1:
                    conds.append(tirx.floormod(num, strides[i]) == 0)
                flat = flat * blocks[i] + _clamp(q, 0, blocks[i] - 1)
            v = x(n, c * kk + t, flat).astype(calc)
            acc = acc + tirx.Select(tirx.all(*conds), v, tirx.const(0, calc))
        return acc.astype(dtype)

    return te.compute(out_shape(ctx), body, name="T_col2im")


# ================================================================== deform_conv

def _bilinear_zero(x: te.Tensor, b, c, hy: tirx.PrimExpr, wx: tirx.PrimExpr, calc: str) -> tirx.PrimExpr:
    """Bilinear sample of x[b, c] at (hy, wx) (calc dtype), zero outside the image."""
    height, width = shape_of(x)[2:]
    y0, x0 = tirx.floor(hy), tirx.floor(wx)
    ly, lx = hy - y0, wx - x0
    yi, xi = y0.astype("int32"), x0.astype("int32")
    one = tirx.const(1.0, calc)
    acc = None
    for dy, wy in ((0, one - ly), (1, ly)):
        for dx, wxx in ((0, one - lx), (1, lx)):
            yy, xx = yi + dy, xi + dx
            ok = tirx.all(yy >= 0, yy < height, xx >= 0, xx < width)
            v = x(b, c, _clamp(yy, 0, height - 1), _clamp(xx, 0, width - 1)).astype(calc)
            term = tirx.Select(ok, v, tirx.const(0.0, calc)) * (wy * wxx)
            acc = term if acc is None else acc + term
    return acc


@lowers("deform_conv")
def deform_conv(ctx: LowerCtx, x: te.Tensor, w: te.Tensor, offset: te.Tensor, b: te.Tensor | None = None,
                mask: te.Tensor | None = None, *, strides, pads, dilations, group, offset_group,
                kernel_shape) -> te.Tensor:
    _, c, _, _ = shape_of(x)
    m, cg, kh, kw = shape_of(w)
    sh, sw = list(strides or [1, 1])
    dh, dw = list(dilations or [1, 1])
    ph, pw = list(pads or [0, 0, 0, 0])[:2]
    mg, cog = m // group, c // offset_group
    dtype = str(x.dtype)
    calc = _calc_dtype(dtype)
    rc = te.reduce_axis((0, cg), name="rc")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")

    def body(n, oc, i, j):
        ic = (oc // mg) * cg + rc
        g = ic // cog
        tap = ri * kw + rj
        oy = offset(n, (g * kh * kw + tap) * 2, i, j).astype(calc)
        ox = offset(n, (g * kh * kw + tap) * 2 + 1, i, j).astype(calc)
        hy = (i * sh - ph + ri * dh).astype(calc) + oy
        wx = (j * sw - pw + rj * dw).astype(calc) + ox
        v = _bilinear_zero(x, n, ic, hy, wx, calc)
        if mask is not None:
            v = v * mask(n, g * kh * kw + tap, i, j).astype(calc)
        return te.sum(v * w(oc, rc, ri, rj).astype(calc), axis=[rc, ri, rj])

    shape = out_shape(ctx)
    y = te.compute(shape, body, name="deform_conv")
    if b is not None:
        y = te.compute(shape, lambda n, oc, i, j: y(n, oc, i, j) + b(oc).astype(calc), name="deform_conv_bias")
    ctx.kind = "reduction"
    return te.compute(shape, lambda *i: y(*i).astype(dtype), name="deform_conv_out") if calc != dtype else y


# ================================================================== roi_align

@lowers("roi_align")
def roi_align(ctx: LowerCtx, x: te.Tensor, rois: te.Tensor, batch_indices: te.Tensor, *, mode, output_height,
              output_width, sampling_ratio, spatial_scale, coordinate_transformation_mode) -> te.Tensor:
    _, _, height, width = shape_of(x)
    oh, ow = output_height, output_width
    dtype = str(x.dtype)
    t = F64 if dtype == F64 else "float32"
    half = coordinate_transformation_mode == "half_pixel"

    def cf(v: float) -> tirx.PrimExpr:
        return tirx.const(v, t)

    def geometry(r):
        off = cf(0.5 if half else 0.0)
        sw, sh, ew, eh = (rois(r, k).astype(t) * cf(spatial_scale) - off for k in range(4))
        rw, rh = ew - sw, eh - sh
        if not half:
            rw, rh = tirx.max(rw, cf(1.0)), tirx.max(rh, cf(1.0))
        bh, bw = rh / cf(oh), rw / cf(ow)
        if sampling_ratio > 0:
            gh = gw = tirx.const(sampling_ratio, "int32")
        else:
            gh, gw = tirx.ceil(rh / cf(oh)).astype("int32"), tirx.ceil(rw / cf(ow)).astype("int32")
        return sh, sw, bh, bw, gh, gw

    def corner(v: tirx.PrimExpr, size: int) -> tuple[tirx.PrimExpr, tirx.PrimExpr, tirx.PrimExpr]:
        """(lo, hi, frac) of one sample coordinate, with RoiAlign's rule at the far edge."""
        v = tirx.max(v, cf(0.0))
        lo = v.astype("int32")
        top = lo >= size - 1
        lo2 = tirx.Select(top, tirx.const(size - 1, "int32"), lo)
        return lo2, tirx.Select(top, lo2, lo2 + 1), tirx.Select(top, cf(0.0), v - lo.astype(t))

    def sample(r, c, yy, xx, combine) -> tirx.PrimExpr:
        """combine(four weighted corner values) of the bilinear sample at (yy, xx); zeros outside."""
        out = tirx.any(yy < cf(-1.0), yy > cf(height), xx < cf(-1.0), xx > cf(width))
        bi = batch_indices(r).astype("int32")
        ylo, yhi, ly = corner(yy, height)
        xlo, xhi, lx = corner(xx, width)
        vals = [x(bi, c, a, b).astype(t) for a, b in ((ylo, xlo), (ylo, xhi), (yhi, xlo), (yhi, xhi))]
        hy, hx = cf(1.0) - ly, cf(1.0) - lx
        return tirx.Select(out, cf(0.0), combine([hy * hx * vals[0], hy * lx * vals[1],
                                                  ly * hx * vals[2], ly * lx * vals[3]]))

    def body(r, c, i, j):
        sh, sw, bh, bw, gh, gw = geometry(r)
        iy = te.reduce_axis((0, tirx.max(gh, 1)), name="iy")
        ix = te.reduce_axis((0, tirx.max(gw, 1)), name="ix")
        yy = sh + i.astype(t) * bh + (iy.var.astype(t) + cf(0.5)) * bh / gh.astype(t)
        xx = sw + j.astype(t) * bw + (ix.var.astype(t) + cf(0.5)) * bw / gw.astype(t)
        live = tirx.all(iy.var < gh, ix.var < gw)
        if mode == "avg":
            v = sample(r, c, yy, xx, lambda ts: (ts[0] + ts[1]) + (ts[2] + ts[3]))
            return te.sum(tirx.Select(live, v, cf(0.0)), axis=[iy, ix])
        v = sample(r, c, yy, xx, lambda ts: tirx.max(tirx.max(ts[0], ts[1]), tirx.max(ts[2], ts[3])))
        return te.max(tirx.Select(live, v, tirx.min_value(t)), axis=[iy, ix])

    shape = out_shape(ctx)
    acc = te.compute(shape, body, name="roi_align")

    def finish(r, c, i, j):
        _, _, _, _, gh, gw = geometry(r)
        v = acc(r, c, i, j)
        empty = tirx.any(gh <= 0, gw <= 0)
        if mode == "avg":
            v = v / tirx.max(gh * gw, 1).astype(t)
        return tirx.Select(empty, cf(0.0), v).astype(dtype)

    ctx.kind = "reduction"
    return te.compute(shape, finish, name="roi_align_out")


# ================================================================== max_roi_pool

@lowers("max_roi_pool")
def max_roi_pool(ctx: LowerCtx, x: te.Tensor, rois: te.Tensor, *, pooled_shape, spatial_scale) -> te.Tensor:
    _, _, height, width = shape_of(x)
    ph, pw = pooled_shape
    dtype = str(x.dtype)
    f32 = "float32"

    def window(r, k, n_bins: int, coord: int, limit: int):
        start = tirx.round(rois(r, coord).astype(f32) * tirx.const(spatial_scale, f32)).astype("int32")
        end = tirx.round(rois(r, coord + 2).astype(f32) * tirx.const(spatial_scale, f32)).astype("int32")
        size = tirx.max(end - start + 1, 1)
        bin_size = size.astype(f32) / tirx.const(float(n_bins), f32)
        lo = tirx.floor(k.astype(f32) * bin_size).astype("int32") + start
        hi = tirx.ceil((k + 1).astype(f32) * bin_size).astype("int32") + start
        return _clamp(lo, 0, limit), _clamp(hi, 0, limit)

    def body(r, c, i, j):
        hs, he = window(r, i, ph, 2, height)
        ws, we = window(r, j, pw, 1, width)
        kh = te.reduce_axis((0, tirx.max(he - hs, 1)), name="kh")
        kw = te.reduce_axis((0, tirx.max(we - ws, 1)), name="kw")
        b = rois(r, 0).astype("int32")
        v = x(b, c, _clamp(hs + kh.var, 0, height - 1), _clamp(ws + kw.var, 0, width - 1))
        live = tirx.all(hs + kh.var < he, ws + kw.var < we)
        return te.max(tirx.Select(live, v, tirx.min_value(dtype)), axis=[kh, kw])

    shape = out_shape(ctx)
    acc = te.compute(shape, body, name="max_roi_pool")

    def finish(r, c, i, j):
        hs, he = window(r, i, ph, 2, height)
        ws, we = window(r, j, pw, 1, width)
        return tirx.Select(tirx.any(he <= hs, we <= ws), tirx.const(0.0, dtype), acc(r, c, i, j))

    ctx.kind = "reduction"
    return te.compute(shape, finish, name="max_roi_pool_out")
