"""Fuzz builders for the ops of family 'transformer' (ops the generic builders do not cover).

Both ops take head-structured operands, so the builders shape them: a pool value of a fitting
shape when there is one, else a new graph input.  Caches hold real cos / sin of angles (|.| <= 1),
decays are log-decays in [-1, 0] and betas in [0, 1], as the models that use them have, so the
outputs stay of the operands' magnitude.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import TensorType

from .generate import Builder, GenFailed, builder

_FLOATS = ("f32", "f64")


def _float_of_rank(rank: int):
    def fits(v: Value) -> bool:
        return v.type.dtype in _FLOATS and v.type.rank == rank and v.type.is_static
    return fits


@builder("rotary_embedding")
def _b_rotary(b: Builder, x: Value | None) -> Value:
    rank = b.choice((3, 4)) if x is None else x.type.rank

    def make() -> Value:
        heads, seq, head = b.randint(1, 3), b.randint(1, 5), 2 * b.randint(1, 4)
        shape = (b.randint(1, 2), heads, seq, head) if rank == 4 else (b.randint(1, 2), seq, heads * head)
        return b.input(TensorType(b.choice(_FLOATS), shape), "x")

    a = b.tame(b.primary(x, _float_of_rank(rank), make))
    if rank not in (3, 4):
        raise GenFailed("rotary_embedding takes a 3-D or 4-D input")
    batch, seq = a.type.shape[0], a.type.shape[2 if rank == 4 else 1]
    if rank == 4:
        heads, head = 0, a.type.shape[3]
    else:
        hidden = a.type.shape[2]
        heads = b.choice([h for h in range(1, hidden + 1) if hidden % h == 0 and (hidden // h) % 2 == 0] or [0])
        if heads == 0:
            raise GenFailed(f"no even head size divides the hidden size {hidden}")
        head = hidden // heads
    if head % 2:
        raise GenFailed(f"head size {head} is odd")
    rot = b.choice([r for r in range(2, head + 1, 2)]) if b.chance(0.4) else 0
    half = (rot or head) // 2
    with_ids = b.chance(0.6)
    positions = b.randint(seq, seq + 6) if with_ids else 0
    lead = (positions,) if with_ids else (batch, seq)
    theta = b.rng.uniform(0, 2 * np.pi, (*lead, half))
    npd = a.type.np_dtype
    ins = [a, b.const(np.cos(theta).astype(npd), "cos"), b.const(np.sin(theta).astype(npd), "sin")]
    if with_ids:
        ins.append(b.const(b.rng.integers(-positions, positions, (batch, seq)).astype(np.int64), "pos"))
    return b.node("rotary_embedding", ins, interleaved=int(b.chance(0.5)), rotary_embedding_dim=rot,
                  num_heads=heads)


@builder("linear_attention")
def _b_linear_attention(b: Builder, x: Value | None) -> Value:
    def make() -> Value:
        return b.input(TensorType(b.choice(_FLOATS), (b.randint(1, 2), b.randint(1, 5), 4 * b.randint(1, 4))), "q")

    q = b.tame(b.primary(x, _float_of_rank(3), make), 4.0)
    batch, steps, hidden = q.type.shape
    hq = b.choice([h for h in range(1, min(hidden, 4) + 1) if hidden % h == 0])
    dk = hidden // hq
    hkv = b.choice([h for h in range(1, hq + 1) if hq % h == 0])
    dv = b.randint(1, 4)
    rule = b.choice(("linear", "gated", "delta", "gated_delta"))
    dt = q.type.dtype

    def operand(shape: tuple[int, ...], lo: float, hi: float, hint: str) -> Value:
        if b.chance(0.5):
            return b.rand_const(shape, dt, lo, hi, hint)
        v = b.input(TensorType(dt, shape), hint)
        return b.node("tanh", [v]) if lo < 0 else b.node("sigmoid", [v])

    k = operand((batch, steps, hkv * dk), -1.0, 1.0, "k")
    v = operand((batch, steps, hkv * dv), -1.0, 1.0, "v")
    past = b.rand_const((batch, hkv, dk, dv), dt, -0.5, 0.5, "state") if b.chance(0.4) else None
    decay = beta = None
    if rule in ("gated", "gated_delta"):
        decay = b.rand_const((batch, steps, hkv * (dk if b.chance(0.5) else 1)), dt, -1.0, 0.0, "decay")
    if rule in ("delta", "gated_delta"):
        beta = operand((batch, steps, hkv if b.chance(0.7) else 1), 0.0, 1.0, "beta")
    scale = 0.0 if b.chance(0.6) else float(b.rng.uniform(0.1, 1.0))
    return b.node("linear_attention", [q, k, v, past, decay, beta], q_num_heads=hq, kv_num_heads=hkv,
                  update_rule=rule, scale=scale)
