"""Elementwise and broadcasting arithmetic, comparisons, activations and casts (ONNX semantics)."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import (
    erf as _erf,  # vectorized, matches math.erf to 1 ulp; np.vectorize(math.erf) is 3x slower
)

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, TensorType
from .common import broadcast_infer, float_same_as, same_as, same_dtype

EW, BC = FusionKind.ELEMENTWISE, FusionKind.BROADCAST


def _like(x: np.ndarray, y: np.ndarray | float) -> np.ndarray:
    return np.asarray(y).astype(x.dtype, copy=False)


# ------------------------------------------------------------------ binary arithmetic

@op("add", group="binary-arith", bound="sum", inputs=("a", "b"), infer=broadcast_infer(), fusion=BC, onnx="Add")
def add(a, b):
    """a + b with broadcasting."""
    return _like(a, a + b)


@op("sub", group="binary-arith", bound="sum", inputs=("a", "b"), infer=broadcast_infer(), fusion=BC, onnx="Sub")
def sub(a, b):
    """a - b with broadcasting."""
    return _like(a, a - b)


@op("mul", group="binary-arith", bound="prod", inputs=("a", "b"), infer=broadcast_infer(), fusion=BC, onnx="Mul")
def mul(a, b):
    """a * b with broadcasting."""
    return _like(a, a * b)


@op("div", group="binary-arith/source", bound="double", inputs=("a", "b"), infer=broadcast_infer(), fusion=BC, onnx="Div")
def div(a, b):
    """a / b; integers truncate toward zero as in ONNX (and C), not floor as numpy's //."""
    if a.dtype.kind in "iu":
        # exact integer arithmetic (a float64 detour loses precision beyond 2**53)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.floor_divide(a, b)
            q = q + ((np.remainder(a, b) != 0) & ((a < 0) != (b < 0)))
        return _like(a, q)
    return _like(a, a / b)


def _mod_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    out = broadcast_infer()(ts, attrs)
    if out[0].dtype == "bool":
        raise OpTypeError("mod: bool operands are not supported")
    return out


def _mod_lowerable(node, opset: int) -> str | None:
    if node.attrs.get("fmod") == 0 and node.outputs[0].type.dtype in FLOAT_DTYPES and opset < 28:
        return f"float Mod with fmod=0 exists from opset 28 (lowering to {opset})"
    return None


@op("mod", group="binary-arith/source", bound="double", inputs=("a", "b"), attrs={"fmod": Attr("int", 0)}, infer=_mod_infer,
    fusion=BC, onnx=OnnxSpec("Mod", since=28, lowerable=_mod_lowerable))
def mod(a, b, fmod):
    """Remainder: fmod=0 takes the divisor's sign (a - floor(a/b)*b; floats since ONNX opset 28, with
    its special cases: x mod +-inf is x or the divisor, 0 takes the divisor's sign), fmod=1 the
    dividend's (C fmod)."""
    with np.errstate(all="ignore"):
        return _like(a, np.fmod(a, b) if fmod else np.mod(a, b))


@op("pow", group="binary-arith/source", bound=lambda node, ib, n: min(max(ib[0], 2.0), 1e100) ** 3, inputs=("a", "b"), infer=lambda ts, at: [TensorType(ts[0].dtype, broadcast_infer()(
    [ts[0], ts[1].with_dtype(ts[0].dtype)], at)[0].shape)], fusion=BC, onnx="Pow")
def pow_(a, b):
    """a ** b; the output takes a's dtype (b may differ, as in ONNX)."""
    return _like(a, np.power(a.astype(np.float64) if a.dtype.kind == "f" else a, b))


@op("max", group="binary-arith", bound="max", inputs=("xs*",), infer=broadcast_infer(), fusion=BC, onnx="Max")
def max_(*xs):
    """Elementwise maximum of all operands (NaN propagates)."""
    return _like(xs[0], np.maximum.reduce(np.broadcast_arrays(*xs)) if len(xs) > 1 else xs[0])


@op("min", group="binary-arith", bound="max", inputs=("xs*",), infer=broadcast_infer(), fusion=BC, onnx="Min")
def min_(*xs):
    """Elementwise minimum of all operands (NaN propagates)."""
    return _like(xs[0], np.minimum.reduce(np.broadcast_arrays(*xs)) if len(xs) > 1 else xs[0])


def _float_broadcast(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    out = broadcast_infer()(ts, attrs)
    if out[0].dtype not in FLOAT_DTYPES:
        raise OpTypeError(f"operands must be float (as ONNX Sum requires), got {out[0].dtype}")
    return out


@op("sum", group="binary-arith/source", bound="sum", inputs=("xs*",), infer=_float_broadcast, fusion=BC, onnx="Sum")
def sum_(*xs):
    """Elementwise sum of all (float) operands."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return _like(xs[0], out)


# ------------------------------------------------------------------ comparisons and logic

def _cmp(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    return broadcast_infer("bool")(ts, attrs)


@op("equal", group="compare", bound="one", inputs=("a", "b"), infer=_cmp, fusion=BC, onnx="Equal")
def equal(a, b):
    """a == b."""
    return np.equal(a, b)


@op("less", group="compare", bound="one", inputs=("a", "b"), infer=_cmp, fusion=BC, onnx="Less")
def less(a, b):
    """a < b."""
    return np.less(a, b)


@op("less_equal", group="compare", bound="one", inputs=("a", "b"), infer=_cmp, fusion=BC, onnx="LessOrEqual")
def less_equal(a, b):
    """a <= b."""
    return np.less_equal(a, b)


@op("greater", group="compare", bound="one", inputs=("a", "b"), infer=_cmp, fusion=BC, onnx="Greater")
def greater(a, b):
    """a > b."""
    return np.greater(a, b)


@op("greater_equal", group="compare", bound="one", inputs=("a", "b"), infer=_cmp, fusion=BC, onnx="GreaterOrEqual")
def greater_equal(a, b):
    """a >= b."""
    return np.greater_equal(a, b)


def _bool_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if same_dtype(ts) != "bool":
        raise OpTypeError("logical ops take bool operands")
    return broadcast_infer()(ts, attrs)


@op("and", group="logic", bound="one", inputs=("a", "b"), infer=_bool_infer, fusion=BC, onnx="And")
def and_(a, b):
    """Logical and."""
    return np.logical_and(a, b)


@op("or", group="logic", bound="one", inputs=("a", "b"), infer=_bool_infer, fusion=BC, onnx="Or")
def or_(a, b):
    """Logical or."""
    return np.logical_or(a, b)


@op("not", bound="one", inputs=("x",), infer=_bool_infer, fusion=EW, onnx="Not")
def not_(x):
    """Logical not."""
    return np.logical_not(x)


def _where_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    c, a, b = ts
    if c.dtype != "bool":
        raise OpTypeError(f"where: condition must be bool, got {c.dtype}")
    dtype = same_dtype([a, b], "where's branches")
    from .common import broadcast_shapes
    return [TensorType(dtype, broadcast_shapes(c.shape, a.shape, b.shape))]


@op("where", bound="max", inputs=("cond", "a", "b"), infer=_where_infer, fusion=BC, onnx="Where")
def where(cond, a, b):
    """cond ? a : b with broadcasting."""
    return np.where(cond, a, b)


# ------------------------------------------------------------------ unary math

def _unary(name: str, onnx: str | None, fn, doc: str, *, float_only: bool = True,
           decompose=None, **props) -> None:
    def ref(x):
        with np.errstate(all="ignore"):
            return _like(x, fn(x))
    ref.__doc__ = doc
    op(name, inputs=("x",), infer=float_same_as() if float_only else same_as(), fusion=EW,
       onnx=onnx, decompose=decompose, **props)(ref)


def _exp_bound(node, ib: list[float], n_in: int) -> float:
    return math.exp(min(ib[0], 700.0))


def _clip_bound(node, ib: list[float], n_in: int) -> float:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    a = ib[0]
    return min(a, max(abs(lo) if lo is not None else a, abs(hi) if hi is not None else a))


def _silu_decompose(g, node):
    x = node.inputs[0]
    return [g.op("mul", x, g.op("sigmoid", x, before=node), before=node)]


_unary("neg", "Neg", np.negative, "-x.", float_only=False, group="unary-float", bound="keep")
_unary("abs", "Abs", np.abs, "|x|.", float_only=False, group="unary-float", bound="keep")
_unary("sign", "Sign", np.sign, "Sign of x (-1, 0, 1).", float_only=False, group="unary-float", bound="one")
_unary("exp", "Exp", np.exp, "e**x.", group="unary-float/source", domain=(-10.0, 10.0), bound=_exp_bound)
_unary("log", "Log", np.log, "Natural log.", group="unary-float/source", domain=(0.5, float("inf")), bound="grow")
_unary("sqrt", "Sqrt", np.sqrt, "Square root.", group="unary-float/source", domain=(0.5, float("inf")), bound="grow")
_unary("reciprocal", "Reciprocal", np.reciprocal, "1/x.", group="unary-float/source", domain=(0.5, float("inf")), bound="double")
_unary("floor", "Floor", np.floor, "Round down.", group="unary-float", bound="grow")
_unary("ceil", "Ceil", np.ceil, "Round up.", group="unary-float", bound="grow")
_unary("round", "Round", np.round, "Round half to even, as ONNX Round.", group="unary-float", bound="grow")
_unary("tanh", "Tanh", np.tanh, "Hyperbolic tangent.", group="unary-float", bound="one")
_unary("sin", "Sin", np.sin, "Sine.", group="unary-float", bound="one")
_unary("cos", "Cos", np.cos, "Cosine.", group="unary-float", bound="one")
_unary("erf", "Erf", lambda x: _erf(x.astype(np.float64)), "Error function.", group="unary-float", bound="one")
_unary("relu", "Relu", lambda x: np.maximum(x, 0), "max(x, 0).", float_only=False, group="unary-float", bound="keep")
_unary("sigmoid", "Sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64))), "1/(1+e**-x).", group="unary-float", bound="one")
_unary("softplus", "Softplus", lambda x: np.logaddexp(0.0, x.astype(np.float64)), "log(1+e**x).", group="unary-float", bound="grow")
_unary("silu", None, lambda x: x / (1.0 + np.exp(-x.astype(np.float64))),
       "x*sigmoid(x) (SiLU/Swish); lowered to ONNX as Mul(x, Sigmoid(x)).",
       decompose=_silu_decompose, group="unary-float", bound="keep")
_unary("identity", "Identity", lambda x: x, "x.", float_only=False, group="unary-float", bound="keep", view=True)


def _gelu_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if attrs.get("approximate", "none") not in ("none", "tanh"):
        raise OpTypeError(f"gelu: approximate must be 'none' or 'tanh', got {attrs.get('approximate')!r}")
    return float_same_as()(ts, attrs)


@op("gelu", group="unary-float", bound="keep", inputs=("x",), attrs={"approximate": Attr("str", "none")}, infer=_gelu_infer,
    fusion=EW, onnx="Gelu")
def gelu(x, approximate):
    """GELU: x*Phi(x) exactly ("none", erf form) or its tanh approximation ("tanh")."""
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    elif approximate == "none":
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _like(x, y)


@op("leaky_relu", group="unary-float", bound="keep", inputs=("x",), attrs={"alpha": Attr("float", 0.01)}, infer=float_same_as(),
    fusion=EW, onnx="LeakyRelu")
def leaky_relu(x, alpha):
    """x if x >= 0 else alpha*x."""
    return _like(x, np.where(x >= 0, x, x * alpha))


@op("hard_sigmoid", group="unary-float", bound="one", inputs=("x",), attrs={"alpha": Attr("float", 0.2), "beta": Attr("float", 0.5)},
    infer=float_same_as(), fusion=EW, onnx="HardSigmoid")
def hard_sigmoid(x, alpha, beta):
    """clip(alpha*x + beta, 0, 1)."""
    return _like(x, np.clip(alpha * x.astype(np.float64) + beta, 0.0, 1.0))


def _clip_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x = ts[0]
    for i, name in ((1, "min"), (2, "max")):
        t = ts[i] if i < len(ts) else None
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise OpTypeError(f"clip: the {name} operand has dtype {t.dtype}, the input {x.dtype}")
        if t.rank > 1 or (t.rank == 1 and t.shape[0] != 1):
            raise OpTypeError(f"clip: the {name} operand must hold one value (shape [] or [1]), got {t}")
        if attrs.get(name) is not None:
            raise OpTypeError(f"clip: {name} is given both as an operand and as an attribute")
    return [x]


@op("clip", inputs=("x", "min?", "max?"), attrs={"min": Attr("float", None), "max": Attr("float", None)},
    infer=_clip_infer, fusion=EW, onnx=OnnxSpec("Clip", attr_inputs={1: "min", 2: "max"}))
def clip(x, lo=None, hi=None, *, min=None, max=None):
    """Clamp to [min, max]; each bound is an attribute (a compile-time float) or a one-value operand
    of x's dtype (read at run time), or absent (unbounded). min > max gives max, as ONNX/numpy's clip;
    a NaN bound operand gives NaN."""
    if lo is not None or hi is not None:
        y = x
        if lo is not None:
            y = np.maximum(y, lo.reshape(()))
        elif min is not None:
            y = _like(x, np.maximum(y, min))
        if hi is not None:
            y = np.minimum(y, hi.reshape(()))
        elif max is not None:
            y = _like(x, np.minimum(y, max))
        return _like(x, y)
    lo_ = -np.inf if min is None else min
    hi_ = np.inf if max is None else max
    return _like(x, np.minimum(np.maximum(x, lo_), hi_))


def _cast_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    from .dtypes import cast_infer
    return cast_infer(ts, attrs)


@op("cast", bound="keep", inputs=("x",), infer=_cast_infer, fusion=EW,
    attrs={"to": Attr("dtype"), "saturate": Attr("int", None), "round_mode": Attr("str", None)},
    onnx=OnnxSpec("Cast", since=25))
def cast(x, to, saturate=None, round_mode=None):
    """Convert to dtype ``to`` as ONNX Cast: float->int truncates toward zero, anything->bool is
    x != 0, float8 saturates unless saturate=0, float8e8m0 rounds by round_mode (ir/ops/dtypes.py)."""
    from .dtypes import convert
    return convert(x, to, saturate, round_mode)


