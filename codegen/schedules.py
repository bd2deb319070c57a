"""CPU schedules for kiln's kernels (TVM 0.27 ``s_tir`` schedules).

Every kernel kiln generates is a TE-built PrimFunc (``te.create_prim_func``).
TVM's default CPU pipeline emits neither parallel nor vectorized loops, so each
kernel gets one of the schedules below, chosen by the kernel's *anchor kind*:

==============  ==========================================================
anchor kind     schedule
==============  ==========================================================
matmul          :func:`schedule_matmul` (register-blocked, packed weight)
batch_matmul    :func:`schedule_matmul` (batch axes fused into the
                parallel loop; both operands activations)
conv2d          :func:`schedule_conv2d_nchw` (direct convolution, output
                channels x output columns register tile)
injective       :func:`schedule_injective` (elementwise / broadcast / copy)
reduction       :func:`schedule_reduction` (row reductions: softmax,
                layer norm, reduce_mean ...)
==============  ==========================================================

All schedule functions accept a ``PrimFunc``, an ``IRModule`` or an
``s_tir.Schedule`` and return the (possibly new) ``Schedule``; they keep the
kernel's semantics for any shape (tails are padded or guarded, never assumed
away).  The ``*_te`` helpers build the TE computes the schedules are tuned
for (weights packed, output tiles padded); the schedules also work, less
quickly, on plain TE computes.

Tile sizes below were chosen by measurement on a 2-core AMD EPYC (Zen 2,
AVX2+FMA, 16 ymm registers): see ``scripts/bench_schedules.py``.

Threads: TVM's runtime sizes its pool from ``TVM_NUM_THREADS`` /
``OMP_NUM_THREADS``, else *half* the logical CPUs on x86 (it assumes SMT) -
one thread on this 2-vCPU machine.  Call :func:`kiln.codegen.target.
configure_threads` (or set ``TVM_NUM_THREADS``) before the first kernel runs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.ir import IRModule
from tvm.ir.expr import TensorLoad
from tvm.ir.prim.expr import Add as PrimAdd
from tvm.s_tir import SBlockRealize, Schedule, ScheduleError
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars

from .target import host_target, num_cores, vector_lanes, vector_width_bits

__all__ = [
    "ANCHOR_KINDS",
    "MatmulTE",
    "ConvTE",
    "as_schedule",
    "packed_matmul_te",
    "pack_weight",
    "batch_matmul_te",
    "conv2d_nchw_te",
    "conv2d_nchw_im2col_te",
    "depthwise_conv2d_te",
    "conv2d_ocvec_te",
    "pack_conv_ocvec",
    "ocvec_block",
    "schedule_conv2d_ocvec",
    "depthwise_channels",
    "schedule_depthwise_conv2d",
    "conv_ow_tile",
    "schedule_matmul",
    "schedule_batch_matmul",
    "schedule_matmul_int16_pairs",
    "schedule_conv2d_int16_pairs",
    "schedule_conv2d_nchw",
    "schedule_injective",
    "schedule_reduction",
    "schedule_for",
    "fold_block",
    "serial_stages",
    "build",
    "loop_kinds",
]

ANCHOR_KINDS = ("matmul", "batch_matmul", "conv2d", "conv2d_ocvec", "depthwise_conv2d_cl", "injective",
                "reduction")

# Register tile of the matmul micro-kernel: MR rows x NR columns of C kept in
# registers.  6x16 on AVX2 = 12 ymm accumulators + 2 for B + 1 broadcast of A;
# measured 1.25x faster than 4x16 and 8x8 on 512^3 and 128x256x1024.  AVX-512's
# 32 zmm take 8 rows (16 accumulators): 1 thread, 16x384x1536 117 vs 83 GFLOP/s
# with 6 rows, 512^3 146 vs 139; 12 and 14 rows spilled or paid a ragged tail.
MATMUL_MR = 6
MATMUL_MR_WIDE = 8
MATMUL_NR_VECTORS = 2  # NR = 2 vectors (16 float32 on AVX2)
# Inner k unroll (kf): 1 was as fast or faster than 4 in every measurement.
MATMUL_KF = 1
# Kernels with fewer elements (elementwise) / loop iterations (conv) than
# this run on one thread: a parallel launch costs ~1-3 us.  With 2 threads a
# 1x128x256 add went from 4 to 3 us; a 17x33x45 mean from 5 to 3 us.
PARALLEL_MIN_WORK = 1 << 14
# Row reductions do several passes per element (and often exp), so they go
# parallel from fewer elements.
PARALLEL_MIN_WORK_REDUCTION = 1 << 13
# Multiply-adds below which a matmul runs on one thread: waking the pool costs
# a few microseconds, what a 4x128x128 matmul takes on one core.
PARALLEL_MIN_WORK_MATMUL = 1 << 17
# Calls too expensive to recompute: a block using one is not inlined into
# several consumers (softmax's exp would otherwise be computed twice; TVM
# lowers a vector exp to one libm call per lane).
_EXPENSIVE = re.compile(
    r"T\.(exp|exp2|exp10|log|log2|log10|log1p|tanh|erf|pow|sigmoid|sin|cos|tan|atan|fast_\w+)\("
)

ScheduleLike = Schedule | tirx.PrimFunc | IRModule


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def as_schedule(x: ScheduleLike) -> Schedule:
    """Wrap a PrimFunc / IRModule in a ``Schedule`` (a Schedule is returned as is)."""
    if isinstance(x, Schedule):
        return x
    if isinstance(x, tirx.PrimFunc):
        x = IRModule({"main": x})
    if isinstance(x, IRModule):
        return Schedule(x)
    raise TypeError(f"expected a PrimFunc, IRModule or s_tir.Schedule, got {type(x).__name__}")


def _target(target: Target | None) -> Target:
    return target if target is not None else host_target()


def _lanes(target: Target | None, dtype: str) -> int:
    return vector_lanes(_target(target), dtype)


def _cores(target: Target | None) -> int:
    t = _target(target)
    return int(t.attrs["num-cores"]) if "num-cores" in t.attrs else num_cores()


def _extent(sch: Schedule, loop) -> int:
    ext = sch.get(loop).extent
    if not isinstance(ext, tirx.IntImm):
        raise ValueError(f"schedules need static shapes; loop extent is {ext}")
    return int(ext)


def _out_dtype(sch: Schedule, blk) -> str:
    return str(sch.get(blk).writes[0].source.dtype)


def _all_blocks(sch: Schedule) -> list:
    """Blocks directly under the root block, in program (topological) order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _block_name(sch: Schedule, blk) -> str:
    return str(sch.get(blk).name_hint)


def _iter_kinds(sch: Schedule, blk) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(blk).iter_vars]


def _is_reduction(sch: Schedule, blk) -> bool:
    return any(k == tirx.IterVar.CommReduce for k in _iter_kinds(sch, blk))


def _output_blocks(sch: Schedule) -> list:
    return list(sch.get_output_blocks(sch.get_sblock("root")))


def _is_output(sch: Schedule, blk) -> bool:
    name = _block_name(sch, blk)
    return any(_block_name(sch, b) == name for b in _output_blocks(sch))


def _inline_injective(sch: Schedule, keep: Sequence = (), only: Collection[str] | None = None) -> None:
    """``compute_inline`` every non-output, non-reduction block not in ``keep`` (and in ``only``, if given)."""
    keep_names = {_block_name(sch, b) if not isinstance(b, str) else b for b in keep}
    changed = True
    while changed:
        changed = False
        for blk in _all_blocks(sch):
            name = _block_name(sch, blk)
            if name in keep_names or (only is not None and name not in only):
                continue
            if _is_reduction(sch, blk) or _is_output(sch, blk):
                continue
            consumers = list(sch.get_consumers(blk))
            if len(consumers) > 1 and _EXPENSIVE.search(sch.get(blk).body.script()):
                continue
            # a per-row value (a mean) inlined into a reduction over the row
            # would be recomputed for every element of the row
            if any(_is_reduction(sch, c) and _work(sch, c) > _work(sch, blk) for c in consumers):
                continue
            try:
                sch.compute_inline(blk)
                changed = True
            except ScheduleError:
                continue


def _reachable(sch: Schedule, blk, step: Callable) -> set[str]:
    """Names of the blocks reachable from ``blk`` by ``step`` (``sch.get_producers`` / ``get_consumers``)."""
    seen: set[str] = set()
    frontier = [blk]
    while frontier:
        nxt = []
        for b in frontier:
            for other in step(b):
                name = _block_name(sch, other)
                if name not in seen:
                    seen.add(name)
                    nxt.append(other)
        frontier = nxt
    return seen


def fold_block(sch: Schedule, anchor: str) -> None:
    """Inline a fused block's pointwise stages around its anchor (matmul, conv) before the anchor's schedule.

    Producer chains are inlined into the stages the anchor reads (its pad /
    pack stage, or the one operand stage left at the root: computed once, not
    once per register tile).  Epilogue chains (bias, activation, a diamond
    that re-joins) are inlined into the stage writing the block's output,
    which :func:`_epilogue_at` then computes inside the anchor's tile.
    """
    blk = sch.get_sblock(anchor)
    direct = {_block_name(sch, b) for b in sch.get_producers(blk)}
    around = (_reachable(sch, blk, sch.get_producers) - direct) | _reachable(sch, blk, sch.get_consumers)
    _inline_injective(sch, keep=[anchor], only=around)


def _is_copy(sch: Schedule, blk) -> bool:
    """Is ``blk`` a plain load (transpose, slice, broadcast): no arithmetic, no guard?"""
    body = sch.get(blk).body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, TensorLoad)


def _keeps_last_axis(sch: Schedule, blk) -> bool:
    """Does copy ``blk`` read along its last axis with stride 1 (or not at all), so vector loads stay contiguous?"""
    block = sch.get(blk)
    if not block.iter_vars:
        return True
    last = block.iter_vars[-1].var
    *lead, tail = block.body.value.indices or [None]
    if any(_uses(i, last) for i in lead):
        return False
    return tail is None or not _uses(tail, last) or tail.same_as(last) or (
        isinstance(tail, PrimAdd) and (tail.a.same_as(last) and not _uses(tail.b, last)
                                       or tail.b.same_as(last) and not _uses(tail.a, last)))


def _scalar_operand(sch: Schedule, anchor, producer) -> bool:
    """Does ``anchor`` read ``producer``'s output independently of its last spatial axis (a broadcast scalar)?"""
    block = sch.get(anchor)
    spatial = [iv.var for iv in block.iter_vars if int(iv.iter_type) == tirx.IterVar.DataPar]
    buf = sch.get(producer).writes[0].source
    regions = [r for r in block.reads if r.source.same_as(buf)]
    return bool(spatial) and all(not _uses(rng.min, spatial[-1]) for r in regions for rng in r.region)


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr, []))


def _inline_operands(sch: Schedule, anchor: str) -> None:
    """Inline the anchor's operand stages that are plain copies (a transposed, sliced or broadcast operand).

    A copy costs only address arithmetic inside the anchor's loops as long as
    the vectorized operand stays contiguous along its last axis; the operand
    read as a broadcast scalar (matmul's left, conv's weight) may be permuted.
    """
    blk = sch.get_sblock(anchor)
    for prod in sch.get_producers(blk):
        name = _block_name(sch, prod)
        if name.startswith(anchor + "_") or name.endswith("_pad") or _is_output(sch, prod):
            continue  # the anchor's own layout stages, and pad_einsum's
        if len(sch.get_consumers(prod)) != 1 or not _is_copy(sch, prod):
            continue
        if _keeps_last_axis(sch, prod) or _scalar_operand(sch, blk, prod):
            try:
                sch.compute_inline(prod)
            except ScheduleError:
                pass


def _work(sch: Schedule, blk) -> int:
    return math.prod(_extent(sch, lp) for lp in sch.get_loops(blk))


def _vectorize_tail_split(sch: Schedule, loop, vec: int) -> tuple:
    """Split ``loop`` into vectors of ``vec`` lanes without a predicate.

    Returns ``(outer, inner, tail)``: the main part is ``outer x inner`` with
    ``inner`` vectorized; a remainder (extent % vec) goes to ``tail``, a
    separate loop vectorized on its own (LLVM legalises the odd width).  Any of
    them may be ``None``.
    """
    ext = _extent(sch, loop)
    if ext == 0:
        return None, None, None
    main_ext = ext - ext % vec
    if main_ext == 0:
        sch.vectorize(loop)
        return None, None, loop
    tail = None
    if main_ext != ext:
        loop, tail = sch.loop_partition(loop, [main_ext, None])
    if main_ext == vec:
        outer, inner = None, loop
    else:
        outer, inner = sch.split(loop, [None, vec])
    sch.vectorize(inner)
    if tail is not None:
        sch.vectorize(tail)
    return outer, inner, tail


def _schedule_elementwise_block(
    sch: Schedule, blk, target: Target | None, *, parallel: bool = True, unroll_vectors: int = 1
) -> None:
    """Fuse/split/vectorize/parallel one injective (spatial-only) block."""
    loops = sch.get_loops(blk)
    if not loops:
        return
    vec = _lanes(target, _out_dtype(sch, blk))
    cores = _cores(target)
    exts = [_extent(sch, lp) for lp in loops]
    total = math.prod(exts)
    if total == 0:
        return
    do_parallel = parallel and cores > 1 and total >= PARALLEL_MIN_WORK
    lead = math.prod(exts[:-1])
    if exts[-1] >= vec and (lead >= 2 * cores or not do_parallel) and len(loops) > 1:
        # Rows x contiguous last axis: keeps broadcast operands as ramps
        # (fusing everything would turn a broadcast B[k] into a gather).
        outer_rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        _vectorize_tail_split(sch, loops[-1], vec * unroll_vectors)
        if do_parallel:
            sch.parallel(outer_rows)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, _, _ = _vectorize_tail_split(sch, fused, vec * unroll_vectors)
    if do_parallel and outer is not None:
        # TVM hands each thread one contiguous range of the parallel loop, so
        # iterating over single vectors costs nothing per task; the short
        # remainder (< one vector) runs after it.
        sch.parallel(outer)


def _schedule_side_blocks(sch: Schedule, anchor: str, target: Target | None) -> None:
    """Stages left at the root around an anchor (weight packing, padding, a
    reshaping epilogue): parallel vectorized copies."""
    for blk in _all_blocks(sch):
        if _block_name(sch, blk) == anchor or _is_reduction(sch, blk):
            continue
        loops = sch.get_loops(blk)
        if any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
            continue  # already scheduled
        try:
            _schedule_elementwise_block(sch, blk, target)
        except ScheduleError:
            pass


def _reads_pointwise(sch: Schedule, producer, consumer) -> bool:
    """Does ``consumer`` read ``producer``'s output only at its own indices?

    (``out[i, j] = f(C[i, j], ...)``: an un-pad slice, bias, activation.)  A
    reshaping consumer fails this and must not be computed inside the tile.
    """
    buf = sch.get(producer).writes[0].source
    cons = sch.get(consumer)
    found = False
    for r in cons.reads:
        if not r.source.same_as(buf):
            continue
        found = True
        if len(r.region) != len(cons.iter_vars):
            return False
        for rng, iv in zip(r.region, cons.iter_vars):
            # a unit axis may be read at 0 (a broadcasting consumer's index)
            at = rng.min.same_as(iv.var) or (_is_const(rng.min, 0) and _is_const(iv.dom.extent, 1))
            if not (at and _is_const(rng.extent, 1)):
                return False
    return found


def _is_const(expr, value: int) -> bool:
    return isinstance(expr, tirx.IntImm) and int(expr) == value


def _epilogue_at(sch: Schedule, blk, loop) -> object:
    """Keep ``blk``'s output tile in a local buffer written back at ``loop``.

    The injective consumers of ``blk`` (an un-padding slice, bias, activation)
    are folded into one write-back block, computed at ``loop``.  Returns that
    write-back block.
    """
    consumers = list(sch.get_consumers(blk))
    if (
        len(consumers) == 1
        and not _is_output(sch, blk)
        and not _is_reduction(sch, consumers[0])
        and _reads_pointwise(sch, blk, consumers[0])
    ):
        epi = consumers[0]
        while True:  # fold the rest of an elementwise epilogue chain into epi
            nxt = list(sch.get_consumers(epi))
            if len(nxt) != 1 or _is_reduction(sch, nxt[0]):
                break
            try:
                sch.reverse_compute_inline(nxt[0])
            except ScheduleError:
                break
        sch.set_scope(blk, 0, "local")
    else:
        epi = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(epi, loop, preserve_unit_loops=False)
    inner = sch.get_loops(epi)[-1]
    # vectorize the write-back when its tile loop has a static extent (a
    # reshaping epilogue can give a data-dependent one, which LLVM cannot take)
    if isinstance(sch.get(inner).extent, tirx.IntImm) and _extent(sch, inner) > 1:
        try:
            sch.vectorize(inner)
        except ScheduleError:
            pass
    return epi


# --------------------------------------------------------------------------
# TE builders
# --------------------------------------------------------------------------


@dataclass
class MatmulTE:
    """What the matmul TE builders return.

    ``inputs + [output]`` are the PrimFunc's parameters (pass them to
    ``te.create_prim_func``).  ``compute`` is the reduction stage (block
    ``name``); ``packed`` the packed right operand (None if not packed).
    """

    inputs: list
    output: te.Tensor
    compute: te.Tensor
    packed: te.Tensor | None
    block: str

    def prim_func(self) -> tirx.PrimFunc:
        return te.create_prim_func([*self.inputs, self.output])


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _zero(dtype: str):
    return tirx.const(0, dtype)


def packed_matmul_te(
    A: te.Tensor,
    B_shape: Sequence[int],
    *,
    bn: int = 16,
    prepacked: bool | te.Tensor = False,
    transpose_b: bool = False,
    bias: te.Tensor | None = None,
    out_dtype: str | None = None,
    name: str = "matmul",
) -> MatmulTE:
    """``C[..., M, N] = A[..., M, K] @ B[K, N]`` with ``B`` a constant weight.

    ``B`` (``[K, N]``, or ``[N, K]`` with ``transpose_b``) is packed as
    ``Bp[ceil(N/bn), K, bn]`` (zero-padded), so the micro-kernel reads ``bn``
    contiguous columns per ``k``.  With ``prepacked=True`` the PrimFunc takes
    ``Bp`` itself (make it with :func:`pack_weight` at compile time; pass the
    placeholder to use, or ``True`` for a new one);
    otherwise the packing is a stage of the kernel (block ``name + "_pack"``).
    The reduction runs over the padded width ``ceil(N/bn)*bn`` and block
    ``name + "_unpad"`` slices it (with the optional ``bias[N]`` added).
    """
    *lead, M, K = (int(d) for d in A.shape)
    if transpose_b:
        N, Kb = (int(d) for d in B_shape)
    else:
        Kb, N = (int(d) for d in B_shape)
    if Kb != K:
        raise ValueError(f"matmul shapes do not agree: A {list(A.shape)} B {list(B_shape)}")
    dtype = out_dtype or A.dtype
    NO = -(-N // bn)
    NP = NO * bn
    if isinstance(prepacked, te.Tensor):
        if tuple(int(d) for d in prepacked.shape) != (NO, K, bn):
            raise ValueError(f"packed weight is {list(prepacked.shape)}, expected {[NO, K, bn]}")
        Bp = weight = prepacked
    elif prepacked:
        Bp = te.placeholder((NO, K, bn), A.dtype, name="B_packed")
        weight = Bp
    else:
        weight = te.placeholder(tuple(int(d) for d in B_shape), A.dtype, name="B")

        def pack(no, k, ni):
            n = no * bn + ni
            val = weight[n, k] if transpose_b else weight[k, n]
            return val if NP == N else tirx.if_then_else(n < N, val, _zero(A.dtype))

        Bp = te.compute((NO, K, bn), pack, name=f"{name}_pack")
    k = te.reduce_axis((0, K), name="k")

    def body(*idx):
        *b, i, j = idx
        a = A[(*b, i, k)]
        w = Bp[j // bn, k, j % bn]
        if a.dtype != dtype:
            a, w = a.astype(dtype), w.astype(dtype)
        return te.sum(a * w, axis=k)

    Cp = te.compute((*lead, M, NP), body, name=name)
    out = Cp
    if NP != N or bias is not None:
        if bias is not None:
            out = te.compute(
                (*lead, M, N),
                lambda *idx: Cp[idx] + bias[idx[-1]].astype(dtype),
                name=f"{name}_unpad",
            )
        else:
            out = te.compute((*lead, M, N), lambda *idx: Cp[idx], name=f"{name}_unpad")
    inputs = [A, weight] + ([bias] if bias is not None else [])
    return MatmulTE(inputs, out, Cp, Bp, name)


def pack_weight(B: np.ndarray, bn: int = 16, transpose_b: bool = False) -> np.ndarray:
    """numpy version of the weight packing: ``[K, N]`` -> ``[ceil(N/bn), K, bn]``."""
    B = np.asarray(B)
    if transpose_b:
        B = B.T
    K, N = B.shape
    NO = -(-N // bn)
    padded = np.zeros((K, NO * bn), dtype=B.dtype)
    padded[:, :N] = B
    return np.ascontiguousarray(padded.reshape(K, NO, bn).transpose(1, 0, 2))


def batch_matmul_te(
    A: te.Tensor,
    B: te.Tensor,
    *,
    transpose_b: bool = False,
    pack_b: bool | None = None,
    bn: int = 16,
    out_dtype: str | None = None,
    name: str = "batch_matmul",
) -> MatmulTE:
    """``C[..., M, N] = A[..., M, K] @ B[..., K, N]`` (or ``B[..., N, K]^T``).

    Both operands are activations (attention's ``Q K^T`` and ``P V``).  With
    ``pack_b`` (default: only when ``transpose_b``, where the un-packed loads
    would be strided gathers) ``B`` is repacked inside the kernel as
    ``Bp[..., ceil(N/bn), K, bn]``.  Without packing, a right operand whose
    ``N`` is not a multiple of the tile is padded by the schedule.
    """
    *ba, M, K = (int(d) for d in A.shape)
    *bb, d1, d2 = (int(d) for d in B.shape)
    N, Kb = (d1, d2) if transpose_b else (d2, d1)
    if Kb != K or ba != bb:
        raise ValueError(f"batch_matmul shapes do not agree: {list(A.shape)} x {list(B.shape)}")
    if pack_b is None:
        pack_b = transpose_b
    dtype = out_dtype or A.dtype
    k = te.reduce_axis((0, K), name="k")

    def cast(x):
        return x.astype(dtype) if x.dtype != dtype else x

    if not pack_b:
        if transpose_b:
            C = te.compute(
                (*ba, M, N),
                lambda *idx: te.sum(
                    cast(A[(*idx[:-2], idx[-2], k)]) * cast(B[(*idx[:-2], idx[-1], k)]), axis=k
                ),
                name=name,
            )
        else:
            C = te.compute(
                (*ba, M, N),
                lambda *idx: te.sum(
                    cast(A[(*idx[:-2], idx[-2], k)]) * cast(B[(*idx[:-2], k, idx[-1])]), axis=k
                ),
                name=name,
            )
        return MatmulTE([A, B], C, C, None, name)

    NO = -(-N // bn)
    NP = NO * bn

    def pack(*idx):
        *b, no, kk, ni = idx
        n = no * bn + ni
        val = B[(*b, n, kk)] if transpose_b else B[(*b, kk, n)]
        return val if NP == N else tirx.if_then_else(n < N, val, _zero(B.dtype))

    Bp = te.compute((*ba, NO, K, bn), pack, name=f"{name}_pack")
    Cp = te.compute(
        (*ba, M, NP),
        lambda *idx: te.sum(
            cast(A[(*idx[:-2], idx[-2], k)])
            * cast(Bp[(*idx[:-2], idx[-1] // bn, k, idx[-1] % bn)]),
            axis=k,
        ),
        name=name,
    )
    out = Cp if NP == N else te.compute((*ba, M, N), lambda *idx: Cp[idx], name=f"{name}_unpad")
    return MatmulTE([A, B], out, Cp, Bp, name)


@dataclass
class ConvTE:
    """What :func:`conv2d_nchw_te` returns (see :class:`MatmulTE`)."""

    inputs: list
    output: te.Tensor
    compute: te.Tensor
    block: str
    groups: int

    def prim_func(self) -> tirx.PrimFunc:
        return te.create_prim_func([*self.inputs, self.output])


def _pair(v, n=2) -> tuple:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return v


def _conv_padding(padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return (padding,) * 4
    p = tuple(int(x) for x in padding)
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    if len(p) == 4:
        return p  # top, left, bottom, right
    raise ValueError(f"padding must be an int, (h, w) or (top, left, bottom, right): {padding}")


# conv2d register tile: (output channels) x (output columns).  8 vector
# accumulators measured best (4 x 16 and 8 x 8 float32: 65-71 GFLOP/s on
# 1x64x56x56 3x3 on one core; 6 x 16, 12 x 8 and 16 x 8 were 38-48, 8 x 16
# 46).  Depthwise convs (no reuse across channels) still want several
# channels per tile for independent accumulator chains: mr=8 was 3x mr=1.
def conv_ow_tile(ow: int, lanes: int, depthwise: bool = False) -> int:
    """Output-column tile for a conv of output width ``ow``: 2 vectors unless
    that pads more columns than 1 vector does (depthwise: 2 vectors whenever
    ``ow`` fills them; 35 vs 29 GFLOP/s on 1x32x56x56)."""
    two, one = MATMUL_NR_VECTORS * lanes, lanes
    if ow <= one:
        # narrow rows (8x8 maps on AVX-512) take a half-width vector rather
        # than padding half the columns: 48 -> 30 us on a 64x64 3x3 8x8 conv
        half = one // 2
        return half if half >= 4 and ow <= half else one
    if depthwise and ow >= two:
        return two
    return two if _ceil_to(ow, two) <= _ceil_to(ow, one) else one


def _conv_oc_tile(oc: int, nr: int, lanes: int, depthwise: bool) -> int:
    want = max(1, (8 * lanes) // nr) if not depthwise else 8
    # a ragged channel tile puts a guard in the inner loops (6 x 16 with 64
    # channels ran at 58% of 4 x 16): prefer a divisor of oc near `want`
    for m in (want, want * 2, want // 2, 6, 3, 2):
        if 1 <= m <= 2 * want and oc % m == 0:
            return m
    return min(want, oc)


def conv2d_nchw_te(
    data: te.Tensor,
    weight: te.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: te.Tensor | None = None,
    ow_tile: int | str | None = "auto",
    target: Target | None = None,
    out_dtype: str | None = None,
    name: str = "conv2d",
) -> ConvTE:
    """Direct NCHW conv2d, output width padded to ``ow_tile`` for the schedule.

    ``data[N, C, H, W]``, ``weight[OC, C/groups, KH, KW]``; padding is an int,
    ``(h, w)`` or ``(top, left, bottom, right)``.  The input is zero-padded in
    its own stage (block ``name + "_pad"``) wide enough for ``ceil(OW /
    ow_tile) * ow_tile`` output columns, so the micro-kernel needs no guard;
    block ``name + "_unpad"`` drops the extra columns (and adds ``bias[OC]``).
    ``ow_tile="auto"`` picks the tile :func:`schedule_conv2d_nchw` will use
    (:func:`conv_ow_tile`); ``None`` computes exactly ``OW`` columns.
    """
    Nb, C, H, W = (int(d) for d in data.shape)
    OC, ICg, KH, KW = (int(d) for d in weight.shape)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pl, pb, pr = _conv_padding(padding)
    if C % groups or OC % groups or C // groups != ICg:
        raise ValueError(
            f"conv2d channels do not agree: data C={C}, weight {list(weight.shape)}, groups={groups}"
        )
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("conv2d output would be empty")
    if ow_tile == "auto":
        ow_tile = conv_ow_tile(OW, _lanes(target, out_dtype or data.dtype), depthwise=ICg == 1)
    OWp = _ceil_to(OW, int(ow_tile)) if ow_tile else OW
    Hp = H + pt + pb
    Wp = max(W + pl + pr, (OWp - 1) * sw + dw * (KW - 1) + 1)
    dtype = out_dtype or data.dtype

    def padded(n, c, h, w):
        cond = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
        return tirx.if_then_else(cond, data[n, c, h - pt, w - pl], _zero(data.dtype))

    if KH == KW == 1 and (sh > 1 or sw > 1):
        # a strided 1x1 conv reads one pixel in sh*sw: subsample once, then a stride-1 conv
        dpad = te.compute((Nb, C, OH, OWp), lambda n, c, h, w: padded(n, c, h * sh, w * sw), name=f"{name}_pad")

        def read(n, c, oh, kh, ow, kw):
            return dpad[n, c, oh, ow]
    elif sw > 1:
        # De-interleave columns by phase: tap kw of output column ow reads
        # phase (kw*dw) % sw at ow + (kw*dw) // sw, so vector loads along ow
        # stay contiguous instead of becoming stride-sw gathers.
        Wq = OWp + (dw * (KW - 1)) // sw
        dpad = te.compute((Nb, C, Hp, sw, Wq), lambda n, c, h, p, q: padded(n, c, h, q * sw + p),
                          name=f"{name}_pad")

        def read(n, c, oh, kh, ow, kw):
            return dpad[n, c, oh * sh + kh * dh, (kw * dw) % sw, ow + (kw * dw) // sw]
    else:
        dpad = te.compute((Nb, C, Hp, Wp), padded, name=f"{name}_pad") if (Hp, Wp) != (H, W) else data

        def read(n, c, oh, kh, ow, kw):
            return dpad[n, c, oh * sh + kh * dh, ow + kw * dw]
    ic = te.reduce_axis((0, ICg), name="ic")
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")
    OCg = OC // groups

    def body(n, oc, oh, ow):
        cin = ic if groups == 1 else (oc // OCg) * ICg + ic
        x = read(n, cin, oh, kh, ow, kw)
        w = weight[oc, ic, kh, kw]
        if x.dtype != dtype:
            x, w = x.astype(dtype), w.astype(dtype)
        return te.sum(x * w, axis=[ic, kh, kw])

    conv = te.compute((Nb, OC, OH, OWp), body, name=name)
    out = conv
    if OWp != OW or bias is not None:
        if bias is not None:
            out = te.compute(
                (Nb, OC, OH, OW),
                lambda n, c, h, w: conv[n, c, h, w] + bias[c].astype(dtype),
                name=f"{name}_unpad",
            )
        else:
            out = te.compute(
                (Nb, OC, OH, OW), lambda n, c, h, w: conv[n, c, h, w], name=f"{name}_unpad"
            )
    inputs = [data, weight] + ([bias] if bias is not None else [])
    return ConvTE(inputs, out, conv, name, groups)


def depthwise_channels(c: int, lanes: int) -> int:
    """Channels per vector of :func:`depthwise_conv2d_te`'s schedule: a power of two up to ``lanes`` dividing ``c``
    (no ragged channel tile), 0 when that is under 4 (too narrow to pay for the channels-last staging)."""
    ci = lanes
    while ci >= 4 and c % ci:
        ci //= 2
    return ci if ci >= 4 else 0


def depthwise_conv2d_te(
    data: te.Tensor,
    weight_hwc: te.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    bias: te.Tensor | None = None,
    out_dtype: str | None = None,
    name: str = "conv2d",
) -> ConvTE:
    """Depthwise conv2d (one input and one output channel per group) vectorized over channels.

    ``data[N, C, H, W]`` is copied once, zero-padded, into a channels-last stage (block
    ``name + "_pad"``, ``[N, Hp, Wp, C]``) and ``weight_hwc[KH, KW, C]`` (the ONNX weight
    ``[C, 1, KH, KW]`` transposed, at compile time when it is a constant) is read along ``C``, so
    the micro-kernel's loads are contiguous vectors of channels; the output stays NCHW.  On the
    small maps of mobile networks (1x1 to 8x8) the NCHW kernel, vectorized along the output row,
    wasted most of each vector and padded every row to a whole vector.
    """
    Nb, C, H, W = (int(d) for d in data.shape)
    KH, KW, Cw = (int(d) for d in weight_hwc.shape)
    if Cw != C:
        raise ValueError(f"depthwise conv2d: data has {C} channels, weight {list(weight_hwc.shape)}")
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pl, pb, pr = _conv_padding(padding)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("conv2d output would be empty")
    Hp, Wp = (OH - 1) * sh + dh * (KH - 1) + 1, (OW - 1) * sw + dw * (KW - 1) + 1
    dtype = out_dtype or data.dtype

    def padded(n, h, w, c):
        cond = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
        return tirx.if_then_else(cond, data[n, c, h - pt, w - pl], _zero(data.dtype))

    dpad = te.compute((Nb, Hp, Wp, C), padded, name=f"{name}_pad")
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")

    def body(n, c, oh, ow):
        x = dpad[n, oh * sh + kh * dh, ow * sw + kw * dw, c]
        w = weight_hwc[kh, kw, c]
        if x.dtype != dtype:
            x, w = x.astype(dtype), w.astype(dtype)
        return te.sum(x * w, axis=[kh, kw])

    conv = te.compute((Nb, C, OH, OW), body, name=name)
    out = conv
    if bias is not None:
        out = te.compute((Nb, C, OH, OW), lambda n, c, h, w: conv[n, c, h, w] + bias[c].astype(dtype),
                         name=f"{name}_unpad")
    inputs = [data, weight_hwc] + ([bias] if bias is not None else [])
    return ConvTE(inputs, out, conv, name, C)


def conv2d_ocvec_te(
    data: te.Tensor,
    weight_packed: te.Tensor,
    out_channels: int,
    *,
    stride=1,
    padding=0,
    dilation=1,
    bias: te.Tensor | None = None,
    out_dtype: str | None = None,
    name: str = "conv2d",
) -> ConvTE:
    """conv2d (one group) vectorized over output channels: ``weight_packed[OC/vb, C, KH, KW, vb]`` (the ONNX
    weight packed at compile time, :func:`pack_conv_ocvec`) is read as vectors of ``vb`` output channels and
    each input pixel is broadcast once for all of them (oneDNN's direct conv on a blocked weight); the input
    and output stay NCHW (block ``name + "_pad"`` zero-pads the input)."""
    Nb, C, H, W = (int(d) for d in data.shape)
    OCB, Cw, KH, KW, vb = (int(d) for d in weight_packed.shape)
    if Cw != C or OCB * vb != out_channels:
        raise ValueError(f"conv2d: data {list(data.shape)}, packed weight {list(weight_packed.shape)}")
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pl, pb, pr = _conv_padding(padding)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    if OH <= 0 or OW <= 0:
        raise ValueError("conv2d output would be empty")
    dtype = out_dtype or data.dtype
    if (pt, pl, pb, pr) != (0, 0, 0, 0):
        def padded(n, c, h, w):
            cond = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tirx.if_then_else(cond, data[n, c, h - pt, w - pl], _zero(data.dtype))

        dpad = te.compute((Nb, C, H + pt + pb, W + pl + pr), padded, name=f"{name}_pad")
    else:
        dpad = data
    ic = te.reduce_axis((0, C), name="ic")
    kh = te.reduce_axis((0, KH), name="kh")
    kw = te.reduce_axis((0, KW), name="kw")

    def body(n, oc, oh, ow):
        x = dpad[n, ic, oh * sh + kh * dh, ow * sw + kw * dw]
        w = weight_packed[oc // vb, ic, kh, kw, oc % vb]
        if x.dtype != dtype:
            x, w = x.astype(dtype), w.astype(dtype)
        return te.sum(x * w, axis=[ic, kh, kw])

    conv = te.compute((Nb, out_channels, OH, OW), body, name=name)
    out = conv
    if bias is not None:
        out = te.compute((Nb, out_channels, OH, OW), lambda n, c, h, w: conv[n, c, h, w] + bias[c].astype(dtype),
                         name=f"{name}_unpad")
    inputs = [data, weight_packed] + ([bias] if bias is not None else [])
    return ConvTE(inputs, out, conv, name, 1)


def pack_conv_ocvec(w: np.ndarray, vb: int) -> np.ndarray:
    """``[OC, C, KH, KW]`` -> ``[OC/vb, C, KH, KW, vb]`` (``OC`` a multiple of ``vb``)."""
    oc, c, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(oc // vb, vb, c, kh, kw).transpose(0, 2, 3, 4, 1))


# Accumulator vectors of the output-channel-vectorized conv's register tile (columns x channel vectors),
# leaving registers for the weight vectors and the broadcast pixel.
OCVEC_ACCUMULATORS = {512: 24, 256: 12}


def ocvec_block(oc: int, target: Target | None, dtype: str = "float32") -> int:
    """Output channels per packed weight block: two vectors of ``dtype`` when ``oc`` fills them, one, or 0."""
    lanes = _lanes(target, dtype)
    for vectors in (2, 1):
        if oc % (vectors * lanes) == 0:
            return vectors * lanes
    return 0


def conv2d_nchw_im2col_te(
    data: te.Tensor,
    weight: te.Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    name: str = "conv2d",
) -> ConvTE:
    """conv2d (groups=1) as im2col + matmul: ``W[OC, C*KH*KW] @ col[C*KH*KW, OH*OW]``.

    Kept for comparison (see the benchmark): the direct convolution was faster
    on every shape measured.  Block ``name`` is a batched matmul that
    :func:`schedule_matmul` schedules.
    """
    Nb, C, H, W = (int(d) for d in data.shape)
    OC, IC, KH, KW = (int(d) for d in weight.shape)
    if IC != C:
        raise ValueError("conv2d_nchw_im2col_te supports groups=1 only")
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    pt, pl, pb, pr = _conv_padding(padding)
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    R, P = C * KH * KW, OH * OW

    def colf(n, r, p):
        c, rem = r // (KH * KW), r % (KH * KW)
        kh, kw = rem // KW, rem % KW
        h = (p // OW) * sh + kh * dh - pt
        w = (p % OW) * sw + kw * dw - pl
        ok = tirx.all(h >= 0, h < H, w >= 0, w < W)
        return tirx.if_then_else(ok, data[n, c, h, w], _zero(data.dtype))

    col = te.compute((Nb, R, P), colf, name=f"{name}_im2col")
    wmat = te.compute(
        (OC, R), lambda o, r: weight[o, r // (KH * KW), (r // KW) % KH, r % KW], name=f"{name}_wmat"
    )
    r = te.reduce_axis((0, R), name="r")
    mm = te.compute(
        (Nb, OC, P), lambda n, o, p: te.sum(wmat[o, r] * col[n, r, p], axis=r), name=name
    )
    out = te.compute(
        (Nb, OC, OH, OW), lambda n, o, h, w: mm[n, o, h * OW + w], name=f"{name}_unpad"
    )
    return ConvTE([data, weight], out, mm, name, 1)


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------


def _split_loops(sch: Schedule, blk):
    loops = sch.get_loops(blk)
    kinds = _iter_kinds(sch, blk)
    if len(loops) != len(kinds):
        raise ValueError(f"block {_block_name(sch, blk)!r} has already been scheduled")
    spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
    return spatial, reduce


def matmul_rows(m: int, target: Target | None = None) -> int:
    """Rows of the matmul register tile for ``M = m``: as many as the vector registers hold
    (:data:`MATMUL_MR`, :data:`MATMUL_MR_WIDE` with 32 registers), or a divisor of ``m`` down to half
    that when ``m`` is a few tiles: the guarded ragged tile costs every tile (AVX2, 1 thread,
    16x384x1536: 4 rows 79 GFLOP/s, 6 rows 62; 128x384x1536: 6 rows 99, 4 rows 87)."""
    most = MATMUL_MR_WIDE if vector_width_bits(_target(target)) >= 512 else MATMUL_MR
    if m % most == 0 or m >= 8 * most:
        return most
    for rows in range(most - 1, most // 2 - 1, -1):
        if m % rows == 0:
            return rows
    return most


def schedule_matmul(
    sch: ScheduleLike,
    block_name: str = "matmul",
    *,
    mr: int | None = None,
    nr: int | None = None,
    kf: int | None = None,
    pad_m: bool = False,
    target: Target | None = None,
) -> Schedule:
    """Register-blocked CPU schedule for a (batched) matmul block.

    The block must compute ``C[b..., i, j] = sum_k f(A, B)`` (spatial loops
    ``b..., i, j`` then the reduction loop(s)); that covers
    :func:`packed_matmul_te`, :func:`batch_matmul_te` and a plain
    ``te.sum(A[i, k] * B[k, j])``.  Schedule: an ``mr x nr`` tile of C kept in
    registers (``nr`` = 2 vectors, vectorized; ``mr`` rows unrolled, :func:`matmul_rows`), ``k``
    outside the tile (optionally split by ``kf`` and unrolled), column tiles
    outside row tiles (one ``K x nr`` panel of B stays in L1/L2 while every row
    tile passes over it: 1 thread, 16x384x1536 70 -> 117 GFLOP/s, 128x384x1536
    86 -> 143), the batch and tile loops fused and ``parallel``, the init hoisted by
    ``decompose_reduction``, epilogue (un-pad slice, bias, activation) folded
    into the tile's write-back.  Tails: a ``j`` extent not a multiple of ``nr``
    is padded (``pad_einsum``; the ``*_te`` builders pad it themselves); rows
    past ``M`` are guarded (``pad_m=True`` pads them instead - measured
    slower).  Pack / pad stages are scheduled as parallel vectorized copies.
    """
    sch = as_schedule(sch)
    fold_block(sch, block_name)
    blk = sch.get_sblock(block_name)
    dtype = _out_dtype(sch, blk)
    vec = _lanes(target, dtype)
    nr = nr or MATMUL_NR_VECTORS * vec
    kf = kf or MATMUL_KF
    spatial, reduce = _split_loops(sch, blk)
    if len(spatial) < 2 or not reduce:
        raise ValueError(
            f"block {block_name!r} is not a matmul (needs >=2 spatial loops and a reduction)"
        )
    ext_i, ext_j = _extent(sch, spatial[-2]), _extent(sch, spatial[-1])
    nr = min(nr, _ceil_to(ext_j, vec))
    mr = min(mr or matmul_rows(ext_i, target), ext_i)
    pad_i = mr if (pad_m and ext_i % mr) else 1
    pad_j = nr if ext_j % nr else 1
    if pad_i > 1 or pad_j > 1:
        try:
            sch.pad_einsum(blk, [1] * (len(spatial) - 2) + [pad_i, pad_j] + [1] * len(reduce))
        except ScheduleError:
            pass  # not an einsum (e.g. a packed operand): ragged tiles are guarded
        fold_block(sch, block_name)  # a producer pad_einsum padded: into its pad stage
    _inline_operands(sch, block_name)
    blk = sch.get_sblock(block_name)
    spatial, reduce = _split_loops(sch, blk)
    *batch, i, j = spatial
    k = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
    io, ii = sch.split(i, [None, mr])
    jo, ji = sch.split(j, [None, nr])
    if kf > 1 and _extent(sch, k) % kf == 0:
        ko, ki = sch.split(k, [None, kf])
        sch.reorder(*batch, jo, io, ko, ki, ii, ji)
        sch.unroll(ki)
    else:
        ko = k
        sch.reorder(*batch, jo, io, ko, ii, ji)
    # the epilogue goes in the tile before the tile loops are fused: its
    # region must stay a box (see _epilogue_at)
    _epilogue_at(sch, blk, io)
    sch.vectorize(ji)
    sch.unroll(ii)
    work = _work(sch, blk)
    outer = sch.fuse(*batch, jo, io)
    if _cores(target) > 1 and _extent(sch, outer) > 1 and work >= PARALLEL_MIN_WORK_MATMUL:
        sch.parallel(outer)
    sch.decompose_reduction(blk, ko)
    _schedule_side_blocks(sch, block_name, target)
    return sch


# Register tile of the int16-pair (vpmaddwd) micro-kernel: rows x 8-column vectors,
# 12 int32 accumulators + 2 weight vectors + 1 broadcast pair on AVX2's 16 ymm.
QMATMUL_MR = 6
QMATMUL_NV = 2
# Output columns of the int16-pair conv's tile where there are 32 vector registers (AVX-512: the ymm
# kernel may use ymm16-31): 8 x 2 accumulators.  cnn-qdq's two convs, 2 threads: 27 -> 20 and 27 -> 18 us
# (6 columns had made 32- and 16-wide rows take 4-column tiles); 10, 12 and 16 columns were slower.
QCONV_MR_WIDE = 8


def schedule_matmul_int16_pairs(
    sch: ScheduleLike,
    block_name: str = "qmatmul",
    *,
    mr: int | None = None,
    nv: int | None = None,
    target: Target | None = None,
) -> Schedule:
    """Integer matmul on int16 pairs: block ``C[r, jo, ji] = sum_{kp, kk} A[r, kp, kk] * W[jo, kp, ji, kk]``.

    ``A`` is ``[R, K/2, 2]`` int16 (rows padded to ``mr``), ``W`` the packed
    ``[N/8, K/2, 8, 2]`` int16 weight (``jo`` padded to ``nv``), ``C`` int32.
    An ``mr x (nv*8)`` tile of C stays in registers (a local cache written back
    at the tile), ``kp`` runs outside the tile and each ``(ji, kk)`` 8x2 step is
    one ``vpmaddwd`` (:data:`kiln.codegen.intrin.DOT_8X2_I16`); the epilogue
    reading C (requantize, activation) is computed at the tile when its region
    allows, else in its own parallel vectorized loop.
    """
    from .intrin import DOT_8X2_I16

    sch = as_schedule(sch)
    fold_block(sch, block_name)
    blk = sch.get_sblock(block_name)
    consumers = list(sch.get_consumers(blk))
    r, jo, ji, kp, kk = sch.get_loops(blk)
    mr = min(mr or QMATMUL_MR, _extent(sch, r))
    nv = min(nv or QMATMUL_NV, _extent(sch, jo))
    ro, ri = sch.split(r, [None, mr])
    joo, joi = sch.split(jo, [None, nv])
    sch.reorder(ro, joo, kp, ri, joi, ji, kk)
    work = _work(sch, blk)
    cache = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(cache, joo, preserve_unit_loops=False)
    for epi in consumers:
        if len(sch.get(epi).iter_vars) != 2:
            continue  # a reshaping epilogue (batch dims unflattened): at the root, scheduled below
        try:
            sch.reverse_compute_at(epi, joo, preserve_unit_loops=False)
            inner = sch.get_loops(epi)[-1]
            if isinstance(sch.get(inner).extent, tirx.IntImm) and _extent(sch, inner) > 1:
                sch.vectorize(inner)
        except (ScheduleError, ValueError, tvm.error.InternalError):
            pass  # left at the root, scheduled below
    outer = sch.fuse(ro, joo)
    if _cores(target) > 1 and _extent(sch, outer) > 1 and work >= PARALLEL_MIN_WORK_MATMUL:
        sch.parallel(outer)
    sch.unroll(ri)
    sch.unroll(joi)
    sch.decompose_reduction(blk, kp)
    sch.tensorize(ji, DOT_8X2_I16)
    _schedule_side_blocks(sch, block_name, target)
    return sch


def schedule_conv2d_int16_pairs(
    sch: ScheduleLike,
    block_name: str = "qconv",
    *,
    mr: int | None = None,
    nv: int | None = None,
    target: Target | None = None,
) -> Schedule:
    """Integer conv on int16 channel pairs: ``C[n, oh, ow, jo, ji] = sum_{cp, kh, kw, kk} X[n, cp, ih, iw*2 + kk]
    * W[jo, cp, kh, kw, ji, kk]`` (``ow`` padded to ``mr``, ``jo`` to ``nv``; see lowering/quant.py).

    The :func:`schedule_matmul_int16_pairs` micro-kernel with output columns as rows: an ``mr x (nv*8)`` tile
    (output columns x output channels) in registers, ``cp, kh, kw`` outside it, each ``(ji, kk)`` step one
    ``vpmaddwd``; the NCHW epilogue is computed at the tile when it can be.
    """
    from .intrin import DOT_8X2_I16_GLOBAL

    sch = as_schedule(sch)
    fold_block(sch, block_name)
    blk = sch.get_sblock(block_name)
    consumers = list(sch.get_consumers(blk))
    n, oh, ow, jo, ji, cp, kh, kw, kk = sch.get_loops(blk)
    mr = min(mr or QMATMUL_MR, _extent(sch, ow))
    nv = min(nv or QMATMUL_NV, _extent(sch, jo))
    owo, owi = sch.split(ow, [None, mr])
    joo, joi = sch.split(jo, [None, nv])
    sch.reorder(n, oh, owo, joo, cp, kh, kw, owi, joi, ji, kk)
    work = _work(sch, blk)
    # the accumulator stays a global-scope buffer: only its tile is live under the parallel loop, so it
    # is compacted to one stack array there (a "local" one would be a workspace allocation per tile)
    for epi in consumers:
        try:
            sch.reverse_compute_at(epi, joo, preserve_unit_loops=False)
            *outer_epi, inner = sch.get_loops(epi)[-2:]
            if isinstance(sch.get(inner).extent, tirx.IntImm) and _extent(sch, inner) > 1:
                sch.vectorize(inner)
            # constant indices into the accumulator tile (unrolled), so LLVM can keep it in registers
            for lp in outer_epi:
                sch.unroll(lp)
        except (ScheduleError, ValueError, tvm.error.InternalError):
            pass  # left at the root, scheduled below
    outer = sch.fuse(n, oh, owo, joo)
    if _cores(target) > 1 and _extent(sch, outer) > 1 and work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.unroll(owi)
    sch.unroll(joi)
    init = sch.decompose_reduction(blk, cp)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ji, DOT_8X2_I16_GLOBAL)
    _schedule_side_blocks(sch, block_name, target)
    return sch


def schedule_batch_matmul(
    sch: ScheduleLike, block_name: str = "batch_matmul", **kwargs
) -> Schedule:
    """:func:`schedule_matmul` for ``[b..., M, K] x [b..., K, N]`` (same schedule)."""
    return schedule_matmul(sch, block_name, **kwargs)


def schedule_conv2d_nchw(
    sch: ScheduleLike,
    block_name: str = "conv2d",
    *,
    mr: int | None = None,
    nr: int | None = None,
    target: Target | None = None,
) -> Schedule:
    """Direct-convolution CPU schedule for an NCHW conv2d block.

    Loops ``n, oc, oh, ow`` (spatial) and ``ic, kh, kw`` (reduction).  A tile
    of ``mr`` output channels x ``nr`` output columns lives in registers
    (``ow`` vectorized, ``oc`` unrolled, ``kw`` unrolled); ``n, oc/mr, oh,
    ow/nr`` are fused and ``parallel``; the input-padding stage is a parallel
    vectorized copy.  Depthwise / grouped convs with one input channel per
    group use ``mr = 1`` (no register reuse across channels).  Works on
    :func:`conv2d_nchw_te` (output width padded to the tile) and on plain TE
    convs (a ragged ``ow`` tile is guarded).
    """
    sch = as_schedule(sch)
    fold_block(sch, block_name)
    _inline_operands(sch, block_name)
    blk = sch.get_sblock(block_name)
    dtype = _out_dtype(sch, blk)
    vec = _lanes(target, dtype)
    spatial, reduce = _split_loops(sch, blk)
    if len(spatial) != 4 or len(reduce) < 1:
        raise ValueError(f"block {block_name!r} is not an NCHW conv2d")
    n, oc, oh, ow = spatial
    ext_oc, ext_ow = _extent(sch, oc), _extent(sch, ow)
    ext_ic = _extent(sch, reduce[0])
    depthwise = ext_ic == 1 and len(reduce) == 3
    if nr is None:
        nr = conv_ow_tile(ext_ow, vec, depthwise)
    nr = max(1, min(nr, ext_ow))
    if mr is None:
        mr = _conv_oc_tile(ext_oc, nr, vec, depthwise)
    mr = max(1, min(mr, ext_oc))
    oco, oci = sch.split(oc, [None, mr])
    owo, owi = sch.split(ow, [None, nr])
    sch.reorder(n, oco, oh, owo, *reduce, oci, owi)
    _epilogue_at(sch, blk, owo)
    sch.vectorize(owi)
    if mr > 1:
        sch.unroll(oci)
    if len(reduce) == 3 and _extent(sch, reduce[2]) <= 7:
        sch.unroll(reduce[2])
    work = _work(sch, blk)
    outer = sch.fuse(n, oco, oh, owo)
    if _cores(target) > 1 and _extent(sch, outer) > 1 and work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.decompose_reduction(blk, reduce[0])
    _schedule_side_blocks(sch, block_name, target)
    return sch


def _tile_loops(sch: Schedule, epi, loop) -> list:
    """The write-back block ``epi``'s loops under ``loop`` except its innermost (vectorized) one."""
    loops = list(sch.get_loops(epi))
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop)))
    return loops[at + 1:-1]


def schedule_conv2d_ocvec(
    sch: ScheduleLike,
    block_name: str = "conv2d",
    *,
    target: Target | None = None,
) -> Schedule:
    """CPU schedule for :func:`conv2d_ocvec_te`: a register tile of output columns x the weight block's channel
    vectors, ``ic, kh`` loops around it (``kw`` unrolled), ``n, channel block, oh`` fused and parallel (a task
    writes whole output rows), the epilogue written back per tile."""
    sch = as_schedule(sch)
    fold_block(sch, block_name)
    blk = sch.get_sblock(block_name)
    spatial, reduce = _split_loops(sch, blk)
    if len(spatial) != 4 or len(reduce) != 3:
        raise ValueError(f"block {block_name!r} is not a conv2d")
    ow = spatial[3]
    packed = [r for r in sch.get(blk).reads if len(r.region) == 5]
    vb = int(packed[0].source.shape[4])
    lanes = _lanes(target, _out_dtype(sch, blk))
    budget = OCVEC_ACCUMULATORS.get(vector_width_bits(_target(target)), 12) // max(1, vb // lanes)
    ext_ow = _extent(sch, ow)
    tile = _divisor_tile(ext_ow, budget)
    if tile < min(4, ext_ow):
        tile = min(budget, ext_ow)  # a ragged tile (guarded) rather than one column at a time
    _channel_vector_tile(sch, blk, spatial, reduce, vb, tile, target)
    _schedule_side_blocks(sch, block_name, target)
    return sch


def _divisor_tile(extent: int, most: int) -> int:
    """The largest tile up to ``most`` that divides ``extent``."""
    return next(t for t in range(min(most, extent), 0, -1) if extent % t == 0)


def _channel_vector_tile(sch: Schedule, blk, spatial: Sequence, reduce: Sequence, vb: int, tile: int,
                         target: Target | None) -> None:
    """The register tile of the channel-vectorized convs: ``vb`` channels (vectorized) x ``tile`` output columns
    (unrolled), the reduction around it (``kw`` unrolled), kept channels-innermost so each accumulator is one
    vector; ``n, channel block, oh`` fused and parallel.  Channel blocks are outermost so a task writes whole
    output rows of its channels (tasks splitting a row shared its cache lines: 2 threads ran 4x slower than 1
    on a 96x14x14 depthwise conv); the epilogue is written back per tile with constant indices (unrolled), so
    LLVM keeps the tile in registers."""
    n, c, oh, ow = spatial
    co, cv = sch.split(c, [None, vb])
    owo, owi = sch.split(ow, [None, tile])
    sch.reorder(n, co, oh, owo, *reduce, owi, cv)
    epi = _epilogue_at(sch, blk, owo)
    sch.transform_layout(blk, ("write", 0), lambda n_, c_, h_, w_: (n_, h_, w_, c_))
    for lp in _tile_loops(sch, epi, owo):
        sch.unroll(lp)
    sch.vectorize(cv)
    if tile > 1:
        sch.unroll(owi)
    if _extent(sch, reduce[-1]) <= 7:
        sch.unroll(reduce[-1])
    work = _work(sch, blk)
    outer = sch.fuse(n, co, oh)
    if _cores(target) > 1 and _extent(sch, outer) > 1 and work >= PARALLEL_MIN_WORK:
        sch.parallel(outer)
    sch.decompose_reduction(blk, reduce[0])


# Output columns per register tile of the depthwise kernel (one channel vector each).
DEPTHWISE_OW_TILE = 8


def schedule_depthwise_conv2d(
    sch: ScheduleLike,
    block_name: str = "conv2d",
    *,
    target: Target | None = None,
) -> Schedule:
    """CPU schedule for :func:`depthwise_conv2d_te`: a tile of one channel vector x up to
    :data:`DEPTHWISE_OW_TILE` output columns in registers (``kw`` unrolled around it), the
    ``n, channel vector, oh`` loops fused and parallel, the epilogue written back per tile, the
    channels-last padding stage a parallel copy."""
    sch = as_schedule(sch)
    fold_block(sch, block_name)
    blk = sch.get_sblock(block_name)
    spatial, reduce = _split_loops(sch, blk)
    if len(spatial) != 4 or len(reduce) != 2:
        raise ValueError(f"block {block_name!r} is not a depthwise conv2d")
    c, ow = spatial[1], spatial[3]
    ci = depthwise_channels(_extent(sch, c), _lanes(target, _out_dtype(sch, blk)))
    if not ci:
        raise ValueError(f"block {block_name!r}: {_extent(sch, c)} channels do not fill a vector")
    _channel_vector_tile(sch, blk, spatial, reduce, ci, _divisor_tile(_extent(sch, ow), DEPTHWISE_OW_TILE), target)
    _schedule_channels_last_copy(sch, sch.get_sblock(block_name + "_pad"), target)
    _schedule_side_blocks(sch, block_name, target)
    return sch


def _schedule_channels_last_copy(sch: Schedule, blk, target: Target | None) -> None:
    """The NCHW -> padded NHWC copy: rows of the input read as contiguous vectors along ``w`` (stored with stride
    ``C``), rows in parallel; vectorizing along ``C`` instead made every load a guarded gather."""
    n, h, w, c = sch.get_loops(blk)
    sch.reorder(n, h, c, w)
    rows = sch.fuse(n, h)
    if _cores(target) > 1 and _work(sch, blk) >= PARALLEL_MIN_WORK:
        sch.parallel(rows)
    sch.vectorize(w)


def schedule_injective(
    sch: ScheduleLike,
    block_name: str | None = None,
    *,
    target: Target | None = None,
    inline: bool = True,
) -> Schedule:
    """Elementwise / broadcast / injective kernels.

    Intermediate injective stages are inlined into the output block(s).  Then
    per block: if the last axis has at least a vector of elements, the leading
    axes are fused into a ``parallel`` loop and the last axis is split into
    vectors (``vectorized``, remainder in a separate vectorized tail loop);
    otherwise all loops are fused and split into parallel chunks of vectors.
    Small kernels (< ``PARALLEL_MIN_WORK`` elements) stay on one thread.
    """
    sch = as_schedule(sch)
    if inline:
        _inline_injective(sch, keep=[block_name] if block_name else ())
    if block_name is not None:
        blocks = [sch.get_sblock(block_name)]
    else:
        blocks = [b for b in _all_blocks(sch) if not _is_reduction(sch, b)]
    for blk in blocks:
        _schedule_elementwise_block(sch, blk, target)
    return sch


def schedule_reduction(
    sch: ScheduleLike,
    block_name: str | None = None,
    *,
    target: Target | None = None,
    rfactor: bool = True,
) -> Schedule:
    """Row reductions along the last axis (softmax, layer norm, mean, sum...).

    Injective intermediates are inlined, except per-row values feeding a
    reduction (a mean) and expensive values read twice (softmax's exp).

    If every reduction's length is a multiple of the vector width (and at
    least two vectors): each reduction is vectorized with ``rfactor`` (one
    partial result per lane, then a horizontal reduction), the row axes of
    the output block (``block_name``, default: the kernel's output) are fused
    into one ``parallel`` loop and every stage is computed at that loop (a
    row stays in cache between passes), and the output's last axis is
    vectorized.

    Otherwise ("staged"): every stage stays at the root; a reduction
    interleaves ``REDUCTION_ROW_INTERLEAVE`` rows (unrolled: independent
    accumulator chains) under a parallel row loop, and elementwise stages get
    the injective schedule.  Both beat one-row-at-a-time scalar code 2-9x.
    """
    sch = as_schedule(sch)
    _inline_injective(sch, keep=[block_name] if block_name else ())
    out = sch.get_sblock(block_name) if block_name else _output_blocks(sch)[-1]
    out_name = _block_name(sch, out)
    dtype = _out_dtype(sch, out)
    vec = _lanes(target, dtype)
    reductions = [b for b in _all_blocks(sch) if _is_reduction(sch, b)]
    # shape of the rows: spatial extents of the first reduction stage
    red_rows = red_in_exts = None
    for b in reductions:
        sp, rd = _split_loops(sch, b)
        red_rows = [_extent(sch, lp) for lp in sp]
        red_in_exts = red_rows + [_extent(sch, lp) for lp in rd]
        break
    out_is_red = _is_reduction(sch, out)
    out_exts = [_extent(sch, lp) for lp in sch.get_loops(out)]
    if not reductions or not rfactor or not all(_rfactor_ok(sch, b, vec) for b in reductions):
        _schedule_reduction_staged(sch, target)
        return sch
    # 1. rfactor (before any loop moves: rfactor wants the block's own loops)
    rf_blocks = []
    if rfactor:
        for b in reductions:
            rf = _rfactor(sch, b, vec)
            if rf is not None:
                rf_blocks.append(_block_name(sch, rf))
    out = sch.get_sblock(out_name)
    # 2. rows of the output
    if out_is_red:
        spatial, reduce = _loops_by_kind(sch, out)
        if spatial:
            sch.reorder(*spatial, *reduce)
        row_loops, tail_loop = spatial, None
    else:
        loops = sch.get_loops(out)
        if red_rows is None or red_rows == out_exts or not loops:
            row_loops, tail_loop = list(loops), None
        else:
            row_loops, tail_loop = list(loops[:-1]), loops[-1]
    rows = None
    if row_loops:
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
    # 3. every other stage at the row loop (consumers first)
    if rows is not None:
        for b in reversed(_all_blocks(sch)):
            if _block_name(sch, b) == out_name:
                continue
            try:
                sch.compute_at(b, rows, preserve_unit_loops=False)
            except ScheduleError:
                pass
    # 4. parallel rows (before decompose_reduction, which parallel refuses)
    if rows is not None and _cores(target) > 1 and _extent(sch, rows) > 1:
        elements = math.prod(red_in_exts) if red_in_exts else math.prod(out_exts)
        if elements >= PARALLEL_MIN_WORK_REDUCTION:
            sch.parallel(rows)
    # 5. vectorize: rf partials, materialized intermediates, the output's last axis
    for name in rf_blocks:
        _vectorize_rf(sch, sch.get_sblock(name), vec)
    for b in _all_blocks(sch) if rows is None else _blocks_under(sch, rows):
        bname = _block_name(sch, b)
        if bname == out_name or _is_reduction(sch, b) or bname in rf_blocks:
            continue
        bl = _loops_below(sch, b, rows) if rows is not None else sch.get_loops(b)
        if bl:
            try:
                _vectorize_tail_split(sch, bl[-1], vec)
            except ScheduleError:
                pass
    if tail_loop is not None:
        _vectorize_tail_split(sch, tail_loop, vec)
    return sch


def _loops_below(sch: Schedule, blk, loop) -> list:
    """The loops of ``blk`` nested inside ``loop``."""
    loops = list(sch.get_loops(blk))
    target_var = sch.get(loop).loop_var
    for n, lp in enumerate(loops):
        if sch.get(lp).loop_var.same_as(target_var):
            return loops[n + 1 :]
    return loops


def _blocks_under(sch: Schedule, loop) -> list:
    return list(sch.get_child_blocks(loop))


# Rows whose reductions are interleaved (unrolled) when a reduction cannot be
# vectorized: independent accumulation chains hide the add latency; measured
# 2-4x over one row at a time on layer norm 17x33x45 / 128x250 / 4x1001.
REDUCTION_ROW_INTERLEAVE = 8


def _rfactor_ok(sch: Schedule, blk, vec: int) -> bool:
    spatial, reduce = _split_loops(sch, blk)
    if len(reduce) != 1 or len(sch.get(blk).writes) != 1:
        return False
    ext = _extent(sch, reduce[0])
    # A ragged split would need a predicate, and compute_at drops the
    # predicate of an rfactor block made from a ragged split (TVM 0.27 bug:
    # out-of-bounds reads, wrong sums), so only exact multiples are rfactored.
    return ext % vec == 0 and ext >= 2 * vec


def _schedule_reduction_staged(sch: Schedule, target: Target | None) -> None:
    """Each stage at the root: reductions interleave rows, elementwise vectorized."""
    cores = _cores(target)
    for blk in _all_blocks(sch):
        if not _is_reduction(sch, blk):
            _schedule_elementwise_block(sch, blk, target)
            continue
        spatial, reduce = _split_loops(sch, blk)
        if not spatial:
            continue
        sch.reorder(*spatial, *reduce)
        # interleave rows of the innermost spatial axis (not of a fused row
        # loop: keeps every tile a box, which later primitives rely on)
        ilp = min(REDUCTION_ROW_INTERLEAVE, _extent(sch, spatial[-1]))
        so, si = sch.split(spatial[-1], [None, ilp])
        sch.reorder(so, *reduce, si)
        sch.unroll(si)
        rows = sch.fuse(*spatial[:-1], so) if len(spatial) > 1 else so
        if cores > 1 and _extent(sch, rows) > 1 and _work(sch, blk) >= PARALLEL_MIN_WORK_REDUCTION:
            sch.parallel(rows)
        sch.decompose_reduction(blk, reduce[0])


def _rfactor(sch: Schedule, blk, vec: int):
    """Split ``blk``'s single reduction loop by ``vec`` and rfactor the lanes out."""
    spatial, reduce = _split_loops(sch, blk)
    if len(reduce) != 1 or len(sch.get(blk).writes) != 1:
        return None
    ext = _extent(sch, reduce[0])
    if ext % vec or ext < 2 * vec:
        return None
    try:
        _, ki = sch.split(reduce[0], [None, vec])
        return sch.rfactor(ki, len(spatial))
    except (ScheduleError, tvm.error.InternalError):
        return None


def _loops_by_kind(sch: Schedule, blk):
    """(spatial loops, reduction loops) of a block whose loops bind its iter
    vars one to one (in any order)."""
    loops = sch.get_loops(blk)
    block = sch.get(blk)
    realize = sch.get(loops[-1]).body if loops else None
    spatial, reduce = [], []
    if realize is None or not hasattr(realize, "iter_values"):
        return spatial, reduce
    for iv, value in zip(block.iter_vars, realize.iter_values):
        for lp in loops:
            if value.same_as(sch.get(lp).loop_var):
                (reduce if int(iv.iter_type) == tirx.IterVar.CommReduce else spatial).append(lp)
    order = {sch.get(lp).loop_var.name: n for n, lp in enumerate(loops)}
    spatial.sort(key=lambda lp: order[sch.get(lp).loop_var.name])
    reduce.sort(key=lambda lp: order[sch.get(lp).loop_var.name])
    return spatial, reduce


def _vectorize_rf(sch: Schedule, rf, vec: int) -> None:
    """rf block under the row loop: loops (lanes, k_outer) -> (k_outer, lanes) with
    the lanes vectorized and the init hoisted."""
    loops = sch.get_loops(rf)
    block = sch.get(rf)
    realize = sch.get(loops[-1]).body
    if not hasattr(realize, "iter_values"):
        return
    lane = red = None
    for iv, value in zip(block.iter_vars, realize.iter_values):
        for lp in loops:
            if value.same_as(sch.get(lp).loop_var):
                if int(iv.iter_type) == tirx.IterVar.CommReduce:
                    red = lp
                elif lane is None and _extent(sch, lp) == vec:
                    lane = lp  # rfactor's lane var comes first (a row axis may have vec rows too)
    if lane is None or red is None:
        return
    try:
        sch.reorder(red, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(rf, red)
    except ScheduleError:
        pass


def schedule_for(kind: str, sch: ScheduleLike, block_name: str | None = None, **kwargs) -> Schedule:
    """Apply the schedule of an anchor kind (one of :data:`ANCHOR_KINDS`)."""
    if kind in ("matmul", "dense", "linear"):
        if kwargs.pop("int16_pairs", False):
            return schedule_matmul_int16_pairs(sch, block_name or "qmatmul", **kwargs)
        return schedule_matmul(sch, block_name or "matmul", **kwargs)
    if kind == "batch_matmul":
        return schedule_matmul(sch, block_name or "batch_matmul", **kwargs)
    if kind == "depthwise_conv2d_cl":
        return schedule_depthwise_conv2d(sch, block_name or "conv2d", **kwargs)
    if kind == "conv2d_ocvec":
        return schedule_conv2d_ocvec(sch, block_name or "conv2d", **kwargs)
    if kind in ("conv2d", "conv2d_nchw", "depthwise_conv2d"):
        if kwargs.pop("int16_pairs", False):
            return schedule_conv2d_int16_pairs(sch, block_name or "qconv", **kwargs)
        return schedule_conv2d_nchw(sch, block_name or "conv2d", **kwargs)
    if kind in ("injective", "elementwise", "broadcast"):
        return schedule_injective(sch, block_name, **kwargs)
    if kind in ("reduction", "reduce", "softmax", "layer_norm"):
        return schedule_reduction(sch, block_name, **kwargs)
    raise ValueError(f"unknown anchor kind {kind!r}; expected one of {ANCHOR_KINDS}")


# --------------------------------------------------------------------------
# build / inspect
# --------------------------------------------------------------------------


def build(sch: ScheduleLike, target: Target | None = None) -> tvm.runtime.Module:
    """Compile a scheduled kernel; returns the runtime module (call it, or
    ``time_evaluator("main", dev)`` it)."""
    mod = as_schedule(sch).mod
    return tvm.compile(mod, target=_target(target)).mod


def serial_stages(func: tirx.PrimFunc, min_work: int = 1024) -> list[str]:
    """Stages of ``func`` whose loops are all serial over ``min_work`` or more iterations (reductions: 16x that).

    Such a stage is one no schedule touched: scalar code on one core, a perf
    cliff.  Reductions get a higher bar: the cross-lane step of an rfactored
    reduction is serial by design.
    """
    found: list[str] = []

    def visit(stmt, loops: tuple) -> bool:
        """Record the serial leaf stages under ``stmt``; does it hold any block?"""
        if isinstance(stmt, tirx.For):
            return visit(stmt.body, (*loops, stmt))
        if isinstance(stmt, tirx.SeqStmt):
            return any([visit(s, loops) for s in stmt.seq])
        if isinstance(stmt, SBlockRealize):
            block = stmt.block
            if not visit(block.body, loops):
                reduction = any(int(iv.iter_type) == tirx.IterVar.CommReduce for iv in block.iter_vars)
                exts = [int(lp.extent) if isinstance(lp.extent, tirx.IntImm) else min_work for lp in loops]
                bar = min_work * (16 if reduction else 1)
                if math.prod(exts) >= bar and all(lp.kind == tirx.ForKind.SERIAL for lp in loops):
                    found.append(str(block.name_hint))
            return True
        children = [getattr(stmt, a, None) for a in ("body", "then_case", "else_case")]
        return any([visit(c, loops) for c in children if c is not None])

    visit(func.body, ())
    return found


_LOOP_KIND_RE = re.compile(r"\bT\.(parallel|vectorized|unroll|serial|thread_binding)\(")


def loop_kinds(x: ScheduleLike) -> Counter:
    """Count the loop kinds (``parallel``, ``vectorized``, ``unroll``,
    ``serial`` ...) in a scheduled module's TVMScript."""
    mod = as_schedule(x).mod if not isinstance(x, IRModule) else x
    text = mod.script()
    c = Counter(m.group(1) for m in _LOOP_KIND_RE.finditer(text))
    c["range"] = len(re.findall(r"\bin (?:range|T\.grid)\(", text))
    return c
