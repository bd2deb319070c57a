"""Op family 'math': float predicates, inverse and hyperbolic trigonometry, activations, bitwise ops.

Float references compute in float64 and round once to the operand's dtype (the
oracle for compiled kernels, tighter than ONNX's own reference, which rounds
f16 intermediates). Integer references are exact. Semantics are ONNX's:
``bit_shift`` implements BitShift-28 (signed types, arithmetic right shifts,
a shift outside [0, bits) gives only the sign fill), of which BitShift-11 is
the unsigned part; ``swish`` is Swish-24 (opset 24's op, with ``alpha``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, TensorType
from .common import broadcast_infer, float_same_as, require_dtype
from .elementwise import _bool_infer

if TYPE_CHECKING:
    from ..graph import Graph, Node, Value

EW, BC = FusionKind.ELEMENTWISE, FusionKind.BROADCAST
# the integer dtypes ONNX's bitwise ops (BitwiseAnd/Or/Xor/Not, BitShift-28) accept
BIT_DTYPES = ("u8", "u16", "u32", "u64", "i8", "i16", "i32", "i64")
SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


def _f64(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """fn in float64, rounded once to x's dtype (NaN/Inf as numpy gives them, no warnings)."""
    with np.errstate(all="ignore"):
        return np.asarray(fn(x.astype(np.float64))).astype(x.dtype)


# ------------------------------------------------------------------ float predicates

def _to_bool(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if ts[0].dtype not in FLOAT_DTYPES:
        raise OpTypeError(f"input must be a float tensor, got {ts[0].dtype}")
    return [ts[0].with_dtype("bool")]


@op("is_nan", bound="one", inputs=("x",), infer=_to_bool, fusion=EW, onnx="IsNaN")
def is_nan(x):
    """x is NaN (bool)."""
    return np.isnan(x)


@op("is_inf", bound="one", inputs=("x",),
    attrs={"detect_negative": Attr("int", 1), "detect_positive": Attr("int", 1)},
    infer=_to_bool, fusion=EW, onnx="IsInf")
def is_inf(x, detect_negative, detect_positive):
    """x is +inf (if detect_positive) or -inf (if detect_negative) (bool)."""
    return (np.isposinf(x) & bool(detect_positive)) | (np.isneginf(x) & bool(detect_negative))


# ------------------------------------------------------------------ trigonometric and hyperbolic

def _exp_bound(fn: Callable[[float], float]) -> Callable[[Node, list[float], int], float]:
    """|fn(x)| for |x| up to the operand's bound (fn even or odd, increasing in |x|)."""
    return lambda node, ib, n_in: abs(fn(min(ib[0], 700.0)))


def _float_unary(name: str, onnx: str, fn: Callable[[np.ndarray], np.ndarray], doc: str, **props) -> None:
    def ref(x):
        return _f64(x, fn)
    ref.__doc__ = doc
    op(name, inputs=("x",), infer=float_same_as(), fusion=EW, onnx=onnx, **props)(ref)


_UNIT = (-0.99, 0.99)
_float_unary("acos", "Acos", np.arccos, "Inverse cosine, in [0, pi]; NaN outside [-1, 1].",
             group="unary-float/source", domain=_UNIT, bound=lambda node, ib, n_in: math.pi)
_float_unary("asin", "Asin", np.arcsin, "Inverse sine, in [-pi/2, pi/2]; NaN outside [-1, 1].",
             group="unary-float/source", domain=_UNIT, bound=lambda node, ib, n_in: math.pi / 2)
_float_unary("atan", "Atan", np.arctan, "Inverse tangent, in (-pi/2, pi/2).",
             group="unary-float", bound=lambda node, ib, n_in: math.pi / 2)
_float_unary("acosh", "Acosh", np.arccosh, "Inverse hyperbolic cosine; NaN below 1.",
             group="unary-float/source", domain=(1.01, math.inf), bound="grow")
_float_unary("asinh", "Asinh", np.arcsinh, "Inverse hyperbolic sine.", group="unary-float", bound="keep")
_float_unary("atanh", "Atanh", np.arctanh, "Inverse hyperbolic tangent; +-inf at +-1, NaN beyond.",
             group="unary-float/source", domain=_UNIT, bound=lambda node, ib, n_in: 4.0)
_float_unary("sinh", "Sinh", np.sinh, "Hyperbolic sine.", group="unary-float/source", domain=(-10.0, 10.0),
             bound=_exp_bound(math.sinh))
_float_unary("cosh", "Cosh", np.cosh, "Hyperbolic cosine.", group="unary-float/source", domain=(-10.0, 10.0),
             bound=_exp_bound(math.cosh))
_float_unary("tan", "Tan", np.tan, "Tangent.", group="unary-float/source", domain=(-1.3, 1.3),
             bound=lambda node, ib, n_in: abs(math.tan(min(ib[0], 1.5))))


# ------------------------------------------------------------------ activations

def _mish(x: np.ndarray) -> np.ndarray:
    return x * np.tanh(np.logaddexp(0.0, x))


def _mish_decompose(g: Graph, node: Node) -> list[Value]:
    x = node.inputs[0]
    return [g.op("mul", x, g.op("tanh", g.op("softplus", x, before=node), before=node), before=node)]


_float_unary("mish", "Mish", _mish, "x*tanh(softplus(x)).", group="unary-float", bound="keep",
             decompose=_mish_decompose)
_float_unary("softsign", "Softsign", lambda x: x / (1.0 + np.abs(x)), "x/(1+|x|).", group="unary-float",
             bound="one")


def _celu_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if attrs["alpha"] == 0:
        raise OpTypeError("celu: alpha must be nonzero (the formula divides x by alpha)")
    return float_same_as()(ts, attrs)


@op("celu", group="unary-float", inputs=("x",), attrs={"alpha": Attr("float", 1.0)}, infer=_celu_infer,
    fusion=EW, onnx="Celu", bound=lambda node, ib, n_in: max(ib[0], abs(node.attrs["alpha"])))
def celu(x, alpha):
    """max(0, x) + min(0, alpha*(exp(x/alpha) - 1))."""
    return _f64(x, lambda v: np.maximum(v, 0.0) + np.minimum(0.0, alpha * np.expm1(v / alpha)))


@op("selu", group="unary-float", inputs=("x",),
    attrs={"alpha": Attr("float", SELU_ALPHA), "gamma": Attr("float", SELU_GAMMA)},
    infer=float_same_as(), fusion=EW, onnx="Selu",
    bound=lambda node, ib, n_in: abs(node.attrs["gamma"]) * max(ib[0], abs(node.attrs["alpha"])))
def selu(x, alpha, gamma):
    """gamma*x for x > 0, gamma*alpha*(exp(x) - 1) otherwise."""
    return _f64(x, lambda v: gamma * np.where(v > 0, v, alpha * np.expm1(v)))


@op("thresholded_relu", group="unary-float", inputs=("x",), attrs={"alpha": Attr("float", 1.0)},
    infer=float_same_as(), fusion=EW, onnx="ThresholdedRelu", bound="keep")
def thresholded_relu(x, alpha):
    """x where x > alpha, else 0 (NaN gives 0, as ONNX's comparison does)."""
    return np.where(x > alpha, x, np.zeros((), x.dtype)).astype(x.dtype)


def _shrink_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    require_dtype(ts[0], sorted(FLOAT_DTYPES | set(BIT_DTYPES)), "shrink's input")
    return [ts[0]]


@op("shrink", group="unary-float", inputs=("x",), attrs={"bias": Attr("float", 0.0), "lambd": Attr("float", 0.5)},
    infer=_shrink_infer, fusion=EW, onnx="Shrink",
    bound=lambda node, ib, n_in: ib[0] + abs(node.attrs["bias"]))
def shrink(x, bias, lambd):
    """x + bias where x < -lambd, x - bias where x > lambd, else 0; integers compute in float64 and
    truncate toward zero, as a float -> int cast does."""
    with np.errstate(all="ignore"):
        v = x.astype(np.float64)
        y = np.where(v < -lambd, v + bias, np.where(v > lambd, v - bias, 0.0))
        return (np.trunc(y) if x.dtype.kind in "iu" else y).astype(x.dtype)


def _swish_decompose(g: Graph, node: Node) -> list[Value]:
    x = node.inputs[0]
    alpha = g.add_constant(np.array(node.attrs["alpha"], x.type.np_dtype), g.fresh_name("alpha"))
    s = g.op("sigmoid", g.op("mul", x, alpha, before=node), before=node)
    return [g.op("mul", x, s, before=node)]


@op("swish", group="unary-float", inputs=("x",), attrs={"alpha": Attr("float", 1.0)}, infer=float_same_as(),
    fusion=EW, onnx=OnnxSpec("Swish", since=24), decompose=_swish_decompose, bound="keep")
def swish(x, alpha):
    """x*sigmoid(alpha*x) (ONNX Swish, opset 24; alpha=1 is silu); below opset 24 lowered to ONNX as
    Mul(x, Sigmoid(Mul(x, alpha)))."""
    return _f64(x, lambda v: v / (1.0 + np.exp(-alpha * v)))


# ------------------------------------------------------------------ logic and bitwise

@op("xor", group="logic", bound="one", inputs=("a", "b"), infer=_bool_infer, fusion=BC, onnx="Xor")
def xor(a, b):
    """Logical exclusive or."""
    return np.logical_xor(a, b)


def _bits_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    out = broadcast_infer()(ts, attrs)
    require_dtype(out[0], BIT_DTYPES, "bitwise operand")
    return out


def _bits_bound(node: Node, ib: list[float], n_in: int) -> float:
    """|a op b| < 2**(bits of the larger operand): at most twice the larger bound, plus one."""
    return 2.0 * max(ib) + 1.0


@op("bitwise_and", group="bitwise", bound=_bits_bound, inputs=("a", "b"), infer=_bits_infer, fusion=BC,
    onnx="BitwiseAnd")
def bitwise_and(a, b):
    """a & b on the two's complement bits."""
    return np.bitwise_and(a, b)


@op("bitwise_or", group="bitwise", bound=_bits_bound, inputs=("a", "b"), infer=_bits_infer, fusion=BC,
    onnx="BitwiseOr")
def bitwise_or(a, b):
    """a | b on the two's complement bits."""
    return np.bitwise_or(a, b)


@op("bitwise_xor", group="bitwise", bound=_bits_bound, inputs=("a", "b"), infer=_bits_infer, fusion=BC,
    onnx="BitwiseXor")
def bitwise_xor(a, b):
    """a ^ b on the two's complement bits."""
    return np.bitwise_xor(a, b)


def _not_bound(node: Node, ib: list[float], n_in: int) -> float:
    dt = node.inputs[0].type.np_dtype
    return float(np.iinfo(dt).max) if dt.kind == "u" else ib[0] + 1.0


@op("bitwise_not", group="bitwise/source", bound=_not_bound, inputs=("x",),
    infer=_bits_infer, fusion=EW, onnx="BitwiseNot")
def bitwise_not(x):
    """~x: -x - 1 for signed integers, max - x for unsigned."""
    return np.bitwise_not(x)


def _shift_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    if attrs["direction"] not in ("LEFT", "RIGHT"):
        raise OpTypeError(f"bit_shift: direction must be 'LEFT' or 'RIGHT', got {attrs['direction']!r}")
    return _bits_infer(ts, attrs)


def _shift_bound(node: Node, ib: list[float], n_in: int) -> float:
    if node.attrs["direction"] == "RIGHT":
        return ib[0]
    return ib[0] * 2.0 ** min(ib[1], 64.0)


@op("bit_shift", bound=_shift_bound, inputs=("x", "y"), attrs={"direction": Attr("str")}, infer=_shift_infer,
    fusion=BC, onnx=OnnxSpec("BitShift", since=28))
def bit_shift(x, y, direction):
    """x shifted by y bits (ONNX BitShift-28): LEFT drops the bits shifted out (wrapping), RIGHT is
    arithmetic for signed types; a shift y < 0 or y >= bits gives 0 (-1 for RIGHT of a negative x)."""
    x, y = np.broadcast_arrays(x, y)
    bits = x.dtype.itemsize * 8
    bad = (y < 0) | (y >= bits) if x.dtype.kind == "i" else y >= bits
    s = np.where(bad, 0, y).astype(x.dtype)
    if direction == "LEFT":
        u = np.dtype(f"u{x.dtype.itemsize}")
        out = np.left_shift(x.astype(u), s.astype(u)).astype(x.dtype)
        return np.where(bad, np.zeros((), x.dtype), out)
    fill = np.where(x < 0, -1, 0).astype(x.dtype) if x.dtype.kind == "i" else np.zeros_like(x)
    return np.where(bad, fill, np.right_shift(x, s))
