#!/usr/bin/env python
"""The most any norm rewrite can save on the zoo GPT: its graph with every layer_norm deleted (not equivalent).

Times Pre-LN, Pre-RMSNorm and that norm-free graph together in alternating
blocks (``kiln.bench.block_medians``), so the three medians share the machine's
load.  Usage: ``.venv/bin/python scripts/norm_ceiling.py [--threads 2] [--repeat 60]``.
"""

from __future__ import annotations

import argparse

import kiln
from kiln import frontend
from kiln.bench import _zoo_case, block_medians
from kiln.codegen.target import configure_threads
from kiln.ir import Graph


def without_norms(graph: Graph) -> Graph:
    """A copy of ``graph`` in which every layer_norm's output is replaced by its input."""
    g = graph.clone()
    for n in [n for n in g.nodes if n.op == "layer_norm"]:
        g.replace_all_uses(n.output, n.inputs[0])
        g.remove(n)
    return g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=60)
    args = p.parse_args()
    configure_threads(args.threads)
    proto, feeds, _ = _zoo_case("gpt", args.threads)
    g = frontend.lift(proto)
    cases = [("Pre-LN", g, "canonicalize,dce"),
             ("Pre-RMSNorm", g, "canonicalize,ln-to-rmsnorm,fold-ln-affine,dce"),
             ("no norms at all", without_norms(g), "dce")]
    runs = {}
    for label, graph, passes in cases:
        sess = kiln.compile(graph, feeds, passes=passes).load()
        runs[label] = (lambda s=sess: s.run(feeds))
    medians = block_medians(runs, args.repeat, rounds=6)
    for label, sec in medians.items():
        print(f"{label:16s} {sec * 1e3:6.2f} ms  {sec / medians['Pre-LN']:.3f} of Pre-LN")


if __name__ == "__main__":
    main()
