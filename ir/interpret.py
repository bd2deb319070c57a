"""The reference interpreter: numpy semantics of every op, the oracle of tests and the fuzzer."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..runtime.errors import Error, InputError
from .graph import Graph, Node
from .registry import get_op
from .types import bind_shape


class InterpretError(Error, RuntimeError):
    """An op's reference failed or produced a value that disagrees with its declared type."""


def check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Validate inputs against the graph signature; returns the symbol binding (e.g. {'N': 4})."""
    names = [v.name for v in graph.inputs]
    missing = [n for n in names if n not in inputs]
    extra = [n for n in inputs if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise InputError(f"graph {graph.name!r} takes inputs {names}: " + "; ".join(parts))
    env: dict[str, int] = {}
    for v in graph.inputs:
        a = np.asarray(inputs[v.name])
        if a.dtype != v.type.np_dtype:
            raise InputError(f"input {v.name!r}: expected dtype {v.type.dtype} ({v.type}), got {a.dtype}")
        err = bind_shape(v.type.shape, a.shape, env)
        if err:
            raise InputError(f"input {v.name!r}: expected shape {v.type}, got {list(a.shape)}: {err}")
    return env


def run_node(node: Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """One node's outputs from its operand arrays, by the op's numpy reference."""
    opdef = get_op(node.op)
    while args and args[-1] is None:
        args = args[:-1]
    try:
        res = opdef.reference(*args, **node.attrs)
    except Exception as e:  # noqa: BLE001 - re-raised with the node named
        raise InterpretError(f"{node.op} ({node.name or node.outputs[0].name}) failed: {e}") from e
    outs = list(res) if isinstance(res, (tuple, list)) else [res]
    return [np.asarray(o) for o in outs]


def interpret(graph: Graph, inputs: Mapping[str, np.ndarray], *, keep_all: bool = False,
              check_types: bool = True) -> dict[str, np.ndarray]:
    """Run the graph on numpy inputs; returns its outputs by name (every value's with ``keep_all``).

    With ``check_types`` each result must have its value's declared dtype and a
    shape that fits its declared (possibly symbolic) shape.
    """
    env_syms = check_inputs(graph, inputs)
    env: dict[int, np.ndarray] = {}
    for v in graph.inputs:
        env[id(v)] = np.asarray(inputs[v.name])
    for v in graph.constants.values():
        env[id(v)] = v.const
    for node in graph.nodes:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        outs = run_node(node, args)
        if len(outs) != len(node.outputs):
            raise InterpretError(f"{node.op} gave {len(outs)} results for {len(node.outputs)} outputs")
        for o, a in zip(node.outputs, outs):
            if check_types:
                if a.dtype != o.type.np_dtype:
                    raise InterpretError(f"{node.op} -> %{o.name}: reference gave {a.dtype}, type says {o.type}")
                err = bind_shape(o.type.shape, a.shape, env_syms)
                if err:
                    raise InterpretError(f"{node.op} -> %{o.name}: reference gave shape {list(a.shape)}, "
                                         f"type says {o.type}: {err}")
            env[id(o)] = a
    if keep_all:
        return {v.name: env[id(v)] for v in graph.values()}
    return {v.name: env[id(v)] for v in graph.outputs}
