"""fuse-blocks: partition the graph into fused blocks, one kernel each (TVM FuseOps rules + kiln's contract).

The pass only names blocks (``Node.block``); it changes no node, operand or
value, so the graph computes exactly what it computed before.  Any existing
block names are cleared first, so running it twice gives the same blocks.

The block contract
------------------
Codegen compiles the nodes that share a block name as ONE kernel and relies on
these rules, which :func:`kiln.ir.verify.check_blocks` checks (``ir.verify``
runs it whenever some node has a block):

1. Every non-view compute node has a block named ``b<k>``, k = 0, 1, ... in
   the graph order of the block's last node.  View ops (registry ``view``:
   reshape, flatten, squeeze, unsqueeze, identity; codegen runs them as
   zero-copy views) have block ``""`` and are never in a block.
2. Single exit: only the last node of a block (graph order) may be read by a
   node outside the block or be a graph output; every other node's output is
   read, and only inside the block.  So edges between blocks run forward in
   the order of their exits and the block graph has no cycle.  Every node of a
   block of two or more nodes has exactly one output (a multi-output node such
   as ``split`` is alone in its block).
3. At most one anchor per block: a node of fusion kind OUT_EWISE_FUSABLE
   (matmul, conv, conv_transpose, pools) or REDUCTION (reduce_*, softmax,
   layer_norm, rms_norm, crms_norm, argmax, global pools, cumsum, ...).
   OPAQUE nodes are alone in their block.
4. The compositions codegen schedules:
   (a) elementwise/broadcast/injective producers that feed the anchor and are
       read only by the anchor or by each other (a transposed operand, the
       dequantize of a constant weight, a scale before softmax) -> the
       anchor -> an elementwise/broadcast epilogue whose every node has the
       anchor's output shape (bias, activation, residual add, batch_norm as
       an affine, requantize), possibly a diamond that re-joins, with the
       single exit of rule 2;
   (b) no anchor: elementwise/broadcast/injective nodes only (for example a
       diamond of elementwise branches into an add);
   (c) a reduction anchor (norms, softmax included) and its epilogue as in
       (a): a norm fused with what follows it up to the next anchor.
   An epilogue node's other operands come from outside the block or from the
   block itself; every node of the block feeds or follows the anchor.
5. At most ``max_ops`` nodes per block (default 16).
6. The attention block: ``matmul -> [mul|div by a scalar] -> [where|add mask]
   -> softmax -> [is_nan -> where(isnan, 0, p)] -> matmul`` as one block (two
   anchors, by exception), formed only where codegen's fused attention kernel
   matches it and the verifier's ``is_attention_chain`` knows its shape.  The
   optional NaN guard is what SDPA exports put after the softmax; the kernel
   computes it (0 for a row whose max is not finite).  Besides the chain it
   takes, for each of q, kT and v, the ``slice``/``transpose``/``mul``-by-a-
   constant nodes that make the operand (the kernel reads their source through
   them), and a last ``transpose`` of its output (the kernel writes through
   it, the block's exit); no other node.

The partition
-------------
As TVM's FuseOps: the dataflow graph of the nodes (views included, plus a sink
that every graph output and every unread output flows into) is built with
networkx and its post-dominator tree computed (``immediate_dominators`` of the
reversed graph, from the sink).  Nodes are visited in graph order, in two
phases: phase 0 anchors and elementwise/broadcast nodes, phase 1 injective
nodes (TVM defers injective fusion the same way).  A visited node's group is
merged with its immediate post-dominator's group and the groups of every node
on a path between them when the union is a valid block (rules 2-5 above,
:func:`kiln.ir.verify.block_problems`); otherwise the reason is recorded.  A
post-dominator that is the sink (a graph output, readers that never re-join)
or a view op ends the block.  Where kiln differs from TVM, it follows the
contract: a reduction takes an epilogue (TVM: never fuses into consumers), and
producers may fuse into the operands of a matmul/conv (TVM: not fused into it).

The log has one rewrite per block of two or more nodes (``block b3:
matmul+add+gelu (anchor matmul)``, at the block's exit value) and, for every
block exit that has readers, the reason its block did not grow into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.registry import FusionKind, is_anchor, is_view
from kiln.ir.verify import block_problems, fusion_kind

from .manager import Pass, PassLog, register_pass

__all__ = ["Block", "FuseBlocks", "Partition", "SINK", "assign_blocks", "dataflow_graph", "partition",
           "post_dominators"]

SINK = -1  # the dataflow graph's node for "leaves the graph" (graph outputs and unread outputs)


@dataclass(frozen=True)
class Block:
    """One fused block: its name, its nodes in graph order, its anchor (None when it has none) and exit."""

    name: str
    nodes: tuple[Node, ...]
    anchor: Node | None
    exit: Node

    @property
    def summary(self) -> str:
        anchor = f"anchor {self.anchor.op}" if self.anchor is not None else "no anchor"
        return f"block {self.name}: {'+'.join(n.op for n in self.nodes)} ({anchor})"


@dataclass(frozen=True)
class Partition:
    """The blocks in the order of their exits, and why each exit's block did not grow: (value name, reason)."""

    blocks: tuple[Block, ...]
    refusals: tuple[tuple[str, str], ...]


def dataflow_graph(graph: Graph) -> nx.DiGraph:
    """Node positions (graph order) -> the positions of their readers; outputs that leave go to SINK."""
    dfg = nx.DiGraph()
    dfg.add_node(SINK)
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    outs = {id(v) for v in graph.outputs}
    for i, n in enumerate(graph.nodes):
        dfg.add_node(i)
        for o in n.outputs:
            for r, _ in o.uses:
                dfg.add_edge(i, pos[id(r)])
            if not o.uses or id(o) in outs:
                dfg.add_edge(i, SINK)
    return dfg


def post_dominators(dfg: nx.DiGraph) -> dict[int, int]:
    """Immediate post-dominator of every node of the dataflow graph (SINK's is SINK)."""
    return dict(nx.immediate_dominators(dfg.reverse(copy=False), SINK))


def _between(dfg: nx.DiGraph, src: int, dst: int, limit: int) -> list[int] | None:
    """The nodes on paths from src to its post-dominator dst (both excluded); None past ``limit`` nodes."""
    seen: set[int] = set()
    stack = [src]
    while stack:
        for s in dfg.successors(stack.pop()):
            if s != dst and s not in seen:
                seen.add(s)
                if len(seen) > limit:
                    return None
                stack.append(s)
    return sorted(seen)


class _Groups:
    """Union of node positions into groups (each group's members kept sorted on demand)."""

    def __init__(self, n: int):
        self.of = list(range(n))
        self.members: dict[int, set[int]] = {i: {i} for i in range(n)}

    def union_of(self, positions: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for p in positions:
            out |= self.members[self.of[p]]
        return out

    def merge(self, positions: Sequence[int]) -> None:
        gids = sorted({self.of[p] for p in positions}, key=lambda g: -len(self.members[g]))
        keep = gids[0]
        for g in gids[1:]:
            for p in self.members.pop(g):
                self.of[p] = keep
                self.members[keep].add(p)


_ATTENTION_STEPS = frozenset({"matmul", "mul", "div", "where", "add"})


def attention_chains(graph: Graph) -> list[list[int]]:
    """Positions of each ``matmul -> [scale] -> [mask] -> softmax -> matmul`` chain codegen fuses into one kernel.

    The nodes that make q, kT or v from an outside value - ``slice``, ``transpose`` and ``mul`` by a
    one-element constant, each read only by the next - join the chain (the kernel reads the value
    through them, with no copy), all of an operand's or none: a part alone saves no kernel.  So does a
    ``transpose`` of the output that only it reads (the kernel writes through it).

    The chain is read back from every softmax; whether it is one is decided by
    codegen's own matcher (:func:`kiln.codegen.attention.match_attention`), so
    a block is formed only where the fused attention kernel can build it.
    """
    softmaxes = [n for n in graph.nodes if n.op == "softmax"]
    if not softmaxes:
        return []
    from kiln.codegen.attention import match_attention

    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    chains = []
    for sm in softmaxes:
        chain = [sm]
        while len(chain) < 4 and chain[0].op != "matmul":
            prev = [v.producer for v in chain[0].inputs
                    if v is not None and v.producer is not None and v.producer.op in _ATTENTION_STEPS]
            if len(prev) != 1:
                break
            chain.insert(0, prev[0])
        tail = _after_softmax(sm)
        if chain[0].op != "matmul" or tail is None:
            continue
        chain.extend(tail)
        if not all(id(n) in pos for n in chain) or match_attention(chain) is None:
            continue
        for extra in _operand_prologues(graph, chain):
            grown = sorted(chain + extra, key=lambda n: pos[id(n)])
            if match_attention(grown) is not None:
                chain = grown
        after = _output_transpose(graph, chain[-1])
        if after is not None and match_attention([*chain, after]) is not None:
            chain = [*chain, after]
        chains.append([pos[id(n)] for n in chain])
    return chains


def _after_softmax(sm: Node) -> list[Node] | None:
    """The chain's nodes after its softmax: ``[matmul]``, or ``[is_nan, where, matmul]`` (SDPA's NaN guard)."""
    readers = sm.outputs[0].users
    if len(readers) == 1:
        return readers if readers[0].op == "matmul" else None
    ops = sorted(r.op for r in readers)
    if len(readers) != 2 or ops != ["is_nan", "where"]:
        return None
    is_nan = next(r for r in readers if r.op == "is_nan")
    where = next(r for r in readers if r.op == "where")
    after = where.outputs[0].users
    if is_nan.outputs[0].users != [where] or len(after) != 1 or after[0].op != "matmul":
        return None
    return [is_nan, where, after[0]]


_PROLOGUE_OPS = frozenset({"slice", "transpose", "mul"})


def _read_only_by(graph: Graph, v: Value | None, reader: Node) -> bool:
    return (v is not None and len(v.uses) == 1 and v.uses[0][0] is reader
            and not any(v is o for o in graph.outputs))


def _operand_prologues(graph: Graph, chain: list[Node]) -> list[list[Node]]:
    """For q, kT and v: the slice/transpose/mul nodes that make the operand, each read only by the next.

    A ``mul``'s other operand must be a constant (codegen checks it is one float32 element).
    :func:`kiln.codegen.attention.match_attention` has the final word.
    """
    first, last = chain[0], chain[-1]
    found = []
    for reader, v in ((first, first.inputs[0]), (first, first.inputs[1]), (last, last.inputs[1])):
        nodes: list[Node] = []
        while _read_only_by(graph, v, reader) and v.producer is not None and v.producer.op in _PROLOGUE_OPS:
            node = v.producer
            data = [x for x in node.inputs if x is not None and x.const is None]
            if len(data) != 1 or len(node.outputs) != 1:
                break
            nodes.append(node)
            reader, v = node, data[0]
        if nodes:
            found.append(nodes)
    return found


def _output_transpose(graph: Graph, pv: Node) -> Node | None:
    """The ``transpose`` that alone reads the chain's output, if any (codegen checks its permutation)."""
    out = pv.outputs[0]
    if len(out.uses) != 1 or any(out is o for o in graph.outputs):
        return None
    reader = out.uses[0][0]
    return reader if reader.op == "transpose" else None


def partition(graph: Graph, max_ops: int = 16) -> Partition:
    """The fused blocks of ``graph`` under the block contract (module docstring); the graph is not changed."""
    if max_ops < 1:
        raise ValueError(f"max_ops must be at least 1, got {max_ops}")
    nodes = graph.nodes
    dfg = dataflow_graph(graph)
    ipdom = post_dominators(dfg)
    groups = _Groups(len(nodes))
    reasons: dict[int, str] = {}
    closed: set[int] = set()
    unfused: list[tuple[str, str]] = []
    for chain in attention_chains(graph):
        problems = block_problems([nodes[p] for p in chain], graph.outputs)
        if problems:  # the verifier's contract is the law: a chain it does not know stays unfused
            unfused.append((nodes[chain[-1]].outputs[0].name, f"attention chain not fused: {problems[0]}"))
            continue
        groups.merge(chain)
        closed.update(chain)

    def try_merge(i: int) -> str | None:
        """Merge node i's group into its post-dominator's; None when merged (or nothing to merge with)."""
        if i in closed:
            return None
        node = nodes[i]
        out = node.outputs[0]
        readers = out.users
        d = ipdom.get(i, SINK)
        if d == SINK:
            if not readers:
                return None
            if any(out is v for v in graph.outputs):
                return f"%{out.name} is a graph output"
            return f"%{out.name} has {len(readers)} readers outside the block"
        if groups.of[d] == groups.of[i]:
            return None
        dnode = nodes[d]
        if d in closed:
            return f"the attention block at %{dnode.outputs[0].name} takes no other node"
        lead = "" if len(readers) == 1 else \
            f"%{out.name} has {len(readers)} readers, which re-join only at %{dnode.outputs[0].name}: "
        if is_view(dnode.op):
            return f"{lead}view op {dnode.op} ends the block"
        path = _between(dfg, i, d, limit=4 * max_ops + 16)
        if path is None:
            return f"{lead}size cap {max_ops} reached (more than {4 * max_ops + 16} nodes lie between them)"
        views = [nodes[p] for p in path if is_view(nodes[p].op)]
        if views:
            return f"{lead}view op {views[0].op} (%{views[0].outputs[0].name}) ends the block"
        if closed.intersection(path):
            return "an attention block lies between them"
        cand = sorted(groups.union_of([i, *path, d]))
        problems = block_problems([nodes[p] for p in cand], graph.outputs)
        if problems:
            return lead + problems[0]
        if len(cand) > max_ops:
            return f"{lead}size cap {max_ops} reached (the merged block would have {len(cand)} nodes)"
        groups.merge([i, *path, d])
        return None

    for phase in (0, 1):
        for i, node in enumerate(nodes):
            if is_view(node.op):
                continue
            kind = fusion_kind(node)
            if (kind == FusionKind.INJECTIVE) != (phase == 1):
                continue
            has_readers = any(o.uses for o in node.outputs)
            if kind == FusionKind.OPAQUE:
                if has_readers:
                    reasons[i] = f"opaque op {node.op} is alone in its block"
                continue
            if len(node.outputs) != 1:
                if has_readers:
                    reasons[i] = f"{node.op} has {len(node.outputs)} outputs: alone in its block"
                continue
            reason = try_merge(i)
            if reason is not None:
                reasons[i] = reason

    found: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        if not is_view(node.op):
            found.setdefault(groups.of[i], []).append(i)
    ordered = sorted(found.values(), key=lambda ps: ps[-1])
    blocks = []
    for k, ps in enumerate(ordered):
        members = tuple(nodes[p] for p in ps)
        anchor = next((n for n in members if is_anchor(n.op)), None)
        blocks.append(Block(f"b{k}", members, anchor, members[-1]))
    # only exits keep their reason: a node refused early but swallowed later was merged after all
    refusals = tuple((nodes[ps[-1]].outputs[0].name, reasons[ps[-1]]) for ps in ordered if ps[-1] in reasons)
    return Partition(tuple(blocks), refusals + tuple(unfused))


def assign_blocks(graph: Graph, part: Partition) -> None:
    """Write the partition's block names onto the nodes (views and everything else first cleared)."""
    for n in graph.nodes:
        n.block = ""
    for b in part.blocks:
        for n in b.nodes:
            n.block = b.name


@register_pass
@dataclass(frozen=True)
class FuseBlocks(Pass):
    """Name the fused blocks codegen compiles as one kernel each (module docstring: rules and contract)."""

    name: ClassVar[str] = "fuse-blocks"
    keeps_blocks: ClassVar[bool] = True  # it clears and re-derives the partition
    max_ops: int = 16

    def __post_init__(self) -> None:
        if self.max_ops < 1:
            raise ValueError(f"max_ops must be at least 1, got {self.max_ops}")

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        for n in graph.nodes:
            n.block = ""
        part = partition(graph, self.max_ops)
        assign_blocks(graph, part)
        for b in part.blocks:
            if len(b.nodes) > 1:
                log.rewrote(b.exit.outputs[0].name, b.summary)
        for at, reason in part.refusals:
            log.refuse(at, reason)
        return graph
