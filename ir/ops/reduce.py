"""Reductions (ONNX opset-18 form: the axes are an operand, here the attribute ``axes``).

An empty ``axes`` reduces over every axis; ONNX's ``noop_with_empty_axes=1`` is
resolved by the lifter (into an identity), so it is not an attribute. Float
reductions accumulate in float64 and cast back; integer sum/prod/sum_square
accumulate in the input's own dtype (wrapping, as ONNX Runtime does), and integer
mean divides the sum (accumulated in int64 for 8/16-bit inputs) by the count truncating toward zero.
"""

from __future__ import annotations

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, op
from ..types import FLOAT_DTYPES, INT_DTYPES, TensorType
from .common import bound_reduce_sum, norm_axes, reduced_shape, require_dtype

INTS: list[int] = []
NUMERIC = (INT_DTYPES - {"i4", "u4"}) | FLOAT_DTYPES


def _reduce_infer(allowed: frozenset[str]):
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        x = ts[0]
        require_dtype(x, allowed, "reduction input")
        axes = norm_axes(list(attrs.get("axes") or range(x.rank)), x.rank, "reduction axes")
        return [x.with_shape(reduced_shape(x.shape, axes, bool(attrs.get("keepdims", 1))))]
    return infer


def _axes(x: np.ndarray, axes: list[int]) -> tuple[int, ...]:
    return tuple(a % x.ndim for a in axes) if axes else tuple(range(x.ndim))


def _is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" or str(x.dtype) == "bfloat16"


def _reduction(name: str, onnx: str, fn, doc: str, allowed: frozenset[str] = NUMERIC, **props) -> None:
    def ref(x, *, axes, keepdims):
        with np.errstate(all="ignore"):
            return np.asarray(fn(x, _axes(x, axes), bool(keepdims))).astype(x.dtype)
    ref.__doc__ = doc
    op(name, inputs=("x",), attrs={"axes": Attr("ints", INTS), "keepdims": Attr("int", 1)},
       infer=_reduce_infer(allowed), fusion=FusionKind.REDUCTION,
       onnx=OnnxSpec(onnx, attr_inputs={1: "axes"}, attr_dtypes={"axes": "i64"}), **props)(ref)


def _sum(x, axes, keep):
    if _is_float(x):
        return np.sum(x.astype(np.float64), axis=axes, keepdims=keep)
    return np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype)


def _mean(x, axes, keep):
    if _is_float(x):
        return np.mean(x.astype(np.float64), axis=axes, keepdims=keep)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    acc = x.dtype if x.dtype.itemsize >= 4 else np.dtype(np.int64)  # i32/i64 wrap like ORT; narrow ints exact
    s = np.sum(x, axis=axes, keepdims=keep, dtype=acc).astype(np.int64)
    return np.sign(s) * (np.abs(s) // max(count, 1))


def _prod(x, axes, keep):
    if _is_float(x):
        return np.prod(x.astype(np.float64), axis=axes, keepdims=keep)
    return np.prod(x, axis=axes, keepdims=keep, dtype=x.dtype)


def _sum_square(x, axes, keep):
    if _is_float(x):
        x64 = x.astype(np.float64)
        return np.sum(x64 * x64, axis=axes, keepdims=keep)
    return np.sum(x * x, axis=axes, keepdims=keep, dtype=x.dtype)


def _l2(x, axes, keep):
    x64 = x.astype(np.float64)
    return np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=keep))


_reduction("reduce_sum", "ReduceSum", _sum, "Sum over ``axes`` (all when empty).", group="reduce", bound=bound_reduce_sum)
_reduction("reduce_mean", "ReduceMean", _mean,
           "Mean over ``axes`` (all when empty); integers divide truncating toward zero.", group="reduce", bound="keep")
def _extreme(x: np.ndarray, high: bool):
    """The identity of max (high=False: -inf, the dtype's minimum, False) or of min (high=True)."""
    if x.dtype == np.bool_:
        return np.bool_(high)
    if _is_float(x):
        return np.asarray(np.inf if high else -np.inf).astype(x.dtype)
    info = np.iinfo(x.dtype)
    return x.dtype.type(info.max if high else info.min)


_reduction("reduce_max", "ReduceMax", lambda x, a, k: np.max(x, axis=a, keepdims=k, initial=_extreme(x, False)),
           "Maximum over ``axes`` (all when empty); NaN propagates; an empty reduction gives -inf (the\n"
           "dtype's minimum for integers, False for bool), as ONNX.", allowed=NUMERIC | {"bool"},
           group="reduce", bound="keep")
_reduction("reduce_min", "ReduceMin", lambda x, a, k: np.min(x, axis=a, keepdims=k, initial=_extreme(x, True)),
           "Minimum over ``axes`` (all when empty); NaN propagates; an empty reduction gives +inf (the\n"
           "dtype's maximum for integers, True for bool), as ONNX.", allowed=NUMERIC | {"bool"},
           group="reduce", bound="keep")
_reduction("reduce_prod", "ReduceProd", _prod, "Product over ``axes`` (all when empty).", group="reduce/source", bound=lambda node, ib, n: 2.0 ** min(n * max(ib[0], 1.0), 1000.0))
_reduction("reduce_l2", "ReduceL2", _l2, "sqrt(sum(x**2)) over ``axes`` (all when empty); floats only.",
           allowed=FLOAT_DTYPES, group="reduce", bound=lambda node, ib, n: n ** 0.5 * ib[0])
_reduction("reduce_sum_square", "ReduceSumSquare", _sum_square, "sum(x**2) over ``axes`` (all when empty).", group="reduce", bound=lambda node, ib, n: n * min(ib[0], 1e150) ** 2)
