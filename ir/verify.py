"""ir.verify: SSA, use-def links, topological order, attribute schemas and types against the type rules."""

from __future__ import annotations

from .graph import Graph, Value
from .registry import OpTypeError, get_op, infer_types


class VerifyError(ValueError):
    """The graph breaks one or more IR invariants; ``problems`` lists every one found."""

    def __init__(self, graph: Graph, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"graph {graph.name!r} fails verification ({len(problems)} problem(s)):\n  {shown}{more}")


def check(graph: Graph) -> list[str]:
    """Every invariant the graph breaks, as sentences; empty when it is well formed."""
    problems: list[str] = []
    defined: dict[int, Value] = {}
    names: dict[str, str] = {}

    def define(v: Value, where: str) -> None:
        if id(v) in defined:
            problems.append(f"value %{v.name} is defined twice ({where})")
        if v.name in names:
            problems.append(f"value name %{v.name} is used by two values ({names[v.name]} and {where})")
        defined[id(v)] = v
        names[v.name] = where

    for v in graph.inputs:
        define(v, "graph input")
        if v.producer is not None or v.const is not None:
            problems.append(f"graph input %{v.name} has a producer or constant data")
    for name, v in graph.constants.items():
        define(v, "constant")
        if v.const is None:
            problems.append(f"constant %{name} has no data")
        elif v.name != name:
            problems.append(f"constant table key {name!r} names value %{v.name}")
        elif (str(v.const.dtype), v.const.shape) != (str(v.type.np_dtype), tuple(v.type.shape)):
            problems.append(f"constant %{name}: data is {v.const.dtype}{list(v.const.shape)} but its type is {v.type}")

    expected_uses: dict[int, list[tuple[int, int]]] = {}
    for pos, node in enumerate(graph.nodes):
        where = f"node {pos} ({node.op})"
        if node.graph is not graph:
            problems.append(f"{where} does not belong to this graph")
        try:
            opdef = get_op(node.op)
        except KeyError:
            problems.append(f"{where}: unknown op {node.op!r}")
            opdef = None
        for i, v in enumerate(node.inputs):
            if v is None:
                if opdef and not opdef.optional_input(i):
                    problems.append(f"{where}: required input {i} is absent")
                continue
            if id(v) not in defined:
                order = "is used before it is defined" if any(v is o for n in graph.nodes for o in n.outputs) \
                    else "is not defined in the graph"
                problems.append(f"{where}: operand %{v.name} {order}")
            expected_uses.setdefault(id(v), []).append((id(node), i))
        for i, o in enumerate(node.outputs):
            define(o, where)
            if o.producer is not node or o.index != i:
                problems.append(f"{where}: output %{o.name} does not point back at its node")
        if opdef is None:
            continue
        err = opdef.check_arity(len(node.inputs), len(node.outputs))
        if err:
            problems.append(f"{where}: {err}")
            continue
        try:
            complete = opdef.complete_attrs(node.attrs)
            if complete != node.attrs:
                problems.append(f"{where}: attributes {node.attrs} are not in canonical form {complete}")
        except OpTypeError as e:
            problems.append(f"{where}: {e}")
            continue
        try:
            types = infer_types(node.op, [None if v is None else v.type for v in node.inputs], node.attrs)
        except OpTypeError as e:
            problems.append(f"{where}: type rule refuses the operands: {e}")
            continue
        if len(types) != len(node.outputs):
            problems.append(f"{where}: type rule gives {len(types)} outputs, node has {len(node.outputs)}")
        for o, t in zip(node.outputs, types):
            if o.type != t:
                problems.append(f"{where}: output %{o.name} is typed {o.type}, the type rule says {t}")

    for v in defined.values():
        got = sorted((id(n), i) for n, i in v.uses)
        if got != sorted(expected_uses.get(id(v), [])):
            problems.append(f"value %{v.name}: use list does not match its users")
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output %{v.name} is not defined in the graph")
    return problems


def verify(graph: Graph) -> Graph:
    """The graph itself when it is well formed; VerifyError listing every problem otherwise."""
    problems = check(graph)
    if problems:
        raise VerifyError(graph, problems)
    return graph
