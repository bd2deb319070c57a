"""One node -> one scheduled PrimFunc (a *kernel*), from the op's registry lowering.

The block-fusion issue makes blocks bigger; until then every compute node is
its own block.  :func:`lower_node` calls the op's lowering on placeholders of
the operands' static types, builds the PrimFunc and applies the schedule the
lowering asked for; :func:`run_kernel` builds and runs one kernel (tests and
``kiln bench --kernels`` use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import te, tirx
from tvm.target import Target

from kiln.ir.graph import Node, Value
from kiln.ir.registry import get_op

from . import lowering  # noqa: F401  (registers every lowering)
from .lowering import LowerCtx, tvm_dtype
from .schedules import schedule_for

__all__ = ["CodegenError", "Kernel", "KernelArg", "build_kernel", "lower_node", "run_kernel", "static_shape"]


class CodegenError(Exception):
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
    node: Node
    func: tirx.PrimFunc
    kind: str
    args: list[KernelArg]
    outputs: list[Value]
    notes: list[str] = field(default_factory=list)
    tuning: str | None = None


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
    opdef = get_op(node.op)
    label = f"{node.op} ({node.name or node.outputs[0].name})"
    if opdef.lower_tvm is None:
        raise CodegenError(f"op {node.op!r} has no TVM lowering yet: {label}")
    placeholders: list[te.Tensor | None] = []
    consts: dict[int, np.ndarray] = {}
    for i, v in enumerate(node.inputs):
        if v is None:
            placeholders.append(None)
            continue
        placeholders.append(te.placeholder(static_shape(v), tvm_dtype(v.type.dtype), name=f"in{i}"))
        if v.const is not None:
            consts[i] = v.const
    ctx = LowerCtx(node=node, target=target, consts=consts)
    try:
        res = opdef.lower_tvm(ctx, *placeholders, **opdef.complete_attrs(node.attrs))
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
    args: list[KernelArg] = []
    params: list[te.Tensor] = []
    for i, (v, ph) in enumerate(zip(node.inputs, placeholders)):
        if ph is None:
            continue
        if i in ctx.replaced:
            array, new_ph = ctx.replaced[i]
            args.append(KernelArg(None, array))
            params.append(new_ph)
        else:
            args.append(KernelArg(v))
            params.append(ph)
    # an output that is an input placeholder (identity) needs its own compute stage
    outs = [te.compute(t.shape, lambda *i, t=t: t(*i), name="copy") if isinstance(t.op, te.PlaceholderOp) else t
            for t in outs]
    func = te.create_prim_func([*params, *outs]).with_attr("global_symbol", name or "kernel")
    kernel = Kernel(name or "kernel", node, func, ctx.kind, args, list(node.outputs))
    if schedule:
        try:
            sch = schedule_for(ctx.kind, func, ctx.block, target=target, **ctx.schedule_kwargs)
            kernel.func = sch.mod["main"]
        except Exception as e:  # noqa: BLE001 - an unscheduled kernel is slow, not wrong
            kernel.notes.append(f"schedule {ctx.kind!r} failed ({type(e).__name__}: {e}); kernel left unscheduled")
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
