"""Shape and data-movement ops: reshape, transpose, slice, concat, gather, pad, ... (ONNX semantics).

ONNX takes many of these operands as constant inputs (Reshape's shape, Slice's
starts/ends, ...); kiln holds them as attributes, and each ``OnnxSpec.attr_inputs``
says which ONNX input becomes which attribute (``attr_dtypes`` gives the ONNX
element type used when lowering it back: i64 for the integer ones; float-valued
ones such as ``pad``'s value take the data operand's dtype).
"""

from __future__ import annotations

import math

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, INT_DTYPES, Dim, TensorType, dim_mul, to_numpy_dtype
from .common import (
    bound_reduce_sum,
    broadcast_shapes,
    dim_add,
    norm_axes,
    norm_axis,
    reduced_shape,
    require_dtype,
    resolve_reshape,
    same_dtype,
)

INJ = FusionKind.INJECTIVE
INTS: list[int] = []
INT64_MAX = 2 ** 63 - 1
NUMERIC = (INT_DTYPES | FLOAT_DTYPES)


# ================================================================== reshape family

def _reshape_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    return [x.with_shape(resolve_reshape(x.shape, attrs["shape"], attrs.get("allowzero", 0)))]


@op("reshape", view=True, bound="keep", inputs=("x",), attrs={"shape": Attr("ints"), "allowzero": Attr("int", 0)},
    infer=_reshape_infer, fusion=INJ,
    onnx=OnnxSpec("Reshape", attr_inputs={1: "shape"}, attr_dtypes={"shape": "i64"}))
def reshape(x, *, shape, allowzero):
    """ONNX Reshape: 0 copies the input dim (unless allowzero=1, where it means 0), -1 is inferred."""
    target = [int(x.shape[i]) if (t == 0 and not allowzero) else int(t) for i, t in enumerate(shape)]
    return np.reshape(x, target)


def _flatten_axis(axis: int, rank: int) -> int:
    if not -rank <= axis <= rank:
        raise OpTypeError(f"flatten axis {axis} is out of range [-{rank}, {rank}]")
    return axis + rank if axis < 0 else axis


def _flatten_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    ax = _flatten_axis(attrs.get("axis", 1), x.rank)
    return [x.with_shape((dim_mul(*x.shape[:ax]), dim_mul(*x.shape[ax:])))]


@op("flatten", view=True, bound="keep", inputs=("x",), attrs={"axis": Attr("int", 1)}, infer=_flatten_infer, fusion=INJ,
    onnx="Flatten")
def flatten(x, *, axis):
    """2-D view: dims before ``axis`` (in [-r, r]) multiplied into rows, the rest into columns."""
    ax = _flatten_axis(axis, x.ndim)
    return np.reshape(x, (math.prod(x.shape[:ax]), math.prod(x.shape[ax:])))


def _perm(perm: list[int], rank: int) -> list[int]:
    if not perm:
        return list(range(rank))[::-1]
    if sorted(perm) != list(range(rank)):
        raise OpTypeError(f"perm {perm} is not a permutation of the {rank} axes")
    return list(perm)


def _transpose_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    p = _perm(list(attrs.get("perm") or []), x.rank)
    return [x.with_shape(tuple(x.shape[i] for i in p))]


@op("transpose", bound="keep", inputs=("x",), attrs={"perm": Attr("ints", INTS)}, infer=_transpose_infer,
    fusion=INJ, onnx="Transpose")
def transpose(x, *, perm):
    """Permute axes; output dim i is input dim perm[i]; an empty perm reverses them."""
    return np.require(np.transpose(x, _perm(list(perm), x.ndim)), requirements="C")


def _squeeze_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    axes = list(attrs.get("axes") or [])
    if not axes:
        sym = [i for i, d in enumerate(x.shape) if not isinstance(d, int)]
        if sym:
            raise OpTypeError(f"squeeze without axes needs static dims to know which are 1; "
                              f"dim {sym[0]} of {x} is symbolic")
        return [x.with_shape(tuple(d for d in x.shape if d != 1))]
    axes = norm_axes(axes, x.rank, "squeeze axes")
    for a in axes:
        if x.shape[a] != 1:
            raise OpTypeError(f"squeeze: dim {a} of {x} is {x.shape[a]}, not 1")
    return [x.with_shape(tuple(d for i, d in enumerate(x.shape) if i not in axes))]


@op("squeeze", view=True, bound="keep", inputs=("x",), attrs={"axes": Attr("ints", INTS)}, infer=_squeeze_infer, fusion=INJ,
    onnx=OnnxSpec("Squeeze", attr_inputs={1: "axes"}, attr_dtypes={"axes": "i64"}))
def squeeze(x, *, axes):
    """Drop the listed size-1 axes (all size-1 axes when ``axes`` is empty)."""
    if not axes:
        return np.reshape(x, tuple(d for d in x.shape if d != 1))
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _unsqueeze_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    axes = list(attrs["axes"])
    if not axes:
        raise OpTypeError("unsqueeze needs at least one axis")
    r = x.rank + len(axes)
    axes = norm_axes(axes, r, "unsqueeze axes")
    dims = iter(x.shape)
    return [x.with_shape(tuple(1 if i in axes else next(dims) for i in range(r)))]


@op("unsqueeze", view=True, bound="keep", inputs=("x",), attrs={"axes": Attr("ints")}, infer=_unsqueeze_infer, fusion=INJ,
    onnx=OnnxSpec("Unsqueeze", attr_inputs={1: "axes"}, attr_dtypes={"axes": "i64"}))
def unsqueeze(x, *, axes):
    """Insert size-1 axes at the listed positions of the output (negative counts from the output's end)."""
    r = x.ndim + len(axes)
    return np.expand_dims(x, tuple(a % r for a in axes))


# ================================================================== concat / split

def _concat_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if not ts:
        raise OpTypeError("concat needs at least one operand")
    dtype = same_dtype(ts, "concat operands")
    ranks = {t.rank for t in ts}
    if len(ranks) != 1:
        raise OpTypeError(f"concat operands must share one rank, got {[str(t) for t in ts]}")
    rank = ranks.pop()
    if rank == 0:
        raise OpTypeError("concat operands must have rank >= 1")
    ax = norm_axis(attrs["axis"], rank)
    for i in range(rank):
        if i != ax and len({t.shape[i] for t in ts}) != 1:
            raise OpTypeError(f"concat operands differ in dim {i} (not the axis {ax}): {[str(t) for t in ts]}")
    total = dim_add(*(t.shape[ax] for t in ts))
    if total is None:
        raise OpTypeError(f"concat along axis {ax} of sizes {[t.shape[ax] for t in ts]}: the sum of these "
                          f"symbolic sizes is not a product of symbols; it needs static sizes")
    out = list(ts[0].shape)
    out[ax] = total
    return [TensorType(dtype, tuple(out))]


@op("concat", bound="max", inputs=("xs*",), attrs={"axis": Attr("int")}, infer=_concat_infer, fusion=INJ,
    onnx="Concat")
def concat(*xs, axis):
    """Join operands along ``axis``."""
    return np.concatenate(xs, axis=axis)


def _split_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    if x.rank == 0:
        raise OpTypeError("split needs an input of rank >= 1")
    ax = norm_axis(attrs.get("axis", 0), x.rank)
    sizes = list(attrs["split"])
    if not sizes or any(s < 0 for s in sizes):
        raise OpTypeError(f"split sizes {sizes} must be a non-empty list of sizes >= 0")
    d = x.shape[ax]
    if not isinstance(d, int):
        raise OpTypeError(f"split along axis {ax} needs a static size; dim {ax} of {x} is symbolic")
    if sum(sizes) != d:
        raise OpTypeError(f"split sizes {sizes} sum to {sum(sizes)}, but dim {ax} of {x} is {d}")
    outs = []
    for s in sizes:
        shape = list(x.shape)
        shape[ax] = s
        outs.append(x.with_shape(tuple(shape)))
    return outs


@op("split", bound="keep", inputs=("x",), outputs=("ys*",), attrs={"axis": Attr("int", 0), "split": Attr("ints")},
    infer=_split_infer, fusion=INJ,
    onnx=OnnxSpec("Split", attr_inputs={1: "split"}, attr_dtypes={"split": "i64"}))
def split(x, *, axis, split):
    """Cut ``x`` along ``axis`` into consecutive pieces of the given sizes (one output each)."""
    return list(np.split(x, np.cumsum(split)[:-1], axis=axis))


# ================================================================== slice

def _slice_range(dim: int, start: int, end: int, step: int) -> tuple[int, int, int]:
    """ONNX Slice clamping for one axis; returns (start, end, length) with end == -1 meaning 'before 0'."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        n = max(0, -(-(end - start) // step))
    else:
        start = min(max(start, 0), dim - 1)
        end = min(max(end, -1), dim - 1)
        n = max(0, -(-(start - end) // -step))
    return start, end, n


def _slice_params(rank: int, attrs: Attrs) -> list[tuple[int, int, int, int]]:
    starts, ends = list(attrs["starts"]), list(attrs["ends"])
    axes = list(attrs.get("axes") or range(len(starts)))
    steps = list(attrs.get("steps") or [1] * len(starts))
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise OpTypeError(f"slice: starts {starts}, ends {ends}, axes {axes} and steps {steps} "
                          f"must have equal lengths")
    axes = norm_axes(axes, rank, "slice axes")
    if any(s == 0 for s in steps):
        raise OpTypeError(f"slice: steps {steps} must not be 0")
    return list(zip(axes, starts, ends, steps))


def _slice_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    out = list(x.shape)
    for ax, start, end, step in _slice_params(x.rank, attrs):
        d = x.shape[ax]
        if isinstance(d, int):
            out[ax] = _slice_range(d, start, end, step)[2]
        elif not (step == 1 and start == 0 and end >= INT64_MAX // 2):
            raise OpTypeError(f"slice of axis {ax} needs a static size (dim is {d}) unless it "
                              f"takes the whole axis (starts 0, ends INT64_MAX, step 1)")
    return [x.with_shape(tuple(out))]


@op("slice", bound="keep", inputs=("x",),
    attrs={"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints", INTS), "steps": Attr("ints", INTS)},
    infer=_slice_infer, fusion=INJ,
    onnx=OnnxSpec("Slice", attr_inputs={1: "starts", 2: "ends", 3: "axes", 4: "steps"},
                  attr_dtypes={"starts": "i64", "ends": "i64", "axes": "i64", "steps": "i64"}))
def slice_(x, *, starts, ends, axes, steps):
    """ONNX Slice: negative starts/ends count from the end, then are clamped ([0, dim] for positive
    steps, [0, dim-1] / [-1, dim-1] for negative ones), so INT64_MAX/MIN mean 'to the end'."""
    idx = [slice(None)] * x.ndim
    for ax, start, end, step in _slice_params(x.ndim, {"starts": starts, "ends": ends, "axes": axes,
                                                       "steps": steps}):
        s, e, n = _slice_range(x.shape[ax], start, end, step)
        idx[ax] = slice(s, None if e < 0 else e, step) if n else slice(0, 0)
    return np.require(x[tuple(idx)], requirements="C")


# ================================================================== gather / expand / tile / pad

def _index_dtype(t: TensorType, what: str) -> None:
    if t.dtype not in ("i32", "i64"):
        raise OpTypeError(f"{what}: indices must be i32 or i64, got {t.dtype}")


def _gather_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, idx = ts
    _index_dtype(idx, "gather")
    if x.rank == 0:
        raise OpTypeError("gather needs data of rank >= 1")
    ax = norm_axis(attrs.get("axis", 0), x.rank)
    return [x.with_shape(x.shape[:ax] + idx.shape + x.shape[ax + 1:])]


def _wrap_indices(indices: np.ndarray, dim: int) -> np.ndarray:
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + dim, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= dim):
        bad = indices.reshape(-1)[np.argmax(((idx < 0) | (idx >= dim)).reshape(-1))]
        raise IndexError(f"index {int(bad)} is out of range for a dim of size {dim}")
    return idx


@op("gather", bound="keep", inputs=("x", "indices"), attrs={"axis": Attr("int", 0)}, infer=_gather_infer, fusion=INJ,
    onnx="Gather")
def gather(x, indices, *, axis):
    """Take entries of ``x`` along ``axis`` at ``indices`` (negative indices count from the end)."""
    ax = axis % x.ndim
    return np.take(x, _wrap_indices(indices, x.shape[ax]), axis=ax)


def _gather_elements_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, idx = ts
    _index_dtype(idx, "gather_elements")
    if x.rank == 0 or idx.rank != x.rank:
        raise OpTypeError(f"gather_elements: indices {idx} must have the data's rank ({x}), >= 1")
    ax = norm_axis(attrs.get("axis", 0), x.rank)
    for i, (di, dx) in enumerate(zip(idx.shape, x.shape)):
        if i != ax and isinstance(di, int) and isinstance(dx, int) and di > dx:
            raise OpTypeError(f"gather_elements: indices {idx} dim {i} ({di}) exceeds the data's ({x}; "
                              f"only the axis {ax} dim may be larger)")
    return [x.with_shape(idx.shape)]


@op("gather_elements", bound="keep", inputs=("x", "indices"), attrs={"axis": Attr("int", 0)},
    infer=_gather_elements_infer, fusion=INJ, onnx="GatherElements")
def gather_elements(x, indices, *, axis):
    """y[i0..in] = x[i0.., indices[i0..in], ..in] with the index replacing coordinate ``axis``."""
    ax = axis % x.ndim
    idx = _wrap_indices(indices, x.shape[ax])
    grid = list(np.indices(idx.shape, sparse=True))
    for i in range(x.ndim):
        if i != ax and idx.shape[i] > x.shape[i]:
            raise IndexError(f"indices dim {i} ({idx.shape[i]}) exceeds the data's ({x.shape[i]})")
    grid[ax] = idx
    return x[tuple(grid)]


def _expand_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    shape = list(attrs["shape"])
    if any(d < 0 for d in shape):
        raise OpTypeError(f"expand shape {shape} has a negative dim")
    return [x.with_shape(broadcast_shapes(x.shape, shape))]


@op("expand", bound="keep", inputs=("x",), attrs={"shape": Attr("ints")}, infer=_expand_infer, fusion=INJ,
    onnx=OnnxSpec("Expand", attr_inputs={1: "shape"}, attr_dtypes={"shape": "i64"}))
def expand(x, *, shape):
    """Broadcast ``x`` and ``shape`` against each other (ONNX's bidirectional broadcast)."""
    return np.require(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape))), requirements="C")


def _tile_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    reps = list(attrs["repeats"])
    if len(reps) != x.rank or any(r < 0 for r in reps):
        raise OpTypeError(f"tile repeats {reps} must be {x.rank} values >= 0 (one per dim of {x})")
    return [x.with_shape(tuple(dim_mul(d, r) for d, r in zip(x.shape, reps)))]


@op("tile", bound="keep", inputs=("x",), attrs={"repeats": Attr("ints")}, infer=_tile_infer, fusion=INJ,
    onnx=OnnxSpec("Tile", attr_inputs={1: "repeats"}, attr_dtypes={"repeats": "i64"}))
def tile(x, *, repeats):
    """Repeat ``x`` repeats[i] times along each dim i."""
    return np.tile(x, tuple(repeats))


PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    pads, mode = list(attrs["pads"]), attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        raise OpTypeError(f"pad mode {mode!r} is not one of {list(PAD_MODES)}")
    r = x.rank
    if len(pads) != 2 * r:
        raise OpTypeError(f"pad: pads {pads} need {2 * r} entries (begins then ends) for {x}")
    out: list[Dim] = []
    for i, d in enumerate(x.shape):
        pb, pe = pads[i], pads[i + r]
        if pb == 0 and pe == 0:
            out.append(d)
            continue
        if not isinstance(d, int):
            raise OpTypeError(f"pad of dim {i} needs a static size; it is symbolic ({d})")
        if d + pb + pe < 0:
            raise OpTypeError(f"pad: pads {pads} crop dim {i} ({d}) below zero")
        if mode != "constant":
            if (pb < 0 or pe < 0):
                raise OpTypeError(f"pad: negative pads {pads} are only supported in constant mode")
            if d == 0:
                raise OpTypeError(f"pad mode {mode!r} cannot pad the empty dim {i}")
            if mode == "reflect" and max(pb, pe) >= d:
                raise OpTypeError(f"pad mode 'reflect' needs pads < dim; dim {i} is {d}, pads {pb},{pe}")
        out.append(d + pb + pe)
    return [x.with_shape(tuple(out))]


@op("pad", bound=lambda node, ib, n: max(ib + [abs(node.attrs.get("value", 0.0))]), inputs=("x",),
    attrs={"pads": Attr("ints"), "mode": Attr("str", "constant"), "value": Attr("float", 0.0)},
    infer=_pad_infer, fusion=INJ,
    onnx=OnnxSpec("Pad", attr_inputs={1: "pads", 2: "value"}, attr_dtypes={"pads": "i64"}))
def pad(x, *, pads, mode, value):
    """ONNX Pad: pads = begins then ends per dim (negative crops); mode constant (``value``, cast to
    x's dtype), reflect (mirror without repeating the edge), edge (repeat it) or wrap."""
    r = x.ndim
    crop = tuple(slice(max(-pads[i], 0), x.shape[i] - max(-pads[i + r], 0)) for i in range(r))
    x = x[crop]
    widths = [(max(pads[i], 0), max(pads[i + r], 0)) for i in range(r)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(value).astype(x.dtype))
    return np.pad(x, widths, mode=mode)


# ================================================================== shape, trilu, range

def _shape_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    n = len(range(x.rank)[attrs.get("start", 0):attrs.get("end")])
    return [TensorType("i64", (n,))]


@op("shape", bound=lambda node, ib, n: 8.0, inputs=("x",), attrs={"start": Attr("int", 0), "end": Attr("int", None)},
    infer=_shape_infer, fusion=FusionKind.OPAQUE, onnx="Shape")
def shape(x, *, start=0, end=None):
    """The dims of ``x`` as i64[...], sliced [start:end) with Python/ONNX clamping (end absent = rank)."""
    return np.array(x.shape[start:end], dtype=np.int64)


def _trilu_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    if x.rank < 2:
        raise OpTypeError(f"trilu needs rank >= 2, got {x}")
    k = ts[1] if len(ts) > 1 else None
    if k is not None:
        if k.dtype != "i64" or k.rank > 1 or (k.rank == 1 and k.shape[0] != 1):
            raise OpTypeError(f"trilu: the k operand must be one i64 value (shape [] or [1]), got {k}")
        if attrs.get("k", 0):
            raise OpTypeError("trilu: k is given both as an operand and as a nonzero attribute")
    return [x]


@op("trilu", bound="keep", inputs=("x", "k?"), attrs={"upper": Attr("int", 1), "k": Attr("int", 0)},
    infer=_trilu_infer, fusion=INJ, onnx=OnnxSpec("Trilu", attr_inputs={1: "k"}, attr_dtypes={"k": "i64"}))
def trilu(x, k_operand=None, *, upper, k):
    """Keep the upper (j - i >= k) or lower (j - i <= k) triangle of the last two dims, zero the rest;
    k is the attribute, or the one-value i64 operand read at run time (the attribute is then 0)."""
    if k_operand is not None:
        k = int(np.asarray(k_operand).reshape(()))
    k = int(min(max(k, -x.shape[-2] - 1), x.shape[-1] + 1)) if x.ndim >= 2 else k
    return np.triu(x, k) if upper else np.tril(x, k)


RANGE_DTYPES = ("i16", "i32", "i64", "f32", "f64")


def _range_len(start, limit, delta, dtype: str) -> int:
    dt = to_numpy_dtype(dtype)
    s, lim, d = (np.asarray(v).astype(dt) for v in (start, limit, delta))
    if d == 0:
        raise OpTypeError("range: delta must not be 0")
    with np.errstate(over="ignore"):
        return max(int(math.ceil(float(lim - s) / float(d))), 0)


def _range_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if attrs["dtype"] not in RANGE_DTYPES:
        raise OpTypeError(f"range: dtype {attrs['dtype']} is not one of {list(RANGE_DTYPES)}")
    return [TensorType(attrs["dtype"], (_range_len(attrs["start"], attrs["limit"], attrs["delta"],
                                                   attrs["dtype"]),))]


@op("range", bound=lambda node, ib, n: max(abs(node.attrs["start"]), abs(node.attrs["limit"])), inputs=(),
    attrs={"start": Attr("float"), "limit": Attr("float"), "delta": Attr("float"), "dtype": Attr("dtype")},
    infer=_range_infer, fusion=FusionKind.OPAQUE, onnx=None)
def range_(*, start, limit, delta, dtype):
    """ONNX Range with its operands as attributes: max(ceil((limit - start) / delta), 0) values,
    start, start+delta, ... accumulated in ``dtype`` as ONNX Runtime does (so f32 rounding matches).

    No ONNX spelling: the lifter folds Range over constants into a constant; lowering emits a
    constant too. start/limit/delta are floats, so integer ranges are exact up to 2**53.
    """
    dt = to_numpy_dtype(dtype)
    n = _range_len(start, limit, delta, dtype)
    steps = np.full(n, np.asarray(delta).astype(dt), dtype=dt)
    if n:
        steps[0] = np.asarray(start).astype(dt)
    return np.cumsum(steps, dtype=dt)


# ================================================================== argmax / cumsum

def _arg_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, NUMERIC, "arg-reduction input")
    if x.rank == 0:
        raise OpTypeError("argmax/argmin need an input of rank >= 1")
    ax = norm_axis(attrs.get("axis", 0), x.rank)
    return [TensorType("i64", reduced_shape(x.shape, [ax], bool(attrs.get("keepdims", 1))))]


def _arg(fn, x, axis, keepdims, select_last_index):
    ax = axis % x.ndim
    if select_last_index:
        y = x.shape[ax] - 1 - fn(np.flip(x, ax), axis=ax)
    else:
        y = fn(x, axis=ax)
    y = np.asarray(y, dtype=np.int64)
    return np.expand_dims(y, ax) if keepdims else y


_ARG_ATTRS = {"axis": Attr("int", 0), "keepdims": Attr("int", 1), "select_last_index": Attr("int", 0)}


@op("argmax", group="arg", bound=lambda node, ib, n: 8.0, inputs=("x",), attrs=_ARG_ATTRS, infer=_arg_infer, fusion=FusionKind.REDUCTION,
    onnx="ArgMax")
def argmax(x, *, axis, keepdims, select_last_index):
    """Index (i64) of the largest entry along ``axis``; ties give the first (or, with
    select_last_index, the last) occurrence."""
    return _arg(np.argmax, x, axis, keepdims, select_last_index)


@op("argmin", group="arg", bound=lambda node, ib, n: 8.0, inputs=("x",), attrs=_ARG_ATTRS, infer=_arg_infer, fusion=FusionKind.REDUCTION,
    onnx="ArgMin")
def argmin(x, *, axis, keepdims, select_last_index):
    """Index (i64) of the smallest entry along ``axis``; ties as in argmax."""
    return _arg(np.argmin, x, axis, keepdims, select_last_index)


def _cumsum_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, NUMERIC - {"i4", "u4"}, "cumsum: input")
    if x.rank == 0:
        raise OpTypeError("cumsum needs an input of rank >= 1")
    norm_axis(attrs["axis"], x.rank)
    return [x]


@op("cumsum", bound=bound_reduce_sum, inputs=("x",), attrs={"axis": Attr("int"), "exclusive": Attr("int", 0), "reverse": Attr("int", 0)},
    infer=_cumsum_infer, fusion=FusionKind.REDUCTION,
    onnx=OnnxSpec("CumSum", attr_inputs={1: "axis"}, attr_dtypes={"axis": "i64"}))
def cumsum(x, *, axis, exclusive, reverse):
    """Running sum along ``axis``, accumulated in x's dtype; exclusive omits the current entry,
    reverse runs from the end."""
    ax = axis % x.ndim
    y = np.flip(x, ax) if reverse else x
    c = np.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=ax)), np.take(c, range(c.shape[ax] - 1), axis=ax)],
                           axis=ax) if c.shape[ax] else c
    return np.require(np.flip(c, ax) if reverse else c, requirements="C")

