"""fuse-qlinear: the QDQ form of a quantized model rewritten into integer kernels (qmatmul, qconv, dq_matmul).

The QDQ form (the contract of insert-qdq and onnxruntime's quantize_static)
computes a quantized layer in float: ``matmul(dequantize(xq), dequantize(Wq))``
(+ ``dequantize(bq)``).  This pass replaces each such layer by one op of
ir/ops/quant.py that reads the codes and multiplies integers:

* ``matmul(dequantize(a8, sa, za), dequantize(b8, sb, zb))`` (optionally followed
  by ``add(., dequantize(bq i32, sb_bias))``) -> ``qmatmul(a8, sa, za, b8, sb, zb, bq)``;
  b per tensor or per output column (axis -1 of a 2-D weight), or an activation
  (Q.K^T, A.V: per tensor, batch dims);
* ``conv(dequantize(x8), dequantize(W8){axis=0}, dequantize(bq i32)?)`` -> ``qconv``
  (1-D and 2-D convs: the ones with an integer kernel);
* ``matmul(a, dequantize(Wq const){axis, block_size})`` with a float ``a`` (or a
  weight too coarse or fine for qmatmul: blocked, 4-bit) -> ``dq_matmul``
  (weight-only: w4a16 / w8a16, GPTQ / AWQ groups).

The fused op takes the name of the value it replaces (the matmul's, or the bias
add's), so reports still name layers by the float model's names.  Dequantize
nodes the site no longer needs are removed; constants are left to ``dce``.

Refused (the reason is logged, the site left as it is): codes that are not
8-bit (qmatmul/qconv); an activation scale that is not per tensor; a weight
scale on another axis than the output channels, or blocked; a bias whose codes
are not i32, that has a nonzero zero point, or whose scale is not
``a_scale * w_scale`` within float rounding (or cannot be checked because a
scale is not constant); a dequantize to another dtype than f32; a 3-D or
higher conv; a weight-only weight that is not a constant 2-D code matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import to_numpy_dtype
from kiln.passes.manager import PassLog, RewritePass, register_pass

__all__ = ["FuseQLinear", "QLinearSite", "BIAS_SCALE_RTOL"]

CODES8 = ("i8", "u8")
WEIGHT_ONLY_CODES = ("i4", "u4", "i8", "u8")
# bias scale == a_scale * w_scale "within float rounding": the product is rounded to f32 once
BIAS_SCALE_RTOL = 2.0 ** -21


@dataclass(frozen=True)
class QLinearSite:
    """A matmul / conv that reads dequantized operands: what it becomes and the nodes it absorbs."""

    node: Node
    kind: str  # "qmatmul", "qconv" or "dq_matmul"
    act: Node | None  # the activation dequantize (qmatmul, qconv)
    weight: Node  # the weight (or right operand) dequantize
    bias_add: Node | None = None
    bias: Node | None = None  # the i32 bias dequantize

    @property
    def exit(self) -> Value:
        """The value the fused op replaces."""
        return (self.bias_add or self.node).outputs[0]


def _dq(v: Value | None) -> Node | None:
    """The dequantize node producing ``v``, if any."""
    return v.producer if v is not None and v.producer is not None and v.producer.op == "dequantize" else None


def _codes(n: Node) -> Value:
    return n.inputs[0]


def _param(n: Node, i: int) -> Value | None:
    return n.inputs[i] if len(n.inputs) > i else None


def _per_tensor(v: Value) -> bool:
    return v.type.rank == 0 or v.type.shape == (1,)


def _bias_of(graph: Graph, node: Node) -> tuple[Node | None, Node | None]:
    """For a matmul: the ``add`` of an i32 bias dequantize that alone reads its output; for a conv: operand 2's."""
    if node.op == "conv":
        return None, _dq(_param(node, 2))
    out = node.outputs[0]
    if len(out.uses) != 1 or any(out is o for o in graph.outputs):
        return None, None
    user = out.uses[0][0]
    if user.op != "add":
        return None, None
    other = user.inputs[1 - out.uses[0][1]]
    bias = _dq(other)
    if bias is None or _codes(bias).type.dtype != "i32":
        return None, None
    return user, bias


def match_site(graph: Graph, node: Node) -> QLinearSite | None:
    """A matmul / conv whose right operand is a dequantize (structure only)."""
    if node.op not in ("matmul", "conv") or len(node.inputs) < 2:
        return None
    weight = _dq(node.inputs[1])
    if weight is None:
        return None
    act = _dq(node.inputs[0])
    eight_bit = _codes(weight).type.dtype in CODES8 and not weight.attrs.get("block_size")
    if node.op == "conv":
        _, bias = _bias_of(graph, node)
        return QLinearSite(node, "qconv", act, weight, None, bias)
    if act is not None and eight_bit:
        add, bias = _bias_of(graph, node)
        return QLinearSite(node, "qmatmul", act, weight, add, bias)
    return QLinearSite(node, "dq_matmul", None, weight)


def _act_reason(act: Node | None, what: str) -> str | None:
    """An activation dequantize fit for integer arithmetic: 8-bit codes, one f32 scale."""
    if act is None:
        return f"{what} is not a dequantize (a float activation: no integer kernel)"
    codes, scale = _codes(act), act.inputs[1]
    if codes.type.dtype not in CODES8:
        return f"{what} %{codes.name} has {codes.type.dtype} codes; integer kernels take i8 or u8"
    if scale.type.dtype != "f32":
        return f"{what} dequantizes to {scale.type.dtype}; integer kernels produce f32"
    if not _per_tensor(scale) or act.attrs.get("block_size"):
        return f"{what} scale %{scale.name} is {scale.type}, not per tensor (one scale for the whole activation)"
    return None


def _weight_reason(site: QLinearSite) -> str | None:
    """The right operand: 8-bit codes, one scale per tensor or per output channel."""
    w = site.weight
    codes, scale = _codes(w), w.inputs[1]
    if codes.type.dtype not in CODES8:
        return f"weight %{codes.name} has {codes.type.dtype} codes; integer kernels take i8 or u8"
    if scale.type.dtype != "f32":
        return f"weight dequantize gives {scale.type.dtype}; integer kernels produce f32"
    if _per_tensor(scale):
        return None
    rank, axis = codes.type.rank, w.attrs.get("axis", 1)
    out_axis = 0 if site.kind == "qconv" else rank - 1
    if site.kind == "qmatmul" and rank != 2:
        return f"right operand %{codes.name} is {codes.type} with per-axis scale: only a 2-D weight may be per column"
    if axis % rank != out_axis:
        return (f"weight scale %{scale.name} is per axis {axis % rank} of {codes.type}; the integer kernel "
                f"needs it per output channel (axis {out_axis})")
    return None


def _const(v: Value | None) -> np.ndarray | None:
    return None if v is None else v.const


def _bias_reason(site: QLinearSite) -> str | None:
    """The i32 bias: no zero point, a scale equal to a_scale * w_scale within f32 rounding."""
    b = site.bias
    if b is None:
        return None
    codes, scale, zp = _codes(b), b.inputs[1], _param(b, 2)
    if codes.type.dtype != "i32":
        return f"bias %{codes.name} has {codes.type.dtype} codes, not i32"
    if zp is not None and (zp.const is None or np.any(zp.const != 0)):
        return f"bias dequantize has zero point %{zp.name}; an int32 bias has none"
    n = site.node.outputs[0].type.shape[1 if site.kind == "qconv" else -1]
    if codes.type.shape != (n,):
        return f"bias %{codes.name} is {codes.type}, not one value per output channel [{n}]"
    sb, sa, sw = _const(scale), _const(site.act.inputs[1]), _const(site.weight.inputs[1])
    if sb is None or sa is None or sw is None:
        missing = [v.name for v, c in ((scale, sb), (site.act.inputs[1], sa), (site.weight.inputs[1], sw)) if c is None]
        return f"cannot check the bias scale against a_scale * w_scale: {', '.join('%' + m for m in missing)} not constant"
    want = sa.astype(np.float64).reshape(()) * sw.astype(np.float64).reshape(-1)
    got = np.broadcast_to(sb.astype(np.float64).reshape(-1), want.shape)
    bad = np.abs(got - want) > BIAS_SCALE_RTOL * np.abs(want)
    if np.any(bad):
        i = int(np.argmax(bad))
        return (f"bias scale %{scale.name} is not a_scale * w_scale: channel {i} has {got[i]:.9g}, "
                f"expected {want[i]:.9g}")
    return None


def _conv_reason(site: QLinearSite) -> str | None:
    node = site.node
    if node.inputs[0].type.rank > 4:
        return f"conv %{node.outputs[0].name} is {node.inputs[0].type.rank - 2}-D: integer kernels cover 1-D and 2-D"
    if len(node.inputs) > 2 and node.inputs[2] is not None and site.bias is None:
        return f"conv bias %{node.inputs[2].name} is not the dequantize of i32 codes"
    return None


def _weight_only_reason(site: QLinearSite) -> str | None:
    w = site.weight
    codes, scale = _codes(w), w.inputs[1]
    a = site.node.inputs[0]
    if codes.type.dtype not in WEIGHT_ONLY_CODES:
        return f"weight %{codes.name} has {codes.type.dtype} codes; weight-only kernels take i4, u4, i8 or u8"
    if codes.const is None:
        return f"weight codes %{codes.name} are not a constant"
    if codes.type.rank != 2:
        return f"weight %{codes.name} is {codes.type}; weight-only kernels take a 2-D [K, N] weight"
    if scale.type.dtype != "f32" or a.type.dtype != "f32":
        return f"weight-only kernels are f32: activation {a.type.dtype}, scale {scale.type.dtype}"
    return None


def _transpose_weight(graph: Graph, node: Node, log: PassLog) -> None:
    """``transpose(dequantize(W const){axis})`` of a 2-D weight read by matmuls (ONNX Gemm with transB, as lifted)
    -> ``dequantize(W^T){1 - axis}``: the codes, scale and zero point transposed at compile time."""
    if node.op != "transpose" or list(node.attrs.get("perm") or []) not in ([1, 0], []):
        return
    dq = _dq(node.inputs[0])
    out = node.outputs[0]
    if dq is None or out.type.rank != 2 or not out.uses or any(u.op != "matmul" for u in out.users):
        return
    params = [v for v in dq.inputs if v is not None]
    if any(v.const is None for v in params):
        return
    axis = dq.attrs.get("axis", 1) % 2
    arrays = [np.ascontiguousarray(v.const.T) if v.const.ndim == 2 else v.const for v in params]
    consts = [graph.add_constant(a, graph.fresh_name(f"{v.name}.T")) for v, a in zip(params, arrays)]
    graph.replace_keeping_names([out], [node], lambda names, before: [graph.add_node(
        "dequantize", consts, {"axis": 1 - axis, "block_size": dq.attrs.get("block_size", 0)},
        before=before, out_names=names).output])
    if not dq.outputs[0].uses and not any(dq.outputs[0] is o for o in graph.outputs):
        graph.remove(dq)
    log.rewrote(out.name, f"transposed weight %{params[0].name} quantized on axis {1 - axis}")


@register_pass
@dataclass(frozen=True)
class FuseQLinear(RewritePass):
    """QDQ matmul / conv -> qmatmul / qconv / dq_matmul (integer kernels); see the module docstring."""

    name: ClassVar[str] = "fuse-qlinear"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        for node in list(graph.nodes):
            if node.graph is graph:
                _transpose_weight(graph, node, log)
        return super().apply(graph, log)

    def match(self, graph: Graph, node: Node) -> QLinearSite | None:
        return match_site(graph, node)

    def where(self, m: QLinearSite) -> str:
        return m.exit.name

    def check(self, graph: Graph, m: QLinearSite) -> str | None:
        if m.kind == "dq_matmul":
            return _weight_only_reason(m)
        first = _conv_reason(m) if m.kind == "qconv" else None
        if m.kind == "qmatmul" and (m.node.inputs[0].type.rank < 2 or m.node.inputs[1].type.rank < 2):
            first = f"qmatmul needs operands of rank >= 2, got {m.node.inputs[0].type} and {m.node.inputs[1].type}"
        return (first or _act_reason(m.act, "the activation operand") or _weight_reason(m)
                or _bias_reason(m))

    def rewrite(self, graph: Graph, m: QLinearSite) -> str:
        operands = self._operands(graph, m)
        attrs = dict(m.node.attrs) if m.kind == "qconv" else \
            {k: m.weight.attrs[k] for k in ("axis", "block_size")} if m.kind == "dq_matmul" else {}
        dead = [m.node] + ([m.bias_add] if m.bias_add is not None else [])
        while operands and operands[-1] is None:
            operands.pop()
        graph.replace_keeping_names([m.exit], dead, lambda names, before: [
            graph.add_node(m.kind, operands, attrs, before=before, out_names=names).output])
        for dq in (m.bias, m.act, m.weight):
            if dq is not None and dq.graph is graph and not dq.outputs[0].uses \
                    and not any(dq.outputs[0] is o for o in graph.outputs):
                graph.remove(dq)
        return f"{m.node.op} -> {m.kind}" + (" (bias folded)" if m.bias is not None else "")

    def _operands(self, graph: Graph, m: QLinearSite) -> list[Value | None]:
        w = m.weight
        if m.kind == "dq_matmul":
            return [m.node.inputs[0], _codes(w), w.inputs[1], _param(w, 2)]
        act = m.act
        za = _param(act, 2)
        if za is None:
            codes = _codes(act)
            za = graph.add_constant(np.zeros((), to_numpy_dtype(codes.type.dtype)), graph.fresh_name(f"{codes.name}.zp"))
        bias = _codes(m.bias) if m.bias is not None else None
        return [_codes(act), act.inputs[1], za, _codes(w), w.inputs[1], _param(w, 2), bias]
