"""A block of nodes -> one scheduled PrimFunc (a *kernel*), from the ops' registry lowerings.

A block is what codegen/build.py groups: the ``fuse-blocks`` partition (an
anchor - matmul, conv, pool or a reduction - with its elementwise/injective
producers and its pointwise epilogue, or anchor-free pointwise nodes), else
an anchor with its elementwise epilogue chain, else one node.
:func:`lower_block` calls each node's registry lowering on the TE tensors
before it (placeholders of the operands' static types at the block's edge),
builds the PrimFunc and applies the schedule the anchor's lowering asked
for; :func:`run_kernel` builds and runs one kernel (tests and ``kiln bench
--kernels`` use it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import te, tirx
from tvm.target import Target

from kiln.ir.graph import Node, Value
from kiln.ir.registry import get_op

from ..runtime.errors import Error
from . import lowering  # noqa: F401  (registers every lowering)
from .lowering import LowerCtx, tvm_dtype
from .schedules import schedule_for

__all__ = ["CodegenError", "Kernel", "KernelArg", "anchor_index", "build_kernel", "lower_block",
           "lower_node", "run_kernel", "static_shape"]

# Fusion kinds of a block's anchor: the node whose lowering names the kernel's schedule.


class CodegenError(Error):
    """A node kiln cannot turn into a kernel (no lowering, symbolic shape, lowering failure)."""


@dataclass(frozen=True)
class KernelArg:
    """One PrimFunc input: a graph value, or a compile-time constant the lowering made (packed weight)."""

    value: Value | None
    const: np.ndarray | None = None


@dataclass
class Kernel:
    """A scheduled PrimFunc with what to feed it: ``args`` then ``outputs`` are its parameters."""

    name: str
    nodes: list[Node]  # the block, in graph order
    func: tirx.PrimFunc
    kind: str
    args: list[KernelArg]
    outputs: list[Value]
    notes: list[str] = field(default_factory=list)
    tuning: str | None = None
    scheduled: bool = True  # False: lower_block was asked for no schedule, or the schedule failed (see notes)

    @property
    def node(self) -> Node:
        """The block's anchor (its schedule is the kernel's)."""
        return self.nodes[anchor_index(self.nodes)]


def anchor_index(nodes: Sequence[Node]) -> int:
    """Index of the block's anchor: its first matmul/conv/pool or reduction node, else its first node."""
    return next((i for i, n in enumerate(nodes) if get_op(n.op).anchor), 0)


def static_shape(value: Value) -> tuple[int, ...]:
    """The value's shape as ints; a symbolic dim is an error (kiln compiles static shapes)."""
    shape = value.type.shape
    if not all(isinstance(d, int) for d in shape):
        raise CodegenError(
            f"value {value.name!r} has symbolic shape {value.type}; bind the symbols "
            f"(compile with example inputs or --shape) before code generation"
        )
    return tuple(shape)


def lower_node(node: Node, target: Target, *, name: str | None = None, schedule: bool = True) -> Kernel:
    """Lower one node to a scheduled PrimFunc named ``name``."""
    return lower_block([node], target, name=name, schedule=schedule)


def _lower_one(node: Node, target: Target, operands: list[te.Tensor | None],
               consts: dict[int, np.ndarray]) -> tuple[LowerCtx, list[te.Tensor]]:
    """Call ``node``'s registry lowering on ``operands``; check its outputs against the node's types."""
    opdef = get_op(node.op)
    label = f"{node.op} ({node.name or node.outputs[0].name})"
    if opdef.lower_tvm is None:
        raise CodegenError(f"op {node.op!r} has no TVM lowering yet: {label}")
    ctx = LowerCtx(node=node, target=target, consts=consts)
    try:
        res = opdef.lower_tvm(ctx, *operands, **opdef.complete_attrs(node.attrs))
    except CodegenError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the node named
        raise CodegenError(f"lowering {label} failed: {type(e).__name__}: {e}") from e
    outs = list(res) if isinstance(res, (tuple, list)) else [res]
    if len(outs) != len(node.outputs):
        raise CodegenError(f"lowering of {label} returned {len(outs)} tensors for {len(node.outputs)} outputs")
    for t, v in zip(outs, node.outputs):
        want = (static_shape(v), tvm_dtype(v.type.dtype))
        got = (tuple(int(d) for d in t.shape), str(t.dtype))
        if got != want:
            raise CodegenError(f"lowering of {label} produced {got} for output {v.name!r}, expected {want}")
    return ctx, outs


def lower_block(nodes: Sequence[Node], target: Target, *, name: str | None = None,
                schedule: bool = True) -> Kernel:
    """Lower a block (nodes in graph order; only the last one's outputs leave it) to one kernel.

    Each node's lowering gets the TE tensors of the nodes before it; the block's
    outputs are the last node's outputs, scheduled by the schedule the anchor's
    lowering named (:func:`anchor_index`).
    """
    nodes = list(nodes)
    inner = {id(v) for n in nodes for v in n.outputs}
    env: dict[int, te.Tensor] = {}
    args: list[KernelArg] = []
    params: list[te.Tensor] = []
    anchor = anchor_index(nodes)
    anchor_ctx: LowerCtx | None = None
    for n_idx, node in enumerate(nodes):
        operands: list[te.Tensor | None] = []
        consts: dict[int, np.ndarray] = {}
        fresh: dict[int, tuple[Value, te.Tensor]] = {}
        for i, v in enumerate(node.inputs):
            if v is None:
                operands.append(None)
            elif id(v) in inner:
                operands.append(env[id(v)])
            elif v.const is not None:  # a placeholder per use: the lowering may replace it (packed weight)
                ph = te.placeholder(static_shape(v), tvm_dtype(v.type.dtype), name=f"n{n_idx}_in{i}")
                consts[i] = v.const
                fresh[i] = (v, ph)
                operands.append(ph)
            else:
                if id(v) not in env:
                    env[id(v)] = te.placeholder(static_shape(v), tvm_dtype(v.type.dtype), name=f"in{len(params)}")
                    args.append(KernelArg(v))
                    params.append(env[id(v)])
                operands.append(env[id(v)])
        ctx, outs = _lower_one(node, target, operands, consts)
        if n_idx == anchor:
            anchor_ctx = ctx
        for i, (v, ph) in fresh.items():
            if i in ctx.replaced:
                array, new_ph = ctx.replaced[i]
                if new_ph is None:
                    continue  # dropped: folded into other operands
                args.append(KernelArg(None, array))
                params.append(new_ph)
            else:
                args.append(KernelArg(v))
                params.append(ph)
        for t, v in zip(outs, node.outputs):
            env[id(v)] = t
    assert anchor_ctx is not None, "a block has at least one node"
    last = nodes[-1]
    outs = [env[id(v)] for v in last.outputs]
    # an output that is an input placeholder (identity) needs its own compute stage
    outs = [te.compute(t.shape, lambda *i, t=t: t(*i), name="copy") if isinstance(t.op, te.PlaceholderOp) else t
            for t in outs]
    func = te.create_prim_func([*params, *outs]).with_attr("global_symbol", name or "kernel")
    kind = anchor_ctx.kind
    kernel = Kernel(name or "kernel", nodes, func, kind, args, list(last.outputs), scheduled=False)
    if schedule:
        try:
            sch = schedule_for(kind, func, anchor_ctx.block, target=target, **anchor_ctx.schedule_kwargs)
            kernel.func = sch.mod["main"]
            kernel.scheduled = True
        except Exception as e:  # noqa: BLE001 - an unscheduled kernel is slow, not wrong
            kernel.notes.append(f"schedule {kind!r} failed ({type(e).__name__}: {e}); kernel left unscheduled")
    return kernel


def run_kernel(kernel: Kernel, inputs: Mapping[str, np.ndarray], target: Target,
               *, module: tvm.runtime.Module | None = None) -> list[np.ndarray]:
    """Build (unless ``module`` is given) and run one kernel on numpy inputs keyed by value name."""
    mod = module or build_kernel(kernel, target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.require(a.const if a.value is None else
                                                    (a.value.const if a.value.const is not None
                                                     else inputs[a.value.name]), requirements="C"), dev)
            for a in kernel.args]
    outs = [tvm.runtime.empty(static_shape(v), tvm_dtype(v.type.dtype), dev) for v in kernel.outputs]
    mod[kernel.name](*args, *outs)
    return [o.numpy() for o in outs]


def build_kernel(kernel: Kernel, target: Target) -> tvm.runtime.Module:
    """Compile one kernel alone (an IRModule with just its PrimFunc)."""
    return tvm.compile(tvm.IRModule({kernel.name: kernel.func}), target=target).mod
