"""Graph -> Relax ``main`` calling one scheduled kernel per block -> TVM executable.

Every block of compute nodes becomes one kernel
(:func:`kiln.codegen.kernel.lower_block`; an attention block the fused
attention kernel, :mod:`kiln.codegen.attention`): the blocks the
``fuse-blocks`` pass named (``Node.block``, :func:`named_blocks`), else an
anchor (matmul, conv) together with its pointwise epilogue
(:func:`epilogue_blocks`); kernels that come out structurally equal are
compiled once.  Shape-only ops
(reshape, flatten, squeeze, unsqueeze, identity) become Relax reshapes, which
the VM runs as views (no kernel, no copy).  Constants become trailing
parameters of ``main`` (the artifact's weights), so the library holds code only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.target import Target

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.registry import get_op, is_view
from kiln.ir.types import BITS, eval_shape, from_numpy_dtype, is_static_dim
from kiln.ir.verify import EPILOGUE_KINDS
from kiln.runtime.limits import DEFAULT_LIMITS, Limits, check_limit

from .attention import lower_attention, match_attention
from .kernel import CodegenError, Kernel, lower_block, static_shape
from .lowering import tvm_dtype
from .tune import TuneOptions

__all__ = ["CompiledGraph", "build_graph", "epilogue_blocks", "kernel_blocks",
           "lower_kernel", "named_blocks", "refuse_subbyte_buffers", "specialize"]

# Anchors whose schedules fold a pointwise epilogue into the output tile (schedules._epilogue_at).


@dataclass
class CompiledGraph:
    """A compiled graph: the VM executable, the weights ``main`` takes after the inputs, and the kernels."""

    executable: relax.VMExecutable
    graph: Graph
    weights: dict[str, np.ndarray]
    kernels: list[Kernel]
    unique_kernels: int
    target: Target
    timings: dict[str, float] = field(default_factory=dict)


def specialize(graph: Graph, symbols: Mapping[str, int]) -> Graph:
    """A copy of ``graph`` with every symbolic dim replaced by its value in ``symbols``."""
    g = graph.clone()
    for v in g.values():
        if not v.type.is_static:
            missing = [d for d in v.type.shape if not is_static_dim(d)]
            try:
                v.type = v.type.with_shape(eval_shape(v.type.shape, dict(symbols)))
            except (KeyError, ValueError) as e:
                raise CodegenError(
                    f"value {v.name!r} has symbolic shape {v.type} ({missing}); give a value for each symbol "
                    f"(example inputs or --shape), got {dict(symbols)}: {e}") from None
    return g


def _epilogue_next(tail: Node, uses: Mapping[int, list[Node]], outputs: set[int]) -> Node | None:
    """The node that may join ``tail``'s block: the only reader of its only output, pointwise, same shape."""
    if len(tail.outputs) != 1 or id(tail.outputs[0]) in outputs:
        return None
    readers = {id(n): n for n in uses.get(id(tail.outputs[0]), [])}
    if len(readers) != 1:
        return None
    (nxt,) = readers.values()
    if is_view(nxt.op) or get_op(nxt.op).fusion not in EPILOGUE_KINDS or len(nxt.outputs) != 1:
        return None
    if nxt.outputs[0].type.shape != tail.outputs[0].type.shape:
        return None
    return nxt


def epilogue_blocks(graph: Graph) -> list[list[Node]]:
    """Compute nodes in graph order, each anchor (matmul, conv) grouped with its pointwise epilogue chain.

    A node joins the block of the node before it when it is the only reader of
    that node's output (not a graph output) and is elementwise or broadcast
    with the same output shape: bias, batch norm, activation, residual add.
    Its other operands come from outside the chain, so no cycle can form.  A
    graph the ``fuse-blocks`` pass annotated uses its partition instead
    (:func:`named_blocks`).
    """
    uses = _readers(graph)
    outputs = {id(v) for v in graph.outputs}
    taken: set[int] = set()
    blocks: list[list[Node]] = []
    for node in graph.nodes:
        if is_view(node.op) or id(node) in taken:
            continue
        block = [node]
        if get_op(node.op).layer:
            while (nxt := _epilogue_next(block[-1], uses, outputs)) is not None and id(nxt) not in taken:
                block.append(nxt)
        taken.update(id(n) for n in block)
        blocks.append(block)
    return blocks


def named_blocks(graph: Graph) -> list[list[Node]]:
    """Compute nodes grouped by ``Node.block`` (the fuse-blocks partition), blocks ordered by their first node.

    A compute node with no block name is a block of its own; view ops stay
    views whatever their block.  Each block is checked against the
    partition's contract (:func:`check_block`).
    """
    named: dict[str, list[Node]] = {}
    blocks: list[list[Node]] = []
    for node in graph.nodes:
        if is_view(node.op):
            continue
        if not node.block:
            blocks.append([node])
        elif node.block in named:
            named[node.block].append(node)
        else:
            named[node.block] = [node]
            blocks.append(named[node.block])
    readers = _readers(graph)
    outputs = {id(v) for v in graph.outputs}
    for name, block in named.items():
        check_block(name, block, readers, outputs)
    return blocks


def _readers(graph: Graph) -> dict[int, list[Node]]:
    """Value id -> the nodes reading it."""
    uses: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                uses.setdefault(id(v), []).append(n)
    return uses


def check_block(name: str, block: list[Node], readers: Mapping[int, list[Node]], outputs: set[int]) -> None:
    """Refuse a block that one kernel called at its last node cannot compute: only that node's outputs may leave it."""
    members = {id(n) for n in block}
    for node in block[:-1]:
        for v in node.outputs:
            outside = [r for r in readers.get(id(v), []) if id(r) not in members]
            if outside or id(v) in outputs:
                who = f"read by {outside[0].op} ({outside[0].outputs[0].name})" if outside else "a graph output"
                raise CodegenError(f"block {name!r}: value {v.name!r} of {node.op} is {who}, but only the "
                                   f"block's last node ({block[-1].op} -> {block[-1].outputs[0].name}) may "
                                   f"have outputs used outside the block")


def kernel_blocks(graph: Graph) -> list[list[Node]]:
    """The kernels' blocks: the named partition when any node has a block name, else anchor + epilogue chains."""
    return named_blocks(graph) if any(n.block for n in graph.nodes) else epilogue_blocks(graph)


def _tensor_type(v: Value) -> relax.TensorType:
    return relax.TensorType(static_shape(v), tvm_dtype(v.type.dtype))


def _dedupe(kernels: list[Kernel]) -> dict[int, str]:
    """Map kernel index -> name of the first structurally equal kernel (LLVM builds each once)."""
    seen: dict[int, list[Kernel]] = {}
    alias: dict[int, str] = {}
    for i, k in enumerate(kernels):
        h = tvm_ffi.structural_hash(k.func.without_attr("global_symbol"))
        for other in seen.get(h, []):
            if tvm_ffi.structural_equal(k.func.without_attr("global_symbol"),
                                        other.func.without_attr("global_symbol")):
                alias[i] = other.name
                break
        else:
            seen.setdefault(h, []).append(k)
            alias[i] = k.name
    return alias


def _tune(kernels: list[Kernel], alias: dict[int, str], target: Target, opts: TuneOptions,
          progress: Callable[[str, int, int], None] | None) -> None:
    """Replace each distinct kernel's hand schedule by a tuned one where that is faster."""
    from .tune import tune_kernel

    unique = [i for i, k in enumerate(kernels) if alias[i] == k.name]
    for n, i in enumerate(unique):
        if progress:
            progress("tune", n, len(unique))
        k = kernels[i]
        plain = lower_kernel(k.nodes, target, name=k.name, schedule=False)
        res = tune_kernel(plain.func, k.func, target, opts)
        k.func = res.func
        k.tuning = f"{res.source} (hand {res.hand_us or 0:.1f} us, MetaSchedule {res.tuned_us or 0:.1f} us)"


def lower_kernel(block: list[Node], target: Target, *, name: str, schedule: bool = True) -> Kernel:
    """One block's kernel: the fused attention kernel where it matches the block, else :func:`lower_block`."""
    spec = match_attention(block)
    if spec is None:
        return lower_block(block, target, name=name, schedule=schedule)
    try:
        return lower_attention(spec, target, name, schedule=schedule)
    except Exception as e:  # noqa: BLE001 - the generic kernel computes the same, more slowly
        kernel = lower_block(block, target, name=name, schedule=schedule)
        kernel.notes.append(f"fused attention failed ({type(e).__name__}: {e}); lowered as a plain block")
        return kernel


def _kernel_name(block: list[Node], i: int) -> str:
    return f"k{i:03d}_{'_'.join(n.op for n in block[:3])}"


def refuse_subbyte_buffers(graph: Graph, kernels: list[Kernel]) -> None:
    """CodegenError naming the first buffer of a sub-byte dtype (int4, float4, ...) that would reach TVM:
    a graph input or output or a kernel's operand or result. TVM 0.27 miscompiles packed sub-byte
    buffers whatever op reads or writes them (a lowering that packs a constant, as dq_matmul does
    its int4 weights, passes uint8 instead and is fine)."""
    values = [*graph.inputs, *graph.outputs, *(v for n in graph.nodes if is_view(n.op) for v in n.inputs),
              *(a.value for k in kernels for a in k.args if a.value is not None),
              *(v for k in kernels for v in k.outputs)]
    for v in values:
        if BITS.get(v.type.dtype, 8) < 8:
            dt = tvm_dtype(v.type.dtype)
            raise CodegenError(f"value {v.name!r} has dtype {dt}: TVM 0.27's LLVM code for sub-byte buffers is "
                               f"wrong; kiln runs {dt} tensors only in the interpreter")
    for k in kernels:
        for a in k.args:
            if a.value is None and BITS.get(from_numpy_dtype(a.const.dtype), 8) < 8:
                raise CodegenError(f"kernel {k.name}: a packed constant has dtype {a.const.dtype}, "
                                   f"which TVM 0.27 miscompiles")


def build_graph(graph: Graph, target: Target, *, tune: TuneOptions | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                limits: Limits = DEFAULT_LIMITS) -> CompiledGraph:
    """Lower, schedule (optionally tune) and compile ``graph`` (static shapes) for ``target``.

    Every constant becomes a contiguous weight array; one past ``limits.constant_bytes`` (a broadcast
    view from ConstantOfShape costs nothing until here) is refused before it is allocated."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    blocks = kernel_blocks(graph)
    kernels: list[Kernel] = []
    for i, block in enumerate(blocks):
        if progress:
            progress("lower", i, len(blocks))
        kernels.append(lower_kernel(block, target, name=_kernel_name(block, i)))
    timings["lower+schedule"] = time.perf_counter() - t0
    refuse_subbyte_buffers(graph, kernels)

    t1 = time.perf_counter()
    alias = _dedupe(kernels)
    if tune is not None:
        t_tune = time.perf_counter()
        _tune(kernels, alias, target, tune, progress)
        timings["tune"] = time.perf_counter() - t_tune
    # a block's kernel is called where its last node stands (all its operands are ready there)
    by_node = {id(k.nodes[-1]): (k, alias[i]) for i, k in enumerate(kernels)}
    bb = relax.BlockBuilder()
    inputs = [relax.Var(v.name, _tensor_type(v)) for v in graph.inputs]
    env: dict[int, relax.Expr] = {id(v): var for v, var in zip(graph.inputs, inputs)}
    weights: dict[str, np.ndarray] = {}
    weight_vars: list[relax.Var] = []

    def weight(name: str, array: np.ndarray) -> relax.Var:
        check_limit(limits, "constant_bytes", int(array.size) * array.itemsize,
                    f"@{graph.name}: weight {name!r} ({array.dtype}{list(array.shape)})")
        array = np.require(array, requirements="C")
        var = relax.Var(f"w{len(weights)}", relax.TensorType(array.shape, tvm_dtype_of(array)))
        weights[name] = array
        weight_vars.append(var)
        return var

    packed: dict[tuple[int, int], relax.Var] = {}
    for k in kernels:
        node = k.nodes[-1]
        for j, a in enumerate(k.args):
            if a.value is None:
                packed[id(node), j] = weight(f"{k.name}.arg{j}", a.const)
            elif a.value.const is not None and id(a.value) not in env:
                env[id(a.value)] = weight(a.value.name, a.value.const)
    for v in list(graph.outputs) + [n.inputs[0] for n in graph.nodes if is_view(n.op)]:
        if v.const is not None and id(v) not in env:
            env[id(v)] = weight(v.name, v.const)

    gvars: dict[str, tvm.ir.GlobalVar] = {}
    with bb.function("main", inputs + weight_vars, pure=True):
        with bb.dataflow():
            for node in graph.nodes:
                if is_view(node.op):
                    src = env[id(node.inputs[0])]
                    env[id(node.outputs[0])] = bb.emit(relax.op.reshape(src, static_shape(node.outputs[0])))
                    continue
                if id(node) not in by_node:
                    continue  # inside a block: its kernel is called at the block's last node
                k, fname = by_node[id(node)]
                if fname not in gvars:
                    gvars[fname] = bb.add_func(k.func.with_attr("global_symbol", fname), fname)
                args = [env[id(a.value)] if a.value is not None else packed[id(node), j]
                        for j, a in enumerate(k.args)]
                outs = [_tensor_type(v) for v in k.outputs]
                call = bb.emit(relax.call_tir(gvars[fname], args, outs if len(outs) > 1 else outs[0]))
                if len(outs) == 1:
                    env[id(k.outputs[0])] = call
                else:
                    for j, v in enumerate(k.outputs):
                        env[id(v)] = bb.emit(relax.TupleGetItem(call, j))
            # one output is returned bare: the runtime skips unpacking a tuple (2 us a run)
            outs = [env[id(v)] for v in graph.outputs]
            out = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(out)
    mod = bb.get()
    timings["relax"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    if progress:
        progress("llvm", len(blocks), len(blocks))
    # "compiled": main becomes native code calling the kernels (no bytecode
    # interpreter between kernels: 38 -> 17 us per call on the zoo MLP)
    ex = relax.build(mod, target=target, exec_mode="compiled")
    timings["llvm"] = time.perf_counter() - t2
    return CompiledGraph(ex, graph, weights, kernels, len(gvars), target, timings)


def tvm_dtype_of(array: np.ndarray) -> str:
    return "bool" if array.dtype == np.bool_ else str(array.dtype)
