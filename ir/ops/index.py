"""Index ops: one-hot, eye, top-k, scatters, KV-cache writes, depth/space moves, sequence reversal,
running products and run-time ranges (ONNX semantics).

ONNX operands that fix an output shape (OneHot's depth, TopK's K, CumProd's axis) are attributes
here, as in ``tensor.py``; the lifter takes them from constant inputs. Ops whose output shape
depends on input values (NonZero, Unique, Compress with a run-time condition) have no kiln op:
the lifter folds them when their inputs are constant and refuses them otherwise. Hardmax,
Compress and CenterCropPad are lifted as compositions of existing ops (``frontend/lift_index.py``).

Indices are range-checked by the references (an out-of-range index is an error, as in ONNX);
compiled kernels skip out-of-range writes instead of corrupting memory.
"""

from __future__ import annotations

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, INT_DTYPES, TensorType, dim_div, dim_mul, to_numpy_dtype
from .common import norm_axis, require_dtype, same_dtype

INJ = FusionKind.INJECTIVE
NUMERIC = INT_DTYPES | FLOAT_DTYPES
INDEX_DTYPES = ("i32", "i64")
SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _check_index_dtype(t: TensorType, what: str) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise OpTypeError(f"{what} must be i32 or i64, got {t.dtype}")


def _wrap(indices: np.ndarray, dim: int, what: str) -> np.ndarray:
    """Indices with negatives counted from the end; IndexError for any outside [-dim, dim)."""
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + dim, idx)
    bad = (idx < 0) | (idx >= dim)
    if bad.any():
        raise IndexError(f"{what}: index {int(np.asarray(indices).reshape(-1)[np.argmax(bad.reshape(-1))])} "
                         f"is out of range for a dim of size {dim}")
    return idx


# ================================================================== arange (Range with a static length)

ARANGE_DTYPES = ("i16", "i32", "i64", "f16", "bf16", "f32", "f64")
_STASH = ("f16", "bf16")  # computed in f32, as ONNX Range's default stash_type=1 says


def _arange_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    start, delta = ts
    dtype = same_dtype(ts, "arange: start and delta")
    require_dtype(start, ARANGE_DTYPES, "arange: start")
    if start.rank != 0 or delta.rank != 0:
        raise OpTypeError(f"arange: start and delta must be scalars, got {start} and {delta}")
    if attrs["length"] < 0:
        raise OpTypeError(f"arange: length {attrs['length']} is negative")
    return [TensorType(dtype, (attrs["length"],))]


def _arange_decompose(g, node):
    start, delta = node.inputs
    n = node.attrs["length"]
    wide = "f32" if start.type.dtype in _STASH else start.type.dtype

    def o(name, *args, **kw):
        return g.op(name, *args, before=node, **kw)

    if wide != start.type.dtype:
        start, delta = o("cast", start, to=wide), o("cast", delta, to=wide)
    steps = g.add_constant(np.arange(n).astype(to_numpy_dtype(wide)), g.fresh_name("steps"))
    y = o("add", start, o("mul", steps, delta))
    return [o("cast", y, to=node.inputs[0].type.dtype) if wide != node.inputs[0].type.dtype else y]


@op("arange", inputs=("start", "delta"), attrs={"length": Attr("int")}, infer=_arange_infer, fusion=INJ,
    decompose=_arange_decompose, bound=lambda node, ib, n: ib[0] + node.attrs["length"] * ib[1])
def arange(start, delta, *, length):
    """ONNX Range whose length ``ceil((limit - start) / delta)`` is known at compile time while start
    (and delta) are run-time scalars: ``start + i * delta`` for ``i < length``, in the operands'
    dtype (f16/bf16 in f32 and rounded once, ONNX's default ``stash_type``). The lifter folds a
    Range of constants to a constant instead (``range`` in tensor.py)."""
    dt = start.dtype
    wide = np.float32 if np.dtype(dt) in (to_numpy_dtype("f16"), to_numpy_dtype("bf16")) else dt
    steps = np.arange(length).astype(wide)
    with np.errstate(over="ignore"):
        return (np.asarray(start).astype(wide) + steps * np.asarray(delta).astype(wide)).astype(dt)


# ================================================================== one_hot / eye_like

def _one_hot_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    idx, values = ts
    require_dtype(idx, NUMERIC, "one_hot: indices")
    if values.rank != 1 or values.shape[0] != 2:
        raise OpTypeError(f"one_hot: values must be [off_value, on_value] (shape [2]), got {values}")
    depth = attrs["depth"]
    if depth < 1:
        raise OpTypeError(f"one_hot: depth {depth} must be >= 1")
    ax = norm_axis(attrs["axis"], idx.rank, extra=1)
    return [TensorType(values.dtype, idx.shape[:ax] + (depth,) + idx.shape[ax:])]


@op("one_hot", bound="keep", inputs=("indices", "values"), attrs={"depth": Attr("int"), "axis": Attr("int", -1)},
    infer=_one_hot_infer, fusion=INJ,
    onnx=OnnxSpec("OneHot", attr_inputs={1: "depth"}, attr_dtypes={"depth": "i64"}))
def one_hot(indices, values, *, depth, axis):
    """values[1] where the index (negatives count from ``depth``) equals the position along the new
    ``axis``, else values[0]; indices outside [-depth, depth) give a row of values[0]. A float index
    that is not a whole number selects nothing, as in onnxruntime and ONNX's reference (the spec's
    "cast to int64" is not what either does)."""
    idx = np.asarray(indices).astype(np.float64 if indices.dtype.kind in "fV" else np.int64)
    idx = np.where(idx < 0, idx + depth, idx)
    ax = axis % (indices.ndim + 1)
    targets = np.arange(depth).reshape((depth,) + (1,) * (indices.ndim - ax))
    hit = np.expand_dims(idx, ax) == targets
    return np.where(hit, values[1], values[0]).astype(values.dtype)


EYE_DTYPES = NUMERIC - {"i2", "u2", "i4", "u4"} | {"bool"}


def _eye_like_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    if x.rank != 2:
        raise OpTypeError(f"eye_like needs a 2-D input, got {x}")
    dtype = attrs.get("dtype") or x.dtype
    if dtype not in EYE_DTYPES:
        raise OpTypeError(f"eye_like: dtype {dtype} is not one of {sorted(EYE_DTYPES)}")
    return [TensorType(dtype, x.shape)]


@op("eye_like", bound="one", inputs=("x",), attrs={"dtype": Attr("dtype", None), "k": Attr("int", 0)},
    infer=_eye_like_infer, fusion=INJ, onnx="EyeLike")
def eye_like(x, *, k, dtype=None):
    """Ones on diagonal ``k`` (j - i == k) of a matrix shaped like ``x`` (whose values are not read),
    zeros elsewhere; dtype ``dtype`` or x's."""
    dt = to_numpy_dtype(dtype) if dtype else x.dtype
    rows, cols = x.shape
    return (np.arange(cols)[None, :] - np.arange(rows)[:, None] == k).astype(dt)


# ================================================================== top_k

def _top_k_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, NUMERIC - {"i2", "u2", "i4", "u4"}, "top_k: input")
    if x.rank == 0:
        raise OpTypeError("top_k needs an input of rank >= 1")
    ks = list(attrs["k"])
    if len(ks) != 1:
        raise OpTypeError(f"top_k: k must hold one value (ONNX's K of shape [1]), got {ks}")
    k = ks[0]
    ax = norm_axis(attrs["axis"], x.rank)
    d = x.shape[ax]
    if k < 0 or (isinstance(d, int) and k > d):
        raise OpTypeError(f"top_k: k={k} is out of range for dim {ax} of {x}")
    shape = x.shape[:ax] + (k,) + x.shape[ax + 1:]
    return [TensorType(x.dtype, shape), TensorType("i64", shape)]


def top_k_order(x: np.ndarray, axis: int, largest: int) -> np.ndarray:
    """Indices that sort ``x`` along ``axis`` best first; equal values keep the lower index first."""
    if not largest:
        return np.argsort(x, axis=axis, kind="stable")
    n = x.shape[axis]
    return np.flip(n - 1 - np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)


@op("top_k", bound="keep", inputs=("x",), outputs=("values", "indices"),
    attrs={"k": Attr("ints"), "axis": Attr("int", -1), "largest": Attr("int", 1), "sorted": Attr("int", 1)},
    infer=_top_k_infer, fusion=FusionKind.REDUCTION,
    onnx=OnnxSpec("TopK", attr_inputs={1: "k"}, attr_dtypes={"k": "i64"}))
def top_k(x, *, k, axis, largest, sorted):  # noqa: A002 - ONNX's attribute name
    """The k largest (or smallest) entries along ``axis`` and their i64 indices, best first; ties go
    to the lower index. ``k`` is a one-element list (ONNX's K input of shape [1]). ONNX leaves the
    order undefined for sorted=0; kiln returns it sorted then too."""
    ax = axis % x.ndim
    order = np.take(top_k_order(x, ax, largest), np.arange(k[0]), axis=ax)
    return np.take_along_axis(x, order, axis=ax), order.astype(np.int64)


# ================================================================== scatters

def _scatter_reduction(attrs: Attrs, what: str) -> str:
    red = attrs.get("reduction", "none")
    if red not in SCATTER_REDUCTIONS:
        raise OpTypeError(f"{what}: reduction {red!r} is not one of {list(SCATTER_REDUCTIONS)}")
    return red


def _scatter_elements_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    data, idx, upd = ts
    _check_index_dtype(idx, "scatter_elements: indices")
    red = _scatter_reduction(attrs, "scatter_elements")
    if red != "none" and data.dtype == "bool":
        raise OpTypeError(f"scatter_elements: reduction {red!r} needs numeric data, got {data}")
    if upd.dtype != data.dtype:
        raise OpTypeError(f"scatter_elements: updates {upd} must have the data's dtype ({data})")
    if data.rank == 0 or idx.rank != data.rank or idx.shape != upd.shape:
        raise OpTypeError(f"scatter_elements: indices {idx} and updates {upd} must share one shape of the "
                          f"data's rank ({data}), >= 1")
    ax = norm_axis(attrs["axis"], data.rank)
    for i, (di, dd) in enumerate(zip(idx.shape, data.shape)):
        if i != ax and isinstance(di, int) and isinstance(dd, int) and di > dd:
            raise OpTypeError(f"scatter_elements: indices {idx} dim {i} exceeds the data's ({data})")
    return [data]


def _apply(out2: np.ndarray, rows: np.ndarray, upd2: np.ndarray, reduction: str) -> None:
    """out2[rows[u]] = f(out2[rows[u]], upd2[u]) for every u in order (ufunc.at: duplicates accumulate)."""
    if reduction == "none":
        # duplicates are undefined in ONNX; the last update wins, as in ONNX's reference
        last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]
        out2[rows[last]] = upd2[last]
        return
    ufunc = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction]
    ufunc.at(out2, rows, upd2)


@op("scatter_elements", bound="max", inputs=("data", "indices", "updates"),
    attrs={"axis": Attr("int", 0), "reduction": Attr("str", "none")}, infer=_scatter_elements_infer,
    fusion=FusionKind.OPAQUE, onnx="ScatterElements")
def scatter_elements(data, indices, updates, *, axis, reduction):
    """A copy of ``data`` with out[i.., indices[i..], ..i] combined with updates[i..] (``reduction``
    none: replaced; add/mul/max/min: combined in order); negative indices count from the end."""
    ax = axis % data.ndim
    for i in range(data.ndim):
        if i != ax and indices.shape[i] > data.shape[i]:
            raise IndexError(f"indices dim {i} ({indices.shape[i]}) exceeds the data's ({data.shape[i]})")
    idx = _wrap(indices, data.shape[ax], "scatter_elements")
    grid = list(np.indices(indices.shape))
    grid[ax] = idx
    flat = np.ravel_multi_index(tuple(g.reshape(-1) for g in grid), data.shape)
    out = np.array(data, copy=True)
    _apply(out.reshape(-1), flat, updates.reshape(-1), reduction)
    return out


def _scatter_nd_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    data, idx, upd = ts
    _check_index_dtype(idx, "scatter_nd: indices")
    red = _scatter_reduction(attrs, "scatter_nd")
    if red != "none" and data.dtype == "bool":
        raise OpTypeError(f"scatter_nd: reduction {red!r} needs numeric data, got {data}")
    if upd.dtype != data.dtype:
        raise OpTypeError(f"scatter_nd: updates {upd} must have the data's dtype ({data})")
    if data.rank == 0 or idx.rank == 0 or not isinstance(idx.shape[-1], int):
        raise OpTypeError(f"scatter_nd: needs data of rank >= 1 and indices of rank >= 1 with a static last "
                          f"dim, got {data} and {idx}")
    q = idx.shape[-1]
    if not 1 <= q <= data.rank:
        raise OpTypeError(f"scatter_nd: indices {idx} address {q} dims of the rank-{data.rank} data")
    want = idx.shape[:-1] + data.shape[q:]
    if upd.shape != want:
        raise OpTypeError(f"scatter_nd: updates {upd} must have shape {list(want)} (indices {idx}, data {data})")
    return [data]


@op("scatter_nd", bound="max", inputs=("data", "indices", "updates"), attrs={"reduction": Attr("str", "none")},
    infer=_scatter_nd_infer, fusion=FusionKind.OPAQUE, onnx="ScatterND")
def scatter_nd(data, indices, updates, *, reduction):
    """A copy of ``data`` where the slice at each index tuple indices[u, :] (over the first q dims)
    is replaced by (or, with ``reduction``, combined in order with) updates[u]."""
    q = indices.shape[-1]
    lead = data.shape[:q]
    idx = indices.reshape(-1, q).astype(np.int64)
    cols = [_wrap(idx[:, j], lead[j], "scatter_nd") for j in range(q)]
    rows = np.ravel_multi_index(tuple(cols), lead) if q else np.zeros(len(idx), np.int64)
    out = np.array(data, copy=True)
    inner = int(np.prod(data.shape[q:], dtype=np.int64))
    _apply(out.reshape(-1, inner), rows, updates.reshape(-1, inner), reduction)
    return out


TENSOR_SCATTER_MODES = ("linear", "circular")


def _tensor_scatter_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    past, upd = ts[0], ts[1]
    wi = ts[2] if len(ts) > 2 else None
    if attrs["mode"] not in TENSOR_SCATTER_MODES:
        raise OpTypeError(f"tensor_scatter: mode {attrs['mode']!r} is not one of {list(TENSOR_SCATTER_MODES)}")
    if upd.dtype != past.dtype or upd.rank != past.rank or past.rank < 2:
        raise OpTypeError(f"tensor_scatter: update {upd} must have the cache's dtype and rank ({past}, >= 2)")
    ax = norm_axis(attrs["axis"], past.rank)
    if ax == 0:
        raise OpTypeError("tensor_scatter: axis must not be 0 (the batch dim)")
    for i, (a, b) in enumerate(zip(past.shape, upd.shape)):
        if i != ax and a != b:
            raise OpTypeError(f"tensor_scatter: update {upd} differs from the cache {past} in dim {i}")
    s, m = upd.shape[ax], past.shape[ax]
    if isinstance(s, int) and isinstance(m, int) and s > m:
        raise OpTypeError(f"tensor_scatter: update {upd} is longer than the cache {past} along axis {ax}")
    if wi is not None and (wi.dtype != "i64" or wi.rank != 1 or wi.shape[0] != past.shape[0]):
        raise OpTypeError(f"tensor_scatter: write_indices {wi} must be i64[{past.shape[0]}] (one per batch)")
    return [past]


@op("tensor_scatter", bound="max", inputs=("past_cache", "update", "write_indices?"),
    attrs={"axis": Attr("int", -2), "mode": Attr("str", "linear")}, infer=_tensor_scatter_infer, fusion=INJ,
    onnx=OnnxSpec("TensorScatter", since=24))
def tensor_scatter(past_cache, update, write_indices=None, *, axis, mode):
    """KV-cache write: a copy of ``past_cache`` with update[b, .., s, ..] at position
    write_indices[b] + s along ``axis`` (mod the cache length in ``circular`` mode; ``linear``
    needs the whole update to fit). Absent write_indices mean 0."""
    ax = axis % past_cache.ndim
    length, n = past_cache.shape[ax], update.shape[ax]
    wi = np.zeros(past_cache.shape[0], np.int64) if write_indices is None else np.asarray(write_indices)
    out = np.array(past_cache, copy=True)
    for b in range(past_cache.shape[0]):
        pos = int(wi[b]) + np.arange(n)
        if mode == "circular":
            pos %= length
        elif n and (pos[0] < 0 or pos[-1] >= length):
            raise IndexError(f"tensor_scatter: write index {int(wi[b])} + {n} updates leave the cache "
                             f"length {length} (batch {b}, linear mode)")
        np.moveaxis(out[b], ax - 1, 0)[pos] = np.moveaxis(update[b], ax - 1, 0)
    return out


# ================================================================== depth_to_space / space_to_depth

DS_MODES = ("DCR", "CRD")


def _ds_infer(op_name: str, to_space: bool):
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        x = ts[0]
        b, mode = attrs["blocksize"], attrs["mode"]
        if x.rank != 4:
            raise OpTypeError(f"{op_name} needs a 4-D (N, C, H, W) input, got {x}")
        if b < 1 or mode not in DS_MODES:
            raise OpTypeError(f"{op_name}: blocksize {b} must be >= 1 and mode {mode!r} one of {list(DS_MODES)}")
        n, c, h, w = x.shape
        if to_space:
            c2 = dim_div(c, b * b)
            if c2 is None:
                raise OpTypeError(f"{op_name}: channels {c} of {x} are not a multiple of blocksize**2 = {b * b}")
            return [x.with_shape((n, c2, dim_mul(h, b), dim_mul(w, b)))]
        h2, w2 = dim_div(h, b), dim_div(w, b)
        if h2 is None or w2 is None:
            raise OpTypeError(f"{op_name}: height {h} and width {w} of {x} must be multiples of blocksize {b}")
        return [x.with_shape((n, dim_mul(c, b * b), h2, w2))]
    return infer


@op("depth_to_space", bound="keep", inputs=("x",), attrs={"blocksize": Attr("int"), "mode": Attr("str", "DCR")},
    infer=_ds_infer("depth_to_space", True), fusion=INJ, onnx="DepthToSpace")
def depth_to_space(x, *, blocksize, mode):
    """Move channel blocks into b x b spatial blocks: out[n, c, h*b + i, w*b + j] is channel
    (i*b + j)*C' + c (DCR) or c*b*b + i*b + j (CRD) at (h, w)."""
    n, c, h, w = x.shape
    b = blocksize
    if mode == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(y.reshape(n, c // (b * b), h * b, w * b))


@op("space_to_depth", bound="keep", inputs=("x",), attrs={"blocksize": Attr("int"), "mode": Attr("str", "DCR")},
    infer=_ds_infer("space_to_depth", False), fusion=INJ, onnx=OnnxSpec("SpaceToDepth", since=28))
def space_to_depth(x, *, blocksize, mode):
    """The inverse of depth_to_space in the same mode: b x b spatial blocks become channels."""
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(y.reshape(n, c * b * b, h // b, w // b))


# ================================================================== reverse_sequence

def _reverse_sequence_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, lens = ts
    if x.rank < 2:
        raise OpTypeError(f"reverse_sequence needs an input of rank >= 2, got {x}")
    t, b = attrs["time_axis"], attrs["batch_axis"]
    if {t, b} != {0, 1}:
        raise OpTypeError(f"reverse_sequence: time_axis {t} and batch_axis {b} must be 0 and 1 in some order")
    if lens.dtype != "i64" or lens.rank != 1 or lens.shape[0] != x.shape[b]:
        raise OpTypeError(f"reverse_sequence: sequence_lens {lens} must be i64[{x.shape[b]}] (one per batch)")
    return [x]


@op("reverse_sequence", bound="keep", inputs=("x", "sequence_lens"),
    attrs={"time_axis": Attr("int", 0), "batch_axis": Attr("int", 1)}, infer=_reverse_sequence_infer,
    fusion=INJ, onnx="ReverseSequence")
def reverse_sequence(x, sequence_lens, *, time_axis, batch_axis):
    """For each batch entry b, the first sequence_lens[b] steps along ``time_axis`` reversed, the rest
    copied; lengths outside [0, T] are an error."""
    steps = x.shape[time_axis]
    out = np.array(x, copy=True)
    for b, n in enumerate(np.asarray(sequence_lens).tolist()):
        if not 0 <= n <= steps:
            raise IndexError(f"reverse_sequence: sequence_lens[{b}] = {n} is outside [0, {steps}]")
        src = np.take(x, [b], axis=batch_axis)
        rev = np.concatenate([np.flip(np.take(src, range(n), axis=time_axis), time_axis),
                              np.take(src, range(n, steps), axis=time_axis)], axis=time_axis)
        idx = [slice(None)] * x.ndim
        idx[batch_axis] = slice(b, b + 1)
        out[tuple(idx)] = rev
    return out


# ================================================================== cumprod

def _cumprod_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    require_dtype(x, ("i32", "i64", "u32", "u64", "f16", "bf16", "f32", "f64"), "cumprod: input")
    if x.rank == 0:
        raise OpTypeError("cumprod needs an input of rank >= 1")
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _cumprod_mask(n: int, exclusive: int, reverse: int) -> np.ndarray:
    """M[j, i]: whether input i enters output j."""
    j, i = np.arange(n)[:, None], np.arange(n)[None, :]
    if reverse:
        return i > j if exclusive else i >= j
    return i < j if exclusive else i <= j


def _cumprod_decompose(g, node):
    """prod_i where(M[j, i], x_i, 1): Unsqueeze, Where, ReduceProd (CumProd is ONNX 26+)."""
    x = node.inputs[0]
    a = node.attrs
    ax = a["axis"] % x.type.rank
    n = x.type.shape[ax]
    if not isinstance(n, int):
        raise OpTypeError(f"cumprod: lowering to ONNX before opset 26 needs a static dim {ax}, got {x.type}")
    mask = _cumprod_mask(n, a["exclusive"], a["reverse"]).reshape((n, n) + (1,) * (x.type.rank - ax - 1))
    m = g.add_constant(mask, g.fresh_name("cumprod_mask"))
    one = g.add_constant(np.ones((), x.type.np_dtype), g.fresh_name("one"))
    xu = g.op("unsqueeze", x, axes=[ax], before=node)
    sel = g.op("where", m, xu, one, before=node)
    return [g.op("reduce_prod", sel, axes=[ax + 1], keepdims=0, before=node)]


@op("cumprod", bound=lambda node, ib, n: max(ib[0], 1.0) ** min(n, 64), inputs=("x",),
    attrs={"axis": Attr("int"), "exclusive": Attr("int", 0), "reverse": Attr("int", 0)},
    infer=_cumprod_infer, fusion=FusionKind.REDUCTION, decompose=_cumprod_decompose,
    onnx=OnnxSpec("CumProd", attr_inputs={1: "axis"}, attr_dtypes={"axis": "i64"}, since=26))
def cumprod(x, *, axis, exclusive, reverse):
    """Running product along ``axis`` in x's dtype; exclusive leaves out the current entry (the first
    output is 1), reverse runs from the end."""
    ax = axis % x.ndim
    y = np.flip(x, ax) if reverse else x
    c = np.cumprod(y, axis=ax, dtype=x.dtype)
    if exclusive and c.shape[ax]:
        c = np.concatenate([np.ones_like(np.take(c, [0], axis=ax)), np.take(c, range(c.shape[ax] - 1), axis=ax)],
                           axis=ax)
    return np.require(np.flip(c, ax) if reverse else c, requirements="C")


__all__ = ["ARANGE_DTYPES", "DS_MODES", "SCATTER_REDUCTIONS", "TENSOR_SCATTER_MODES", "top_k_order"]
