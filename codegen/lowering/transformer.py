"""TVM lowerings of the ops in ir/ops/transformer.py.

``rotary_embedding`` is one injective TE compute (each output element reads its own element, its
pair partner and one cos / sin entry), scheduled parallel + vectorized like any pointwise kernel.

``linear_attention`` is a recurrence over time, which TE's compute cannot express; it is a
``te.extern`` whose body is written with TVMScript's IR builder: one parallel task per
(batch, KV head), the (d_k, d_v) state in a local float32 (float64 for f64) buffer, every pass
over the state vectorized along d_v, time steps in order.  The schedule (kind "injective") finds
no block to transform under the extern block and leaves its loops as written.
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..target import vector_lanes
from . import LowerCtx, lowers, shape_of


def _acc(dtype: str) -> str:
    """Arithmetic dtype: float64 stays, the rest computes in float32."""
    return "float64" if str(dtype) == "float64" else "float32"


# ------------------------------------------------------------------ rotary embedding


@lowers("rotary_embedding")
def rotary_embedding(ctx: LowerCtx, x: te.Tensor, cos: te.Tensor, sin: te.Tensor,
                     position_ids: te.Tensor | None = None, *, interleaved, rotary_embedding_dim,
                     num_heads) -> te.Tensor:
    shape = shape_of(x)
    head = shape[3] if len(shape) == 4 else shape[2] // num_heads
    rot = rotary_embedding_dim or head
    half = rot // 2
    acc = _acc(x.dtype)
    max_pos = int(cos.shape[0])

    def angle(table: te.Tensor, b, s, i):
        if position_ids is None:
            return table(b, s, i).astype(acc)
        p = position_ids(b, s).astype("int32")
        return table(tirx.Select(p < 0, p + max_pos, p), i).astype(acc)

    def f(*idx):
        if len(shape) == 4:
            b, h, s, d = idx
            at = lambda dd: x(b, h, s, dd).astype(acc)  # noqa: E731
        else:
            b, s, c = idx
            d = c % head
            base = c - d
            at = lambda dd: x(b, s, base + dd).astype(acc)  # noqa: E731
        if interleaved:
            i = d // 2
            first = d % 2 == 0
            partner = tirx.Select(first, d + 1, d - 1)
        else:
            first = d < half
            i = tirx.Select(first, d, d - half)
            partner = tirx.Select(first, d + half, d - half)
        dc = tirx.Select(d < rot, d, 0)
        ic = tirx.Select(d < rot, i, 0)
        pc = tirx.Select(d < rot, partner, 0)
        c_, s_ = angle(cos, b, s, ic), angle(sin, b, s, ic)
        own, other = at(dc), at(pc)
        rotated = tirx.Select(first, c_ * own - s_ * other, s_ * other + c_ * own)
        return tirx.Select(d < rot, rotated, at(d)).astype(x.dtype)

    ctx.kind = "injective"
    return te.compute(shape, f, name="T_rotary_embedding")


# ------------------------------------------------------------------ linear attention


def _vec_loop(n: int, lanes: int):
    """Loop frames covering range(n) along d_v: (outer serial, inner vectorized) when lanes divide n."""
    if n % lanes == 0 and n > lanes:
        return n // lanes, lanes
    return 1, n


@lowers("linear_attention")
def linear_attention(ctx: LowerCtx, q: te.Tensor, k: te.Tensor, v: te.Tensor, past: te.Tensor | None = None,
                     decay: te.Tensor | None = None, beta: te.Tensor | None = None, *, q_num_heads, kv_num_heads,
                     update_rule, scale, chunk_size) -> tuple[te.Tensor, te.Tensor]:
    bsz, steps, _ = shape_of(q)
    dk = int(q.shape[2]) // q_num_heads
    dv = int(v.shape[2]) // kv_num_heads
    group = q_num_heads // kv_num_heads
    acc = _acc(q.dtype)
    factor = 1.0 / math.sqrt(dk) if scale == 0.0 else scale
    state_dtype = str(past.dtype) if past is not None else str(q.dtype)
    per_dim = decay is not None and int(decay.shape[2]) != kv_num_heads
    beta_heads = int(beta.shape[2]) if beta is not None else 0
    outer, inner = _vec_loop(dv, vector_lanes(ctx.target, acc))
    ins = [t for t in (q, k, v, past, decay, beta) if t is not None]

    def body(bufs, outs):
        it = iter(bufs)
        Q, K, V = next(it), next(it), next(it)
        P = next(it) if past is not None else None
        G = next(it) if decay is not None else None
        Bt = next(it) if beta is not None else None
        Y, S_out = outs
        zero = tirx.const(0.0, acc)

        def lanes(fn):
            """fn(m) over m in range(d_v), vectorized."""
            with T.serial(0, outer) as mo:
                with T.vectorized(0, inner) as mi:
                    fn(mo * inner + mi)

        with IRBuilder() as ib:
            with T.parallel(0, bsz * kv_num_heads) as task:
                b = task // kv_num_heads
                h = task % kv_num_heads
                S = T.alloc_buffer((dk, dv), acc, scope="local")
                tmp = T.alloc_buffer((dv,), acc, scope="local")
                with T.serial(0, dk) as d:
                    if P is not None:
                        lanes(lambda m: T.buffer_store(S, P[b, h, d, m].astype(acc), [d, m]))
                    else:
                        lanes(lambda m: T.buffer_store(S, zero, [d, m]))
                with T.serial(0, steps) as t:
                    if G is not None:
                        with T.serial(0, dk) as d:
                            g = tirx.exp(G[b, t, h * dk + d if per_dim else h].astype(acc))
                            lanes(lambda m: T.buffer_store(S, S[d, m] * g, [d, m]))
                    if Bt is not None:
                        lanes(lambda m: T.buffer_store(tmp, zero, [m]))
                        with T.serial(0, dk) as d:
                            kd = K[b, t, h * dk + d].astype(acc)
                            lanes(lambda m: T.buffer_store(tmp, tmp[m] + S[d, m] * kd, [m]))
                        bt = Bt[b, t, h if beta_heads != 1 else 0].astype(acc)
                        lanes(lambda m: T.buffer_store(tmp, bt * (V[b, t, h * dv + m].astype(acc) - tmp[m]),
                                                       [m]))
                    else:
                        lanes(lambda m: T.buffer_store(tmp, V[b, t, h * dv + m].astype(acc), [m]))
                    with T.serial(0, dk) as d:
                        kd = K[b, t, h * dk + d].astype(acc)
                        lanes(lambda m: T.buffer_store(S, S[d, m] + kd * tmp[m], [d, m]))
                    with T.serial(0, group) as r:
                        hq = h * group + r
                        lanes(lambda m: T.buffer_store(tmp, zero, [m]))
                        with T.serial(0, dk) as d:
                            qd = Q[b, t, hq * dk + d].astype(acc)
                            lanes(lambda m: T.buffer_store(tmp, tmp[m] + qd * S[d, m], [m]))
                        lanes(lambda m: T.buffer_store(
                            Y, (tmp[m] * tirx.const(factor, acc)).astype(q.dtype), [b, t, hq * dv + m]))
                with T.serial(0, dk) as d:
                    lanes(lambda m: T.buffer_store(S_out, S[d, m].astype(state_dtype), [b, h, d, m]))
        return ib.get()

    # The extern block is the kernel's only block, so it is the one the schedules look up as "root":
    # they find no child blocks and leave the loops written above as they are.
    y, state = te.extern([(bsz, steps, q_num_heads * dv), (bsz, kv_num_heads, dk, dv)], ins, body,
                         name="root", dtype=[str(q.dtype), state_dtype])
    ctx.kind, ctx.block = "injective", None
    return y, state
