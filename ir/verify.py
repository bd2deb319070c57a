"""ir.verify: SSA, use-def links, topological order, attribute schemas and types against the type rules.

When some node carries a block name (set by the ``fuse-blocks`` pass), :func:`check`
also checks the fused-block contract with :func:`check_blocks`; see
:mod:`kiln.passes.fusion` for the contract in full.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from ..runtime.errors import Error
from .graph import Graph, Node, Value
from .registry import FusionKind, OpTypeError, get_op, infer_types, is_anchor, is_view

# The kinds that may follow an anchor inside its block (with the anchor's output shape).
EPILOGUE_KINDS = frozenset({FusionKind.ELEMENTWISE, FusionKind.BROADCAST})


class VerifyError(Error, ValueError):
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
    if not problems and any(n.block for n in graph.nodes):
        problems.extend(check_blocks(graph))
    return problems


# ================================================================== fused blocks

def fusion_kind(node: Node) -> FusionKind:
    """The op's fusion kind; OPAQUE for an op the registry does not know."""
    try:
        return get_op(node.op).fusion
    except KeyError:
        return FusionKind.OPAQUE


def _desc(node: Node) -> str:
    return f"{node.op} %{node.outputs[0].name}" if node.outputs else node.op


def block_problems(nodes: Sequence[Node], graph_outputs: Collection[Value]) -> list[str]:
    """Every way the nodes (in graph order) break the block contract; empty when they make a valid block.

    The checks, in this order (the first sentence is the most telling one):
    membership (no view op; an opaque or multi-output node only alone), at most
    one anchor, single exit (only the last node is read outside the block or is
    a graph output; every other node is read inside it), and the composition:
    without an anchor only elementwise/broadcast/injective nodes; with one, the
    nodes that feed it (read only by the anchor or by each other) and the
    elementwise/broadcast epilogue that follows it with its output shape.
    """
    problems: list[str] = []
    if not nodes:
        return ["the block is empty"]
    for n in nodes:
        if is_view(n.op):
            problems.append(f"view op {_desc(n)} is in the block: view ops are never in a block")
    if len(nodes) == 1:
        return problems
    for n in nodes:
        kind = fusion_kind(n)
        if kind == FusionKind.OPAQUE:
            problems.append(f"opaque op {_desc(n)} must be alone in its block")
        if len(n.outputs) != 1:
            problems.append(f"{n.op} has {len(n.outputs)} outputs: a multi-output node must be alone in its block")
    if problems:
        return problems
    anchors = [n for n in nodes if is_anchor(n.op)]
    if is_attention_chain(nodes):
        anchors = anchors[:1]  # softmax and the second matmul belong to the one attention kernel
    for extra in anchors[1:]:
        problems.append(f"second anchor ({_desc(extra)}) in one block with {_desc(anchors[0])}")
    members = {id(n) for n in nodes}
    outs = {id(v) for v in graph_outputs}
    for n in nodes[:-1]:
        o = n.outputs[0]
        if id(o) in outs:
            problems.append(f"%{o.name} is a graph output but not the exit (last node) of its block")
        outside = [r for r in o.users if id(r) not in members]
        if outside:
            problems.append(f"%{o.name} has {len(outside)} reader(s) outside the block "
                            f"({', '.join(_desc(r) for r in outside)}) but is not its exit")
        elif not o.uses:
            problems.append(f"%{o.name} is read by nobody but is not the exit of its block")
    if problems or not anchors or is_attention_chain(nodes):
        return problems
    return _composition_problems(nodes, anchors[0], members)


def is_requantize(node: Node) -> bool:
    """A per-tensor or per-axis ``quantize`` (no blocks): pointwise on its input, so it may end an epilogue."""
    return node.op == "quantize" and not node.attrs.get("block_size")


_PROLOGUE_OPS = frozenset({"slice", "transpose", "mul"})


def is_attention_chain(nodes: Sequence[Node]) -> bool:
    """``[prologue…] matmul -> [mul|div] -> [where|add] -> softmax -> [is_nan, where] -> matmul [-> transpose]``,
    each chain node reading the one before it (``where(is_nan(p), 0, p)`` is SDPA's guard of fully-masked rows).

    The prologue: for each of q, kT and v, the ``slice``/``transpose``/``mul`` nodes that make the
    matmul operand, each read by the next link and placed before it, none on two operands' paths (that
    no other node reads them is the single-exit rule of :func:`block_problems`).  A last ``transpose``
    may read the second matmul's output (the kernel writes its output through it).
    """
    nodes = list(nodes)
    if len({id(n) for n in nodes}) != len(nodes) or any(len(n.outputs) != 1 for n in nodes):
        return False
    if len(nodes) > 1 and nodes[-1].op == "transpose" and nodes[-2].op == "matmul" \
            and nodes[-1].inputs[:1] == (nodes[-2].outputs[0],):
        nodes = nodes[:-1]
    matmuls = [n for n in nodes if n.op == "matmul"]
    if len(matmuls) != 2 or nodes[-1] is not matmuls[1]:
        return False
    qk, pv = matmuls
    members = {id(n) for n in nodes}
    at = {id(n): i for i, n in enumerate(nodes)}
    prologue: set[int] = set()
    for reader, v in ((qk, qk.inputs[0]), (qk, qk.inputs[1]), (pv, pv.inputs[1])):
        while v is not None and v.producer is not None and id(v.producer) in members:
            node = v.producer
            if node.op not in _PROLOGUE_OPS or at[id(node)] > at[id(reader)] or id(node) in prologue:
                return False
            prologue.add(id(node))
            data = [x for x in node.inputs if x is not None and x.const is None]
            if len(data) != 1:
                return False
            reader, v = node, data[0]
    nodes = [n for n in nodes if id(n) not in prologue]
    ops = [n.op for n in nodes]
    if ops[-4:-1] == ["softmax", "is_nan", "where"]:  # SDPA's NaN guard where(is_nan(p), 0, p)
        ops = ops[:-3] + ops[-1:]
    if len(ops) < 3 or ops[0] != "matmul" or ops[-2:] != ["softmax", "matmul"]:
        return False
    middle = ops[1:-2]
    if middle not in ([], ["mul"], ["div"], ["where"], ["add"], ["mul", "where"], ["mul", "add"],
                      ["div", "where"], ["div", "add"]):
        return False
    return all(any(v is a.outputs[0] for v in b.inputs) for a, b in zip(nodes, nodes[1:]))


def _composition_problems(nodes: Sequence[Node], anchor: Node, members: set[int]) -> list[str]:
    """Prologue -> anchor -> epilogue: what in ``nodes`` does not fit that shape."""
    problems: list[str] = []
    # the prologue: in-block nodes with a path to the anchor
    prologue: set[int] = set()
    stack = [anchor]
    while stack:
        for v in stack.pop().inputs:
            p = v.producer if v is not None else None
            if p is not None and id(p) in members and id(p) not in prologue:
                prologue.add(id(p))
                stack.append(p)
    # the epilogue: in-block nodes with a path from the anchor
    epilogue: set[int] = set()
    stack = [anchor]
    while stack:
        for r in stack.pop().outputs[0].users:
            if id(r) in members and id(r) not in epilogue:
                epilogue.add(id(r))
                stack.append(r)
    feeds = prologue | {id(anchor)}
    shape = anchor.outputs[0].type.shape
    for n in nodes:
        if n is anchor:
            continue
        o = n.outputs[0]
        if id(n) in prologue:
            late = [r for r in o.users if id(r) not in feeds]
            if late:
                problems.append(f"%{o.name} feeds the anchor {_desc(anchor)} and is also read after it "
                                f"({', '.join(_desc(r) for r in late)})")
        elif id(n) in epilogue:
            kind = fusion_kind(n)
            if kind not in EPILOGUE_KINDS and not is_requantize(n):
                problems.append(f"{_desc(n)} is {kind.value}: only elementwise/broadcast ops may follow "
                                f"the anchor {_desc(anchor)}")
            elif o.type.shape != shape:
                problems.append(f"{_desc(n)} has shape {list(o.type.shape)} but the anchor {_desc(anchor)} has "
                                f"{list(shape)}: an epilogue keeps the anchor's shape")
        else:
            problems.append(f"{_desc(n)} neither feeds nor follows the anchor {_desc(anchor)}")
    return problems


def check_blocks(graph: Graph, max_ops: int | None = None, complete: bool = False) -> list[str]:
    """Every way the graph's block names break the block contract (see :mod:`kiln.passes.fusion`).

    No view op has a block and each block passes :func:`block_problems` (and has
    at most ``max_ops`` nodes when given).  A compute node without a block is its
    own kernel, so passes that run after ``fuse-blocks`` may add nodes.  With
    ``complete`` (what ``fuse-blocks`` itself produces) every non-view node also
    has a block, and blocks are named ``b0, b1, ...`` in the graph order of
    their last nodes.
    """
    problems: list[str] = []
    blocks: dict[str, list[Node]] = {}
    for pos, n in enumerate(graph.nodes):
        where = f"node {pos} ({_desc(n)})"
        if is_view(n.op):
            if n.block:
                problems.append(f"{where}: view op is in block {n.block!r}; view ops are never in a block")
            continue
        if not n.block:
            if complete:
                problems.append(f"{where}: compute node has no block")
            continue
        blocks.setdefault(n.block, []).append(n)
    pos_of = {id(n): i for i, n in enumerate(graph.nodes)}
    by_exit = sorted(blocks.items(), key=lambda kv: pos_of[id(kv[1][-1])])
    for k, (name, members) in enumerate(by_exit):
        if complete and name != f"b{k}":
            problems.append(f"block {name!r} should be named 'b{k}' (blocks are numbered in the graph "
                            f"order of their last nodes)")
        if max_ops is not None and len(members) > max_ops:
            problems.append(f"block {name!r} has {len(members)} nodes, more than {max_ops}")
        problems.extend(f"block {name!r}: {p}" for p in block_problems(members, graph.outputs))
    return problems


def verify(graph: Graph) -> Graph:
    """The graph itself when it is well formed; VerifyError listing every problem otherwise."""
    problems = check(graph)
    if problems:
        raise VerifyError(graph, problems)
    return graph
