"""Canonicalization: one spelling for every computation, so later passes match one form.

``canonicalize(graph)`` rewrites the graph in place (and returns it), repeating
until nothing changes:

* constant folding of nodes whose operands are all constants (a result larger
  than ``FOLD_LIMIT`` elements is folded only when no large operand is shared
  with another user, so a weight is never duplicated; folding the transpose of
  a weight that only that transpose reads is fine);
* removal of no-op nodes: ``identity``, a ``cast`` to the operand's own dtype,
  a ``transpose`` with the identity permutation, ``sum``/``max``/``min`` of one
  operand (a node that names a graph output is kept, so output names survive);
* the pattern rewrites below, each written as ``match`` (structure only),
  ``check`` (None, or the reason the match is refused) and one shared rewrite
  (replace the matched subgraph by one canonical op):

  - ``layer-norm``: ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* g] [+ b]``
    with ``Pow(d, 2)`` or ``Mul(d, d)``, and ``Div`` by the sqrt or ``Mul`` by its
    ``Reciprocal``/``1/`` / ``Pow(-0.5)`` -> ``layer_norm{axis, epsilon}``;
  - ``rms-norm``: ``x * rsqrt(mean(x^2) + eps) [* g]`` in the same spellings, also
    with the HF LLaMA casts (``x`` widened to f32 and the result cast back) ->
    ``rms_norm{axis, epsilon}``;
  - ``gelu-erf``: ``x * 0.5 * (1 + erf(x / sqrt(2)))`` in any operand order and
    association (``Div`` by ~1.4142 or ``Mul`` by ~0.7071) -> ``gelu{approximate="none"}``;
  - ``gelu-tanh``: ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``
    -> ``gelu{approximate="tanh"}``;
  - ``silu``: ``x * sigmoid(x)`` -> ``silu``;
  - ``sum-to-add``: ``sum(a, b)`` -> ``add(a, b)`` (so the patterns above see ``add``).

  Checks are numeric: constants must be what the formula needs (exact for
  0.5, 1, 2, 3, -0.5; within ``CONST_RTOL`` for sqrt(2), sqrt(2/pi) and
  0.044715), epsilon is read from the graph, reductions must be over the
  trailing axes with keepdims, gamma/beta must have the normalized shape, the
  intermediate values must have no users outside the match, and the new op
  must have exactly the type of the value it replaces. Every rewrite is exact
  up to float rounding (the tests compare the interpreter before and after).
* dead code elimination.

``canonicalize_with_report`` also returns what changed and every refused
match with its reason (``--explain``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.interpret import run_node
from kiln.ir.registry import OpTypeError, all_ops, get_op, infer_types
from kiln.ir.types import FLOAT_DTYPES, TensorType

FOLD_LIMIT = 1 << 16
CONST_RTOL = 1e-4
MAX_ROUNDS = 8


@dataclass(frozen=True)
class Refusal:
    """A match that the check refused: which pattern, at which value, and why."""

    pattern: str
    at: str
    reason: str

    def __str__(self) -> str:
        return f"{self.pattern} at %{self.at}: {self.reason}"


@dataclass
class Report:
    """What canonicalize changed: rewrites by pattern name, folded nodes, removed no-ops, refusals."""

    rewrites: Counter = field(default_factory=Counter)
    folded: int = 0
    removed_noops: int = 0
    dead: int = 0
    refusals: list[Refusal] = field(default_factory=list)

    def refuse(self, r: Refusal) -> None:
        if r not in self.refusals:
            self.refusals.append(r)


@dataclass
class Match:
    """A structural match: the value to replace, the nodes it consumes, and the replacement op.

    ``inputs`` of the replacement may be numpy arrays; they become new constants.
    ``facts`` carries what ``check`` needs (constants seen, axes, the spelling).
    """

    root: Value
    nodes: list[Node]
    op: str
    inputs: list[Value | np.ndarray | None]
    attrs: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pattern:
    name: str
    anchor: str
    match: Callable[[Graph, Node], Match | None]
    check: Callable[[Graph, Match], str | None]


PATTERNS: list[Pattern] = []


def pattern(name: str, anchor: str, check: Callable[[Graph, Match], str | None]):
    def deco(fn: Callable[[Graph, Node], Match | None]):
        PATTERNS.append(Pattern(name, anchor, fn, check))
        return fn
    return deco


# ====================================================================== driver

def canonicalize(graph: Graph, *, explain: list[Refusal] | None = None) -> Graph:
    """Canonicalize ``graph`` in place and return it; refused matches are appended to ``explain``."""
    graph, report = canonicalize_with_report(graph)
    if explain is not None:
        explain.extend(report.refusals)
    return graph


def canonicalize_with_report(graph: Graph) -> tuple[Graph, Report]:
    report = Report()
    for _ in range(MAX_ROUNDS):
        changed = fold_constants(graph, report)
        changed += remove_noops(graph, report)
        changed += apply_patterns(graph, report)
        dead = graph.dce()
        report.dead += dead
        if not changed and not dead:
            break
    return graph, report


def apply_patterns(graph: Graph, report: Report, patterns: Sequence[Pattern] | None = None) -> int:
    ops = all_ops()
    by_anchor: dict[str, list[Pattern]] = {}
    for p in PATTERNS if patterns is None else patterns:
        by_anchor.setdefault(p.anchor, []).append(p)
    changed = 0
    for node in list(graph.nodes):
        for p in by_anchor.get(node.op, ()):
            if node.graph is not graph:
                break
            m = p.match(graph, node)
            if m is None:
                continue
            if m.op not in ops:
                reason = f"kiln has no {m.op!r} op registered"
            else:
                reason = p.check(graph, m) or _common_check(graph, m)
            if reason:
                report.refuse(Refusal(p.name, m.root.name, reason))
                continue
            _replace(graph, m)
            report.rewrites[p.name] += 1
            changed += 1
    return changed


def _common_check(graph: Graph, m: Match) -> str | None:
    """Intermediates stay inside the match, and the new op's type is the replaced value's."""
    inside = {id(n) for n in m.nodes}
    for n in m.nodes:
        for o in n.outputs:
            if o is m.root:
                continue
            if any(o is g for g in graph.outputs):
                return f"intermediate %{o.name} is a graph output"
            outside = [u for u in o.users if id(u) not in inside]
            if outside:
                return f"intermediate %{o.name} is also used by {outside[0].op} ({outside[0].name or '?'})"
    types = [None if v is None else (TensorType.of(v) if isinstance(v, np.ndarray) else v.type)
             for v in m.inputs]
    try:
        (t,) = infer_types(m.op, types, _complete(m))
    except (OpTypeError, ValueError) as e:
        return f"{m.op} refuses the operands: {e}"
    if t != m.root.type:
        return f"{m.op} would give {t}, the matched value is {m.root.type}"
    return None


def _complete(m: Match) -> dict[str, Any]:
    return all_ops()[m.op].complete_attrs(m.attrs)


def _replace(graph: Graph, m: Match) -> Value:
    anchor = m.root.producer
    name = anchor.name

    def build(names: list[str], before: Node | None) -> list[Value]:
        inputs = [graph.add_constant(v, graph.fresh_name(f"{names[0]}_{m.op}_c")) if isinstance(v, np.ndarray)
                  else v for v in m.inputs]
        return list(graph.add_node(m.op, inputs, m.attrs, before=before, name=name, out_names=names).outputs)

    return graph.replace_keeping_names([m.root], m.nodes, build)[0]


# ====================================================================== constant folding and no-ops

# A dequantize of constant codes IS the quantized weight (its storage and the integer kernel's operand):
# folding it would turn a quantized model back into a float one, so neither lifting nor canonicalize folds it.
NEVER_FOLD = frozenset(n for n, d in all_ops().items() if not d.fold)  # registry ``fold=False``


def fold_constants(graph: Graph, report: Report, limit: int | None = None) -> int:
    """Evaluate nodes whose operands are all constants; see the module docstring for the size rule."""
    limit = FOLD_LIMIT if limit is None else limit
    changed = 0
    for node in list(graph.nodes):
        ins = [v for v in node.inputs if v is not None]
        if not all(v.is_const for v in ins) or not get_op(node.op).fold:
            continue
        if not all(o.type.is_static for o in node.outputs):
            continue
        size = sum(int(np.prod(o.type.shape, dtype=np.int64)) for o in node.outputs)
        if size > limit:
            shared = [v for v in ins if v.const.size > limit
                      and (len(v.users) > 1 or any(v is g for g in graph.outputs))]
            reason = None
            if shared:
                reason = (f"folding would duplicate the large constant %{shared[0].name} "
                          f"({shared[0].type}), which other nodes also read")
            elif size > sum(v.const.size for v in ins):
                reason = f"folding would turn {sum(v.const.size for v in ins)} constant elements into {size}"
            if reason:
                report.refuse(Refusal("fold", node.outputs[0].name, reason))
                continue
        arrays = run_node(node, [None if v is None else v.const for v in node.inputs])
        if any(v.const.size > 1 and 0 in v.const.strides for v in ins):
            arrays = [_compact(a, limit) for a in arrays]
        if any(a.dtype != o.type.np_dtype or a.shape != tuple(o.type.shape) for a, o in zip(arrays, node.outputs)):
            continue  # the reference disagrees with the type rule: leave it for verify/interpret to report
        graph.replace_keeping_names(list(node.outputs), [node],
                              lambda names, _, arrays=arrays: [graph.add_constant(a, n) for a, n in zip(arrays, names)])
        report.folded += 1
        changed += 1
    return changed


def _compact(a: np.ndarray, limit: int) -> np.ndarray:
    """A large array of one repeated value as a read-only broadcast view (no memory per element).

    Folding an op over such a view (a weight lifted from ConstantOfShape) often
    materializes it; this keeps the graph, its text and its ONNX form small.
    """
    if a.size > limit and bool(np.all(a == a.reshape(-1)[0])):
        return np.broadcast_to(a.reshape(-1)[:1].reshape(()), a.shape)
    return a


def _is_noop(node: Node) -> bool:
    if node.op == "identity" or (node.op in ("sum", "max", "min") and len(node.inputs) == 1):
        return True
    x = node.inputs[0] if node.inputs else None
    if x is None or len(node.outputs) != 1:
        return False
    if node.op == "cast":
        return node.attrs.get("to") == x.type.dtype
    if node.op == "transpose":
        return list(node.attrs.get("perm") or []) == list(range(x.type.rank))
    return False


def remove_noops(graph: Graph, report: Report) -> int:
    changed = 0
    for node in list(graph.nodes):
        if not _is_noop(node):
            continue
        out = node.outputs[0]
        if any(out is g for g in graph.outputs) or out.type != node.inputs[0].type:
            continue
        graph.replace_all_uses(out, node.inputs[0])
        graph.remove(node)
        report.removed_noops += 1
        changed += 1
    return changed


# ====================================================================== matching helpers

def _scalar(v: Value | None) -> float | None:
    """The value of a constant with a single element (any shape), else None."""
    if v is None or not v.is_const or v.const.size != 1:
        return None
    return float(np.asarray(v.const, dtype=np.float64).reshape(-1)[0])


def _near(x: float | None, want: float, rtol: float = CONST_RTOL) -> bool:
    return x is not None and abs(x - want) <= rtol * abs(want)


def _is(v: Value | None, want: float) -> bool:
    return _scalar(v) == want


def _only_user(graph: Graph, v: Value) -> Node | None:
    """The one node that uses v, else None (a graph output among the users is refused by the check)."""
    users = v.users
    return users[0] if len(users) == 1 else None


def _other(node: Node, v: Value) -> Value | None:
    """The operand of binary ``node`` that is not ``v`` (v itself for ``op(v, v)``)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is v:
        return b
    if b is v:
        return a
    return None


def _prod(v: Value | None, *ops: str) -> Node | None:
    if v is None or v.producer is None or v.producer.op not in ops:
        return None
    return v.producer


def _with_const(node: Node | None, pred: Callable[[float | None], bool]) -> Value | None:
    """For binary ``node`` with a constant operand satisfying pred: the other operand."""
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if pred(_scalar(b)) and not (a is not None and a.is_const and a.const.size == 1 and pred(_scalar(a))):
        return a
    if pred(_scalar(a)):
        return b
    return None


# ====================================================================== normalization (LN and RMS)

def _square_of(v: Value) -> Value | None:
    """d when v = d^2 written as pow(d, 2) or mul(d, d)."""
    p = v.producer
    if p is None:
        return None
    if p.op == "pow" and _is(p.inputs[1], 2.0):
        return p.inputs[0]
    if p.op == "mul" and p.inputs[0] is p.inputs[1]:
        return p.inputs[0]
    return None


def _norm_core(graph: Graph, var_node: Node) -> dict[str, Any] | None:
    """Match mean(d^2) [+ eps] -> sqrt/rsqrt -> d / std or d * rstd; facts for LN/RMS."""
    sq = var_node.inputs[0]
    d = _square_of(sq)
    if d is None:
        return None
    nodes = [sq.producer, var_node]
    var = var_node.output
    facts: dict[str, Any] = {"d": d, "axes": list(var_node.attrs.get("axes") or []),
                             "keepdims": var_node.attrs.get("keepdims", 1)}
    u = _only_user(graph, var)
    if u is None:
        return None
    eps_val: Value | None = None
    if u.op == "add":
        eps_val = _other(u, var)
        nodes.append(u)
        ve = u.output
    elif u.op in ("sqrt", "pow"):
        ve = var
    else:
        return None
    facts["eps"] = _scalar(eps_val) if eps_val is not None else 0.0
    facts["eps_const"] = eps_val is None or _scalar(eps_val) is not None
    s = _only_user(graph, ve)
    if s is None:
        return None
    n_node: Node | None = None
    if s.op == "sqrt":
        nodes.append(s)
        std = s.output
        t = _only_user(graph, std)
        if t is None:
            return None
        if t.op == "add" and eps_val is None:  # sqrt(var) + eps: the wrong place for epsilon
            facts["eps_after_sqrt"] = True
            nodes.append(t)
            facts["eps"] = _scalar(_other(t, std))
            std = t.output
            t = _only_user(graph, std)
            if t is None:
                return None
        if t.op == "div" and t.inputs[1] is std and t.inputs[0] is d:  # d / std
            n_node = t
        elif t.op == "reciprocal" or (t.op == "div" and t.inputs[1] is std and _is(t.inputs[0], 1.0)):
            nodes.append(t)  # d * (1 / std)
            n_node = _only_user(graph, t.output)
            if n_node is None or n_node.op != "mul":
                return None
        else:
            return None
    elif s.op == "pow" and s.inputs[0] is ve and _is(s.inputs[1], -0.5):
        nodes.append(s)
        n_node = _only_user(graph, s.output)
        if n_node is None or n_node.op != "mul" or _other(n_node, s.output) is None:
            return None
    else:
        return None
    # n_node must combine the normalized operand d with the (r)std.
    if n_node.op == "mul" and _other(n_node, nodes[-1].output) is not d:
        return None
    nodes.append(n_node)
    facts["n"] = n_node.output
    facts["nodes"] = nodes
    return facts


def _affine(graph: Graph, v: Value, nodes: list[Node], with_bias: bool) -> tuple[Value, Value | None, Value | None]:
    """Optional ``* gamma`` then (LN) ``+ beta`` after v; returns (root, gamma, beta)."""
    gamma = beta = None
    u = _only_user(graph, v)
    if u is not None and u.op == "mul" and _other(u, v) is not None and _other(u, v) is not v:
        gamma = _other(u, v)
        nodes.append(u)
        v = u.output
        u = _only_user(graph, v)
    if with_bias and u is not None and u.op == "add" and _other(u, v) is not None and _other(u, v) is not v:
        beta = _other(u, v)
        nodes.append(u)
        v = u.output
    return v, gamma, beta


def _norm_axis(x: Value, axes: list[int]) -> tuple[int | None, str | None]:
    """The first normalized axis when ``axes`` are the trailing axes of x, else a reason."""
    r = x.type.rank
    norm = sorted(a + r if a < 0 else a for a in axes)
    if not norm:
        return None, "the reduction is over all axes (no axes given)"
    if norm != list(range(norm[0], r)):
        return None, f"it reduces over axes {axes} of {x.type}, not the trailing axes"
    return norm[0], None


def _param(p: Value | None, x: Value, axis: int, what: str) -> tuple[Value | np.ndarray | None, str | None]:
    """gamma/beta as the normalized shape x.shape[axis:]; a constant may drop or add leading 1s."""
    want = tuple(x.type.shape[axis:])
    if p is None:
        return None, None
    shape = tuple(p.type.shape)
    core = shape
    while len(core) > len(want) and core[0] == 1:
        core = core[1:]
    if core == want:
        if shape == want:
            return p, None
        if p.is_const:
            return np.ascontiguousarray(p.const.reshape(tuple(int(d) for d in want))), None
        return None, f"{what} %{p.name} has shape {list(shape)} with leading 1s and is not a constant"
    if p.is_const and p.const.size == 1 and all(isinstance(d, int) for d in want):
        return np.full(tuple(int(d) for d in want), p.const.reshape(-1)[0], dtype=p.const.dtype), None
    return None, f"{what} %{p.name} has shape {list(shape)}, not the normalized shape {list(want)}"


def _norm_check_common(f: dict[str, Any], x: Value) -> str | None:
    if x.type.dtype not in FLOAT_DTYPES:
        return f"the input is {x.type.dtype}, not a float"
    if f.get("eps_after_sqrt"):
        return "epsilon is added after the square root (sqrt(var) + eps), which the norm ops cannot express"
    if not f["eps_const"] or f["eps"] is None:
        return "epsilon is not a scalar constant"
    if f["eps"] < 0 or not math.isfinite(f["eps"]):
        return f"epsilon {f['eps']} is not a finite non-negative number"
    if not f["keepdims"]:
        return "the variance reduction does not keep dims"
    return None


def _ln_check(graph: Graph, m: Match) -> str | None:
    f = m.facts
    x = f["x"]
    reason = _norm_check_common(f, x)
    if reason:
        return reason
    axis, reason = _norm_axis(x, f["axes"])
    if reason:
        return reason
    mean_axes = sorted(a % x.type.rank for a in f["mean_axes"])
    if mean_axes != sorted(a % x.type.rank for a in f["axes"]) or not f["mean_keepdims"]:
        return f"the mean is taken over axes {f['mean_axes']} but the variance over {f['axes']}"
    return _finish_params(m, x, axis, bias=True)


def _finish_params(m: Match, x: Value, axis: int, bias: bool) -> str | None:
    f = m.facts
    gamma, reason = _param(f["gamma"], x, axis, "gamma")
    if reason:
        return reason
    if gamma is None:
        want = x.type.shape[axis:]
        if not all(isinstance(d, int) for d in want):
            return f"no gamma, and the normalized shape {list(want)} is not static"
        gamma = np.ones(tuple(int(d) for d in want), dtype=x.type.np_dtype)
    beta = None
    if bias:
        beta, reason = _param(f["beta"], x, axis, "beta")
        if reason:
            return reason
    m.inputs = [x, gamma] + ([beta] if beta is not None else [])
    m.attrs = {"axis": axis - x.type.rank, "epsilon": float(f["eps"])}  # counted from the end
    return None


def _rms_check(graph: Graph, m: Match) -> str | None:
    f = m.facts
    x = f["x"]
    reason = _norm_check_common(f, f["d"])
    if reason:
        return reason
    axis, reason = _norm_axis(x, f["axes"])
    if reason:
        return reason
    return _finish_params(m, x, axis, bias=False)


@pattern("layer-norm", "reduce_mean", _ln_check)
def match_layer_norm(graph: Graph, node: Node) -> Match | None:
    f = _norm_core(graph, node)
    if f is None:
        return None
    sub = _prod(f["d"], "sub")
    mean = _prod(sub.inputs[1], "reduce_mean") if sub is not None else None
    if mean is None or mean.inputs[0] is not sub.inputs[0]:
        return None
    x = sub.inputs[0]
    nodes = [mean, sub] + f["nodes"]
    root, gamma, beta = _affine(graph, f["n"], nodes, with_bias=True)
    f.update(x=x, gamma=gamma, beta=beta, mean_axes=list(mean.attrs.get("axes") or []),
             mean_keepdims=mean.attrs.get("keepdims", 1))
    return Match(root, nodes, "layer_norm", [], {}, f)


@pattern("rms-norm", "reduce_mean", _rms_check)
def match_rms_norm(graph: Graph, node: Node) -> Match | None:
    f = _norm_core(graph, node)
    if f is None:
        return None
    d = f["d"]
    sub = _prod(d, "sub")
    if sub is not None and _prod(sub.inputs[1], "reduce_mean") is not None \
            and sub.inputs[1].producer.inputs[0] is sub.inputs[0]:
        return None  # a layer norm
    nodes = list(f["nodes"])
    x, after = d, f["n"]
    # HF LLaMA: x = cast(x0 -> f32); ...; cast(n -> x0's dtype) before the gamma multiply.
    widen = _prod(d, "cast")
    back = _only_user(graph, after)
    if widen is not None and back is not None and back.op == "cast" \
            and back.attrs.get("to") == widen.inputs[0].type.dtype \
            and widen.inputs[0].type.dtype in FLOAT_DTYPES \
            and _wider(d.type.dtype, widen.inputs[0].type.dtype):
        x = widen.inputs[0]
        nodes = [widen] + nodes + [back]
        after = back.output
    root, gamma, _ = _affine(graph, after, nodes, with_bias=False)
    f.update(x=x, gamma=gamma, beta=None)
    return Match(root, nodes, "rms_norm", [], {}, f)


def _wider(a: str, b: str) -> bool:
    """a can hold every value of b exactly (f32 vs f16/bf16, f64 vs f32...)."""
    order = {"f16": 1, "bf16": 1, "f32": 2, "f64": 3}
    return order[a] > order[b] or a == b


# ====================================================================== GELU and SiLU

def _is_half(node: Node | None, x: Value) -> bool:
    """node computes x * 0.5 (either order) or x / 2."""
    if node is None:
        return False
    if node.op == "mul":
        return _is(_other(node, x), 0.5)
    return node.op == "div" and node.inputs[0] is x and _is(node.inputs[1], 2.0)


def _half_x_times(graph: Graph, a: Value, x: Value, nodes: list[Node]) -> Value | None:
    """The value 0.5 * x * a (any association/order), appending the nodes; None when it is not there."""
    m1 = _only_user(graph, a)
    if m1 is None or m1.op != "mul":
        return None
    p = _other(m1, a)
    if p is None:
        return None
    nodes.append(m1)
    if p is x:  # (x * a) * 0.5  or  (x * a) / 2
        m2 = _only_user(graph, m1.output)
        if m2 is not None and _is_half(m2, m1.output):
            nodes.append(m2)
            return m2.output
        return None
    if _is(p, 0.5):  # (0.5 * a) * x
        m2 = _only_user(graph, m1.output)
        if m2 is not None and m2.op == "mul" and _other(m2, m1.output) is x:
            nodes.append(m2)
            return m2.output
        return None
    h = p.producer
    if _is_half(h, x):  # (0.5 * x) * a
        nodes.insert(0, h)
        return m1.output
    return None


def _gelu_check(graph: Graph, m: Match) -> str | None:
    f = m.facts
    x = m.inputs[0]
    if x.type.dtype not in FLOAT_DTYPES:
        return f"the input is {x.type.dtype}, not a float"
    for name, (got, want) in f["consts"].items():
        if not _near(got, want):
            return f"the constant {name} is {got}, expected {want:.9g}"
    return None


@pattern("gelu-erf", "erf", _gelu_check)
def match_gelu_erf(graph: Graph, node: Node) -> Match | None:
    t = node.inputs[0]
    p = t.producer
    if p is None or p.op not in ("div", "mul"):
        return None
    if p.op == "div":
        x, c = p.inputs[0], p.inputs[1]
        want = math.sqrt(2.0)
    else:
        x = _with_const(p, lambda v: v is not None)
        c = _other(p, x) if x is not None else None
        want = math.sqrt(0.5)
    if x is None or _scalar(c) is None or x.is_const:
        return None
    nodes = [p, node]
    add = _only_user(graph, node.output)
    if add is None or add.op != "add" or not _is(_other(add, node.output), 1.0):
        return None
    nodes.append(add)
    root = _half_x_times(graph, add.output, x, nodes)
    if root is None:
        return None
    return Match(root, nodes, "gelu", [x], {"approximate": "none"},
                 {"consts": {"sqrt(2)" if p.op == "div" else "1/sqrt(2)": (_scalar(c), want)}})


def _cube_of(v: Value) -> Value | None:
    """x when v = x^3 written as pow(x, 3), x*(x*x) or (x*x)*x; also returns via attribute the nodes."""
    p = v.producer
    if p is None:
        return None
    if p.op == "pow" and _is(p.inputs[1], 3.0):
        return p.inputs[0]
    if p.op == "mul":
        a, b = p.inputs
        for sq, x in ((a, b), (b, a)):
            q = sq.producer
            if q is not None and q.op == "mul" and q.inputs[0] is x and q.inputs[1] is x:
                return x
    return None


def _cube_nodes(v: Value) -> list[Node]:
    p = v.producer
    if p.op == "pow":
        return [p]
    a, b = p.inputs
    inner = a.producer if a.producer is not None and a.producer.op == "mul" and a.producer.inputs[0] is b \
        else b.producer
    return [inner, p]


@pattern("gelu-tanh", "tanh", _gelu_check)
def match_gelu_tanh(graph: Graph, node: Node) -> Match | None:
    u = node.inputs[0]
    pu = _prod(u, "mul")
    if pu is None:
        return None
    v = _with_const(pu, lambda c: c is not None)
    c1 = _other(pu, v) if v is not None else None
    pv = _prod(v, "add")
    if pv is None:
        return None
    for x, w in ((pv.inputs[0], pv.inputs[1]), (pv.inputs[1], pv.inputs[0])):
        pw = _prod(w, "mul")
        if pw is None:
            continue
        cube = _with_const(pw, lambda c: c is not None)
        if cube is None or _cube_of(cube) is not x:
            continue
        c2 = _other(pw, cube)
        nodes = _cube_nodes(cube) + [pw, pv, pu, node]
        add = _only_user(graph, node.output)
        if add is None or add.op != "add" or not _is(_other(add, node.output), 1.0):
            return None
        nodes.append(add)
        root = _half_x_times(graph, add.output, x, nodes)
        if root is None:
            return None
        consts = {"sqrt(2/pi)": (_scalar(c1), math.sqrt(2.0 / math.pi)), "0.044715": (_scalar(c2), 0.044715)}
        return Match(root, nodes, "gelu", [x], {"approximate": "tanh"}, {"consts": consts})
    return None


def _no_check(graph: Graph, m: Match) -> str | None:
    return None


@pattern("sum-to-add", "sum", _no_check)
def match_sum_of_two(graph: Graph, node: Node) -> Match | None:
    """sum(a, b) is add(a, b): one spelling for the binary sum (ONNX function bodies use Sum)."""
    if len(node.inputs) != 2:
        return None
    return Match(node.output, [node], "add", list(node.inputs), {})


def _silu_check(graph: Graph, m: Match) -> str | None:
    x = m.inputs[0]
    if x.type.dtype not in FLOAT_DTYPES:
        return f"the input is {x.type.dtype}, not a float"
    return None


@pattern("silu", "sigmoid", _silu_check)
def match_silu(graph: Graph, node: Node) -> Match | None:
    x = node.inputs[0]
    m = _only_user(graph, node.output)
    if m is None or m.op != "mul" or _other(m, node.output) is not x:
        return None
    return Match(m.output, [node, m], "silu", [x], {})


__all__ = ["FOLD_LIMIT", "PATTERNS", "Match", "Pattern", "Refusal", "Report", "apply_patterns",
           "canonicalize", "canonicalize_with_report", "fold_constants", "remove_noops"]
