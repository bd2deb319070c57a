"""Fused attention: ``softmax(mask(scale · Q·Kᵀ)) · V`` as one CPU kernel, without the [Sq, Sk] score matrix.

:func:`match_attention` recognizes the node chain the frontends lift attention
to (graph order; float32, static shapes, rank 3 or 4, inner values read only
by the next node)::

    s = matmul(q, kT)                          [..., Sq, Sk]   (K already transposed)
    s = mul(s, c) | mul(c, s) | div(s, c)      optional, c a one-element constant
    s = where(m, fill, s) | where(m, s, fill)  optional, m bool, fill a one-element constant
      | add(s, m) | add(m, s)                  or an additive float mask (any value)
    p = softmax(s, axis=-1)
    p = where(is_nan(p), 0, p)                 optional: SDPA exports' guard of fully-masked rows
    o = matmul(p, v)                           [..., Sq, Dv]

Prologues: each of ``q``, ``kT`` and ``v`` may be made from an outside value
``x`` by ``slice`` (unit steps), ``transpose`` and at most one ``mul`` by a
one-element float32 constant, each read only by the next (any order; the
nodes are in the list in graph order, before their readers).  They join the
block and the kernel reads ``x`` through them (``AttentionSpec.q_perm``,
``q_offset``, ``q_scale`` …): no copy is made, and GPT's fused q/k/v
projection is read in place by slices of one head view.  A transpose of kT or
v must keep the last axis last (the kernel's vector loads run along it; see
``_CONTIGUOUS_ROLES``); q's may be any permutation.  The scale multiplies each
element as it is read, as the graph rounds it (``(q·c1)·(k·c2)``, never
``q·k·(c1·c2)``); q is read once per row tile into a local tile (``attn_q``),
so its prologue costs nothing in the inner loop, while a kT or v scale is
paid by every row tile and joins only while those are few
(``_SCALED_KV_MAX_TILES``).  Epilogue: a last ``transpose`` of the output
that keeps the last axis last (``out_perm``; attention's
``[B, H, S, D] -> [B, S, H, D]``) is the block's exit and the kernel writes
through it.

:func:`lower_attention` lowers it to one kernel with the parameters of a
:func:`~kiln.codegen.kernel.lower_block` kernel (the distinct outside values of
q, kT, v, [mask], then out).
Algorithm, for each (batch, head, tile of ``R`` query rows) - one task of a
parallel loop:

0. ``qt[r, d] = q[r, d]`` read through q's prologue into a local ``R × d`` tile;
1. ``dot[r, j] = Σ_d qt[r, d] · kT[d, j]`` for the tile's rows into a local
   ``R × Sk`` buffer (register tile: ``R`` rows × two vectors of ``j``,
   ``d`` outside the tile, a ``kT`` row loaded once per ``d`` for all rows);
2. ``x = mask(scale(dot))`` recomputed where it is read (a multiply and a
   select or add, in the graph's order), ``mx[r] = max_j x`` (identity -inf);
3. ``e[r, j] = fast_exp(x - mx[r])`` (the polynomial exp kiln's softmax
   uses), ``l[r] = Σ_j e`` (max and sum in vector partials), ``e`` local;
4. ``acc[r, c] = Σ_j e[r, j] · v[j, c]`` (register tile: ``R`` rows × two
   vectors of ``c``, ``j`` outside), then ``out = acc / l``.

Memory per task is ``2·R·Sk + R·Dv`` floats: the scores exist one row tile at
a time.  Ragged column loops carry TVM's loop-partition hint, so only their
last chunk is guarded (a guarded vector loop is otherwise scalarized).

Causal masks: when the mask is a constant whose rows end early - no live
column past ``i + off`` in row ``i``, "dead" meaning -inf or below
:data:`DEAD_BELOW` - the column loops of every stage stop at the tile's last
row + ``off`` (``AttentionSpec.causal_offset``): about half the work of a
causal mask is skipped, and the skipped weights are exactly 0 in the
interpreter too.

Numerics: dividing by ``l`` after the ``·V`` product instead of before it
reassociates the reference by one rounding per element.  A row whose max is
not finite (every entry masked with -inf) is NaN, as the interpreter's
``exp(-inf - -inf)`` (and kiln's unfused kernels) make it; with a finite fill
such a row is uniform, as in the interpreter.

The NaN guard (``torch.nn.functional.scaled_dot_product_attention`` exports
it: ``where(isnan(p), 0, p)``) joins the kernel as a select on the row: in the
interpreter a row of ``p`` has a NaN exactly when its max score is not finite
(every entry -inf, an entry +inf or NaN: ``max`` propagates NaN, ``inf - inf``
is NaN) and then the whole row is NaN, so the guard makes the row of ``p``
all zeros and the output row ``0 · V = 0``.  The guarded kernel reads a NaN
score as +inf (so such a row's max is +inf, whatever the vector max does with
NaN) and writes 0 where the row max is not finite: the same rows, the same
value (V finite, as everywhere in this kernel).  Other rows are untouched by
the guard in the interpreter too (a finite max makes every ``p`` finite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tvm import s_tir, te, tirx, topi
from tvm.s_tir import Schedule
from tvm.target import Target

from kiln.ir.graph import Node, Value

from .kernel import Kernel, KernelArg, static_shape
from .lowering import tvm_dtype
from .lowering.elementwise import Expr
from .target import num_cores, vector_lanes

__all__ = ["ATTENTION_ROW_TILE", "AttentionSpec", "attention_te", "lower_attention", "match_attention", "operands",
           "schedule_attention"]

# Query rows per task: the register tiles are ROWS x 2 vectors (8 accumulators
# of AVX2's 16 ymm), and 1x4x128 heads still give 4*128/4 = 128 tasks.
ATTENTION_ROW_TILE = 4
_DTYPE = "f32"


@dataclass(frozen=True)
class AttentionSpec:
    """A matched attention chain: its nodes by role, outside operands, scale and mask."""

    nodes: tuple[Node, ...]
    q: Value
    k_t: Value
    v: Value
    scale: float | None = None  # the one-element constant of the mul / div
    scale_op: str | None = None  # "mul" or "div" (x / c is kept a division, as the graph computes it)
    mask_kind: str | None = None  # "select" (where), "additive" (add) or None
    mask: Value | None = None  # the bool condition or the additive mask
    fill: float | None = None  # the where's constant branch
    fill_when: bool = True  # where(m, fill, x): fill where m is True; where(m, x, fill): where False
    causal_offset: int | None = None  # constant mask: row i reads no column past i + offset (see _causal_offset)
    nan_guard: bool = False  # p = where(is_nan(p), 0, p) before the second matmul: a non-finite row max gives 0
    # q / k_t / v read through a fused prologue (see Prologue): the matmul operand at logical index i is
    # x[j] = x[i[perm^-1 j] + offset[j]] (times the scale), x the outside value
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    q_offset: tuple[int, ...] | None = None  # per axis of the outside value: a fused slice's starts
    k_offset: tuple[int, ...] | None = None
    v_offset: tuple[int, ...] | None = None
    q_scale: float | None = None  # a fused mul by a one-element constant, applied to each element as read
    k_scale: float | None = None
    v_scale: float | None = None
    out_perm: tuple[int, ...] | None = None  # a fused transpose of the output (the block's exit)

    @property
    def out(self) -> Value:
        """The block's output (the second matmul's, or its fused transpose's)."""
        return self.nodes[-1].outputs[0]

    @property
    def qk(self) -> Node:
        """The first matmul (``q · kT``); prologue nodes are slices, transposes and muls."""
        return next(n for n in self.nodes if n.op == "matmul")

    @property
    def pv(self) -> Node:
        """The second matmul (``p · v``)."""
        return [n for n in self.nodes if n.op == "matmul"][1]

    @property
    def scores_shape(self) -> tuple[int, ...]:
        """Shape of the scores the kernel never materializes: [..., Sq, Sk]."""
        return static_shape(self.qk.outputs[0])

    def access(self, role: str) -> tuple[Value, tuple[int, ...] | None, tuple[int, ...] | None, float | None]:
        """(outside value, perm, offset, scale) the kernel reads ``role`` ("q", "k" or "v") through."""
        value = {"q": self.q, "k": self.k_t, "v": self.v}[role]
        return (value, getattr(self, f"{role}_perm"), getattr(self, f"{role}_offset"),
                getattr(self, f"{role}_scale"))


# ------------------------------------------------------------------ matching


def _scalar(v: Value | None) -> float | None:
    """The value of a one-element float32 constant, else None."""
    if v is None or v.const is None or v.type.dtype != _DTYPE or v.const.size != 1:
        return None
    return float(np.asarray(v.const, dtype=np.float32).reshape(-1)[0])


def _is_f32_static(v: Value | None, rank: int | None = None) -> bool:
    """A float32 value of static shape (and of ``rank`` when given)."""
    return (v is not None and v.type.dtype == _DTYPE and v.type.is_static
            and (rank is None or v.type.rank == rank))


def _broadcasts_to(v: Value, shape: tuple[int, ...]) -> bool:
    """``v``'s static shape broadcasts to ``shape`` (numpy rules, no growth of ``shape``)."""
    if not v.type.is_static or v.type.rank > len(shape):
        return False
    own = static_shape(v)
    return all(d in (1, s) for d, s in zip(own, shape[len(shape) - len(own):]))


def _private(v: Value, reader: Node) -> bool:
    """``v`` is read by ``reader`` alone, in one operand slot, and is no graph output."""
    graph = reader.graph
    if graph is not None and any(o is v for o in graph.outputs):
        return False
    return len(v.uses) == 1 and v.uses[0][0] is reader


def _other(node: Node, x: Value) -> tuple[int, Value | None] | None:
    """(position, operand) of a binary node's operand that is not ``x``; None unless ``x`` is one."""
    ins = node.inputs
    if len(ins) != 2 or sum(i is x for i in ins) != 1:
        return None
    return (1, ins[1]) if ins[0] is x else (0, ins[0])


def _match_scale(node: Node, x: Value) -> tuple[float, str] | None:
    """(constant, op) of ``mul(x, c)``, ``mul(c, x)`` or ``div(x, c)``."""
    found = _other(node, x)
    if node.op not in ("mul", "div") or found is None:
        return None
    pos, c = found
    value = _scalar(c)
    if value is None or (node.op == "div" and pos != 1):
        return None
    return value, node.op


def _match_mask(node: Node, x: Value, scores: tuple[int, ...]) -> tuple[str, Value, float | None, bool] | None:
    """(kind, mask, fill, fill_when) of ``where(m, fill, x)`` / ``where(m, x, fill)`` / ``add(x, m)``."""
    ins = node.inputs
    if node.op == "where" and len(ins) == 3 and ins[0] is not None and ins[0] is not x:
        m, a, b = ins
        if m.type.dtype != "bool" or not _broadcasts_to(m, scores):
            return None
        if b is x and a is not x and (fill := _scalar(a)) is not None:
            return "select", m, fill, True
        if a is x and b is not x and (fill := _scalar(b)) is not None:
            return "select", m, fill, False
        return None
    found = _other(node, x)
    if node.op == "add" and found is not None and _is_f32_static(found[1]) and _broadcasts_to(found[1], scores):
        return "additive", found[1], None, True
    return None


def _is_nan_guard(is_nan: Node, where: Node, p: Value, scores: tuple[int, ...]) -> bool:
    """``where(is_nan(p), 0, p)``, with ``p`` and the test read by these two nodes alone."""
    if is_nan.op != "is_nan" or is_nan.inputs != (p,) or len(is_nan.outputs) != 1:
        return False
    test = is_nan.outputs[0]
    if where.op != "where" or len(where.inputs) != 3 or len(where.outputs) != 1:
        return False
    cond, zero, x = where.inputs
    fill = _scalar(zero)
    if cond is not test or x is not p or fill is None or fill != 0.0 or math.copysign(1.0, fill) < 0:
        return False
    graph = where.graph
    outs = {id(v) for v in graph.outputs} if graph is not None else set()
    if id(p) in outs or id(test) in outs:
        return False
    if sorted((id(n), i) for n, i in p.uses) != sorted([(id(is_nan), 0), (id(where), 2)]):
        return False
    out = where.outputs[0]
    return test.uses == [(where, 0)] and _is_f32_static(out) and static_shape(out) == scores


def _matmul_operands(node: Node, rank: int) -> tuple[Value, Value] | None:
    """Both operands of a float32 static ``matmul`` of rank-``rank`` operands and result."""
    if node.op != "matmul" or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if not all(_is_f32_static(t, rank) for t in (a, b, node.outputs[0])):
        return None
    return a, b


def _perm(node: Node) -> tuple[int, ...] | None:
    """A rank-preserving float32 static ``transpose``'s permutation (default: reversed axes), else None."""
    if node.op != "transpose" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    x, out = node.inputs[0], node.outputs[0]
    if not (_is_f32_static(x) and _is_f32_static(out, x.type.rank if x is not None else None)):
        return None
    rank = x.type.rank
    perm = node.attrs.get("perm")
    perm = tuple(range(rank))[::-1] if not perm else tuple(int(p) for p in perm)
    if sorted(perm) != list(range(rank)) or static_shape(out) != tuple(static_shape(x)[p] for p in perm):
        return None
    return perm


def _slice_starts(node: Node) -> tuple[int, ...] | None:
    """Per-axis starts of a float32 static unit-step ``slice`` (0 on axes it does not cut), else None."""
    from kiln.ir.ops.tensor import _slice_params, _slice_range

    if node.op != "slice" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    x, out = node.inputs[0], node.outputs[0]
    if not (_is_f32_static(x) and _is_f32_static(out, x.type.rank if x is not None else None)):
        return None
    shape = static_shape(x)
    starts = [0] * len(shape)
    try:
        params = _slice_params(len(shape), node.attrs)
    except Exception:  # noqa: BLE001 - a slice its own type rule refuses is no prologue
        return None
    for axis, start, end, step in params:
        if step != 1:
            return None
        starts[axis] = _slice_range(shape[axis], start, end, step)[0]
    return tuple(starts)


# kT and v are read in vectors along their last axis (score columns j, output
# columns c): a fused transpose of either must keep the last axis last, or each
# vector load becomes a strided gather.  (GPT's kT = transpose(k, [0,2,3,1])
# measured 190 us fused vs 118 us + a ~7 us copy kernel unfused.)  q is read one
# scalar at a time, so any permutation of q is fine.
_CONTIGUOUS_ROLES = frozenset({"k", "v"})
_PROLOGUE_OPS = frozenset({"slice", "transpose", "mul"})
# q is scaled once per row tile (the attn_q stage), but a kT or v scale is applied to every vector
# each row tile reads: Sq/R times the work of a separate mul kernel over kT.  Measured (1 thread, 12
# heads, d=64): +0.2 us at Sq=16 (a kernel launch saved), +23 us at Sq=128 (a ~10 us kernel saved).
# So a kT/v scale joins only while the row tiles are few.
_SCALED_KV_MAX_TILES = 16


@dataclass(frozen=True)
class Prologue:
    """How the kernel reads one matmul operand through fused slice/transpose/mul nodes (last first)."""

    nodes: tuple[Node, ...]
    value: Value  # the outside value
    perm: tuple[int, ...] | None
    offset: tuple[int, ...] | None
    scale: float | None


def _prologue(operand: Value, reader: Node, members: set[int]) -> Prologue | None:
    """The slice/transpose/mul nodes of ``members`` that make ``operand`` from an outside value.

    Walking from the operand to the source, the map from the operand's logical index ``i`` to the
    source's index is ``src[j] = i[axis[j]] + offset[j]``: a transpose permutes it, a slice adds its
    starts, a mul (by a one-element float32 constant, at most one) leaves it and records the scale.
    None when a member node on the way is no such link (it then belongs nowhere: no match).
    """
    rank = operand.type.rank
    axis, offset = list(range(rank)), [0] * rank
    nodes: list[Node] = []
    scale: float | None = None
    x, user = operand, reader
    while x.producer is not None and id(x.producer) in members:
        node = x.producer
        if node.op not in _PROLOGUE_OPS or not _private(x, user) or len(node.outputs) != 1:
            return None
        if node.op == "mul":
            a, b = node.inputs
            src = a if _scalar(b) is not None else b
            found = _match_scale(node, src) if src is not None else None
            if found is None or scale is not None or not _is_f32_static(src, rank) \
                    or static_shape(src) != static_shape(x):
                return None
            scale = found[0]
        elif node.op == "transpose":
            perm = _perm(node)
            if perm is None:
                return None
            inv = [perm.index(j) for j in range(rank)]
            axis, offset = [axis[inv[j]] for j in range(rank)], [offset[inv[j]] for j in range(rank)]
            src = node.inputs[0]
        else:
            starts = _slice_starts(node)
            if starts is None:
                return None
            offset = [o + s for o, s in zip(offset, starts)]
            src = node.inputs[0]
        nodes.append(node)
        x, user = src, node
    if not nodes:
        return Prologue((), operand, None, None, None)
    perm = tuple(axis.index(a) for a in range(rank))
    return Prologue(tuple(nodes), x, None if perm == tuple(range(rank)) else perm,
                    tuple(offset) if any(offset) else None, scale)


def match_attention(nodes: Sequence[Node]) -> AttentionSpec | None:
    """The attention spec of exactly this node list (graph order), or None when it is anything else.

    Besides the chain, the list may hold, for each of q, kT and v, the ``slice``, ``transpose`` and
    ``mul``-by-a-constant nodes (each read only by the next) that make it from an outside value
    (:func:`_prologue`; the kernel reads that value through them), and last a ``transpose`` of the
    output that keeps the last axis last (the kernel writes its output through it).
    """
    nodes = list(nodes)
    if len(nodes) < 3 or len({id(n) for n in nodes}) != len(nodes):
        return None
    out_perm = None
    if nodes[-1].op == "transpose":
        out_perm = _perm(nodes[-1])
        rank = len(out_perm) if out_perm is not None else 0
        x = nodes[-1].inputs[0]
        if (out_perm is None or out_perm[-1] != rank - 1 or x is None or x.producer is not nodes[-2]
                or not _private(x, nodes[-1])):
            return None
    core_end = len(nodes) - (out_perm is not None)
    matmuls = [n for n in nodes[:core_end] if n.op == "matmul"]
    if len(matmuls) != 2 or nodes[core_end - 1] is not matmuls[1]:
        return None
    qk, pv = matmuls
    members = {id(n) for n in nodes[:core_end]}
    roles = {}
    for role, reader, operand in (("q", qk, qk.inputs[0]), ("k", qk, qk.inputs[1]), ("v", pv, pv.inputs[1])):
        if operand is None or operand.producer is None or id(operand.producer) not in members:
            roles[role] = Prologue((), operand, None, None, None)
            continue
        found = _prologue(operand, reader, members)
        if found is None or (role in _CONTIGUOUS_ROLES and found.perm is not None
                             and found.perm[-1] != len(found.perm) - 1):
            return None  # a kT/v transpose moving the last axis: its loads would be gathers, slower than a copy
        rows = qk.outputs[0].type.shape[-2] if qk.outputs and qk.outputs[0].type.rank >= 2 else None
        if role in _CONTIGUOUS_ROLES and found.scale is not None \
                and (not isinstance(rows, int) or -(-rows // ATTENTION_ROW_TILE) > _SCALED_KV_MAX_TILES):
            return None  # every row tile would scale kT / v again: a separate mul kernel is cheaper
        roles[role] = found
    prologue = {id(n) for p in roles.values() for n in p.nodes}
    if len(prologue) != sum(len(p.nodes) for p in roles.values()):
        return None  # one node on two operands' paths
    at = {id(n): i for i, n in enumerate(nodes)}
    if any(at[id(r)] <= at[id(n)] for p in roles.values() for n in p.nodes for o in n.outputs for r, _ in o.uses):
        return None  # the list is not in graph order
    core = [n for n in nodes[:core_end] if id(n) not in prologue]
    spec = _match_chain(core)
    if spec is None:
        return None
    return replace(spec, nodes=tuple(nodes), q=roles["q"].value, k_t=roles["k"].value, v=roles["v"].value,
                   q_perm=roles["q"].perm, k_perm=roles["k"].perm, v_perm=roles["v"].perm,
                   q_offset=roles["q"].offset, k_offset=roles["k"].offset, v_offset=roles["v"].offset,
                   q_scale=roles["q"].scale, k_scale=roles["k"].scale, v_scale=roles["v"].scale,
                   out_perm=out_perm)


def _match_chain(nodes: list[Node]) -> AttentionSpec | None:
    """The spec of the bare chain ``matmul -> [scale] -> [mask] -> softmax -> matmul``, else None."""
    if not 3 <= len(nodes) <= 7 or nodes[0].op != "matmul":
        return None
    rank = nodes[0].outputs[0].type.rank if nodes[0].outputs else 0
    if rank not in (3, 4) or (qk := _matmul_operands(nodes[0], rank)) is None:
        return None
    scores = static_shape(nodes[0].outputs[0])
    x, rest = nodes[0].outputs[0], nodes[1:]
    fields: dict = {}
    if rest and rest[0].op in ("mul", "div"):
        if (scale := _match_scale(rest[0], x)) is None:
            return None
        fields.update(scale=scale[0], scale_op=scale[1])
        x, rest = _step(x, rest, scores)
    if rest and rest[0].op in ("where", "add"):
        if (mask := _match_mask(rest[0], x, scores)) is None:
            return None
        fields.update(mask_kind=mask[0], mask=mask[1], fill=mask[2], fill_when=mask[3])
        x, rest = _step(x, rest, scores)
    if x is None or len(rest) not in (2, 4) or not _is_softmax(rest[0], x, rank):
        return None
    if len(rest) == 4:
        p = rest[0].outputs[0] if len(rest[0].outputs) == 1 else None
        if p is None or not _is_f32_static(p) or static_shape(p) != scores \
                or not _is_nan_guard(rest[1], rest[2], p, scores):
            return None
        fields["nan_guard"] = True
        x, rest = rest[2].outputs[0], rest[3:]
    else:
        x, rest = _step(x, rest, scores)
    pv = _matmul_operands(rest[0], rank) if x is not None else None
    if pv is None or pv[0] is not x or pv[1] is x or not _private(x, rest[0]):
        return None
    v = pv[1]
    if static_shape(v)[-2] != scores[-1] or not _batch_ok(qk[0], qk[1], v, scores):
        return None
    spec = AttentionSpec(tuple(nodes), qk[0], qk[1], v, **fields)
    return replace(spec, causal_offset=_causal_offset(spec))


# A masked score at or below DEAD_BELOW weighs exactly 0 after softmax when the
# row's live scores are above LIVE_ABOVE (exp of a gap beyond -1e29 underflows
# in float64, as in float32): -inf, and finfo.min (the additive masks of HF
# models) both qualify.
DEAD_BELOW = -1e30
LIVE_ABOVE = -1e20


def _dead_entries(spec: AttentionSpec) -> np.ndarray | None:
    """[Sq, Sk] bool: entries a constant mask kills in every batch and head; None when that is not decidable."""
    m = spec.mask
    if m is None or m.const is None or m.type.rank < 2 or static_shape(m)[-2:] != spec.scores_shape[-2:]:
        return None
    values = np.asarray(m.const)
    if spec.mask_kind == "select":
        if spec.fill is None or spec.fill > DEAD_BELOW:
            return None
        dead = values == spec.fill_when
    else:
        values = values.astype(np.float64)
        dead = values <= DEAD_BELOW
        if np.any(~dead & (values <= LIVE_ABOVE)):
            return None  # live entries too close to the dead ones: their weights would not vanish
    return dead.reshape((-1,) + dead.shape[-2:]).all(axis=0)


def _causal_offset(spec: AttentionSpec) -> int | None:
    """The least ``off`` such that no row i of a constant mask has a live column past i + off; None if none helps.

    The kernel then computes no column past its tile's last row + ``off``: those
    weigh exactly 0 (-inf or below DEAD_BELOW).  A row with no live column keeps
    its -inf result (NaN); with a finite fill it would be uniform over every
    column, so such a mask gets no offset.
    """
    dead = _dead_entries(spec)
    if dead is None:
        return None
    sq, sk = dead.shape
    live = ~dead
    has_live = live.any(axis=1)
    if not has_live.all() and not (spec.mask_kind == "select" and spec.fill == -math.inf):
        return None
    last = np.where(has_live, sk - 1 - np.argmax(live[:, ::-1], axis=1), -1)
    off = int(np.max(last - np.arange(sq)))
    return off if off < sk - 1 else None


def _step(x: Value | None, rest: list[Node], scores: tuple[int, ...]) -> tuple[Value | None, list[Node]]:
    """Advance past ``rest[0]`` (which reads ``x``): its output, if ``x`` is private to it and shapes hold."""
    node = rest[0]
    if x is None or not _private(x, node) or len(node.outputs) != 1:
        return None, rest[1:]
    out = node.outputs[0]
    if not _is_f32_static(out) or static_shape(out) != scores:
        return None, rest[1:]
    return out, rest[1:]


def _is_softmax(node: Node, x: Value, rank: int) -> bool:
    """``softmax(x)`` along the last axis."""
    axis = node.attrs.get("axis", -1)
    return node.op == "softmax" and node.inputs == (x,) and isinstance(axis, int) and axis % rank == rank - 1


def _batch_ok(q: Value, k_t: Value, v: Value, scores: tuple[int, ...]) -> bool:
    """Every operand's batch dims broadcast to the scores' (the matmuls broadcast them)."""
    batch = scores[:-2]
    return all(all(d in (1, b) for d, b in zip(static_shape(t)[:-2], batch)) for t in (q, k_t, v))


# ------------------------------------------------------------------ TE compute


def _reader(spec: AttentionSpec, role: str, t: te.Tensor) -> Callable[..., Expr]:
    """``read(batch, *rest)``: the matmul operand of ``role`` at a logical index, read from ``t``.

    The operand is ``mul(transpose(slice(t)), scale)`` (each part optional, :class:`Prologue`): the
    logical index goes through the permutation, the slice's starts are added, the element is
    multiplied by the scale as read (the graph's own rounding); size-1 batch dims broadcast.
    """
    _, perm, offset, scale = spec.access(role)
    reader, slot = (spec.qk, 0) if role == "q" else (spec.qk, 1) if role == "k" else (spec.pv, 1)
    logical = static_shape(reader.inputs[slot])
    rank = len(logical)
    perm = tuple(range(rank)) if perm is None else perm
    factor = tirx.const(scale, "float32") if scale is not None else None

    def read(batch: Sequence[Expr], *rest: Expr) -> Expr:
        idx = [*batch, *rest]
        src: list[Expr] = [0] * rank
        for a, p in enumerate(perm):
            src[p] = 0 if a < len(batch) and logical[a] == 1 else idx[a]
        if offset is not None:
            src = [e + o if o else e for e, o in zip(src, offset)]
        x = t(*src)
        return x * factor if factor is not None else x
    return read


def _neg_inf_max() -> Callable:
    """A max reducer whose identity is -inf (te.max starts at the lowest finite float)."""
    return te.comm_reducer(lambda a, b: tirx.max(a, b),
                           lambda t: tirx.const(-math.inf, t), name="max_neg_inf")


def _score_fn(spec: AttentionSpec, dot: te.Tensor, mask: te.Tensor | None) -> Callable[..., Expr]:
    """x[i...] = mask(scale(dot[i...])): the graph's scale then mask, in its op order and float32."""
    def score(*i: Expr) -> Expr:
        x = dot(*i)
        if spec.scale_op == "mul":
            x = x * tirx.const(spec.scale, "float32")
        elif spec.scale_op == "div":
            x = x / tirx.const(spec.scale, "float32")
        if spec.mask_kind == "select":
            off = len(i) - len(mask.shape)
            cond = mask(*(0 if int(d) == 1 else i[off + a] for a, d in enumerate(mask.shape)))
            fill = tirx.const(spec.fill, "float32")
            x = tirx.Select(cond, fill, x) if spec.fill_when else tirx.Select(cond, x, fill)
        elif spec.mask_kind == "additive":
            off = len(i) - len(mask.shape)
            x = x + mask(*(0 if int(d) == 1 else i[off + a] for a, d in enumerate(mask.shape)))
        if spec.nan_guard:  # a NaN score makes its row's max +inf: the row the guard zeroes
            x = tirx.Select(tirx.isnan(x), tirx.const(math.inf, "float32"), x)
        return x
    return score


def operands(spec: AttentionSpec) -> list[Value]:
    """The block's outside tensor operands, each distinct value once: q, kT, v, [mask]."""
    found: dict[int, Value] = {}
    for value in (spec.q, spec.k_t, spec.v, spec.mask):
        if value is not None:
            found.setdefault(id(value), value)
    return list(found.values())


def _row_reduce(fn: Callable[..., Expr], reducer: Callable, rows: tuple[int, ...], sk: int, lanes: int,
                name: str) -> te.Tensor:
    """``reducer`` of ``fn(*row, j)`` over j < sk; in ``lanes`` vector partials (``{name}_part``) when sk allows."""
    if lanes < 2 or sk % lanes or sk < 2 * lanes:
        rj = te.reduce_axis((0, sk), name=f"{name}_j")
        return te.compute(rows, lambda *i: reducer(fn(*i, rj), axis=rj), name=name)
    ro = te.reduce_axis((0, sk // lanes), name=f"{name}_jo")
    part = te.compute(rows + (lanes,), lambda *i: reducer(fn(*i[:-1], ro * lanes + i[-1]), axis=ro),
                      name=f"{name}_part")
    rl = te.reduce_axis((0, lanes), name=f"{name}_lane")
    return te.compute(rows, lambda *i: reducer(part(*i, rl), axis=rl), name=name)


def attention_te(spec: AttentionSpec, lanes: int = 1) -> tuple[list[te.Tensor], te.Tensor]:
    """(params, output) of the fused attention compute; params are :func:`operands`' placeholders.

    With ``lanes`` > 1 the row max and sum reduce into ``lanes`` partials first (vectorizable).
    """
    scores = spec.scores_shape
    batch, sq, sk = scores[:-2], scores[-2], scores[-1]
    d_head, dv = static_shape(spec.qk.inputs[0])[-1], static_shape(spec.pv.inputs[1])[-1]
    ph = {id(val): te.placeholder(static_shape(val), tvm_dtype(val.type.dtype), name=f"in{n}")
          for n, val in enumerate(operands(spec))}
    q = _reader(spec, "q", ph[id(spec.q)])
    k_t = _reader(spec, "k", ph[id(spec.k_t)])
    v = _reader(spec, "v", ph[id(spec.v)])
    mask = ph[id(spec.mask)] if spec.mask is not None else None
    nb = len(batch)
    rd = te.reduce_axis((0, d_head), name="d")
    # q read once per row tile (through its prologue, scaled) into a local [R, d] tile; the register
    # tile below then broadcasts plain loads of it
    q_tile = te.compute(batch + (sq, d_head), lambda *i: q(i[:nb], i[nb], i[nb + 1]), name="attn_q")
    dot = te.compute(scores, lambda *i: te.sum(q_tile(*i[:nb], i[nb], rd) * k_t(i[:nb], rd, i[nb + 1]), axis=rd),
                     name="attn_qk")
    score = te.compute(scores, _score_fn(spec, dot, mask), name="attn_score")
    mx = _row_reduce(score, _neg_inf_max(), batch + (sq,), sk, lanes, "attn_max")
    shift = te.compute(scores, lambda *i: score(*i) - mx(*i[:-1]), name="attn_shift")
    e = topi.fast_exp(shift)
    total = _row_reduce(e, te.sum, batch + (sq,), sk, lanes, "attn_sum")
    rv = te.reduce_axis((0, sk), name="jv")
    acc = te.compute(batch + (sq, dv), lambda *i: te.sum(e(*i[:-1], rv) * v(i[:nb], rv, i[-1]), axis=rv),
                     name="attn_pv")
    bad_row = tirx.const(0.0 if spec.nan_guard else math.nan, "float32")

    def result(*i: Expr) -> Expr:
        return tirx.Select(tirx.isfinite(mx(*i[:-1])), acc(*i) / total(*i[:-1]), bad_row)

    if spec.out_perm is None:
        out = te.compute(batch + (sq, dv), result, name="attn_out")
    else:  # written through the fused transpose: out[o] = result[i] with i[perm[a]] = o[a]
        perm = spec.out_perm
        logical = batch + (sq, dv)
        out = te.compute(tuple(logical[p] for p in perm),
                         lambda *o: result(*(o[perm.index(k)] for k in range(len(perm)))), name="attn_out")
    return list(ph.values()), out


# ------------------------------------------------------------------ schedule


def _cores(target: Target) -> int:
    """Cores the target may use (its ``num-cores``, else this process's)."""
    return int(target.attrs["num-cores"]) if "num-cores" in target.attrs else num_cores()


def _tile_cols(sch: Schedule, blk, rows, cols, red, lanes: int) -> tuple:
    """Register tile: loops (rows, cols, red) -> (cols_o, red, rows, cols_i), rows unrolled, cols_i vectors.

    Returns (cols_o, red, columns per cols_o iteration).
    """
    ext = int(sch.get(cols).extent)
    nr = 2 * lanes if ext % (2 * lanes) == 0 or ext > 4 * lanes else lanes
    co, ci = sch.split(cols, [None, nr])
    sch.reorder(co, red, rows, ci)
    if ext % nr:
        sch.annotate(co, "pragma_loop_partition_hint", 1)
    sch.unroll(rows)
    sch.vectorize(ci)
    sch.decompose_reduction(blk, red)
    return co, red, nr


def _interleave_rows(sch: Schedule, blk) -> object:
    """Row reduction over the tile: loops (rows, red) -> (red, rows unrolled), independent chains; returns red."""
    rows, red = sch.get_loops(blk)[-2:]
    sch.reorder(red, rows)
    sch.unroll(rows)
    sch.decompose_reduction(blk, red)
    return red


def _vectorize_part(sch: Schedule, blk) -> object:
    """Partials block loops (rows, lanes, chunks) -> (rows, chunks, lanes), lanes vectorized; returns chunks."""
    rows, lane, red = sch.get_loops(blk)[-3:]
    sch.reorder(rows, red, lane)
    sch.vectorize(lane)
    sch.decompose_reduction(blk, red)
    return red


def _vectorize_split(sch: Schedule, loop, lanes: int) -> object | None:
    """Vectorize ``loop`` by ``lanes`` (whole loop when it is one vector or less); returns the outer loop."""
    ext = int(sch.get(loop).extent)
    if ext <= lanes:
        sch.vectorize(loop)
        return None
    outer, inner = sch.split(loop, [None, lanes])
    if ext % lanes:
        sch.annotate(outer, "pragma_loop_partition_hint", 1)
    sch.vectorize(inner)
    return outer


def schedule_attention(func: tirx.PrimFunc, target: Target, rows: int = ATTENTION_ROW_TILE,
                       causal_offset: int | None = None, out_perm: Sequence[int] | None = None) -> tirx.PrimFunc:
    """Parallel over batch·heads·row tiles, every stage computed inside the tile, tiles vectorized.

    With ``causal_offset`` the loops over score columns stop after the tile's last row + offset.
    With ``out_perm`` (the output written transposed) the output loops are first put back in the
    logical order (batch..., row, column).
    """
    sch = Schedule(func)
    lanes = vector_lanes(target, "float32")
    sch.compute_inline(sch.get_sblock("attn_score"))
    sch.compute_inline(sch.get_sblock("attn_shift"))
    out = sch.get_sblock("attn_out")
    loops = sch.get_loops(out)
    if out_perm is not None:
        loops = [loops[list(out_perm).index(k)] for k in range(len(out_perm))]
        sch.reorder(*loops)
    *batch, i, c = loops
    rows = min(rows, int(sch.get(i).extent))
    tiles = -(-int(sch.get(i).extent) // rows)
    io, ii = sch.split(i, [None, rows])
    tile = sch.fuse(*batch, io) if batch else io
    if _cores(target) > 1 and int(sch.get(tile).extent) > 1:
        sch.parallel(tile)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    for name in ("attn_pv", "attn_sum", "attn_sum_part", "T_fast_exp", "attn_max", "attn_max_part", "attn_qk",
                 "attn_q"):
        if name in names:
            sch.compute_at(sch.get_sblock(name), tile, preserve_unit_loops=True)  # loops stay one per axis
    q_cols = sch.get_loops(sch.get_sblock("attn_q"))[-1]
    if int(sch.get(q_cols).extent) % lanes == 0:
        sch.vectorize(q_cols)
    if int(sch.get(c).extent) % lanes == 0:
        sch.vectorize(c)
    qk = sch.get_sblock("attn_qk")
    co, _, nr = _tile_cols(sch, qk, *sch.get_loops(qk)[-3:], lanes)
    column_loops = [(co, nr)]  # (loop, score columns per iteration)
    pv = sch.get_sblock("attn_pv")
    _, j, _ = _tile_cols(sch, pv, *sch.get_loops(pv)[-3:], lanes)
    column_loops.append((j, 1))
    exp_outer = _vectorize_split(sch, sch.get_loops(sch.get_sblock("T_fast_exp"))[-1], lanes)
    if exp_outer is not None:
        column_loops.append((exp_outer, lanes))
    for name in ("attn_max", "attn_sum"):
        if f"{name}_part" in names:
            column_loops.append((_vectorize_part(sch, sch.get_sblock(f"{name}_part")), lanes))
            _interleave_rows(sch, sch.get_sblock(name))
        else:
            column_loops.append((_interleave_rows(sch, sch.get_sblock(name)), 1))
    func = sch.mod["main"]
    if causal_offset is None:
        return func
    tv = sch.get(tile).loop_var
    t = tv % tiles if batch else tv
    live = tirx.max((t + 1) * rows + causal_offset, 0)  # columns the tile's rows may read
    bounds = [(sch.get(lp).loop_var, tirx.min(sch.get(lp).extent, (live + step - 1) // step))
              for lp, step in column_loops]
    return func.with_body(_set_extents(func.body, bounds))


def _set_extents(stmt: tirx.Stmt, bounds: list[tuple[tirx.Var, Expr]]) -> tirx.Stmt:
    """``stmt`` with the loops over the given vars given the new extents (the rest shared, not copied)."""
    if isinstance(stmt, tirx.For):
        body = _set_extents(stmt.body, bounds)
        ext = next((e for var, e in bounds if var.same_as(stmt.loop_var)), None)
        if ext is None and body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent if ext is None else ext, stmt.kind, body,
                        stmt.thread_binding, stmt.annotations, stmt.step)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_set_extents(x, bounds) for x in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _set_extents(stmt.block, bounds)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, s_tir.SBlock):
        body = _set_extents(stmt.body, bounds)
        return stmt if body.same_as(stmt.body) else s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init, stmt.alloc_buffers,
            stmt.match_buffers, stmt.annotations)
    return stmt


# ------------------------------------------------------------------ kernel


def lower_attention(spec: AttentionSpec, target: Target, name: str | None = None, *,
                    schedule: bool = True) -> Kernel:
    """The fused attention kernel of ``spec``, called like a :func:`~kiln.codegen.kernel.lower_block` kernel."""
    params, out = attention_te(spec, vector_lanes(target, "float32"))
    func = te.create_prim_func([*params, out]).with_attr("global_symbol", name or "kernel")
    args = [KernelArg(value) for value in operands(spec)]
    kernel = Kernel(name or "kernel", list(spec.nodes), func, "attention", args, [spec.out])
    if schedule:
        kernel.func = schedule_attention(func, target, causal_offset=spec.causal_offset, out_perm=spec.out_perm)
    return kernel
