"""Type-rule building blocks shared by the op families."""

from __future__ import annotations

from collections.abc import Sequence

from ..registry import Attrs, OpTypeError
from ..types import FLOAT_DTYPES, Dim, TensorType, dim_div, dim_mul


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """Numpy/ONNX multidirectional broadcasting, with symbolic dims."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d: Dim = 1
        for x in dims:
            if x == 1 or x == d:
                continue
            if d == 1:
                d = x
            else:
                raise OpTypeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast (dim {x} vs {d})")
        out.append(d)
    return tuple(out)


def norm_axis(axis: int, rank: int, *, extra: int = 0) -> int:
    """A possibly negative axis as an index in [0, rank + extra)."""
    n = rank + extra
    if not -n <= axis < n:
        raise OpTypeError(f"axis {axis} is out of range for rank {rank}")
    return axis % n if n else 0


def same_dtype(ts: Sequence[TensorType | None], what: str = "operands") -> str:
    dtypes = {t.dtype for t in ts if t is not None}
    if len(dtypes) != 1:
        raise OpTypeError(f"{what} must share one dtype, got {sorted(dtypes)}")
    return dtypes.pop()


def require_float(t: TensorType, what: str = "input") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise OpTypeError(f"{what} must be a float tensor, got {t.dtype}")


def same_as(i: int = 0):
    """Type rule: one output typed like input i."""
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        return [ts[i]]
    return infer


def float_same_as(i: int = 0):
    """Type rule: one output typed like float input i."""
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        require_float(ts[i])
        return [ts[i]]
    return infer


def broadcast_infer(out_dtype: str | None = None):
    """Type rule: broadcast every operand (one dtype); the output dtype is theirs or ``out_dtype``."""
    def infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
        dtype = same_dtype(ts)
        return [TensorType(out_dtype or dtype, broadcast_shapes(*(t.shape for t in ts if t is not None)))]
    return infer


def reduced_shape(shape: Sequence[Dim], axes: Sequence[int], keepdims: bool) -> tuple[Dim, ...]:
    axes = {norm_axis(a, len(shape)) for a in axes}
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def resolve_reshape(in_shape: Sequence[Dim], target: Sequence[int], allowzero: int = 0) -> tuple[Dim, ...]:
    """ONNX Reshape's target shape (0 copies a dim unless allowzero, -1 infers) as concrete/symbolic dims."""
    out: list[Dim] = []
    infer_at = None
    for i, t in enumerate(target):
        if t == -1:
            if infer_at is not None:
                raise OpTypeError(f"reshape target {list(target)} has more than one -1")
            infer_at = i
            out.append(1)
        elif t == 0 and not allowzero:
            if i >= len(in_shape):
                raise OpTypeError(f"reshape target {list(target)} copies dim {i} of a rank-{len(in_shape)} input")
            out.append(in_shape[i])
        elif t < 0:
            raise OpTypeError(f"reshape target {list(target)} has a negative dim")
        else:
            out.append(int(t))
    total = dim_mul(*in_shape)
    if infer_at is not None:
        q = dim_div(total, dim_mul(*out))
        if q is None:
            raise OpTypeError(f"cannot reshape {tuple(in_shape)} to {list(target)}")
        out[infer_at] = q
    elif dim_mul(*out) != total:
        raise OpTypeError(f"cannot reshape {tuple(in_shape)} ({total} elements) to {list(target)}")
    return tuple(out)


def dim_add(*dims: Dim) -> Dim | None:
    """Sum of dims when it is a single product term (all static, or k1*S + k2*S = (k1+k2)*S); else None."""
    from ..types import _factors, _make

    coef, syms = 0, None
    for d in dims:
        c, s = _factors(d)
        if c == 0:
            continue
        if syms is None:
            syms = s
        elif s != syms:
            return None
        coef += c
    if syms is None:
        return 0
    return _make(coef, syms)


def static_dims(shape: Sequence[Dim], what: str) -> tuple[int, ...]:
    """The shape as ints, or OpTypeError saying which dim is symbolic and why that matters."""
    for i, d in enumerate(shape):
        if not isinstance(d, int):
            raise OpTypeError(f"{what} needs static dims, but dim {i} is symbolic ({d})")
    return tuple(shape)


def norm_axes(axes: Sequence[int], rank: int, what: str = "axes") -> list[int]:
    """Axes normalized to [0, rank); OpTypeError on out-of-range or repeated axes."""
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise OpTypeError(f"{what} {list(axes)}: axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise OpTypeError(f"{what} {list(axes)} repeat an axis")
    return out


def require_dtype(t: TensorType, allowed: Sequence[str], what: str = "input") -> None:
    if t.dtype not in allowed:
        raise OpTypeError(f"{what} has dtype {t.dtype}; expected one of {sorted(allowed)}")


# ---------------------------------------------------------------- magnitude bounds (registry ``bound=``)
# fn(node, operand_bounds, n_in) -> a rough upper bound of |output| (the fuzzer keeps values tame with it).

def _numel(shape: Sequence[Dim]) -> int:
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 8
    return n


def bound_sum(node, ib: list[float], n_in: int) -> float:
    return sum(ib)


def bound_prod(node, ib: list[float], n_in: int) -> float:
    out = 1.0
    for b in ib:
        out *= b
    return out


def bound_double(node, ib: list[float], n_in: int) -> float:
    return ib[0] * 2.0


def bound_matmul(node, ib: list[float], n_in: int) -> float:
    k = node.inputs[0].type.shape[-1]
    return float(k if isinstance(k, int) else 8) * ib[0] * ib[1]


def bound_conv(node, ib: list[float], n_in: int) -> float:
    w = node.inputs[1].type.shape
    return float(_numel(w[1:])) * ib[0] * ib[1] * 4 + (ib[2] if len(ib) > 2 else 0.0)


def bound_batch_norm(node, ib: list[float], n_in: int) -> float:
    return (ib[0] + 4.0) * 4.0 * max(ib[1], 1.0) + 2.0


def bound_norm(node, ib: list[float], n_in: int) -> float:
    return n_in ** 0.5 * max(ib[1], 1.0) + (ib[2] if len(ib) > 2 else 0.0)


def bound_reduce_sum(node, ib: list[float], n_in: int) -> float:
    return n_in * ib[0]
