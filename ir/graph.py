"""Value, Node and Graph: kiln's SSA graph IR and the mutation API that keeps use-def links right.

Passes never touch ``Value.uses`` or ``Node._inputs`` directly: they call
``Graph.add_node`` / ``insert_before`` / ``set_input`` / ``replace_all_uses`` /
``remove``, which keep every link consistent (``ir.verify`` checks that they are).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .types import TensorType

Attrs = dict[str, Any]


class Value:
    """An SSA value: a graph input, a constant, or one output of a node."""

    __slots__ = ("name", "type", "producer", "index", "uses", "const")

    def __init__(self, name: str, type: TensorType, const: np.ndarray | None = None):
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.index = 0
        self.uses: list[tuple[Node, int]] = []
        self.const = const

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def users(self) -> list[Node]:
        """Distinct consuming nodes, in first-use order."""
        seen: dict[int, Node] = {}
        for n, _ in self.uses:
            seen.setdefault(id(n), n)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """One operation: op name, attributes, input values (None for an absent optional), outputs.

    ``block`` names the fused block the node belongs to ("" when none): nodes
    with the same block become one kernel (set by the ``fuse-blocks`` pass).
    """

    __slots__ = ("op", "name", "attrs", "_inputs", "outputs", "graph", "block")

    def __init__(self, op: str, attrs: Attrs | None = None, name: str = ""):
        self.op = op
        self.name = name
        self.block = ""
        self.attrs: Attrs = dict(attrs or {})
        self._inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.graph: Graph | None = None

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        """The single output (most ops have one)."""
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.op} has {len(self.outputs)} outputs, not 1")
        return self.outputs[0]

    def input_const(self, i: int) -> np.ndarray | None:
        """Constant data of input i, or None when it is absent or not a constant."""
        if i >= len(self._inputs) or self._inputs[i] is None:
            return None
        return self._inputs[i].const

    def __repr__(self) -> str:
        ins = ", ".join("_" if v is None else f"%{v.name}" for v in self._inputs)
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        return f"<{outs} = {self.op}({ins})>"


class Graph:
    """Inputs, constants, nodes in topological order, outputs; the unit every stage passes on."""

    def __init__(self, name: str = "main", meta: dict[str, Any] | None = None):
        self.name = name
        self.meta: dict[str, Any] = dict(meta or {})
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, Value] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()

    # ------------------------------------------------------------ names
    def fresh_name(self, hint: str = "v") -> str:
        """A value name not yet used in this graph, derived from ``hint``."""
        if hint and hint not in self._names:
            return hint
        while True:
            cand = f"{hint or 'v'}_{next(self._counter)}"
            if cand not in self._names:
                return cand

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name {name!r} is already defined in graph {self.name!r}")
        self._names.add(name)
        return name

    # ------------------------------------------------------------ building
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self._claim(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, array: np.ndarray, name: str | None = None) -> Value:
        """A named constant; the array is stored as given (not copied, not cast)."""
        array = np.asarray(array)
        v = Value(self._claim(name if name is not None else self.fresh_name("c")),
                  TensorType.of(array), const=array)
        self.constants[v.name] = v
        return v

    def make_node(self, op: str, inputs: Sequence[Value | None], attrs: Attrs | None = None, *,
                  name: str = "", out_types: Sequence[TensorType] | None = None,
                  out_names: Sequence[str] | None = None) -> Node:
        """A node with typed outputs, not yet placed in the node list.

        Output types come from the op's type rule unless given.
        """
        from .registry import get_op, infer_types

        node = Node(op, attrs, name)
        opdef = get_op(op)
        node.attrs = opdef.complete_attrs(node.attrs)
        if out_types is None:
            out_types = infer_types(op, [None if v is None else v.type for v in inputs], node.attrs)
        if out_names is None:  # distinct among themselves too: names are claimed only below
            out_names = []
            for _ in out_types:
                nm, i = self.fresh_name(op), 0
                while nm in out_names:
                    i += 1
                    nm = self.fresh_name(f"{op}_{i}")
                out_names.append(nm)
        for i, v in enumerate(inputs):
            node._inputs.append(v)
            if v is not None:
                v.uses.append((node, i))
        for i, (nm, t) in enumerate(zip(out_names, out_types)):
            out = Value(self._claim(nm), t)
            out.producer, out.index = node, i
            node.outputs.append(out)
        node.graph = self
        return node

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: Attrs | None = None, *,
                 before: Node | None = None, **kw: Any) -> Node:
        """Create a node and place it at the end, or just before ``before``."""
        node = self.make_node(op, inputs, attrs, **kw)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._index(before), node)
        return node

    def op(self, op: str, *inputs: Value | None, before: Node | None = None, **attrs: Any) -> Value:
        """Shorthand for a single-output node: ``g.op("add", a, b)`` returns its output."""
        return self.add_node(op, list(inputs), attrs, before=before).output

    def insert_before(self, anchor: Node, node: Node) -> None:
        self.nodes.insert(self._index(anchor), node)

    def insert_after(self, anchor: Node, node: Node) -> None:
        self.nodes.insert(self._index(anchor) + 1, node)

    def _index(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise ValueError(f"node {node!r} is not in graph {self.name!r}")

    # ------------------------------------------------------------ mutation
    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        old = node._inputs[index]
        if old is not None:
            old.uses.remove((node, index))
        node._inputs[index] = value
        if value is not None:
            value.uses.append((node, index))

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Point every user of ``old`` (graph outputs included) at ``new``."""
        if old is new:
            return
        for node, i in list(old.uses):
            self.set_input(node, i, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove(self, node: Node) -> None:
        """Remove a node whose outputs are unused; its operands lose one use each."""
        for out in node.outputs:
            if out.uses or any(o is out for o in self.outputs):
                raise ValueError(f"cannot remove {node!r}: output %{out.name} is still used")
        for i, v in enumerate(node._inputs):
            if v is not None:
                v.uses.remove((node, i))
        del self.nodes[self._index(node)]
        for out in node.outputs:
            self._names.discard(out.name)
        node.graph = None

    def remove_constant(self, value: Value) -> None:
        if value.uses or any(o is value for o in self.outputs):
            raise ValueError(f"cannot remove constant %{value.name}: still used")
        del self.constants[value.name]
        self._names.discard(value.name)

    def replace_keeping_names(self, olds: list[Value], dead: list[Node],
                              build: Callable[[list[str], Node | None], list[Value]],
                              *, at_first: bool = False) -> list[Value]:
        """Replace ``olds`` by values that ``build(names, before)`` creates under the same names.

        ``dead`` are the nodes that become unused once ``olds`` lose their users (they
        are removed first, which frees the names); ``before`` is the node that followed
        the last of them (``at_first``: the first of them), so the new nodes take their
        place in the order.
        """
        uses = [list(o.uses) for o in olds]
        outputs = list(self.outputs)
        for us in uses:
            for n, i in us:
                self.set_input(n, i, None)
        self.set_outputs([v for v in outputs if not any(v is o for o in olds)])
        order = {id(n): k for k, n in enumerate(self.nodes)}
        dead = sorted(dead, key=lambda n: order[id(n)])
        if at_first:
            gone = {id(n) for n in dead}
            before = next((n for n in self.nodes[order[id(dead[0])]:] if id(n) not in gone), None)
        else:
            last = order[id(dead[-1])]
            before = self.nodes[last + 1] if last + 1 < len(self.nodes) else None
        for n in reversed(dead):
            self.remove(n)
        news = build([o.name for o in olds], before)
        for new, us in zip(news, uses):
            for n, i in us:
                self.set_input(n, i, new)
        self.set_outputs([next((nv for o, nv in zip(olds, news) if v is o), v) for v in outputs])
        return news

    def set_outputs(self, outputs: Iterable[Value]) -> None:
        self.outputs = list(outputs)

    def dce(self) -> int:
        """Remove nodes and constants that no graph output depends on; returns how many."""
        removed = 0
        for node in reversed(list(self.nodes)):
            if all(not o.uses and all(o is not g for g in self.outputs) for o in node.outputs):
                self.remove(node)
                removed += 1
        for v in list(self.constants.values()):
            if not v.uses and all(v is not g for g in self.outputs):
                self.remove_constant(v)
                removed += 1
        return removed

    # ------------------------------------------------------------ queries
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(f"no value %{name} in graph {self.name!r}")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def clone(self) -> Graph:
        """A deep copy (constant arrays shared: they are treated as immutable)."""
        g = Graph(self.name, self.meta)
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            vmap[id(v)] = g.add_input(v.name, v.type)
        for v in self.constants.values():
            vmap[id(v)] = g.add_constant(v.const, v.name)
        for n in self.nodes:
            m = g.make_node(n.op, [None if v is None else vmap[id(v)] for v in n.inputs], n.attrs,
                            name=n.name, out_types=[o.type for o in n.outputs],
                            out_names=[o.name for o in n.outputs])
            m.block = n.block
            g.nodes.append(m)
            for a, b in zip(n.outputs, m.outputs):
                vmap[id(a)] = b
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.inputs)} inputs, {len(self.constants)} constants, {len(self.nodes)} nodes>"


def structurally_equal(a: Graph, b: Graph) -> str | None:
    """None when the graphs are equal (names, types, attrs, constants bit-for-bit), else the first difference."""
    if a.name != b.name:
        return f"graph name {a.name!r} != {b.name!r}"
    if a.meta != b.meta:
        return f"meta {a.meta!r} != {b.meta!r}"
    for what, xs, ys in (("inputs", a.inputs, b.inputs), ("outputs", a.outputs, b.outputs)):
        if [(v.name, v.type) for v in xs] != [(v.name, v.type) for v in ys]:
            return f"{what} differ: {xs} vs {ys}"
    if list(a.constants) != list(b.constants):
        return f"constant names differ: {list(a.constants)} vs {list(b.constants)}"
    for name, va in a.constants.items():
        vb = b.constants[name]
        if va.type != vb.type or va.const.tobytes() != vb.const.tobytes():
            return f"constant %{name} differs"
    if len(a.nodes) != len(b.nodes):
        return f"{len(a.nodes)} nodes vs {len(b.nodes)}"
    for na, nb in zip(a.nodes, b.nodes):
        key = lambda n: (n.op, n.name, n.block, [None if v is None else v.name for v in n.inputs],  # noqa: E731
                         [(o.name, o.type) for o in n.outputs])
        if key(na) != key(nb):
            return f"node {na!r} != {nb!r}"
        if not _attrs_equal(na.attrs, nb.attrs):
            return f"attrs of {na!r} differ: {na.attrs} vs {nb.attrs}"
    return None


def _attrs_equal(a: Attrs, b: Attrs) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
            continue
        if type(x) is not type(y) or x != y:
            if not (isinstance(x, list) and isinstance(y, list) and len(x) == len(y)
                    and all(type(p) is type(q) and (p == q or (isinstance(p, float) and np.isnan(p) and np.isnan(q)))
                            for p, q in zip(x, y))):
                return False
    return True
