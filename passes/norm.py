"""Norm rewrites: fold-ln-affine, ln-to-rmsnorm, ln-to-crmsnorm (passes-math.md section 1).

``d`` is the model width, the last axis that the norms normalize; matmul weights
are ``B[in, out]``; ``n(x)`` is a norm without its affine part.

**fold-ln-affine** rewrites ``y = n(x)·γ + β`` feeding linears ``y·B + b`` into
``n(x)`` (γ = 1, β removed) feeding

    B' = diag(γ)·B        (γ scales the input rows of B)
    b' = b + βᵀ·B         (a bias add is created when the matmul had none)

for ``layer_norm``, ``rms_norm`` and ``crms_norm`` (β: layer_norm only). Each
consumer must be a matmul with a constant 2-D weight, read directly or through
ops that move whole rows and keep d last (token gather/slice, reshape,
transpose, squeeze/unsqueeze, expand, token mean-pooling); a constant bias add
right after the matmul (its only user) is updated, and a constant add that is
the norm's only user counts as its β (so ``rms_norm`` + ``add(β)`` folds too). Refused per norm, with a reason that names
the culprit: γ or β not a constant, a norm over more than the last axis, its
output (or a value between it and the matmuls) a graph output, a consumer that
is not such a matmul, a weight that is not a constant 2-D matrix.

**ln-to-rmsnorm** (Pre-LN → Pre-RMSNorm). ``LN(x) = RMSNorm(x − mean_d(x))``
with the same ε, γ, β, so if the residual stream has zero mean along d at
every point, each layer_norm reading it is an rms_norm. The pass proves it
(:func:`prove_stream`): from the input of every layer_norm it walks back
through ops that are linear in one operand and act row by row along d
(add/sub, neg, mul/div by a constant uniform along d such as a scalar or a
per-token scale, token gather/slice, token sum/mean-pooling, concat along
another axis, reshape/transpose/squeeze/unsqueeze/expand keeping d whole) to
the constants that write into the stream, and centers each of them along d,
in float64:

    embedding, positional, cls tables E[.., d]   E − mean_d(E) per row
    matmul B[in, d] (out-proj, MLP down-proj)    B − mean over axis 1; b − mean(b)
    conv W[d, c, k..] (patch embedding, group 1) W − mean over axis 0; b − mean(b)

(the walk maps d through the conv's flatten/transpose to its channel axis).
Q/K/V, fc1 and the head are untouched. Each layer_norm becomes
``rms_norm(x, γ)``, followed by ``add(β)`` when it has a bias: kiln's rms_norm
has no bias operand, and the add keeps the norm's output name.

Preconditions, else the WHOLE graph is left unchanged and the one refusal names
the value: every layer_norm normalizes the last axis only and reads a value so
proven; every value on the walk is read only through the walked operands and by
layer_norms (nothing else may see its mean change) and is not a graph output;
every centered constant is read only there. Refused in particular: a Post-LN
block (a layer_norm writes into the stream), a branch that ends in a
nonlinearity or a norm, a graph input in the stream (weights or tables given at
run time), the stream read by anything but layer_norms (a matmul without a
norm, a graph output), a tied embedding/head (one constant as the table and,
through a transpose, the head weight). With ``untie=true`` a constant that
other nodes also read is centered as a copy instead of refused.

**ln-to-crmsnorm** (Pre-LN → Pre-CRMSNorm). A zero-mean d-vector x is stored
as x' = x[:d−1]; its last component is −Σx'. After the proof above, the γ and β
of every layer_norm are folded into its consumers (fold-ln-affine; every norm
must be foldable, else the whole graph is refused), the centered writes drop
their last output column/row/channel (the stream is d−1 wide), each
layer_norm becomes

    crms_norm(x', 1){epsilon}:  x' · rsqrt((Σx'² + (Σx')²)/d + ε)

and each consumer weight becomes ``B' = B[:d−1, :] − B[d−1:d, :]`` (the
normalized vector's dropped component is −Σy'). The graph outputs keep their
shape and value.

Numerics: weight arithmetic is done in float64 and cast back. The rewrites are
exact in exact arithmetic; in float64 the zoo GPT and ViT match the original
within 1e-12 of the output magnitude (tests assert 1e-9). In float32 the
centered stream keeps a rounding-size mean and the weights are rounded once
more; measured through the interpreter (each op rounded to float32) on the
zoo GPT/ViT the outputs move by at most 4.2e-7 of their magnitude
(ln-to-crmsnorm; ln-to-rmsnorm and fold-ln-affine 2.3e-7), and the tests
assert ``F32_TOLERANCE`` = 1e-5 relative to the output magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np

from kiln.ir.graph import Attrs, Graph, Node, Value
from kiln.ir.types import dim_mul

from .manager import Pass, PassLog, RewritePass, register_pass

__all__ = ["F32_TOLERANCE", "FoldLnAffine", "FoldPlan", "LnToCrmsNorm", "LnToRmsNorm", "NORMS", "Refused",
           "StreamProof", "plan_fold", "prove_stream"]

NORMS = ("layer_norm", "rms_norm", "crms_norm")
ROW_OPS = frozenset({"gather", "slice", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "expand",
                     "reduce_mean"})
F32_TOLERANCE = 1e-5
Use = tuple[Node, int]


# ====================================================================== graph helpers


def _is_output(graph: Graph, v: Value) -> bool:
    """Whether ``v`` is one of the graph's outputs."""
    return any(o is v for o in graph.outputs)


def _replace_const(graph: Graph, old: Value, array: np.ndarray, uses: Iterable[Use], tag: str) -> Value:
    """Point ``uses`` of constant ``old`` at a new constant ``array``, under ``old``'s name when nothing else reads it."""
    uses = list(dict.fromkeys(uses))
    for n, i in uses:
        graph.set_input(n, i, None)
    if not old.uses and not _is_output(graph, old):
        graph.remove_constant(old)
        new = graph.add_constant(array, old.name)
    else:
        new = graph.add_constant(array, graph.fresh_name(f"{old.name}_{tag}"))
    for n, i in uses:
        graph.set_input(n, i, new)
    return new


def _drop_if_unused(graph: Graph, v: Value | None) -> None:
    """Remove constant ``v`` once nothing reads it."""
    if v is not None and v.is_const and not v.uses and not _is_output(graph, v) and v.name in graph.constants:
        graph.remove_constant(v)


def _rebuild(graph: Graph, node: Node, *, op: str | None = None, inputs: list[Value | None] | None = None,
             attrs: Attrs | None = None) -> list[Value]:
    """Replace ``node`` by a new node (types from the type rule) whose outputs keep the old names."""
    ins = list(node.inputs) if inputs is None else list(inputs)
    new_op, new_attrs = op or node.op, dict(node.attrs if attrs is None else attrs)

    def build(names: list[str], before: Node | None) -> list[Value]:
        return list(graph.add_node(new_op, ins, new_attrs, before=before, name=node.name, out_names=names).outputs)

    return graph.replace_keeping_names(list(node.outputs), [node], build)


def _f64(v: Value) -> np.ndarray:
    """A constant's data in float64."""
    return np.asarray(v.const, np.float64)


def _centered(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` minus its mean along ``axis``, in float64."""
    a64 = np.asarray(a, np.float64)
    return a64 - a64.mean(axis=axis, keepdims=True)


def _norm_vector(v: Value, d: int) -> np.ndarray:
    """A norm's γ or β (broadcastable to [d]) as a float64 vector of length d."""
    return np.broadcast_to(_f64(v).reshape(-1), (d,))


# ====================================================================== row-wise linear ops


def _reshape_axis(src: tuple, dst: tuple, axis: int) -> int | None:
    """The axis of ``src`` that axis ``axis`` of ``dst`` is after a reshape, when it stays whole."""
    before, size = dim_mul(*dst[:axis]), dst[axis]
    for a, s in enumerate(src):
        if s == size and dim_mul(*src[:a]) == before:
            return a
    return None


def _slice_axes(node: Node, rank: int) -> set[int]:
    """The axes a slice node cuts."""
    axes = node.attrs.get("axes") or range(len(node.attrs["starts"]))
    return {a % rank for a in axes}


def _aligned(v: Value, axis: int, rank: int) -> int | None:
    """The axis of operand ``v`` that broadcasting lines up with output axis ``axis`` (None: ``v`` lacks it)."""
    a = axis - (rank - v.type.rank)
    return a if a >= 0 else None


def _operand_axes(node: Node, axis: int) -> list[tuple[int, int]] | str:
    """The operands (index, axis) of which ``node``'s output along ``axis`` is a linear, row-wise function.

    Centering those operands along their axis centers the output along ``axis``;
    the node's other operands are left alone. A string says why there are none.
    """
    if len(node.outputs) != 1:
        return f"{node.op} has {len(node.outputs)} outputs"
    out = node.output.type
    r, d, op = out.rank, out.shape[axis], node.op

    def whole(i: int) -> int | None:
        """Operand i's axis under ``axis`` when it is not broadcast along it."""
        a = _aligned(node.inputs[i], axis, r)
        return a if a is not None and node.inputs[i].type.shape[a] == d else None

    if op in ("add", "sub"):
        axes = [(i, whole(i)) for i in range(2)]
        for i, a in axes:
            if a is None:
                v = node.inputs[i]
                return f"its operand %{v.name} {v.type} is broadcast along the normalized axis"
        return axes
    if op in ("mul", "div"):
        for i in (1,) if op == "div" else (1, 0):
            c, a = node.inputs[i], _aligned(node.inputs[i], axis, r)
            if c.is_const and (a is None or c.type.shape[a] == 1) and whole(1 - i) is not None:
                return [(1 - i, whole(1 - i))]
        c = next((v for v in node.inputs if v.is_const), None)
        if c is not None:
            return (f"it is scaled per channel by the constant %{c.name}, which moves its mean over d "
                    f"(LayerScale? fold it into the projection before it)")
    if op == "neg":
        return [(0, axis)]
    if op == "matmul":
        b = node.inputs[1]
        if axis != r - 1 or b.type.rank < 2:
            return "matmul's output is normalized along an axis its weight does not produce"
        return [(1, b.type.rank - 1)]
    if op == "conv":
        if axis != 1:
            return f"conv's output is normalized along axis {axis}, not its channel axis"
        if node.attrs.get("group", 1) != 1:
            return f"conv has group={node.attrs['group']}: centering its weight over all output channels mixes groups"
        return [(1, 0)] + ([(2, 0)] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
    return _row_op_axes(node, axis)


def _row_op_axes(node: Node, axis: int) -> list[tuple[int, int]] | str:
    """``_operand_axes`` for the ops that move or pool whole rows (gather, slice, concat, reshapes, reductions)."""
    op, out = node.op, node.output.type
    r, d = out.rank, out.shape[axis]
    src = node.inputs[0].type if node.inputs and node.inputs[0] is not None else None
    if op == "gather":
        g, q = node.attrs.get("axis", 0) % src.rank, node.inputs[1].type.rank
        if g <= axis < g + q:
            return "gather takes the normalized axis from its indices"
        return [(0, axis if axis < g else axis - q + 1)]
    if op == "slice":
        return "slice cuts the normalized axis" if axis in _slice_axes(node, r) else [(0, axis)]
    if op == "concat":
        if node.attrs["axis"] % r == axis:
            return "concat joins along the normalized axis"
        return [(i, axis) for i in range(len(node.inputs))]
    if op == "transpose":
        perm = list(node.attrs.get("perm") or range(r)[::-1])
        return [(0, perm[axis])]
    if op in ("reshape", "flatten", "squeeze", "unsqueeze"):
        a = _reshape_axis(src.shape, out.shape, axis)
        if a is None:
            return f"{op} {src} -> {out} merges or splits the normalized axis"
        if op == "reshape":
            entry = node.attrs["shape"][axis]
            if not (entry in (d, -1) or (entry == 0 and a == axis and not node.attrs.get("allowzero", 0))):
                return f"reshape spells the normalized axis as {entry}"
        return [(0, a)]
    if op == "expand":
        a = axis - (r - src.rank)
        if a < 0 or src.shape[a] != d:
            return "expand broadcasts along the normalized axis"
        return [(0, a)]
    if op in ("reduce_mean", "reduce_sum"):
        reduced = {a % src.rank for a in node.attrs.get("axes") or range(src.rank)}
        kept = list(range(src.rank)) if node.attrs.get("keepdims", 1) else \
            [a for a in range(src.rank) if a not in reduced]
        if kept[axis] in reduced:
            return f"{op} reduces the normalized axis"
        return [(0, kept[axis])]
    if op in NORMS:
        return f"{op} is a norm (a Post-LN block, or a branch that ends in a norm)"
    return f"{op} is not an affine map with constant weights (a nonlinearity, or an op the pass cannot see through)"


def _keeps_rows(node: Node, i: int) -> bool:
    """Whether ``node`` maps whole rows of operand ``i`` (last axis d) to whole rows of its output, d last."""
    if node.op not in ROW_OPS or i != 0 or len(node.outputs) != 1:
        return False
    x, out = node.inputs[0].type, node.output.type
    return out.rank >= 1 and x.rank >= 1 and _row_op_axes(node, out.rank - 1) == [(0, x.rank - 1)]


def _narrowed_attrs(node: Node, axis: int, d: int) -> Attrs:
    """``node``'s attributes once its output axis ``axis`` shrinks from d to d-1."""
    attrs = dict(node.attrs)
    if node.op in ("reshape", "expand"):
        shape = list(attrs["shape"])
        k = axis - (node.output.type.rank - len(shape))
        if 0 <= k < len(shape) and shape[k] == d:
            shape[k] = d - 1
        attrs["shape"] = shape
    return attrs


# ====================================================================== fold-ln-affine


@dataclass
class FoldPlan:
    """A norm whose γ/β fold into its consumers: the row-moving chain, the matmuls and their bias adds."""

    norm: Node
    gamma: Value
    beta: Value | None
    beta_add: Node | None = None
    chain: list[Node] = field(default_factory=list)
    matmuls: list[Node] = field(default_factory=list)
    biases: list[Node | None] = field(default_factory=list)

    @property
    def trivial(self) -> bool:
        """γ is all ones and there is no β: nothing to fold."""
        return self.beta is None and bool(np.all(self.gamma.const == 1))


def _bias_add(graph: Graph, out: Value) -> Node | None:
    """The add of a constant vector along the last axis that is the only user of ``out``, if any."""
    if len(out.uses) != 1 or _is_output(graph, out):
        return None
    add, i = out.uses[0]
    if add.op != "add":
        return None
    c, n = add.inputs[1 - i], out.type.shape[-1]
    if (c is None or c is out or not c.is_const or c.type.dtype != out.type.dtype or c.type.rank > out.type.rank
            or c.const.size != n or c.type.shape[-1] != n):
        return None
    return add


def plan_fold(graph: Graph, norm: Node, ignore: frozenset[int] = frozenset()) -> FoldPlan | str:
    """How ``norm``'s γ and β fold into the matmuls that consume it, or the reason they cannot.

    Reads by the nodes whose ids are in ``ignore`` are left out (the caller keeps them exact another way).
    """
    x = norm.inputs[0]
    ax = norm.attrs.get("axis", -1) % x.type.rank
    if ax != x.type.rank - 1:
        return f"it normalizes dims {ax}..{x.type.rank - 1}; only a norm over the last axis folds into a matmul"
    gamma = norm.inputs[1]
    beta = norm.inputs[2] if norm.op == "layer_norm" and len(norm.inputs) > 2 else None
    for what, p in (("γ", gamma), ("β", beta)):
        if p is not None and not p.is_const:
            return f"its {what} %{p.name} is not a constant"
    plan = FoldPlan(norm, gamma, beta)
    if beta is None:
        plan.beta_add = _bias_add(graph, norm.output)
    if plan.beta_add is not None:
        add = plan.beta_add
        plan.beta = add.inputs[1] if add.inputs[0] is norm.output else add.inputs[0]
    frontier, seen = [plan.beta_add.output if plan.beta_add else norm.output], set()
    while frontier:
        v = frontier.pop()
        if _is_output(graph, v):
            return f"%{v.name} is a graph output"
        for u, i in v.uses:
            if (id(u), i) in seen or id(u) in ignore:
                continue
            seen.add((id(u), i))
            if u.op == "matmul" and i == 0:
                w = u.inputs[1]
                if not w.is_const or w.type.rank != 2:
                    what = "a graph input" if w.producer is None and not w.is_const else \
                        ("not a constant" if not w.is_const else f"{w.type}, not a 2-D matrix")
                    return f"consumer matmul %{u.output.name} has the weight %{w.name}, {what}"
                plan.matmuls.append(u)
                plan.biases.append(_bias_add(graph, u.output))
            elif _keeps_rows(u, i):
                plan.chain.append(u)
                frontier.append(u.output)
            else:
                return (f"consumer {u.op} %{u.outputs[0].name} (reading %{v.name}) is not a matmul with a constant "
                        f"weight")
    return plan


def _add_bias(graph: Graph, mm: Node, add: Node | None, delta: np.ndarray) -> None:
    """Add ``delta`` (float64, [out]) to ``mm``'s bias, creating the bias add when there is none."""
    if add is not None:
        i = 1 if add.inputs[0] is mm.output else 0
        c = add.inputs[i]
        _replace_const(graph, c, (_f64(c) + delta.reshape(c.const.shape)).astype(c.const.dtype), [(add, i)], "folded")
        return
    a, w = mm.inputs
    bias = graph.add_constant(delta.astype(w.const.dtype), graph.fresh_name(f"{mm.output.name}_bias"))

    def build(names: list[str], before: Node | None) -> list[Value]:
        y = graph.add_node("matmul", [a, w], {}, before=before, name=mm.name,
                           out_names=[graph.fresh_name(f"{names[0]}_matmul")]).output
        return [graph.add_node("add", [y, bias], {}, before=before, name=mm.name, out_names=names).output]

    graph.replace_keeping_names([mm.output], [mm], build)


def apply_fold(graph: Graph, plan: FoldPlan) -> None:
    """Fold ``plan.norm``'s γ into its consumers' weights and β into their biases; γ becomes ones, β goes."""
    norm = plan.norm
    d = norm.inputs[0].type.shape[-1]
    gamma = _norm_vector(plan.gamma, d)
    beta = None if plan.beta is None else _norm_vector(plan.beta, d)
    weights: dict[int, tuple[Value, list[Use]]] = {}
    for mm in plan.matmuls:
        weights.setdefault(id(mm.inputs[1]), (mm.inputs[1], []))[1].append((mm, 1))
    deltas: dict[int, np.ndarray] = {}
    for w, uses in weights.values():
        w64 = _f64(w)
        if beta is not None:
            deltas.update((id(mm), beta @ w64) for mm, _ in uses)
        _replace_const(graph, w, (gamma[:, None] * w64).astype(w.const.dtype), uses, "folded")
    if beta is not None and np.any(beta):
        for mm, add in zip(plan.matmuls, plan.biases):
            _add_bias(graph, mm, add, deltas[id(mm)])
    ones = _replace_const(graph, plan.gamma, np.ones(plan.gamma.const.shape, plan.gamma.const.dtype),
                          [(norm, 1)], "ones")
    if plan.beta_add is None:
        _rebuild(graph, norm, inputs=[norm.inputs[0], ones])
    else:
        x = norm.inputs[0]

        def build(names: list[str], before: Node | None) -> list[Value]:
            return [graph.add_node(norm.op, [x, ones], norm.attrs, before=before, name=norm.name,
                                   out_names=names).output]

        graph.replace_keeping_names([plan.beta_add.output], [norm, plan.beta_add], build)
    _drop_if_unused(graph, plan.beta)


@dataclass
class _FoldMatch:
    node: Node
    plan: FoldPlan | None = None


@register_pass
@dataclass(frozen=True)
class FoldLnAffine(RewritePass):
    """Fold each norm's γ and β into the constant-weight matmuls that consume it (see the module docstring)."""

    name: ClassVar[str] = "fold-ln-affine"

    def match(self, graph: Graph, node: Node) -> _FoldMatch | None:
        if node.op not in NORMS or not (node.output.uses or _is_output(graph, node.output)):
            return None
        gamma = node.inputs[1]
        has_beta = node.op == "layer_norm" and len(node.inputs) > 2 and node.inputs[2] is not None
        if gamma.is_const and np.all(gamma.const == 1) and not has_beta and _bias_add(graph, node.output) is None:
            return None
        return _FoldMatch(node)

    def check(self, graph: Graph, m: _FoldMatch) -> str | None:
        plan = plan_fold(graph, m.node)
        if isinstance(plan, str):
            return plan
        m.plan = plan
        return None

    def rewrite(self, graph: Graph, m: _FoldMatch) -> str:
        plan = m.plan
        apply_fold(graph, plan)
        what = "γ and β" if plan.beta is not None else "γ"
        names = ", ".join(f"%{mm.output.name}" for mm in plan.matmuls)
        return f"folded {what} of {plan.norm.op} into {len(plan.matmuls)} matmul(s): {names}"


# ====================================================================== the residual stream


class Refused(NamedTuple):
    """Why a whole-graph rewrite was refused: where (a value name) and why."""

    at: str
    reason: str


@dataclass
class StreamProof:
    """The layer_norms reading the residual stream, and how centering constants makes it zero-mean along d.

    ``tracked`` maps every value on the walk (constants included) to the axis along
    which it becomes zero-mean; ``edges`` are the walked operands (node, index);
    ``copies`` are constants other nodes read too, which are centered as a copy.
    """

    norms: list[Node]
    tracked: dict[int, tuple[Value, int]] = field(default_factory=dict)
    edges: dict[tuple[int, int], Node] = field(default_factory=dict)
    copies: set[int] = field(default_factory=set)

    def constants(self) -> list[tuple[Value, int]]:
        """The centered constants with their axes."""
        return [(v, ax) for v, ax in self.tracked.values() if v.is_const]

    def walked_uses(self, v: Value) -> list[Use]:
        """The uses of ``v`` that the walk went through."""
        return [(n, i) for n, i in v.uses if (id(n), i) in self.edges]


def prove_stream(graph: Graph, untie: bool = False) -> StreamProof | Refused | None:
    """Prove that centering constants makes every layer_norm input zero-mean along d (module docstring).

    None when the graph has no layer_norm; a :class:`Refused` naming the first
    value that breaks a precondition.
    """
    norms = [n for n in graph.nodes if n.op == "layer_norm"]
    if not norms:
        return None
    proof = StreamProof(norms)
    work: list[tuple[Value, int, str]] = []
    for n in norms:
        x = n.inputs[0]
        ax = n.attrs.get("axis", -1) % x.type.rank
        if ax != x.type.rank - 1:
            return Refused(n.output.name, f"layer_norm %{n.output.name} normalizes dims {ax}..{x.type.rank - 1}; "
                                          f"only a norm over the last axis d becomes an RMSNorm")
        proof.edges[(id(n), 0)] = n
        work.append((x, ax, n.output.name))
    while work:
        v, ax, root = work.pop()
        if id(v) in proof.tracked:
            if proof.tracked[id(v)][1] != ax:
                return Refused(v.name, f"%{v.name} would have to be zero-mean along two axes "
                                       f"({proof.tracked[id(v)][1]} and {ax})")
            continue
        d = v.type.shape[ax]
        if not isinstance(d, int) or d < 2:
            return Refused(v.name, f"%{v.name} {v.type}: the normalized axis {ax} needs a static size >= 2")
        proof.tracked[id(v)] = (v, ax)
        if v.is_const:
            continue
        node = v.producer
        if node is None:
            return Refused(v.name, f"graph input %{v.name} flows into layer_norm %{root}: its mean over d cannot "
                                   f"be removed by centering constants (weights or tables given at run time?)")
        operands = _operand_axes(node, ax)
        if isinstance(operands, str):
            return Refused(v.name, f"%{v.name} = {node.op}(...) flows into layer_norm %{root} (a write into the "
                                   f"residual stream it reads), and {operands}")
        for i, a in operands:
            proof.edges[(id(node), i)] = node
            work.append((node.inputs[i], a, root))
    return _check_readers(graph, proof, untie)


def _check_readers(graph: Graph, proof: StreamProof, untie: bool) -> StreamProof | Refused:
    """Every tracked value must be read only through walked operands (and not be a graph output)."""
    for v, _ in proof.tracked.values():
        if _is_output(graph, v):
            return Refused(v.name, f"%{v.name} is in the residual stream and is a graph output: centering the "
                                   f"stream would change it")
        other = [(n, i) for n, i in v.uses if (id(n), i) not in proof.edges]
        if not other:
            continue
        n, i = other[0]
        if v.is_const and untie:
            proof.copies.add(id(v))
        elif v.is_const:
            return Refused(v.name, f"constant %{v.name} writes into the residual stream and is also read by "
                                   f"{n.op} %{n.outputs[0].name} (a tied embedding/head or a shared weight): "
                                   f"untie it first, or run with untie=true")
        else:
            return Refused(v.name, f"%{v.name} is in the residual stream and is also read by {n.op} "
                                   f"%{n.outputs[0].name} (operand {i}), which is not invariant to its mean over d")
    return proof


def _center_writes(graph: Graph, proof: StreamProof, narrow: bool) -> int:
    """Center every constant of the proof along its axis (and drop its last entry there when ``narrow``)."""
    for v, ax in proof.constants():
        arr = _centered(v.const, ax)
        if narrow:
            arr = np.take(arr, np.arange(arr.shape[ax] - 1), axis=ax)
        _replace_const(graph, v, arr.astype(v.const.dtype), proof.walked_uses(v), "centered")
    return len(proof.constants())


def _ln_to_rms(graph: Graph, ln: Node) -> None:
    """layer_norm(x, γ, β) -> rms_norm(x, γ) [+ β], under the layer_norm's output name."""
    x, gamma = ln.inputs[0], ln.inputs[1]
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    attrs = {"axis": ln.attrs["axis"], "epsilon": ln.attrs["epsilon"]}

    def build(names: list[str], before: Node | None) -> list[Value]:
        if beta is None:
            return [graph.add_node("rms_norm", [x, gamma], attrs, before=before, name=ln.name, out_names=names).output]
        y = graph.add_node("rms_norm", [x, gamma], attrs, before=before, name=ln.name,
                           out_names=[graph.fresh_name(f"{names[0]}_rms")]).output
        return [graph.add_node("add", [y, beta], {}, before=before, name=ln.name, out_names=names).output]

    graph.replace_keeping_names([ln.output], [ln], build)


def _stopped(log: PassLog, result: StreamProof | Refused | None) -> bool:
    """True when there is no proof to rewrite by (a refusal is logged); logs the constants it unties."""
    if isinstance(result, Refused):
        log.refuse(result.at, result.reason)
    if not isinstance(result, StreamProof):
        return True
    for k in result.copies:
        log.rewrote(result.tracked[k][0].name, "untied: the stream reads a centered copy, other nodes the original")
    return False


@register_pass
@dataclass(frozen=True)
class LnToRmsNorm(Pass):
    """Pre-LN -> Pre-RMSNorm: center every write into the residual stream, layer_norm -> rms_norm."""

    name: ClassVar[str] = "ln-to-rmsnorm"
    untie: bool = False

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        proof = prove_stream(graph, self.untie)
        if _stopped(log, proof):
            return graph
        n = _center_writes(graph, proof, narrow=False)
        log.rewrote("graph", f"centered {n} constant(s) that write into the residual stream")
        for ln in proof.norms:
            has_beta = len(ln.inputs) > 2 and ln.inputs[2] is not None
            log.rewrote(ln.output.name, "layer_norm -> rms_norm" + (" + add(β)" if has_beta else ""))
            _ln_to_rms(graph, ln)
        return graph


# ====================================================================== ln-to-crmsnorm


def _plans(graph: Graph, proof: StreamProof) -> list[FoldPlan] | Refused:
    """The fold plan of every norm in the proof, or the refusal of the first one that cannot fold."""
    plans = []
    for n in proof.norms:
        plan = plan_fold(graph, n)
        if isinstance(plan, str):
            return Refused(n.output.name, f"the consumers of layer_norm %{n.output.name} must absorb its γ, β and "
                                          f"the dropped component, but {plan}")
        plans.append(plan)
    return plans


def _narrow(graph: Graph, proof: StreamProof, plans: list[FoldPlan]) -> None:
    """Store the (folded, proven) stream in d-1 dims: writes, norms, row chains and consumer weights."""
    _center_writes(graph, proof, narrow=True)
    weights: dict[int, tuple[Value, list[Use]]] = {}
    for p in plans:
        for mm in p.matmuls:
            weights.setdefault(id(mm.inputs[1]), (mm.inputs[1], []))[1].append((mm, 1))
    for w, uses in weights.values():
        w64 = _f64(w)
        _replace_const(graph, w, (w64[:-1] - w64[-1:]).astype(w.const.dtype), uses, "crms")
    actions: dict[int, Callable[[Node], object]] = {}
    for v, ax in proof.tracked.values():
        if not v.is_const:
            actions[id(v.producer)] = lambda n, ax=ax, d=v.type.shape[ax]: _rebuild(
                graph, n, attrs=_narrowed_attrs(n, ax, d))
    for p in plans:
        d = p.norm.inputs[0].type.shape[-1]
        actions[id(p.norm)] = lambda n: _norm_to_crms(graph, n)
        for c in p.chain:
            actions[id(c)] = lambda n, d=d: _rebuild(graph, n, attrs=_narrowed_attrs(n, n.output.type.rank - 1, d))
        for mm in p.matmuls:
            actions[id(mm)] = lambda n: _rebuild(graph, n)
    for node in list(graph.nodes):
        if id(node) in actions:
            actions[id(node)](node)


def _norm_to_crms(graph: Graph, norm: Node) -> None:
    """A folded layer_norm (γ = 1, no β) on the narrowed stream -> crms_norm(x', 1)."""
    x, gamma = norm.inputs[0], norm.inputs[1]
    ones = _replace_const(graph, gamma, np.ones(x.type.shape[-1], gamma.const.dtype), [(norm, 1)], "crms")
    _rebuild(graph, norm, op="crms_norm", inputs=[x, ones], attrs={"axis": -1, "epsilon": norm.attrs["epsilon"]})


@register_pass
@dataclass(frozen=True)
class LnToCrmsNorm(Pass):
    """Pre-LN -> Pre-CRMSNorm: the ln-to-rmsnorm proof, γ/β folded, the stream stored in d-1 dims."""

    name: ClassVar[str] = "ln-to-crmsnorm"
    untie: bool = False

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        proof = prove_stream(graph, self.untie)
        if _stopped(log, proof):
            return graph
        plans = _plans(graph, proof)
        if isinstance(plans, Refused):
            log.refuse(plans.at, plans.reason)
            return graph
        for p in plans:
            if not p.trivial:
                apply_fold(graph, p)
        proof = prove_stream(graph, self.untie)
        plans = _plans(graph, proof) if isinstance(proof, StreamProof) else proof
        if not isinstance(proof, StreamProof) or isinstance(plans, Refused):
            raise AssertionError(f"ln-to-crmsnorm: folding γ/β broke its own proof: {plans}")
        n = len(proof.constants())
        _narrow(graph, proof, plans)
        log.rewrote("graph", f"stream stored in d-1 dims: {n} write(s) centered and narrowed, "
                             f"{sum(len(p.matmuls) for p in plans)} consumer weight(s) compressed")
        for p in plans:
            log.rewrote(p.norm.output.name, "layer_norm -> crms_norm")
        return graph
