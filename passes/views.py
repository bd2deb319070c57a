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

from .manager import Pass, PassLog, RewritePass, register_pass

__all__ = ["HoistViews", "SinkViews", "ViewSink", "broadcast_through_view", "fold_transposes", "hoist_split_views",
           "segments"]

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



# ================================================================== hoist-views

# Readers that take a slice as an inlined producer in their fused block (fuse-blocks phase 1).
_SLICE_READERS = frozenset({FusionKind.ELEMENTWISE, FusionKind.BROADCAST, FusionKind.INJECTIVE})


def _nonones(shape: Sequence[int]) -> list[int]:
    return [d for d in shape if d != 1]


def _is_output(graph: Graph, v: Value) -> bool:
    return any(o is v for o in graph.outputs)


def _transpose_perm(node: Node) -> tuple[int, ...] | None:
    """A static ``transpose``'s permutation (an empty ``perm`` reverses the axes), else None."""
    if node.op != "transpose" or len(node.inputs) != 1 or node.inputs[0] is None:
        return None
    shape = node.inputs[0].type.shape
    if not _static(shape):
        return None
    perm = tuple(int(p) for p in node.attrs.get("perm") or ())
    return perm or tuple(reversed(range(len(shape))))


def _unit_view(node: Node) -> bool:
    """A view op of static shapes that only inserts or drops size-1 dims."""
    if not is_view(node.op) or not node.inputs or node.inputs[0] is None or len(node.outputs) != 1:
        return False
    src, dst = node.inputs[0].type.shape, node.outputs[0].type.shape
    return _static(src) and _static(dst) and _nonones(src) == _nonones(dst)


def fold_transposes(src: Sequence[int], steps: Sequence[tuple[str, tuple[int, ...]]]
                    ) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(view shape, perm) with ``transpose(reshape(x, view), perm)`` equal to ``steps`` applied to ``x``.

    ``steps`` are ``("transpose", perm)`` and ``("view", shape)`` with views that only insert or drop
    size-1 dims.  Such a chain moves the non-1 dims of ``x`` (a permutation) and places 1s; so does one
    reshape (the non-1 dims of ``x`` in order, 1s in front) then one transpose.  ``None`` for a part
    that is not needed: no perm when the non-1 dims keep their order (the chain is a reshape), no view
    when it would not change ``x``'s shape.  Both None: the chain is the identity.
    """
    labels: list[int | None] = []
    for d in src:
        labels.append(None if d == 1 else sum(1 for x in labels if x is not None))
    shape = list(src)
    for kind, arg in steps:
        if kind == "transpose":
            labels, shape = [labels[p] for p in arg], [shape[p] for p in arg]
        else:
            order = iter([x for x in labels if x is not None])
            labels, shape = [None if d == 1 else next(order) for d in arg], list(arg)
    moved = [x for x in labels if x is not None]
    if moved == sorted(moved):
        return (tuple(shape) if tuple(shape) != tuple(src) else None), None
    lead = len(shape) - len(moved)
    view = (1,) * lead + tuple(_nonones(src))
    ones = iter(range(lead))
    perm = tuple(next(ones) if x is None else lead + x for x in labels)
    return (view if view != tuple(src) else None), perm


def hoist_split_views(src: Sequence[int], axis: int, sizes: Sequence[int], views: Sequence[Sequence[int]]
                      ) -> tuple[tuple[int, ...], int, tuple[int, ...]] | str:
    """(shape, axis', sizes') with ``split(reshape(x, shape), axis', sizes')[k]`` = ``reshape(split(x)[k], views[k])``.

    Both sides are the same elements in row-major order when the views agree outside one axis a' and,
    with O/I the products of the dims before/after the split axis (O'/I' around a' in ``shape``),
    O = O' and every piece ``sizes[k]·I = views[k][a']·I'``: each piece is then the same run of
    ``sizes[k]·I`` elements of every outer row on both sides.  A string says why there is none.
    """
    outer, inner = math.prod(src[:axis]), math.prod(src[axis + 1:])
    rank = len(views[0])
    if any(len(v) != rank for v in views):
        return "the views of its outputs have different ranks"
    for a in range(rank):
        if any(tuple(v[:a]) + tuple(v[a + 1:]) != tuple(views[0][:a]) + tuple(views[0][a + 1:]) for v in views):
            continue
        new = tuple(v[a] for v in views)
        shape = tuple(views[0][:a]) + (sum(new),) + tuple(views[0][a + 1:])
        inner2 = math.prod(shape[a + 1:])
        if (math.prod(shape) == math.prod(src) and math.prod(shape[:a]) == outer
                and all(z * inner == n * inner2 for z, n in zip(sizes, new))):
            return shape, a, new
    return (f"the views {[list(v) for v in views]} of its outputs do not cut the split axis "
            f"{axis} of {list(src)} the same way")


def _reshape(graph: Graph, x: Value, shape: Sequence[int], before: Node | None, name: str) -> Value:
    return graph.add_node("reshape", [x], {"shape": list(shape), "allowzero": 0}, before=before,
                          out_names=[name]).output


@dataclass(frozen=True)
class TransposeChain:
    """A chain of transposes and size-1 views (first to last, each read only by the next) and its fold."""

    node: Node  # the last node
    nodes: tuple[Node, ...]
    source: Value
    view: tuple[int, ...] | None
    perm: tuple[int, ...] | None


@dataclass(frozen=True)
class _FoldTransposes(RewritePass):
    """``transpose``/size-1-view chains -> one view then one transpose (or a view alone)."""

    name: ClassVar[str] = "hoist-views"

    def match(self, graph: Graph, node: Node) -> TransposeChain | None:
        link = _transpose_perm(node) is not None or _unit_view(node)
        out = node.outputs[0] if node.outputs else None
        if not link or out is None or (len(out.uses) == 1 and not _is_output(graph, out)
                                       and _is_link(out.uses[0][0])):
            return None  # not a link, or not the chain's last one
        chain = [node]
        while True:
            x = chain[0].inputs[0]
            p = x.producer
            if p is None or not _is_link(p) or len(x.uses) != 1 or _is_output(graph, x):
                break
            chain.insert(0, p)
        if not any(n.op == "transpose" for n in chain):
            return None
        source = chain[0].inputs[0]
        steps = [("transpose", _transpose_perm(n)) if n.op == "transpose" else ("view", tuple(n.outputs[0].type.shape))
                 for n in chain]
        view, perm = fold_transposes(tuple(source.type.shape), steps)
        n_t = sum(1 for n in chain if n.op == "transpose")
        first_t = next(i for i, n in enumerate(chain) if n.op == "transpose")
        n_v = len(chain) - n_t
        canon_v = 1 if view is not None or perm is None else 0
        if n_t <= (perm is not None) and n_v <= canon_v and all(n.op == "transpose" for n in chain[first_t:]):
            return None  # already one view then one transpose
        return TransposeChain(node, tuple(chain), source, view, perm)

    def rewrite(self, graph: Graph, m: TransposeChain) -> str:
        out = m.node.outputs[0]
        shape = tuple(out.type.shape)

        def build(names: list[str], before: Node | None) -> list[Value]:
            if m.perm is None:
                return [_reshape(graph, m.source, shape, before, names[0])]
            x = m.source
            if m.view is not None:
                x = _reshape(graph, x, m.view, before, graph.fresh_name(f"{m.source.name}.view"))
            return [graph.add_node("transpose", [x], {"perm": list(m.perm)}, before=before,
                                   name=m.node.name, out_names=names).output]

        graph.replace_keeping_names([out], list(m.nodes), build)
        what = "+".join(n.op for n in m.nodes)
        into = ("reshape" if m.perm is None else
                ("reshape+" if m.view is not None else "") + f"transpose {list(m.perm)}")
        return f"{what} folded into {into}"


def _is_link(node: Node) -> bool:
    return _transpose_perm(node) is not None or _unit_view(node)


@dataclass(frozen=True)
class SplitViews:
    """A ``split`` whose every output is read by one view (``views[k]``) alone."""

    node: Node
    views: tuple[Node, ...]


@dataclass(frozen=True)
class _HoistSplitViews(RewritePass):
    """``reshape(split(x)[k])`` for every k -> ``split(reshape(x))[k]`` (:func:`hoist_split_views`)."""

    name: ClassVar[str] = "hoist-views"

    def match(self, graph: Graph, node: Node) -> SplitViews | None:
        if node.op != "split" or not node.inputs or node.inputs[0] is None:
            return None
        views = []
        for o in node.outputs:
            if len(o.uses) != 1 or _is_output(graph, o) or not is_view(o.uses[0][0].op):
                return None
            views.append(o.uses[0][0])
        return SplitViews(node, tuple(views))

    def check(self, graph: Graph, m: SplitViews) -> str | None:
        found = self._plan(m)
        return found if isinstance(found, str) else None

    def _plan(self, m: SplitViews) -> tuple[tuple[int, ...], int, tuple[int, ...]] | str:
        x = m.node.inputs[0]
        shapes = [tuple(v.outputs[0].type.shape) for v in m.views]
        if not _static(x.type.shape) or not all(_static(s) for s in shapes):
            return "symbolic shape"
        if 0 in x.type.shape:
            return "zero-size tensor"
        if any(len(v.outputs) != 1 for v in m.views):
            return "a view with several outputs"
        rank = len(x.type.shape)
        axis = int(m.node.attrs.get("axis", 0)) % rank
        sizes = tuple(int(s) for s in m.node.attrs["split"])
        return hoist_split_views(tuple(x.type.shape), axis, sizes, shapes)

    def rewrite(self, graph: Graph, m: SplitViews) -> str:
        plan = self._plan(m)
        assert not isinstance(plan, str), plan
        shape, axis, sizes = plan
        x = m.node.inputs[0]
        olds = [v.outputs[0] for v in m.views]

        def build(names: list[str], before: Node | None) -> list[Value]:
            viewed = _reshape(graph, x, shape, before, graph.fresh_name(f"{x.name}.view"))
            return graph.add_node("split", [viewed], {"axis": axis, "split": list(sizes)}, before=before,
                                  name=m.node.name, out_names=names).outputs

        graph.replace_keeping_names(olds, [m.node, *m.views], build, at_first=True)
        return f"{len(olds)} views of split outputs hoisted: split of {list(shape)} along axis {axis}"


@dataclass(frozen=True)
class _SplitToSlices(RewritePass):
    """``split(x)`` whose outputs each feed one pointwise/injective node -> one ``slice`` of ``x`` per output."""

    name: ClassVar[str] = "hoist-views"

    def match(self, graph: Graph, node: Node) -> Node | None:
        return node if node.op == "split" and node.inputs and node.inputs[0] is not None else None

    def check(self, graph: Graph, m: Node) -> str | None:
        if not _static(m.inputs[0].type.shape):
            return "symbolic shape"
        for o in m.outputs:
            if _is_output(graph, o):
                return f"%{o.name} is a graph output"
            if len(o.uses) != 1:
                return f"%{o.name} has {len(o.uses)} readers: the split stays one kernel"
            r = o.uses[0][0]
            try:
                kind = get_op(r.op).fusion
            except KeyError:
                kind = FusionKind.OPAQUE
            if is_view(r.op) or kind not in _SLICE_READERS or len(r.outputs) != 1:
                return f"%{o.name} is read by {r.op}, which does not take a slice into its kernel"
        return None

    def rewrite(self, graph: Graph, m: Node) -> str:
        x = m.inputs[0]
        axis = int(m.attrs.get("axis", 0)) % len(x.type.shape)
        sizes = [int(s) for s in m.attrs["split"]]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]

        def build(names: list[str], before: Node | None) -> list[Value]:
            return [graph.add_node("slice", [x], {"starts": [s], "ends": [s + z], "axes": [axis], "steps": [1]},
                                   before=before, name=m.name, out_names=[nm]).output
                    for nm, s, z in zip(names, starts, sizes)]

        graph.replace_keeping_names(list(m.outputs), [m], build, at_first=True)
        return f"split along axis {axis} into {len(sizes)} slices"


@register_pass
@dataclass(frozen=True)
class HoistViews(Pass):
    """Views move toward the sources so that the compute nodes after them meet in one kernel (all exact).

    1. A chain of transposes and views that only insert or drop size-1 dims (each value read only by
       the next link) becomes one view then one transpose (:func:`fold_transposes`), or one view when
       the non-1 dims keep their order: ``transpose(reshape(transpose(k)))``, the exporters' kT, is
       one transpose, and an identity reshape before a transpose disappears.
    2. A ``split`` whose every output is read by one view alone: the views move above it
       (:func:`hoist_split_views`), so the split's readers read its outputs directly.
    3. A ``split`` whose every output is read by one elementwise, broadcast or injective node (no view,
       no graph output): one ``slice`` per output, each of which fuses into its reader's kernel (GPT's
       fused q/k/v projection is read by the attention kernel directly, without a split kernel).

    Transposes and slices only move elements, so every rewrite is bit-exact.
    """

    name: ClassVar[str] = "hoist-views"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        for step in (_FoldTransposes(), _HoistSplitViews(), _SplitToSlices()):
            graph = step.apply(graph, log)
        return graph
