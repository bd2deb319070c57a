"""sink-views: move a view below the pointwise op that reads it, so an anchor's epilogue becomes adjacent.

Exporters put a view between an anchor and its epilogue: a Linear on a
[B, S, D] activation is lifted to ``reshape -> matmul [B·S, N] -> reshape``
and the bias, residual add or activation reads the reshape::

    %m = matmul(%x2, %w) : f32[16,64]
    %v = reshape(%m) {shape=[1, 16, 64]} : f32[1,16,64]
    %y = add(%v, %res) : f32[1,16,64]

View ops are never in a fused block (codegen runs them as zero-copy views),
so ``%y`` would be a kernel of its own.  This pass rewrites it to::

    %m = matmul(%x2, %w) : f32[16,64]
    %r2 = reshape(%res) {shape=[16, 64]} : f32[16,64]
    %y' = add(%m, %r2) : f32[16,64]
    %y = reshape(%y') {shape=[1, 16, 64]} : f32[1,16,64]

and ``fuse-blocks`` then makes ``matmul + add`` one kernel.

Why it is exact: every view op (reshape, flatten, squeeze, unsqueeze,
identity) keeps the elements in row-major order and only renames their
indices, and a pointwise op computes each output element from the operand
elements at the same index.  So ``f(view(a), b) = view(f(a, b'))`` whenever
``b'`` broadcast to ``a``'s shape is ``b`` broadcast to the view's shape,
re-indexed the same way.  Such a ``b'`` exists when, for every group of
source dims the view merges or splits into a group of output dims (the
"segments": minimal runs whose sizes multiply to the same number), ``b``
either broadcasts over the whole group (size 1 there) or has the group's full
extent; ``b'`` is then ``b`` reshaped (a view, or a reshaped constant).  The
same elements meet the same operation, so the result is bit-identical.

Rewritten: a pointwise node (registry fusion kind elementwise or broadcast,
one output, numpy broadcasting - ``batch_norm``'s per-channel operands are
not) whose operand is a chain of views (each read only by the next) of a
compute node's output that only the chain reads, the operand having the
node's output shape (the view operand is not itself broadcast).  Refused,
with the reason: symbolic or zero-size shapes; another operand that
broadcasts over only part of a merged or split dim; a node whose type rule
gives another shape on the view's source.  The rewritten node's output keeps
its name (now the sunk view's), so graph outputs and downstream names
survive; chains (bias, then activation, then residual add) sink one node at a
time in graph order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.registry import FusionKind, get_op, is_view
from kiln.ir.types import TensorType

from .manager import RewritePass, register_pass

__all__ = ["SinkViews", "ViewSink", "broadcast_through_view", "segments"]

# Pointwise ops whose operands do not broadcast numpy-style (batch_norm reads [C] along axis 1).
_NOT_NUMPY_BROADCAST = frozenset({"batch_norm"})
_POINTWISE = frozenset({FusionKind.ELEMENTWISE, FusionKind.BROADCAST})


def segments(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal groups (src dims, dst dims) of equal size that a row-major reshape src -> dst maps onto each other.

    Size-1 dims belong to no group.  None when the sizes differ or a dim is 0.
    """
    if 0 in src or 0 in dst or math.prod(src) != math.prod(dst):
        return None
    a = [k for k, d in enumerate(src) if d != 1]
    r = [k for k, d in enumerate(dst) if d != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a):
        ia, jr = [a[i]], [r[j]]
        pa, pr = src[a[i]], dst[r[j]]
        i, j = i + 1, j + 1
        while pa != pr:
            if pa < pr:
                pa *= src[a[i]]
                ia.append(a[i])
                i += 1
            else:
                pr *= dst[r[j]]
                jr.append(r[j])
                j += 1
        out.append((ia, jr))
    return out


def broadcast_through_view(operand: Sequence[int], src: Sequence[int], dst: Sequence[int]) -> tuple[int, ...] | str:
    """The shape b' (rank of ``src``) with ``broadcast(b', src)`` viewed as ``dst`` = ``broadcast(b, dst)``.

    ``operand`` is b's shape (it broadcasts to ``dst``); b' is ``b`` reshaped.
    A string says why there is none.
    """
    if len(operand) > len(dst):
        return f"it has rank {len(operand)}, above the view's {len(dst)}"
    padded = (1,) * (len(dst) - len(operand)) + tuple(operand)
    if any(b not in (1, d) for b, d in zip(padded, dst)):
        return f"shape {list(operand)} does not broadcast to {list(dst)}"
    segs = segments(src, dst)
    if segs is None:
        return f"the view {list(src)} -> {list(dst)} is not a reshape of nonzero dims"
    out = [1] * len(src)
    for ia, jr in segs:
        full = [padded[j] != 1 for j in jr]
        if all(full):
            for i in ia:
                out[i] = src[i]
        elif any(full):
            return (f"shape {list(operand)} broadcasts over part of the dims {[dst[j] for j in jr]} "
                    f"that the view makes from {[src[i] for i in ia]}")
    return tuple(out)


@dataclass(frozen=True)
class ViewSink:
    """A pointwise ``node`` whose operand ``index`` is ``source`` through a chain of ``views`` (last first)."""

    node: Node
    index: int
    views: tuple[Node, ...]
    source: Value


def _fmt(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _static(shape: Sequence[object]) -> bool:
    return all(isinstance(d, int) for d in shape)


def _as_view_of(graph: Graph, b: Value, shape: tuple[int, ...], before: Node | None) -> Value:
    """``b`` as the operand of shape ``shape``: itself when it already broadcasts so, else a reshaped constant
    or a reshape node (of the source of ``b``'s own views: a chain of views is one reshape)."""
    own = tuple(b.type.shape)
    if len(own) <= len(shape) and (1,) * (len(shape) - len(own)) + own == shape:
        return b
    if b.const is not None:
        return graph.add_constant(np.reshape(b.const, shape), graph.fresh_name(f"{b.name}.view"))
    src = b
    while src.producer is not None and is_view(src.producer.op) and src.producer.inputs[0] is not None:
        src = src.producer.inputs[0]
    if tuple(src.type.shape) == shape:
        return src
    return graph.add_node("reshape", [src], {"shape": list(shape), "allowzero": 0}, before=before,
                          out_names=[graph.fresh_name(f"{b.name}.view")]).output


@register_pass
@dataclass(frozen=True)
class SinkViews(RewritePass):
    """``f(view(a), b) -> view(f(a, b'))`` for pointwise f (module docstring: when, and why it is exact)."""

    name: ClassVar[str] = "sink-views"

    def match(self, graph: Graph, node: Node) -> ViewSink | None:
        try:
            opdef = get_op(node.op)
        except KeyError:
            return None
        if opdef.fusion not in _POINTWISE or node.op in _NOT_NUMPY_BROADCAST or len(node.outputs) != 1:
            return None
        outs = {id(v) for v in graph.outputs}
        for i, v in enumerate(node.inputs):
            if v is None or v.type.shape != node.outputs[0].type.shape:
                continue
            chain: list[Node] = []
            src = v
            while (src.producer is not None and is_view(src.producer.op) and src.producer.inputs
                   and src.producer.inputs[0] is not None and len(src.uses) == 1 and id(src) not in outs):
                chain.append(src.producer)
                src = src.producer.inputs[0]
            if chain and src.producer is not None and len(src.uses) == 1 and id(src) not in outs:
                return ViewSink(node, i, tuple(chain), src)
        return None

    def where(self, m: ViewSink) -> str:
        return m.node.outputs[0].name

    def check(self, graph: Graph, m: ViewSink) -> str | None:
        src, dst = m.source.type.shape, m.node.outputs[0].type.shape
        if not (_static(src) and _static(dst)):
            return f"symbolic shape: the view {_fmt(src)} -> {_fmt(dst)} cannot be checked"
        if 0 in src or 0 in dst:
            return "zero-size tensor"
        for j, b in enumerate(m.node.inputs):
            if j == m.index or b is None:
                continue
            if not _static(b.type.shape):
                return f"operand %{b.name} has a symbolic shape {_fmt(b.type.shape)}"
            found = broadcast_through_view(tuple(b.type.shape), tuple(src), tuple(dst))
            if isinstance(found, str):
                return f"operand %{b.name}: {found}"
        return None

    def rewrite(self, graph: Graph, m: ViewSink) -> str:
        node = m.node
        src = tuple(m.source.type.shape)
        dst = tuple(node.outputs[0].type.shape)
        out = node.outputs[0]
        operands = list(node.inputs)
        op, attrs, loc, vloc = node.op, dict(node.attrs), node.name, m.views[0].name

        def build(names: list[str], before: Node | None) -> list[Value]:
            new_in: list[Value | None] = []
            for j, b in enumerate(operands):
                if j == m.index:
                    new_in.append(m.source)
                elif b is None:
                    new_in.append(None)
                else:
                    shape = broadcast_through_view(tuple(b.type.shape), src, dst)
                    assert not isinstance(shape, str), shape
                    new_in.append(_as_view_of(graph, b, shape, before))
            inner = graph.add_node(op, new_in, attrs, before=before, name=loc,
                                   out_names=[graph.fresh_name(f"{names[0]}.sunk")])
            want = TensorType(out.type.dtype, src)
            if inner.outputs[0].type != want:
                raise AssertionError(f"{op} on {src} typed {inner.outputs[0].type}, expected {want}")
            return [graph.add_node("reshape", [inner.outputs[0]], {"shape": list(dst), "allowzero": 0},
                                   before=before, name=vloc, out_names=names).output]

        graph.replace_keeping_names([out], [*m.views, node], build)
        what = "+".join(v.op for v in reversed(m.views))
        return f"{what} {list(src)} -> {list(dst)} sunk below {op}"

