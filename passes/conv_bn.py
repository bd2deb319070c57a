"""ConvBN folding: ``fold-conv-bn{mode=deploy|tune}`` (passes-math.md section 2; Efficient ConvBN, ICLR 2024).

A ``batch_norm`` (inference mode, channel axis 1) that reads the output of a
``conv``, a ``conv_transpose`` or a 2-D ``matmul`` (optionally followed by an
``add`` of a 1-D bias: Gemm/Linear as the lifter writes it) is merged into that
producer.  With c = γ / √(σ² + ε) per output channel:

    W' = W · c   along the weight's output-channel axis
    b' = β + c · (b − μ)            (b = 0 without a bias)

The output-channel axis is 0 for conv W[M, C/g, k…] and 1 for matmul B[in, out].
For conv_transpose W[C_in, M/g, k…] output channel m = gi·(M/g) + j, so W is
viewed as [g, C_in/g, M/g, k…] and scaled per (gi, j); a plain scale of axis 1
is right only for g = 1.

* ``mode=deploy`` (default): W, b and γ, β, μ, σ² must be constants; W' and b'
  are computed in float64, cast to the weight dtype and stored as new constants
  ``<producer output>.w_folded`` / ``.b_folded`` (a weight that other nodes also
  read is copied, not changed).
* ``mode=tune``: W' and b' are emitted as graph ops in front of the producer,
  ``c = γ · reciprocal(sqrt(σ² + ε))``, ``W' = W · reshape(c)``,
  ``b' = β + c · (b − μ)`` (computed in f32 for f16/bf16 graphs), so the
  parameters may be graph inputs (a graph compiled for fine-tuning).  This is
  the Eval function up to float rounding, and constant folding it
  (``canonicalize``) gives the Deploy constants.  The subgraph is emitted even
  when every operand is constant: ``fold-conv-bn{mode=tune},canonicalize``
  then is Deploy computed by the graph's own ops.

The folded producer takes the batch_norm's output name, so graph outputs and
downstream names survive.  Constants that only the folded site read are
removed by the pass; other dead code is left to ``dce``.

Refused (the reason goes to the log, the site is left as it is):

* the producer's output, or the bias add's, has another user or is a graph output;
* a dtype that is not float;
* matmul: a weight that is not 2-D [in, out], an output that is not 2-D [N, C]
  (batch_norm's axis 1 would not be the weight's output-channel axis), or an
  ``add`` whose other operand is not one value per channel ([C], [1, C] as ONNX
  Gemm allows, or a scalar);
* conv_transpose with group > 1 and a symbolic M/g (its reshape needs the size);
* ``mode=deploy`` with operands that are not constants (each is named; mode=tune folds them).

Training-mode batch norm never reaches this pass: kiln's ``batch_norm`` is
inference-only, and the lifter refuses ONNX BatchNormalization with
``training_mode=1`` or with its running/saved statistics outputs used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import FLOAT_DTYPES, Dim, TensorType, to_numpy_dtype
from kiln.passes.manager import RewritePass, register_pass

__all__ = ["MODES", "ConvBN", "FoldConvBN"]

MODES = ("deploy", "tune")
CONV_OPS = ("conv", "conv_transpose")
PARAM_ROLES = ("scale", "bias", "mean", "var")


@dataclass(frozen=True)
class ConvBN:
    """One candidate site: the batch_norm, its producer and, for matmul, the bias add and bias between them."""

    bn: Node
    producer: Node
    bias_add: Node | None = None
    bias: Value | None = None

    @property
    def weight(self) -> Value:
        return self.producer.inputs[1]

    @property
    def params(self) -> tuple[Value, ...]:
        """γ, β, μ, σ² of the batch_norm."""
        return tuple(self.bn.inputs[1:5])

    @property
    def chain(self) -> list[Node]:
        """The nodes the fold replaces, in graph order."""
        return [self.producer, *([self.bias_add] if self.bias_add is not None else []), self.bn]


def match_conv_bn(node: Node) -> ConvBN | None:
    """A batch_norm fed by conv, conv_transpose, matmul or matmul + add (structure only)."""
    if node.op != "batch_norm" or node.inputs[0] is None:
        return None
    src = node.inputs[0].producer
    if src is None:
        return None
    if src.op in CONV_OPS:
        return ConvBN(node, src, bias=src.inputs[2] if len(src.inputs) > 2 else None)
    if src.op == "matmul":
        return ConvBN(node, src)
    if src.op == "add":
        for i, v in enumerate(src.inputs):
            if v is not None and v.producer is not None and v.producer.op == "matmul":
                return ConvBN(node, v.producer, src, src.inputs[1 - i])
    return None


def _describe(v: Value) -> str:
    """Where a non-constant operand comes from, for refusal messages."""
    return "a graph input" if v.producer is None else f"computed by {v.producer.op}"


def _dtype_reason(m: ConvBN) -> str | None:
    """Only float convs and norms are folded."""
    dt = m.bn.inputs[0].type.dtype
    return None if dt in FLOAT_DTYPES else f"dtype {dt} is not a float type"


def _single_use_reason(graph: Graph, m: ConvBN) -> str | None:
    """Every value the fold removes must feed only the next node of the chain."""
    chain = m.chain
    for node, nxt in zip(chain, chain[1:]):
        out = node.outputs[0]
        if any(out is g for g in graph.outputs):
            return f"%{out.name} ({node.op} output) is a graph output; folding would change it"
        others = [u for u in out.users if u is not nxt]
        if others:
            return (f"%{out.name} ({node.op} output) is also used by {others[0].op} "
                    f"%{others[0].outputs[0].name}; folding would change what it reads")
    return None


def _per_channel(t: TensorType, m: Dim) -> bool:
    """A bias that adds one value per output channel to an [N, m] matmul: [m], [1, m], [1], [1, 1] or []."""
    return t.rank <= 2 and all(d == 1 for d in t.shape[:-1]) and (t.rank == 0 or t.shape[-1] in (1, m))


def _shape_reason(m: ConvBN) -> str | None:
    """The producer's output channels must be batch_norm's axis 1 and the weight layout one we can scale."""
    w, out = m.weight.type, m.producer.outputs[0].type
    if m.producer.op == "matmul":
        if w.rank != 2:
            return f"matmul weight %{m.weight.name} is {w}; only a 2-D [in, out] weight is folded"
        if out.rank != 2:
            return (f"channel axis mismatch: batch_norm normalizes axis 1 of {out}, the matmul's output "
                    f"channels are its last axis (only a 2-D [N, C] output has them on axis 1)")
        if m.bias is not None and not _per_channel(m.bias.type, w.shape[1]):
            return (f"the add after the matmul is not a per-channel bias: %{m.bias.name} is {m.bias.type}, "
                    f"not [{w.shape[1]}], [1, {w.shape[1]}] or a scalar")
    if m.producer.op == "conv_transpose" and m.producer.attrs.get("group", 1) > 1 \
            and not isinstance(w.shape[1], int):
        return f"conv_transpose weight {w} has a symbolic M/group; its per-group reshape needs the size"
    return None


def _constant_reason(m: ConvBN) -> str | None:
    """Deploy needs every operand of W' and b' to be a constant."""
    roles = [(f"{m.producer.op} weight", m.weight), (f"{m.producer.op} bias", m.bias)]
    roles += [(f"batch_norm {r}", p) for r, p in zip(PARAM_ROLES, m.params)]
    bad = [f"{role} %{v.name} is {_describe(v)}" for role, v in roles if v is not None and not v.is_const]
    if not bad:
        return None
    return f"mode=deploy needs constant operands, but {'; '.join(bad)}; mode=tune folds them as graph ops"


def _layout(m: ConvBN) -> tuple[list[int] | None, list[int] | None]:
    """How to scale W by c: the view of W (None: as is) and the shape of c that broadcasts against it."""
    w = m.weight.type
    k = [1] * (w.rank - 2)
    if m.producer.op == "matmul":
        return None, None
    if m.producer.op == "conv":
        return None, [-1, 1, *k]
    group = int(m.producer.attrs.get("group", 1))
    if group == 1:
        return None, [1, -1, *k]
    mg = int(w.shape[1])
    return [group, -1, mg, *(int(d) for d in w.shape[2:])], [group, 1, mg, *k]


def _deploy_constants(graph: Graph, m: ConvBN, base: str) -> tuple[Value, Value]:
    """W' and b' computed in float64 from the constants, cast back, as new constants."""
    gamma, beta, mean, var = (p.const.astype(np.float64) for p in m.params)
    c = gamma / np.sqrt(var + float(m.bn.attrs["epsilon"]))
    w = m.weight.const
    view, cshape = _layout(m)
    w64 = w.astype(np.float64)
    wv = w64.reshape(view) if view else w64
    wf = (wv * (c.reshape(cshape) if cshape else c)).reshape(w.shape)
    b = m.bias.const.astype(np.float64).reshape(-1) if m.bias is not None else 0.0
    bf = beta + c * (b - mean)
    out_dtype = m.bn.outputs[0].type.np_dtype
    return (graph.add_constant(wf.astype(w.dtype), graph.fresh_name(f"{base}.w_folded")),
            graph.add_constant(bf.astype(out_dtype), graph.fresh_name(f"{base}.b_folded")))


def _tune_ops(graph: Graph, m: ConvBN, base: str, before: Node | None) -> tuple[Value, Value]:
    """W' and b' as graph ops placed before ``before``, widened to f32 for half-precision graphs."""
    dt = m.bn.outputs[0].type.dtype
    cdt = "f64" if dt == "f64" else "f32"

    def emit(op: str, *ins: Value, hint: str, **attrs) -> Value:
        return graph.add_node(op, list(ins), attrs, before=before, out_names=[graph.fresh_name(f"{base}.{hint}")]).output

    def widen(v: Value) -> Value:
        return v if v.type.dtype == cdt else emit("cast", v, hint=f"{v.name}.{cdt}", to=cdt)

    def narrow(v: Value, hint: str) -> Value:
        return v if cdt == dt else emit("cast", v, hint=hint, to=dt)

    gamma, beta, mean, var = (widen(p) for p in m.params)
    eps = graph.add_constant(np.array(m.bn.attrs["epsilon"], to_numpy_dtype(cdt)), graph.fresh_name(f"{base}.eps"))
    inv_std = emit("reciprocal", emit("sqrt", emit("add", var, eps, hint="var_eps"), hint="std"), hint="inv_std")
    c = emit("mul", gamma, inv_std, hint="bn_scale")
    w_last, b_last = ("w_folded", "b_folded") if cdt == dt else ("w_wide", "b_wide")
    view, cshape = _layout(m)
    w = widen(m.weight)
    if view:
        w = emit("reshape", w, hint="w_grouped", shape=view)
    wf = emit("mul", w, emit("reshape", c, hint="bn_scale_w", shape=cshape) if cshape else c,
              hint="w_scaled" if view else w_last)
    if view:
        wf = emit("reshape", wf, hint=w_last, shape=[-1, *(int(d) for d in m.weight.type.shape[1:])])
    if m.bias is not None:
        b = widen(m.bias)
        if b.type.rank != 1:
            b = emit("reshape", b, hint="b_flat", shape=[-1])
        bf = emit("add", beta, emit("mul", c, emit("sub", b, mean, hint="b_centered"), hint="b_shift"), hint=b_last)
    else:
        bf = emit("sub", beta, emit("mul", c, mean, hint="b_shift"), hint=b_last)
    return narrow(wf, "w_folded"), narrow(bf, "b_folded")


def _emit_producer(graph: Graph, m: ConvBN, w: Value, b: Value, name: str, before: Node | None) -> Value:
    """The producer again with W' and b' (matmul: matmul + add), its result named ``name``."""
    p = m.producer
    if p.op != "matmul":
        return graph.add_node(p.op, [p.inputs[0], w, b], dict(p.attrs), before=before, name=p.name,
                              out_names=[name]).output
    mm = graph.add_node("matmul", [p.inputs[0], w], before=before, name=p.name,
                        out_names=[graph.fresh_name(p.outputs[0].name)]).output
    add_name = m.bias_add.name if m.bias_add is not None else m.bn.name
    return graph.add_node("add", [mm, b], before=before, name=add_name, out_names=[name]).output


def _drop_orphans(graph: Graph, values: list[Value | None]) -> None:
    """Remove the constants among ``values`` that nothing reads any more."""
    for v in values:
        if v is not None and graph.constants.get(v.name) is v and not v.uses \
                and not any(v is o for o in graph.outputs):
            graph.remove_constant(v)


@register_pass
@dataclass(frozen=True)
class FoldConvBN(RewritePass):
    """Fold an inference batch_norm into the conv, conv_transpose or matmul (+ bias) that feeds it."""

    name: ClassVar[str] = "fold-conv-bn"
    mode: str = "deploy"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'deploy' or 'tune', got {self.mode!r}")

    def match(self, graph: Graph, node: Node) -> ConvBN | None:
        return match_conv_bn(node)

    def where(self, m: ConvBN) -> str:
        return m.bn.outputs[0].name

    def check(self, graph: Graph, m: ConvBN) -> str | None:
        return (_dtype_reason(m) or _single_use_reason(graph, m) or _shape_reason(m)
                or (_constant_reason(m) if self.mode == "deploy" else None))

    def rewrite(self, graph: Graph, m: ConvBN) -> str:
        base, producer = m.producer.outputs[0].name, m.producer.op
        old = [m.weight, m.bias, *m.params]
        shared = self.mode == "deploy" and len(m.weight.users) > 1
        made: list[Value] = []

        def build(names: list[str], before: Node | None) -> list[Value]:
            if self.mode == "deploy":
                w, b = _deploy_constants(graph, m, base)
            else:
                w, b = _tune_ops(graph, m, base, before)
            made.extend((w, b))
            return [_emit_producer(graph, m, w, b, names[0], before)]

        n_before = len(graph.nodes)
        graph.replace_keeping_names([m.bn.outputs[0]], m.chain, build)
        _drop_orphans(graph, old)
        if self.mode == "deploy":
            what = f"batch_norm folded into {producer} (deploy): constants %{made[0].name}, %{made[1].name}"
        else:
            ops = len(graph.nodes) - n_before + len(m.chain) - (2 if producer == "matmul" else 1)
            what = f"batch_norm folded into {producer} (tune): {ops} weight-side ops make %{made[0].name}, %{made[1].name}"
        return what + (f"; weight %{m.weight.name} is shared, so it was copied" if shared else "")
