"""Shared checks for lowering tests: one-node graph text -> kernel -> compare with the interpreter."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kiln.codegen.kernel import Kernel, lower_node, run_kernel
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import Tolerance, assert_close
from kiln.ir.interpret import interpret
from kiln.ir.text import parse

TARGET = host_target()


def check_graph_kernels(text: str, inputs: Mapping[str, np.ndarray], tol: Tolerance | None = None,
                        *, schedule: bool = True) -> list[Kernel]:
    """Parse ``text``, lower and run every node as its own kernel, compare each output with the interpreter."""
    g = parse(text)
    expected = interpret(g, inputs, keep_all=True)
    kernels = []
    for i, node in enumerate(g.nodes):
        k = lower_node(node, TARGET, name=f"k{i}", schedule=schedule)
        assert not k.notes, k.notes
        feeds = {v.name: expected[v.name] for v in node.inputs if v is not None and v.const is None}
        outs = run_kernel(k, feeds, TARGET)
        for v, got in zip(node.outputs, outs):
            assert_close(got, expected[v.name], tol, what=f"{node.op} -> {v.name}")
        kernels.append(k)
    return kernels
