"""insert-qdq: static int8 quantization of every MatMul and Conv as QuantizeLinear/DequantizeLinear pairs.

The QDQ form written here is the contract that fuse-qlinear, codegen and
``lower_to_onnx`` read (onnxruntime's ``quantize_static`` QDQ format, QInt8
activations and weights, per channel):

* a float activation operand x: ``x.q = quantize(x, x.scale, x.zero_point) {dtype=i8}``,
  ``x.dq = dequantize(x.q, x.scale, x.zero_point)``; asymmetric per tensor, the
  scale an f32 scalar and the zero point an i8 scalar from the calibrated range
  (:func:`kiln.passes.calibrate.activation_qparams`, ORT's formula).  One pair per
  value, shared by all the layers that read it;
* a constant weight W: i8 codes ``W.q`` (symmetric, clip(round_half_even(W/s), -127, 127),
  s = max|W_c| / 127 per output channel) and ``W.dq = dequantize(W.q, W.scale, W.zero_point)``
  with ``axis=1`` for a MatMul weight B[K, N] and ``axis=0`` for a Conv weight [O, I, k...];
  ``per_channel=False`` gives one scale for the whole tensor;
* a bias b (the Conv's third operand, or the constant [N] operand of the ``add`` that
  alone reads a MatMul with a constant weight): i32 codes ``b.q = round(b / (sx*sw))``
  (float64 division, ORT's ``quantize_bias_static``) and ``b.dq = dequantize(b.q, b.scale) {axis=0}``;
* activation x activation MatMul (Q.K^T, A.V): both operands get activation pairs.

An operand computed by a ``dequantize`` is already quantized and gets no pair;
so do the values in ``skip``.  ``fixed`` gives (scale, zero point) for some
activations instead of calibrating them (RepQ-ViT's layer-wise parameters).

Refused, with the reason logged and the layer left float: an excluded node (by
node name or output value name), a layer whose activation is not f32, a Conv
weight that is not a constant, a weight that is already quantized (computed by a
``dequantize`` of a constant: weight-only), a weight with NaN or Inf, a constant
MatMul weight that is not 2-D, a MatMul whose first operand is a constant.  A
bias whose codes would not fit int32 (sx*sw too small) stays float, with a note
in the log; so does one whose activation scale is not known (a ``skip`` value).  Ranges are calibrated on the
float graph before anything is rewritten; the caller's graph is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.passes.calibrate import (
    METHODS,
    QRANGE,
    CalibrationSet,
    Range,
    activation_qparams,
    as_calibration,
    calibration_for,
    compute_ranges,
    quantize_symmetric,
    symmetric_weight_qparams,
)
from kiln.passes.manager import Pass, PassLog, register_pass

__all__ = ["InsertQDQ", "QuantLayer", "QuantSite", "insert_qdq", "plan_qdq"]

QParams = tuple[float, int]
ACT_DTYPE = "i8"
WEIGHT_BITS = 8


@dataclass(frozen=True)
class QuantLayer:
    """One quantized layer, named by the float model's names, for the quantization report.

    ``inputs`` are the float activation operands in operand order (an operand that
    already is a dequantize output is not listed); ``act_qparams`` their (scale, zero
    point), None for one in ``skip`` (left as it was); ``act_source`` says where each
    came from ("calibrated", "fixed" or "skipped"); ``ranges`` the calibrated
    (rmin, rmax) (None when not calibrated).  ``weight_scheme`` is e.g.
    "i8 symmetric per-channel axis=1", or "activation" for activation x activation.
    """

    node: str
    op: str
    output: str
    inputs: tuple[str, ...]
    act_qparams: tuple[QParams | None, ...]
    act_source: tuple[str, ...]
    ranges: tuple[Range | None, ...]
    weight: str = ""
    weight_scheme: str = ""
    bias: str = ""


@dataclass(frozen=True)
class QuantSite:
    """A matmul or conv accepted for quantization: which operands are activations and which the weight."""

    node: Node
    acts: tuple[int, ...]  # operand indices that are float activations
    weight: int | None  # operand index of the constant weight (None: activation x activation)
    bias_add: Node | None = None  # matmul: the add that applies the bias
    bias: int | None = None  # operand index of the bias (in bias_add for matmul, in node for conv)


def _node_label(node: Node) -> str:
    return node.name or node.outputs[0].name


def _describe(v: Value) -> str:
    return "a graph input" if v.producer is None else f"computed by {v.producer.op} %{v.name}"


def _dequantized(v: Value) -> bool:
    """Whether v is the output of a dequantize (so already quantized)."""
    return v.producer is not None and v.producer.op == "dequantize"


def _const_dequantized(v: Value) -> bool:
    """A dequantize of a constant: a weight quantized by another pass (weight-only, or a second insert-qdq)."""
    return _dequantized(v) and v.producer.inputs[0] is not None and v.producer.inputs[0].is_const


def _matmul_bias(graph: Graph, node: Node, w: Value) -> tuple[Node, int] | None:
    """The add that alone reads the matmul and adds a constant 1-D [N] bias, and the bias's operand index."""
    out = node.outputs[0]
    if any(out is o for o in graph.outputs) or len(out.uses) != 1:
        return None
    add, i = out.uses[0]
    if add.op != "add" or len(add.inputs) != 2:
        return None
    b = add.inputs[1 - i]
    if b is None or not b.is_const or b.type.rank != 1 or b.type.shape[0] != w.type.shape[1] \
            or b.type.dtype != "f32" or add.outputs[0].type != out.type or not np.isfinite(b.const).all():
        return None
    return add, 1 - i


def _excluded(node: Node, exclude: Collection[str]) -> bool:
    return bool(node.name and node.name in exclude) or any(o.name in exclude for o in node.outputs)


def _match_matmul(graph: Graph, node: Node) -> QuantSite | str:
    a, b = node.inputs[0], node.inputs[1]
    if a.is_const:
        return f"first operand %{a.name} is a constant; only x @ W (W constant) and activation x activation are quantized"
    if b.is_const:
        if not np.isfinite(b.const).all():
            return f"weight %{b.name} has non-finite values"
        if b.type.rank != 2:
            return (f"constant weight %{b.name} is {b.type}; only a 2-D [K, N] weight is quantized per output "
                    f"channel")
        found = _matmul_bias(graph, node, b)
        acts = () if _dequantized(a) else (0,)
        return QuantSite(node, acts, 1, *(found or (None, None)))
    if _const_dequantized(b):
        return f"weight %{b.name} is already quantized (dequantize of constant %{b.producer.inputs[0].name})"
    acts = tuple(i for i, v in enumerate((a, b)) if not _dequantized(v))
    if not acts:
        return "both operands are already quantized (outputs of dequantize)"
    return QuantSite(node, acts, None)


def _match_conv(node: Node) -> QuantSite | str:
    x, w = node.inputs[0], node.inputs[1]
    if not w.is_const:
        if _const_dequantized(w):
            return f"weight %{w.name} is already quantized (dequantize of constant %{w.producer.inputs[0].name})"
        return f"weight %{w.name} is not a constant ({_describe(w)}); only constant conv weights are quantized"
    if not np.isfinite(w.const).all():
        return f"weight %{w.name} has non-finite values"
    b = node.inputs[2] if len(node.inputs) > 2 else None
    bias = 2 if b is not None and b.is_const and b.type.dtype == "f32" and np.isfinite(b.const).all() else None
    return QuantSite(node, () if _dequantized(x) else (0,), 1, None, bias)


def match_site(graph: Graph, node: Node, exclude: Collection[str] = ()) -> QuantSite | str | None:
    """The site for a matmul or conv, the reason it is refused, or None for other ops."""
    if node.op not in ("matmul", "conv"):
        return None
    if _excluded(node, exclude):
        return "excluded from quantization by the caller"
    dt = node.inputs[0].type.dtype
    if dt != "f32":
        return f"dtype {dt}: insert-qdq quantizes f32 layers only"
    return _match_matmul(graph, node) if node.op == "matmul" else _match_conv(node)


def plan_qdq(graph: Graph, exclude: Collection[str] = (), log: PassLog | None = None) -> list[QuantSite]:
    """Every matmul/conv that insert-qdq would quantize, in graph order; refusals go to ``log``."""
    sites = []
    for node in graph.nodes:
        m = match_site(graph, node, exclude)
        if isinstance(m, QuantSite):
            sites.append(m)
        elif isinstance(m, str) and log is not None:
            log.refuse(_node_label(node), m)
    return sites


def _check_fixed(fixed: Mapping[str, QParams]) -> dict[str, QParams]:
    """The caller's (scale, zero point) pairs, validated, the scale rounded to float32 as it will be stored."""
    lo, hi = QRANGE[ACT_DTYPE]
    out = {}
    for name, (scale, zp) in fixed.items():
        if not (math.isfinite(scale) and scale > 0) or int(zp) != zp or not lo <= int(zp) <= hi:
            raise ValueError(f"fixed quantization parameters for %{name}: expected a finite scale > 0 and an "
                             f"integer zero point in [{lo}, {hi}], got ({scale}, {zp})")
        out[name] = (float(np.float32(scale)), int(zp))
    return out


@dataclass
class _Rewriter:
    """Builds the QDQ nodes and constants into ``graph``, sharing a pair per activation and per weight."""

    graph: Graph
    per_channel: bool
    qparams: dict[str, QParams]
    act_dq: dict[str, Value] = field(default_factory=dict)
    weight_dq: dict[tuple[str, int], tuple[Value, np.ndarray]] = field(default_factory=dict)
    replaced: list[Value] = field(default_factory=list)

    def const(self, array: np.ndarray, hint: str) -> Value:
        return self.graph.add_constant(array, self.graph.fresh_name(hint))

    def node(self, op: str, ins: list[Value | None], attrs: dict[str, Any], hint: str, before: Node) -> Value:
        name = self.graph.fresh_name(hint)
        return self.graph.add_node(op, ins, attrs, before=before, name=name, out_names=[name]).output

    def activation(self, x: Value, before: Node) -> Value:
        """x.dq for x (created once, before the first layer that reads it)."""
        if x.name not in self.act_dq:
            scale, zp = self.qparams[x.name]
            s = self.const(np.array(scale, np.float32), f"{x.name}.scale")
            z = self.const(np.array(zp, np.int8), f"{x.name}.zero_point")
            q = self.node("quantize", [x, s, z], {"dtype": ACT_DTYPE}, f"{x.name}.q", before)
            self.act_dq[x.name] = self.node("dequantize", [q, s, z], {}, f"{x.name}.dq", before)
        return self.act_dq[x.name]

    def weight(self, w: Value, axis: int, before: Node) -> tuple[Value, np.ndarray]:
        """W.dq for constant W quantized per channel along ``axis`` (or per tensor), and its f32 scale."""
        key = (w.name, axis if self.per_channel else -1)
        if key not in self.weight_dq:
            ax = axis if self.per_channel else None
            scale, zp = symmetric_weight_qparams(w.const, ax, WEIGHT_BITS)
            q = self.const(quantize_symmetric(w.const, scale, ax, WEIGHT_BITS), f"{w.name}.q")
            s, z = self.const(scale, f"{w.name}.scale"), self.const(zp, f"{w.name}.zero_point")
            dq = self.node("dequantize", [q, s, z], {"axis": axis}, f"{w.name}.dq", before)
            self.weight_dq[key] = (dq, scale)
            self.replaced.append(w)
        return self.weight_dq[key]

    def bias(self, b: Value, sx: float, sw: np.ndarray, before: Node) -> Value | str:
        """b.dq: i32 codes round(b / (sx*sw)) (float64) with scale sx*sw in f32, or why b stays float."""
        scale = (np.float32(sx) * sw).astype(np.float32)
        if scale.ndim == 0:
            scale = np.full(b.type.shape, scale, np.float32)
        info = np.iinfo(np.int32)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.round(b.const.astype(np.float64) / scale.astype(np.float64))
        if not (scale > 0).all() or not (np.abs(codes) <= info.max).all():
            return (f"bias %{b.name} left float: its codes b / (sx*sw) do not fit int32 "
                    f"(smallest scale {float(scale.min()):g})")
        q = self.const(codes.astype(np.int32), f"{b.name}.q")
        s = self.const(scale, f"{b.name}.scale")
        self.replaced.append(b)
        return self.node("dequantize", [q, s], {"axis": 0}, f"{b.name}.dq", before)

    def drop_replaced(self) -> None:
        """Remove the float weights and biases that nothing reads any more."""
        for v in self.replaced:
            if self.graph.constants.get(v.name) is v and not v.uses and not any(v is o for o in self.graph.outputs):
                self.graph.remove_constant(v)


def _act_scale(x: Value, qparams: Mapping[str, QParams]) -> float | None:
    """The activation scale of x: its own, or the constant scalar scale of the dequantize that made it."""
    if x.name in qparams:
        return qparams[x.name][0]
    if _dequantized(x):
        s = x.producer.inputs[1]
        if s is not None and s.is_const and s.const.size == 1:
            return float(s.const.reshape(()))
    return None


def insert_qdq(graph: Graph, calib: CalibrationSet | Any, *, method: str = "minmax", exclude: Iterable[str] = (),
               fixed: Mapping[str, QParams] | None = None, skip: Collection[str] = frozenset(),
               per_channel: bool = True, quantize_bias: bool = True,
               progress: Callable[[int, int], None] | None = None, log: PassLog | None = None,
               **calib_options: Any) -> tuple[Graph, list[QuantLayer]]:
    """A copy of ``graph`` with every matmul/conv in QDQ form (module docstring), and one QuantLayer per layer.

    ``calib`` is a CalibrationSet (or what ``as_calibration`` takes); ``method`` one of
    METHODS, with ``calib_options`` (bins, quantized_bins, percentile) passed to
    :func:`compute_ranges`.  Refusals go to ``log`` when given.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    g = graph.clone()
    skip = frozenset(skip)
    fixed_q = {k: v for k, v in _check_fixed(fixed or {}).items() if k not in skip}
    sites = plan_qdq(g, frozenset(exclude), log)
    operands = [s.node.inputs[i] for s in sites for i in s.acts]
    todo = list(dict.fromkeys(v.name for v in operands if v.name not in skip and v.name not in fixed_q))
    ranges = compute_ranges(g, as_calibration(calib), todo, method, progress=progress, **calib_options) if todo else {}
    qparams = dict(fixed_q)
    qparams.update({n: activation_qparams(lo, hi, ACT_DTYPE) for n, (lo, hi) in ranges.items()})
    rw = _Rewriter(g, per_channel, qparams)
    layers = [_rewrite(rw, s, skip, ranges, fixed_q, quantize_bias, log) for s in sites]
    rw.drop_replaced()
    return g, layers


def _source(v: Value, skip: Collection[str], fixed: Mapping[str, QParams]) -> str:
    if v.name in skip:
        return "skipped"
    if v.name in fixed:
        return "fixed"
    return "calibrated"


def _rewrite(rw: _Rewriter, site: QuantSite, skip: Collection[str], ranges: Mapping[str, Range],
             fixed: Mapping[str, QParams], quantize_bias: bool, log: PassLog | None) -> QuantLayer:
    """Put one site into QDQ form and describe it."""
    node = site.node
    ins = [node.inputs[i] for i in site.acts]
    sources = tuple(_source(v, skip, fixed) for v in ins)
    for i, v, src in zip(site.acts, ins, sources):
        if src != "skipped":
            rw.graph.set_input(node, i, rw.activation(v, node))
    first = node.inputs[0]
    layer: dict[str, Any] = {}
    notes = []
    if site.weight is not None:
        w = node.inputs[site.weight]
        axis = 1 if node.op == "matmul" else 0
        wdq, sw = rw.weight(w, axis, node)
        rw.graph.set_input(node, site.weight, wdq)
        layer["weight"] = w.name
        layer["weight_scheme"] = (f"i{WEIGHT_BITS} symmetric per-channel axis={axis}" if rw.per_channel
                                  else f"i{WEIGHT_BITS} symmetric per-tensor")
        sx = _act_scale(first, rw.qparams)
        owner = site.bias_add or node
        if quantize_bias and site.bias is not None:
            b = owner.inputs[site.bias]
            if sx is None:
                notes.append(f"bias %{b.name} left float: the scale of %{first.name} is not known")
            else:
                bdq = rw.bias(b, sx, sw, node)
                if isinstance(bdq, str):
                    notes.append(bdq)
                else:
                    rw.graph.set_input(owner, site.bias, bdq)
                    layer["bias"] = b.name
    else:
        layer["weight_scheme"] = "activation"
    if log is not None:
        what = f"{node.op}: " + ", ".join(f"%{v.name} {s}" for v, s in zip(ins, sources))
        what += (f"; weight %{layer['weight']} {layer['weight_scheme']}" if "weight" in layer else "")
        what += (f"; bias %{layer['bias']} i32" if "bias" in layer else "") + "".join(f"; {n}" for n in notes)
        log.rewrote(_node_label(node), what)
    return QuantLayer(
        node=_node_label(node), op=node.op, output=node.outputs[0].name, inputs=tuple(v.name for v in ins),
        act_qparams=tuple(None if s == "skipped" else rw.qparams[v.name] for v, s in zip(ins, sources)),
        act_source=sources, ranges=tuple(ranges.get(v.name) for v in ins), **layer)


@register_pass
@dataclass(frozen=True)
class InsertQDQ(Pass):
    """Static int8 QDQ on every matmul and conv, calibrated on ``calib`` (synthetic inputs when empty)."""

    name: ClassVar[str] = "insert-qdq"
    exact: ClassVar[bool] = False  # quantizes: changes the outputs by design
    method: str = "minmax"
    calib: str = ""
    samples: int = 16
    seed: int = 0
    per_channel: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        if not plan_qdq(graph, log=log):
            return graph
        calib = calibration_for(graph, self.calib, self.samples, self.seed)
        g, _ = insert_qdq(graph, calib, method=self.method, per_channel=self.per_channel, log=log)
        return g
