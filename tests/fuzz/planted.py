"""Test-only fuzzer plugin: passes with planted bugs, registered when a test (or a worker, via
``--plugin tests.fuzz.planted``) imports this module.  Product code knows nothing of them."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from kiln.ir.graph import Graph, Node
from kiln.passes.manager import Pass, PassLog, RewritePass, register_pass, registered_passes


def _register(cls: type[Pass]) -> type[Pass]:
    """Register once (a module imported again under another name must not register twice)."""
    return registered_passes().get(cls.name) or register_pass(cls)


@dataclass(frozen=True)
class PlantedSubToAdd(RewritePass):
    """A plausible sign bug in a strength reduction: ``a - f(b)`` becomes ``a + f(b)`` and ``a + f(b)``
    becomes ``a - f(b)`` (the neg forgotten; only when the second operand is computed, so constants and
    inputs hide it)."""

    name: ClassVar[str] = "planted-sub-to-add"

    def match(self, graph: Graph, node: Node) -> Any | None:
        if node.op not in ("sub", "add") or node.outputs[0].type.dtype not in ("f32", "f64"):
            return None
        b = node.inputs[1]
        return node if b is not None and b.producer is not None else None

    def rewrite(self, graph: Graph, m: Node) -> str:
        a, b = m.inputs
        y = graph.op("add" if m.op == "sub" else "sub", a, b, before=m)
        graph.replace_all_uses(m.output, y)
        graph.remove(m)
        return f"{m.op}(a, f(b)) with the sign of f(b) flipped"


@dataclass(frozen=True)
class PlantedSegfault(Pass):
    """Kills its process with SIGSEGV when the graph has a softmax: the worker oracle must survive it."""

    name: ClassVar[str] = "planted-segv"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        if any(n.op == "softmax" for n in graph.nodes):
            os.kill(os.getpid(), signal.SIGSEGV)
        return graph


@dataclass(frozen=True)
class PlantedHang(Pass):
    """Sleeps far past any timeout when the graph has a matmul: the worker oracle must call it a hang."""

    name: ClassVar[str] = "planted-hang"

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        if any(n.op == "matmul" for n in graph.nodes):
            time.sleep(3600)
        return graph


for _cls in (PlantedSubToAdd, PlantedSegfault, PlantedHang):
    _register(_cls)
