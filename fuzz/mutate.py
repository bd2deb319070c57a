"""Mutators of the fuzzer: graph mutators (Tzer's insert/delete/flip, on kiln's IR) and pass-pipeline mutators.

Graph mutators take a graph and a ``np.random.Generator`` and return a NEW graph
(they work on ``graph.clone()``, with fused-block names cleared, since the
result is a new input to the pipeline) that passes ``ir.verify`` and prints to
IR text that parses back; they raise :class:`MutationFailed` when no site fits,
and the caller (:func:`mutate_graph`) tries another mutator. Every unread value
of a result is a graph output, as in generated graphs.

Pipeline mutators work on lists of pass strings (``"fold-conv-bn{mode=tune}"``)
drawn from :data:`PASS_POOL`, which is derived from the registered passes and
their dataclass options, so a new pass or option is picked up without editing
this module. Any order of passes parses; ``fuse-blocks`` may sit anywhere
(``ir.verify`` lets later passes add nodes without a block), so the mutators
do not pin it to the end.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.tensor import INT64_MAX
from kiln.ir.registry import OpTypeError, all_ops, get_op, infer_types
from kiln.ir.types import TensorType
from kiln.ir.verify import VerifyError
from kiln.passes.manager import PipelineError, parse_pipeline, registered_passes

from .generate import (
    PATTERNS,
    QTYPES,
    Builder,
    GenFailed,
    _rollback,
    finalize_outputs,
    ops_in_group,
    random_op,
    toposort,
    try_build,
)

__all__ = ["GRAPH_MUTATORS", "PASS_POOL", "PIPELINE_MUTATORS", "MutationFailed", "crossover_graphs",
           "crossover_pipelines", "mutate_graph", "mutate_pipeline", "pass_pool", "random_pipeline",
           "rebuild"]

MAX_PIPELINE = 10


class MutationFailed(Exception):
    """No site of the graph fits this mutator; the caller tries another one."""


Mutator = Callable[[Graph, np.random.Generator], Graph]


# ====================================================================== helpers


def _start(graph: Graph) -> Graph:
    """A copy to mutate, with fused-block names cleared."""
    g = graph.clone()
    for n in g.nodes:
        n.block = ""
    return g


def _finish(g: Graph) -> Graph:
    """Topological order restored, unread values made outputs, unread constants dropped, verified."""
    if not g.nodes:
        raise MutationFailed("the mutation left no node")
    toposort(g)
    bad = _bad_indices(g)
    if bad:
        raise MutationFailed(bad)
    try:
        return finalize_outputs(g)
    except VerifyError as e:  # a mutator bug, not a finding: say so loudly
        raise AssertionError(f"mutator produced an invalid graph: {e}") from e


def _bad_indices(g: Graph) -> str | None:
    """Why a gather's constant indices no longer fit its data (type rules do not look at index values)."""
    for n in g.nodes:
        if n.op not in ("gather", "gather_elements") or not n.inputs[1].is_const:
            continue
        x, idx = n.inputs[0].type, np.asarray(n.inputs[1].const)
        ax = n.attrs.get("axis", 0) % x.rank
        d = x.shape[ax]
        if idx.size and (idx.min() < -d or idx.max() >= d):
            return f"{n.op} %{n.outputs[0].name}: constant indices out of range for dim {d}"
        if n.op == "gather_elements" and any(i != ax and idx.shape[i] > x.shape[i] for i in range(x.rank)):
            return f"gather_elements %{n.outputs[0].name}: indices {idx.shape} exceed the data {x.shape}"
    return None


def _pick(rng: np.random.Generator, seq: Sequence):
    if not seq:
        raise MutationFailed("nothing to choose from")
    return seq[int(rng.integers(len(seq)))]


def _shuffled(rng: np.random.Generator, seq: Sequence) -> list:
    return [seq[int(i)] for i in rng.permutation(len(seq))]


def _ancestors(v: Value) -> set[int]:
    """ids of the nodes ``v`` depends on (its producer included)."""
    seen: set[int] = set()
    stack = [v.producer] if v.producer is not None else []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(u.producer for u in n.inputs if u is not None and u.producer is not None)
    return seen


def _rewire_users(g: Graph, old: Value, new: Value, uses: list[tuple[Node, int]], rng: np.random.Generator,
                  p: float = 0.6) -> bool:
    """Point some of ``uses`` (of ``old``) at ``new`` when the types match and no cycle arises."""
    if new.type != old.type or not uses or rng.random() >= p:
        return False
    anc = _ancestors(new)
    done = False
    for node, i in uses:
        if id(node) not in anc and node.inputs[i] is old and rng.random() < 0.7:
            g.set_input(node, i, new)
            done = True
    return done


def rebuild(graph: Graph, *, input_types: dict[str, TensorType] | None = None,
            constants: dict[str, np.ndarray] | None = None,
            attrs: dict[int, dict] | None = None) -> Graph:
    """``graph`` rebuilt with every node's types re-inferred (OpTypeError when a type rule refuses).

    ``input_types`` retypes inputs by name, ``constants`` replaces constant data by
    name, ``attrs`` replaces a node's attributes (keyed by ``id(node)`` of ``graph``).
    """
    input_types, constants, attrs = input_types or {}, constants or {}, attrs or {}
    g = Graph(graph.name, graph.meta)
    vmap: dict[int, Value] = {}
    for v in graph.inputs:
        vmap[id(v)] = g.add_input(v.name, input_types.get(v.name, v.type))
    for name, v in graph.constants.items():
        vmap[id(v)] = g.add_constant(constants.get(name, v.const), name)
    for n in graph.nodes:
        ins = [None if v is None else vmap[id(v)] for v in n.inputs]
        a = get_op(n.op).complete_attrs(attrs.get(id(n), n.attrs))
        types = infer_types(n.op, [None if v is None else v.type for v in ins], a)
        if len(types) != len(n.outputs):
            raise OpTypeError(f"{n.op} would have {len(types)} outputs instead of {len(n.outputs)}")
        m = g.make_node(n.op, ins, a, name=n.name, out_types=types, out_names=[o.name for o in n.outputs])
        g.nodes.append(m)
        for a, b in zip(n.outputs, m.outputs):
            vmap[id(a)] = b
    g.set_outputs(vmap[id(v)] for v in graph.outputs)
    return g


def _rebuilt(graph: Graph, **kw) -> Graph:
    """:func:`rebuild` that raises MutationFailed, and refuses results with huge values."""
    try:
        g = rebuild(graph, **kw)
    except (OpTypeError, ValueError, KeyError, IndexError) as e:
        raise MutationFailed(str(e)) from None
    if any(isinstance(d, int) and d > 4096 for v in g.values() for d in v.type.shape) or \
            any(int(np.prod(v.type.shape)) > 1 << 16 for v in g.values() if v.type.is_static):
        raise MutationFailed("the mutation makes a value too large")
    return g


# ====================================================================== graph mutators


def insert_op(graph: Graph, rng: np.random.Generator) -> Graph:
    """A random op on an existing value; its output rewired into some users of that value, or a new output."""
    g = _start(graph)
    b = Builder(g, rng)
    cands = [v for v in g.values() if not v.is_const]
    for _ in range(12):
        v = _pick(rng, cands)
        uses = list(v.uses)
        out = try_build(b, random_op(b), v)
        if out is not None:
            _rewire_users(g, v, out, uses, rng)
            return _finish(g)
    raise MutationFailed("no op fits any value tried")


def delete_op(graph: Graph, rng: np.random.Generator) -> Graph:
    """Remove a node: its readers read a same-typed operand instead, or a new graph input."""
    g = _start(graph)
    nodes = [n for n in g.nodes if len(n.outputs) == 1]
    if len(g.nodes) < 2 or not nodes:
        raise MutationFailed("nothing to delete")
    n = _pick(rng, nodes)
    o = n.output
    same = [v for v in n.inputs if v is not None and v.type == o.type]
    if same and rng.random() < 0.85:
        repl = _pick(rng, same)
    else:
        repl = g.add_input(g.fresh_name(f"{o.name}_in"), o.type)
    g.replace_all_uses(o, repl)
    g.remove(n)
    g.dce()
    return _finish(g)


def _classes_of(op: str) -> tuple[str, ...]:
    """The ops that may replace ``op``: the members of its registry ``group`` (an op whose group is
    ``g/source`` is replaced by members of ``g`` but never chosen, e.g. div, exp, log)."""
    group = get_op(op).group if op in all_ops() else None
    if not group:
        return ()
    return ops_in_group(group.split("/")[0])


def _retarget_inputs(op: str, inputs: list[Value | None]) -> list[Value | None]:
    """The operands of a node of the same family for op ``op`` (norms differ in bias)."""
    if op in ("rms_norm", "crms_norm"):
        return inputs[:2]
    return inputs


def replace_op(graph: Graph, rng: np.random.Generator) -> Graph:
    """Swap a node's op for another of its family with the same arity and output type (add<->sub, relu<->gelu...)."""
    g = _start(graph)
    sites = [n for n in g.nodes if _classes_of(n.op)]
    for n in _shuffled(rng, sites)[:8]:
        for op in _shuffled(rng, [o for o in _classes_of(n.op) if o != n.op]):
            schema = get_op(op).attrs
            attrs = {k: v for k, v in n.attrs.items() if k in schema}
            ins = _retarget_inputs(op, list(n.inputs))
            try:
                types = infer_types(op, [None if v is None else v.type for v in ins], attrs)
            except OpTypeError:
                continue
            if types != [o.type for o in n.outputs]:
                continue
            new = g.add_node(op, ins, attrs, before=n, name=n.name)
            for a, c in zip(n.outputs, new.outputs):
                g.replace_all_uses(a, c)
            g.remove(n)
            g.dce()
            return _finish(g)
    raise MutationFailed("no node has a same-typed sibling op")


_FLAGS = frozenset({"keepdims", "ceil_mode", "exclusive", "reverse", "select_last_index", "upper",
                    "count_include_pad", "fmod", "allowzero"})


def _int_candidates(node: Node, name: str, v: int) -> list:
    r = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else 1
    if name in _FLAGS:
        return [1 - v if v in (0, 1) else 0]
    if name == "axis":
        return [-1, 0, r - 1, -r, r, 1]
    if name == "group":
        c = node.inputs[0].type.shape[1] if r >= 2 else 1
        return [1, c, 2, v * 2]
    if name == "size":
        return [1, 2, 5, v + 1]
    if name == "k":
        return [0, -1, 1, 100, -100]
    if name == "block_size":
        return [0, 1, 2, v + 1]
    if name in ("start", "end"):
        return [0, -1, r, -r - 1, 100, None]
    return [0, 1, -1, v + 1, v - 1, 2 ** 31 - 1]


def _float_candidates(node: Node, name: str, v: float | None) -> list:
    if name == "epsilon":
        return [1e-12, 0.0, 1.0, 1e-3]
    if name in ("min", "max"):
        other = node.attrs.get("max" if name == "min" else "min")
        return [None, 0.0, -0.0, other, 1e30, -1.0]
    if name in ("start", "limit", "delta"):
        return [0.0, 1.0, -1.0, 0.5, (v or 0.0) + 1.0]
    return [0.0, 1.0, -1.0, 1e-6, 1e4]


def _ints_candidates(node: Node, name: str, v: list[int]) -> list:
    r = node.inputs[0].type.rank if node.inputs and node.inputs[0] is not None else 1
    cands: list[list[int]] = [[], list(reversed(v)), [x + 1 for x in v], [max(x - 1, 0) for x in v],
                              [1] * len(v), [0] * len(v), [-1] * len(v)]
    if name == "axes":
        cands += [[-1], [0], [r - 1], list(range(r))]
    elif name == "perm":
        cands += [list(range(r)), list(range(r))[1:] + [0]]
    elif name in ("starts", "ends"):
        cands += [[-x for x in v], [INT64_MAX] * len(v), [-INT64_MAX] * len(v)]
    elif name == "steps":
        cands += [[-1] * len(v), [2] * len(v)]
    elif name == "shape":
        cands += [[-1], [1, -1], [0] * len(v), [1] + v]
    elif name in ("pads", "strides", "dilations", "kernel_shape", "output_padding"):
        cands += [[2] * len(v), [x * 2 for x in v]]
    elif name == "split":
        cands += [v[::-1], [sum(v)], v + [0]]
    return cands


def _attr_candidates(node: Node, name: str) -> list:
    kind = get_op(node.op).attrs[name].kind
    v = node.attrs.get(name)
    if kind == "int":
        cands = _int_candidates(node, name, v if isinstance(v, int) else 0)
    elif kind == "float":
        cands = _float_candidates(node, name, v)
    elif kind == "str":
        cands = {"approximate": ["none", "tanh"], "mode": ["constant", "reflect", "edge", "wrap"]}.get(
            name, [""])
    elif kind == "dtype":
        cands = list(QTYPES) + ["i4"] if node.op == "quantize" else ["f32", "f64", "i64", "i32", "bool", "f16",
                                                                     "i8", "u8"]
    elif kind == "ints":
        cands = _ints_candidates(node, name, list(v or []))
    else:
        cands = []
    return [c for c in cands if c != v]


def mutate_attr(graph: Graph, rng: np.random.Generator) -> Graph:
    """Set one attribute to a boundary value (0, ±1, rank-1, eps tiny, groups...); the graph is re-inferred."""
    g = _start(graph)
    sites = [(n, k) for n in g.nodes for k in get_op(n.op).attrs]
    for n, name in _shuffled(rng, sites)[:10]:
        for c in _shuffled(rng, _attr_candidates(n, name)):
            attrs = dict(n.attrs)
            attrs[name] = c
            try:
                attrs = get_op(n.op).complete_attrs(attrs)
            except OpTypeError:
                continue
            try:
                return _finish(_rebuilt(g, attrs={id(n): attrs}))
            except MutationFailed:
                continue
    raise MutationFailed("no attribute takes a boundary value here")


# Operands with a domain (a variance, a divisor, a log's argument...): rewiring them would mostly
# make NaN/Inf, which the campaign filters out, so they are left alone.
DOMAIN_OPERANDS = frozenset({("batch_norm", 4), ("log", 0), ("sqrt", 0), ("reciprocal", 0), ("div", 1),
                             ("mod", 1), ("pow", 0), ("quantize", 1), ("dequantize", 1)})


def rewire(graph: Graph, rng: np.random.Generator) -> Graph:
    """Point one operand at another value defined before its node that keeps the node's output types."""
    g = _start(graph)
    earlier: list[Value] = list(g.inputs) + list(g.constants.values())
    sites: list[tuple[Node, int, list[Value]]] = []
    for n in g.nodes:
        for i, v in enumerate(n.inputs):
            if v is not None and (n.op, i) not in DOMAIN_OPERANDS:
                sites.append((n, i, list(earlier)))
        earlier.extend(n.outputs)
    for n, i, pool in _shuffled(rng, sites)[:12]:
        cur = n.inputs[i]
        same = [v for v in pool if v is not cur and v.type == cur.type]
        others = [v for v in pool if v is not cur and v.type != cur.type and v.type.dtype == cur.type.dtype]
        for v in _shuffled(rng, same) + _shuffled(rng, others)[:6]:
            if v.type != cur.type:
                ts = [None if u is None else (v.type if k == i else u.type) for k, u in enumerate(n.inputs)]
                try:
                    if infer_types(n.op, ts, n.attrs) != [o.type for o in n.outputs]:
                        continue
                except OpTypeError:
                    continue
            g.set_input(n, i, v)
            g.dce()
            return _finish(g)
    raise MutationFailed("no operand has an alternative of a fitting type")


def change_shape(graph: Graph, rng: np.random.Generator) -> Graph:
    """Grow or shrink one dim of one input and re-infer the graph (MutationFailed when a type rule refuses)."""
    g = _start(graph)
    sites = [(v, k) for v in g.inputs for k in range(v.type.rank) if isinstance(v.type.shape[k], int)]
    for v, k in _shuffled(rng, sites)[:8]:
        d = v.type.shape[k]
        for nd in _shuffled(rng, sorted({max(1, d - 1), d + 1, 1, 2 * d, 3} - {d})):
            shape = list(v.type.shape)
            shape[k] = nd
            try:
                return _finish(_rebuilt(g, input_types={v.name: v.type.with_shape(tuple(shape))}))
            except MutationFailed:
                continue
    raise MutationFailed("no input dim can change without breaking a type rule")


_OTHER_FLOAT = {"f32": "f64", "f64": "f32"}


def change_dtype(graph: Graph, rng: np.random.Generator) -> Graph:
    """f32 <-> f64 for the whole graph (inputs and constants), or one input given in the other dtype plus a cast."""
    g = _start(graph)
    floats = [v for v in g.inputs if v.type.dtype in _OTHER_FLOAT]
    if rng.random() < 0.5:
        src = _pick(rng, ["f32", "f64"])
        dst = _OTHER_FLOAT[src]
        types = {v.name: v.type.with_dtype(dst) for v in g.inputs if v.type.dtype == src}
        consts = {k: c.const.astype(TensorType(dst, ()).np_dtype)
                  for k, c in g.constants.items() if c.type.dtype == src}
        if types or consts:
            try:
                return _finish(_rebuilt(g, input_types=types, constants=consts))
            except MutationFailed:
                pass
    if not floats:
        raise MutationFailed("no float input")
    x = _pick(rng, floats)
    x2 = g.add_input(g.fresh_name(f"{x.name}_{_OTHER_FLOAT[x.type.dtype]}"), x.type.with_dtype(
        _OTHER_FLOAT[x.type.dtype]))
    y = g.op("cast", x2, to=x.type.dtype)
    g.nodes.insert(0, g.nodes.pop())
    g.replace_all_uses(x, y)
    g.inputs.remove(x)
    return _finish(g)


def insert_pattern(graph: Graph, rng: np.random.Generator) -> Graph:
    """Splice a pattern (Pre-LN stream, conv-bn, norm->linear, QDQ, attention, decomposed norm) onto a value."""
    g = _start(graph)
    b = Builder(g, rng)
    cands = [v for v in g.values() if not v.is_const and v.type.dtype in ("f32", "f64", "i64")
             and 1 <= v.type.rank <= 4]
    for _ in range(6):
        v = _pick(rng, cands)
        kind = _pick(rng, list(PATTERNS))
        uses = list(v.uses)
        snap = (len(g.nodes), set(g.constants), len(g.inputs))
        try:
            out = PATTERNS[kind](b, v)
        except (GenFailed, OpTypeError, ValueError, IndexError):
            _rollback(g, *snap)
            continue
        _rewire_users(g, v, out, uses, rng, p=0.8)
        return _finish(g)
    raise MutationFailed("no pattern fits")


GRAPH_MUTATORS: dict[str, Mutator] = {
    "insert-op": insert_op,
    "delete-op": delete_op,
    "replace-op": replace_op,
    "mutate-attr": mutate_attr,
    "rewire": rewire,
    "change-shape": change_shape,
    "change-dtype": change_dtype,
    "insert-pattern": insert_pattern,
}


def mutate_graph(graph: Graph, rng: np.random.Generator) -> tuple[Graph, str]:
    """One mutation by a random mutator (others tried on MutationFailed); (new graph, mutator name).

    The result differs from ``graph`` in its printed text; when no mutator
    succeeds, insert-op is retried until one does.
    """
    from kiln.ir.text import print_graph

    before = print_graph(graph)
    names = list(GRAPH_MUTATORS)
    for name in _shuffled(rng, names) + ["insert-op"] * 8:
        try:
            g = GRAPH_MUTATORS[name](graph, rng)
        except MutationFailed:
            continue
        if print_graph(g) != before:
            return g, name
    raise MutationFailed("no mutator changed the graph")


def crossover_graphs(a: Graph, b: Graph, rng: np.random.Generator) -> Graph:
    """A copy of ``a`` with a backward slice (up to 5 nodes) of ``b`` spliced in.

    The slice's constants are copied; each of its other free operands is mapped to
    a value of ``a`` of the same type, else of the same dtype (the slice's types are
    then re-inferred), else to a new graph input; at least one must map onto ``a``,
    else MutationFailed. The slice's result is rewired into readers of a
    same-typed value of ``a`` or becomes an output.
    """
    g = _start(a)
    if not b.nodes:
        raise MutationFailed("b has no node")
    for _ in range(10):
        root = _pick(rng, b.nodes)
        chain = _slice_of(root, int(rng.integers(1, 6)))
        out = _splice(g, chain, rng)
        if out is None:
            continue
        targets = [u for u in g.values() if u.type == out.type and u.uses and id(u) not in _ancestors(out)]
        if targets:
            t = _pick(rng, targets)
            _rewire_users(g, t, out, list(t.uses), rng, p=0.7)
        return _finish(g)
    raise MutationFailed("no slice of b fits a")


def _splice(g: Graph, chain: list[Node], rng: np.random.Generator) -> Value | None:
    """Copy ``chain`` (nodes of another graph) into ``g`` on mapped operands; its last output, or None."""
    members = {id(n) for n in chain}
    free = [v for n in chain for v in n.inputs
            if v is not None and (v.producer is None or id(v.producer) not in members)]
    free_vals = list({id(v): v for v in free if not v.is_const}.values())
    mine = [u for u in g.values() if not u.is_const]
    snap = (len(g.nodes), set(g.constants), len(g.inputs))
    vmap: dict[int, Value] = {}
    mapped = 0
    for v in free_vals:
        pool = [u for u in mine if u.type == v.type] or \
            [u for u in mine if u.type.dtype == v.type.dtype and u.type.rank == v.type.rank]
        if pool and rng.random() < 0.9:
            vmap[id(v)] = _pick(rng, pool)
            mapped += 1
        else:
            vmap[id(v)] = g.add_input(g.fresh_name(v.name), v.type)
    if not mapped:
        _rollback(g, *snap)
        return None
    for v in free:
        if v.is_const and id(v) not in vmap:
            vmap[id(v)] = g.add_constant(v.const, g.fresh_name(v.name))
    try:
        for n in chain:
            m = g.add_node(n.op, [None if v is None else vmap[id(v)] for v in n.inputs], n.attrs)
            if any(int(np.prod(o.type.shape)) > 4096 for o in m.outputs if o.type.is_static):
                raise OpTypeError("too large")
            for o, mo in zip(n.outputs, m.outputs):
                vmap[id(o)] = mo
    except OpTypeError:
        _rollback(g, *snap)
        return None
    if _bad_indices(g):
        _rollback(g, *snap)
        return None
    return vmap[id(chain[-1].outputs[0])]


def _slice_of(root: Node, k: int) -> list[Node]:
    """``root`` and up to ``k - 1`` of its nearest producers, in graph order (producers first)."""
    chain = [root]
    frontier = [root]
    while frontier and len(chain) < k:
        n = frontier.pop(0)
        for v in n.inputs:
            if v is not None and v.producer is not None and v.producer not in chain and len(chain) < k:
                chain.append(v.producer)
                frontier.append(v.producer)
    order = {id(n): i for i, n in enumerate(root.graph.nodes)}
    return sorted(chain, key=lambda n: order[id(n)])


# ====================================================================== pass pipelines


def _option_values(cls: type, f: dataclasses.Field) -> list:
    """Non-default values worth trying for one option of a pass (from its type and its module's constants)."""
    d = f.default
    if isinstance(d, bool):
        return [not d]
    if isinstance(d, int):
        return sorted({1, 2, 4, max(d // 2, 1), d * 2} - {d})
    if isinstance(d, float):
        return sorted({0.0, d / 2, d * 2} - {d})
    if isinstance(d, str):
        mod = sys.modules.get(cls.__module__)
        vals: set[str] = set()
        for obj in vars(mod).values() if mod else ():
            if isinstance(obj, (tuple, list, frozenset, set)) and d in obj and all(isinstance(x, str) for x in obj):
                vals.update(obj)
        return sorted(vals - {d})
    return []


def _fmt(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def pass_pool() -> list[str]:
    """Every registered pass by name, plus each of its options set to each non-default value tried."""
    pool: list[str] = []
    for name, cls in sorted(registered_passes().items()):
        pool.append(name)
        for f in dataclasses.fields(cls):
            for v in _option_values(cls, f):
                text = f"{name}{{{f.name}={_fmt(v)}}}"
                try:
                    parse_pipeline(text)
                except PipelineError:
                    continue
                pool.append(text)
    return pool


PASS_POOL: list[str] = pass_pool()


def _name(p: str) -> str:
    return p.split("{", 1)[0]


def legal_order(passes: list[str]) -> list[str]:
    """``passes`` if the pass manager accepts their order, else with every pass that may not follow
    fuse-blocks moved before the first fuse-blocks (``check_order``: only dce and fuse-blocks may)."""
    try:
        parse_pipeline(",".join(passes))
        return passes
    except PipelineError:
        pass
    keeps = {n for n, c in registered_passes().items() if c.keeps_blocks}
    first = next(i for i, p in enumerate(passes) if _name(p) == "fuse-blocks")
    head, tail = passes[:first], passes[first:]
    return head + [p for p in tail if _name(p) not in keeps] + [p for p in tail if _name(p) in keeps]


def random_pipeline(rng: np.random.Generator, pool: Sequence[str] | None = None, max_len: int = 6) -> list[str]:
    """1..``max_len`` passes drawn (with repetition) from ``pool``, in an order the pass manager accepts."""
    pool = list(pool or PASS_POOL)
    return legal_order([_pick(rng, pool) for _ in range(int(rng.integers(1, max(max_len, 1) + 1)))])


def _add(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    if len(p) >= MAX_PIPELINE:
        return None
    i = int(rng.integers(len(p) + 1))
    return p[:i] + [_pick(rng, pool)] + p[i:]


def _drop(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    if len(p) <= 1:
        return None
    i = int(rng.integers(len(p)))
    return p[:i] + p[i + 1:]


def _swap(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    if len(p) < 2 or len(set(p)) < 2:
        return None
    while True:
        i, j = (int(x) for x in rng.choice(len(p), 2, replace=False))
        if p[i] != p[j]:
            q = list(p)
            q[i], q[j] = q[j], q[i]
            return q


def _move(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    if len(p) < 2 or len(set(p)) < 2:
        return None
    for _ in range(10):
        q = list(p)
        x = q.pop(int(rng.integers(len(q))))
        q.insert(int(rng.integers(len(q) + 1)), x)
        if q != p:
            return q
    return None


def _reparam(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    sites = [(i, [s for s in pool if _name(s) == _name(x) and s != x]) for i, x in enumerate(p)]
    sites = [(i, alts) for i, alts in sites if alts]
    if not sites:
        return None
    i, alts = _pick(rng, sites)
    return p[:i] + [_pick(rng, alts)] + p[i + 1:]


def _replace(p: list[str], rng: np.random.Generator, pool: list[str]) -> list[str] | None:
    i = int(rng.integers(len(p)))
    alts = [s for s in pool if _name(s) != _name(p[i])]
    return p[:i] + [_pick(rng, alts)] + p[i + 1:] if alts else None


PIPELINE_MUTATORS: dict[str, Callable[[list[str], np.random.Generator, list[str]], list[str] | None]] = {
    "add-pass": _add, "drop-pass": _drop, "swap-passes": _swap, "move-pass": _move,
    "reparam-pass": _reparam, "replace-pass": _replace,
}


def mutate_pipeline(passes: list[str], rng: np.random.Generator,
                    pool: Sequence[str] | None = None) -> tuple[list[str], str]:
    """Add, drop, swap, move, re-parameterize or replace one pass; (new list of 1..10 passes, mutator name)."""
    pool = list(pool or PASS_POOL)
    passes = list(passes)[:MAX_PIPELINE] or [_pick(rng, pool)]
    for name in _shuffled(rng, list(PIPELINE_MUTATORS)):
        q = PIPELINE_MUTATORS[name](passes, rng, pool)
        if q is not None and legal_order(q) != passes:
            return legal_order(q), name
    return legal_order(_add(passes[:MAX_PIPELINE - 1], rng, pool) or [_pick(rng, pool)]), "add-pass"


def crossover_pipelines(a: Sequence[str], b: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One-point, two-point or uniform crossover of two pipelines (1..10 passes)."""
    a, b = list(a), list(b)
    if not a or not b:
        return (a or b or list(PASS_POOL[:1]))[:MAX_PIPELINE]
    kind = int(rng.integers(3))
    if kind == 0:
        out = a[:int(rng.integers(len(a) + 1))] + b[int(rng.integers(len(b) + 1)):]
    elif kind == 1:
        i, j = sorted(int(x) for x in rng.integers(0, len(a) + 1, 2))
        k, m = sorted(int(x) for x in rng.integers(0, len(b) + 1, 2))
        out = a[:i] + b[k:m] + a[j:]
    else:
        longer = a if len(a) >= len(b) else b
        n = int(rng.integers(min(len(a), len(b)), len(longer) + 1))
        out = [(a if rng.random() < 0.5 else b)[i] if i < min(len(a), len(b)) else longer[i] for i in range(n)]
    return legal_order((out or [_pick(rng, a + b)])[:MAX_PIPELINE])
