"""More neural-network ops: group norm, Lp pooling, max unpooling, einsum and determinants (ONNX semantics).

Float references compute in float64 and cast back, as in ``nn.py``. Several ONNX ops of this
family have no kiln op of their own because existing ops express them exactly (the lifter in
``frontend/lift_nn_extra.py`` writes them so): LpNormalization (reduce_l2 or reduce_sum of abs,
then div), MeanVarianceNormalization (reduce_mean/sub/mul/sqrt/add/div), GlobalLpPool
(abs/pow/reduce_sum/pow), and Einsum wherever transpose/reshape/matmul/reduce_sum spell it;
``einsum`` below is the general form (repeated labels, i.e. diagonals).
"""

from __future__ import annotations

import math
import string

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, INT_DTYPES, Dim, TensorType
from .common import bound_norm, require_dtype, require_float, same_dtype
from .nn import (
    _calc_dtype,
    _ceil_extra,
    _image_rank,
    _out_size,
    _pad_spatial,
    _spatial_attrs,
    _static_spatial,
    _windows,
)

RED = FusionKind.REDUCTION
OUT = FusionKind.OUT_EWISE_FUSABLE
OPAQUE = FusionKind.OPAQUE
INTS: list[int] = []


# ================================================================== group normalization

def _group_norm_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "group_norm: input")
    if x.rank < 2:
        raise OpTypeError(f"group_norm: input must have rank >= 2 (N, C, ...), got {x}")
    g = attrs["num_groups"]
    c = x.shape[1]
    if g < 1:
        raise OpTypeError(f"group_norm: num_groups must be >= 1, got {g}")
    if not isinstance(c, int):
        raise OpTypeError(f"group_norm: the channel dim of {x} must be static (it splits into groups)")
    if c % g:
        raise OpTypeError(f"group_norm: {c} channels do not divide into num_groups={g}")
    for name, t in zip(("scale", "bias"), ts[1:]):
        if t.dtype != x.dtype:
            raise OpTypeError(f"group_norm: {name} has dtype {t.dtype}, the input {x.dtype}")
        if t.rank != 1 or t.shape[0] != c:
            raise OpTypeError(f"group_norm: {name} must be 1-D of length {c} (channels), got {t}")
    return [x]


def _decompose_group_norm(g, node):
    """group_norm as reshape/reduce_mean/sub/mul/add/sqrt/div/reshape, then per-channel mul/add
    (at most one symbolic spatial dim, which the reshape back infers)."""
    x, scale, bias = node.inputs
    n_groups, eps_v = node.attrs["num_groups"], node.attrs["epsilon"]
    dt = x.type.np_dtype
    rank = x.type.rank

    def o(name, *args, **kw):
        return g.op(name, *args, before=node, **kw)

    xg = o("reshape", x, shape=[0, n_groups, -1])
    d = o("sub", xg, o("reduce_mean", xg, axes=[2], keepdims=1))
    var = o("reduce_mean", o("mul", d, d), axes=[2], keepdims=1)
    eps = g.add_constant(np.array(eps_v, dtype=dt), g.fresh_name("eps"))
    back = [0, x.type.shape[1], *(d if isinstance(d, int) else -1 for d in x.type.shape[2:])]
    y = o("reshape", o("div", d, o("sqrt", o("add", var, eps))), shape=back)
    per_channel = [-1] + [1] * (rank - 2)
    y = o("mul", y, o("reshape", scale, shape=per_channel))
    return [o("add", y, o("reshape", bias, shape=per_channel))]


@op("group_norm", bound=bound_norm, inputs=("x", "scale", "bias"),
    attrs={"num_groups": Attr("int"), "epsilon": Attr("float", 1e-5)},
    infer=_group_norm_infer, fusion=RED, onnx=OnnxSpec("GroupNormalization", since=21, oldest=21),
    decompose=_decompose_group_norm)
def group_norm(x, scale, bias, *, num_groups, epsilon):
    """Group norm (ONNX GroupNormalization-21): the C channels of each sample split into
    ``num_groups`` groups, each group normalized over its channels and spatial dims with the
    biased variance, then a per-channel scale and bias (shape (C)). Float64 inside.

    ONNX's version 18 took scale and bias per group; the lifter repeats them per channel.
    """
    x64 = x.astype(np.float64)
    n, c = x.shape[:2]
    xg = x64.reshape(n, num_groups, -1)
    d = xg - xg.mean(axis=-1, keepdims=True)
    var = (d * d).mean(axis=-1, keepdims=True)
    y = (d / np.sqrt(var + epsilon)).reshape(x.shape)
    shape = (c,) + (1,) * (x.ndim - 2)
    return (y * scale.astype(np.float64).reshape(shape) + bias.astype(np.float64).reshape(shape)).astype(x.dtype)


# ================================================================== Lp pooling

def _lp_pool_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "lp_pool: input")
    nsp = _image_rank("lp_pool", x)
    kernel = list(attrs["kernel_shape"])
    if len(kernel) != nsp:
        raise OpTypeError(f"lp_pool: kernel_shape {kernel} has {len(kernel)} entries for {nsp} spatial dims")
    if attrs["p"] < 1:
        raise OpTypeError(f"lp_pool: p must be >= 1, got {attrs['p']}")
    strides, pads, dil = _spatial_attrs("lp_pool", nsp, attrs, kernel=tuple(kernel))
    out = [_out_size("lp_pool", i, x.shape[2 + i], kernel[i], strides[i], pads[i], pads[i + nsp], dil[i],
                     attrs.get("ceil_mode", 0)) for i in range(nsp)]
    return [TensorType(x.dtype, (x.shape[0], x.shape[1], *out))]


@op("lp_pool", bound=lambda node, ib, n: ib[0] * float(math.prod(node.attrs["kernel_shape"])),
    inputs=("x",),
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", INTS), "pads": Attr("ints", INTS),
           "dilations": Attr("ints", INTS), "ceil_mode": Attr("int", 0), "p": Attr("int", 2)},
    infer=_lp_pool_infer, fusion=OUT, onnx=OnnxSpec("LpPool", since=18))
def lp_pool(x, *, kernel_shape, strides, pads, dilations, ceil_mode, p):
    """N-d Lp pooling (ONNX LpPool-18): (sum over the window of |x|**p) ** (1/p).

    Padding and the cells of a ceil-mode window past the padded edge contribute 0 (as ONNX
    Runtime computes; ONNX's Python reference rescales an average instead, which differs from
    this only for such windows). Float64 inside.
    """
    nsp = x.ndim - 2
    strides, pads, dil = _spatial_attrs("lp_pool", nsp, {"strides": strides, "pads": pads,
                                                         "dilations": dilations})
    out = _static_spatial(x, kernel_shape, strides, pads, dil, ceil_mode)
    extra = _ceil_extra(x, kernel_shape, strides, pads, dil, out)
    xp = _pad_spatial(np.abs(x.astype(_calc_dtype(x))) ** p, pads, extra)
    sums = _windows(xp, kernel_shape, strides, dil, out).sum(axis=tuple(range(-nsp, 0)))
    return (sums ** (1.0 / p)).astype(x.dtype)


# ================================================================== max unpooling

def unpool_shape(x_shape, kernel, strides, pads) -> list[int]:
    """MaxUnpool's default output spatial size: (in - 1) * stride + kernel - pad_begin - pad_end."""
    nsp = len(kernel)
    return [(x_shape[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[nsp + i] for i in range(nsp)]


def _max_unpool_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, idx = ts
    require_dtype(x, FLOAT_DTYPES, "max_unpool: input")
    require_dtype(idx, ("i64",), "max_unpool: indices")
    nsp = _image_rank("max_unpool", x)
    if tuple(idx.shape) != tuple(x.shape):
        raise OpTypeError(f"max_unpool: indices {idx} must have the input's shape {x}")
    kernel = list(attrs["kernel_shape"])
    if len(kernel) != nsp:
        raise OpTypeError(f"max_unpool: kernel_shape {kernel} has {len(kernel)} entries for {nsp} spatial dims")
    strides, pads, _ = _spatial_attrs("max_unpool", nsp, attrs, kernel=tuple(kernel), with_dilations=False)
    shape = list(attrs.get("output_shape") or [])
    if shape:
        if len(shape) != x.rank:
            raise OpTypeError(f"max_unpool: output_shape {shape} must have the input's rank {x.rank}")
        if any(s < 0 for s in shape):
            raise OpTypeError(f"max_unpool: output_shape {shape} has a negative dim")
        for i in (0, 1):
            if isinstance(x.shape[i], int) and shape[i] != x.shape[i]:
                raise OpTypeError(f"max_unpool: output_shape {shape} changes dim {i} of {x}")
        if all(isinstance(d, int) for d in x.shape[2:]):
            least = unpool_shape(x.shape, kernel, strides, pads)
            if any(s < m for s, m in zip(shape[2:], least)):
                raise OpTypeError(f"max_unpool: output_shape {shape} is smaller than the default "
                                  f"output {least} (as ONNX Runtime requires)")
        return [TensorType(x.dtype, (x.shape[0], x.shape[1], *shape[2:]))]
    sp = x.shape[2:]
    if not all(isinstance(d, int) for d in sp):
        raise OpTypeError(f"max_unpool: the spatial dims of {x} must be static")
    out = unpool_shape(x.shape, kernel, strides, pads)
    if any(o < 1 for o in out):
        raise OpTypeError(f"max_unpool: output spatial size {out} is empty")
    return [TensorType(x.dtype, (x.shape[0], x.shape[1], *out))]


@op("max_unpool", bound="keep", inputs=("x", "indices"),
    attrs={"kernel_shape": Attr("ints"), "strides": Attr("ints", INTS), "pads": Attr("ints", INTS),
           "output_shape": Attr("ints", INTS)},
    infer=_max_unpool_infer, fusion=OPAQUE,
    onnx=OnnxSpec("MaxUnpool", attr_inputs={2: "output_shape"}, attr_dtypes={"output_shape": "i64"}))
def max_unpool(x, indices, *, kernel_shape, strides, pads, output_shape):
    """ONNX MaxUnpool: a zero tensor of the output shape with y.flat[indices[i]] = x.flat[i]
    (later entries win on a repeated index).

    The output shape is ``output_shape`` if given, else (in - 1) * stride + kernel - pads per
    spatial dim. Indices address the flattened *output* tensor, as in ONNX Runtime and PyTorch's
    max_unpool (ONNX's Python reference addresses the default-sized tensor and pads it to
    ``output_shape``, which differs when the two shapes differ). An index outside the output is
    an error.
    """
    nsp = x.ndim - 2
    strides = list(strides or [1] * nsp)
    pads = list(pads or [0] * 2 * nsp)
    shape = list(output_shape) if output_shape else [*x.shape[:2], *unpool_shape(x.shape, kernel_shape, strides, pads)]
    y = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=x.dtype)
    idx = indices.reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        bad = idx[(idx < 0) | (idx >= y.size)][0]
        raise IndexError(f"max_unpool: index {int(bad)} is outside the output of {y.size} elements {shape}")
    y[idx] = x.reshape(-1)
    return y.reshape(shape)


# ================================================================== einsum

_ELLIPSIS_LABELS = string.digits + "".join(chr(c) for c in range(0x3B1, 0x3C9))  # never ONNX letters


def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]]:
    """Operand and output label lists of an ONNX/numpy einsum ``equation`` for operands of ``ranks``.

    ``...`` becomes one label per broadcast dim (right-aligned across operands, so an operand
    with fewer such dims gets the trailing ones). Without ``->`` the output is the ellipsis dims,
    then the labels used exactly once in alphabetical order. Raises OpTypeError on a malformed
    equation or a rank mismatch.
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise OpTypeError(f"einsum: equation {equation!r} has {len(terms)} operand terms, got {len(ranks)} operands")
    parsed: list[tuple[list[str], list[str], bool]] = []
    n_ell = 0
    for t, r in zip(terms, ranks):
        head, ell, tail = t.partition("...")
        if "." in head or "." in tail:
            raise OpTypeError(f"einsum: term {t!r} of {equation!r} has a stray '.'")
        for ch in head + tail:
            if ch not in string.ascii_letters:
                raise OpTypeError(f"einsum: label {ch!r} in {equation!r} is not a letter")
        k = r - len(head) - len(tail)
        if (not ell and k != 0) or k < 0:
            raise OpTypeError(f"einsum: term {t!r} does not fit an operand of rank {r}")
        n_ell = max(n_ell, k)
        parsed.append((list(head), list(tail), bool(ell)))
    if n_ell > len(_ELLIPSIS_LABELS):
        raise OpTypeError(f"einsum: {n_ell} broadcast dims are more than kiln labels")
    ell_labels = list(_ELLIPSIS_LABELS[:n_ell])
    ins = []
    for (head, tail, _), r in zip(parsed, ranks):
        k = r - len(head) - len(tail)
        ins.append(head + ell_labels[n_ell - k:] + tail)
    if arrow:
        head, ell, tail = rhs.partition("...")
        for ch in head + tail:
            if ch not in string.ascii_letters:
                raise OpTypeError(f"einsum: output label {ch!r} in {equation!r} is not a letter")
        out = list(head) + (ell_labels if ell else []) + list(tail)
        used = {c for term in ins for c in term}
        for ch in out:
            if ch not in used:
                raise OpTypeError(f"einsum: output label {ch!r} of {equation!r} is in no operand")
        if len(set(out)) != len(out):
            raise OpTypeError(f"einsum: output of {equation!r} repeats a label")
    else:
        counts: dict[str, int] = {}
        for term in ins:
            for ch in term:
                counts[ch] = counts.get(ch, 0) + 1
        out = ell_labels + sorted(c for c, n in counts.items() if n == 1 and c not in ell_labels)
    return ins, out


def einsum_dims(terms: list[list[str]], shapes: list[tuple[Dim, ...]]) -> dict[str, Dim]:
    """Size of every label: equal wherever it appears, except that a broadcast (``...``) label of
    size 1 takes the other operands' size. OpTypeError on a conflict."""
    dims: dict[str, Dim] = {}
    for term, shape in zip(terms, shapes):
        for ch, d in zip(term, shape):
            have = dims.get(ch)
            if have is None or have == d:
                dims[ch] = d
            elif ch in _ELLIPSIS_LABELS and (have == 1 or d == 1):
                dims[ch] = d if have == 1 else have
            else:
                raise OpTypeError(f"einsum: label {ch!r} has sizes {have} and {d}")
    return dims


def _einsum_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if not ts:
        raise OpTypeError("einsum needs at least one operand")
    dtype = same_dtype(ts, "einsum operands")
    require_dtype(ts[0], FLOAT_DTYPES | (INT_DTYPES - {"i4", "u4"}), "einsum operands")
    ins, out = parse_einsum(attrs["equation"], [t.rank for t in ts])
    dims = einsum_dims(ins, [t.shape for t in ts])
    return [TensorType(dtype, tuple(dims[c] for c in out))]


def _numpy_equation(ins: list[list[str]], out: list[str]) -> str:
    """The equation with kiln's ellipsis labels renamed to letters numpy accepts."""
    used = {c for term in ins for c in term}
    free = iter(c for c in string.ascii_letters if c not in used)
    ren = {c: next(free) if c in _ELLIPSIS_LABELS else c for c in sorted(used)}
    return ",".join("".join(ren[c] for c in t) for t in ins) + "->" + "".join(ren[c] for c in out)


@op("einsum", bound=lambda node, ib, n: math.prod(ib) * 8.0 ** len(ib), inputs=("xs*",),
    attrs={"equation": Attr("str")}, infer=_einsum_infer, fusion=OPAQUE, onnx="Einsum")
def einsum(*xs, equation):
    """Einstein summation (ONNX Einsum, numpy's rules): the product of the operands over every
    label, summed over the labels not in the output. Floats in float64, integers in their own
    dtype (wrapping). Broadcast (``...``) dims of size 1 broadcast."""
    ins, out = parse_einsum(equation, [x.ndim for x in xs])
    eq = _numpy_equation(ins, out)
    dt = xs[0].dtype
    if _calc_dtype(xs[0]) == np.float64:
        return np.asarray(np.einsum(eq, *[x.astype(np.float64) for x in xs])).astype(dt)
    return np.asarray(np.einsum(eq, *xs, dtype=dt)).astype(dt)


# ================================================================== determinant

def _det_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_float(x, "det: input")
    if x.rank < 2:
        raise OpTypeError(f"det: input must have rank >= 2 (..., M, M), got {x}")
    if x.shape[-1] != x.shape[-2]:
        raise OpTypeError(f"det: the last two dims of {x} must be equal (square matrices)")
    return [x.with_shape(x.shape[:-2])]


@op("det", bound=lambda node, ib, n: float(max(ib[0], 1.0)) ** 8, inputs=("x",), infer=_det_infer,
    fusion=OPAQUE, onnx="Det")
def det(x):
    """Determinant of each square matrix in the last two dims (ONNX Det): LU with partial
    pivoting in float64 (numpy.linalg.det), cast back."""
    if x.shape[-1] == 0:
        return np.ones(x.shape[:-2], dtype=x.dtype)
    return np.asarray(np.linalg.det(x.astype(np.float64))).astype(x.dtype)
