"""Neural-network ops: convolution, pooling, normalization, softmax and matmul (ONNX semantics).

Float references compute in float64 and cast back to the operand dtype, so they
are exact enough to be the oracle for float64 tests and tighter than any
float32 backend. Spatial attributes follow ONNX: ``pads`` lists all begins and
then all ends; an empty list means the ONNX default (zeros, ones).

Shape rules keep symbolic batch/channel dims. A symbolic *spatial* dim survives
only where the output size provably equals it (stride 1 and "same" padding);
otherwise the rule raises OpTypeError saying that it needs a static size,
because kiln's symbolic dims are products and cannot spell ``(H + 2 - 3)//2 + 1``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..registry import Attr, Attrs, FusionKind, OpTypeError, op
from ..types import FLOAT_DTYPES, Dim, TensorType, dim_mul
from .common import (
    bound_batch_norm,
    bound_conv,
    bound_matmul,
    bound_norm,
    broadcast_shapes,
    norm_axis,
    require_dtype,
    require_float,
    same_dtype,
)

OUT = FusionKind.OUT_EWISE_FUSABLE
RED = FusionKind.REDUCTION
OPAQUE = FusionKind.OPAQUE
INTS: list[int] = []


# ================================================================== shared spatial helpers

def _spatial_attrs(what: str, nsp: int, attrs: Attrs, *, kernel: tuple[int, ...] | None = None,
                   with_dilations: bool = True) -> tuple[list[int], list[int], list[int]]:
    """strides, pads (begins then ends) and dilations with ONNX defaults, checked against rank."""
    strides = list(attrs.get("strides") or [1] * nsp)
    pads = list(attrs.get("pads") or [0] * (2 * nsp))
    dil = list(attrs.get("dilations") or [1] * nsp) if with_dilations else [1] * nsp
    if len(strides) != nsp:
        raise OpTypeError(f"{what}: strides {strides} have {len(strides)} entries for {nsp} spatial dims")
    if len(pads) != 2 * nsp:
        raise OpTypeError(f"{what}: pads {pads} need {2 * nsp} entries (begins then ends) "
                          f"for {nsp} spatial dims, got {len(pads)}")
    if len(dil) != nsp:
        raise OpTypeError(f"{what}: dilations {dil} have {len(dil)} entries for {nsp} spatial dims")
    if any(s < 1 for s in strides):
        raise OpTypeError(f"{what}: strides {strides} must be >= 1")
    if any(d < 1 for d in dil):
        raise OpTypeError(f"{what}: dilations {dil} must be >= 1")
    if any(p < 0 for p in pads):
        raise OpTypeError(f"{what}: pads {pads} must be >= 0")
    if kernel is not None and any(k < 1 for k in kernel):
        raise OpTypeError(f"{what}: kernel shape {list(kernel)} must be >= 1")
    return strides, pads, dil


def _out_size(what: str, i: int, size: Dim, k: int, s: int, pb: int, pe: int, d: int,
              ceil_mode: int = 0) -> Dim:
    """Output length of one sliding-window axis (ONNX Conv/Pool formula, ceil windows that
    would start in the end padding are dropped)."""
    eff = d * (k - 1) + 1
    if not isinstance(size, int):
        if s == 1 and pb + pe == eff - 1:
            return size
        raise OpTypeError(f"{what}: spatial dim {i} is symbolic ({size}); its output size needs a static "
                          f"input size unless stride is 1 and the padding is 'same' (got stride {s}, "
                          f"pads {pb}+{pe}, effective kernel {eff})")
    span = size + pb + pe - eff
    if span < 0:
        raise OpTypeError(f"{what}: spatial dim {i} has size {size} (+{pb}+{pe} padding), smaller than "
                          f"the effective kernel size {eff}")
    if ceil_mode:
        out = -(-span // s) + 1
        if (out - 1) * s >= size + pb:
            out -= 1
        return out
    return span // s + 1


def _static_spatial(x: np.ndarray, kernel, strides, pads, dil, ceil_mode=0) -> list[int]:
    nsp = len(kernel)
    return [int(_out_size("", i, int(x.shape[2 + i]), kernel[i], strides[i], pads[i], pads[i + nsp],
                          dil[i], ceil_mode)) for i in range(nsp)]


def _windows(xp: np.ndarray, kernel, strides, dil, out) -> np.ndarray:
    """View of shape (N, C, *out, *kernel) over a padded (N, C, *spatial) array."""
    nsp = len(kernel)
    eff = [d * (k - 1) + 1 for k, d in zip(kernel, dil)]
    v = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nsp)))
    idx = (slice(None), slice(None)) + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides)) \
        + tuple(slice(None, None, d) for d in dil)
    return v[idx]


def _calc_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if x.dtype.kind == "f" or str(x.dtype) == "bfloat16" else x.dtype


def _pad_spatial(x: np.ndarray, pads, extra=None, value=0.0) -> np.ndarray:
    nsp = x.ndim - 2
    extra = extra or [0] * nsp
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp] + extra[i]) for i in range(nsp)]
    if not any(a or b for a, b in widths):
        return x
    return np.pad(x, widths, mode="constant", constant_values=value)


def _image_rank(what: str, t: TensorType) -> int:
    if t.rank < 3:
        raise OpTypeError(f"{what}: input must have rank >= 3 (N, C, spatial...), got {t}")
    return t.rank - 2


# ================================================================== convolution

def _conv_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, w = ts[0], ts[1]
    b = ts[2] if len(ts) > 2 else None
    require_float(x, "conv: input")
    dtype = same_dtype([x, w, b], "conv: input, weight and bias")
    nsp = _image_rank("conv", x)
    if w.rank != x.rank:
        raise OpTypeError(f"conv: weight {w} must have the input's rank {x.rank} (M, C/group, kernel...)")
    group = attrs.get("group", 1)
    if group < 1:
        raise OpTypeError(f"conv: group must be >= 1, got {group}")
    kernel = w.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise OpTypeError(f"conv: weight {w} needs a static kernel shape")
    strides, pads, dil = _spatial_attrs("conv", nsp, attrs, kernel=kernel)
    m, cg = w.shape[0], w.shape[1]
    if dim_mul(cg, group) != x.shape[1]:
        raise OpTypeError(f"conv: input has {x.shape[1]} channels but the weight expects "
                          f"{dim_mul(cg, group)} ({cg} per group, group={group})")
    if isinstance(m, int) and m % group:
        raise OpTypeError(f"conv: {m} output channels do not divide into group={group}")
    if b is not None and (b.rank != 1 or b.shape[0] != m):
        raise OpTypeError(f"conv: bias must be 1-D of length {m} (output channels), got {b}")
    out = [_out_size("conv", i, x.shape[2 + i], kernel[i], strides[i], pads[i], pads[i + nsp], dil[i])
           for i in range(nsp)]
    return [TensorType(dtype, (x.shape[0], m, *out))]


@op("conv", group="conv", layer=True, bound=bound_conv, inputs=("x", "w", "b?"),
    attrs={"strides": Attr("ints", INTS), "pads": Attr("ints", INTS), "dilations": Attr("ints", INTS),
           "group": Attr("int", 1)},
    infer=_conv_infer, fusion=OUT, onnx="Conv")
def conv(x, w, b=None, *, strides, pads, dilations, group):
    """N-d grouped convolution (ONNX Conv): x (N, C, *S), w (M, C/group, *K), optional bias (M).

    Cross-correlation, zero padding (pads = begins then ends), strides and dilations;
    group = C gives depthwise. Computed as im2col + one batched matmul per group in float64.
    """
    nsp = x.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    strides, pads, dil = _spatial_attrs("conv", nsp, {"strides": strides, "pads": pads, "dilations": dilations})
    out = _static_spatial(x, kernel, strides, pads, dil)
    ct = _calc_dtype(x)
    n, c = x.shape[:2]
    m = w.shape[0]
    cg, mg = c // group, m // group
    kk, p = math.prod(kernel), math.prod(out)
    win = _windows(_pad_spatial(x.astype(ct), pads), kernel, strides, dil, out)  # (N, C, *out, *K)
    perm = (0, 1, *range(2 + nsp, 2 + 2 * nsp), *range(2, 2 + nsp))
    cols = win.transpose(perm).reshape(n, group, cg * kk, p)
    y = np.matmul(w.astype(ct).reshape(group, mg, cg * kk), cols).reshape(n, m, *out)
    if b is not None:
        y = y + b.astype(ct).reshape(m, *[1] * nsp)
    return y.astype(x.dtype)


def _conv_transpose_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, w = ts[0], ts[1]
    b = ts[2] if len(ts) > 2 else None
    require_float(x, "conv_transpose: input")
    dtype = same_dtype([x, w, b], "conv_transpose: input, weight and bias")
    nsp = _image_rank("conv_transpose", x)
    if w.rank != x.rank:
        raise OpTypeError(f"conv_transpose: weight {w} must have the input's rank {x.rank} (C, M/group, kernel...)")
    group = attrs.get("group", 1)
    if group < 1:
        raise OpTypeError(f"conv_transpose: group must be >= 1, got {group}")
    kernel = w.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise OpTypeError(f"conv_transpose: weight {w} needs a static kernel shape")
    strides, pads, dil = _spatial_attrs("conv_transpose", nsp, attrs, kernel=kernel)
    opad = list(attrs.get("output_padding") or [0] * nsp)
    if len(opad) != nsp or any(v < 0 for v in opad):
        raise OpTypeError(f"conv_transpose: output_padding {opad} must be {nsp} values >= 0")
    for i, (p, st, d) in enumerate(zip(opad, strides, dil)):
        if p >= max(st, d):  # as ONNX requires (ONNX Runtime refuses it at run time)
            raise OpTypeError(f"conv_transpose: output_padding[{i}] = {p} must be less than "
                              f"max(stride, dilation) = {max(st, d)}")
    if w.shape[0] != x.shape[1]:
        raise OpTypeError(f"conv_transpose: input has {x.shape[1]} channels but the weight expects {w.shape[0]}")
    if isinstance(w.shape[0], int) and w.shape[0] % group:
        raise OpTypeError(f"conv_transpose: {w.shape[0]} input channels do not divide into group={group}")
    m = dim_mul(w.shape[1], group)
    if b is not None and (b.rank != 1 or b.shape[0] != m):
        raise OpTypeError(f"conv_transpose: bias must be 1-D of length {m} (output channels), got {b}")
    out: list[Dim] = []
    for i in range(nsp):
        size, s, d, k = x.shape[2 + i], strides[i], dil[i], kernel[i]
        grow = opad[i] + d * (k - 1) - pads[i] - pads[i + nsp]
        if not isinstance(size, int):
            if s == 1 and grow == 0:
                out.append(size)
                continue
            raise OpTypeError(f"conv_transpose: spatial dim {i} is symbolic ({size}); its output size "
                              f"needs a static input size unless stride is 1 and pads cancel the kernel")
        o = s * (size - 1) + 1 + grow
        if o < 1:
            raise OpTypeError(f"conv_transpose: spatial dim {i} would have output size {o}")
        out.append(o)
    return [TensorType(dtype, (x.shape[0], m, *out))]


@op("conv_transpose", group="conv", layer=True, bound=bound_conv, inputs=("x", "w", "b?"),
    attrs={"strides": Attr("ints", INTS), "pads": Attr("ints", INTS), "dilations": Attr("ints", INTS),
           "group": Attr("int", 1), "output_padding": Attr("ints", INTS)},
    infer=_conv_transpose_infer, fusion=OUT, onnx="ConvTranspose")
def conv_transpose(x, w, b=None, *, strides, pads, dilations, group, output_padding):
    """N-d transposed convolution (ONNX ConvTranspose): x (N, C, *S), w (C, M/group, *K), bias (M).

    Output size per axis: stride*(S-1) + output_padding + dilation*(K-1) + 1 - pad_begin - pad_end
    (ONNX's output_shape is resolved into pads by the lifter).
    """
    nsp = x.ndim - 2
    kernel = tuple(int(k) for k in w.shape[2:])
    strides, pads, dil = _spatial_attrs("conv_transpose", nsp,
                                        {"strides": strides, "pads": pads, "dilations": dilations})
    opad = list(output_padding or [0] * nsp)
    ct = _calc_dtype(x)
    n, c = x.shape[:2]
    cg, mg = c // group, w.shape[1]
    m = mg * group
    ins = x.shape[2:]
    full = [strides[i] * (ins[i] - 1) + dil[i] * (kernel[i] - 1) + 1 + opad[i] for i in range(nsp)]
    kk, p = math.prod(kernel), math.prod(ins)
    # (G, Mg*K, Cg) @ (N, G, Cg, P) -> (N, G, Mg*K, P): every kernel tap's contribution at once
    wr = w.astype(ct).reshape(group, cg, mg * kk).transpose(0, 2, 1)
    contrib = np.matmul(wr, x.astype(ct).reshape(n, group, cg, p)).reshape(n, group, mg, kk, *ins)
    yf = np.zeros((n, group, mg, *full), dtype=ct)
    for t, tap in enumerate(np.ndindex(*kernel)):
        dst = tuple(slice(k * d, k * d + s * (i - 1) + 1, s) for k, d, s, i in zip(tap, dil, strides, ins))
        yf[(slice(None),) * 3 + dst] += contrib[:, :, :, t]
    out = [full[i] - pads[i] - pads[i + nsp] for i in range(nsp)]
    y = yf[(slice(None),) * 3 + tuple(slice(pads[i], pads[i] + out[i]) for i in range(nsp))]
    y = y.reshape(n, m, *out)
    if b is not None:
        y = y + b.astype(ct).reshape(m, *[1] * nsp)
    return y.astype(x.dtype)


# ================================================================== pooling

def _pool_infer(what: str, allowed: frozenset[str], with_dilations: bool):
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        x = ts[0]
        require_dtype(x, allowed, f"{what}: input")
        nsp = _image_rank(what, x)
        kernel = list(attrs["kernel_shape"])
        if len(kernel) != nsp:
            raise OpTypeError(f"{what}: kernel_shape {kernel} has {len(kernel)} entries for {nsp} spatial dims")
        strides, pads, dil = _spatial_attrs(what, nsp, attrs, kernel=tuple(kernel), with_dilations=with_dilations)
        for i in range(nsp):
            if pads[i] >= kernel[i] or pads[i + nsp] >= kernel[i]:
                raise OpTypeError(f"{what}: pads {pads} must each be smaller than the kernel {kernel} "
                                  f"(as ONNX Runtime requires)")
        out = [_out_size(what, i, x.shape[2 + i], kernel[i], strides[i], pads[i], pads[i + nsp], dil[i],
                         attrs.get("ceil_mode", 0)) for i in range(nsp)]
        return [TensorType(x.dtype, (x.shape[0], x.shape[1], *out))]
    return infer


def _ceil_extra(x: np.ndarray, kernel, strides, pads, dil, out) -> list[int]:
    """Extra end padding so that ceil-mode windows that run past the padded edge fit."""
    nsp = len(kernel)
    return [max(0, (out[i] - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1
                - (x.shape[2 + i] + pads[i] + pads[i + nsp])) for i in range(nsp)]


@op("max_pool", group="pool", bound="keep", inputs=("x",),
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", INTS), "pads": Attr("ints", INTS),
           "dilations": Attr("ints", INTS), "ceil_mode": Attr("int", 0)},
    infer=_pool_infer("max_pool", FLOAT_DTYPES | {"i8", "u8"}, True), fusion=OUT, onnx="MaxPool")
def max_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode):
    """N-d max pooling (ONNX MaxPool output 0); padding never wins (it counts as -inf)."""
    nsp = x.ndim - 2
    strides, pads, dil = _spatial_attrs("max_pool", nsp, {"strides": strides, "pads": pads, "dilations": dilations})
    out = _static_spatial(x, kernel_shape, strides, pads, dil, ceil_mode)
    extra = _ceil_extra(x, kernel_shape, strides, pads, dil, out)
    low = -np.inf if x.dtype.kind == "f" or str(x.dtype) == "bfloat16" else np.iinfo(x.dtype).min
    xp = _pad_spatial(x, pads, extra, value=low)
    win = _windows(xp, kernel_shape, strides, dil, out)
    return win.max(axis=tuple(range(-nsp, 0))).astype(x.dtype)


def _max_pool_indices_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if attrs.get("storage_order", 0) not in (0, 1):
        raise OpTypeError(f"max_pool_with_indices: storage_order must be 0 or 1, got {attrs['storage_order']}")
    pool_attrs = {k: v for k, v in attrs.items() if k != "storage_order"}
    (y,) = _pool_infer("max_pool_with_indices", FLOAT_DTYPES | {"i8", "u8"}, True)(ts, pool_attrs)
    return [y, y.with_dtype("i64")]


@op("max_pool_with_indices", bound="keep", inputs=("x",), outputs=("y", "indices"),
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", INTS), "pads": Attr("ints", INTS),
           "dilations": Attr("ints", INTS), "ceil_mode": Attr("int", 0), "storage_order": Attr("int", 0)},
    infer=_max_pool_indices_infer, fusion=OPAQUE, onnx="MaxPool")
def max_pool_with_indices(x, *, kernel_shape, strides, pads, dilations, ceil_mode, storage_order):
    """ONNX MaxPool with its Indices output: y as max_pool; indices (i64) flat into x, of the first
    tap (in window order) holding the window's maximum; storage_order=1 numbers the spatial dims
    column-major ((n*C + c) * prod(S) + h + w*H ...). A window with a NaN points at its first NaN."""
    y = max_pool(x, kernel_shape=kernel_shape, strides=strides, pads=pads, dilations=dilations,
                 ceil_mode=ceil_mode)
    nsp = x.ndim - 2
    strides, pads, dil = _spatial_attrs("max_pool_with_indices", nsp,
                                        {"strides": strides, "pads": pads, "dilations": dilations})
    out = _static_spatial(x, kernel_shape, strides, pads, dil, ceil_mode)
    extra = _ceil_extra(x, kernel_shape, strides, pads, dil, out)
    sizes = x.shape[2:]
    flat = np.arange(math.prod(sizes), dtype=np.int64).reshape(1, 1, *sizes)
    taps = _windows(_pad_spatial(flat, pads, extra, value=-1), kernel_shape, strides, dil, out)
    taps = taps.reshape(*out, -1)
    valid = taps >= 0
    low = -np.inf if x.dtype.kind == "f" or str(x.dtype) == "bfloat16" else np.iinfo(x.dtype).min
    win = _windows(_pad_spatial(x.astype(_calc_dtype(x)), pads, extra, value=low), kernel_shape, strides,
                   dil, out).reshape(*x.shape[:2], *out, -1)
    best = np.where(valid, win, low).max(axis=-1, keepdims=True)
    hit = valid & ((win == best) | (np.isnan(win) & np.isnan(best)))
    pos = np.argmax(hit, axis=-1)
    spatial = np.take_along_axis(np.broadcast_to(taps, hit.shape), pos[..., None], axis=-1)[..., 0]
    if storage_order:
        coords = np.unravel_index(np.maximum(spatial, 0), sizes)
        spatial = sum(c * math.prod(sizes[:i]) for i, c in enumerate(coords))
    base = np.arange(x.shape[0] * x.shape[1], dtype=np.int64).reshape(*x.shape[:2], *[1] * nsp)
    idx = base * math.prod(sizes) + spatial
    return y, np.where(hit.any(axis=-1), idx, -1).astype(np.int64)


def _counts_1d(size: int, k: int, s: int, pb: int, pe: int, extra: int, out: int, include_pad: int,
               d: int = 1) -> np.ndarray:
    mask = np.zeros(size + pb + pe + extra)
    if include_pad:
        mask[: size + pb + pe] = 1
    else:
        mask[pb: pb + size] = 1
    return sliding_window_view(mask, d * (k - 1) + 1)[: (out - 1) * s + 1: s, ::d].sum(-1)


@op("avg_pool", group="pool", bound="keep", inputs=("x",),
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", INTS), "pads": Attr("ints", INTS),
           "ceil_mode": Attr("int", 0), "count_include_pad": Attr("int", 0), "dilations": Attr("ints", INTS)},
    infer=_pool_infer("avg_pool", FLOAT_DTYPES, True), fusion=OUT, onnx="AveragePool")
def avg_pool(x, *, kernel_shape, strides, pads, ceil_mode, count_include_pad, dilations=()):
    """N-d average pooling (ONNX AveragePool, dilations since opset 19).

    The divisor counts the window's taps inside the input (count_include_pad=0) or
    inside the explicitly padded input (count_include_pad=1); taps of a ceil-mode
    window that run past the padded edge are never counted (as ONNX Runtime does).
    """
    nsp = x.ndim - 2
    strides, pads, dil = _spatial_attrs("avg_pool", nsp, {"strides": strides, "pads": pads,
                                                         "dilations": list(dilations or [])})
    out = _static_spatial(x, kernel_shape, strides, pads, dil, ceil_mode)
    extra = _ceil_extra(x, kernel_shape, strides, pads, dil, out)
    xp = _pad_spatial(x.astype(_calc_dtype(x)), pads, extra)
    sums = _windows(xp, kernel_shape, strides, dil, out).sum(axis=tuple(range(-nsp, 0)))
    counts = np.ones(())
    for i in range(nsp):
        c = _counts_1d(x.shape[2 + i], kernel_shape[i], strides[i], pads[i], pads[i + nsp], extra[i], out[i],
                       count_include_pad, dil[i])
        counts = np.multiply.outer(counts, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(x.dtype)


def _global_infer(what: str):
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        x = ts[0]
        require_float(x, f"{what}: input")
        nsp = _image_rank(what, x)
        return [x.with_shape((x.shape[0], x.shape[1], *[1] * nsp))]
    return infer


@op("global_avg_pool", group="global-pool", bound="keep", inputs=("x",), infer=_global_infer("global_avg_pool"), fusion=RED,
    onnx="GlobalAveragePool")
def global_avg_pool(x):
    """Mean over all spatial dims (N, C, *S) -> (N, C, 1, ...)."""
    axes = tuple(range(2, x.ndim))
    return x.astype(np.float64).mean(axis=axes, keepdims=True).astype(x.dtype)


@op("global_max_pool", group="global-pool", bound="keep", inputs=("x",), infer=_global_infer("global_max_pool"), fusion=RED,
    onnx="GlobalMaxPool")
def global_max_pool(x):
    """Max over all spatial dims (N, C, *S) -> (N, C, 1, ...)."""
    return x.max(axis=tuple(range(2, x.ndim)), keepdims=True)


# ================================================================== normalization

def _param(what: str, name: str, t: TensorType | None, c: Dim, dtype: str) -> None:
    if t is None:
        return
    if t.dtype != dtype:
        raise OpTypeError(f"{what}: {name} has dtype {t.dtype}, the input {dtype}")
    if t.rank != 1 or t.shape[0] != c:
        raise OpTypeError(f"{what}: {name} must be 1-D of length {c} (channels), got {t}")


def _batch_norm_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "batch_norm: input")
    if x.rank < 2:
        raise OpTypeError(f"batch_norm: input must have rank >= 2 (N, C, ...), got {x}")
    for name, t in zip(("scale", "bias", "mean", "var"), ts[1:]):
        _param("batch_norm", name, t, x.shape[1], x.dtype)
    return [x]


def _channel(p: np.ndarray, ndim: int) -> np.ndarray:
    return p.astype(np.float64).reshape(-1, *[1] * (ndim - 2))


@op("batch_norm", bound=bound_batch_norm, inputs=("x", "scale", "bias", "mean", "var"), attrs={"epsilon": Attr("float", 1e-5)},
    infer=_batch_norm_infer, fusion=FusionKind.BROADCAST, onnx="BatchNormalization")
def batch_norm(x, scale, bias, mean, var, *, epsilon):
    """Inference batch norm on axis 1: (x - mean) / sqrt(var + epsilon) * scale + bias."""
    y = (x.astype(np.float64) - _channel(mean, x.ndim)) / np.sqrt(_channel(var, x.ndim) + epsilon) \
        * _channel(scale, x.ndim) + _channel(bias, x.ndim)
    return y.astype(x.dtype)


def _norm_axis_infer(what: str, n_params: int):
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        x = ts[0]
        require_float(x, f"{what}: input")
        if x.rank < 1:
            raise OpTypeError(f"{what}: input must have rank >= 1, got {x}")
        ax = norm_axis(attrs.get("axis", -1), x.rank)
        norm_shape = x.shape[ax:]
        for name, t in zip(("scale", "bias")[:n_params], ts[1:]):
            if t is None:
                continue
            if t.dtype != x.dtype:
                raise OpTypeError(f"{what}: {name} has dtype {t.dtype}, the input {x.dtype}")
            if t.rank > len(norm_shape):
                raise OpTypeError(f"{what}: {name} {t} has more dims than the normalized shape "
                                  f"{list(norm_shape)} (axis {ax})")
            try:
                b = broadcast_shapes(norm_shape, t.shape)
            except OpTypeError:
                b = None
            if b != tuple(norm_shape):
                raise OpTypeError(f"{what}: {name} {t} does not broadcast to the normalized shape "
                                  f"{list(norm_shape)} (axis {ax})")
        return [x]
    return infer


def _decompose_norm(g, node, rms: bool):
    x = node.inputs[0]
    scale = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    rank = x.type.rank
    axes = list(range(node.attrs["axis"] % rank, rank))
    dt = x.type.np_dtype

    def o(name, *args, **kw):
        return g.op(name, *args, before=node, **kw)

    if rms:
        centered = x
    else:
        centered = o("sub", x, o("reduce_mean", x, axes=axes, keepdims=1))
    sq = o("mul", centered, centered)
    var = o("reduce_mean", sq, axes=axes, keepdims=1)
    eps = g.add_constant(np.array(node.attrs["epsilon"], dtype=dt), g.fresh_name("eps"))
    y = o("mul", o("div", centered, o("sqrt", o("add", var, eps))), scale)
    if bias is not None:
        y = o("add", y, bias)
    return [y]


@op("layer_norm", group="norm", bound=bound_norm, inputs=("x", "scale", "bias?"), attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
    infer=_norm_axis_infer("layer_norm", 2), fusion=RED, onnx="LayerNormalization",
    decompose=lambda g, node: _decompose_norm(g, node, rms=False))
def layer_norm(x, scale, bias=None, *, axis, epsilon):
    """Layer norm over dims axis..rank-1 (ONNX LayerNormalization output Y).

    y = (x - mean) / sqrt(var + epsilon) * scale + bias, with the biased variance;
    scale and bias broadcast over the normalized dims. Computed in float64.
    """
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    d = x64 - mean
    var = (d * d).mean(axis=axes, keepdims=True)
    y = d / np.sqrt(var + epsilon) * scale.astype(np.float64)
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y.astype(x.dtype)


@op("rms_norm", group="norm", bound=bound_norm, inputs=("x", "scale"), attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
    infer=_norm_axis_infer("rms_norm", 1), fusion=RED, onnx="RMSNormalization",
    decompose=lambda g, node: _decompose_norm(g, node, rms=True))
def rms_norm(x, scale, *, axis, epsilon):
    """RMS norm over dims axis..rank-1: x / sqrt(mean(x**2) + epsilon) * scale (float64 inside).

    ONNX spelling RMSNormalization needs opset >= 23; ``decompose`` writes it as
    mul/reduce_mean/add/sqrt/div/mul for older opsets and for codegen.
    """
    axes = tuple(range(axis % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    ms = (x64 * x64).mean(axis=axes, keepdims=True)
    return (x64 / np.sqrt(ms + epsilon) * scale.astype(np.float64)).astype(x.dtype)


def _crms_norm_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "crms_norm: input")
    if x.rank < 1:
        raise OpTypeError(f"crms_norm: input must have rank >= 1, got {x}")
    if norm_axis(attrs.get("axis", -1), x.rank) != x.rank - 1:
        raise OpTypeError(f"crms_norm: axis {attrs.get('axis')} is not the last axis of {x}; "
                          f"CRMSNorm normalizes one compressed d-vector per row")
    if not isinstance(x.shape[-1], int):
        raise OpTypeError(f"crms_norm: the last dim of {x} must be static (it is d - 1)")
    return _norm_axis_infer("crms_norm", 1)(ts, attrs)


def _decompose_crms_norm(g, node):
    """crms_norm as reduce_sum/reduce_sum_square/mul/add/div/sqrt/div/mul, inserted before ``node``."""
    x, scale = node.inputs[0], node.inputs[1]
    last = [x.type.rank - 1]
    dt = x.type.np_dtype

    def o(name, *args, **kw):
        return g.op(name, *args, before=node, **kw)

    s = o("reduce_sum", x, axes=last, keepdims=1)
    sq = o("reduce_sum_square", x, axes=last, keepdims=1)
    d = g.add_constant(np.array(x.type.shape[-1] + 1, dtype=dt), g.fresh_name("crms_d"))
    eps = g.add_constant(np.array(node.attrs["epsilon"], dtype=dt), g.fresh_name("eps"))
    ms = o("div", o("add", sq, o("mul", s, s)), d)
    return [o("mul", o("div", x, o("sqrt", o("add", ms, eps))), scale)]


@op("crms_norm", group="norm", bound=bound_norm, inputs=("x", "scale"), attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
    infer=_crms_norm_infer, fusion=RED, decompose=_decompose_crms_norm)
def crms_norm(x, scale, *, axis, epsilon):
    """Compressed RMS norm (Pre-CRMSNorm) over the last axis, computed in float64.

    ``x`` holds the first d-1 components of a zero-mean d-vector whose dropped last
    component is -sum(x); with d = x.shape[-1] + 1,
    y = x / sqrt((sum(x**2) + sum(x)**2) / d + epsilon) * scale,
    the first d-1 components of that vector's RMS norm (scale has d-1 entries). ``axis``
    must name the last axis. No ONNX spelling: ``decompose`` writes it as
    reduce_sum/reduce_sum_square/mul/add/div/sqrt/div/mul.
    """
    x64 = x.astype(np.float64)
    d = x.shape[-1] + 1
    s = x64.sum(axis=-1, keepdims=True)
    ms = ((x64 * x64).sum(axis=-1, keepdims=True) + s * s) / d
    return (x64 / np.sqrt(ms + epsilon) * scale.astype(np.float64)).astype(x.dtype)


def _instance_norm_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "instance_norm: input")
    _image_rank("instance_norm", x)
    for name, t in zip(("scale", "bias"), ts[1:]):
        _param("instance_norm", name, t, x.shape[1], x.dtype)
    return [x]


@op("instance_norm", bound=bound_batch_norm, inputs=("x", "scale", "bias"), attrs={"epsilon": Attr("float", 1e-5)},
    infer=_instance_norm_infer, fusion=RED, onnx="InstanceNormalization")
def instance_norm(x, scale, bias, *, epsilon):
    """Per-(N, C) normalization over the spatial dims, then per-channel scale and bias."""
    axes = tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    d = x64 - x64.mean(axis=axes, keepdims=True)
    var = (d * d).mean(axis=axes, keepdims=True)
    return (d / np.sqrt(var + epsilon) * _channel(scale, x.ndim) + _channel(bias, x.ndim)).astype(x.dtype)


def _lrn_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "lrn: input")
    _image_rank("lrn", x)
    if attrs["size"] < 1:
        raise OpTypeError(f"lrn: size must be >= 1, got {attrs['size']}")
    return [x]


@op("lrn", bound="keep", inputs=("x",),
    attrs={"size": Attr("int"), "alpha": Attr("float", 1e-4), "beta": Attr("float", 0.75),
           "bias": Attr("float", 1.0)},
    infer=_lrn_infer, fusion=OPAQUE, onnx="LRN")
def lrn(x, *, size, alpha, beta, bias):
    """Cross-channel local response norm (ONNX LRN).

    square_sum[c] sums x**2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)];
    y = x / (bias + alpha / size * square_sum) ** beta.
    """
    x64 = x.astype(np.float64)
    lo = (size - 1) // 2
    hi = size - 1 - lo
    sq = np.pad(x64 * x64, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    ssum = sliding_window_view(sq, size, axis=1).sum(-1)
    return (x64 / (bias + alpha / size * ssum) ** beta).astype(x.dtype)


# ================================================================== softmax

def _softmax_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x)
    if x.rank < 1:
        raise OpTypeError(f"softmax: input must have rank >= 1, got {x}")
    norm_axis(attrs.get("axis", -1), x.rank)
    return [x]


@op("softmax", group="softmax", bound="one", inputs=("x",), attrs={"axis": Attr("int", -1)}, infer=_softmax_infer, fusion=RED,
    onnx="Softmax")
def softmax(x, *, axis):
    """exp(x) / sum(exp(x)) along one axis (ONNX opset-13 Softmax), max-subtracted, in float64."""
    x64 = x.astype(np.float64)
    if x.size == 0:
        return x.copy()
    with np.errstate(invalid="ignore"):
        e = np.exp(x64 - x64.max(axis=axis, keepdims=True))
        return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


@op("log_softmax", group="softmax", bound=lambda node, ib, n: 2 * ib[0] + math.log(max(n, 2)), inputs=("x",), attrs={"axis": Attr("int", -1)}, infer=_softmax_infer, fusion=RED,
    onnx="LogSoftmax")
def log_softmax(x, *, axis):
    """x - log(sum(exp(x))) along one axis (ONNX opset-13 LogSoftmax), max-subtracted, in float64."""
    x64 = x.astype(np.float64)
    if x.size == 0:
        return x.copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        d = x64 - x64.max(axis=axis, keepdims=True)
        return (d - np.log(np.exp(d).sum(axis=axis, keepdims=True))).astype(x.dtype)


# ================================================================== matmul

def _matmul_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    a, b = ts
    dtype = same_dtype([a, b], "matmul: operands")
    if dtype == "bool":
        raise OpTypeError("matmul: bool operands are not supported")
    if a.rank < 1 or b.rank < 1:
        raise OpTypeError(f"matmul: operands must have rank >= 1, got {a} and {b}")
    ka = a.shape[-1]
    kb = b.shape[-2] if b.rank >= 2 else b.shape[0]
    if ka != kb:
        raise OpTypeError(f"matmul: inner dims differ: {a} has {ka} columns, {b} has {kb} rows")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = batch + (a.shape[-2:-1] if a.rank >= 2 else ()) + (b.shape[-1:] if b.rank >= 2 else ())
    return [TensorType(dtype, out)]


@op("matmul", layer=True, bound=bound_matmul, inputs=("a", "b"), infer=_matmul_infer, fusion=OUT, onnx="MatMul")
def matmul(a, b):
    """numpy matmul (ONNX MatMul): 1-D operands are promoted and the added dim dropped, batch dims
    broadcast. Float operands are multiplied in float64; integers in their own dtype (wrapping),
    with no widening (quantized int8 matmul is a separate op)."""
    if a.dtype.kind in "iu":
        return np.matmul(a, b)
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
