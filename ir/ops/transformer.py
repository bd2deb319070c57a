"""Op family 'transformer': rotary position embedding and linear attention (ONNX 23 / 27 semantics).

ONNX's ``Attention``, ``SwiGLU`` and ``CausalConvWithState`` have no op here: the lifter
(``frontend/lift_transformer.py``) writes them as existing kiln ops, so that attention reaches the
fused attention kernel and the rest fuses as pointwise / conv blocks. ``RMSNormalization`` is
``rms_norm`` in ``ir/ops/nn.py``.

References compute in float64 and round once to the output dtype.
"""

from __future__ import annotations

import math

import numpy as np

from ..registry import Attr, Attrs, FusionKind, OnnxSpec, OpTypeError, op
from ..types import FLOAT_DTYPES, Dim, TensorType, dim_div


def _static(d: Dim, what: str) -> int:
    if not isinstance(d, int):
        raise OpTypeError(f"{what} must be static, got {d}")
    return d


def _float_like(t: TensorType | None, dtype: str, what: str) -> None:
    if t is not None and t.dtype != dtype:
        raise OpTypeError(f"{what} has dtype {t.dtype}, the input {dtype}")


# ================================================================== rotary embedding

def _rotary_geometry(x: TensorType, attrs: Attrs) -> tuple[int, int]:
    """(head size, rotary dim) of a rotary_embedding input, checked."""
    if x.dtype not in FLOAT_DTYPES:
        raise OpTypeError(f"input must be a float tensor, got {x.dtype}")
    heads = attrs.get("num_heads", 0)
    if x.rank == 4:
        head = _static(x.shape[3], "the head size (dim 3)")
    elif x.rank == 3:
        if heads <= 0:
            raise OpTypeError(f"a 3-D input {x} needs num_heads > 0, got {heads}")
        hidden = _static(x.shape[2], "the hidden size (dim 2)")
        if hidden % heads:
            raise OpTypeError(f"hidden size {hidden} does not split into num_heads={heads}")
        head = hidden // heads
    else:
        raise OpTypeError(f"input must be 3-D (B, S, H*D) or 4-D (B, H, S, D), got {x}")
    rot = attrs.get("rotary_embedding_dim", 0) or head
    if rot < 0 or rot > head or rot % 2:
        raise OpTypeError(f"rotary_embedding_dim {rot} must be even and at most the head size {head}")
    return head, rot


def _rotary_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    x, cos, sin = ts[0], ts[1], ts[2]
    pos = ts[3] if len(ts) > 3 else None
    _, rot = _rotary_geometry(x, attrs)
    batch, seq = x.shape[0], x.shape[2] if x.rank == 4 else x.shape[1]
    for name, t in (("cos_cache", cos), ("sin_cache", sin)):
        _float_like(t, x.dtype, name)
        want_rank = 2 if pos is not None else 3
        if t.rank != want_rank or t.shape[-1] != rot // 2:
            lead = "(max_position, " if pos is not None else "(batch, seq, "
            raise OpTypeError(f"{name} {t} must be {lead}rotary_dim/2 = {rot // 2})")
        if pos is None and (t.shape[0] != batch or t.shape[1] != seq):
            raise OpTypeError(f"{name} {t} must be (batch, seq, {rot // 2}) = ({batch}, {seq}, {rot // 2})")
    if cos.shape != sin.shape:
        raise OpTypeError(f"cos_cache {cos} and sin_cache {sin} differ in shape")
    if pos is not None:
        if pos.dtype != "i64":
            raise OpTypeError(f"position_ids must be i64, got {pos.dtype}")
        if pos.rank != 2 or pos.shape != (batch, seq):
            raise OpTypeError(f"position_ids {pos} must be (batch, seq) = ({batch}, {seq})")
    return [x]


def _rotary_bound(node, ib: list[float], n_in: int) -> float:
    return ib[0] * (ib[1] + ib[2]) if len(ib) >= 3 else ib[0]


@op("rotary_embedding", bound=_rotary_bound, inputs=("x", "cos", "sin", "position_ids?"),
    attrs={"interleaved": Attr("int", 0), "rotary_embedding_dim": Attr("int", 0), "num_heads": Attr("int", 0)},
    infer=_rotary_infer, fusion=FusionKind.INJECTIVE, onnx=OnnxSpec("RotaryEmbedding", since=23))
def rotary_embedding(x, cos, sin, position_ids=None, *, interleaved, rotary_embedding_dim, num_heads):
    """Rotary position embedding (ONNX RotaryEmbedding): rotate pairs of the first ``rot`` dims of each head.

    x is (B, H, S, D) or (B, S, H*D) with ``num_heads``; rot = rotary_embedding_dim or D. A pair is
    (d, d + rot/2) (or (2i, 2i + 1) when ``interleaved``) rotated by angle i of position p:
    (a, b) -> (a cos - b sin, a sin + b cos), cos/sin = cache[position_ids[b, s], i] (or
    cache[b, s, i] without position_ids; negative ids count from the end). Dims past rot pass through.
    """
    shape = x.shape
    x4 = x.astype(np.float64)
    if x.ndim == 3:
        x4 = x4.reshape(shape[0], shape[1], num_heads, -1)  # (B, S, H, D)
    else:
        x4 = x4.transpose(0, 2, 1, 3)
    rot = rotary_embedding_dim or x4.shape[3]
    c, s = cos.astype(np.float64), sin.astype(np.float64)
    if position_ids is not None:
        idx = np.where(position_ids < 0, position_ids + c.shape[0], position_ids)
        if idx.size and (idx.min() < 0 or idx.max() >= c.shape[0]):
            raise IndexError(f"a position id in [{position_ids.min()}, {position_ids.max()}] is out of range "
                             f"for caches of {c.shape[0]} positions")
        c, s = c[idx], s[idx]
    c, s = c[:, :, None, :], s[:, :, None, :]  # (B, S, 1, rot/2)
    part = x4[..., :rot]
    a, b = (part[..., 0::2], part[..., 1::2]) if interleaved else np.split(part, 2, axis=-1)
    real, imag = c * a - s * b, s * a + c * b
    out = x4.copy()
    if interleaved:
        out[..., 0:rot:2], out[..., 1:rot:2] = real, imag
    else:
        out[..., :rot] = np.concatenate([real, imag], axis=-1)
    out = out.reshape(shape) if x.ndim == 3 else out.transpose(0, 2, 1, 3)
    return out.astype(x.dtype)


# ================================================================== linear attention

UPDATE_RULES = ("linear", "gated", "delta", "gated_delta")


def linear_attention_geometry(q: TensorType, k: TensorType, v: TensorType, attrs: Attrs) -> tuple[int, int, int]:
    """(d_k, d_v, group size) of a linear_attention node, checked."""
    hq, hkv = attrs["q_num_heads"], attrs["kv_num_heads"]
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise OpTypeError(f"q_num_heads ({hq}) must be a positive multiple of kv_num_heads ({hkv})")
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.rank != 3:
            raise OpTypeError(f"{name} must be 3-D (B, T, H*D), got {t}")
        _static(t.shape[2], f"{name}'s hidden size")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise OpTypeError(f"query, key, value must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise OpTypeError(f"query {q}, key {k}, value {v} differ in (batch, time)")
    if q.shape[2] % hq or k.shape[2] % hkv or v.shape[2] % hkv:
        raise OpTypeError(f"hidden sizes {q.shape[2]}, {k.shape[2]}, {v.shape[2]} do not split into "
                          f"{hq} query / {hkv} KV heads")
    dk = q.shape[2] // hq
    if k.shape[2] // hkv != dk:
        raise OpTypeError(f"query head size {dk} differs from key head size {k.shape[2] // hkv}")
    return dk, v.shape[2] // hkv, hq // hkv


def _linear_attention_infer(ts: list[TensorType | None], attrs: Attrs) -> list[TensorType]:
    q, k, v = ts[0], ts[1], ts[2]
    past, decay, beta = (list(ts[3:]) + [None, None, None])[:3]
    rule = attrs.get("update_rule", "gated_delta")
    if rule not in UPDATE_RULES:
        raise OpTypeError(f"update_rule {rule!r} is not one of {UPDATE_RULES}")
    dk, dv, _ = linear_attention_geometry(q, k, v, attrs)
    hq, hkv = attrs["q_num_heads"], attrs["kv_num_heads"]
    b, t = q.shape[0], q.shape[1]
    gating, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if gating != (decay is not None):
        raise OpTypeError(f"update_rule {rule!r} {'needs' if gating else 'forbids'} the decay input")
    if delta != (beta is not None):
        raise OpTypeError(f"update_rule {rule!r} {'needs' if delta else 'forbids'} the beta input")
    if decay is not None:
        _float_like(decay, q.dtype, "decay")
        if decay.rank != 3 or decay.shape[:2] != (b, t) or decay.shape[2] not in (hkv, hkv * dk):
            raise OpTypeError(f"decay {decay} must be (B, T, kv_num_heads) or (B, T, kv_num_heads*d_k) = "
                              f"({b}, {t}, {hkv} or {hkv * dk})")
    if beta is not None:
        _float_like(beta, q.dtype, "beta")
        if beta.rank != 3 or beta.shape[:2] != (b, t) or beta.shape[2] not in (hkv, 1):
            raise OpTypeError(f"beta {beta} must be (B, T, kv_num_heads or 1) = ({b}, {t}, {hkv} or 1)")
    state = TensorType(q.dtype, (b, hkv, dk, dv))
    if past is not None:
        if past.dtype not in FLOAT_DTYPES or past.shape != state.shape:
            raise OpTypeError(f"past_state {past} must be a float (B, kv_num_heads, d_k, d_v) = {state.shape}")
        state = past
    return [TensorType(q.dtype, (b, t, hq * dv)), state]


def _linear_attention_bound(node, ib: list[float], n_in: int) -> float:
    q, k = node.inputs[0].type, node.inputs[1].type
    steps = q.shape[1] if isinstance(q.shape[1], int) else 1024
    hidden = dim_div(k.shape[2], node.attrs["kv_num_heads"]) or 1
    dk = hidden if isinstance(hidden, int) else 64
    return float(ib[0] * ib[1] * ib[2] * dk * dk * steps + (ib[3] if len(ib) > 3 else 0.0) * dk * ib[0])


MAX_UNROLLED_STEPS = 256


def _decompose_linear_attention(g, node) -> list:
    """The recurrence unrolled over its (static) T steps as reshape/slice/matmul/mul/add/exp ops.

    For ONNX opsets without LinearAttention (before 27); T above MAX_UNROLLED_STEPS is refused.
    """
    q, k, v = node.inputs[:3]
    past, decay, beta = (list(node.inputs[3:]) + [None, None, None])[:3]
    a = node.attrs
    hq, hkv = a["q_num_heads"], a["kv_num_heads"]
    b, t = q.type.shape[0], q.type.shape[1]
    if not isinstance(b, int) or not isinstance(t, int) or t > MAX_UNROLLED_STEPS:
        raise OpTypeError(f"linear_attention: unrolling needs static batch and time <= {MAX_UNROLLED_STEPS}, "
                          f"got {q.type}")
    dk, dv, group = linear_attention_geometry(q.type, k.type, v.type, a)
    dt = q.type.np_dtype

    def o(name, *args, **kw):
        return g.op(name, *args, before=node, **kw)

    def heads(x, h):  # (B, T, h*D) -> (B, h, T, D)
        return o("transpose", o("reshape", x, shape=[b, t, h, -1]), perm=[0, 2, 1, 3])

    def step(x, i):
        return o("slice", x, starts=[i], ends=[i + 1], axes=[2])

    q4, k4, v4 = heads(q, hq), heads(k, hkv), heads(v, hkv)
    g4 = None if decay is None else heads(decay, hkv)
    b4 = None if beta is None else heads(beta, beta.type.shape[2])
    state = g.add_constant(np.zeros((b, hkv, dk, dv), dt), g.fresh_name("la_state")) if past is None \
        else past if past.type.dtype == q.type.dtype else o("cast", past, to=q.type.dtype)
    factor = g.add_constant(np.array(1.0 / math.sqrt(dk) if a["scale"] == 0.0 else a["scale"], dt),
                            g.fresh_name("la_scale"))
    outs = []
    for i in range(t):
        kt, vt = step(k4, i), step(v4, i)  # (B, Hkv, 1, dk), (B, Hkv, 1, dv)
        if g4 is not None:
            state = o("mul", state, o("transpose", o("exp", step(g4, i)), perm=[0, 1, 3, 2]))
        if b4 is not None:
            vt = o("mul", step(b4, i), o("sub", vt, o("matmul", kt, state)))
        state = o("add", state, o("matmul", o("transpose", kt, perm=[0, 1, 3, 2]), vt))
        read = state if group == 1 else o("reshape", o("expand", o("unsqueeze", state, axes=[2]),
                                                          shape=[1, 1, group, 1, 1]), shape=[b, hq, dk, dv])
        outs.append(o("mul", o("matmul", step(q4, i), read), factor))
    y = outs[0] if t == 1 else o("concat", *outs, axis=2)
    y = o("reshape", o("transpose", y, perm=[0, 2, 1, 3]), shape=[b, t, hq * dv])
    want = node.outputs[1].type.dtype
    return [y, state if state.type.dtype == want else o("cast", state, to=want)]


@op("linear_attention", bound=_linear_attention_bound,
    inputs=("q", "k", "v", "past_state?", "decay?", "beta?"), outputs=("y", "present_state"),
    attrs={"q_num_heads": Attr("int"), "kv_num_heads": Attr("int"), "update_rule": Attr("str", "gated_delta"),
           "scale": Attr("float", 0.0), "chunk_size": Attr("int", 64)},
    infer=_linear_attention_infer, fusion=FusionKind.OPAQUE, onnx=OnnxSpec("LinearAttention", since=27),
    decompose=_decompose_linear_attention)
def linear_attention(q, k, v, past_state=None, decay=None, beta=None, *, q_num_heads, kv_num_heads,
                     update_rule, scale, chunk_size):
    """Causal linear attention with a (d_k, d_v) state per KV head (ONNX LinearAttention).

    For t = 0..T-1, per batch and KV head, with S the state (past_state or zeros):
    gated rules S *= exp(decay_t) (per head or per key dim); delta rules v_t <- beta_t (v_t - Sᵀk_t);
    S += k_t ⊗ v_t; each of the head's q_num_heads/kv_num_heads query heads reads
    y_t = scale · Sᵀ q_t (scale 0 means 1/sqrt(d_k)). Returns (y (B, T, Hq*d_v), final S).
    ``chunk_size`` is a tuning hint with no effect on the result.
    """
    b, t, _ = q.shape
    dk, dv = q.shape[2] // q_num_heads, v.shape[2] // kv_num_heads
    group = q_num_heads // kv_num_heads

    def heads(a: np.ndarray, h: int) -> np.ndarray:
        return a.astype(np.float64).reshape(b, t, h, -1).transpose(0, 2, 1, 3)  # (B, H, T, D)

    q4, k4, v4 = heads(q, q_num_heads), heads(k, kv_num_heads), heads(v, kv_num_heads)
    g4 = None if decay is None else heads(decay, kv_num_heads)  # (B, Hkv, T, 1 or d_k)
    b4 = None if beta is None else heads(beta, beta.shape[2])  # (B, Hkv or 1, T, 1)
    state = np.zeros((b, kv_num_heads, dk, dv)) if past_state is None else past_state.astype(np.float64)
    factor = 1.0 / math.sqrt(dk) if scale == 0.0 else scale
    out = np.zeros((b, q_num_heads, t, dv))
    for i in range(t):
        kt, vt = k4[:, :, i, :], v4[:, :, i, :]
        if g4 is not None:
            state = state * np.exp(g4[:, :, i, :])[..., None]
        if b4 is not None:
            vt = b4[:, :, i, :] * (vt - np.einsum("bhdm,bhd->bhm", state, kt))
        state = state + kt[..., :, None] * vt[..., None, :]
        out[:, :, i, :] = factor * np.einsum("bhd,bhdm->bhm", q4[:, :, i, :], np.repeat(state, group, axis=1))
    y = out.transpose(0, 2, 1, 3).reshape(b, t, q_num_heads * dv).astype(q.dtype)
    return y, state.astype(q.dtype if past_state is None else past_state.dtype)
