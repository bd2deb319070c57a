"""Delta debugging for findings: ddmin (Zeller and Hildebrandt) over passes, outputs, nodes, constants.

A finding is a (graph, pipeline) pair and a predicate ``still_fails`` that
reruns it and says whether the same bug shows.  :func:`reduce_case` alternates
:func:`reduce_pipeline` (ddmin over the pass list) and :func:`reduce_graph`
(hierarchical: ddmin over the graph outputs, then over the nodes to keep,
then over the constants to keep) until neither shrinks the case or the budget
of predicate calls is spent.

Removing a node never leaves a hole: each output of a removed node is replaced
by an operand of the same type (the node is "bypassed") or, when it has none,
by a new graph input of that type under the same name; kept nodes whose users
were all removed become graph outputs, so the kept nodes are exactly the
candidate's nodes.  Every candidate must pass ``verify`` (the predicate never
sees an invalid graph) and the argument graph is never mutated.  A reduced
graph may have new inputs: the fuzzer regenerates inputs from their types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.text import print_graph
from kiln.ir.verify import VerifyError, verify

__all__ = ["Budget", "ddmin", "reduce_case", "reduce_graph", "reduce_pipeline"]

T = TypeVar("T")


class Budget:
    """A shared count of predicate calls; ``spent`` once ``limit`` calls were made (None: no limit)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.used = 0

    @property
    def spent(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def charge(self) -> None:
        self.used += 1


class _Exhausted(Exception):
    """Raised inside ddmin when the budget is spent: the current configuration is the answer."""


# ====================================================================== ddmin

def _split(xs: list[int], n: int) -> list[list[int]]:
    """``xs`` in ``n`` contiguous chunks of near-equal size."""
    k, r = divmod(len(xs), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(xs[start:end])
        start = end
    return [c for c in out if c]


def ddmin(items: Sequence[T], still_fails: Callable[[list[T]], bool], *,
          budget: Budget | None = None) -> list[T]:
    """A 1-minimal failing subset of ``items`` (order kept): removing any one element makes it pass.

    The caller guarantees ``still_fails(list(items))``.  Tested subsets are cached,
    the empty subset is tried first (a pipeline of no passes may still fail), and
    with a ``budget`` the smallest failing subset found so far is returned once it
    is spent (then 1-minimality is not guaranteed).
    """
    budget = budget or Budget()
    cache: dict[tuple[int, ...], bool] = {tuple(range(len(items))): True}

    def test(idx: list[int]) -> bool:
        key = tuple(idx)
        if key not in cache:
            if budget.spent:
                raise _Exhausted
            budget.charge()
            cache[key] = bool(still_fails([items[i] for i in idx]))
        return cache[key]

    current = list(range(len(items)))
    try:
        if current and test([]):
            return []
        n = 2
        while len(current) >= 2:
            chunks = _split(current, n)
            for c in chunks:  # reduce to a subset
                if test(c):
                    current, n = c, 2
                    break
            else:
                for c in chunks if n > 2 else []:  # reduce to a complement (for n == 2 they are the subsets)
                    drop = set(c)
                    comp = [i for i in current if i not in drop]
                    if test(comp):
                        current, n = comp, max(n - 1, 2)
                        break
                else:
                    if n >= len(current):
                        break
                    n = min(len(current), 2 * n)
    except _Exhausted:
        pass
    return [items[i] for i in current]


def reduce_pipeline(passes: list[str], still_fails: Callable[[list[str]], bool], *,
                    budget: Budget | None = None) -> list[str]:
    """The fewest passes (order kept) that still show the failure: ddmin over the pass list."""
    return ddmin(list(passes), still_fails, budget=budget)


# ====================================================================== graph candidates

def _drop_unused_inputs(g: Graph) -> None:
    """Inputs that nothing reads any more are dropped (the fuzzer regenerates the rest)."""
    outs = {id(v) for v in g.outputs}
    g.inputs = [v for v in g.inputs if v.uses or id(v) in outs]


def _replace_by_inputs(g: Graph, values: list[Value], drop: Callable[[], None]) -> None:
    """Detach ``values`` from their users, ``drop()`` their definition, then feed the users new inputs.

    Each new input has the old value's type and (its definition gone) its name, so
    the rest of the graph stays valid and readable.
    """
    saved = list(g.outputs)
    ids = {id(v) for v in values}
    uses = {id(v): list(v.uses) for v in values}
    for v in values:
        for user, i in uses[id(v)]:
            g.set_input(user, i, None)
    g.set_outputs(v for v in saved if id(v) not in ids)
    drop()
    fresh: dict[int, Value] = {}
    for v in values:
        if uses[id(v)] or id(v) in {id(o) for o in saved}:
            nv = fresh[id(v)] = g.add_input(g.fresh_name(v.name), v.type)
            for user, i in uses[id(v)]:
                g.set_input(user, i, nv)
    g.set_outputs(fresh.get(id(v), v) for v in saved)


def _remove_node(g: Graph, node: Node) -> None:
    """Remove ``node``: each output is bypassed by a same-typed operand, else becomes a new input."""
    rest = []
    for out in node.outputs:
        operand = next((v for v in node.inputs if v is not None and v.type == out.type), None)
        if operand is not None:
            g.replace_all_uses(out, operand)
        else:
            rest.append(out)
    _replace_by_inputs(g, rest, lambda: g.remove(node))


def _finish(g: Graph) -> Graph:
    g.dce()
    _drop_unused_inputs(g)
    return g


def _keep_outputs(graph: Graph, keep: list[int]) -> Graph | None:
    """A clone with only the outputs at positions ``keep`` (and what they depend on)."""
    if not keep:
        return None
    g = graph.clone()
    g.set_outputs(g.outputs[i] for i in keep)
    return _finish(g)


def _keep_nodes(graph: Graph, keep: list[int]) -> Graph | None:
    """A clone with exactly the nodes at positions ``keep``: the others are removed (:func:`_remove_node`).

    Its outputs are the old outputs that kept nodes still define, plus the kept
    values whose users were all removed (so no kept node is dead code).
    """
    g = graph.clone()
    nodes, keep_set = list(g.nodes), set(keep)
    kept = [n for i, n in enumerate(nodes) if i in keep_set]
    had_users = {id(v) for n in kept for v in n.outputs if v.uses}
    for i, n in enumerate(nodes):
        if i not in keep_set:
            _remove_node(g, n)
    kept_values = {id(v): v for n in kept for v in n.outputs}
    outs: dict[int, Value] = {id(v): v for v in g.outputs if id(v) in kept_values}
    for n in kept:
        for v in n.outputs:
            if id(v) in had_users and not v.uses:
                outs.setdefault(id(v), v)
    if not outs:
        return None
    g.set_outputs(outs.values())
    return _finish(g)


def _keep_constants(graph: Graph, keep: list[int]) -> Graph:
    """A clone where the constants not at positions ``keep`` became graph inputs of the same name."""
    g = graph.clone()
    keep_set = set(keep)
    for i, c in enumerate(list(g.constants.values())):
        if i not in keep_set:
            _replace_by_inputs(g, [c], lambda c=c: g.remove_constant(c))
    return _finish(g)


# ====================================================================== the predicate, checked and counted

class _Tester:
    """``still_fails`` behind verify, a cache (by IR text and passes) and the budget.

    An invalid candidate (or one that cannot be built) is skipped without a call;
    the predicate gets its own clone, so it cannot damage the reducer's graphs.
    """

    def __init__(self, still_fails: Callable[[Graph, list[str]], bool], budget: Budget) -> None:
        self.still_fails = still_fails
        self.budget = budget
        self.cache: dict[tuple[str, tuple[str, ...]], bool] = {}

    def __call__(self, g: Graph | None, passes: list[str]) -> bool:
        if g is None:
            return False
        try:
            verify(g)
        except VerifyError:
            return False
        key = (print_graph(g), tuple(passes))
        if key not in self.cache:
            if self.budget.spent:
                raise _Exhausted
            self.budget.charge()
            self.cache[key] = bool(self.still_fails(g.clone(), list(passes)))
        return self.cache[key]


def _build(make: Callable[[Graph, list[int]], Graph | None], g: Graph, keep: list[int]) -> Graph | None:
    try:
        return make(g, keep)
    except ValueError:  # a mutation the graph API refused: not a candidate
        return None


def _graph_round(g: Graph, passes: list[str], test: _Tester) -> Graph:
    """One round of the hierarchy: ddmin over outputs, then over nodes, then over constants."""
    steps: list[tuple[Callable[[Graph, list[int]], Graph | None], Callable[[Graph], int]]] = [
        (_keep_outputs, lambda h: len(h.outputs)),
        (_keep_nodes, lambda h: len(h.nodes)),
        (_keep_constants, lambda h: len(h.constants)),
    ]
    for make, count in steps:
        n = count(g)
        if n == 0:
            continue
        cur = g
        keep = ddmin(list(range(n)), lambda ks, make=make, cur=cur: test(_build(make, cur, ks), passes))
        if len(keep) < n:
            g = _build(make, cur, keep) or g
    return g


def _reduce_graph(graph: Graph, passes: list[str], test: _Tester) -> Graph:
    g = graph.clone()
    while True:
        before = print_graph(g)
        try:
            g = _graph_round(g, passes, test)
        except _Exhausted:
            return g
        if print_graph(g) == before or test.budget.spent:
            return g


def reduce_graph(graph: Graph, still_fails: Callable[[Graph], bool], max_tests: int = 500) -> Graph:
    """The smallest graph found, within ``max_tests`` predicate calls, for which ``still_fails`` holds.

    Rounds of ddmin over outputs, nodes to keep and constants to keep (see the
    module docstring), repeated until a round changes nothing.  ``graph`` is not
    mutated; every graph handed to ``still_fails`` verifies.
    """
    test = _Tester(lambda g, _passes: still_fails(g), Budget(max_tests))
    return _reduce_graph(graph, [], test)


def reduce_case(graph: Graph, passes: list[str], still_fails: Callable[[Graph, list[str]], bool],
                max_tests: int = 500) -> tuple[Graph, list[str]]:
    """Alternate pipeline and graph reduction until neither shrinks the case, within ``max_tests`` calls."""
    test = _Tester(still_fails, Budget(max_tests))
    g, ps = graph.clone(), list(passes)
    while True:
        before = (print_graph(g), tuple(ps))
        ps = ddmin(ps, lambda sub, g=g: test(g, sub))
        g = _reduce_graph(g, ps, test)
        if (print_graph(g), tuple(ps)) == before or test.budget.spent:
            return g, ps
